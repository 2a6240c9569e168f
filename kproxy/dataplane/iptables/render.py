"""Pure rendering of kube-proxy-style iptables rules for one service port and one IP family.

The layout follows kube-proxy's iptables mode (pkg/proxy/iptables/proxier.go) with a ``KPROXY-`` prefix
so kproxy never touches another proxy's chains:

nat table
  KPROXY-PORTALS       static; hooked from PREROUTING and OUTPUT: ``-j KPROXY-SERVICES``, then the jump(s)
                       to KPROXY-NODEPORTS for local destinations (so Service IPs win over NodePorts)
  KPROXY-SERVICES      one rule per Service VIP:port → SVC / EXT / FW chain (order-independent)
  KPROXY-NODEPORTS     one rule per NodePort → EXT chain
  KPROXY-SVC-<hash>    cluster-wide endpoint selection (statistic random, recent for affinity)
  KPROXY-SVL-<hash>    local-endpoint selection (Local traffic policies)
  KPROXY-EXT-<hash>    external traffic: masquerade decision, then SVC or SVL
  KPROXY-FW-<hash>     loadBalancerSourceRanges filter in front of EXT
  KPROXY-SEP-<hash>    one endpoint: hairpin masquerade mark + DNAT
  KPROXY-MARK-MASQ / KPROXY-POSTROUTING   the masquerade mark and its use
filter table
  KPROXY-SERVICES           REJECT for Service IPs without endpoints
  KPROXY-EXTERNAL-SERVICES  REJECT/DROP for external destinations without (local) endpoints
  KPROXY-NODEPORTS          ACCEPT for health check node ports
  KPROXY-PROXY-FIREWALL     DROP for LoadBalancer traffic not allowed by loadBalancerSourceRanges
  KPROXY-FORWARD            accept marked and established forwarded traffic

Per-service rules in the dispatch chains are order-independent, so a partial sync can add and delete
them with ``-A`` / ``-D`` instead of rewriting chains with tens of thousands of rules.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

from ...model import family_of
from ...snapshot import EndpointInfo, ServicePort, categorize

PREFIX = "KPROXY-"
PORTALS = "KPROXY-PORTALS"
SERVICES = "KPROXY-SERVICES"
NODEPORTS = "KPROXY-NODEPORTS"
EXTERNAL_SERVICES = "KPROXY-EXTERNAL-SERVICES"
PROXY_FIREWALL = "KPROXY-PROXY-FIREWALL"
FORWARD = "KPROXY-FORWARD"
FIREWALL = "KPROXY-FIREWALL"
MARK_MASQ = "KPROXY-MARK-MASQ"
POSTROUTING = "KPROXY-POSTROUTING"

NAT = "nat"
FILTER = "filter"

# (table, chain) of the dispatch chains whose rules are per-service and order-independent
DISPATCH = ((NAT, SERVICES), (NAT, NODEPORTS), (FILTER, SERVICES), (FILTER, EXTERNAL_SERVICES),
            (FILTER, NODEPORTS), (FILTER, PROXY_FIREWALL))

# Static chains and where they are hooked: (table, builtin chain, rule spec to insert at the top).
HOOKS = (
    (NAT, "PREROUTING", ["-m", "comment", "--comment", "kproxy service portals", "-j", PORTALS]),
    (NAT, "OUTPUT", ["-m", "comment", "--comment", "kproxy service portals", "-j", PORTALS]),
    (NAT, "POSTROUTING", ["-m", "comment", "--comment", "kproxy postrouting rules", "-j", POSTROUTING]),
    (FILTER, "INPUT", ["-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
                       "kproxy load balancer firewall", "-j", PROXY_FIREWALL]),
    (FILTER, "INPUT", ["-m", "comment", "--comment", "kproxy health check service ports", "-j", NODEPORTS]),
    (FILTER, "INPUT", ["-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
                       "kproxy external services", "-j", EXTERNAL_SERVICES]),
    (FILTER, "INPUT", ["-j", FIREWALL]),
    (FILTER, "FORWARD", ["-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
                         "kproxy load balancer firewall", "-j", PROXY_FIREWALL]),
    (FILTER, "FORWARD", ["-m", "comment", "--comment", "kproxy forwarding rules", "-j", FORWARD]),
    (FILTER, "FORWARD", ["-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
                         "kproxy service portals", "-j", SERVICES]),
    (FILTER, "FORWARD", ["-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
                         "kproxy external services", "-j", EXTERNAL_SERVICES]),
    (FILTER, "OUTPUT", ["-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
                        "kproxy load balancer firewall", "-j", PROXY_FIREWALL]),
    (FILTER, "OUTPUT", ["-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
                        "kproxy service portals", "-j", SERVICES]),
)


@functools.lru_cache(maxsize=1 << 18)
def chain_hash(*parts: str) -> str:
    """A stable 16-character chain-name suffix: the first 64 bits of sha256, in upper-case hex.

    (kube-proxy uses base32, whose pure-Python encoder costs more than the rest of the rendering at
    100k endpoints.) Cached: unchanged endpoints' names are asked for again on every sync of their Service.
    """
    return hashlib.sha256("".join(parts).encode()).hexdigest()[:16].upper()


@dataclass(frozen=True, slots=True)
class LocalDetector:
    """How "traffic from a local pod" is recognised (kube-proxy's --detect-local-mode)."""

    if_local: tuple[str, ...] = ()
    if_not_local: tuple[str, ...] = ()

    @property
    def implemented(self) -> bool:
        return bool(self.if_local)


def local_detector(mode: str, family: int, cluster_cidrs: tuple[str, ...], node_cidrs: tuple[str, ...],
                   bridge: str, prefix: str) -> LocalDetector:
    if mode == "ClusterCIDR" or mode == "NodeCIDR":
        cidrs = cluster_cidrs if mode == "ClusterCIDR" else node_cidrs
        for c in cidrs:
            if c != "primary" and family_of(c.split("/")[0]) == family:
                return LocalDetector(("-s", c), ("!", "-s", c))
        return LocalDetector()
    if mode == "BridgeInterface" and bridge:
        return LocalDetector(("-i", bridge), ("!", "-i", bridge))
    if mode == "InterfaceNamePrefix" and prefix:
        return LocalDetector(("-i", prefix + "+"), ("!", "-i", prefix + "+"))
    return LocalDetector()


@dataclass(frozen=True, slots=True)
class RenderContext:
    family: int
    masquerade_all: bool
    local: LocalDetector
    node_zone: str = ""


@dataclass(slots=True)
class ServiceRules:
    """Everything one service port contributes for one family."""

    chains: dict[str, list[str]] = field(default_factory=dict)  # nat chains owned by this service
    dispatch: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # rules in shared chains
    no_local_endpoints: dict[str, bool] = field(default_factory=dict)  # traffic policy → bool, for metrics


def _host(ip: str) -> str:
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def _dnat_dest(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def render_service(sp: ServicePort, eps: tuple[EndpointInfo, ...], ctx: RenderContext) -> ServiceRules:
    """Render one service port for ``ctx.family``; ``eps`` may hold both families (filtered here)."""
    fam = ctx.family
    out = ServiceRules()
    cluster_ip = sp.cluster_ip(fam)
    if cluster_ip is None:
        return out  # single-stack Service of the other family
    fam_eps = tuple(e for e in eps if e.family == fam)
    cat = categorize(sp, fam_eps, ctx.node_zone)
    spn = str(sp.spn)
    proto = sp.protocol.lower()
    pmatch = f"-p {proto} -m {proto}"
    h = chain_hash(spn, sp.protocol)
    svc_chain = f"KPROXY-SVC-{h}"
    svl_chain = f"KPROXY-SVL-{h}"
    ext_chain = f"KPROXY-EXT-{h}"
    fw_chain = f"KPROXY-FW-{h}"
    ext_vips = sp.external_vips(fam)
    lb_ips = tuple(ip for ip in sp.lb_ips if family_of(ip) == fam)
    ext_ips = tuple(ip for ip in sp.external_ips if family_of(ip) == fam)
    has_external = bool(sp.node_port or ext_vips)
    internal_chain = svl_chain if sp.internal_local else svc_chain
    # The cluster chain serves internal traffic (Cluster policy) and all external traffic that is not
    # restricted to local endpoints, including pod and node-originated traffic short-circuited by EXT.
    need_svc = not sp.internal_local or has_external
    if not sp.internal_local:
        cluster_eps = cat.internal
    elif has_external and not sp.external_local:
        cluster_eps = cat.external
    else:
        cluster_eps = cat_cluster(sp, fam_eps, ctx) if has_external else ()
    local_eps = cat.internal if sp.internal_local else (cat.external if sp.external_local else ())
    has_endpoints = bool(cat.reachable)  # kube-proxy's allLocallyReachableEndpoints: worth a nat rule
    has_internal = bool(cat.internal)
    has_ext_eps = bool(cat.external)
    out.no_local_endpoints = {
        "Internal": sp.internal_local and not cat.internal and bool(fam_eps),
        "External": sp.external_local and has_external and not cat.external and bool(fam_eps),
    }

    # -- endpoint chains -------------------------------------------------------------------------
    seps: dict[tuple[str, int], str] = {}
    recent = f" -m recent --name %s --mask {_full_mask(fam)} --set --rsource" if sp.affinity_timeout else ""
    for ep in (*cluster_eps, *local_eps):
        key = (ep.ip, ep.port)
        if key in seps:
            continue
        dest = _dnat_dest(ep.ip, ep.port)
        chain = seps[key] = f"KPROXY-SEP-{chain_hash(spn, sp.protocol, dest)}"
        out.chains[chain] = [
            f"-A {chain} -s {_host(ep.ip)} -j {MARK_MASQ}",
            f"-A {chain} {pmatch}{recent % chain if recent else ''} -j DNAT --to-destination {dest}",
        ]

    def selection(chain: str, chosen: tuple[EndpointInfo, ...]) -> list[str]:
        rules: list[str] = []
        names = [seps[(ep.ip, ep.port)] for ep in chosen]
        if sp.affinity_timeout:
            for name in names:
                rules.append(f"-A {chain} -m recent --name {name} --mask {_full_mask(fam)} --rcheck "
                             f"--seconds {sp.affinity_timeout} --reap -j {name}")
        n = len(names)
        for i, name in enumerate(names[:-1]):
            rules.append(f"-A {chain} -m statistic --mode random --probability {_PROB[n - i]} -j {name}")
        if names:
            rules.append(f"-A {chain} -j {names[-1]}")
        return rules

    svc_rules: list[str] = []
    vip_match = f"-d {_host(cluster_ip)} {pmatch} --dport {sp.port}"
    if need_svc:
        if not sp.internal_local:
            svc_rules.extend(_cluster_ip_masq(svc_chain, vip_match, spn, ctx))
        svc_rules.extend(selection(svc_chain, cluster_eps))
        out.chains[svc_chain] = svc_rules
    if sp.uses_local:
        svl_rules: list[str] = []
        if sp.internal_local:
            svl_rules.extend(_cluster_ip_masq(svl_chain, vip_match, spn, ctx))
        svl_rules.extend(selection(svl_chain, local_eps))
        out.chains[svl_chain] = svl_rules

    # -- external traffic chain ------------------------------------------------------------------
    if has_external:
        ext_rules: list[str] = []
        if sp.external_local:
            if ctx.local.implemented:
                ext_rules.append(f"-A {ext_chain} {' '.join(ctx.local.if_local)} -m comment --comment "
                                 f"\"pod traffic for {spn} external destinations\" -j {svc_chain}")
            ext_rules.append(f"-A {ext_chain} -m addrtype --src-type LOCAL -j {MARK_MASQ}")
            ext_rules.append(f"-A {ext_chain} -m addrtype --src-type LOCAL -j {svc_chain}")
            ext_rules.append(f"-A {ext_chain} -j {svl_chain}")
        else:
            ext_rules.append(f"-A {ext_chain} -m comment --comment \"masquerade traffic for {spn} external "
                             f"destinations\" -j {MARK_MASQ}")
            ext_rules.append(f"-A {ext_chain} -j {svc_chain}")
        out.chains[ext_chain] = ext_rules
        if lb_ips and sp.lb_source_ranges:
            fw_rules = [f"-A {fw_chain} -s {r} -j {ext_chain}" for r in sp.lb_source_ranges
                        if family_of(r.split("/")[0]) == fam]
            out.chains[fw_chain] = fw_rules

    # -- dispatch rules (shared chains) ----------------------------------------------------------
    nat_svc: list[str] = []
    nat_np: list[str] = []
    f_svc: list[str] = []
    f_ext: list[str] = []
    f_np: list[str] = []
    f_fw: list[str] = []
    comment = f"-m comment --comment \"{spn}"
    # kube-proxy: no endpoints at all → REJECT; endpoints, but none for this traffic's policy → DROP
    verdict, why = ("DROP", "has no local endpoints") if cat.has_any else ("REJECT", "has no endpoints")
    if has_internal:
        nat_svc.append(f"-A {SERVICES} {vip_match} {comment} cluster IP\" -j {internal_chain}")
    else:
        f_svc.append(f"-A {SERVICES} {vip_match} {comment} {why}\" -j {verdict}")
    for ip in ext_ips:
        m = f"-d {_host(ip)} {pmatch} --dport {sp.port}"
        if has_endpoints:
            nat_svc.append(f"-A {SERVICES} {m} {comment} external IP\" -j {ext_chain}")
        if not has_ext_eps:
            f_ext.append(f"-A {EXTERNAL_SERVICES} {m} {comment} {why}\" -j {verdict}")
    for ip in lb_ips:
        m = f"-d {_host(ip)} {pmatch} --dport {sp.port}"
        if has_endpoints:
            target = fw_chain if fw_chain in out.chains else ext_chain
            nat_svc.append(f"-A {SERVICES} {m} {comment} loadbalancer IP\" -j {target}")
            if target == fw_chain:
                f_fw.append(f"-A {PROXY_FIREWALL} {m} {comment} traffic not accepted by {fw_chain}\" -j DROP")
        if not has_ext_eps:
            f_ext.append(f"-A {EXTERNAL_SERVICES} {m} {comment} {why}\" -j {verdict}")
    if sp.node_port:
        m = f"{pmatch} --dport {sp.node_port}"
        if has_endpoints:
            nat_np.append(f"-A {NODEPORTS} {m} {comment} node port\" -j {ext_chain}")
        if not has_ext_eps:
            f_ext.append(f"-A {EXTERNAL_SERVICES} -m addrtype --dst-type LOCAL {m} {comment} {why}\" "
                         f"-j {verdict}")
    if sp.health_check_node_port and sp.external_local:
        f_np.append(f"-A {NODEPORTS} -p tcp -m tcp --dport {sp.health_check_node_port} {comment} health "
                    f"check node port\" -j ACCEPT")
    for key, rules in (((NAT, SERVICES), nat_svc), ((NAT, NODEPORTS), nat_np), ((FILTER, SERVICES), f_svc),
                       ((FILTER, EXTERNAL_SERVICES), f_ext), ((FILTER, NODEPORTS), f_np),
                       ((FILTER, PROXY_FIREWALL), f_fw)):
        if rules:
            out.dispatch[key] = rules
    # An unused SVC/SVL chain (no dispatch rule refers to it) is still written: it keeps chain names stable
    # so partial syncs can rewrite it in place when endpoints come back.
    return out


def cat_cluster(sp: ServicePort, eps: tuple[EndpointInfo, ...], ctx: RenderContext) -> tuple[EndpointInfo, ...]:
    """Cluster-wide endpoints ignoring Local policies (for pod short-circuit of external Local traffic)."""
    plain = ServicePort(sp.spn, sp.cluster_ips, sp.port, sp.protocol)
    return categorize(plain, eps, ctx.node_zone).internal


class _Probabilities(dict[int, str]):
    """kube-proxy's "%0.10f" of 1/n, memoised."""

    def __missing__(self, n: int) -> str:
        v = self[n] = f"{1.0 / n:.10f}"
        return v


_PROB = _Probabilities()


@dataclass(slots=True)
class RenderedSummary:
    """What a partial sync needs to remember of a rendered service port, without its 20-odd rule strings.

    Chains are kept as a fingerprint of their rules (equal fingerprints: no rewrite needed); the dispatch
    rules are kept verbatim because a later partial sync deletes them with ``-D``. At 10k Services × 10
    endpoints this is ~10x smaller than keeping every rendered rule.
    """

    chains: dict[str, int]
    dispatch: dict[tuple[str, str], list[str]]
    nat_rules: int
    filter_rules: int
    no_local_internal: bool
    no_local_external: bool

    @classmethod
    def of(cls, sr: ServiceRules) -> RenderedSummary:
        return cls({c: hash(tuple(rules)) for c, rules in sr.chains.items()}, sr.dispatch,
                   sum(map(len, sr.chains.values())) + sum(len(v) for k, v in sr.dispatch.items() if k[0] == NAT),
                   sum(len(v) for k, v in sr.dispatch.items() if k[0] == FILTER),
                   sr.no_local_endpoints.get("Internal", False), sr.no_local_endpoints.get("External", False))


def _full_mask(fam: int) -> str:
    return "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff" if fam == 6 else "255.255.255.255"


def _cluster_ip_masq(chain: str, vip_match: str, spn: str, ctx: RenderContext) -> list[str]:
    if ctx.masquerade_all:
        return [f"-A {chain} {vip_match} -m comment --comment \"{spn} cluster IP\" -j {MARK_MASQ}"]
    if ctx.local.implemented:
        return [f"-A {chain} {vip_match} {' '.join(ctx.local.if_not_local)} -m comment --comment "
                f"\"{spn} cluster IP\" -j {MARK_MASQ}"]
    return []


def static_chains(family: int, mark: str, nodeport_cidrs: tuple[str, ...], localhost_nodeports: bool
                  ) -> dict[tuple[str, str], list[str]]:
    """The fixed chains every sync writes in full (small)."""
    portals = [f"-A {PORTALS} -j {SERVICES}"]
    cidrs = [c for c in nodeport_cidrs if c != "primary" and family_of(c.split("/")[0]) == family]
    if cidrs:
        for c in cidrs:
            portals.append(f"-A {PORTALS} -d {c} -m addrtype --dst-type LOCAL -j {NODEPORTS}")
    else:
        if family == 4 and not localhost_nodeports:
            portals.append(f"-A {PORTALS} -d 127.0.0.0/8 -j RETURN")
        portals.append(f"-A {PORTALS} -m addrtype --dst-type LOCAL -j {NODEPORTS}")
    nat = {
        PORTALS: portals,
        MARK_MASQ: [f"-A {MARK_MASQ} -j MARK --or-mark {mark}"],
        POSTROUTING: [
            f"-A {POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN",
            f"-A {POSTROUTING} -j MARK --xor-mark {mark}",
            f"-A {POSTROUTING} -m comment --comment \"kproxy service traffic requiring SNAT\" "
            f"-j MASQUERADE --random-fully",
        ],
    }
    flt = {
        FORWARD: [
            f"-A {FORWARD} -m conntrack --ctstate INVALID -j DROP",
            f"-A {FORWARD} -m mark --mark {mark}/{mark} -m comment --comment \"kproxy forwarding rules\" -j ACCEPT",
            f"-A {FORWARD} -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment "
            f"\"kproxy forwarding conntrack rule\" -j ACCEPT",
        ],
        FIREWALL: [] if family == 6 else [
            f"-A {FIREWALL} -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT "
            f"-m comment --comment \"block incoming localnet connections\" -j DROP",
        ],
    }
    out: dict[tuple[str, str], list[str]] = {}
    for c, rules in nat.items():
        out[(NAT, c)] = rules
    for c, rules in flt.items():
        out[(FILTER, c)] = rules
    return out


@dataclass(slots=True)
class RestoreScript:
    """A ``iptables-restore --noflush`` input built table by table."""

    declare: dict[str, list[str]] = field(default_factory=lambda: {NAT: [], FILTER: []})
    rules: dict[str, list[str]] = field(default_factory=lambda: {NAT: [], FILTER: []})
    deletes: dict[str, list[str]] = field(default_factory=lambda: {NAT: [], FILTER: []})
    remove: dict[str, list[str]] = field(default_factory=lambda: {NAT: [], FILTER: []})

    def flush_chain(self, table: str, chain: str, rules: list[str]) -> None:
        self.declare[table].append(f":{chain} - [0:0]")
        self.rules[table].extend(rules)

    def delete_chain(self, table: str, chain: str) -> None:
        self.declare[table].append(f":{chain} - [0:0]")
        self.remove[table].append(f"-X {chain}")

    def text(self) -> str:
        parts: list[str] = []
        for table in (FILTER, NAT):
            if not (self.declare[table] or self.rules[table] or self.deletes[table] or self.remove[table]):
                continue
            parts.append(f"*{table}")
            parts.extend(self.declare[table])
            parts.extend(self.deletes[table])
            parts.extend(self.rules[table])
            parts.extend(self.remove[table])
            parts.append("COMMIT")
        parts.append("")
        return "\n".join(parts)

    def __bool__(self) -> bool:
        return any(self.declare[t] or self.rules[t] or self.deletes[t] or self.remove[t] for t in (NAT, FILTER))
