"""Smoke test of the data-path benchmark (bench/traffic.py): a tiny run against the iptables mode.

It runs the real tool (topology in namespaces, daemon, scapy-built frames over AF_PACKET, wrk with
``Connection: close``, iperf3; the keep-alive wrk run is left out for time) with tiny durations and checks
that the numbers are sane: packets and connections got delivered through the Service and straight to the
pods, every backend got a share, no client errors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TOOL = os.path.join(REPO, "bench", "traffic.py")

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("wrk", "iperf3", "nft", "cc")),
                       reason="needs wrk, iperf3, nft and a C compiler (scripts/setup.sh installs them)"),
]


def test_traffic_benchmark_smoke(tmp_path: Path) -> None:
    out, js = os.path.join(tmp_path, "traffic.md"), os.path.join(tmp_path, "traffic.json")
    p = subprocess.run([sys.executable, TOOL, "--proxy-mode", "iptables", "--iptables-backend", "legacy",
                        "--duration", "0.5", "--repeats", "1", "--flows", "256", "--sources", "16",
                        "--connections", "4", "--only", "packets,conn,iperf", "--out", out, "--json", js],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads(Path(js).read_text())["summary"]
    pods = ["pod0", "pod1", "pod2"]
    assert set(summary["packets"]) == {"clusterip-tcp", "clusterip-udp", "nodeport-tcp", "nodeport-udp"}
    for key, row in summary["packets"].items():
        for side in ("svc", "direct"):
            r = row[side]
            assert r["delivered_pps"] > 100, (key, side, r)
            # nothing is dropped on an idle path, and every delivered SYN / datagram is answered
            assert r["delivered_pps"] <= r["sent_pps"] * 1.01, (key, side, r)
            assert r["reply_pps"] > 0.5 * r["delivered_pps"], (key, side, r)
            # the Service spreads the flows over all three backends (256 flows: each gets well over 10 %)
            assert list(r["share"]) == pods and min(r["share"].values()) > 0.1, (key, side, r["share"])
        assert row["ratio"] > 0.2, (key, row)
    conn = summary["conn"]
    assert conn["svc"] > 10 and conn["direct"] > 10 and conn["errors"] == 0, conn
    assert list(conn["share"]) == pods and min(conn["share"].values()) > 0.1, conn["share"]
    for label, r in summary["iperf"].items():
        assert r["svc"] > 0.01 and r["direct"] > 0.01, (label, r)
    report = Path(out).read_text()
    assert "client pod → ClusterIP" in report and "external → NodePort" in report and "iperf3" in report
