"""NodePort (from the external host, IPv6, the node itself, a pod), externalIPs and LoadBalancer ingress IPs."""

from __future__ import annotations

import pytest

from kproxy.testing.topology import EXT_IP, GATEWAY, HTTP_PORT, NODE_EXT_IP, NODE_EXT_IP6

from . import manifests as m
from .harness import Scenario, assert_fair

pytestmark = [pytest.mark.netns]

EXTERNAL_IP = "198.51.100.10"
EXTERNAL_IP6 = "2001:db8:ff::10"
LB_IP = "198.51.100.20"
LB_IP6 = "2001:db8:ff::20"


def slices(sc: Scenario, name: str, pods: list[str], ipv6: bool = False) -> list[dict]:
    out = [m.endpoint_slice(name, [m.endpoint(sc.ip(p)) for p in pods], [m.slice_port(HTTP_PORT, name="p")])]
    if ipv6:
        out.append(m.endpoint_slice(name, [m.endpoint(sc.ip6(p)) for p in pods], [m.slice_port(HTTP_PORT, name="p")]))
    return out


@pytest.mark.feature("nodeport")
def test_nodeport_from_external_host(sc: Scenario) -> None:
    vip, np = sc.vip(), sc.node_port()
    sc.apply("np", m.service("np", vip, [m.port(80, HTTP_PORT, name="p", node_port=np)]), *slices(sc, "np", sc.pods))
    p = sc.http(sc.topo.ext, NODE_EXT_IP, np, n=300)
    assert_fair(p, sc.pods, 300)
    # externalTrafficPolicy Cluster: the source is masqueraded to the node's address towards the pods
    assert set(p.peers) == {GATEWAY}, f"NodePort traffic with policy Cluster must be masqueraded: {p}"
    # the ClusterIP of a NodePort Service still works
    pc = sc.http(sc.topo.client, vip, 80, n=10)
    assert pc.ok == 10 and pc.backends <= set(sc.pods), str(pc)


@pytest.mark.feature("nodeport")
def test_nodeport_from_node_and_pod(sc: Scenario) -> None:
    vip, np = sc.vip(), sc.node_port()
    sc.apply("npn", m.service("npn", vip, [m.port(80, HTTP_PORT, name="p", node_port=np)]),
             *slices(sc, "npn", sc.pods))
    for addr in (NODE_EXT_IP, GATEWAY, "127.0.0.1"):
        p = sc.http(sc.topo.node, addr, np, n=30)
        assert p.ok == 30 and p.backends <= set(sc.pods), f"node → {addr}:{np}: {p}"
    # a pod reaching the node's bridge address on the NodePort
    p = sc.http(sc.topo.client, GATEWAY, np, n=30)
    assert p.ok == 30 and p.backends <= set(sc.pods), f"pod → {GATEWAY}:{np}: {p}"
    # the NodePort only answers on node addresses: the same port on a pod IP is not proxied
    verdict, _ = sc.tcp_check(sc.topo.client, sc.ip("pod0"), np, timeout=1)
    assert verdict != "ok", "a NodePort must not capture traffic to non-local addresses"


@pytest.mark.feature("nodeport", "nodeport_ipv6", "ipv6")
def test_nodeport_ipv6(sc: Scenario) -> None:
    vip, vip6, np = sc.vip(), sc.vip6(), sc.node_port()
    sc.apply("np6", m.service("np6", [vip, vip6], [m.port(80, HTTP_PORT, name="p", node_port=np)]),
             *slices(sc, "np6", sc.pods, ipv6=True))
    p = sc.http(sc.topo.ext, NODE_EXT_IP6, np, n=150)
    assert_fair(p, sc.pods, 150)
    p4 = sc.http(sc.topo.ext, NODE_EXT_IP, np, n=10)
    assert p4.ok == 10, str(p4)


@pytest.mark.feature("external_ips")
def test_external_ips(sc: Scenario) -> None:
    vip, vip6 = sc.vip(), sc.vip6()
    sc.ext_route(EXTERNAL_IP)
    sc.ext_route(EXTERNAL_IP6)
    sc.apply("eip", m.service("eip", [vip, vip6], [m.port(80, HTTP_PORT, name="p")],
                              external_ips=[EXTERNAL_IP, EXTERNAL_IP6]),
             *slices(sc, "eip", sc.pods, ipv6=True))
    p = sc.http(sc.topo.ext, EXTERNAL_IP, 80, n=150)
    assert_fair(p, sc.pods, 150)
    assert set(p.peers) == {GATEWAY}, f"external traffic (policy Cluster) must be masqueraded: {p}"
    p6 = sc.http(sc.topo.ext, EXTERNAL_IP6, 80, n=30)
    assert p6.ok == 30 and p6.backends <= set(sc.pods), str(p6)
    # another port on the external IP is not proxied
    verdict, _ = sc.tcp_check(sc.topo.ext, EXTERNAL_IP, 81, timeout=1)
    assert verdict != "ok"


@pytest.mark.feature("lb_ips")
def test_load_balancer_ingress_ips(sc: Scenario) -> None:
    vip, vip6, np = sc.vip(), sc.vip6(), sc.node_port()
    sc.ext_route(LB_IP)
    sc.ext_route(LB_IP6)
    sc.apply("lb", m.service("lb", [vip, vip6], [m.port(80, HTTP_PORT, name="p", node_port=np)],
                             lb_ips=[LB_IP, LB_IP6]),
             *slices(sc, "lb", sc.pods, ipv6=True))
    p = sc.http(sc.topo.ext, LB_IP, 80, n=150)
    assert_fair(p, sc.pods, 150)
    assert set(p.peers) == {GATEWAY}, str(p)
    p6 = sc.http(sc.topo.ext, LB_IP6, 80, n=30)
    assert p6.ok == 30, str(p6)
    pn = sc.http(sc.topo.ext, NODE_EXT_IP, np, n=10)
    assert pn.ok == 10, f"a LoadBalancer Service also has its NodePort: {pn}"


@pytest.mark.feature("lb_ips", "lb_source_ranges")
def test_load_balancer_source_ranges(sc: Scenario) -> None:
    vip = sc.vip()
    sc.ext_route(LB_IP)
    allowed = f"{EXT_IP}/32"
    sc.apply("lbsr", m.service("lbsr", vip, [m.port(80, HTTP_PORT, name="p", node_port=sc.node_port())],
                               lb_ips=[LB_IP], lb_source_ranges=[allowed]),
             *slices(sc, "lbsr", sc.pods))
    p = sc.http(sc.topo.ext, LB_IP, 80, n=10)
    assert p.ok == 10, f"{EXT_IP} is inside loadBalancerSourceRanges: {p}"
    sc.apply("lbsr", m.service("lbsr", vip, [m.port(80, HTTP_PORT, name="p", node_port=sc.node_port())],
                               lb_ips=[LB_IP], lb_source_ranges=["192.0.2.0/24"]),
             *slices(sc, "lbsr", sc.pods))
    verdict, _ = sc.tcp_check(sc.topo.ext, LB_IP, 80, timeout=1)
    assert verdict == "timeout", f"a source outside loadBalancerSourceRanges must be dropped, got {verdict}"
