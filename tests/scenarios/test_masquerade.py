"""Masquerade decisions: traffic from outside --cluster-cidr is SNATed, pod traffic keeps its source; hairpin."""

from __future__ import annotations

import pytest

from kproxy.testing.topology import CLIENT_IP, CLIENT_IP6, GATEWAY, GATEWAY6, HTTP_PORT, UDP_PORT

from . import manifests as m
from .harness import Scenario

pytestmark = [pytest.mark.netns]


def dual(sc: Scenario, name: str, vip: str, vip6: str, pods: list[str]) -> list[dict]:
    ports = [m.port(80, HTTP_PORT, name="p"), m.port(53, UDP_PORT, name="u", protocol="UDP")]
    sports = [m.slice_port(HTTP_PORT, name="p"), m.slice_port(UDP_PORT, name="u", protocol="UDP")]
    return [m.service(name, [vip, vip6], ports),
            m.endpoint_slice(name, [m.endpoint(sc.ip(p)) for p in pods], sports),
            m.endpoint_slice(name, [m.endpoint(sc.ip6(p)) for p in pods], sports)]


@pytest.mark.feature("masquerade")
def test_masquerade_by_source(sc: Scenario) -> None:
    vip, vip6 = sc.vip(), sc.vip6()
    sc.apply("masq", *dual(sc, "masq", vip, vip6, sc.pods))
    cases = [
        ("pod (inside --cluster-cidr)", sc.topo.client, vip, {CLIENT_IP}),
        ("pod over IPv6", sc.topo.client, vip6, {CLIENT_IP6}),
        ("the node itself", sc.topo.node, vip, {GATEWAY}),
        ("the node itself over IPv6", sc.topo.node, vip6, {GATEWAY6}),
        ("the external host", sc.topo.ext, vip, {GATEWAY}),
        ("the external host over IPv6", sc.topo.ext, vip6, {GATEWAY6}),
    ]
    for what, ns, ip, want in cases:
        p = sc.http(ns, ip, 80, n=20)
        assert p.ok == 20, f"{what} → {ip}: {p}"
        assert set(p.peers) == want, f"{what} → {ip}: backends saw {dict(p.peers)}, want {want}"
        u = sc.udp(ns, ip, 53, n=10)
        assert u.ok == 10 and set(u.peers) == want, f"{what} → {ip} (UDP): {u}"


@pytest.mark.feature("hairpin")
def test_hairpin(sc: Scenario) -> None:
    """A pod reaching itself through its Service: answered, and the source is masqueraded to the bridge IP
    (otherwise the pod would see its own address as the peer and answer itself directly)."""
    vip, vip6 = sc.vip(), sc.vip6()
    sc.apply("hp", *dual(sc, "hp", vip, vip6, ["pod0"]))
    pod0 = sc.ns("pod0")
    p = sc.http(pod0, vip, 80, n=10)
    assert p.counts == {"pod0": 10} and set(p.peers) == {GATEWAY}, f"hairpin over IPv4: {p}"
    p6 = sc.http(pod0, vip6, 80, n=10)
    assert p6.counts == {"pod0": 10} and set(p6.peers) == {GATEWAY6}, f"hairpin over IPv6: {p6}"
    u = sc.udp(pod0, vip, 53, n=5)
    assert u.counts == {"pod0": 5} and set(u.peers) == {GATEWAY}, f"UDP hairpin: {u}"
    # other endpoints of the same Service reached from pod0 keep pod0's own source address
    sc.apply("hp", *dual(sc, "hp", vip, vip6, ["pod1"]))
    p = sc.http(pod0, vip, 80, n=10)
    assert p.counts == {"pod1": 10} and set(p.peers) == {sc.ip("pod0")}, str(p)
