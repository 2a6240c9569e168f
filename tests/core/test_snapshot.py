from kproxy.snapshot import ProxySnapshot, ServicePort, ServicePortName, categorize
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
