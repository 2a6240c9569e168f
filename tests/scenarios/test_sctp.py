"""SCTP Services (optional: skipped when the kernel has no SCTP support, e.g. no loadable sctp module)."""

from __future__ import annotations

import socket

import pytest

from kproxy.testing.topology import CLIENT_IP

from . import manifests as m
from .harness import Probe, Scenario, assert_fair

SCTP_PORT = 7000


def _sctp_available() -> str:
    """Empty when this kernel can create SCTP sockets, else the reason (creating a socket sends nothing)."""
    proto = getattr(socket, "IPPROTO_SCTP", None)
    if proto is None:
        return "Python has no IPPROTO_SCTP"
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto).close()
    except OSError as e:
        return f"the kernel cannot create SCTP sockets ({e.strerror}; sctp module not available)"
    return ""


_WHY = _sctp_available()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(bool(_WHY), reason=_WHY or "-")]


@pytest.mark.feature("sctp")
def test_sctp_cluster_ip(sc: Scenario) -> None:
    for pod in sc.pods:
        sc.spawn_client(sc.ns(pod), "sctp-serve", "--name", pod, "--port", SCTP_PORT, wait_for="ready")
    vip = sc.vip()
    sc.apply("sctp", m.service("sctp", vip, [m.port(70, SCTP_PORT, name="s", protocol="SCTP")]),
             m.endpoint_slice("sctp", [m.endpoint(sc.ip(p)) for p in sc.pods],
                              [m.slice_port(SCTP_PORT, name="s", protocol="SCTP")]))
    p = Probe.of(sc.clients(sc.topo.client, "sctp-ask", vip, 70, "-n", 90))
    assert_fair(p, sc.pods, 90)
    assert set(p.peers) == {CLIENT_IP}, str(p)
