"""Rule-sync time at scale: N Services × E endpoints through kproxy's real sync path, per proxy mode.

For every (mode/back end, size) and every repeat, a child process runs in a fresh network namespace
(nothing touches the host's rules): it builds the store from generated API objects, runs the data
plane's first full sync, then repeatedly changes one Service's endpoints and runs partial syncs. The
parent also times ``iptables-restore`` alone loading the exact same full ruleset into another fresh
namespace: the floor a full sync cannot beat. Reported: median [min–max] over the repeats, and the
child's peak RSS. The xtables lock file is global, not per namespace: both the child and the floor get a
private one (XTABLES_LOCKFILE), so another job's long restore in its own namespace cannot stall them.

    sudo .venv/bin/python bench/sync_scale.py --sizes 1000,5000,10000 --backends legacy,nft
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _child(args: argparse.Namespace) -> None:
    """Runs inside the benchmark namespace; prints one JSON line."""
    from gen import endpoint_slice, service

    from kproxy.config import ProxyConfig
    from kproxy.dataplane import load
    from kproxy.snapshot import ProxySnapshot
    from kproxy.store import ClusterStore, Event

    n, e = args.size, args.endpoints
    t0 = time.perf_counter()
    store = ClusterStore("node-1")
    snap = ProxySnapshot(store, "node-1")
    # generated in batches, as a watch delivers them: the peak RSS is kproxy's, not the generator's
    for lo in range(0, n, 500):
        hi = min(n, lo + 500)
        store.apply([Event("ADDED", "Service", service(i, nodeport=i % 10 == 0)) for i in range(lo, hi)])
        store.apply([Event("ADDED", "EndpointSlice", endpoint_slice(i, e)) for i in range(lo, hi)])
    t_load = time.perf_counter() - t0
    cfg = ProxyConfig(mode=args.mode, iptables_backend=args.backend or "auto", cluster_cidrs=("10.128.0.0/10",),
                      hostname_override="node-1")
    dp = load(args.mode, cfg)
    if hasattr(dp, "keep_restore_text"):
        dp.keep_restore_text = True
    dp.setup()
    t0 = time.perf_counter()
    changes = snap.update()
    t_snap = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = dp.sync(snap, changes, True)
    t_full = time.perf_counter() - t0 + t_snap
    restore_file = ""
    texts = getattr(dp, "last_restore_input", {})
    if texts.get(4):
        restore_file = os.path.join(args.workdir, "full-v4.txt")
        with open(restore_file, "w") as f:
            f.writelines(texts[4])
        texts.clear()
    partial: list[float] = []
    partial_apply: list[float] = []
    for k in range(args.partial_repeat):
        i = (k * 7919) % n
        store.apply([Event("MODIFIED", "EndpointSlice", endpoint_slice(i, e, generation=1 + k))])
        t0 = time.perf_counter()
        ch = snap.update()
        r = dp.sync(snap, ch, False)
        partial.append(time.perf_counter() - t0)
        partial_apply.append(r.apply_seconds)
    print(json.dumps({
        "load": t_load, "full": t_full, "full_render": res.render_seconds + t_snap, "full_apply": res.apply_seconds,
        "partial": partial, "partial_apply": partial_apply, "restore_file": restore_file,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def _netns() -> str:
    name = f"kpbench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    return name


def _del(ns: str) -> None:
    subprocess.run(["ip", "netns", "del", ns], check=False)


def _private_lock(workdir: str) -> dict[str, str]:
    return {**os.environ, "XTABLES_LOCKFILE": os.path.join(workdir, "xtables.lock")}


def _floor(backend: str, path: str) -> float:
    """Time iptables-restore alone loading the same ruleset into a fresh namespace."""
    ns = _netns()
    try:
        with open(path) as f:
            t0 = time.perf_counter()
            subprocess.run(["ip", "netns", "exec", ns, f"iptables-{backend}-restore", "-w", "5", "--noflush"],
                           stdin=f, check=True, capture_output=True, env=_private_lock(os.path.dirname(path)))
            return time.perf_counter() - t0
    finally:
        _del(ns)


def _stat(values: list[float], scale: float = 1000.0, unit: str = "ms") -> str:
    if not values:
        return "n/a"
    return (f"{statistics.median(values) * scale:.0f} {unit} [{min(values) * scale:.0f}–"
            f"{max(values) * scale:.0f}]")


def _run_one(mode: str, backend: str, size: int, endpoints: int, partial_repeat: int) -> dict[str, Any]:
    ns = _netns()
    workdir = tempfile.mkdtemp(prefix="kpbench-")
    try:
        argv = ["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "--child", "--mode", mode,
                "--size", str(size), "--endpoints", str(endpoints), "--partial-repeat", str(partial_repeat),
                "--workdir", workdir]
        if backend:
            argv += ["--backend", backend]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=3600, env=_private_lock(workdir))
        if p.returncode != 0:
            raise RuntimeError(f"benchmark child failed: {p.stderr[-2000:]}")
        out = json.loads(p.stdout.strip().splitlines()[-1])
        if out["restore_file"] and backend:
            out["floor"] = _floor(backend, out["restore_file"])
        return out
    finally:
        _del(ns)
        subprocess.run(["rm", "-rf", workdir], check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxy-mode", dest="modes", default="iptables",
                    help="comma-separated proxy modes to compare (default iptables)")
    ap.add_argument("--backends", default="legacy,nft", help="iptables back ends for the iptables mode")
    ap.add_argument("--sizes", default="1000,5000,10000")
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--partial-repeat", type=int, default=20)
    ap.add_argument("--out", default="", help="also write the markdown table to this file")
    # child mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="iptables", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _child(a)
        return 0
    variants: list[tuple[str, str]] = []
    for mode in a.modes.split(","):
        if mode == "iptables":
            variants += [("iptables", b) for b in a.backends.split(",") if b]
        else:
            variants.append((mode, ""))
    rows = []
    header = ("| mode | Services × endpoints | first full sync | iptables-restore alone (floor) | full ÷ floor | "
              "one-Service change (total) | of which restore | load+parse | peak RSS |\n"
              "|---|---|---|---|---|---|---|---|---|")
    print(f"# sync_scale: {a.endpoints} endpoints per Service, {a.repeat} repeats, {a.partial_repeat} one-Service "
          f"changes each; median [min–max]; {os.cpu_count()} cores; load average at start "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    print(header, flush=True)
    for size in (int(s) for s in a.sizes.split(",")):
        for mode, backend in variants:
            runs = [_run_one(mode, backend, size, a.endpoints, a.partial_repeat) for _ in range(a.repeat)]
            full = [r["full"] for r in runs]
            floor = [r["floor"] for r in runs if "floor" in r]
            partial = [x for r in runs for x in r["partial"]]
            partial_apply = [x for r in runs for x in r["partial_apply"]]
            ratio = f"{statistics.median(full) / statistics.median(floor):.2f}" if floor else "n/a"
            label = f"{mode}-{backend}" if backend else mode
            row = (f"| {label} | {size:,} × {a.endpoints} | {_stat(full)} | {_stat(floor)} | {ratio} | "
                   f"{_stat(partial)} | {_stat(partial_apply)} | {_stat([r['load'] for r in runs])} | "
                   f"{statistics.median([r['rss_mb'] for r in runs]):.0f} MB |")
            rows.append(row)
            print(row, flush=True)
    print(f"# load average at end {os.getloadavg()[0]:.2f}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join([header, *rows]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
