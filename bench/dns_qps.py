"""Cluster DNS benchmark: queries per second and latency of ``kproxy dns`` on one core.

The zone holds 10,000 Services (by default 8,000 ClusterIP with two named ports, 2,000 StatefulSet-style
headless Services with 5 ready endpoints each) and 3 Nodes. The server runs pinned to CPU 0 (``taskset``),
dnsperf (Debian ``dnsperf``) to CPU 1, over UDP on loopback. The query mix: 40 % ClusterIP A, 15 % headless
A (5 records), 15 % SRV (ClusterIP and headless), 10 % pod hostname A, 10 % AAAA NODATA, 10 % NXDOMAIN.

Reported per run: dnsperf's throughput at saturation, lost queries, the server's CPU time (from
/proc/PID/stat), hence queries per server CPU-second (the per-core capacity, robust against other load on
the machine) and, from a second dnsperf run at a fixed rate with per-query output (-v), p50/p99 latency.
Also: time to build the table for the 10,000 Services and to apply one Service change.

    .venv/bin/python bench/dns_qps.py [--services 10000] [--runs 5] [--seconds 10] [--out bench/results/dns_qps.md]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ZONE = "cluster.local"


def gen_objects(n: int, headless_share: float = 0.2, eps: int = 5) -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = []
    n_headless = int(n * headless_share)
    for i in range(n):
        ns = f"ns-{i % 100}"
        name = f"svc-{i}"
        if i < n_headless:
            objs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
                         "spec": {"clusterIP": "None", "ports": [{"name": "peer", "port": 7000}]}})
            objs.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                         "metadata": {"name": f"{name}-x", "namespace": ns,
                                      "labels": {"kubernetes.io/service-name": name}},
                         "addressType": "IPv4", "ports": [{"name": "peer", "port": 7000, "protocol": "TCP"}],
                         "endpoints": [{"addresses": [f"10.{128 + (i * eps + j) // 65536}.{(i * eps + j) // 256 % 256}."
                                                      f"{(i * eps + j) % 256}"],
                                        "hostname": f"{name}-{j}", "conditions": {"ready": True}}
                                       for j in range(eps)]})
        else:
            ip = f"10.96.{i // 250}.{i % 250 + 1}"
            objs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
                         "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80},
                                                             {"name": "grpc", "port": 9090}]}})
    for k in range(3):
        objs.append({"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"node-{k}"},
                     "status": {"addresses": [{"type": "InternalIP", "address": f"192.168.0.{k + 1}"}]}})
    return objs


def gen_queries(n: int, count: int, headless_share: float = 0.2, eps: int = 5, seed: int = 1) -> list[str]:
    rnd = random.Random(seed)
    n_headless = int(n * headless_share)
    out = []
    for _ in range(count):
        x = rnd.random()
        i = rnd.randrange(n_headless, n)
        h = rnd.randrange(n_headless)
        if x < 0.40:
            out.append(f"svc-{i}.ns-{i % 100}.svc.{ZONE} A")
        elif x < 0.55:
            out.append(f"svc-{h}.ns-{h % 100}.svc.{ZONE} A")
        elif x < 0.62:
            out.append(f"_http._tcp.svc-{i}.ns-{i % 100}.svc.{ZONE} SRV")
        elif x < 0.70:
            out.append(f"_peer._tcp.svc-{h}.ns-{h % 100}.svc.{ZONE} SRV")
        elif x < 0.80:
            out.append(f"svc-{h}-{rnd.randrange(eps)}.svc-{h}.ns-{h % 100}.svc.{ZONE} A")
        elif x < 0.90:
            out.append(f"svc-{i}.ns-{i % 100}.svc.{ZONE} AAAA")
        else:
            out.append(f"nope-{rnd.randrange(10**6)}.ns-{i % 100}.svc.{ZONE} A")
    return out


def measure_build(objs: list[dict[str, Any]]) -> dict[str, Any]:
    from kproxy.dns.zone import ClusterZone
    from kproxy.store import KIND_NODE, KIND_SERVICE, KIND_SLICE, ClusterStore, Event

    kinds = {"Service": KIND_SERVICE, "EndpointSlice": KIND_SLICE, "Node": KIND_NODE}
    store = ClusterStore()
    zone = ClusterZone(store)
    store.apply([Event("ADDED", kinds[o["kind"]], o) for o in objs])
    t0 = time.process_time()
    zone.sync()
    full = time.process_time() - t0
    times = []
    for k in range(20):
        svc = dict(objs[-4 - 1])  # a ClusterIP Service; change its IP back and forth
        svc = json.loads(json.dumps(svc))
        svc["spec"]["clusterIP"] = f"10.99.0.{k % 2 + 1}"
        store.apply([Event("MODIFIED", KIND_SERVICE, svc)])
        t0 = time.process_time()
        zone.sync()
        times.append(time.process_time() - t0)
    return {"full_build_s": full, "incremental_ms": statistics.median(times) * 1000,
            "answers": len(zone.table.answers), "names": len(zone.table.names)}


def measure_hot_path(objs: list[dict[str, Any]], n_services: int) -> dict[str, float]:
    """CPU µs per query of the Python answer path alone (no sockets), and of one loopback UDP
    sendto+recvfrom pair (the syscall floor every query pays on top)."""
    import dns.message

    from kproxy.dns.wire import fast_response
    from kproxy.dns.zone import ClusterZone
    from kproxy.store import ClusterStore, Event

    store = ClusterStore()
    zone = ClusterZone(store)
    store.apply([Event("ADDED", o["kind"], o) for o in objs])
    zone.sync()
    table = zone.table
    wires = [dns.message.make_query(*line.split(), use_edns=0).to_wire() for line in gen_queries(n_services, 20000)]
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for w in wires:
            fast_response(w, table)
        best = min(best, (time.process_time() - t0) / len(wires))
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    addr = a.getsockname()
    pkt = wires[0]
    t0 = time.process_time()
    for _ in range(20000):
        b.sendto(pkt, addr)
        a.recvfrom(65535)
    io = (time.process_time() - t0) / 20000
    a.close()
    b.close()
    return {"py_us": best * 1e6, "io_us": io * 1e6}


def measure_drain(objs: list[dict[str, Any]], n_services: int, n: int = 3000, reps: int = 5) -> dict[str, Any]:
    """Saturated one-core capacity of the real DnsService, free of scheduler noise: queue ``n`` queries in
    its socket before the loop runs, then time (process CPU) until every answer is back. Includes the
    in-process client's receive of the answers (a small share, ~1 µs per query)."""
    import asyncio

    import dns.message
    import uvloop

    from kproxy.dns.server import DnsService
    from kproxy.store import ClusterStore, Event

    wires = [dns.message.make_query(*line.split(), use_edns=0).to_wire() for line in gen_queries(n_services, n)]
    out: dict[str, Any] = {}
    for mode in ("reader", "protocol"):
        os.environ["KPROXY_DNS_UDP"] = mode

        async def run() -> list[float]:
            store = ClusterStore()
            store.apply([Event("ADDED", o["kind"], o) for o in objs])
            svc = DnsService(store, listen="127.0.0.1:0")
            await svc.start()
            assert svc.bound is not None
            loop = asyncio.get_running_loop()
            rates = []
            for _ in range(reps):
                cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                cli.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
                cli.bind(("127.0.0.1", 0))
                for w in wires:  # queued before the server gets to run
                    cli.sendto(w, svc.bound)
                cli.setblocking(False)
                got = 0
                done = loop.create_future()

                def on_answers(cli: socket.socket = cli, done: asyncio.Future[None] = done) -> None:
                    nonlocal got
                    while True:
                        try:
                            cli.recv(4096)
                        except BlockingIOError:
                            break
                        got += 1
                    if got >= n and not done.done():
                        done.set_result(None)

                t0 = time.process_time()
                loop.add_reader(cli.fileno(), on_answers)
                await asyncio.wait_for(done, 120)
                rates.append(n / (time.process_time() - t0))
                loop.remove_reader(cli.fileno())
                cli.close()
            await svc.close()
            return rates

        out[mode] = uvloop.run(run())
    os.environ.pop("KPROXY_DNS_UDP", None)
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


NICE: list[str] = []


def dnsperf(port: int, qfile: str, seconds: float, extra: list[str]) -> str:
    cmd = [*NICE, "taskset", "-c", "1", "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", qfile, "-l", str(seconds),
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout


def _num(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--outstanding", type=int, default=200)
    ap.add_argument("--latency-qps", type=int, default=0, help="rate of the latency run (default: 60%% of max)")
    ap.add_argument("--out", default="")
    ap.add_argument("--nice", type=int, default=0,
                    help="run server and dnsperf at this nice level (e.g. -15 on a machine shared with other work)")
    args = ap.parse_args()
    if args.nice:
        NICE[:] = ["nice", "-n", str(args.nice)]
    if not shutil.which("dnsperf"):
        print("dnsperf not found (apt-get install dnsperf)", file=sys.stderr)
        return 2
    objs = gen_objects(args.services)
    build = measure_build(objs)
    print(f"table: {build['answers']} prebuilt answers, {build['names']} names; full build "
          f"{build['full_build_s']:.2f} s, one-Service update {build['incremental_ms']:.1f} ms", flush=True)
    build.update(measure_hot_path(objs, args.services))
    print(f"answer path {build['py_us']:.2f} µs/query (Python, no sockets); loopback sendto+recvfrom "
          f"{build['io_us']:.2f} µs", flush=True)
    drain = measure_drain(objs, args.services)
    for mode, rates in drain.items():
        print(f"saturated drain ({mode}): {statistics.median(rates):,.0f} queries per CPU-second "
              f"(min {min(rates):,.0f}, max {max(rates):,.0f})", flush=True)
    build["drain"] = drain  # type: ignore[assignment]
    tmp = Path(tempfile.mkdtemp(prefix="dnsbench"))
    try:
        mdir = tmp / "manifests"
        mdir.mkdir()
        (mdir / "cluster.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))
        qfile = tmp / "queries.txt"
        qfile.write_text("\n".join(gen_queries(args.services, 50000)) + "\n")
        port = free_port()
        log = open(tmp / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
        proc = subprocess.Popen([*NICE, "taskset", "-c", "0", sys.executable, "-m", "kproxy", "dns", "--manifests",
                                 str(mdir), "--listen", f"127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT,
                                cwd=ROOT)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                out = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+short", "+time=1", "+tries=1",
                                      f"svc-{args.services - 1}.ns-{(args.services - 1) % 100}.svc.{ZONE}"],
                                     capture_output=True, text=True).stdout
                if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", out.strip()):
                    break
                time.sleep(0.2)
            else:
                raise RuntimeError("server did not come up: " + (tmp / "server.log").read_text())
            dnsperf(port, str(qfile), 2, ["-c", str(args.clients), "-q", str(args.outstanding)])  # warm-up
            runs = []
            for r in range(args.runs):
                c0 = cpu_seconds(proc.pid)
                out = dnsperf(port, str(qfile), args.seconds, ["-c", str(args.clients), "-q", str(args.outstanding)])
                cpu = cpu_seconds(proc.pid) - c0
                completed = _num(r"Queries completed:\s+(\d+)", out)
                qps = _num(r"Queries per second:\s+([\d.]+)", out)
                lost = _num(r"Queries lost:\s+(\d+)", out)
                runs.append({"qps": qps, "lost": lost, "cpu": cpu, "per_cpu_s": completed / cpu if cpu else 0,
                             "avg_ms": _num(r"Average Latency \(s\):\s+([\d.]+)", out) * 1000})
                print(f"run {r + 1}: {qps:,.0f} qps, lost {lost:.0f}, server CPU {cpu:.2f} s "
                      f"→ {runs[-1]['per_cpu_s']:,.0f} queries per CPU-second, avg latency "
                      f"{runs[-1]['avg_ms']:.2f} ms", flush=True)
            med_qps = statistics.median(x["qps"] for x in runs)
            rate = args.latency_qps or int(med_qps * 0.6)
            lat_out = dnsperf(port, str(qfile), 5, ["-c", "1", "-q", str(args.outstanding), "-Q", str(rate), "-v"])
            lats = sorted(float(m) for m in re.findall(r"^> \S+ .* ([\d.]+)$", lat_out, re.M))
            lat = {"rate": rate, "n": len(lats)}
            if lats:
                lat.update(p50=lats[len(lats) // 2] * 1000, p99=lats[int(len(lats) * 0.99)] * 1000,
                           max=lats[-1] * 1000)
                print(f"latency at {rate:,} qps ({len(lats)} queries): p50 {lat['p50']:.3f} ms, "
                      f"p99 {lat['p99']:.3f} ms, max {lat['max']:.3f} ms", flush=True)
            report(args, build, runs, lat)
        finally:
            proc.terminate()
            proc.wait(10)
            log.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def report(args: argparse.Namespace, build: dict[str, Any], runs: list[dict[str, float]],
           lat: dict[str, float]) -> None:
    def mmm(key: str, fmt: str = "{:,.0f}") -> str:
        vals = [r[key] for r in runs]
        return f"{fmt.format(statistics.median(vals))} (min {fmt.format(min(vals))}, max {fmt.format(max(vals))})"

    load = os.getloadavg()
    lines = [
        f"## kproxy dns: {args.services:,} Services, UDP on loopback, server pinned to one core",
        "",
        f"Machine: {os.cpu_count()} cores ({_cpu_model()}), Python {sys.version.split()[0]}, uvloop; "
        f"load average during the run {load[0]:.1f} (other work shares the machine). "
        + (f"Server and dnsperf at nice {args.nice}. " if args.nice else "")
        + f"dnsperf on CPU 1, {args.clients} clients, {args.outstanding} outstanding; {args.runs} runs of "
        f"{args.seconds:g} s; query mix: 40 % ClusterIP A, 15 % headless A, 15 % SRV, 10 % pod hostname A, "
        "10 % AAAA NODATA, 10 % NXDOMAIN.",
        "",
        "| metric | median (min, max) |",
        "|---|---|",
        f"| throughput (dnsperf, queries/s) | {mmm('qps')} |",
        f"| queries answered per server CPU-second (one core's capacity) | {mmm('per_cpu_s')} |",
        f"| lost queries per run | {mmm('lost')} |",
        f"| average latency at saturation (ms) | {mmm('avg_ms', '{:.2f}')} |",
    ]
    if "p99" in lat:
        lines.append(f"| latency at {lat['rate']:,.0f} qps: p50 / p99 / max (ms) | "
                     f"{lat['p50']:.3f} / {lat['p99']:.3f} / {lat['max']:.3f} |")
    lines += [
        f"| table build, {args.services:,} Services ({build['answers']:,.0f} prebuilt answers) | "
        f"{build['full_build_s']:.2f} s |",
        f"| table update after one Service change (incremental) | {build['incremental_ms']:.1f} ms |",
        *[f"| saturated capacity, {m} UDP path: backlog of 3,000 queries drained (queries per CPU-second) | "
          f"{statistics.median(r):,.0f} (min {min(r):,.0f}, max {max(r):,.0f}) |"
          for m, r in build["drain"].items()],  # type: ignore[union-attr]
        f"| answer path alone, CPU per query (fast path, no sockets) | {build['py_us']:.2f} µs |",
        f"| one loopback UDP sendto + recvfrom pair, CPU | {build['io_us']:.2f} µs |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
