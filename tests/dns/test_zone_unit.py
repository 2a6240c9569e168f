"""Record generation and the table builder, fed straight from a ClusterStore (no server)."""

from __future__ import annotations

import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from kproxy.dns.wire import fast_response
from kproxy.dns.zone import ClusterZone
from kproxy.store import ClusterStore, Event


def _svc(name: str, ns: str = "default", ip: str = "10.96.1.1", labels: dict | None = None) -> dict:
    meta: dict = {"name": name, "namespace": ns}
    if labels:
        meta["labels"] = labels
    return {"metadata": meta, "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}}


def _ask(zone: ClusterZone, name: str, rdtype: str = "A") -> dns.message.Message:
    wire = dns.message.make_query(name, rdtype).to_wire()
    resp = fast_response(wire, zone.table)
    assert resp is not None
    return dns.message.from_wire(resp)


def _a(zone: ClusterZone, name: str) -> set[str]:
    return {rd.to_text() for rrset in _ask(zone, name).answer for rd in rrset if rrset.rdtype == dns.rdatatype.A}


def test_service_of_another_proxy_still_in_dns() -> None:
    store = ClusterStore()
    zone = ClusterZone(store)
    store.apply([Event("ADDED", "Service", _svc("other", labels={"service.kubernetes.io/service-proxy-name": "x"}))])
    zone.sync()
    assert "other" not in {k[1] for k in store.services}  # not proxied
    assert _a(zone, "other.default.svc.cluster.local") == {"10.96.1.1"}  # but resolvable
    # label removed: proxied and still resolvable; deleted: gone
    store.apply([Event("MODIFIED", "Service", _svc("other", ip="10.96.1.2"))])
    zone.sync()
    assert ("default", "other") in store.services
    assert _a(zone, "other.default.svc.cluster.local") == {"10.96.1.2"}
    store.apply([Event("MODIFIED", "Service", _svc("other", ip="10.96.1.3",
                                                  labels={"service.kubernetes.io/service-proxy-name": "x"}))])
    zone.sync()
    assert _a(zone, "other.default.svc.cluster.local") == {"10.96.1.3"}
    store.apply([Event("DELETED", "Service", _svc("other"))])
    zone.sync()
    assert _ask(zone, "other.default.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN


def test_empty_non_terminals_follow_deletions() -> None:
    store = ClusterStore()
    zone = ClusterZone(store)
    store.apply([Event("ADDED", "Service", _svc("a", ns="solo"))])
    zone.sync()
    assert _ask(zone, "solo.svc.cluster.local").rcode() == dns.rcode.NOERROR
    assert _ask(zone, "10.in-addr.arpa", "PTR").rcode() == dns.rcode.NOERROR  # empty non-terminal
    store.apply([Event("DELETED", "Service", _svc("a", ns="solo"))])
    zone.sync()
    assert _ask(zone, "solo.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN
    assert _ask(zone, "a.solo.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN
    # the reverse tree is gone too: 10.in-addr.arpa is no longer ours (the fast path defers to forwarding)
    assert fast_response(dns.message.make_query("10.in-addr.arpa", "PTR").to_wire(), zone.table) is None


def test_shared_ptr_and_node_change_updates_srv_additional() -> None:
    store = ClusterStore()
    zone = ClusterZone(store)
    node = {"metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}}
    np = {"metadata": {"name": "np", "namespace": "default"},
          "spec": {"type": "NodePort", "clusterIP": "10.96.2.2",
                   "ports": [{"name": "http", "port": 80, "nodePort": 30001}]}}
    store.apply([Event("ADDED", "Node", node), Event("ADDED", "Service", np)])
    zone.sync()
    r = _ask(zone, "_http._tcp.np.default.nodeport.cluster.local", "SRV")
    assert {rd.to_text() for rrset in r.additional for rd in rrset} == {"192.0.2.1"}
    node["status"]["addresses"][0]["address"] = "192.0.2.9"
    store.apply([Event("MODIFIED", "Node", node)])
    zone.sync()
    r = _ask(zone, "_http._tcp.np.default.nodeport.cluster.local", "SRV")
    assert {rd.to_text() for rrset in r.additional for rd in rrset} == {"192.0.2.9"}
    store.apply([Event("DELETED", "Node", node)])
    zone.sync()
    assert _ask(zone, "_http._tcp.np.default.nodeport.cluster.local", "SRV").rcode() == dns.rcode.NXDOMAIN


def test_incremental_equals_full_rebuild() -> None:
    """After a series of changes, the incrementally maintained table equals one built from scratch."""
    store = ClusterStore()
    zone = ClusterZone(store)
    for i in range(30):
        store.apply([Event("ADDED", "Service", _svc(f"s{i}", ns=f"n{i % 3}", ip=f"10.96.3.{i + 1}"))])
        zone.sync()
    for i in range(0, 30, 3):
        store.apply([Event("DELETED", "Service", _svc(f"s{i}", ns=f"n{i % 3}"))])
    for i in range(1, 30, 3):
        store.apply([Event("MODIFIED", "Service", _svc(f"s{i}", ns=f"n{i % 3}", ip=f"10.96.4.{i + 1}"))])
    zone.sync()
    # the NS target's address, node records and NodePort SRVs (whose additional sections name other
    # sources' records) change as well
    store.apply([Event("ADDED", "Service", _svc("kube-dns", ns="kube-system", ip="10.96.0.10")),
                 Event("ADDED", "Node", {"metadata": {"name": "n1"}, "status": {"addresses": [
                     {"type": "InternalIP", "address": "192.0.2.1"}]}}),
                 Event("ADDED", "Service", {"metadata": {"name": "np", "namespace": "n0"}, "spec": {
                     "type": "NodePort", "clusterIP": "10.96.8.8",
                     "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}})])
    zone.sync()
    store.apply([Event("MODIFIED", "Node", {"metadata": {"name": "n1"}, "status": {"addresses": [
        {"type": "InternalIP", "address": "192.0.2.2"}]}})])
    zone.sync()
    fresh = ClusterZone(store, consumer="dns-fresh")
    fresh.sync()
    soa = lambda t: {k for k in t.answers if k.endswith(b"\x00\x06")}  # noqa: E731 - serials differ
    assert set(zone.table.answers) == set(fresh.table.answers)
    for k, e in zone.table.answers.items():
        if k not in soa(zone.table):
            assert e == fresh.table.answers[k], k
    assert zone.table.names == fresh.table.names


def test_unencodable_service_is_skipped_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    """A Service whose names cannot be encoded (here: an over-long zone-relative name) gets no records;
    every other Service keeps updating."""
    store = ClusterStore()
    zone = ClusterZone(store, zone="z" * 60 + "." + "y" * 60 + "." + "x" * 60)
    long_ns = "n" * 63
    store.apply([Event("ADDED", "Service", _svc("s" * 63, ns=long_ns)),
                 Event("ADDED", "Service", _svc("ok", ip="10.96.1.2"))])
    zone.sync()
    assert any("no records" in r.getMessage() and long_ns in r.getMessage() for r in caplog.records)
    zname = zone.zone
    assert _a(zone, f"ok.default.svc.{zname}") == {"10.96.1.2"}
    store.apply([Event("MODIFIED", "Service", _svc("ok", ip="10.96.1.3"))])
    zone.sync()
    assert _a(zone, f"ok.default.svc.{zname}") == {"10.96.1.3"}
