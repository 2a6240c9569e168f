#!/usr/bin/env python3
"""CNI ADD/DEL latency: kproxy-bridge + kproxy-host-local vs the reference bridge + host-local.

Both pairs get the same network configuration (own bridge, subnet and dataDir each) and are exec'd
exactly as a runtime does (env + stdin), alternating pod by pod so machine noise hits both alike.
Everything happens in namespaces this script creates: a "node" netns (bridges, iptables ipMasq rules)
and one netns per pod; all are removed at the end, also on failure.

kproxy's plugins are the launchers that ``deploy/cni/install-cni.sh`` writes (what a node runs).

    sudo .venv/bin/python bench/cni_latency.py [--pods 60] [--out bench/results/cni_latency.md]

Target (issue #3): kproxy's ADD+DEL median <= 2x the reference's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF_DIR = "/usr/lib/cni"


def conf(kind: str, prefix: str, data_dir: str, subnet: str, bridge: str) -> dict:
    ours = kind == "kproxy"
    return {
        "cniVersion": "1.0.0",
        "name": f"{prefix}-{kind}",
        "type": "kproxy-bridge" if ours else "bridge",
        "bridge": bridge,
        "isGateway": True,
        "ipMasq": True,
        "hairpinMode": True,
        "mtu": 1500,
        "ipam": {
            "type": "kproxy-host-local" if ours else "host-local",
            "dataDir": data_dir,
            "ranges": [[{"subnet": subnet}]],
            "routes": [{"dst": "0.0.0.0/0"}],
        },
    }


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * p
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_plugin(path: str, command: str, cid: str, netns: str, cni_path: str, stdin: bytes) -> tuple[float, float]:
    """Exec one plugin call; returns (wall ms, CPU ms of the plugin and every process it waited for)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": cni_path,
    }
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([path], input=stdin, env=env, capture_output=True)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"{path} {command} {cid} failed: {p.stdout.decode()} {p.stderr.decode()}")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return dt * 1000.0, cpu * 1000.0


def cpu_of(argv: list[str], n: int = 20, env: dict | None = None) -> float:
    """Median-free but load-robust: average CPU ms (user+sys) of ``argv`` over ``n`` runs."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(n):
        subprocess.run(argv, capture_output=True, env=env)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)) * 1000.0 / n


def breakdown(bindir: str) -> list[tuple[str, float]]:
    """Where kproxy's CPU goes: interpreter start, plugin imports, pyroute2's message classes."""
    lib = os.path.join(bindir, "kproxy-cni.d")
    py = ["/usr/bin/python3", "-SE", "-c"]
    pre = f"import sys; sys.path.insert(0, {lib!r}); "
    return [
        ("`python3 -SE -c pass`", cpu_of([*py, "pass"])),
        (
            "same, importing cni.host_local (+ its IP and JSON helpers)",
            cpu_of([*py, pre + "import cni.host_local, cni._ip"]),
        ),
        ("same, importing cni.bridge", cpu_of([*py, pre + "import cni.bridge"])),
        (
            "same, cni.bridge + pyroute2 rtnl messages",
            cpu_of([*py, pre + "import cni.bridge, cni._nl; cni._nl._load()"]),
        ),
        ("`iptables -t nat -S POSTROUTING`", cpu_of(["iptables", "-w", "-t", "nat", "-S", "POSTROUTING"])),
    ]


def inner(a: argparse.Namespace) -> dict:
    """Runs inside the node netns: time every ADD and DEL."""
    cfg = json.loads(a.inner)
    results: dict[str, dict[str, list[float]]] = {
        k: {"ADD": [], "DEL": [], "ADD_cpu": [], "DEL_cpu": []} for k in ("reference", "kproxy")
    }
    kinds = {
        "reference": (os.path.join(REF_DIR, "bridge"), REF_DIR),
        "kproxy": (os.path.join(cfg["bin"], "kproxy-bridge"), cfg["bin"]),
    }
    for _ in range(cfg["warmup"]):  # first exec of each pays page-cache misses; not what a node sees
        for kind, (path, cpath) in kinds.items():
            stdin = json.dumps(cfg["confs"][kind]).encode()
            run_plugin(path, "ADD", "warm", cfg["pods"][kind][0], cpath, stdin)
            run_plugin(path, "DEL", "warm", cfg["pods"][kind][0], cpath, stdin)
    order = list(kinds)
    n = len(cfg["pods"]["kproxy"])
    for command in ("ADD", "DEL"):
        for i in range(n):
            order.reverse()  # alternate which implementation goes first
            for kind in order:
                path, cpath = kinds[kind]
                stdin = json.dumps(cfg["confs"][kind]).encode()
                ns = cfg["pods"][kind][i]
                wall, cpu = run_plugin(path, command, f"{kind}-{i}", ns, cpath, stdin)
                results[kind][command].append(wall)
                results[kind][command + "_cpu"].append(cpu)
    results["breakdown"] = breakdown(cfg["bin"])  # type: ignore[assignment]
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "cni_latency.md"))
    ap.add_argument(
        "--nice", type=int, default=0, help="run the measurement at this nice value (e.g. -10 on a shared machine)"
    )
    ap.add_argument("--inner", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inner:
        json.dump(inner(a), sys.stdout)
        return 0
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    if not os.access(os.path.join(REF_DIR, "bridge"), os.X_OK):
        print(f"reference plugins missing in {REF_DIR}: apt-get install containernetworking-plugins", file=sys.stderr)
        return 2
    load0 = os.getloadavg()
    prefix = "kpcni-b" + secrets.token_hex(3)
    tmp = tempfile.mkdtemp(prefix=prefix)
    node = f"{prefix}-node"
    pods = {k: [f"{prefix}-{k[0]}{i}" for i in range(a.pods)] for k in ("reference", "kproxy")}
    created: list[str] = []
    try:
        bindir = os.path.join(tmp, "bin")
        subprocess.run(
            [os.path.join(REPO, "deploy", "cni", "install-cni.sh"), "--bin-dir", bindir, "--no-conf"],
            check=True,
            env={**os.environ, "SRC_PYTHON": sys.executable},
            capture_output=True,
        )
        for ns in [node, *pods["reference"], *pods["kproxy"]]:
            subprocess.run(["ip", "netns", "add", ns], check=True)
            created.append(ns)
        confs = {
            "reference": conf("reference", prefix, os.path.join(tmp, "data"), "10.244.200.0/22", "kpbr-ref"),
            "kproxy": conf("kproxy", prefix, os.path.join(tmp, "data"), "10.244.204.0/22", "kpbr-kp"),
        }
        cfg = {
            "bin": bindir,
            "confs": confs,
            "pods": {k: [f"/var/run/netns/{p}" for p in v] for k, v in pods.items()},
            "warmup": a.warmup,
        }
        p = subprocess.run(
            [
                "nice",
                "-n",
                str(a.nice),
                "ip",
                "netns",
                "exec",
                node,
                sys.executable,
                os.path.abspath(__file__),
                "--inner",
                json.dumps(cfg),
            ],
            capture_output=True,
        )
        if p.returncode != 0:
            print(p.stderr.decode(), file=sys.stderr)
            return 1
        res = json.loads(p.stdout)
    finally:
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    cpu_rows = []
    summary: dict[str, dict[str, float]] = {}
    for kind in ("reference", "kproxy"):
        add_cpu, del_cpu = statistics.median(res[kind]["ADD_cpu"]), statistics.median(res[kind]["DEL_cpu"])
        cpu_rows.append(f"| {kind} | {add_cpu:.1f} | {del_cpu:.1f} |")
        add, dele = res[kind]["ADD"], res[kind]["DEL"]
        both = [x + y for x, y in zip(add, dele, strict=True)]
        summary[kind] = {"add": statistics.median(add), "del": statistics.median(dele), "both": statistics.median(both)}
        rows.append(
            f"| {kind} | {statistics.median(add):.1f} | {pct(add, 0.9):.1f} | {statistics.median(dele):.1f} | "
            f"{pct(dele, 0.9):.1f} | {statistics.median(both):.1f} | {pct(both, 0.9):.1f} |"
        )
    ratio = summary["kproxy"]["both"] / summary["reference"]["both"]
    verdict = "meets" if ratio <= 2.0 else "MISSES"
    md = "\n".join(
        [
            "# CNI plugin latency: kproxy vs reference",
            "",
            f"`bench/cni_latency.py --pods {a.pods}` on {platform.node()} ({os.cpu_count()} CPUs, "
            f"kernel {platform.release()}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"load average before/after {load0[0]:.1f}/{os.getloadavg()[0]:.1f} (the machine is shared)"
            + (f", measured at nice {a.nice} for both plugin pairs." if a.nice else "."),
            "",
            "Reference: containernetworking-plugins `bridge` + `host-local` from /usr/lib/cni. kproxy: "
            "`kproxy-bridge` + `kproxy-host-local` as installed by `deploy/cni/install-cni.sh`. Same config for "
            "both (isGateway, ipMasq, hairpinMode, mtu, one /22 range); each plugin exec'd like a runtime does, "
            f"pods alternating between the two; times in ms over {a.pods} pods (wall clock of the plugin process, "
            "including its IPAM child and iptables calls).",
            "",
            "| plugins | ADD median | ADD p90 | DEL median | DEL p90 | ADD+DEL median | ADD+DEL p90 |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"kproxy ADD+DEL median / reference = **{ratio:.2f}x** (target <= 2x: {verdict}).",
            "",
            "CPU time per call (user+sys of the plugin and everything it ran: IPAM plugin, iptables), median ms. "
            "Wall-clock ratios grow with this when the machine is busy:",
            "",
            "| plugins | ADD CPU | DEL CPU |",
            "|---|---|---|",
            *cpu_rows,
            "",
            "Where kproxy's CPU goes (average CPU ms of a whole process, 20 runs each):",
            "",
            "| process | CPU ms |",
            "|---|---|",
            *[f"| {what} | {ms:.1f} |" for what, ms in res["breakdown"]],
            "",
        ]
    )
    print(md)
    if a.out:
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
