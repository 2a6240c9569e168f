"""Unit tests of the nftables renderer, the committed-state index and the netlink element encoding.

Pure computation, no kernel: the packet-level proof is in test_dataplane.py and the scenario suite.
"""

from __future__ import annotations

import socket
import struct

from kproxy.dataplane.nftables import netlink
from kproxy.dataplane.nftables import render as r
from kproxy.dataplane.nftables.state import Delta, ElementIndex
from kproxy.snapshot import EndpointInfo, ServicePort, ServicePortName

CTX = r.Context(4, 0x4000, False, "ip saddr { 10.244.0.0/16 }", "ip saddr != { 10.244.0.0/16 }")


def sp(name: str = "web", ip: str = "10.96.0.10", **kw: object) -> ServicePort:
    return ServicePort(ServicePortName("default", name, "http", "TCP"), (ip,), 80, "TCP", **kw)  # type: ignore[arg-type]


def eps(*last: int, local: bool = True, **kw: object) -> tuple[EndpointInfo, ...]:
    return tuple(EndpointInfo(f"10.244.1.{i}", 8080, is_local=local, node_name="node-a" if local else "node-b",
                              **kw) for i in last)  # type: ignore[arg-type]


def slots(se: r.ServiceElements, amap: str, key: str) -> list[str]:
    out = []
    k = 0
    while key in se.elements.get(r.ep_map(amap, k), {}):
        out.append(se.elements[r.ep_map(amap, k)][key][3:])
        k += 1
    return out


def test_cluster_ip_elements_and_selection_chain() -> None:
    se = r.render_service(sp(), eps(10, 11, 12), CTX)
    key = "10.96.0.10 . tcp . 80"
    assert se.elements[r.SVC][key] == ' comment "default/web:http/TCP ClusterIP" : goto c-3'
    assert slots(se, "e", key) == ["10.244.1.10 . 8080", "10.244.1.11 . 8080", "10.244.1.12 . 8080"]
    assert set(se.elements[r.HAIRPIN]) == {f"10.244.1.{i} . 10.244.1.{i}" for i in (10, 11, 12)}
    assert r.NO_EP not in se.elements
    assert se.chains == {"c-3", "d0-e", "d1-e", "d2-e"}
    rules = r.chain_rules("c-3", CTX)
    assert rules == ["ip saddr != { 10.244.0.0/16 } meta mark set meta mark | 0x4000",
                     "numgen random mod 3 vmap { 0 : jump d0-e, 1 : jump d1-e, 2 : jump d2-e }"]
    assert r.chain_rules("d1-e", CTX) == [
        "meta l4proto { tcp, udp, sctp } dnat ip to ip daddr . meta l4proto . th dport map @ep-e-1"]


def test_no_endpoints_reject_and_policy_drop() -> None:
    se = r.render_service(sp(), (), CTX)
    assert se.elements[r.NO_EP]["10.96.0.10 . tcp . 80"].endswith(": goto reject-chain")
    assert r.SVC not in se.elements
    # internalTrafficPolicy Local with endpoints only elsewhere: DROP (kube-proxy's hasAnyEndpoints)
    se = r.render_service(sp(internal_local=True), eps(10, 11, local=False), CTX)
    assert se.elements[r.NO_EP]["10.96.0.10 . tcp . 80"].endswith(": drop")


def test_external_local_policy_uses_local_endpoints_and_short_circuit() -> None:
    s = sp(node_port=30080, external_ips=("203.0.113.50",), external_local=True)
    mixed = eps(10) + eps(11, 12, local=False)
    se = r.render_service(s, mixed, CTX)
    assert se.elements[r.NODEPORTS]["tcp . 30080"].endswith("goto nl-1")
    assert slots(se, "n", "tcp . 30080") == ["10.244.1.10 . 8080"]
    assert se.elements[r.NODEPORTS_SC]["tcp . 30080"].endswith("goto ns-3")
    assert len(slots(se, "ns", "tcp . 30080")) == 3
    assert se.elements[r.SVC]["203.0.113.50 . tcp . 80"].endswith("goto l-1")
    assert se.elements[r.SVC_SC]["203.0.113.50 . tcp . 80"].endswith("goto s-3")
    assert se.elements[r.SVC]["10.96.0.10 . tcp . 80"].endswith("goto c-3")
    # hairpin only for endpoints on this node
    assert set(se.elements[r.HAIRPIN]) == {"10.244.1.10 . 10.244.1.10"}
    assert r.chain_rules("x-2", CTX)[0] == "meta mark set meta mark | 0x4000"
    assert r.chain_rules("s-2", CTX)[0] == "fib saddr type local meta mark set meta mark | 0x4000"
    assert not any("mark" in rule for rule in r.chain_rules("l-2", CTX))


def test_affinity_uses_slot_sets_with_timeout() -> None:
    se = r.render_service(sp(affinity_timeout=300), eps(10, 11), CTX)
    assert se.elements[r.SVC]["10.96.0.10 . tcp . 80"].endswith("goto c-2-a300")
    assert {"aff-0", "aff-1", "ep-e-0", "ep-e-1"} <= se.sets
    rules = r.chain_rules("c-2-a300", CTX)
    assert "ip saddr . ip daddr . meta l4proto . th dport @aff-1 jump a1-300-e" in rules
    assert r.chain_rules("a1-300-e", CTX)[0] == \
        "update @aff-1 { ip saddr . ip daddr . meta l4proto . th dport timeout 300s }"


def test_stable_slots_keep_survivors_in_place() -> None:
    key = "10.96.0.10 . tcp . 80"
    before = r.render_service(sp(), eps(10, 11, 12, 13), CTX)
    after = r.render_service(sp(), eps(10, 12, 13), CTX, before)  # .11 (slot 1) goes
    assert slots(after, "e", key) == ["10.244.1.10 . 8080", "10.244.1.13 . 8080", "10.244.1.12 . 8080"]
    grown = r.render_service(sp(), eps(10, 12, 13, 14), CTX, after)
    assert slots(grown, "e", key)[:3] == slots(after, "e", key)
    assert slots(grown, "e", key)[3] == "10.244.1.14 . 8080"


def test_index_partial_delta_is_minimal() -> None:
    idx = ElementIndex()
    services = {ServicePortName("default", f"s{i}", "http", "TCP"): sp(f"s{i}", f"10.96.0.{i + 1}")
                for i in range(50)}
    for spn, s in services.items():
        idx.load(spn, r.render_service(s, eps(10, 11, 12, 13, 14, 15, 16, 17, 18, 19), CTX))
    idx.end_load()
    spn = next(iter(services))
    old = idx.by_owner[spn]
    delta = Delta()
    idx.replace(spn, r.render_service(services[spn], eps(10, 11, 12, 13, 14, 15, 16, 17, 18), CTX, old), delta)
    # one endpoint fewer: the last slot goes and the verdict points at the 9-endpoint chain
    assert delta.deletes == {"ep-e-9": {"10.96.0.1 . tcp . 80"}, r.SVC: {"10.96.0.1 . tcp . 80"}}
    assert set(delta.adds) == {r.SVC}
    assert "c-9" in idx.live_chains() and "c-10" in idx.live_chains()  # c-10 still used by the others
    # the shared hairpin entry of .19 stays while other services still use it
    assert "10.244.1.19 . 10.244.1.19" in idx.current[r.HAIRPIN]


def test_index_duplicate_frontend_survives_one_removal() -> None:
    idx = ElementIndex()
    a, b = ServicePortName("default", "a", "http", "TCP"), ServicePortName("default", "b", "http", "TCP")
    idx.load(a, r.render_service(sp("a"), eps(10), CTX))
    idx.load(b, r.render_service(sp("b"), eps(11), CTX))  # the same VIP:port (invalid, but it happens)
    idx.end_load()
    key = "10.96.0.10 . tcp . 80"
    assert idx.current["ep-e-0"][key] == " : 10.244.1.10 . 8080"
    delta = Delta()
    idx.replace(a, None, delta)
    assert idx.current["ep-e-0"][key] == " : 10.244.1.11 . 8080"
    assert delta.adds["ep-e-0"] == {key: " : 10.244.1.11 . 8080"}
    delta = Delta()
    idx.replace(b, None, delta)
    assert key not in idx.current["ep-e-0"] and key in delta.deletes["ep-e-0"]


def test_netlink_encoding() -> None:
    v = netlink.encode_value("10.96.0.10 . tcp . 80")
    assert v == socket.inet_aton("10.96.0.10") + bytes((6, 0, 0, 0)) + struct.pack(">H", 80) + b"\0\0"
    v6 = netlink.encode_value("fd00::1 . udp . 53")
    assert v6 == socket.inet_pton(socket.AF_INET6, "fd00::1") + bytes((17, 0, 0, 0)) + b"\x00\x35\0\0"
    elem = netlink.encode_element("tcp . 30080", ' comment "ns/x:p/TCP NodePort" : goto nx-3')
    ln, kind = struct.unpack_from("=HH", elem)
    assert ln == len(elem) and kind == netlink.NFTA_LIST_ELEM | netlink.NLA_F_NESTED
    assert b"nx-3\0" in elem and b"ns/x:p/TCP NodePort\0" in elem
    # every attribute is 4-byte aligned, as the kernel's nla_parse requires
    assert len(elem) % 4 == 0


def _reference_element(key: str, tail: str) -> bytes:
    """encode_element as composed from its parts (the per-element path the batch loop inlines)."""
    kb = netlink._key_block(key)
    tb = netlink._encode_tail(tail) if tail else b""
    return struct.pack("=HH", 4 + len(kb) + len(tb), netlink.NFTA_LIST_ELEM | netlink.NLA_F_NESTED) + kb + tb


def test_batch_encoding_matches_the_per_element_encoding() -> None:
    items = [
        ("10.96.0.10 . tcp . 80", " : 10.244.1.10 . 8080"),  # endpoint (the inlined fast path)
        ("10.96.0.10 . tcp . 80", " : 10.244.1.11 . 8080"),  # same key again (cached prefix)
        ("fd00::10 . udp . 53", " : fd01::5 . 5353"),  # IPv6 endpoint
        ("tcp . 30080", " : 10.244.1.12 . 9000"),  # NodePort key
        ("10.96.0.10 . tcp . 80", ' comment "default/web:http/TCP ClusterIP" : goto c-3'),
        ("10.96.0.11 . tcp . 80", ' comment "default/x:http/TCP ClusterIP" : goto reject-chain'),
        ("10.96.0.12 . sctp . 80", ' comment "default/y:http/SCTP ClusterIP" : drop'),
        ("10.96.0.13 . tcp . 80", " : goto c-2"),
        ("10.244.1.10 . 10.244.1.10", ""),  # hairpin: a set element without data
    ]
    assert netlink.encode_elements(items) == [_reference_element(k, t) for k, t in items]
    assert netlink.encode_element(*items[0]) == _reference_element(*items[0])
    # the endpoint value as the kernel stores it: address, then the port in a 32-bit register
    assert netlink.encode_elements(items[:1])[0].endswith(socket.inet_aton("10.244.1.10") + b"\x1f\x90\0\0")
    batch = netlink.Batch(4, r.TABLE)
    batch.add("ep-e-0", items[:2])
    batch.delete("svc", ["10.96.0.10 . tcp . 80"])
    assert batch.elements == 3
    assert netlink.encode_elements([("10.96.0.10 . tcp . 80", "")])[0] in batch.msgs[1][1]


def test_batch_encoding_rejects_what_the_per_element_encoding_rejects() -> None:
    for tail in (" : 10.244.1.300 . 8080", " : 10.244.1.1 . 70000", " : frob"):
        for encode in (lambda t: netlink.encode_elements([("10.96.0.10 . tcp . 80", t)]),
                       lambda t: _reference_element("10.96.0.10 . tcp . 80", t)):
            try:
                encode(tail)
            except (OSError, ValueError, struct.error):
                continue
            raise AssertionError(f"{tail!r} was encoded")


def test_bulk_load_counts_chains_and_sets_like_incremental_claims() -> None:
    services = {ServicePortName("default", f"s{i}", "http", "TCP"):
                sp(f"s{i}", f"10.96.0.{i + 1}", affinity_timeout=60 if i % 3 == 0 else 0, node_port=30000 + i)
                for i in range(30)}
    rendered = {spn: r.render_service(s, eps(*range(10, 10 + i % 5)), CTX) for i, (spn, s) in
                enumerate(services.items())}
    bulk, incremental = ElementIndex(), ElementIndex()
    for spn, se in rendered.items():
        bulk.load(spn, se)
        incremental.replace(spn, se, Delta())
    bulk.end_load()
    assert +bulk.chains == +incremental.chains and +bulk.sets == +incremental.sets
    assert bulk.current == {s: e for s, e in incremental.current.items() if e or s in bulk.current}
    assert "aff-0" in bulk.live_sets() and "c-4-a60" in bulk.live_chains()
    # service ports of one shape share their chain and set collections
    a, b = rendered[ServicePortName("default", "s1", "http", "TCP")], \
        rendered[ServicePortName("default", "s11", "http", "TCP")]
    assert a.chains is b.chains and a.sets is b.sets
