"""Pure computation of the IPVS data plane's desired state for one service port.

For every service port and IP family this yields the IPVS virtual servers (ClusterIP, externalIPs,
LoadBalancer IPs, one per node address for a NodePort) with their real servers, the addresses that go on
``kube-ipvs0`` and the ipset members the fixed iptables rules match on. No I/O: the proxier diffs these
against the kernel.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from ...config import SCHEDULERS
from ...model import family_of
from ...snapshot import EndpointInfo, ServicePort, ServicePortName, categorize
from .netlink import SVC_F_PERSISTENT, SVC_F_SCHED1, VSKey

log = logging.getLogger(__name__)

# ipset names (kube-proxy's, so operators' runbooks and dashboards carry over); IPv6 sets get "KUBE-6-".
CLUSTER_IP = "KUBE-CLUSTER-IP"
LOOP_BACK = "KUBE-LOOP-BACK"
EXTERNAL_IP = "KUBE-EXTERNAL-IP"
EXTERNAL_IP_LOCAL = "KUBE-EXTERNAL-IP-LOCAL"
LOAD_BALANCER = "KUBE-LOAD-BALANCER"
LOAD_BALANCER_LOCAL = "KUBE-LOAD-BALANCER-LOCAL"
LOAD_BALANCER_FW = "KUBE-LOAD-BALANCER-FW"
LOAD_BALANCER_SOURCE_CIDR = "KUBE-LOAD-BALANCER-SOURCE-CIDR"
NODE_PORT = {"TCP": "KUBE-NODE-PORT-TCP", "UDP": "KUBE-NODE-PORT-UDP", "SCTP": "KUBE-NODE-PORT-SCTP"}
NODE_PORT_LOCAL = {"TCP": "KUBE-NODE-PORT-LOCAL-TCP", "UDP": "KUBE-NODE-PORT-LOCAL-UDP",
                   "SCTP": "KUBE-NODE-PORT-LOCAL-SCTP"}
HEALTH_CHECK_NODE_PORT = "KUBE-HEALTH-CHECK-NODE-PORT"
IPVS_IPS = "KUBE-IPVS-IPS"

# name → (ipset type, comment)
SET_TYPES: dict[str, tuple[str, str]] = {
    CLUSTER_IP: ("hash:ip,port", "Kubernetes service cluster ip + port for masquerade purpose"),
    LOOP_BACK: ("hash:ip,port,ip", "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"),
    EXTERNAL_IP: ("hash:ip,port", "Kubernetes service external ip + port for masquerade and filter purpose"),
    EXTERNAL_IP_LOCAL: ("hash:ip,port", "Kubernetes service external ip + port with externalTrafficPolicy=local"),
    LOAD_BALANCER: ("hash:ip,port", "Kubernetes service lb portal"),
    LOAD_BALANCER_LOCAL: ("hash:ip,port", "Kubernetes service lb ip + port with externalTrafficPolicy=local"),
    LOAD_BALANCER_FW: ("hash:ip,port", "Kubernetes service load balancer ip + port for load balancer with sourceRange"),
    LOAD_BALANCER_SOURCE_CIDR: ("hash:ip,port,net",
                                "Kubernetes service load balancer ip + port + source cidr for packet filter purpose"),
    **{v: ("bitmap:port", "Kubernetes nodeport TCP/UDP/SCTP port for masquerade purpose") for v in NODE_PORT.values()},
    **{v: ("bitmap:port", "Kubernetes nodeport TCP/UDP/SCTP port with externalTrafficPolicy=local")
       for v in NODE_PORT_LOCAL.values()},
    HEALTH_CHECK_NODE_PORT: ("bitmap:port", "Kubernetes health check node port"),
    IPVS_IPS: ("hash:ip", "Kubernetes service virtual IPs on kube-ipvs0"),
}


def set_name(base: str, family: int) -> str:
    """kube-proxy's naming: IPv6 sets are ``KUBE-6-...``; bitmap:port sets are shared by both families."""
    if family == 6 and not SET_TYPES[base][0].startswith("bitmap"):
        name = "KUBE-6-" + base[len("KUBE-"):]
        return name if len(name) <= 31 else name.replace("LOAD-BALANCER", "LB")  # ipset's name limit
    return base


def base_name(name: str) -> str:
    """The family-independent name (a key of SET_TYPES) of one of our sets."""
    if name in SET_TYPES:
        return name
    for base in SET_TYPES:
        if set_name(base, 6) == name:
            return base
    raise KeyError(name)


def all_set_names() -> list[tuple[str, int]]:
    """Every ipset this mode owns: (name, family)."""
    out = [(name, 4) for name in SET_TYPES]
    out += [(set_name(name, 6), 6) for name in SET_TYPES if not SET_TYPES[name][0].startswith("bitmap")]
    return out


@dataclass(slots=True)
class VirtualServer:
    key: VSKey
    scheduler: str
    flags: int
    timeout: int
    dests: dict[tuple[str, int], int]  # (ip, port) → weight
    kind: str  # ClusterIP | NodePort | ExternalIP | LoadBalancer
    spn: ServicePortName | None = None


@dataclass(slots=True)
class PortState:
    """Everything one service port contributes to the kernel."""

    servers: dict[VSKey, VirtualServer] = field(default_factory=dict)
    vips: set[str] = field(default_factory=set)  # addresses on kube-ipvs0
    members: set[tuple[str, str]] = field(default_factory=set)  # (set name, member)


def scheduler_flags(scheduler: str) -> int:
    """sh and mh: fall back to another real server when the chosen one has weight 0 (draining), and hash
    the source port too so one client's connections spread (kube-proxy's ``sh``/``mh`` flag defaults are
    fallback only; with weight-0 graceful termination, fallback is what keeps new connections off it)."""
    if scheduler in ("sh", "mh"):
        return SVC_F_SCHED1
    return 0


def resolve_scheduler(sp: ServicePort, default: str) -> str:
    if sp.scheduler:
        if sp.scheduler in SCHEDULERS:
            return sp.scheduler
        log.warning("%s: unknown IPVS scheduler %r in annotation, using %s", sp.spn, sp.scheduler, default)
    return default


def node_port_addresses(local_addrs: Iterable[str], cidrs: tuple[str, ...]) -> list[str]:
    """The node's addresses that NodePorts listen on (kube-proxy's --nodeport-addresses semantics)."""
    nets = [ipaddress.ip_network(c, strict=False) for c in cidrs if c != "primary"]
    out = []
    for a in local_addrs:
        ip = ipaddress.ip_address(a)
        if ip.is_link_local or (ip.is_loopback and not nets):
            continue
        if nets and not any(ip.version == n.version and ip in n for n in nets):
            continue
        out.append(str(ip))
    return sorted(set(out))


def compute(sp: ServicePort, eps: tuple[EndpointInfo, ...], default_scheduler: str, node_ips: Iterable[str],
            node_zone: str = "", excluded: Iterable[str] = ()) -> PortState:
    """The desired kernel state of one service port (both families it has a cluster IP in)."""
    st = PortState()
    scheduler = resolve_scheduler(sp, default_scheduler)
    flags = scheduler_flags(scheduler)
    timeout = 0
    if sp.affinity_timeout:
        flags |= SVC_F_PERSISTENT
        timeout = sp.affinity_timeout
    proto = sp.protocol.lower()
    node_ips = list(node_ips)
    for cip in sp.cluster_ips:
        fam = family_of(cip)
        cat = categorize(sp, (e for e in eps if e.family == fam), node_zone)

        def dests(chosen: tuple[EndpointInfo, ...]) -> dict[tuple[str, int], int]:
            return {(e.ip, e.port): 1 for e in chosen}

        def add(addr: str, port: int, chosen: tuple[EndpointInfo, ...], kind: str) -> None:
            key = VSKey(sp.protocol, addr, port)
            st.servers[key] = VirtualServer(key, scheduler, flags, timeout, dests(chosen), kind, sp.spn)

        add(cip, sp.port, cat.internal, "ClusterIP")
        st.vips.add(cip)
        st.members.add((set_name(CLUSTER_IP, fam), f"{cip},{proto}:{sp.port}"))
        st.members.add((set_name(IPVS_IPS, fam), cip))
        for e in cat.reachable:
            st.members.add((set_name(LOOP_BACK, fam), f"{e.ip},{proto}:{e.port},{e.ip}"))
        for ip in sp.external_ips:
            if family_of(ip) != fam or ip in excluded:
                continue
            add(ip, sp.port, cat.external, "ExternalIP")
            st.vips.add(ip)
            st.members.add((set_name(EXTERNAL_IP_LOCAL if sp.external_local else EXTERNAL_IP, fam),
                            f"{ip},{proto}:{sp.port}"))
            st.members.add((set_name(IPVS_IPS, fam), ip))
        for ip in sp.lb_ips:
            if family_of(ip) != fam:
                continue
            add(ip, sp.port, cat.external, "LoadBalancer")
            st.vips.add(ip)
            member = f"{ip},{proto}:{sp.port}"
            st.members.add((set_name(LOAD_BALANCER, fam), member))
            st.members.add((set_name(IPVS_IPS, fam), ip))
            if sp.external_local:
                st.members.add((set_name(LOAD_BALANCER_LOCAL, fam), member))
            ranges = [r for r in sp.lb_source_ranges if family_of(r.split("/")[0]) == fam]
            if ranges:
                st.members.add((set_name(LOAD_BALANCER_FW, fam), member))
                for r in ranges:
                    st.members.add((set_name(LOAD_BALANCER_SOURCE_CIDR, fam), f"{member},{r}"))
        if sp.node_port:
            for nip in node_ips:
                if family_of(nip) == fam:
                    add(nip, sp.node_port, cat.external, "NodePort")
            pset = NODE_PORT_LOCAL if sp.external_local else NODE_PORT
            st.members.add((pset[sp.protocol], str(sp.node_port)))
        if sp.health_check_node_port:
            st.members.add((HEALTH_CHECK_NODE_PORT, str(sp.health_check_node_port)))
    return st
