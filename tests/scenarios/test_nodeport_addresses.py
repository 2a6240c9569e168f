"""``--nodeport-addresses``: NodePorts answer only on node addresses inside the given CIDRs."""

from __future__ import annotations

import pytest

from kproxy.testing.topology import GATEWAY, HTTP_PORT, NODE_EXT_IP

from . import manifests as m
from .harness import Scenario

pytestmark = [pytest.mark.netns]

DAEMON_FLAGS = ["--nodeport-addresses", "203.0.113.0/24"]


@pytest.mark.feature("nodeport", "nodeport_addresses")
def test_nodeport_only_on_selected_addresses(sc: Scenario) -> None:
    vip, np = sc.vip(), sc.node_port()
    sc.apply("npa", m.service("npa", vip, [m.port(80, HTTP_PORT, name="p", node_port=np)]),
             m.endpoint_slice("npa", [m.endpoint(sc.ip(p)) for p in sc.pods], [m.slice_port(HTTP_PORT, name="p")]))
    p = sc.http(sc.topo.ext, NODE_EXT_IP, np, n=30)
    assert p.ok == 30 and p.backends <= set(sc.pods), f"{NODE_EXT_IP} is inside --nodeport-addresses: {p}"
    p = sc.http(sc.topo.node, NODE_EXT_IP, np, n=10)
    assert p.ok == 10, f"node → its own selected address: {p}"
    # the bridge address is a node address outside the CIDR: nothing is proxied there (no listener → refused)
    verdict, _ = sc.tcp_check(sc.topo.client, GATEWAY, np, timeout=1)
    assert verdict != "ok", f"{GATEWAY}:{np} is outside --nodeport-addresses but answered"
    verdict, _ = sc.tcp_check(sc.topo.node, "127.0.0.1", np, timeout=1)
    assert verdict != "ok", "127.0.0.1 is outside --nodeport-addresses but answered"
    # the ClusterIP is unaffected
    pc = sc.http(sc.topo.client, vip, 80, n=10)
    assert pc.ok == 10, str(pc)
