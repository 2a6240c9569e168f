"""Daemon restart keeps traffic flowing; ``kproxy --cleanup`` removes every trace of the mode."""

from __future__ import annotations

import re
import time

import pytest

from kproxy.testing.topology import HTTP_PORT, TCP_PORT

from . import manifests as m
from .harness import Scenario

pytestmark = [pytest.mark.netns, pytest.mark.slow]


@pytest.mark.feature("restart", "cleanup")
def test_restart_keeps_connections_then_cleanup(sc: Scenario) -> None:
    vip = sc.vip()
    sc.apply("keep", m.service("keep", vip, [m.port(80, HTTP_PORT, name="http"), m.port(9000, TCP_PORT, name="echo")]),
             m.endpoint_slice("keep", [m.endpoint(sc.ip(p)) for p in sc.pods],
                              [m.slice_port(HTTP_PORT, name="http"), m.slice_port(TCP_PORT, name="echo")]))
    holder = sc.spawn_client(sc.topo.client, "tcp-hold", vip, 9000, "--interval", 0.2, wait_for="connected")
    prober = sc.spawn_client(sc.topo.client, "http-loop", vip, 80, "--interval", 0.05, wait_for="started")
    time.sleep(0.6)

    rc = sc.stop()
    assert rc == 0, f"kproxy exited with {rc} on SIGTERM:\n{sc.log()[-3000:]}"
    # the daemon is gone; the rules stay: new connections keep working
    time.sleep(0.5)
    p = sc.http(sc.topo.client, vip, 80, n=30)
    assert p.ok == 30, f"new connections failed while the daemon was down: {p}"

    sc.start()  # adopts the existing state; waits for /healthz and a programmed change
    time.sleep(1.0)
    p = sc.http(sc.topo.client, vip, 80, n=60)
    assert p.ok == 60 and p.backends == set(sc.pods), f"after the restart: {p}"

    loop = sc.finish_client(prober)
    hold = sc.finish_client(holder)
    assert loop["errors"] == 0, f"new connections failed around the restart: {loop}"
    assert loop["ok"] > 20, loop
    assert hold["errors"] == [], f"the long-lived connection broke: {hold}"
    assert hold["received"] == hold["sent"] and hold["sent"] >= 10, hold
    assert hold["max_gap"] < 1.5, f"the long-lived connection stalled {hold['max_gap']:.2f}s: {hold}"
    restart_log = sc.log()
    assert "Traceback" not in restart_log, restart_log[-3000:]

    # --cleanup removes everything the mode created; the VIP then stops working
    sc.stop()
    before = sc.state()
    pattern = sc.mode.state_pattern
    if pattern:
        assert re.search(pattern, before), f"no {sc.mode.mode} state found before cleanup?\n{before[-3000:]}"
    r = sc.kproxy_cli("--cleanup", "--proxy-mode", sc.mode.mode, *sc.mode.args, check=False)
    assert r.returncode == 0, f"kproxy --cleanup failed ({r.returncode}): {r.stderr[-2000:]}"
    after = sc.state()
    if pattern:
        left = [ln for ln in after.splitlines() if re.search(pattern, ln)]
        assert not left, "kproxy --cleanup left state behind:\n" + "\n".join(left[:40])
    verdict, _ = sc.tcp_check(sc.topo.client, vip, 80, timeout=1)
    assert verdict != "ok", "the ClusterIP still answers after --cleanup"
    # a second cleanup finds nothing and still succeeds
    r = sc.kproxy_cli("--cleanup", "--proxy-mode", sc.mode.mode, *sc.mode.args, check=False)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.feature("restart")
def test_restart_picks_up_changes_made_while_down(sc: Scenario) -> None:
    """Changes written while the daemon is down are programmed by the next one (full sync on start),
    and Services deleted meanwhile disappear from the kernel."""
    if sc.daemon is None:
        sc.start()
    vip_a, vip_b = sc.vip(), sc.vip()
    sc.apply("a", m.service("a", vip_a, [m.port(80, HTTP_PORT, name="p")]),
             m.endpoint_slice("a", [m.endpoint(sc.ip("pod0"))], [m.slice_port(HTTP_PORT, name="p")]))
    assert sc.http(sc.topo.client, vip_a, 80, n=3).counts == {"pod0": 3}
    sc.stop()
    sc.delete("a", wait=False)
    sc.apply("b", m.service("b", vip_b, [m.port(80, HTTP_PORT, name="p")]),
             m.endpoint_slice("b", [m.endpoint(sc.ip("pod1"))], [m.slice_port(HTTP_PORT, name="p")]), wait=False)
    sc.start()
    p = sc.http(sc.topo.client, vip_b, 80, n=3)
    assert p.counts == {"pod1": 3}, f"a Service added while the daemon was down: {p}"
    verdict, _ = sc.tcp_check(sc.topo.client, vip_a, 80, timeout=1)
    assert verdict != "ok", "a Service deleted while the daemon was down is still programmed"
