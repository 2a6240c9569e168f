import gc
import random

from kproxy.snapshot import (
    EndpointInfo,
    ProxySnapshot,
    ServicePort,
    ServicePortName,
    categorize,
    service_endpoints,
)
from kproxy.store import ClusterStore, Event

from .objs import ep, eps, svc


def _store() -> tuple[ClusterStore, ProxySnapshot]:
    st = ClusterStore("node-a")
    return st, ProxySnapshot(st, "node-a")


def test_endpoints_merge_across_slices_and_changes_are_incremental() -> None:
    st, snap = _store()
    st.apply([Event("ADDED", "Service", svc()), Event("ADDED", "Service", svc("other", ips=("10.96.0.11",))),
              Event("ADDED", "EndpointSlice", eps("web", [ep("10.244.1.10")], name="a")),
              Event("ADDED", "EndpointSlice", eps("web", [ep("10.244.1.11", node="node-b")], name="b"))])
    ch = snap.update()
    web = ServicePortName("default", "web", "http", "TCP")
    assert web in ch.changed and len(ch.changed) == 2
    assert [(e.ip, e.is_local) for e in snap.endpoints[web]] == [("10.244.1.10", True), ("10.244.1.11", False)]
    # a change to one slice of one Service touches exactly that service port
    st.apply([Event("MODIFIED", "EndpointSlice", eps("web", [ep("10.244.1.12")], name="b"))])
    ch = snap.update()
    assert ch.changed == {web} and not ch.removed
    # re-applying identical objects is not a change
    st.apply([Event("MODIFIED", "EndpointSlice", eps("web", [ep("10.244.1.12")], name="b"))])
    assert not snap.update()


def test_removed_udp_endpoint_yields_stale_conntrack_records() -> None:
    st, snap = _store()
    udp = [{"name": "dns", "port": 53, "protocol": "UDP"}]
    st.apply([Event("ADDED", "Service", svc("dns", ports=udp)),
              Event("ADDED", "EndpointSlice", eps("dns", [ep("10.244.1.10"), ep("10.244.1.11")],
                                                  ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]))])
    first = snap.update()
    # 0 → n endpoints: flush entries for the VIP that black-holed traffic before
    assert [(s.vip, s.endpoint_ip) for s in first.stale_udp] == [("10.96.0.10", "")]
    st.apply([Event("MODIFIED", "EndpointSlice", eps("dns", [ep("10.244.1.10")],
                                                     ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]))])
    ch = snap.update()
    assert [(s.vip, s.port, s.endpoint_ip) for s in ch.stale_udp] == [("10.96.0.10", 53, "10.244.1.11")]


def test_invalid_service_is_skipped_and_others_sync() -> None:
    st, snap = _store()
    bad = svc("bad", ips=("10.96.0.999",))
    st.apply([Event("ADDED", "Service", bad), Event("ADDED", "Service", svc())])
    ch = snap.update()
    assert {s.name for s in ch.changed} == {"web"}
    assert "invalid IP" in st.invalid[("Service", "default/bad")].reason


def _sp(**kw: object) -> ServicePort:
    return ServicePort(ServicePortName("d", "s", "", "TCP"), ("10.96.0.1",), 80, "TCP", **kw)  # type: ignore[arg-type]


def _eps(st: ClusterStore, items: list[dict]) -> tuple:
    st.apply([Event("ADDED", "Service", svc()), Event("ADDED", "EndpointSlice", eps("web", items))])
    snap = ProxySnapshot(st, "node-a")
    snap.update()
    return next(iter(snap.endpoints.values()))


def test_categorize_terminating_fallback_and_local_policies() -> None:
    all_term = _eps(ClusterStore("node-a"), [ep("10.0.0.1", ready=False, serving=True, terminating=True),
                                             ep("10.0.0.2", ready=False, serving=False, terminating=True)])
    assert [e.ip for e in categorize(_sp(), all_term).internal] == ["10.0.0.1"]
    mixed = _eps(ClusterStore("node-a"), [ep("10.0.0.1"), ep("10.0.0.2", node="node-b")])
    c = categorize(_sp(internal_local=True), mixed)
    assert [e.ip for e in c.internal] == ["10.0.0.1"]
    c = categorize(_sp(external_local=True, node_port=30000), mixed)
    assert [e.ip for e in c.internal] == ["10.0.0.1", "10.0.0.2"]
    assert [e.ip for e in c.external] == ["10.0.0.1"]


def test_categorize_topology_hints() -> None:
    hinted = _eps(ClusterStore("node-a"), [ep("10.0.0.1", zones=("a",)), ep("10.0.0.2", zones=("b",))])
    assert [e.ip for e in categorize(_sp(), hinted, node_zone="a").internal] == ["10.0.0.1"]
    # one endpoint without hints disables topology for the Service
    partial = _eps(ClusterStore("node-a"), [ep("10.0.0.1", zones=("a",)), ep("10.0.0.2")])
    assert len(categorize(_sp(), partial, node_zone="a").internal) == 2


def test_has_any_endpoints_distinguishes_drop_from_reject() -> None:
    remote_only = _eps(ClusterStore("node-a"), [ep("10.0.0.1", node="node-b")])
    c = categorize(_sp(internal_local=True), remote_only)
    assert not c.internal and not c.reachable and c.has_any  # → DROP "has no local endpoints"
    none_ready = _eps(ClusterStore("node-a"), [ep("10.0.0.1", ready=False, serving=False)])
    assert not categorize(_sp(internal_local=True), none_ready).has_any  # → REJECT "has no endpoints"


def _reference_endpoints(st: ClusterStore, key: tuple[str, str], node: str) -> dict:
    """The merge rule stated plainly: every (ip, port) once, a ready copy over a not-ready one."""
    merged: dict = {}
    for sl in st.slices_for(key):
        if sl.address_type == "FQDN":
            continue
        for p in sl.ports:
            bucket = merged.setdefault((p.name, p.protocol), {})
            for e in sl.endpoints:
                info = EndpointInfo(e.addresses[0], p.port, e.ready, e.serving, e.terminating,
                                    bool(node) and e.node_name == node, e.node_name, e.zone, e.hint_zones)
                prev = bucket.get((info.ip, info.port))
                if prev is None or (info.ready and not prev.ready):
                    bucket[(info.ip, info.port)] = info
    return {k: tuple(v[x] for x in sorted(v)) for k, v in merged.items()}


def test_service_endpoints_match_the_merge_rule_for_random_slices() -> None:
    rnd = random.Random(7)
    for case in range(300):
        st = ClusterStore("node-a")
        st.apply([Event("ADDED", "Service", svc())])
        for n in range(rnd.choice([1, 1, 2, 3])):
            family = rnd.choice(["IPv4", "IPv4", "IPv6", "FQDN"])
            items = []
            for _ in range(rnd.choice([0, 1, 3, 8])):
                last = rnd.randrange(6)  # few addresses: duplicates within and across slices
                ip = {"IPv4": f"10.0.0.{last}", "IPv6": f"fd00::{last}", "FQDN": f"h{last}.example"}[family]
                items.append(ep(ip, node=rnd.choice(["node-a", "node-b", ""]), ready=rnd.random() < 0.6,
                                terminating=rnd.random() < 0.3, zones=rnd.choice([(), ("z1",)])))
            ports = [{"name": "http", "port": rnd.choice([8080, 8081]), "protocol": "TCP"}]
            if rnd.random() < 0.3:
                ports.append({"name": "dns", "port": 53, "protocol": "UDP"})
            st.apply([Event("ADDED", "EndpointSlice", eps("web", items, name=f"s{n}", ports=ports, family=family))])
        for node in ("node-a", ""):
            got = service_endpoints(st, ("default", "web"), node)
            assert got == _reference_endpoints(st, ("default", "web"), node), f"case {case}"
            assert all(type(e) is EndpointInfo for v in got.values() for e in v)


def test_service_port_name_is_a_plain_key() -> None:
    a = ServicePortName("ns", "web", "http", "TCP")
    assert str(a) == "ns/web:http/TCP" and a.service_key == ("ns", "web")
    assert a == ServicePortName("ns", "web", "http", "TCP") and hash(a) == hash(ServicePortName(*a))
    assert sorted([a, ServicePortName("ns", "web", "b", "TCP")]) == [ServicePortName("ns", "web", "b", "TCP"), a]


def test_recompute_restores_the_garbage_collector() -> None:
    st, snap = _store()
    st.apply([Event("ADDED", "Service", svc()), Event("ADDED", "EndpointSlice", eps("web", [ep("10.244.1.10")]))])
    assert gc.isenabled()
    assert snap.update().changed
    assert gc.isenabled()
    gc.disable()
    try:
        snap.recompute([("default", "web")])
        assert not gc.isenabled()  # a caller that turned it off keeps it off
    finally:
        gc.enable()
