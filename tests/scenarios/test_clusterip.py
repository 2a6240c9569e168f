"""ClusterIP: load distribution (TCP, UDP, IPv6), no-endpoint REJECT, scale-down convergence."""

from __future__ import annotations

import time

import pytest

from kproxy.testing.topology import CLIENT_IP, CLIENT_IP6, HTTP_PORT, UDP_PORT

from . import manifests as m
from .harness import Scenario, assert_fair

pytestmark = [pytest.mark.netns]

N = 300


def web(sc: Scenario, vip: str | list[str], pods: list[str], name: str = "web", protocol: str = "TCP",
        port: int = 80, target: int = HTTP_PORT, ipv6: bool = False) -> list[dict]:
    objs = [
        m.service(name, vip, [m.port(port, target, name="p", protocol=protocol)]),
        m.endpoint_slice(name, [m.endpoint(sc.ip(p)) for p in pods], [m.slice_port(target, name="p",
                                                                                     protocol=protocol)]),
    ]
    if ipv6:
        objs.append(m.endpoint_slice(name, [m.endpoint(sc.ip6(p)) for p in pods],
                                     [m.slice_port(target, name="p", protocol=protocol)]))
    return objs


@pytest.mark.feature("clusterip")
def test_tcp_distribution(sc: Scenario) -> None:
    vip = sc.vip()
    sc.apply("web", *web(sc, vip, sc.pods))
    p = sc.http(sc.topo.client, vip, 80, n=N)
    assert_fair(p, sc.pods, N)
    assert set(p.peers) == {CLIENT_IP}, f"pod-to-ClusterIP traffic must keep the pod source: {p}"


@pytest.mark.feature("clusterip", "udp")
def test_udp_distribution(sc: Scenario) -> None:
    vip = sc.vip()
    sc.apply("dns", *web(sc, vip, sc.pods, name="dns", protocol="UDP", port=53, target=UDP_PORT))
    p = sc.udp(sc.topo.client, vip, 53, n=N)
    assert_fair(p, sc.pods, N)
    assert set(p.peers) == {CLIENT_IP}, str(p)


@pytest.mark.feature("clusterip", "ipv6")
def test_dual_stack_ipv6(sc: Scenario) -> None:
    vip, vip6 = sc.vip(), sc.vip6()
    sc.apply("ds", *web(sc, [vip, vip6], sc.pods, name="ds", ipv6=True))
    p6 = sc.http(sc.topo.client, vip6, 80, n=N)
    assert_fair(p6, sc.pods, N)
    assert set(p6.peers) == {CLIENT_IP6}, str(p6)
    p4 = sc.http(sc.topo.client, vip, 80, n=30)
    assert p4.errors == 0 and p4.backends <= set(sc.pods), str(p4)


@pytest.mark.feature("clusterip", "reject_no_endpoints")
def test_no_endpoints_rejects(sc: Scenario) -> None:
    vip = sc.vip()
    sc.apply("empty", m.service("empty", vip, [m.port(80, HTTP_PORT, name="p"), m.port(53, UDP_PORT, name="u",
                                                                                       protocol="UDP")]))
    verdict, took = sc.tcp_check(sc.topo.client, vip, 80, timeout=3)
    assert verdict == "refused", f"TCP to a Service without endpoints must be REJECTed, got {verdict}"
    assert took < 2.0, f"the REJECT must be immediate, took {took:.2f}s"
    pu = sc.udp(sc.topo.client, vip, 53, n=3, timeout=1)
    assert pu.ok == 0 and pu.error_kinds.get("refused") == 3, \
        f"UDP to a Service without endpoints must get ICMP port unreachable: {pu}"
    # from outside the cluster too
    verdict, took = sc.tcp_check(sc.topo.ext, vip, 80, timeout=3)
    assert verdict == "refused" and took < 2.0, (verdict, took)
    # an endpoint appears: served
    sc.apply("empty-eps", m.endpoint_slice("empty", [m.endpoint(sc.ip("pod1"))], [m.slice_port(HTTP_PORT, name="p")]))
    p = sc.http(sc.topo.client, vip, 80, n=5)
    assert p.counts == {"pod1": 5}, str(p)


@pytest.mark.feature("clusterip", "scale_down")
def test_scale_down_converges(sc: Scenario) -> None:
    vip = sc.vip()
    sc.apply("scale", *web(sc, vip, sc.pods, name="scale"))
    p = sc.http(sc.topo.client, vip, 80, n=60)
    assert p.backends == set(sc.pods), str(p)
    gone = sc.pods[-1]
    keep = sc.pods[:-1]
    t0 = time.monotonic()
    m.write(sc.dir, "scale.json", web(sc, vip, keep, name="scale"))
    seen_at = None
    while time.monotonic() - t0 < 5:
        batch = sc.http(sc.topo.client, vip, 80, n=20)
        if gone not in batch.counts:
            seen_at = time.monotonic() - t0
            break
    assert seen_at is not None, f"{gone} still receives new connections 5 s after removal"
    assert seen_at < 2.5, f"removal took {seen_at:.2f}s to reach the data path (want < ~2 s)"
    p = sc.http(sc.topo.client, vip, 80, n=150)
    assert_fair(p, keep, 150)
