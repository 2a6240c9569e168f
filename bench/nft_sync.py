"""nftables mode sync cost: element transactions over raw nfnetlink vs the same plan through ``nft -f``.

For each size and each repeat a child process runs in a fresh network namespace (nothing touches the
host's rules): it loads N Services × E endpoints (``bench/gen.py``, the inputs of ``sync_scale.py``)
into the store, computes the snapshot, runs the first full sync, a second full sync over the populated
table (what the periodic resync costs), then one-Service endpoint changes (partial syncs). Then, into the
emptied table, the floors of the first full sync: the kernel taking the very same (already encoded)
element transaction, and ``nft -f`` alone loading the same ruleset as text. Wall time *and* the child's
CPU time (user + system, with its nft children: the kernel's transaction work runs in the sender's
context) are reported, so
a run on a shared machine still shows the cost. Median [min–max] over the repeats.

    sudo .venv/bin/python bench/nft_sync.py --sizes 1000,10000,30000 --paths netlink,nft
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the nft processes)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def _child(a: argparse.Namespace) -> None:
    from gen import endpoint_slice, service

    from kproxy.config import ProxyConfig
    from kproxy.dataplane.nftables import NftablesDataPlane, netlink, nft, proxier
    from kproxy.dataplane.nftables import render as r
    from kproxy.snapshot import ProxySnapshot
    from kproxy.store import ClusterStore, Event

    store = ClusterStore("node-1")
    snap = ProxySnapshot(store, "node-1")
    store.apply([Event("ADDED", "Service", service(i, nodeport=i % 10 == 0)) for i in range(a.size)])
    store.apply([Event("ADDED", "EndpointSlice", endpoint_slice(i, a.endpoints)) for i in range(a.size)])
    out: dict[str, Any] = {}
    w, c = time.perf_counter(), _cpu()
    changes = snap.update()
    out["snapshot"], out["snapshot_cpu"] = time.perf_counter() - w, _cpu() - c
    dp = NftablesDataPlane(ProxyConfig(mode="nftables", cluster_cidrs=("10.128.0.0/10",), hostname_override="node-1"))
    dp.use_netlink = a.path == "netlink"
    dp.keep_transaction = True
    dp.setup()
    nft_text = ""
    for label in ("full", "resync"):
        w, c = time.perf_counter(), _cpu()
        res = dp.sync(snap, changes, True)
        out[label] = time.perf_counter() - w
        out[label + "_cpu"] = _cpu() - c
        out[label + "_render"] = res.render_seconds
        out[label + "_encode"] = res.extra.get("encode_seconds", 0.0)
        out[label + "_transaction"] = res.extra.get("netlink_seconds", res.extra.get("nft_seconds", 0.0))
        out["elements"] = res.rules
        if label == "full" and dp.last_transaction is not None:
            first = dp.last_transaction
            nft_text = "".join(line + "\n" for fam, p in first[2].items() for line in (
                *p.pre, *proxier._ops_text(f"{r.nft_family(fam)} {r.TABLE}", p.ops), *p.post))
        dp.keep_transaction = False
    partial, partial_cpu, written = [], [], []
    for k in range(a.partial_repeat):
        i = (k * 7919) % a.size
        store.apply([Event("MODIFIED", "EndpointSlice", endpoint_slice(i, a.endpoints, generation=1 + k))])
        w, c = time.perf_counter(), _cpu()
        res = dp.sync(snap, snap.update(), False)
        partial.append(time.perf_counter() - w)
        partial_cpu.append(_cpu() - c)
        written.append(res.rules)
    out.update(partial=partial, partial_cpu=partial_cpu, written=written,
               rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    # Floors for the first full sync, into an emptied table: the kernel taking the very same element
    # transaction (already encoded; its structure created first, untimed), and nft -f alone loading the
    # same ruleset as text (what the nft path's parser and the kernel cost, with no Python at all).
    if nft_text:
        families = list(dp.families)
        dp.cleanup()
        if a.path == "netlink":
            batches, pre, _plans = first
            nft.apply(pre)
            w = time.perf_counter()
            netlink.commit_all(batches)
            out["floor_transaction"] = time.perf_counter() - w
            for fam in families:
                nft.apply(f"delete table {r.nft_family(fam)} {r.TABLE}\n")
        w = time.perf_counter()
        nft.apply(nft_text)
        out["floor_nft"] = time.perf_counter() - w
    print(json.dumps(out))


def _run(path: str, size: int, endpoints: int, partial_repeat: int) -> dict[str, Any]:
    ns = f"kpnftb-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "--child",
                            "--path", path, "--size", str(size), "--endpoints", str(endpoints),
                            "--partial-repeat", str(partial_repeat)], capture_output=True, text=True, timeout=3600)
        if p.returncode != 0:
            raise RuntimeError(f"child failed: {p.stderr[-2000:]}")
        return json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def _stat(values: list[float], scale: float = 1000.0) -> str:
    return f"{statistics.median(values) * scale:.0f} [{min(values) * scale:.0f}–{max(values) * scale:.0f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,30000")
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--paths", default="netlink,nft", help="netlink (default data plane) and/or nft (nft -f only)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--partial-repeat", type=int, default=20)
    ap.add_argument("--out", default="")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", default="netlink", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _child(a)
        return 0
    lines = [f"# nft_sync: {a.endpoints} endpoints per Service, {a.repeat} repeats, {a.partial_repeat} one-Service "
             f"changes each; median [min–max] in ms; {os.cpu_count()} cores, load average before: "
             f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}",
             "",
             "| path | Services × endpoints | elements | first full sync | its CPU | resync (full, populated) | "
             "its CPU | one-Service change | its CPU | elements written | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    runs_by: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for size in (int(s) for s in a.sizes.split(",")):
        for path in a.paths.split(","):
            runs = [_run(path, size, a.endpoints, a.partial_repeat) for _ in range(a.repeat)]
            row = (f"| {path} | {size:,} × {a.endpoints} | {runs[0]['elements']:,} | "
                   f"{_stat([r['full'] for r in runs])} | {_stat([r['full_cpu'] for r in runs])} | "
                   f"{_stat([r['resync'] for r in runs])} | {_stat([r['resync_cpu'] for r in runs])} | "
                   f"{_stat([x for r in runs for x in r['partial']])} | "
                   f"{_stat([x for r in runs for x in r['partial_cpu']])} | "
                   f"{statistics.median([x for r in runs for x in r['written']]):.0f} | "
                   f"{statistics.median([r['rss_mb'] for r in runs]):.0f} MB |")
            lines.append(row)
            print(row, flush=True)
            runs_by[(path, size)] = runs
    # where the first full sync's time goes, and what the same contents cost the kernel / nft alone
    lines += ["", "| path | Services × endpoints | snapshot (store → service ports) | render (plan) | encode | "
              "transaction (kernel) | first full sync (data plane) | snapshot + sync | transaction alone (floor) | "
              "nft -f alone (floor) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (path, size), runs in runs_by.items():
        floor_tx = [r["floor_transaction"] for r in runs if "floor_transaction" in r]
        floor_nft = [r["floor_nft"] for r in runs if "floor_nft" in r]
        lines.append(
            f"| {path} | {size:,} × {a.endpoints} | {_stat([r['snapshot'] for r in runs])} | "
            f"{_stat([r['full_render'] for r in runs])} | {_stat([r['full_encode'] for r in runs])} | "
            f"{_stat([r['full_transaction'] for r in runs])} | {_stat([r['full'] for r in runs])} | "
            f"{_stat([r['snapshot'] + r['full'] for r in runs])} | "
            f"{_stat(floor_tx) if floor_tx else 'n/a'} | {_stat(floor_nft) if floor_nft else 'n/a'} |")
    print("\n".join(lines[-len(runs_by) - 3:]), flush=True)
    lines.append(f"\nload average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
