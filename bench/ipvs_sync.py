"""IPVS vs iptables sync time at 1,000 / 5,000 Services x 10 endpoints, measured in the IPVS test VM.

The host kernel has no IPVS, so everything runs in the qemu VM of :mod:`kproxy.testing.vm` (Debian's
kernel under TCG *software emulation*: absolute times are several times slower than on real hardware;
compare modes with each other, not with host numbers). Inside one VM boot, for every mode and size and
every repeat, a child process in a fresh network namespace builds the store from ``bench/gen.py``'s
generated objects (the same inputs as ``bench/sync_scale.py``: every 10th Service is a NodePort), runs
the data plane's setup, its first full sync, then repeatedly changes one Service's EndpointSlice (one
endpoint replaced) and runs partial syncs. Reported: median [min-max] over the repeats.

    sudo .venv/bin/python bench/ipvs_sync.py --sizes 1000,5000 --repeat 3 --out bench/results/ipvs_sync.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)


# ---- inside the VM: one measurement in the current (fresh) namespace ------------------------------------

def child(mode: str, backend: str, size: int, endpoints: int, partial_repeat: int, resync: bool) -> dict[str, Any]:
    from gen import endpoint_slice, service

    from kproxy.config import ProxyConfig
    from kproxy.dataplane import load
    from kproxy.snapshot import ProxySnapshot
    from kproxy.store import ClusterStore, Event

    # one node address so NodePorts get a virtual server each, as on a real node
    subprocess.run("ip link set lo up; ip link add eth0 type dummy; ip addr add 192.168.0.10/24 dev eth0; "
                   "ip link set eth0 up", shell=True, check=True)
    svcs = [service(i, nodeport=i % 10 == 0) for i in range(size)]
    slices = [endpoint_slice(i, endpoints) for i in range(size)]
    store = ClusterStore("node-1")
    snap = ProxySnapshot(store, "node-1")
    store.apply([Event("ADDED", "Service", s) for s in svcs])
    store.apply([Event("ADDED", "EndpointSlice", s) for s in slices])
    cfg = ProxyConfig(mode=mode, iptables_backend=backend or "auto", cluster_cidrs=("10.128.0.0/10",),
                      hostname_override="node-1")
    dp = load(mode, cfg)
    t0 = time.perf_counter()
    dp.setup()
    t_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    changes = snap.update()
    res = dp.sync(snap, changes, True)
    t_full = time.perf_counter() - t0
    partial: list[float] = []
    for k in range(partial_repeat):
        i = (k * 7919) % size
        store.apply([Event("MODIFIED", "EndpointSlice", endpoint_slice(i, endpoints, generation=1 + k))])
        t0 = time.perf_counter()
        ch = snap.update()
        dp.sync(snap, ch, False)
        partial.append(time.perf_counter() - t0)
    t_resync, resync_writes = float("nan"), 0
    if resync:  # a second full sync over unchanged state: restart / periodic-resync cost (read back, diff)
        t0 = time.perf_counter()
        resync_writes = dp.sync(snap, snap.update(), True).rules
        t_resync = time.perf_counter() - t0
    out: dict[str, Any] = {
        "setup": t_setup, "full": t_full, "full_render": res.render_seconds, "full_apply": res.apply_seconds,
        "partial": partial, "resync": t_resync, "resync_writes": resync_writes,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "extra": res.extra,
    }
    if mode == "ipvs":
        vs = subprocess.run(["ipvsadm", "-Ln"], capture_output=True, text=True).stdout
        out["virtual_servers"] = sum(1 for line in vs.splitlines() if line.startswith("TCP"))
        out["real_servers"] = sum(1 for line in vs.splitlines() if "->" in line and "RemoteAddress" not in line)
        saved = subprocess.run([f"iptables-{backend}-save" if backend else "iptables-save"], capture_output=True,
                               text=True).stdout
        out["iptables_rules"] = sum(1 for line in saved.splitlines() if line.startswith("-A KPROXY-"))
        close = getattr(dp, "close", None)
        if close:
            close()
    return out


def run_all_in_vm(modes: list[tuple[str, str]], sizes: list[int], endpoints: int, repeat: int,
                  partial_repeat: int, out_path: str, resync: bool) -> None:
    """Inside the VM: every (mode, size, repeat) in its own namespace; results appended to out_path."""
    results = []
    for size in sizes:
        for mode, backend in modes:
            for rep in range(repeat):
                ns = f"kpb-{uuid.uuid4().hex[:8]}"
                subprocess.run(["ip", "netns", "add", ns], check=True)
                try:
                    p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__),
                                        "--child", mode, "--backend", backend, "--size", str(size),
                                        "--endpoints", str(endpoints), "--partial-repeat", str(partial_repeat),
                                        *(["--resync"] if resync else [])],
                                       capture_output=True, text=True, timeout=3600)
                finally:
                    subprocess.run(["ip", "netns", "del", ns], check=False)
                if p.returncode != 0:
                    r: dict[str, Any] = {"error": p.stderr[-3000:]}
                else:
                    r = json.loads(p.stdout.strip().splitlines()[-1])
                r.update(mode=mode, backend=backend, size=size, rep=rep)
                results.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "partial"}), flush=True)
                with open(out_path, "w") as f:
                    json.dump(results, f)


# ---- on the host: boot the VM, format the report -------------------------------------------------------

def _stat(values: list[float], scale: float = 1000.0) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values) * scale:,.0f} [{min(values) * scale:,.0f}–{max(values) * scale:,.0f}]"


def report(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# IPVS vs iptables sync time (in the qemu test VM)",
        "",
        f"Measured {meta['date']} with `bench/ipvs_sync.py` in the IPVS test VM: Debian kernel {meta['kernel']} "
        f"under qemu **TCG software emulation** (`-accel tcg,thread=multi -cpu max`, {meta['cpus']} vCPUs, "
        f"{meta['memory_mb']} MiB) on a {meta['host_cpus']}-core host shared with other jobs. Emulated Python runs "
        "10-50x slower than natively here and every process start (iptables-restore, ipset) is expensive, so "
        "absolute numbers are very pessimistic and noisy; the modes are "
        "compared on the same VM and the same inputs (`bench/gen.py`: N Services x 10 endpoints, every 10th "
        "Service a NodePort, one node address).",
        "",
        f"Each cell: median [min–max] in ms over {meta['repeat']} runs (each run in a fresh network namespace); "
        f"the one-Service change is {meta['partial_repeat']} partial syncs per run, each replacing one endpoint "
        "of one Service, pooled over the runs. *Resync* is a second full sync over unchanged state (what a "
        "restarted daemon or the hourly full resync does: read the kernel back, diff, write nothing).",
        "",
        "| mode | Services | setup | first full sync | one-Service change | resync (no-op) | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    keyed: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in results:
        name = r["mode"] + (f" ({r['backend']})" if r.get("backend") else "")
        keyed.setdefault((name, r["size"]), []).append(r)
    errors = []
    for (name, size), runs in sorted(keyed.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ok = [r for r in runs if "error" not in r]
        errors += [f"{name} {size}: {r['error'][-500:]}" for r in runs if "error" in r]
        if not ok:
            lines.append(f"| {name} | {size:,} | failed | | | | |")
            continue
        partial = [p for r in ok for p in r["partial"]]
        resync = [r["resync"] for r in ok if r["resync"] == r["resync"]]  # NaN: not measured
        lines.append(f"| {name} | {size:,} | {_stat([r['setup'] for r in ok])} | {_stat([r['full'] for r in ok])} "
                     f"| {_stat(partial)} | {_stat(resync)} "
                     f"| {statistics.median(r['rss_mb'] for r in ok):,.0f} MiB |")
    lines.append("")
    ipvs = [r for r in results if r["mode"] == "ipvs" and "error" not in r]
    for size in sorted({r["size"] for r in ipvs}):
        r = next(x for x in ipvs if x["size"] == size)
        lines.append(f"- ipvs at {size:,} Services: {r['virtual_servers']:,} virtual servers, "
                     f"{r['real_servers']:,} real servers, {r['iptables_rules']} iptables rules (constant).")
    sizes = sorted({r["size"] for r in ipvs})
    if len(sizes) >= 2:
        a, b = sizes[0], sizes[-1]
        fa = statistics.median(r["full"] for r in ipvs if r["size"] == a)
        fb = statistics.median(r["full"] for r in ipvs if r["size"] == b)
        lines.append(f"- ipvs full sync growth {a:,} → {b:,} Services: x{fb / fa:.2f} for x{b / a:.0f} the input "
                     f"({fa * 1000 / a:.2f} → {fb * 1000 / b:.2f} ms per Service).")
        big = [p for r in ipvs if r["size"] == b for p in r["partial"]]
        lines.append(f"- ipvs one-Service change at {b:,}: median {statistics.median(big) * 1000:.1f} ms, "
                     f"max {max(big) * 1000:.1f} ms (target ≤ 50 ms).")
    if errors:
        lines += ["", "Failures:", "", *[f"- {e}" for e in errors]]
    lines += ["", f"VM boot + all runs took {meta['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,5000")
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--partial-repeat", type=int, default=20)
    ap.add_argument("--modes", default="ipvs:legacy,iptables:legacy", help="mode[:iptables back end],...")
    ap.add_argument("--memory", type=int, default=3072, help="VM memory in MiB")
    ap.add_argument("--out", default="", help="write the markdown report here")
    ap.add_argument("--json", default="", help="write the raw results here")
    ap.add_argument("--resync", action="store_true", help="also time a second (no-op) full sync")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--in-vm", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    modes = [(m.partition(":")[0], m.partition(":")[2]) for m in a.modes.split(",") if m]
    sizes = [int(s) for s in a.sizes.split(",") if s]
    if a.child:
        print(json.dumps(child(a.child, a.backend, a.size, a.endpoints, a.partial_repeat, a.resync)))
        return 0
    if a.in_vm:
        run_all_in_vm(modes, sizes, a.endpoints, a.repeat, a.partial_repeat, a.in_vm, a.resync)
        return 0

    from kproxy.testing import vm

    job = tempfile.mkdtemp(prefix="kproxy-bench-vm-", dir="/tmp")
    try:
        results_path = os.path.join(job, "results.json")
        script = (f"modprobe -a ip_vs ip_vs_rr dummy nf_conntrack\n"
                  f"{sys.executable} {os.path.abspath(__file__)} --in-vm {results_path} --sizes {a.sizes} "
                  f"--endpoints {a.endpoints} --repeat {a.repeat} --partial-repeat {a.partial_repeat} "
                  f"--modes {a.modes}{' --resync' if a.resync else ''}\n")
        kver = vm.check_available()
        r = vm.run_in_vm(script, timeout=6 * 3600, job_dir=job, memory_mb=a.memory)
        sys.stderr.write(r.stdout[-5000:])
        if not os.path.exists(results_path):
            sys.stderr.write(r.describe())
            return 1
        with open(results_path) as f:
            results = json.load(f)
        meta = {"date": time.strftime("%Y-%m-%d"), "kernel": kver, "cpus": 2, "memory_mb": a.memory,
                "host_cpus": os.cpu_count(), "repeat": a.repeat, "partial_repeat": a.partial_repeat,
                "seconds": r.seconds, "host": platform.node()}
        text = report(results, meta)
        print(text)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=1)
        return 0 if r.returncode == 0 else 1
    finally:
        subprocess.run(["rm", "-rf", job], check=False)


if __name__ == "__main__":
    raise SystemExit(main())
