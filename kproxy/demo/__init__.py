"""``kproxy demo``: a real node in network namespaces, real rules, real traffic, then cleanup.

Builds a node namespace with a bridge, three backend pods (created through kproxy's CNI plugins, as
kubelet would), a client pod and an external host; loads the bundled example manifests (ClusterIP,
NodePort, a UDP Service, session affinity); runs the kproxy daemon in the node namespace; sends
traffic; prints which backend answered how often and the sync timings; scales a backend away and
measures convergence. Everything it created is removed at the end, also on Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import time
from importlib import resources
from typing import Any

from ..testing.topology import Topology

MANIFESTS = "manifests"


def _say(msg: str) -> None:
    print(msg, flush=True)


def _table(rows: list[tuple[str, str, dict[str, Any]]], pods: list[str]) -> str:
    head = f"{'Service':<22}{'frontend':<24}{'from':<10}" + "".join(f"{p:>7}" for p in pods) + f"{'errors':>8}"
    lines = [head, "-" * len(head)]
    for svc, frontend, res in rows:
        src = res.pop("_from", "client")
        counts = res.get("counts", {})
        lines.append(f"{svc:<22}{frontend:<24}{src:<10}" + "".join(f"{counts.get(p, 0):>7}" for p in pods)
                     + f"{res.get('errors', 0):>8}")
    return "\n".join(lines)


def _sync_lines(log: str) -> list[str]:
    return re.findall(r"(full|partial) sync: .*?total ([\d.]+) ms", log)


def _copy_manifests(dest: str) -> None:
    src = resources.files(__package__).joinpath(MANIFESTS)
    for entry in src.iterdir():
        if entry.name.endswith((".yaml", ".yml", ".json")):
            with open(os.path.join(dest, entry.name), "w") as f:
                f.write(entry.read_text())


def _drop_backend(manifests: str, ip: str) -> None:
    path = os.path.join(manifests, "endpointslices.yaml")
    with open(path) as f:
        text = f.read()
    text = "\n".join(line for line in text.splitlines() if f"[{ip}]" not in line) + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # atomic: the daemon never reads a half-written file


def run_demo(mode: str, extra: list[str], requests: int, use_cni: bool) -> int:
    t_start = time.monotonic()
    with Topology(pods=3, ipv6=False, cni=use_cni, prefix=f"kpdemo{os.getpid() % 10000}") as topo:
        _say(f"• network: node namespace {topo.node} (bridge kbr0 10.244.1.1/24), pods pod0..pod2 "
             f"(10.244.1.10-12, {'via kproxy CNI plugins' if use_cni else 'via ip commands'}), "
             f"client 10.244.1.100, external host 203.0.113.2 — built in {time.monotonic() - t_start:.1f} s")
        manifests = os.path.join(topo.workdir, "manifests")
        os.makedirs(manifests)
        _copy_manifests(manifests)
        _say(f"• starting kproxy --proxy-mode {mode} in {topo.node} with the bundled manifests")
        daemon = topo.start_daemon(manifests, mode, *extra)
        topo.wait_healthy(60)
        rows: list[tuple[str, str, dict[str, Any]]] = []

        def probe(label: str, frontend: str, ns: str, src: str, *args: Any) -> None:
            res = topo.probe(ns, *args, "--timeout", "1")
            res["_from"] = src
            rows.append((label, frontend, res))

        n = str(requests)
        probe("demo/web", "10.96.0.10:80 tcp", topo.client, "client", "http", "10.96.0.10", 80, "-n", n)
        probe("demo/web-nodeport", "203.0.113.1:30080 tcp", topo.ext, "external", "http", "203.0.113.1", 30080,
              "-n", n)
        probe("demo/echo-udp", "10.96.0.12:53 udp", topo.client, "client", "udp", "10.96.0.12", 53, "-n", n)
        probe("demo/sticky", "10.96.0.13:80 tcp", topo.client, "client", "http", "10.96.0.13", 80, "-n", n)
        pods = sorted(topo.pod)
        _say(f"\nWhich backend answered, out of {requests} requests each:")
        _say(_table(rows, pods))
        _say("  (sticky has sessionAffinity: ClientIP, so one client sticks to one backend)")
        status = topo.exec(topo.node, [sys.executable, "-m", "kproxy", "status"], check=False)
        _say("\n`kproxy status` (read back from the kernel):\n" + status.stdout.rstrip())

        _say("\n• scaling down: pod2 leaves the EndpointSlices (as when its Deployment scales from 3 to 2)")
        t0 = time.monotonic()
        _drop_backend(manifests, topo.pod["pod2"].ip)
        converged = None
        while time.monotonic() - t0 < 15:
            res = topo.probe(topo.client, "http", "10.96.0.10", 80, "-n", "20", "--timeout", "1")
            if "pod2" not in res["counts"] and res["errors"] == 0:
                converged = time.monotonic() - t0
                break
        if converged is None:
            _say("  did not converge within 15 s")
        else:
            _say(f"  converged in {converged:.2f} s (file change → rules → 20 requests without pod2)")
        res = topo.probe(topo.client, "http", "10.96.0.10", 80, "-n", n, "--timeout", "1")
        res["_from"] = "client"
        _say(_table([("demo/web (scaled)", "10.96.0.10:80 tcp", res)], pods))

        syncs = _sync_lines(topo.read_log())
        _say("\nSync timings from the daemon log: " + ", ".join(f"{k} {ms} ms" for k, ms in syncs))
        topo.stop_daemon(daemon)
        _say("• kproxy stopped (rules stay in place on SIGTERM); cleaning up namespaces")
        failures = sum(r[2].get("errors", 0) for r in rows)
    _say(f"done in {time.monotonic() - t_start:.1f} s; everything the demo created is removed")
    return 0 if failures == 0 and converged is not None else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kproxy demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxy-mode", default="iptables", help="iptables (default), nftables, ebpf")
    ap.add_argument("--requests", type=int, default=60, help="requests per Service (default 60)")
    ap.add_argument("--no-cni", action="store_true", help="create pods with ip commands, not the CNI plugins")
    ap.add_argument("extra", nargs="*", help="extra daemon flags after --, e.g. -- --iptables-backend legacy")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("kproxy demo needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    use_cni = not a.no_cni and shutil.which("kproxy-bridge", path=os.path.dirname(sys.executable)) is not None
    # turn SIGTERM into KeyboardInterrupt so the Topology context removes everything
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return run_demo(a.proxy_mode, a.extra, a.requests, use_cni)
    except KeyboardInterrupt:
        print("\ninterrupted; everything the demo created was removed", file=sys.stderr)
        return 130
