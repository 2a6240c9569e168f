"""Where a Service packet's extra cost goes: kernel profiles of the sender, Service path vs direct path.

``bench/traffic.py`` measures *that* a TCP SYN through a ClusterIP costs more than one sent straight to a
pod; this tool shows *where*. Same topology, daemon and scapy-built frames as traffic.py, but each path's
frames are sent alone (``--duration`` s per run, ``--repeats`` runs, paths alternated) under
``perf record --all-kernel -g`` (kernel samples only). Every frame is processed in the sender's context
(veth → node → bridge → pod and back
for the SYN-ACK and the RST), so the samples per packet measure the per-packet CPU cost of the path. The
report gives samples per 1,000 packets per path and the kernel functions that account for the difference
between the Service path and each baseline (self samples, callers folded).

    .venv/bin/python bench/path_profile.py --proxy-mode iptables --out bench/results/path-profile-iptables.md

Needs root and ``perf``; perf's own sampling overhead inflates every path alike (compare, do not add up).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import traffic as T  # bench/ sibling

# kernel function name prefixes -> what part of the path they belong to (the rest: "other")
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("routing (FIB lookup, source validation, neighbour)", ("fib_", "__fib_", "ip_route_", "ip_rt_", "ipv4_neigh",
                                                             "neigh_", "__ip_dev_find", "ip_forward", "dst_")),
    ("NAT (translation, checksum fix-up, xfrm re-lookup)", ("nf_nat", "l4proto_manip", "__xfrm", "xfrm_",
                                                            "nf_xfrm", "inet_proto_csum", "get_random")),
    ("rule evaluation (iptables / nftables)", ("ipt_do_table", "nft_", "ip6t_do_table", "xt_", "statistic_mt",
                                              "bsearch")),
    ("conntrack", ("nf_conntrack", "__nf_conntrack", "nf_ct_", "__nf_ct", "hash_conntrack", "tcp_in_window",
                   "nf_confirm")),
    ("bridge and bridge netfilter", ("br_", "nf_bridge")),
)


def category(sym: str) -> str:
    for name, prefixes in CATEGORIES:
        if sym.startswith(prefixes):
            return name
    return "other (stack, veth, sender, scheduler)"


def perf_symbols(data: str) -> collections.Counter[str]:
    """Self samples per symbol in a perf.data file."""
    out = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "sym", "--stdio", "-q",
                          "-g", "none", "-F", "sample,sym"], capture_output=True, text=True, check=True).stdout
    counts: collections.Counter[str] = collections.Counter()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].isdigit():
            counts[" ".join(parts[2:])] += int(parts[0])
    return counts


def profile_path(bench: T.Bench, ns: str, frames: str, duration: float, workdir: str,
                 label: str) -> tuple[collections.Counter[str], int]:
    """(symbol samples, packets sent) for one run of the sender on ``frames`` under perf."""
    data = os.path.join(workdir, f"{label}.data")
    argv = ["perf", "record", "-q", "--all-kernel", "-g", "-F", "2000", "-o", data, "--", "ip", "netns", "exec", ns,
            *bench.nice, sys.executable, T.__file__, "--send", frames, "--duration", str(duration),
            "--slice", str(duration)]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 120, check=True)
    sent = int(T.json.loads(p.stdout.strip().splitlines()[-1])[0]["sent"])
    return perf_symbols(data), sent


def run(bench: T.Bench, a: argparse.Namespace, workdir: str) -> list[dict[str, object]]:
    t, m = bench.topo, bench.macs
    from kproxy.testing.topology import NODE_EXT_IP

    csrc, esrc = (T.CLIENT_SRC_BASE, m["client"]), (T.EXT_SRC_BASE, m["ext"])
    groups = [
        ("ClusterIP TCP SYN", t.client, [
            ("client pod → ClusterIP", bench.frames("clusterip", 0, *csrc, [(m["gw"], T.VIP, T.HTTP_PORT)], "tcp")),
            ("client pod → pod IPs (bridged)", bench.frames(
                "clusterip-pod", 1, *csrc, [(m[p.name], p.ip, T.HTTP_PORT) for p in bench.pods], "tcp")),
            ("client pod → pod IPs routed via the node", bench.frames(
                "clusterip-pod-via-node", 2, *csrc, [(m["gw"], p.ip, T.HTTP_PORT) for p in bench.pods], "tcp")),
        ]),
        ("NodePort TCP SYN", t.ext, [
            ("external → NodePort", bench.frames("nodeport", 0, *esrc, [(m["node_ext"], NODE_EXT_IP, T.NP_HTTP)],
                                                 "tcp")),
            ("external → pod IPs (routed)", bench.frames(
                "nodeport-pod-routed", 1, *esrc, [(m["node_ext"], p.ip, T.HTTP_PORT) for p in bench.pods], "tcp")),
        ]),
    ]
    out: list[dict[str, object]] = []
    for title, ns, paths in groups:
        bench.send(ns, [f for _, f in paths], 0.3)  # warm up: ARP, caches
        samples = {label: collections.Counter[str]() for label, _ in paths}
        packets = dict.fromkeys(samples, 0)
        for rep in range(a.repeats):
            for j, (label, frames) in enumerate(paths):
                syms, sent = profile_path(bench, ns, frames, a.duration, workdir, f"{j}-{rep}")
                samples[label].update(syms)
                packets[label] += sent
        out.append({"title": title, "samples": samples, "packets": packets})
    return out


def render(groups: list[dict[str, object]], a: argparse.Namespace, meta: dict[str, str], top: int) -> str:
    lines = [f"# Kernel cost per packet: Service path vs direct ({a.proxy_mode})", "",
             f"`bench/path_profile.py {' '.join(meta['argv'])}` — {meta['date']}, load before {meta['load_before']},"
             f" after {meta['load_after']}. Each path's frames sent alone for {a.duration:g} s × {a.repeats} "
             "repeats under `perf record --all-kernel -g -F 2000`; *samples/1k pkt* = kernel perf samples in the "
             "sender's context per 1,000 frames (SYN, SYN-ACK and RST processing included), pooled over the "
             "repeats. Below each table: the extra cost by part of the path and the kernel functions with the "
             "largest self-sample difference per 1,000 frames.", ""]
    for g in groups:
        samples: dict[str, collections.Counter[str]] = g["samples"]  # type: ignore[assignment]
        packets: dict[str, int] = g["packets"]  # type: ignore[assignment]
        per_k = {lab: {s: v * 1000 / max(1, packets[lab]) for s, v in c.items()} for lab, c in samples.items()}
        labels = list(per_k)
        svc = labels[0]
        tot = {lab: sum(v.values()) for lab, v in per_k.items()}
        lines += [f"## {g['title']}", "", "| path | frames | samples/1k pkt | Service ÷ path (cost) |",
                  "|---|---|---|---|"]
        for lab in labels:
            ratio = "" if lab == svc else f"{tot[svc] / tot[lab]:.3f}"
            lines.append(f"| {lab} | {packets[lab]:,} | {tot[lab]:.1f} | {ratio} |")
        for base in labels[1:]:
            diff = {s: per_k[svc].get(s, 0.0) - per_k[base].get(s, 0.0) for s in set(per_k[svc]) | set(per_k[base])}
            by_cat: collections.Counter[str] = collections.Counter()
            for sym, v in diff.items():
                by_cat[category(sym)] += v
            lines += ["", f"Extra cost of *{svc}* over *{base}*: {tot[svc] - tot[base]:+.1f} samples/1k pkt, by part "
                      "of the path:", "", "| part | Δ samples/1k pkt |", "|---|---|"]
            lines += [f"| {c} | {v:+.2f} |" for c, v in sorted(by_cat.items(), key=lambda x: -x[1])]
            lines += ["", "Largest single contributors:", "", "| function | Δ samples/1k pkt | Service path |",
                      "|---|---|---|"]
            for s, v in sorted(diff.items(), key=lambda x: -x[1])[:top]:
                lines.append(f"| `{s}` | {v:+.2f} | {per_k[svc].get(s, 0.0):.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxy-mode", default="iptables", help="iptables or nftables")
    ap.add_argument("--iptables-backend", default="legacy", help="legacy or nft (iptables mode)")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per path per repeat")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--flows", type=int, default=1024)
    ap.add_argument("--sources", type=int, default=32)
    ap.add_argument("--nice", type=int, default=-20)
    ap.add_argument("--top", type=int, default=12, help="functions listed per comparison")
    ap.add_argument("--out", default="", help="write the Markdown report here (default: print only)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0 or not shutil.which("perf"):
        print("path_profile.py needs root and perf", file=sys.stderr)
        return 2
    if a.proxy_mode not in ("iptables", "nftables"):
        ap.error("--proxy-mode must be iptables or nftables")
    a.max_packets, a.slice = 10**9, a.duration  # what T.Bench expects from traffic.py's arguments
    sys.path.insert(0, T.REPO)
    os.environ.setdefault("KPROXY_CACHE_DIR", T.CACHE)
    meta = {"argv": list(sys.argv[1:] if argv is None else argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_before": T.load_avg()}
    workdir = tempfile.mkdtemp(prefix="kpbench-profile-")
    try:
        with T.running_bench(a, workdir, prefix="kpp") as bench:
            groups = run(bench, a, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta["load_after"] = T.load_avg()
    report = render(groups, a, meta, a.top)
    print(report)
    if a.out:
        with open(a.out, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
