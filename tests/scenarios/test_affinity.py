"""sessionAffinity ClientIP: stickiness per client address, and the timeout."""

from __future__ import annotations

import time

import pytest

from kproxy.testing.topology import HTTP_PORT, NODE_EXT_IP

from . import manifests as m
from .harness import Scenario

pytestmark = [pytest.mark.netns]

TIMEOUT = 3  # seconds, sessionAffinityConfig.clientIP.timeoutSeconds
SOURCES = 20


def sticky(sc: Scenario, name: str, vip: str, timeout: int, node_port: int | None = None) -> list[dict]:
    return [
        m.service(name, vip, [m.port(80, HTTP_PORT, name="p", node_port=node_port)], affinity_timeout=timeout),
        m.endpoint_slice(name, [m.endpoint(sc.ip(p)) for p in sc.pods], [m.slice_port(HTTP_PORT, name="p")]),
    ]


def by_src(sc: Scenario, vip: str, sources: list[str], n: int) -> dict[str, dict[str, int]]:
    r = sc.clients(sc.topo.client, "http-by-src", vip, 80, "--src", ",".join(sources), "-n", n)
    assert r["errors"] == 0, r
    return r["by_src"]


@pytest.mark.feature("session_affinity")
def test_client_ip_affinity_sticks_and_expires(sc: Scenario) -> None:
    vip = sc.vip()
    sc.apply("aff", *sticky(sc, "aff", vip, TIMEOUT))
    sources = sc.client_addresses(SOURCES)

    # Each source address sticks to one backend over many new connections (made back to back, well within
    # the timeout: a second pass in a new process could exceed it on a loaded machine).
    first = by_src(sc, vip, sources, 6)
    for src, counts in first.items():
        assert len(counts) == 1, f"{src} was spread over {counts} despite ClientIP affinity"
    chosen = {src: next(iter(c)) for src, c in first.items()}
    # Affinity is per client, not global: 20 independent first choices over 3 backends are not all equal
    # unless selection is broken (chance (1/3)^19 ≈ 1e-9).
    assert len(set(chosen.values())) > 1, f"every client was pinned to the same backend: {chosen}"

    # After the timeout, every source picks afresh. If the timeout were ignored (e.g. kernel default or
    # 10800 s), all 20 sources would keep their backend; with a fresh random pick each keeps it with
    # probability 1/3, so "all 20 unchanged" has probability ~3e-10.
    time.sleep(TIMEOUT + 1.0)
    later = by_src(sc, vip, sources, 3)
    for src, counts in later.items():
        assert len(counts) == 1, f"{src} not sticky after re-pinning: {counts}"
    moved = [s for s, c in later.items() if next(iter(c)) != chosen[s]]
    assert moved, f"no client changed backend after the {TIMEOUT}s affinity timeout: {chosen}"


@pytest.mark.feature("session_affinity")
def test_affinity_single_client_many_requests(sc: Scenario) -> None:
    vip = sc.vip()
    sc.apply("aff1", *sticky(sc, "aff1", vip, 10800))
    p = sc.http(sc.topo.client, vip, 80, n=100)
    assert p.ok == 100 and len(p.backends) == 1, f"one client must stick to one backend: {p}"


@pytest.mark.feature("session_affinity", "nodeport")
def test_affinity_on_nodeport(sc: Scenario) -> None:
    vip, np = sc.vip(), sc.node_port()
    sc.apply("affnp", *sticky(sc, "affnp", vip, 10800, node_port=np))
    p = sc.http(sc.topo.ext, NODE_EXT_IP, np, n=60)
    assert p.ok == 60 and len(p.backends) == 1, f"the external host must stick to one backend: {p}"


@pytest.mark.feature("session_affinity")
def test_affinity_backend_removed(sc: Scenario) -> None:
    """When the pinned backend leaves the Service, the client moves to a remaining one and sticks there."""
    vip = sc.vip()
    sc.apply("affrm", *sticky(sc, "affrm", vip, 10800))
    p = sc.http(sc.topo.client, vip, 80, n=10)
    assert len(p.backends) == 1, str(p)
    pinned = next(iter(p.backends))
    rest = [x for x in sc.pods if x != pinned]
    sc.apply("affrm", m.service("affrm", vip, [m.port(80, HTTP_PORT, name="p")], affinity_timeout=10800),
             m.endpoint_slice("affrm", [m.endpoint(sc.ip(x)) for x in rest], [m.slice_port(HTTP_PORT, name="p")]))
    p = sc.http(sc.topo.client, vip, 80, n=20)
    assert p.ok == 20 and len(p.backends) == 1 and pinned not in p.backends, str(p)
