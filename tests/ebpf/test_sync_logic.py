"""The ebpf data plane's map synchronisation against in-memory maps (no kernel): consistency of the
two-phase swap, incremental updates, garbage collection and adoption by a restarted daemon."""

from __future__ import annotations

from kproxy.config import ProxyConfig
from kproxy.dataplane.ebpf import EbpfDataPlane
from kproxy.dataplane.ebpf import maps as m
from kproxy.snapshot import Changes, ProxySnapshot
from kproxy.store import ClusterStore, Event


class FakeMap(dict):
    def put(self, k: bytes, v: bytes) -> None:
        self[k] = v

    def delete(self, k: bytes) -> bool:
        return self.pop(k, None) is not None

    def put_many(self, items: dict) -> None:
        self.update(items)

    def delete_many(self, keys: list) -> int:
        return sum(self.delete(k) for k in keys)

    def keys(self):  # a snapshot, like the real Map
        return iter(list(super().keys()))

    def __iter__(self):
        return self.keys()

    def items(self):
        return iter(list(super().items()))


class FakeMaps:
    def __init__(self) -> None:
        for name in m.MAPS:
            setattr(self, name[3:], FakeMap())  # kp_svc -> .svc, kp_srcrange -> .srcrange

    def close(self) -> None:
        pass


def svc(name: str, ip: str, node_port: int = 0, **spec) -> dict:
    port = {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}
    if node_port:
        port["nodePort"] = node_port
    return {"metadata": {"name": name, "namespace": "default"},
            "spec": {"type": "NodePort" if node_port else "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                     "ports": [port], **spec}}


def eps(name: str, ips: list[str]) -> dict:
    return {"metadata": {"name": name + "-x", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node-a"} for ip in ips]}


def plane(maps: FakeMaps) -> EbpfDataPlane:
    dp = EbpfDataPlane(ProxyConfig())
    dp.maps = maps  # type: ignore[assignment]
    dp._sync_node_addrs = lambda: None  # type: ignore[method-assign]
    dp._adopt()
    return dp


def check_consistent(maps: FakeMaps) -> dict[str, set[tuple[str, int]]]:
    """Every frontend's slots exist; no orphans; returns backends by frontend address."""
    names = {int.from_bytes(k, "little"): m.parse_meta_val(v) for k, v in maps.meta.items()}
    live_slots, out = set(), {}
    for k, v in maps.svc.items():
        set_id, count, aff_id, _, _ = m.parse_svc_val(v)
        assert aff_id in names
        bes = set()
        for s in range(count):
            raw = maps.be[m.be_key(set_id, s)]
            live_slots.add(m.be_key(set_id, s))
            ip, port, _ = m.parse_be_val(raw)
            bes.add((ip, port))
            assert m.member_key(aff_id, ip, port) in maps.member
        key = m.parse_svc_key(k)
        out[f"{m.KIND_NAMES[key.kind]} {key.addr}:{key.port}"] = bes
    assert set(maps.be) == live_slots, "orphan backend slots"
    return out


def test_incremental_updates_and_removal():
    store = ClusterStore("node-a")
    snap = ProxySnapshot(store, "node-a")
    store.apply([Event("ADDED", "Service", svc("a", "10.96.0.1", node_port=30001)),
                 Event("ADDED", "EndpointSlice", eps("a", ["10.244.1.10", "10.244.1.11"])),
                 Event("ADDED", "Service", svc("b", "10.96.0.2", sessionAffinity="ClientIP")),
                 Event("ADDED", "EndpointSlice", eps("b", ["10.244.1.12"]))])
    maps = FakeMaps()
    dp = plane(maps)
    dp.sync(snap, snap.update(), full=True)
    state = check_consistent(maps)
    assert state["socket 10.96.0.1:80"] == {("10.244.1.10", 8080), ("10.244.1.11", 8080)}
    assert state["tc-nodeport :30001"] == state["socket 10.96.0.1:80"]
    aff = m.parse_svc_val(maps.svc[m.svc_key("10.96.0.2", 80, "TCP", m.KIND_SOCK, 4)])
    assert aff[3] == 10800  # sessionAffinity ClientIP default timeout
    old_set = m.parse_svc_val(maps.svc[m.svc_key("10.96.0.1", 80, "TCP", m.KIND_SOCK, 4)])[0]

    store.apply([Event("MODIFIED", "EndpointSlice", eps("a", ["10.244.1.11", "10.244.1.13"]))])
    ch = snap.update()
    res = dp.sync(snap, ch, full=False)
    assert res.services == 1
    state = check_consistent(maps)
    assert state["socket 10.96.0.1:80"] == {("10.244.1.11", 8080), ("10.244.1.13", 8080)}
    new_set = m.parse_svc_val(maps.svc[m.svc_key("10.96.0.1", 80, "TCP", m.KIND_SOCK, 4)])[0]
    assert new_set != old_set  # written under a fresh set id, then switched
    assert m.member_key(m.parse_svc_val(maps.svc[m.svc_key("10.96.0.1", 80, "TCP", m.KIND_SOCK, 4)])[2],
                        "10.244.1.10", 8080) not in maps.member

    store.apply([Event("DELETED", "Service", svc("a", "10.96.0.1"))])
    dp.sync(snap, snap.update(), full=False)
    state = check_consistent(maps)
    assert set(state) == {"socket 10.96.0.2:80", "tc 10.96.0.2:80"}
    assert len(maps.meta) == 1  # only b's set remains named

    # a restarted daemon adopts the maps: a full sync with unchanged state writes nothing
    dp2 = plane(maps)
    res = dp2.sync(snap, Changes(), full=True)
    assert res.rules == 0 and res.services == 0
    check_consistent(maps)


def test_full_sync_collects_garbage_left_by_a_crash():
    store = ClusterStore("node-a")
    snap = ProxySnapshot(store, "node-a")
    store.apply([Event("ADDED", "Service", svc("a", "10.96.0.1")),
                 Event("ADDED", "EndpointSlice", eps("a", ["10.244.1.10"]))])
    maps = FakeMaps()
    dp = plane(maps)
    dp.sync(snap, snap.update(), full=True)
    # a crash between phases leaves slots and members nothing points at, and a stale frontend
    maps.be.put(m.be_key(999, 0), m.be_val("10.244.9.9", 1, False))
    maps.member.put(m.member_key(77, "10.244.9.9", 1), m.be_val("10.244.9.9", 1, False))
    maps.svc.put(m.svc_key("10.96.9.9", 80, "TCP", m.KIND_SOCK, 4), m.svc_val(999, 1, 77, 0, 0))
    dp2 = plane(maps)
    dp2.sync(snap, Changes(), full=True)
    state = check_consistent(maps)
    assert set(state) == {"socket 10.96.0.1:80", "tc 10.96.0.1:80"}
    assert m.member_key(77, "10.244.9.9", 1) not in maps.member


def test_load_balancer_source_ranges_follow_the_service():
    store = ClusterStore("node-a")
    snap = ProxySnapshot(store, "node-a")
    lb = svc("lb", "10.96.0.5", node_port=30005, loadBalancerSourceRanges=["203.0.113.0/24"])
    lb["spec"]["type"] = "LoadBalancer"
    lb["status"] = {"loadBalancer": {"ingress": [{"ip": "192.0.2.9"}]}}
    store.apply([Event("ADDED", "Service", lb), Event("ADDED", "EndpointSlice", eps("lb", ["10.244.1.10"]))])
    maps = FakeMaps()
    dp = plane(maps)
    dp.sync(snap, snap.update(), full=True)
    v = m.parse_svc_val(maps.svc[m.svc_key("192.0.2.9", 80, "TCP", m.KIND_TC, 4)])
    assert v[4] & m.F_SRC_RANGES
    assert set(maps.srcrange) == {m.src_key(v[2], "203.0.113.0/24")}
    lb["spec"]["loadBalancerSourceRanges"] = ["198.51.100.0/24"]
    store.apply([Event("MODIFIED", "Service", lb)])
    dp.sync(snap, snap.update(), full=False)
    assert set(maps.srcrange) == {m.src_key(v[2], "198.51.100.0/24")}
    assert plane(maps).ranges == {v[2]: {"198.51.100.0/24"}}  # adopted after a restart
    store.apply([Event("DELETED", "Service", lb)])
    dp.sync(snap, snap.update(), full=False)
    assert not maps.srcrange and not maps.svc
