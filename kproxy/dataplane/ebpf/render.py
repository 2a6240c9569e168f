"""Desired eBPF load-balancer state of one service port: backend sets and the frontends that use them.

Pure computation over the snapshot (no kernel). Each service port and family yields up to three backend
sets, named ``"<spn>|<family>|<role>"``:

- ``i`` (internal): ClusterIP traffic, honouring internalTrafficPolicy;
- ``e`` (external): NodePort / externalIP / LB IP traffic from outside the node (tc), honouring
  externalTrafficPolicy;
- ``c`` (cluster): externalIPs / LB IPs / NodePorts reached from a pod's socket: like kube-proxy's
  short-circuit of pod traffic to external destinations, it uses every cluster endpoint.

A role whose endpoints equal another's reuses that set (most Services have a single set). Frontends
reached from outside carry ``F_SNAT`` unless externalTrafficPolicy is Local (kube-proxy's masquerade).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ...model import family_of
from ...snapshot import EndpointInfo, ServicePort, categorize
from . import maps as m


@dataclass(frozen=True, slots=True)
class Backend:
    ip: str
    port: int
    local: bool = False


@dataclass(frozen=True, slots=True)
class Frontend:
    key: bytes  # encoded svc map key
    set_name: str
    flags: int


@dataclass(slots=True)
class Desired:
    sets: dict[str, tuple[Backend, ...]]
    frontends: list[Frontend]
    affinity_timeout: int
    src_ranges: dict[str, tuple[str, ...]] = field(default_factory=dict)  # set name -> loadBalancerSourceRanges


def set_name(group: str, family: int, role: str) -> str:
    return f"{group}|{family}|{role}"


def group_of(name: str) -> str:
    return name.rsplit("|", 2)[0]


def _backends(eps: tuple[EndpointInfo, ...]) -> tuple[Backend, ...]:
    return tuple(sorted({Backend(e.ip, e.port, e.is_local) for e in eps}, key=lambda b: (b.ip, b.port)))


def render(sp: ServicePort, eps: tuple[EndpointInfo, ...], node_zone: str = "") -> Desired:
    group = str(sp.spn)
    sets: dict[str, tuple[Backend, ...]] = {}
    fes: list[Frontend] = []
    ranges: dict[str, tuple[str, ...]] = {}
    for fam in (4, 6):
        eps_f = tuple(e for e in eps if family_of(e.ip) == fam)
        cip = sp.cluster_ip(fam)
        ext_vips = sp.external_vips(fam)
        if not cip and not ext_vips:  # a NodePort serves only the families the Service has
            continue
        cat = categorize(sp, eps_f, node_zone)
        by_backends: dict[tuple[Backend, ...], str] = {}

        def use(role: str, backends: tuple[Backend, ...], _f: int = fam,
                _by: dict[tuple[Backend, ...], str] = by_backends) -> str:
            if backends in _by:
                return _by[backends]
            name = set_name(group, _f, role)
            sets[name] = backends
            _by[backends] = name
            return name

        if cip:
            name_i = use("i", _backends(cat.internal))
            drop = m.F_DROP if not cat.internal and cat.has_any else 0
            fes.append(Frontend(m.svc_key(cip, sp.port, sp.protocol, m.KIND_SOCK, fam), name_i,
                                m.FE_CLUSTER_IP | drop))
            fes.append(Frontend(m.svc_key(cip, sp.port, sp.protocol, m.KIND_TC, fam), name_i,
                                m.FE_CLUSTER_IP | m.F_SNAT))
        if ext_vips or sp.node_port:
            if sp.uses_local:
                anyw = categorize(replace(sp, internal_local=False, external_local=False), eps_f, node_zone)
                cluster = _backends(anyw.internal)
            else:
                cluster = _backends(cat.internal)
            name_c = use("c", cluster)
            name_e = use("e", _backends(cat.external))
            snat = 0 if sp.external_local else m.F_SNAT
            fam_ranges = tuple(r for r in sp.lb_source_ranges if family_of(r) == fam)
            for vip in ext_vips:
                flag = m.FE_LB_IP if vip in sp.lb_ips else m.FE_EXTERNAL_IP
                fes.append(Frontend(m.svc_key(vip, sp.port, sp.protocol, m.KIND_SOCK, fam), name_c, flag))
                tc_flag = flag | snat
                if flag == m.FE_LB_IP and fam_ranges:  # kube-proxy filters the ranges per family too
                    tc_flag |= m.F_SRC_RANGES
                    ranges[name_e] = fam_ranges
                fes.append(Frontend(m.svc_key(vip, sp.port, sp.protocol, m.KIND_TC, fam), name_e, tc_flag))
            if sp.node_port:
                fes.append(Frontend(m.svc_key("", sp.node_port, sp.protocol, m.KIND_SOCK_NP, fam), name_c,
                                    m.FE_NODE_PORT))
                fes.append(Frontend(m.svc_key("", sp.node_port, sp.protocol, m.KIND_NODEPORT, fam), name_e,
                                    m.FE_NODE_PORT | snat))
    return Desired(sets, fes, sp.affinity_timeout, ranges)
