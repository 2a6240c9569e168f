"""Golden tests of the ebpf mode's desired map state (pure: no kernel)."""

from __future__ import annotations

from kproxy.dataplane.ebpf import maps as m
from kproxy.dataplane.ebpf.render import Backend, render
from kproxy.snapshot import EndpointInfo, ServicePort, ServicePortName

SPN = ServicePortName("default", "web", "http", "TCP")


def sp(**kw) -> ServicePort:
    base = {"spn": SPN, "cluster_ips": ("10.96.0.10",), "port": 80, "protocol": "TCP"}
    return ServicePort(**{**base, **kw})


def ep(ip: str, local: bool = True, **kw) -> EndpointInfo:
    return EndpointInfo(ip=ip, port=8080, is_local=local, **kw)


def frontends(d) -> set[tuple]:
    out = set()
    for fe in d.frontends:
        k = m.parse_svc_key(fe.key)
        out.add((m.KIND_NAMES[k.kind], k.addr, k.port, fe.set_name.rsplit("|", 1)[1], fe.flags))
    return out


def test_cluster_ip_only():
    d = render(sp(), (ep("10.244.1.10"), ep("10.244.1.11", ready=False, serving=False)))
    assert d.sets == {"default/web:http/TCP|4|i": (Backend("10.244.1.10", 8080, True),)}
    assert frontends(d) == {("socket", "10.96.0.10", 80, "i", m.FE_CLUSTER_IP),
                            ("tc", "10.96.0.10", 80, "i", m.FE_CLUSTER_IP | m.F_SNAT)}


def test_nodeport_external_local_uses_local_endpoints_without_snat_from_outside():
    d = render(sp(node_port=30080, external_local=True), (ep("10.244.1.10"), ep("10.244.2.10", local=False)))
    both = (Backend("10.244.1.10", 8080, True), Backend("10.244.2.10", 8080, False))
    assert d.sets == {"default/web:http/TCP|4|i": both, "default/web:http/TCP|4|e": both[:1]}
    fes = frontends(d)
    # pods on the node reach the NodePort with every endpoint (kube-proxy's short-circuit), outside only local
    assert ("socket-nodeport", "", 30080, "i", m.FE_NODE_PORT) in fes
    assert ("tc-nodeport", "", 30080, "e", m.FE_NODE_PORT) in fes


def test_internal_local_and_external_ips():
    d = render(sp(internal_local=True, external_ips=("192.0.2.7",), lb_ips=("192.0.2.8",)),
               (ep("10.244.1.10"), ep("10.244.2.10", local=False)))
    assert d.sets["default/web:http/TCP|4|i"] == (Backend("10.244.1.10", 8080, True),)
    assert len(d.sets["default/web:http/TCP|4|c"]) == 2
    fes = frontends(d)
    assert ("socket", "192.0.2.7", 80, "c", m.FE_EXTERNAL_IP) in fes
    assert ("tc", "192.0.2.8", 80, "c", m.FE_LB_IP | m.F_SNAT) in fes  # external set == cluster set: shared


def test_terminating_fallback_and_affinity():
    d = render(sp(affinity_timeout=600), (ep("10.244.1.10", ready=False, serving=True, terminating=True),
                                          ep("10.244.1.11", ready=False, serving=False, terminating=True)))
    assert d.sets == {"default/web:http/TCP|4|i": (Backend("10.244.1.10", 8080, True),)}
    assert d.affinity_timeout == 600


def test_dual_stack_and_no_endpoints():
    d = render(sp(cluster_ips=("10.96.0.10", "fd00:10:96::10"), node_port=30080), ())
    assert d.sets == {"default/web:http/TCP|4|i": (), "default/web:http/TCP|6|i": ()}
    fams = {m.parse_svc_key(fe.key).family for fe in d.frontends}
    assert fams == {4, 6}


def test_key_encoding_round_trip():
    k = m.svc_key("fd00:10:96::10", 53, "UDP", m.KIND_SOCK, 6)
    assert len(k) == m.MAPS["kp_svc"][0]
    assert m.parse_svc_key(k) == m.SvcKey("fd00:10:96::10", 53, "UDP", m.KIND_SOCK, 6)
    assert m.parse_be_val(m.be_val("10.244.1.10", 8080, True)) == ("10.244.1.10", 8080, True)
    assert len(m.member_key(1, "10.0.0.1", 1)) == m.MAPS["kp_member"][0]
