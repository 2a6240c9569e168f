"""Property: after any sequence of store events, the incrementally maintained table equals a table built
from scratch from the same store (answers byte for byte, apart from the SOA serial; same names)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.dns.table import Table
from kproxy.dns.zone import ClusterZone
from kproxy.store import ClusterStore, Event

NAMES = ["a", "b", "c", "kube-dns"]
NAMESPACES = ["default", "kube-system"]
IPS = [f"10.244.0.{i}" for i in range(1, 6)] + ["fd00::1", "fd00::2"]


@st.composite
def service(draw: Any) -> dict[str, Any]:
    name, ns = draw(st.sampled_from(NAMES)), draw(st.sampled_from(NAMESPACES))
    kind = draw(st.sampled_from(["ClusterIP", "headless", "NodePort", "ExternalName"]))
    ports = [{"name": n, "port": p, "nodePort": 30000 + p} for n, p in
             draw(st.lists(st.sampled_from([("http", 80), ("grpc", 90)]), min_size=1, max_size=2, unique=True))]
    spec: dict[str, Any] = {"ports": ports}
    if kind == "ExternalName":
        spec.update(type="ExternalName", externalName=draw(st.sampled_from(["www.example.com", "a.default.svc.z"])))
    elif kind == "headless":
        spec.update(clusterIP="None", publishNotReadyAddresses=draw(st.booleans()))
    else:
        spec.update(type=kind, clusterIPs=[draw(st.sampled_from(["10.96.0.1", "10.96.0.2", "10.96.0.3"]))])
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec}


@st.composite
def endpoint_slice(draw: Any) -> dict[str, Any]:
    svc, ns = draw(st.sampled_from(NAMES)), draw(st.sampled_from(NAMESPACES))
    v6 = draw(st.booleans())
    pool = [ip for ip in IPS if (":" in ip) == v6]
    eps = [{"addresses": [ip], "conditions": {"ready": draw(st.booleans())},
            **({"hostname": draw(st.sampled_from(["h0", "h1"]))} if draw(st.booleans()) else {})}
           for ip in draw(st.lists(st.sampled_from(pool), max_size=3, unique=True))]
    return {"metadata": {"name": f"{svc}-{'v6' if v6 else 'v4'}-{draw(st.integers(0, 1))}", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv6" if v6 else "IPv4", "endpoints": eps,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


@st.composite
def node(draw: Any) -> dict[str, Any]:
    return {"metadata": {"name": draw(st.sampled_from(["n1", "n2"]))},
            "status": {"addresses": [{"type": "InternalIP", "address": draw(st.sampled_from(["192.0.2.1",
                                                                                           "192.0.2.2"]))}]}}


events = st.one_of(
    st.tuples(st.sampled_from(["MODIFIED", "DELETED"]), st.just("Service"), service()),
    st.tuples(st.sampled_from(["MODIFIED", "DELETED"]), st.just("EndpointSlice"), endpoint_slice()),
    st.tuples(st.sampled_from(["MODIFIED", "DELETED"]), st.just("Node"), node()),
)


def _comparable(t: Table) -> tuple[dict[bytes, Any], dict[bytes, int], dict[bytes, bytes]]:
    answers = {k: v for k, v in t.answers.items() if not k.endswith(b"\x00\x06")}  # SOA carries the serial
    return answers, dict(t.names), dict(t.cnames)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(events, min_size=1, max_size=4), min_size=1, max_size=8))
def test_incremental_equals_fresh(batches: list[list[tuple[str, str, dict[str, Any]]]]) -> None:
    store = ClusterStore()
    zone = ClusterZone(store, zone="z")
    for batch in batches:
        store.apply([Event(t, k, o) for t, k, o in batch])
        zone.sync()
    fresh = ClusterZone(store, zone="z", consumer="fresh")
    fresh.sync()
    inc, new = _comparable(zone.table), _comparable(fresh.table)
    assert inc[1] == new[1], "existing names differ"
    assert inc[2] == new[2], "CNAMEs differ"
    assert set(inc[0]) == set(new[0]), "answer keys differ"
    for k in inc[0]:
        assert inc[0][k] == new[0][k], k
