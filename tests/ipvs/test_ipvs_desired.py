"""Pure tests of the IPVS mode's desired state, rules and message encoding (run on the host)."""

from __future__ import annotations

import socket
import struct

from core.objs import ep, eps, svc  # the shared API-shaped builders (tests/ is on sys.path)

from kproxy.dataplane.ipvs import desired as d
from kproxy.dataplane.ipvs import ipsets, netlink, rules
from kproxy.snapshot import ProxySnapshot, ServicePortName
from kproxy.store import ClusterStore, Event

WEB = ServicePortName("default", "web", "http", "TCP")
NODE_IPS = ["10.244.1.1", "203.0.113.1"]


def _snap(*objs: tuple[str, dict]) -> ProxySnapshot:
    st = ClusterStore("node-a")
    snap = ProxySnapshot(st, "node-a")
    st.apply([Event("ADDED", kind, obj) for kind, obj in objs])
    snap.update()
    return snap


def _state(snap: ProxySnapshot, spn: ServicePortName = WEB, scheduler: str = "rr") -> d.PortState:
    return d.compute(snap.services[spn], snap.endpoints.get(spn, ()), scheduler, NODE_IPS)


def test_cluster_ip_virtual_server_with_masq_real_servers() -> None:
    snap = _snap(("Service", svc()), ("EndpointSlice", eps("web", [ep("10.244.1.10"), ep("10.244.1.11")])))
    st = _state(snap)
    key = netlink.VSKey("TCP", "10.96.0.10", 80)
    assert list(st.servers) == [key]
    vs = st.servers[key]
    assert (vs.scheduler, vs.flags, vs.timeout, vs.kind) == ("rr", 0, 0, "ClusterIP")
    assert vs.dests == {("10.244.1.10", 8080): 1, ("10.244.1.11", 8080): 1}
    assert st.vips == {"10.96.0.10"}
    assert (d.CLUSTER_IP, "10.96.0.10,tcp:80") in st.members
    assert (d.IPVS_IPS, "10.96.0.10") in st.members
    assert (d.LOOP_BACK, "10.244.1.10,tcp:8080,10.244.1.10") in st.members


def test_nodeport_external_ip_and_load_balancer() -> None:
    s = svc(type="LoadBalancer", ports=[{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}],
            externalIPs=["198.51.100.10"], loadBalancerSourceRanges=["192.0.2.0/24"])
    s["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.20"}]}}
    snap = _snap(("Service", s), ("EndpointSlice", eps("web", [ep("10.244.1.10")])))
    st = _state(snap)
    kinds = {k: v.kind for k, v in st.servers.items()}
    assert kinds == {
        netlink.VSKey("TCP", "10.96.0.10", 80): "ClusterIP",
        netlink.VSKey("TCP", "198.51.100.10", 80): "ExternalIP",
        netlink.VSKey("TCP", "198.51.100.20", 80): "LoadBalancer",
        netlink.VSKey("TCP", "10.244.1.1", 30080): "NodePort",
        netlink.VSKey("TCP", "203.0.113.1", 30080): "NodePort",
    }
    assert st.vips == {"10.96.0.10", "198.51.100.10", "198.51.100.20"}  # node IPs are not put on kube-ipvs0
    assert ("KUBE-NODE-PORT-TCP", "30080") in st.members
    assert (d.EXTERNAL_IP, "198.51.100.10,tcp:80") in st.members
    assert (d.LOAD_BALANCER_FW, "198.51.100.20,tcp:80") in st.members
    assert (d.LOAD_BALANCER_SOURCE_CIDR, "198.51.100.20,tcp:80,192.0.2.0/24") in st.members


def test_external_local_uses_local_endpoints_only_for_external_traffic() -> None:
    s = svc(type="NodePort", externalTrafficPolicy="Local",
            ports=[{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}])
    snap = _snap(("Service", s), ("EndpointSlice", eps("web", [ep("10.244.1.10"), ep("10.244.2.10", node="b")])))
    st = _state(snap)
    assert st.servers[netlink.VSKey("TCP", "10.96.0.10", 80)].dests.keys() == {("10.244.1.10", 8080),
                                                                               ("10.244.2.10", 8080)}
    assert st.servers[netlink.VSKey("TCP", "203.0.113.1", 30080)].dests.keys() == {("10.244.1.10", 8080)}
    assert ("KUBE-NODE-PORT-LOCAL-TCP", "30080") in st.members
    assert ("KUBE-NODE-PORT-TCP", "30080") not in st.members


def test_internal_local_and_terminating_endpoints() -> None:
    snap = _snap(("Service", svc(internalTrafficPolicy="Local")),
                 ("EndpointSlice", eps("web", [ep("10.244.1.10", ready=False, serving=True, terminating=True),
                                               ep("10.244.1.11"), ep("10.244.2.10", node="b")])))
    vs = _state(snap).servers[netlink.VSKey("TCP", "10.96.0.10", 80)]
    assert vs.dests == {("10.244.1.11", 8080): 1}  # the terminating local endpoint is not scheduled


def test_affinity_and_schedulers() -> None:
    s = svc(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    s["metadata"]["annotations"] = {"kproxy.io/ipvs-scheduler": "sh"}
    snap = _snap(("Service", s), ("EndpointSlice", eps("web", [ep("10.244.1.10")])))
    vs = _state(snap, scheduler="wrr").servers[netlink.VSKey("TCP", "10.96.0.10", 80)]
    assert vs.scheduler == "sh"
    assert vs.flags & netlink.SVC_F_PERSISTENT and vs.timeout == 60
    assert vs.flags & netlink.SVC_F_SCHED1  # sh falls back past weight-0 (draining) real servers
    s["metadata"]["annotations"] = {"kproxy.io/ipvs-scheduler": "bogus"}
    snap = _snap(("Service", s))
    assert _state(snap, scheduler="lc").servers[netlink.VSKey("TCP", "10.96.0.10", 80)].scheduler == "lc"


def test_dual_stack_sets_and_node_port_addresses() -> None:
    s = svc(ips=("10.96.0.10", "fd00:10:96::10"), ipFamilies=["IPv4", "IPv6"])
    snap = _snap(("Service", s), ("EndpointSlice", eps("web", [ep("10.244.1.10")])),
                 ("EndpointSlice", eps("web", [ep("fd00:10:244:1::10")], name="web-v6", family="IPv6")))
    st = _state(snap)
    v6 = st.servers[netlink.VSKey("TCP", "fd00:10:96::10", 80)]
    assert v6.dests == {("fd00:10:244:1::10", 8080): 1}
    assert ("KUBE-6-CLUSTER-IP", "fd00:10:96::10,tcp:80") in st.members
    assert d.node_port_addresses(["127.0.0.1", "10.0.0.5", "fe80::1", "2001:db8::5"], ()) == ["10.0.0.5",
                                                                                               "2001:db8::5"]
    assert d.node_port_addresses(["10.0.0.5", "192.168.1.5"], ("192.168.0.0/16",)) == ["192.168.1.5"]


def test_fixed_rules_do_not_depend_on_services() -> None:
    text = rules.render(4, "0x4000", ("10.244.0.0/16",), False)
    assert rules.rule_count(text) < 50
    assert "-A KPROXY-IPVS-CLUSTER-IP -s 10.244.0.0/16 -j RETURN" in text
    assert "--match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE" in text
    assert "--match-set KUBE-IPVS-IPS dst" in text
    assert ":KPROXY-" + "SERVICES" not in text  # never the iptables mode's chains
    v6 = rules.render(6, "0x4000", ("10.244.0.0/16", "fd00::/64"), False)
    assert "KUBE-6-CLUSTER-IP" in v6 and "-s fd00::/64" in v6 and "10.244.0.0/16" not in v6
    every = rules.render(4, "0x4000", (), True)
    assert f"-A {rules.CLUSTER_IP} -j {rules.MARK_MASQ}" in every


def test_ipset_names_and_create_lines() -> None:
    names = dict(d.all_set_names())
    assert names["KUBE-CLUSTER-IP"] == 4 and names["KUBE-6-CLUSTER-IP"] == 6
    assert "KUBE-6-NODE-PORT-TCP" not in names  # bitmap:port sets are family-less
    assert all(len(n) <= 31 for n in names), [n for n in names if len(n) > 31]
    assert ipsets.create_line("KUBE-6-LOOP-BACK", 6).startswith("create KUBE-6-LOOP-BACK hash:ip,port,ip family inet6")
    assert ipsets.create_line("KUBE-NODE-PORT-UDP", 4) == "create KUBE-NODE-PORT-UDP bitmap:port range 0-65535"
    assert ipsets.normalize("1.2.3.4,tcp:80,10.0.0.1/32") == "1.2.3.4,tcp:80,10.0.0.1"
    assert ipsets.normalize("1.2.3.4,tcp:80,10.0.0.0/8") == "1.2.3.4,tcp:80,10.0.0.0/8"


def test_dest_messages_are_masquerade() -> None:
    raw = netlink.dest_attrs("10.244.1.10", 8080, 1)
    attrs = netlink.parse_attrs(raw[4:])
    assert struct.unpack("=I", attrs[netlink.DEST_FWD])[0] == netlink.FWD_MASQ == 0
    assert struct.unpack("!H", attrs[netlink.DEST_PORT])[0] == 8080
    assert attrs[netlink.DEST_ADDR] == socket.inet_aton("10.244.1.10")
    svc_raw = netlink.service_attrs(netlink.VSKey("UDP", "fd00::1", 53), "rr", 0, 0)
    a = netlink.parse_attrs(svc_raw[4:])
    assert struct.unpack("=H", a[netlink.SVC_AF])[0] == socket.AF_INET6
    assert a[netlink.SVC_SCHED] == b"rr\0"
    assert struct.unpack("=I", a[netlink.SVC_NETMASK])[0] == 128
