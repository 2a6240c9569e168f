"""IPVS vs iptables sync time at 1,000 / 5,000 Services x 10 endpoints, measured in the IPVS test VM.

The host kernel has no IPVS, so everything runs in the qemu VM of :mod:`kproxy.testing.vm` (Debian's
kernel under TCG *software emulation*: absolute times are several times slower than on real hardware;
compare modes with each other, not with host numbers). Inside one VM boot, for every mode and size and
every repeat, a child process in a fresh network namespace builds the store from ``bench/gen.py``'s
generated objects (the same inputs as ``bench/sync_scale.py``: every 10th Service is a NodePort), runs
the data plane's setup, its first full sync, then repeatedly changes one Service's EndpointSlice (one
endpoint replaced) and runs partial syncs. Reported: median [min-max] over the repeats, and per phase of
the full sync (the data plane's ``phase.*`` timings: wall, user and system CPU seconds) with its growth
between the smallest and the largest size. ``--modes kernel`` times the kernel operations alone (every
message encoded before the clock starts), to tell the kernel's growth from kproxy's.

    .venv/bin/python bench/ipvs_sync.py --sizes 1000,2000,5000 --repeat 2 --modes ipvs:legacy,kernel --resync \
        --out bench/results/ipvs_sync.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import struct
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

def kernel_ops(size: int, endpoints: int) -> dict[str, Any]:
    """The kernel operations of a full sync alone, with messages encoded before the clock starts.

    In the current (fresh) namespace: ``size`` addresses on a dummy link, ``size`` IPVS virtual servers,
    ``endpoints`` real servers each and as many hash:ip,port,ip members, each kind sent in the data plane's netlink
    batches. Returns wall / user / system seconds per kind: what grows here is the kernel's (or the
    per-request constant of the netlink client), not kproxy's rendering.
    """
    from kproxy.dataplane.ipvs import ipsets
    from kproxy.dataplane.ipvs import netlink as nl

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    ipsets.ensure_sets()
    addr, ipvs, ipset = nl.AddrClient(), nl.IPVSClient(), nl.IPSetClient()
    ifindex = addr.ensure_dummy("kube-ipvs0")
    vips = [f"10.96.{i // 250}.{i % 250 + 1}" for i in range(size)]
    keys = [nl.VSKey("TCP", v, 80) for v in vips]
    eps = [f"10.{128 + (n >> 16) % 64}.{(n >> 8) & 255}.{n & 255}" for n in range(size * endpoints)]
    hdr = struct.pack("=BBH", nl.CMD_NEW_SERVICE, nl.IPVS_GENL_VERSION, 0)
    dhdr = struct.pack("=BBH", nl.CMD_NEW_DEST, nl.IPVS_GENL_VERSION, 0)
    create = nl.NLM_F_CREATE | nl.NLM_F_EXCL
    msgs: dict[str, tuple[nl.NetlinkSocket, int, int, list[bytes]]] = {
        "ipset_adds": (ipset.nl, (nl.NFNL_SUBSYS_IPSET << 8) | nl.IPSET_CMD_ADD, 0, [
            struct.pack("=BBH", 2, 0, 0) + nl._nla(nl.IPSET_ATTR_PROTOCOL, b"\x07")
            + nl._nla(nl.IPSET_ATTR_SETNAME, b"KUBE-LOOP-BACK\0")
            + nl.ipset_data("hash:ip,port,ip", f"{a},tcp:8080,{a}")[1] for a in eps]),
        "ipvs_services": (ipvs.nl, ipvs.family, create,
                          [hdr + nl.service_attrs(k, "rr", 0, 0) for k in keys]),
        "ipvs_dests": (ipvs.nl, ipvs.family, create, [
            dhdr + nl._nest(nl.CMD_ATTR_SERVICE, nl.service_key_attrs(keys[n // endpoints])) + nl.dest_attrs(a, 8080, 1)
            for n, a in enumerate(eps)]),
        "address_adds": (addr.nl, nl.RTM_NEWADDR, create, [addr._msg(v, ifindex) for v in vips]),
    }
    out: dict[str, Any] = {}
    for name, (sock, mtype, flags, payloads) in msgs.items():
        t0, c0 = time.perf_counter(), os.times()
        for p in payloads:
            sock.queue(mtype, flags, p, name)
        errors = sock.commit()
        t1, c1 = time.perf_counter(), os.times()
        out[name] = {"n": len(payloads), "wall": t1 - t0, "user": c1.user - c0.user, "sys": c1.system - c0.system,
                     "errors": len(errors)}
    for c in (addr, ipvs, ipset):
        c.close()
    return {"kernel_ops": out}


def dry_full_sync(size: int, endpoints: int) -> dict[str, float]:
    """kproxy's own share of a first full sync, natively and without a kernel: netlink sends and dumps are
    stubbed out (batches are encoded, then dropped). Seconds per phase, plus ``snapshot``."""
    import logging

    from gen import endpoint_slice, service

    from kproxy.config import ProxyConfig
    from kproxy.dataplane.ipvs import ipsets, proxier
    from kproxy.dataplane.ipvs import netlink as nl
    from kproxy.snapshot import ProxySnapshot
    from kproxy.store import ClusterStore, Event

    logging.disable(logging.WARNING)  # gen.py's duplicate NodePorts above 2,700 Services

    def drop(self: nl.NetlinkSocket) -> None:
        self._buf.clear()
        self._pending.clear()

    nl.NetlinkSocket._flush_batch = drop  # type: ignore[method-assign]
    nl.NetlinkSocket.request = lambda self, *a: iter(())  # type: ignore[method-assign]
    nl.genl_family_id = lambda name: 0
    ipsets.run_restore = lambda lines: None
    store = ClusterStore("node-1")
    snap = ProxySnapshot(store, "node-1")
    store.apply([Event("ADDED", "Service", service(i, nodeport=i % 10 == 0)) for i in range(size)])
    store.apply([Event("ADDED", "EndpointSlice", endpoint_slice(i, endpoints)) for i in range(size)])
    dp = proxier.IpvsDataPlane(ProxyConfig(mode="ipvs", cluster_cidrs=("10.128.0.0/10",),
                                           hostname_override="node-1"))
    dp._ipvs, dp._addr, dp._ipset = nl.IPVSClient(), nl.AddrClient(), nl.IPSetClient()
    dp._ifindex, dp._rules_at = 1, time.monotonic()
    dp._ensure_dummy = lambda: None  # type: ignore[method-assign]
    dp._read_node_ips = lambda: (["192.168.0.10"], set())  # type: ignore[method-assign]
    t0 = time.perf_counter()
    changes = snap.update()
    out = {"snapshot": time.perf_counter() - t0}
    res = dp.sync(snap, changes, True)
    out.update({k[len("phase."):]: v for k, v in res.extra.items() if k.startswith("phase.")})
    out["total"] = sum(out.values())
    return out


def dry_report(sizes: list[int], endpoints: int, repeat: int) -> str:
    """Run :func:`dry_full_sync` in a fresh process per size and repeat (sizes interleaved); a markdown table."""
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in sizes}
    for _ in range(repeat):
        for n in sizes:
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--dry-child", "--size", str(n),
                                "--endpoints", str(endpoints)], capture_output=True, text=True, check=True)
            runs[n].append(json.loads(p.stdout.strip().splitlines()[-1]))
    names = [k for k in runs[sizes[0]][0] if max(r[k] for n in sizes for r in runs[n]) >= 0.001]
    lines = [f"kproxy's own share of the first full sync, natively, kernel stubbed out: ms, min [median] of "
             f"{repeat}; load {os.getloadavg()[0]:.2f}", "",
             "| phase | " + " | ".join(f"{n:,}" for n in sizes) + " | growth (min) |",
             "|---|" + "---:|" * (len(sizes) + 1)]
    for k in names:
        mins = [min(r[k] for r in runs[n]) for n in sizes]
        meds = [statistics.median(r[k] for r in runs[n]) for n in sizes]
        cells = [f"{a * 1000:.0f} [{b * 1000:.0f}]" for a, b in zip(mins, meds, strict=True)]
        lines.append(f"| {k} | {' | '.join(cells)} | x{mins[-1] / mins[0]:.1f} |")
    return "\n".join(lines) + "\n"


def child(mode: str, backend: str, size: int, endpoints: int, partial_repeat: int, resync: bool) -> dict[str, Any]:
    if mode == "kernel":
        return kernel_ops(size, endpoints)
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
    t_snapshot = time.perf_counter() - t0
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
    t_resync, resync_writes, resync_extra = float("nan"), 0, {}
    if resync:  # a second full sync over unchanged state: restart / periodic-resync cost (read back, diff)
        t0 = time.perf_counter()
        rr = dp.sync(snap, snap.update(), True)
        t_resync = time.perf_counter() - t0
        resync_writes, resync_extra = rr.rules, rr.extra
    out: dict[str, Any] = {
        "setup": t_setup, "full": t_full, "snapshot": t_snapshot, "full_render": res.render_seconds,
        "full_apply": res.apply_seconds,
        "partial": partial, "resync": t_resync, "resync_writes": resync_writes,
        "resync_extra": resync_extra,
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


def _run_child(mode: str, backend: str, size: int, endpoints: int, partial_repeat: int,
               resync: bool) -> dict[str, Any]:
    """One measurement in a fresh network namespace (deleted afterwards)."""
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
        return {"error": p.stderr[-3000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_all_in_vm(modes: list[tuple[str, str]], sizes: list[int], endpoints: int, repeat: int,
                  partial_repeat: int, out_path: str, resync: bool) -> None:
    """Inside the VM: every (mode, size, repeat) in its own namespace; results appended to out_path.

    A discarded warm-up run first (the guest reads the venv through 9p: the first run pays for cold
    caches), then the repeats round by round (every size once per round), so slow phases of the shared
    host spread over all sizes instead of landing on one.
    """
    _run_child(modes[0][0], modes[0][1], min(100, min(sizes)), endpoints, 1, resync)
    results = []
    for rep in range(repeat):
        for size in sizes:
            for mode, backend in modes:
                r = _run_child(mode, backend, size, endpoints, partial_repeat, resync)
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


PHASES = ("snapshot", "iptables_restore", "read_addresses", "desired_state", "read_ipvs", "read_ipsets",
          "ipset_adds", "ipvs_services", "ipvs_dests", "address_adds", "deletes")


def _phase(r: dict[str, Any], kind: str, name: str, which: str) -> float:
    """Seconds of one phase (kind: phase / phase_user / phase_sys) of the first full sync (which="extra")
    or of the no-op resync (which="resync_extra")."""
    if name == "snapshot":  # measured by this script around the first snap.update(), wall time only
        return r["snapshot"] if kind == "phase" and which == "extra" else float("nan")
    return r.get(which, {}).get(f"{kind}.{name}", float("nan"))


def phase_table(ipvs: list[dict[str, Any]], which: str = "extra") -> list[str]:
    """Median wall / user / system seconds per sync phase and size, and the growth between the extremes."""
    sizes = sorted({r["size"] for r in ipvs})
    if not sizes or "snapshot" not in ipvs[0] or not ipvs[0].get(which):
        return []
    total = "full" if which == "extra" else "resync"
    title = "first full sync" if which == "extra" else "no-op resync (second full sync)"
    head = " | ".join(f"{n:,}: wall (user+sys)" for n in sizes)
    lines = [f"## IPVS {title}, per phase", "",
             "Median seconds over the runs; user/sys are the process's CPU times in the phase (netlink requests "
             "are processed in the sender's system call, so kernel work is *sys*, kproxy's Python is *user*). "
             f"Growth = largest/smallest size (x{sizes[-1] / sizes[0]:.0f} the input).", "",
             f"| phase | {head} | growth wall | growth sys |",
             "|---|" + "---:|" * (len(sizes) + 2)]
    names = [*(PHASES if which == "extra" else PHASES[1:]), "total"]
    for name in names:
        cells, walls, syss = [], [], []
        for n in sizes:
            runs = [r for r in ipvs if r["size"] == n]
            if name == "total":
                w, u, y = statistics.median(r[total] for r in runs), float("nan"), float("nan")
            else:
                w = statistics.median(_phase(r, "phase", name, which) for r in runs)
                u = statistics.median(_phase(r, "phase_user", name, which) for r in runs)
                y = statistics.median(_phase(r, "phase_sys", name, which) for r in runs)
            walls.append(w)
            syss.append(y)
            cells.append(f"{w:.2f}" + (f" ({u:.2f}+{y:.2f})" if u == u else ""))
        gw = f"x{walls[-1] / walls[0]:.1f}" if walls[0] > 0.005 else "–"
        gs = f"x{syss[-1] / syss[0]:.1f}" if syss[0] == syss[0] and syss[0] > 0.005 else "–"
        lines.append(f"| {name} | {' | '.join(cells)} | {gw} | {gs} |")
    return [*lines, ""]


def kernel_table(kernel: list[dict[str, Any]]) -> list[str]:
    """Median wall / system seconds per kernel operation alone (``--modes kernel``) and their growth."""
    sizes = sorted({r["size"] for r in kernel})
    if not sizes:
        return []
    lines = ["## Kernel operations alone", "",
             "`--modes kernel`: the same netlink batches with every message encoded before the clock starts, "
             "in a fresh namespace; N addresses on a dummy link, N virtual servers, 10 N real servers, 10 N "
             "members of the hash:ip,port,ip set. Median wall (sys) seconds.", "",
             "| operation | " + " | ".join(f"N = {n:,}" for n in sizes) + " | growth wall | growth sys |",
             "|---|" + "---:|" * (len(sizes) + 2)]
    for op in ("ipset_adds", "ipvs_services", "ipvs_dests", "address_adds"):
        walls = [statistics.median(r["kernel_ops"][op]["wall"] for r in kernel if r["size"] == n) for n in sizes]
        syss = [statistics.median(r["kernel_ops"][op]["sys"] for r in kernel if r["size"] == n) for n in sizes]
        cells = [f"{w:.2f} ({y:.2f})" for w, y in zip(walls, syss, strict=True)]
        gs = f"x{syss[-1] / syss[0]:.1f}" if syss[0] > 0.005 else "–"
        lines.append(f"| {op} | {' | '.join(cells)} | x{walls[-1] / walls[0]:.1f} | {gs} |")
    return [*lines, ""]


def report(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# IPVS sync time (in the qemu test VM)",
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
    kernel = [r for r in results if r["mode"] == "kernel" and "error" not in r]
    results = [r for r in results if r["mode"] != "kernel"]
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
    lines += ["", *phase_table(ipvs), *phase_table(ipvs, "resync_extra"), *kernel_table(kernel)]
    if errors:
        lines += ["", "Failures:", "", *[f"- {e}" for e in errors]]
    load = meta.get("load")
    lines += ["", f"VM boot + all runs took {meta['seconds']:.0f} s"
              + (f"; host load average (1/5/15 min) {load[0]}/{load[1]}/{load[2]} before, "
                 f"{load[3]}/{load[4]}/{load[5]} after." if load else "."), ""]
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
    ap.add_argument("--dry", action="store_true",
                    help="no VM: time kproxy's own share of a full sync natively (kernel stubbed out)")
    ap.add_argument("--dry-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--in-vm", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    modes = [(m.partition(":")[0], m.partition(":")[2]) for m in a.modes.split(",") if m]
    sizes = [int(s) for s in a.sizes.split(",") if s]
    if a.dry_child:
        print(json.dumps(dry_full_sync(a.size, a.endpoints)))
        return 0
    if a.dry:
        print(dry_report(sizes, a.endpoints, a.repeat))
        return 0
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
        load_before = os.getloadavg()
        r = vm.run_in_vm(script, timeout=6 * 3600, job_dir=job, memory_mb=a.memory)
        sys.stderr.write(r.stdout[-5000:])
        if not os.path.exists(results_path):
            sys.stderr.write(r.describe())
            return 1
        with open(results_path) as f:
            results = json.load(f)
        meta = {"date": time.strftime("%Y-%m-%d"), "kernel": kver, "cpus": 2, "memory_mb": a.memory,
                "host_cpus": os.cpu_count(), "repeat": a.repeat, "partial_repeat": a.partial_repeat,
                "seconds": r.seconds, "host": platform.node(),
                "load": [round(x, 2) for x in (*load_before, *os.getloadavg())]}
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
