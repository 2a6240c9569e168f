"""The test topology deletes its namespaces when its process is killed with SIGTERM (not only on errors)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

CHILD = """
import sys, time
from kproxy.testing.topology import Topology, unique_prefix
with Topology(prefix=sys.argv[1], pods=1, ipv6=False, servers=False) as t:
    print(" ".join(t.namespaces), flush=True)
    time.sleep(60)
"""


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_sigterm_removes_namespaces() -> None:
    prefix = f"kpsig{os.getpid() % 100000}"
    p = subprocess.Popen([sys.executable, "-c", CHILD, prefix], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        created = set(p.stdout.readline().split())
        assert len(created) >= 3 and created <= _netns()  # node, client, ext, pod
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 128 + signal.SIGTERM
        assert not created & _netns()
    finally:
        if p.poll() is None:
            p.kill()
        for ns in _netns():
            if ns.startswith(prefix):
                subprocess.run(["ip", "netns", "del", ns], check=False)
