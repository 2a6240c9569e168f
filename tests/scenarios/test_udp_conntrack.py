"""Stale UDP conntrack entries are deleted when endpoints change, so long-lived UDP flows move.

A UDP "connection" is a conntrack entry keyed by the 5-tuple; a client reusing one socket keeps hitting
the same entry, whose DNAT target was fixed by the first datagram. When that endpoint leaves the Service,
only deleting the entry makes the next datagram go through the Service rules again. The removed pods
stay up here, so a stale entry would still be *answered* — by the removed backend — which is what the
assertions detect (in a real cluster the pod is gone and the flow is black-holed).
"""

from __future__ import annotations

import time

import pytest

from kproxy.testing.topology import NODE_EXT_IP, UDP_PORT

from . import manifests as m
from .harness import Scenario

pytestmark = [pytest.mark.netns]


def udp_svc(sc: Scenario, name: str, vip: str, pods: list[str], node_port: int | None = None) -> list[dict]:
    return [m.service(name, vip, [m.port(53, UDP_PORT, name="dns", protocol="UDP", node_port=node_port)]),
            m.endpoint_slice(name, [m.endpoint(sc.ip(p)) for p in pods],
                             [m.slice_port(UDP_PORT, name="dns", protocol="UDP")])]


@pytest.mark.feature("udp", "udp_conntrack")
def test_udp_flow_moves_when_its_endpoint_is_removed(sc: Scenario) -> None:
    vip = sc.vip()
    sc.apply("udpct", *udp_svc(sc, "udpct", vip, sc.pods))
    s = sc.udp_session(sc.topo.client, vip, 53)
    first = [s.ask() for _ in range(5)]
    pinned = first[0][0]
    assert pinned and all(r == (pinned, "") for r in first), f"one socket must stay on one backend: {first}"

    rest = [p for p in sc.pods if p != pinned]
    sc.apply("udpct", *udp_svc(sc, "udpct", vip, rest))
    # the daemon deletes the stale entry right after the rules are in (as kube-proxy does): a datagram
    # sent in between may still use it, so allow that short window — without the cleanup the entry
    # (refreshed by every datagram) would keep the flow on the removed endpoint for good
    _until_moved(s, rest)
    after = [s.ask() for _ in range(5)]
    assert after[0][0] in rest, (f"after {pinned} left the Service the same socket still reached "
                                 f"{after[0]} — the stale conntrack entry was not deleted")
    assert all(r == after[0] for r in after), f"the flow must stick to its new backend: {after}"


@pytest.mark.feature("udp", "udp_conntrack", "nodeport")
def test_udp_nodeport_flow_moves_when_its_endpoint_is_removed(sc: Scenario) -> None:
    vip, np = sc.vip(), sc.node_port()
    sc.apply("udpnp", *udp_svc(sc, "udpnp", vip, sc.pods, node_port=np))
    s = sc.udp_session(sc.topo.ext, NODE_EXT_IP, np)
    pinned, err = s.ask()
    assert pinned and not err, err
    assert s.ask() == (pinned, "")
    rest = [p for p in sc.pods if p != pinned]
    sc.apply("udpnp", *udp_svc(sc, "udpnp", vip, rest, node_port=np))
    _until_moved(s, rest)
    moved, err = s.ask()
    assert not err and moved in rest, f"NodePort UDP flow still reaches removed {pinned}: {moved or err}"


def _until_moved(s, rest: list[str], window: float = 3.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + window
    while time.monotonic() < deadline:
        name, _ = s.ask()
        if name in rest:
            return
        time.sleep(0.2)


@pytest.mark.feature("udp", "udp_conntrack", "reject_no_endpoints")
def test_udp_zero_to_one_endpoint(sc: Scenario) -> None:
    vip = sc.vip()
    sc.apply("udp01", *udp_svc(sc, "udp01", vip, []))
    s = sc.udp_session(sc.topo.client, vip, 53)
    name, err = s.ask()
    assert not name and err == "refused", f"no endpoints: want ICMP port unreachable, got {name or err}"
    sc.apply("udp01", *udp_svc(sc, "udp01", vip, ["pod1"]))
    # the same socket (same 5-tuple) must now be served: any entry created while there were no endpoints
    # must not linger
    replies = [s.ask() for _ in range(3)]
    assert replies[-1] == ("pod1", ""), f"after an endpoint appeared the flow was not served: {replies}"
    assert replies[0] == ("pod1", ""), f"the first datagram after the endpoint appeared failed: {replies}"


@pytest.mark.feature("udp", "udp_conntrack")
def test_udp_service_deleted(sc: Scenario) -> None:
    """The Service goes away entirely: the flow's entry is deleted and the VIP stops answering."""
    vip = sc.vip()
    sc.apply("udpdel", *udp_svc(sc, "udpdel", vip, ["pod2"]))
    s = sc.udp_session(sc.topo.client, vip, 53)
    assert s.ask() == ("pod2", "")
    sc.delete("udpdel")
    # the same short window as above: the entry is deleted right after the rules, and a datagram sent in
    # between may still use it; without the cleanup every datagram would refresh it and keep it answering
    deadline = time.monotonic() + 3.0
    name, _ = s.ask()
    while name and time.monotonic() < deadline:
        time.sleep(0.2)
        name, _ = s.ask()
    assert not name, f"the deleted Service's VIP still answered over a stale conntrack entry ({name})"
    assert s.ask()[0] == "", "the deleted Service's VIP answered again"
