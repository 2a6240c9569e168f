"""``--masquerade-all``: every packet sent to a Service VIP is masqueraded, pod traffic included."""

from __future__ import annotations

import pytest

from kproxy.testing.topology import GATEWAY, HTTP_PORT

from . import manifests as m
from .harness import Scenario

pytestmark = [pytest.mark.netns]

DAEMON_FLAGS = ["--masquerade-all"]


@pytest.mark.feature("masquerade_all")
def test_masquerade_all(sc: Scenario) -> None:
    vip = sc.vip()
    sc.apply("ma", m.service("ma", vip, [m.port(80, HTTP_PORT, name="p")]),
             m.endpoint_slice("ma", [m.endpoint(sc.ip(p)) for p in sc.pods], [m.slice_port(HTTP_PORT, name="p")]))
    p = sc.http(sc.topo.client, vip, 80, n=30)
    assert p.ok == 30 and set(p.peers) == {GATEWAY}, f"--masquerade-all must SNAT pod → ClusterIP traffic: {p}"
    p = sc.http(sc.topo.ext, vip, 80, n=10)
    assert p.ok == 10 and set(p.peers) == {GATEWAY}, str(p)
