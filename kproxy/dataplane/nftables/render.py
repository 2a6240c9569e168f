"""Pure rendering of kproxy's flat nftables layout: the static skeleton and per-service map elements.

One table per family (``ip kproxy``, ``ip6 kproxy``). Services are *data*, not rules: every Service only
adds elements to a fixed set of maps, so a sync writes map elements and never per-Service chains.

Packet path (IPv4 shown; IPv6 is the same with ``ip6``)::

  nat-prerouting / nat-output (dstnat)
    services:   <pod> daddr.proto.dport vmap @svc-sc      externalTrafficPolicy Local: pods and
                fib saddr local  ...       vmap @svc-sc      the node use every endpoint (short-circuit)
                daddr.proto.dport vmap @svc               ClusterIP / externalIPs / LB IPs → selection chain
    nodeports:  same on proto.dport (@nodeports-sc, @nodeports), for ``fib daddr type local`` destinations
  selection chains, shared by every Service with the same (kind, endpoint count N):
    <kind>-<N>:  [masquerade mark per kind]
                 numgen random mod N vmap { k : goto d<k>-<m> }                (exactly 1/N per endpoint)
    d<k>-<m>:    dnat to daddr.proto.dport map @ep-<m>-<k>     (slot k's endpoint of every Service)
  ClientIP affinity (timeout T), per slot k < N, with dynamic sets @aff-<k> of saddr.daddr.proto.dport:
    <kind>-<N>-a<T>:  [masquerade]; saddr.daddr.proto.dport @aff-<k> jump a<k>-<T>-<m>   (for each k)
                      numgen random mod N vmap { k : jump a<k>-<T>-<m> }
    a<k>-<T>-<m>:     update @aff-<k> { saddr.daddr.proto.dport timeout T }   (refreshed per connection)
                      dnat to daddr.proto.dport map @ep-<m>-<k>   (a stale slot ≥ N misses and falls through)
  Endpoint maps are per slot (@ep-<m>-<k>, m = e: VIPs, s: VIPs short-circuit, n / ns: NodePorts) because
  nft 1.0.6 cannot read back a ``typeof ... numgen`` map key: every set here uses plain ``type``.
  filter input/forward/output: new connections still addressed to a Service frontend without
    endpoints → @no-ep / @no-ep-np: REJECT (no endpoints) or DROP (no endpoints for this policy)
  filter prerouting/output (priority -110): loadBalancerSourceRanges via @fw-ips / @fw-allow
  nat-postrouting: hairpin (saddr.daddr in @hairpin after DNAT) and the masquerade mark

Selection-chain kinds (the masquerade decision is kube-proxy's):
  c  ClusterIP: mark when the source is not a local pod (or always with --masquerade-all)
  x  external destination, Cluster policy: always mark
  l  external destination, Local policy, traffic from outside: never mark, local endpoints only
  s  external destination, Local policy, from pods or the node: all endpoints, mark if from the node
  nx / nl / ns  the same three for NodePorts (endpoint maps keyed on proto.dport)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from ...model import family_of
from ...snapshot import EndpointInfo, ServicePort, categorize

TABLE = "kproxy"
PROTOS = ("tcp", "udp", "sctp")
AFF_SIZE = 262144  # clients remembered per affinity slot set

# sets/maps whose content is derived entirely from the Services (flushed and rewritten on a full sync)
SVC, SVC_SC, NODEPORTS, NODEPORTS_SC = "svc", "svc-sc", "nodeports", "nodeports-sc"
NO_EP, NO_EP_NP = "no-ep", "no-ep-np"
FW_IPS, FW_ALLOW = "fw-ips", "fw-allow"
HAIRPIN = "hairpin"
DATA_SETS = (SVC, SVC_SC, NODEPORTS, NODEPORTS_SC, NO_EP, NO_EP_NP, FW_IPS, FW_ALLOW, HAIRPIN)
REJECT_CHAIN = "reject-chain"

# selection-chain kind → endpoint map family (e: VIPs, s: VIPs short-circuit, n: NodePorts,
# ns: NodePorts short-circuit)
KIND_MAP = {"c": "e", "x": "e", "l": "e", "s": "s", "nx": "n", "nl": "n", "ns": "ns"}
MAP_FAMILIES = ("e", "s", "n", "ns")


def nft_family(fam: int) -> str:
    return "ip6" if fam == 6 else "ip"


def _addr_type(fam: int) -> str:
    return "ipv6_addr" if fam == 6 else "ipv4_addr"


@dataclass(frozen=True, slots=True)
class Context:
    family: int
    mark: int  # the masquerade bit as a mask (1 << masquerade_bit)
    masquerade_all: bool = False
    local_match: str = ""  # nft match for "from a local pod" ("" = not implemented)
    not_local_match: str = ""
    node_zone: str = ""
    nodeport_cidrs: tuple[str, ...] = ()
    localhost_nodeports: bool = True

    @property
    def f(self) -> str:
        return nft_family(self.family)


def local_matches(mode: str, fam: int, cluster_cidrs: tuple[str, ...], node_cidrs: tuple[str, ...],
                  bridge: str, prefix: str) -> tuple[str, str]:
    """(local, not-local) nft matches for kube-proxy's --detect-local-mode."""
    f = nft_family(fam)
    if mode in ("ClusterCIDR", "NodeCIDR"):
        cidrs = [c for c in (cluster_cidrs if mode == "ClusterCIDR" else node_cidrs)
                 if c != "primary" and family_of(c.split("/")[0]) == fam]
        if cidrs:
            s = "{ " + ", ".join(cidrs) + " }"
            return f"{f} saddr {s}", f"{f} saddr != {s}"
        return "", ""
    if mode == "BridgeInterface" and bridge:
        return f'iifname "{bridge}"', f'iifname != "{bridge}"'
    if mode == "InterfaceNamePrefix" and prefix:
        return f'iifname "{prefix}*"', f'iifname != "{prefix}*"'
    return "", ""


# ---- selection and affinity chains -------------------------------------------------------------------

def sel_chain(kind: str, n: int, affinity: int = 0) -> str:
    return f"{kind}-{n}-a{affinity}" if affinity else f"{kind}-{n}"


def slot_chain(k: int, timeout: int, amap: str) -> str:
    """The chain that DNATs to slot ``k`` of map family ``amap`` (recording affinity when ``timeout``)."""
    return f"a{k}-{timeout}-{amap}" if timeout else f"d{k}-{amap}"


def aff_set(k: int) -> str:
    return f"aff-{k}"


def ep_map(amap: str, k: int) -> str:
    return f"ep-{amap}-{k}"


def parse_sel_chain(name: str) -> tuple[str, int, int] | None:
    """(kind, N, affinity timeout or 0) of a selection chain name, None for other names."""
    parts = name.split("-")
    if len(parts) not in (2, 3) or parts[0] not in KIND_MAP or not parts[1].isdigit():
        return None
    if len(parts) == 3 and not (parts[2].startswith("a") and parts[2][1:].isdigit()):
        return None
    return parts[0], int(parts[1]), int(parts[2][1:]) if len(parts) == 3 else 0


def parse_slot_chain(name: str) -> tuple[int, int, str] | None:
    """(slot, affinity timeout or 0, map family) of a slot chain name, None for other names."""
    parts = name.split("-")
    if len(parts) == 2 and parts[0][:1] == "d" and parts[0][1:].isdigit() and parts[1] in MAP_FAMILIES:
        return int(parts[0][1:]), 0, parts[1]
    if len(parts) != 3 or parts[0][:1] != "a" or not parts[0][1:].isdigit() or not parts[1].isdigit() \
            or parts[2] not in MAP_FAMILIES:
        return None
    return int(parts[0][1:]), int(parts[1]), parts[2]


def is_dynamic_chain(name: str) -> bool:
    return parse_sel_chain(name) is not None or parse_slot_chain(name) is not None


def is_dynamic_set(name: str) -> bool:
    """Per-slot sets and maps, created on demand for affinity Services."""
    parts = name.split("-")
    return (len(parts) == 2 and parts[0] == "aff" and parts[1].isdigit()) or \
        (len(parts) == 3 and parts[0] == "ep" and parts[1] in MAP_FAMILIES and parts[2].isdigit())


def dynamic_set_declaration(name: str, fam: int) -> str:
    f, a = nft_family(fam), _addr_type(fam)
    t = f"{f} {TABLE}"
    if name.startswith("aff-"):
        return (f"add set {t} {name} {{ type {a} . {a} . inet_proto . inet_service ; flags dynamic,timeout ; "
                f"timeout 3h ; size {AFF_SIZE} ; }}")
    amap = name.split("-")[1]
    key = "inet_proto . inet_service" if amap.startswith("n") else f"{a} . inet_proto . inet_service"
    return f"add map {t} {name} {{ type {key} : {a} . inet_service ; }}"


def chain_rules(name: str, ctx: Context) -> list[str]:
    """Rules of a dynamically created chain: selection ``<kind>-<N>[-a<T>]`` or slot ``a<k>-<T>-<m>``."""
    f = ctx.f
    client = f"{f} saddr . {f} daddr . meta l4proto . th dport"
    protos = "meta l4proto { tcp, udp, sctp }"
    slot = parse_slot_chain(name)
    if slot is not None:
        k, t, amap = slot
        key = "meta l4proto . th dport" if amap.startswith("n") else f"{f} daddr . meta l4proto . th dport"
        dnat = f"{protos} dnat {f} to {key} map @{ep_map(amap, k)}"
        return [f"update @{aff_set(k)} {{ {client} timeout {t}s }}", dnat] if t else [dnat]
    parsed = parse_sel_chain(name)
    if parsed is None:
        raise ValueError(f"not a kproxy chain name: {name}")
    kind, n, timeout = parsed
    masq = f"meta mark set meta mark | {ctx.mark:#x}"
    rules: list[str] = []
    base = kind[1:] if kind.startswith("n") else kind
    if base == "c":
        if ctx.masquerade_all:
            rules.append(masq)
        elif ctx.not_local_match:
            rules.append(f"{ctx.not_local_match} {masq}")
    elif base == "x":
        rules.append(masq)
    elif base == "s":
        rules.append(f"fib saddr type local {masq}")
    amap = KIND_MAP[kind]
    # jump, not goto: a slot that misses (no endpoint in that slot) falls through to the next rule
    for k in range(n) if timeout else ():
        rules.append(f"{client} @{aff_set(k)} jump {slot_chain(k, timeout, amap)}")
    vmap = ", ".join(f"{k} : jump {slot_chain(k, timeout, amap)}" for k in range(n))
    rules.append(f"numgen random mod {n} vmap {{ {vmap} }}")
    return rules


# ---- the skeleton ------------------------------------------------------------------------------------

def set_declarations(fam: int) -> list[str]:
    f, a = nft_family(fam), _addr_type(fam)
    t = f"{f} {TABLE}"
    fe = f"{a} . inet_proto . inet_service"
    np = "inet_proto . inet_service"
    return [
        f"add map {t} {SVC} {{ type {fe} : verdict ; }}",
        f"add map {t} {SVC_SC} {{ type {fe} : verdict ; }}",
        f"add map {t} {NODEPORTS} {{ type {np} : verdict ; }}",
        f"add map {t} {NODEPORTS_SC} {{ type {np} : verdict ; }}",
        f"add map {t} {NO_EP} {{ type {fe} : verdict ; }}",
        f"add map {t} {NO_EP_NP} {{ type {np} : verdict ; }}",
        f"add set {t} {FW_IPS} {{ type {fe} ; }}",
        f"add set {t} {FW_ALLOW} {{ type {fe} . {a} ; flags interval ; }}",
        f"add set {t} {HAIRPIN} {{ type {a} . {a} ; }}",
    ]


# (chain, hook declaration or "") — regular chains first
BASE_CHAINS = (
    ("services", ""), ("nodeports", ""), ("services-out", ""), ("nodeports-out", ""),
    ("endpoints-check", ""), ("endpoints-check-fwd", ""), ("firewall-check", ""),
    (REJECT_CHAIN, ""),
    ("nat-prerouting", "type nat hook prerouting priority -100 ; policy accept ;"),
    ("nat-output", "type nat hook output priority -100 ; policy accept ;"),
    ("nat-postrouting", "type nat hook postrouting priority 100 ; policy accept ;"),
    ("filter-prerouting", "type filter hook prerouting priority -110 ; policy accept ;"),
    ("filter-output", "type filter hook output priority -110 ; policy accept ;"),
    ("filter-output-post-dnat", "type filter hook output priority -90 ; policy accept ;"),
    ("filter-input", "type filter hook input priority -10 ; policy accept ;"),
    ("filter-forward", "type filter hook forward priority -10 ; policy accept ;"),
)


def static_rules(ctx: Context) -> dict[str, list[str]]:
    """Rules of the fixed chains (rewritten with ``flush chain`` on every full sync)."""
    f = ctx.f
    fe = f"{f} daddr . meta l4proto . th dport"
    # New connections in prerouting never have a local source (the node's own ones pass the nat output
    # hook, and their conntrack entry exists before they loop back), so the `fib saddr type local`
    # short-circuit rules — a FIB lookup per new connection — only go into the output path.
    svc = []
    np = []
    if ctx.local_match:
        svc.append(f"{ctx.local_match} {fe} vmap @{SVC_SC}")
        np.append(f"{ctx.local_match} meta l4proto . th dport vmap @{NODEPORTS_SC}")
    svc_out = [*svc, f"fib saddr type local {fe} vmap @{SVC_SC}", f"{fe} vmap @{SVC}"]
    np_out = [*np, f"fib saddr type local meta l4proto . th dport vmap @{NODEPORTS_SC}",
              f"meta l4proto . th dport vmap @{NODEPORTS}"]
    svc.append(f"{fe} vmap @{SVC}")
    np.append(f"meta l4proto . th dport vmap @{NODEPORTS}")

    cidrs = [c for c in ctx.nodeport_cidrs if c != "primary" and family_of(c.split("/")[0]) == ctx.family]
    np_guard = "fib daddr type local"
    if cidrs:
        np_guard = f"{f} daddr {{ {', '.join(cidrs)} }} fib daddr type local"
    elif ctx.family == 4 and not ctx.localhost_nodeports:
        np_guard = "ip daddr != 127.0.0.0/8 fib daddr type local"
    hook = ["jump services", f"{np_guard} jump nodeports"]
    hook_out = ["jump services-out", f"{np_guard} jump nodeports-out"]

    mark = f"{ctx.mark:#x}"
    filter_input = ["ct state new jump endpoints-check"]
    if ctx.family == 4 and ctx.localhost_nodeports and not cidrs:
        # what route_localnet would otherwise allow: outside traffic to 127/8 that we did not DNAT
        filter_input.append("ip daddr 127.0.0.0/8 ip saddr != 127.0.0.0/8 iifname != \"lo\" ct state new "
                            "ct status & dnat == 0 drop")
    return {
        "services": svc,
        "nodeports": np,
        "services-out": svc_out,
        "nodeports-out": np_out,
        "endpoints-check": [f"{fe} vmap @{NO_EP}",
                            f"fib daddr type local meta l4proto . th dport vmap @{NO_EP_NP}"],
        # forwarded packets are never addressed to the node: no NodePort check (and no FIB lookup)
        "endpoints-check-fwd": [f"{fe} vmap @{NO_EP}"],
        "firewall-check": [f"{fe} @{FW_IPS} {fe} . {f} saddr != @{FW_ALLOW} drop"],
        REJECT_CHAIN: ["reject"],
        "nat-prerouting": hook,
        "nat-output": hook_out,
        "nat-postrouting": [
            f"ct status dnat {f} saddr . {f} daddr @{HAIRPIN} masquerade",
            f"meta mark & {mark} == {mark} meta mark set meta mark ^ {mark} masquerade fully-random",
        ],
        "filter-prerouting": ["ct state new jump firewall-check"],
        "filter-output": ["ct state new jump firewall-check"],
        "filter-output-post-dnat": ["ct state new jump endpoints-check"],
        "filter-input": filter_input,
        "filter-forward": ["ct state new jump endpoints-check-fwd"],
    }


# ---- per-service elements ----------------------------------------------------------------------------

# set/map name → {key: tail}; the element's text is key + tail, where the tail holds an optional comment
# and, for maps, " : value". Deleting an element needs only its key.
Elements = dict[str, dict[str, str]]


@dataclass(slots=True)
class ServiceElements:
    """Everything one service port contributes to one family's table."""

    elements: Elements = field(default_factory=dict)
    # shared selection / slot chains it needs, and the per-slot sets and maps: one frozenset shared by
    # every service port of the same shape (see _structure), so the index counts them per shape
    chains: frozenset[str] = frozenset()
    sets: frozenset[str] = frozenset()
    no_local: dict[str, bool] = field(default_factory=dict)

    def add(self, set_name: str, key: str, value: str = "") -> None:
        self.elements.setdefault(set_name, {})[key] = value

    def count(self) -> int:
        return sum(map(len, self.elements.values()))


@functools.cache
def _ep_names(amap: str, n: int) -> tuple[str, ...]:
    return tuple(ep_map(amap, k) for k in range(n))


@functools.cache
def _slot_chains(amap: str, timeout: int, n: int) -> tuple[str, ...]:
    return tuple(slot_chain(k, timeout, amap) for k in range(n))


@functools.cache
def _aff_names(n: int) -> tuple[str, ...]:
    return tuple(aff_set(k) for k in range(n))


@functools.lru_cache(maxsize=4096)
def _structure(timeout: int, frontends: tuple[tuple[str, int], ...]) -> tuple[frozenset[str], frozenset[str]]:
    """(chains, sets) a service port needs, from the (kind, endpoint count) of each of its frontends."""
    chains: set[str] = set()
    sets: set[str] = set()
    for kind, n in frontends:
        amap = KIND_MAP[kind]
        chains.add(sel_chain(kind, n, timeout))
        chains.update(_slot_chains(amap, timeout, n))
        sets.update(_ep_names(amap, n))
        if timeout:
            sets.update(_aff_names(n))
    return frozenset(chains), frozenset(sets)


def _comment(spn: str, kind: str) -> str:
    """An element comment naming the service port (nft limits comments to 128 bytes)."""
    text = f"{spn} {kind}"
    # at most 4 bytes per character: only a long text needs encoding to check its length
    if len(text) > 30 and len(text.encode()) > 120:
        text = text.encode()[:120].decode(errors="ignore")
    return f' comment "{text}"'


def cluster_wide(sp: ServicePort, eps: tuple[EndpointInfo, ...], zone: str) -> tuple[EndpointInfo, ...]:
    """Cluster-wide endpoints ignoring Local policies (kube-proxy's short-circuit for pods and the node)."""
    plain = ServicePort(sp.spn, sp.cluster_ips, sp.port, sp.protocol)
    return categorize(plain, eps, zone).internal


def stable_order(chosen: tuple[EndpointInfo, ...], previous: list[str]) -> tuple[EndpointInfo, ...]:
    """Keep every endpoint that survives in its previous slot; new endpoints fill the freed slots.

    ``previous`` holds the endpoint values (``"ip . port"``) of slots 0..M-1 before the change. A
    one-endpoint change then rewrites one or two slots instead of shifting all of them, and ClientIP
    affinity entries (which remember a slot) keep pointing at the same endpoint.
    """
    n = len(chosen)
    by_value = {f"{ep.ip} . {ep.port}": ep for ep in chosen}
    slots: list[EndpointInfo | None] = [None] * n
    placed: set[str] = set()
    for k, value in enumerate(previous[:n]):
        ep = by_value.get(value)
        if ep is not None and value not in placed:
            slots[k] = ep
            placed.add(value)
    # new endpoints, and survivors whose slot is now >= n, fill the holes
    rest = iter(ep for v, ep in by_value.items() if v not in placed)
    return tuple(s if s is not None else next(rest) for s in slots)


def render_service(sp: ServicePort, eps: tuple[EndpointInfo, ...], ctx: Context,
                   previous: ServiceElements | None = None) -> ServiceElements:
    """The map elements of one service port for ``ctx.family`` (``eps`` may hold both families).

    With ``previous`` (what this service port rendered before), surviving endpoints keep their slots.
    A full sync calls this for every service port: the hot loops use locals and tuple unpacking.
    """
    fam = ctx.family
    out = ServiceElements()
    cluster_ip = sp.cluster_ip(fam)
    if cluster_ip is None:
        return out
    if fam == 6:
        fam_eps = tuple([e for e in eps if ":" in e[0]])
    else:
        fam_eps = tuple([e for e in eps if ":" not in e[0]])
    cat = categorize(sp, fam_eps, ctx.node_zone)
    spn = str(sp.spn)
    proto = sp.protocol.lower()
    port = sp.port
    ext_ips = tuple(ip for ip in sp.external_ips if family_of(ip) == fam) if sp.external_ips else ()
    lb_ips = tuple(ip for ip in sp.lb_ips if family_of(ip) == fam) if sp.lb_ips else ()
    # kube-proxy's hasAnyEndpoints: a usable endpoint anywhere (then a policy miss DROPs instead of REJECTs)
    has_endpoints = bool(cat.reachable) or any(e.ready or (e.serving and e.terminating) for e in fam_eps)
    no_ep_verdict = "drop" if has_endpoints else f"goto {REJECT_CHAIN}"
    sc_eps = cluster_wide(sp, fam_eps, ctx.node_zone) if sp.external_local else ()
    if sp.external_local or sp.internal_local:
        out.no_local = {
            "internal": sp.internal_local and not cat.internal and bool(fam_eps),
            "external": sp.external_local and sp.has_external and not cat.external and bool(fam_eps),
        }
    hairpin: list[str] = []
    elements = out.elements
    shape: list[tuple[str, int]] = []  # (kind, endpoint count) of every frontend: what chains and sets it needs
    t = sp.affinity_timeout

    def frontend(verdict_map: str, kind: str, key: str, chosen: tuple[EndpointInfo, ...], comment: str) -> None:
        n = len(chosen)
        if not n:
            return
        chain = sel_chain(kind, n, t)
        shape.append((kind, n))
        vm = elements.get(verdict_map)
        if vm is None:
            elements[verdict_map] = {key: f"{comment} : goto {chain}"}
        else:
            vm[key] = f"{comment} : goto {chain}"
        amap = KIND_MAP[kind]
        names = _ep_names(amap, n)
        if previous is not None:
            before: list[str] = []
            for name in _ep_names(amap, 64 if n < 64 else 2 * n):
                v = previous.elements.get(name, {}).get(key)
                if v is None:
                    break
                before.append(v[3:])
            if before:
                chosen = stable_order(chosen, before)
        get = elements.get
        for name, (ip, ep_port, _ready, _serving, _term, is_local, node_name, _zone, _hints) in zip(
                names, chosen, strict=True):
            # hairpin (a pod reaching itself) is only possible for endpoints on this node
            if is_local or not node_name:
                hairpin.append(ip)
            m = get(name)
            if m is None:
                elements[name] = {key: f" : {ip} . {ep_port}"}
            else:
                m[key] = f" : {ip} . {ep_port}"

    # ClusterIP
    key = f"{cluster_ip} . {proto} . {port}"
    frontend(SVC, "c", key, cat.internal, _comment(spn, "ClusterIP"))
    if not cat.internal:
        out.add(NO_EP, key, f"{_comment(spn, 'ClusterIP')} : {no_ep_verdict}")
    # externalIPs and LoadBalancer IPs
    ext_kind = "l" if sp.external_local else "x"
    for kind_name, ips in (("ExternalIP", ext_ips), ("LoadBalancer", lb_ips)):
        for ip in ips:
            key = f"{ip} . {proto} . {port}"
            c = _comment(spn, kind_name)
            frontend(SVC, ext_kind, key, cat.external, c)
            if sp.external_local:
                frontend(SVC_SC, "s", key, sc_eps, c)
            if not cat.external:
                out.add(NO_EP, key, f"{c} : {no_ep_verdict}")
    # loadBalancerSourceRanges
    if lb_ips and sp.lb_source_ranges:
        ranges = [r for r in sp.lb_source_ranges if family_of(r.split("/")[0]) == fam]
        for ip in lb_ips:
            key = f"{ip} . {proto} . {port}"
            out.add(FW_IPS, key)
            for r in ranges:
                out.add(FW_ALLOW, f"{key} . {r}")
    # NodePort
    if sp.node_port:
        key = f"{proto} . {sp.node_port}"
        c = _comment(spn, "NodePort")
        frontend(NODEPORTS, "nl" if sp.external_local else "nx", key, cat.external, c)
        if sp.external_local:
            frontend(NODEPORTS_SC, "ns", key, sc_eps, c)
        if not cat.external:
            out.add(NO_EP_NP, key, f"{c} : {no_ep_verdict}")
    if hairpin:
        out.elements[HAIRPIN] = {f"{ip} . {ip}": "" for ip in dict.fromkeys(hairpin)}
    if shape:
        out.chains, out.sets = _structure(t, tuple(shape))
    return out
