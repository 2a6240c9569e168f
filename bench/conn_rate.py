"""Connection rate and request latency through a ClusterIP: ebpf vs iptables vs a direct connection.

One run, one namespace topology (kproxy.testing.Topology: nothing touches the host's namespace). For
each Service count (default 10 and 10,000) and each mode, the daemon is started in the node namespace
with that many Services installed (``bench/gen.py``'s synthetic Services plus the measured one,
``10.96.255.10:80`` -> pod0:8081), and then, alternating in the same conditions, R rounds of

- **conn/s**: a single-threaded C client opening a new TCP connection per request (connect, 64-byte
  request, 64-byte response, close with RST so no TIME_WAIT piles up), for ``--seconds``;
- **latency**: one keep-alive connection, 64-byte request/response round trips (p50/p99);

once through the VIP and once straight to the pod IP. The client runs in the client pod's namespace and
in a child cgroup (where the ebpf mode attaches its socket-LB programs). ``--iperf`` adds iperf3
throughput from the external host through a NodePort (tc program vs iptables DNAT vs routed straight to
the pod). Reported: median [min-max] over the rounds; ratio = VIP / direct of the same mode's rounds.

    sudo .venv/bin/python bench/conn_rate.py --sizes 10,10000 --rounds 5 --seconds 2 --iperf \
        --out bench/results/ebpf.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

VIP = "10.96.255.10"
VIP_PORT = 80
POD_PORT = 8081
NODE_PORT = 30201
IPERF_PORT = 5201
CACHE = os.path.join(REPO, ".cache", "kproxy")

C_SOURCE = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static char buf[64];

static void *serve(void *arg) {
    int l = *(int *)arg;
    for (;;) {
        int c = accept(l, NULL, NULL);
        if (c < 0) continue;
        int one = 1;
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        char b[64];
        for (;;) {
            ssize_t n = read(c, b, sizeof(b));
            if (n <= 0) break;
            if (write(c, buf, sizeof(buf)) != sizeof(buf)) break;
        }
        close(c);
    }
    return NULL;
}

static int cmp(const void *a, const void *b) { double x = *(double *)a, y = *(double *)b; return x < y ? -1 : x > y; }

static int addr_of(const char *ip, int port, struct sockaddr_storage *ss) {
    memset(ss, 0, sizeof(*ss));
    struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, ip, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET; a4->sin_port = htons(port); return sizeof(*a4);
    }
    if (inet_pton(AF_INET6, ip, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6; a6->sin6_port = htons(port); return sizeof(*a6);
    }
    return -1;
}

static int full_read(int s, char *b, int n) {
    int got = 0;
    while (got < n) { ssize_t r = read(s, b + got, n - got); if (r <= 0) return -1; got += r; }
    return got;
}

int main(int argc, char **argv) {
    memset(buf, 'x', sizeof(buf));
    if (argc >= 3 && !strcmp(argv[1], "srv")) {
        int l = socket(AF_INET6, SOCK_STREAM, 0), zero = 0, one = 1;
        setsockopt(l, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
        setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(atoi(argv[2])), .sin6_addr = in6addr_any};
        if (bind(l, (void *)&a, sizeof(a)) || listen(l, 4096)) { perror("bind/listen"); return 1; }
        printf("ready\n"); fflush(stdout);
        pthread_t t[2];
        for (int i = 0; i < 2; i++) pthread_create(&t[i], NULL, serve, &l);
        pthread_join(t[0], NULL);
        return 0;
    }
    if (argc < 5) { fprintf(stderr, "usage: srv PORT | conn|rr IP PORT SECONDS\n"); return 2; }
    int rr = !strcmp(argv[1], "rr");
    struct sockaddr_storage ss;
    int alen = addr_of(argv[2], atoi(argv[3]), &ss);
    double secs = atof(argv[4]);
    size_t cap = 1 << 22, n = 0;
    long errors = 0;
    double *lat = malloc(cap * sizeof(double));
    char b[64];
    struct linger lg = {1, 0};
    int one = 1, s = -1;
    if (rr) {
        s = socket(ss.ss_family, SOCK_STREAM, 0);
        setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (connect(s, (void *)&ss, alen)) { perror("connect"); return 1; }
    }
    double start = now(), end = start + secs;
    for (;;) {
        double t0 = now();
        if (t0 >= end || n >= cap) break;
        if (!rr) {
            s = socket(ss.ss_family, SOCK_STREAM, 0);
            setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            if (connect(s, (void *)&ss, alen)) { errors++; close(s); if (errors > 1000) break; continue; }
        }
        if (write(s, buf, sizeof(buf)) != sizeof(buf) || full_read(s, b, sizeof(b)) < 0) {
            errors++;
            if (rr || errors > 1000) break;
        }
        if (!rr) { setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)); close(s); }
        lat[n++] = now() - t0;
    }
    double took = now() - start;
    if (rr) close(s);
    qsort(lat, n, sizeof(double), cmp);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e-6;
    printf("{\"count\": %zu, \"seconds\": %.4f, \"rate\": %.1f, \"p50_us\": %.2f, \"p99_us\": %.2f, "
           "\"cpu_us\": %.2f, \"errors\": %ld}\n", n, took, n / took, n ? lat[n / 2] * 1e6 : 0,
           n ? lat[(size_t)(n * 0.99)] * 1e6 : 0, n ? cpu * 1e6 / n : 0, errors);
    return 0;
}
"""


def build_tool() -> str:
    from ccache import compile_cached

    return compile_cached(CACHE, "connbench", C_SOURCE)


def manifests(directory: str, n: int, pod_ip: str) -> None:
    from gen import endpoint_slice, service

    items: list[dict[str, Any]] = []
    for i in range(max(n - 1, 0)):
        items.append(service(i))
        items.append(endpoint_slice(i, 2))
    items.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bench", "namespace": "default"},
                  "spec": {"type": "NodePort", "clusterIP": VIP, "clusterIPs": [VIP],
                           "ports": [{"name": "tcp", "protocol": "TCP", "port": VIP_PORT, "targetPort": POD_PORT},
                                     {"name": "iperf", "protocol": "TCP", "port": IPERF_PORT,
                                      "targetPort": IPERF_PORT, "nodePort": NODE_PORT}]}})
    items.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                  "metadata": {"name": "bench-1", "namespace": "default",
                               "labels": {"kubernetes.io/service-name": "bench"}},
                  "addressType": "IPv4",
                  "ports": [{"name": "tcp", "protocol": "TCP", "port": POD_PORT},
                            {"name": "iperf", "protocol": "TCP", "port": IPERF_PORT}],
                  "endpoints": [{"addresses": [pod_ip], "conditions": {"ready": True}, "nodeName": "node-a"}]})
    for f in os.listdir(directory):
        os.unlink(os.path.join(directory, f))
    tmp = os.path.join(directory, ".all.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"apiVersion": "v1", "kind": "List", "items": items}, f)
    os.replace(tmp, os.path.join(directory, "all.json"))


@contextlib.contextmanager
def cgroup_and_bpffs() -> Iterator[tuple[str, str]]:
    """A private bpffs and a child cgroup (see tests/ebpf/conftest.py)."""
    sys.path.insert(0, os.path.join(REPO, "tests", "ebpf"))
    from tests.ebpf.conftest import bpf_environment

    with bpf_environment() as env:
        yield env.cgroup, env.pin


def run_client(tool: str, cgroup: str, ns: str, kind: str, ip: str, port: int, seconds: float) -> dict[str, Any]:
    script = f'echo $$ > {cgroup}/cgroup.procs && exec ip netns exec "$0" "$@"'
    p = subprocess.run(["sh", "-c", script, ns, tool, kind, ip, str(port), str(seconds)], capture_output=True,
                       text=True, timeout=seconds + 30)
    if p.returncode != 0:
        raise RuntimeError(f"client failed: {p.stderr.strip()}")
    return json.loads(p.stdout)


def iperf(topo: Any, ip: str, port: int, seconds: float) -> float:
    p = topo.exec(topo.ext, ["iperf3", "-c", ip, "-p", str(port), "-t", str(seconds), "-J"], timeout=seconds + 30)
    return json.loads(p.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9


def fmt(values: list[float], digits: int = 0) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:,.{digits}f} [{min(values):,.{digits}f}-{max(values):,.{digits}f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,10000")
    ap.add_argument("--modes", default="ebpf,iptables")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--iperf", action="store_true", help="also iperf3 through a NodePort from the external host")
    ap.add_argument("--iperf-seconds", type=float, default=2.0)
    ap.add_argument("--iperf-rounds", type=int, default=3)
    ap.add_argument("--iptables-backend", default="legacy")
    ap.add_argument("--out", default="", help="write a Markdown report here")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, cgroups, bpffs)", file=sys.stderr)
        return 2
    os.environ.setdefault("KPROXY_CACHE_DIR", CACHE)
    from kproxy.testing.topology import NODE_EXT_IP, Topology

    tool = build_tool()
    sizes = [int(x) for x in a.sizes.split(",")]
    modes = a.modes.split(",")
    rows: list[dict[str, Any]] = []
    mdir = tempfile.mkdtemp(prefix="kpbench-manifests-")
    try:
        with Topology(pods=1, ipv6=False, servers=False) as topo, cgroup_and_bpffs() as (cgroup, pin):
            pod = topo.pod["pod0"]
            topo.spawn(pod.ns, [tool, "srv", str(POD_PORT)], wait_for="ready")
            if a.iperf:
                topo.spawn(pod.ns, ["iperf3", "-s", "-p", str(IPERF_PORT)])
                time.sleep(0.3)

            def measure(label: str, mode: str, size: int, through_vip: bool) -> None:
                """Alternate VIP and direct samples (order flipped each round) so both see the same load."""
                keys = ("conn", "p50", "p99", "cpu", "rr_p50", "rr_p99")
                res: dict[str, list[float]] = {k: [] for k in keys}
                dres: dict[str, list[float]] = {k: [] for k in keys}
                ratios: dict[str, list[float]] = {"conn": [], "p50": [], "cpu": [], "rr_p50": []}
                errors = 0
                run_client(tool, cgroup, topo.client, "conn", pod.ip, POD_PORT, 0.3)  # warm up
                for i in range(a.rounds):
                    targets = [(dres, pod.ip, POD_PORT)]
                    if through_vip:
                        targets.append((res, VIP, VIP_PORT))
                    if i % 2:
                        targets.reverse()
                    for out, ip, port in targets:
                        c = run_client(tool, cgroup, topo.client, "conn", ip, port, a.seconds)
                        r = run_client(tool, cgroup, topo.client, "rr", ip, port, a.seconds)
                        out["conn"].append(c["rate"])
                        out["p50"].append(c["p50_us"])
                        out["p99"].append(c["p99_us"])
                        out["cpu"].append(c["cpu_us"])
                        out["rr_p50"].append(r["p50_us"])
                        out["rr_p99"].append(r["p99_us"])
                        errors += c["errors"] + r["errors"]
                    if through_vip:
                        for k in ("conn", "p50", "cpu"):
                            ratios[k].append(res[k][-1] / dres[k][-1])
                        ratios["rr_p50"].append(res["rr_p50"][-1] / dres["rr_p50"][-1])
                row = {"label": label, "mode": mode, "size": size, "vip": res if through_vip else None,
                       "direct": dres, "ratios": ratios, "errors": errors, "iperf": {}}
                if a.iperf:
                    tp: dict[str, list[float]] = {"nodeport": [], "direct": [], "ratio": []}
                    for _ in range(a.iperf_rounds):
                        tp["direct"].append(iperf(topo, pod.ip, IPERF_PORT, a.iperf_seconds))
                        if through_vip:
                            tp["nodeport"].append(iperf(topo, NODE_EXT_IP, NODE_PORT, a.iperf_seconds))
                            tp["ratio"].append(tp["nodeport"][-1] / tp["direct"][-1])
                    row["iperf"] = tp
                rows.append(row)
                print(json.dumps(row), flush=True)

            measure("baseline (no daemon)", "none", 0, through_vip=False)
            for size in sizes:
                manifests(mdir, size, pod.ip)
                for mode in modes:
                    extra = ["--bpf-cgroup-path", cgroup, "--bpf-pin-path", pin, "--bpf-interfaces", "ext0"] \
                        if mode == "ebpf" else ["--iptables-backend", a.iptables_backend]
                    t0 = time.monotonic()
                    p = topo.start_daemon(mdir, mode, *extra, log_name=f"kproxy-{mode}-{size}.log")
                    try:
                        try:
                            topo.wait_healthy(timeout=600)
                        except TimeoutError as e:
                            raise TimeoutError(f"{e}\n{topo.read_log(f'kproxy-{mode}-{size}.log')}") from None
                        ready = time.monotonic() - t0
                        # the first sync may report healthy before the measured Service is reachable
                        for _ in range(100):
                            probe = run_client(tool, cgroup, topo.client, "rr", VIP, VIP_PORT, 0.05)
                            if probe["count"] > 0:
                                break
                            time.sleep(0.2)
                        print(f"# {mode} with {size} Services ready in {ready:.1f}s", flush=True)
                        measure(f"{mode}, {size} Services", mode, size, through_vip=True)
                        rows[-1]["ready_s"] = ready
                        rows[-1]["sync_log"] = [line.split(": ", 1)[-1] for line in
                                                topo.read_log(f"kproxy-{mode}-{size}.log").splitlines()
                                                if "full sync" in line][:1]
                    finally:
                        topo.stop_daemon(p)
                        topo.exec(topo.node, [*topo.daemon_args(mdir, mode, *extra), "--cleanup"], check=False,
                                  timeout=600)
    finally:
        shutil.rmtree(mdir, ignore_errors=True)
    report = render(rows, a)
    print(report)
    if a.out:
        with open(a.out, "w") as f:
            f.write(report)
    return 0


def render(rows: list[dict[str, Any]], a: argparse.Namespace) -> str:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    lines = [
        "# Connection rate and latency through a ClusterIP: ebpf vs iptables vs direct",
        "",
        f"`bench/conn_rate.py --sizes {a.sizes} --modes {a.modes} --rounds {a.rounds} --seconds {a.seconds}"
        f"{' --iperf' if a.iperf else ''}` on {os.cpu_count()} cores ({cpu}), kernel {os.uname().release}, "
        f"load average at the end {' '.join(load)}; iptables back end: {a.iptables_backend}. Single-threaded C "
        "client in the client pod's namespace (and the socket-LB cgroup), C server in pod0; new conn/s = "
        "connect + 64 B request/response + close (client CPU = its user+system time per connection, which "
        "includes the in-line veth/softirq work and is the least sensitive to other load on the machine); req = "
        "64 B round trip on a kept-alive connection. "
        "Median [min-max] over the rounds. *VIP/direct* is the median of per-round ratios, the VIP and the "
        "direct sample of a round taken back to back (order alternating) under the same daemon state and load.",
        "",
        "| setup | path | new conn/s | VIP/direct | conn p50 µs | VIP/direct | client CPU µs/conn | VIP/direct "
        "| conn p99 µs | req p50 µs | VIP/direct | req p99 µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for path, d in (("VIP", r["vip"]), ("direct", r["direct"])):
            if d is None:
                continue
            rt = {k: "-" for k in ("conn", "p50", "cpu", "rr_p50")}
            if path == "VIP":
                rt = {k: fmt(v, 3) for k, v in r["ratios"].items()}
            lines.append(f"| {r['label']} | {path} | {fmt(d['conn'])} | {rt['conn']} | {fmt(d['p50'], 1)} | "
                         f"{rt['p50']} | {fmt(d['cpu'], 1)} | {rt['cpu']} | {fmt(d['p99'], 0)} | "
                         f"{fmt(d['rr_p50'], 1)} | {rt['rr_p50']} | {fmt(d['rr_p99'], 0)} |")
    errors = sum(r.get("errors", 0) for r in rows)
    lines += ["", f"Client errors over the whole run: {errors}."]
    if any(r["iperf"] for r in rows):
        lines += ["", "## iperf3 through a NodePort from the external host (Gbit/s, one TCP stream)", "",
                  "| setup | NodePort | routed straight to the pod | NodePort/direct |", "|---|---|---|---|"]
        for r in rows:
            if r["iperf"]:
                lines.append(f"| {r['label']} | {fmt(r['iperf'].get('nodeport', []), 2)} | "
                             f"{fmt(r['iperf'].get('direct', []), 2)} | {fmt(r['iperf'].get('ratio', []), 3)} |")
    lines += ["", "## Daemon start to first completed sync", ""]
    for r in rows:
        if "ready_s" in r:
            sync = f" ({r['sync_log'][0]})" if r.get("sync_log") else ""
            lines.append(f"- {r['label']}: {r['ready_s']:.1f} s{sync}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
