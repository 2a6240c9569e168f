"""A failing iptables-restore leaves the previous rules intact and is retried (real kernel, netns).

The restore binary is wrapped by a script earlier on PATH that fails while a trigger file exists,
standing in for a transient failure (lock contention, a kernel error) of the real iptables-restore.
"""

import os
import stat
import sys
import time
from pathlib import Path

import pytest
import yaml

from kproxy.testing.topology import Topology

from .objs import ep, eps, svc

pytestmark = pytest.mark.netns


def _write(d: Path, endpoints: list[str]) -> None:
    tmp = d / ".web.tmp"
    tmp.write_text(yaml.safe_dump_all([svc("web", ports=[{"name": "http", "port": 80}]),
                                       eps("web", [ep(ip) for ip in endpoints])]))
    os.replace(tmp, d / "web.yaml")


def _nat(topo: Topology) -> str:
    return topo.exec(topo.node, ["iptables-legacy-save", "-t", "nat"]).stdout


def test_failed_restore_keeps_rules_and_retries(tmp_path: Path) -> None:
    wrap = tmp_path / "bin"
    wrap.mkdir()
    trigger = tmp_path / "fail"
    script = wrap / "iptables-legacy-restore"
    script.write_text(f"#!/bin/sh\nif [ -e {trigger} ]; then echo 'injected failure' >&2; exit 4; fi\n"
                      "exec /usr/sbin/iptables-legacy-restore \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    manifests = tmp_path / "m"
    manifests.mkdir()
    _write(manifests, ["10.244.1.10", "10.244.1.11"])
    with Topology(pods=3, ipv6=False) as topo:
        p = topo.spawn(topo.node, topo.daemon_args(str(manifests), "iptables", "--iptables-backend", "legacy"),
                       log_name="kproxy.log", env={"PATH": f"{wrap}:{os.environ['PATH']}"})
        topo.wait_healthy(30)
        before = _nat(topo)
        assert "10.244.1.11:8080" in before, topo.read_log()
        trigger.touch()
        _write(manifests, ["10.244.1.12"])
        deadline = time.monotonic() + 10
        while "injected failure" not in topo.read_log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "injected failure" in topo.read_log()
        # nothing half-applied: the kernel still holds exactly the previous ruleset, and it still works
        after_failure = _nat(topo)
        assert "10.244.1.12:8080" not in after_failure and "10.244.1.11:8080" in after_failure
        res = topo.probe(topo.client, "http", "10.96.0.10", 80, "-n", "20", "--timeout", "1")
        assert set(res["counts"]) <= {"pod0", "pod1"} and res["errors"] == 0
        trigger.unlink()
        deadline = time.monotonic() + 15
        while "10.244.1.12:8080" not in _nat(topo) and time.monotonic() < deadline:
            time.sleep(0.2)
        healed = _nat(topo)
        assert "10.244.1.12:8080" in healed and "10.244.1.11:8080" not in healed
        res = topo.probe(topo.client, "http", "10.96.0.10", 80, "-n", "10", "--timeout", "1")
        assert res["counts"] == {"pod2": 10}
        assert "full sync" in topo.read_log().split("injected failure")[-1]  # recovery is a full resync
        topo.stop_daemon(p)
    assert sys.platform == "linux"
