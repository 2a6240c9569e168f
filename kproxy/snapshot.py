"""The proxy's desired-state snapshot: Service ports and their endpoints, with change tracking.

A :class:`ProxySnapshot` is what every data plane renders from. It is keyed by
:class:`ServicePortName` (``namespace/name:portName/protocol``, as in kube-proxy) and is rebuilt
incrementally: :meth:`ProxySnapshot.update` recomputes only the Services the store marked dirty and
returns a :class:`Changes` record naming exactly which service ports changed, which were removed, and
which UDP conntrack entries went stale. Everything here is pure computation over the model.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import NamedTuple

from .model import Endpoint, Node, Service, family_of
from .store import ClusterStore, ServiceKey


class ServicePortName(NamedTuple):
    """A NamedTuple, not a dataclass: it keys every per-port dict, and a tuple hashes in C."""

    namespace: str
    name: str
    port: str  # the port's name, "" for a single unnamed port
    protocol: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}:{self.port}/{self.protocol}"

    @property
    def service_key(self) -> ServiceKey:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One port of a proxied Service, with everything a data plane needs to program it."""

    spn: ServicePortName
    cluster_ips: tuple[str, ...]
    port: int
    protocol: str
    node_port: int = 0
    external_ips: tuple[str, ...] = ()
    lb_ips: tuple[str, ...] = ()
    lb_source_ranges: tuple[str, ...] = ()
    affinity_timeout: int = 0
    external_local: bool = False
    internal_local: bool = False
    health_check_node_port: int = 0
    scheduler: str = ""

    def cluster_ip(self, family: int) -> str | None:
        for ip in self.cluster_ips:
            if family_of(ip) == family:
                return ip
        return None

    def external_vips(self, family: int) -> tuple[str, ...]:
        """externalIPs and LoadBalancer ingress IPs of one family (the "external" destinations)."""
        return tuple(ip for ip in (*self.external_ips, *self.lb_ips) if family_of(ip) == family)

    @property
    def uses_local(self) -> bool:
        return self.external_local or self.internal_local

    @property
    def has_external(self) -> bool:
        return bool(self.node_port or self.external_ips or self.lb_ips)


class EndpointInfo(NamedTuple):
    """One endpoint of a service port. A NamedTuple: 100k of these are built per full resync."""

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    is_local: bool = False
    node_name: str = ""
    zone: str = ""
    hint_zones: tuple[str, ...] = ()

    @property
    def family(self) -> int:
        return family_of(self.ip)

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@dataclass(slots=True)
class StaleUDP:
    """Conntrack entries to delete: flows to ``vip``:``port`` that reached ``endpoint_ip``.

    ``endpoint_ip`` empty means every entry whose original destination is the VIP (the Service went
    from no endpoints to some, so entries created while it black-holed traffic must go).
    """

    vip: str
    port: int
    protocol: str
    endpoint_ip: str = ""
    node_port: bool = False


@dataclass(slots=True)
class Changes:
    changed: set[ServicePortName] = field(default_factory=set)
    removed: set[ServicePortName] = field(default_factory=set)
    stale_udp: list[StaleUDP] = field(default_factory=list)
    node_changed: bool = False
    service_keys: set[ServiceKey] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.changed or self.removed or self.node_changed)

    def merge(self, other: Changes) -> None:
        self.changed |= other.changed
        self.removed |= other.removed
        self.stale_udp.extend(other.stale_udp)
        self.node_changed |= other.node_changed
        self.service_keys |= other.service_keys


def service_ports(svc: Service) -> dict[ServicePortName, ServicePort]:
    if not svc.proxied:
        return {}
    out = {}
    for p in svc.ports:
        spn = ServicePortName(svc.namespace, svc.name, p.name, p.protocol)
        out[spn] = ServicePort(
            spn=spn,
            cluster_ips=svc.cluster_ips,
            port=p.port,
            protocol=p.protocol,
            node_port=p.node_port,
            external_ips=svc.external_ips,
            lb_ips=svc.lb_ips,
            lb_source_ranges=svc.lb_source_ranges,
            affinity_timeout=svc.affinity_timeout,
            external_local=svc.external_local,
            internal_local=svc.internal_local,
            health_check_node_port=svc.health_check_node_port,
            scheduler=svc.scheduler,
        )
    return out


_IP = itemgetter(0)


def _slice_infos(endpoints: tuple[Endpoint, ...], port: int, node_name: str) -> list[EndpointInfo]:
    """One slice's endpoints for one of its ports (positional tuple construction: 100k per full sync)."""
    new = tuple.__new__
    local = node_name or None  # None never equals a node name: no endpoint is local without one
    # kube-proxy uses the first address only
    return [new(EndpointInfo, (addrs[0], port, ready, serving, terminating, node == local, node, zone, hints))
            for addrs, ready, serving, terminating, _host, node, zone, hints, _ref in endpoints]


def _merge(parts: list[list[EndpointInfo]]) -> tuple[EndpointInfo, ...]:
    """Merge one port's endpoints from several slices (or with duplicates), sorted by (ip, port).

    The same endpoint in two slices (during a slice migration): the first wins unless a later one is
    ready and it is not.
    """
    bucket: dict[tuple[str, int], EndpointInfo] = {}
    for infos in parts:
        for info in infos:
            k = (info.ip, info.port)
            prev = bucket.get(k)
            if prev is None or (info.ready and not prev.ready):
                bucket[k] = info
    return tuple(bucket[k] for k in sorted(bucket))


def service_endpoints(store: ClusterStore, key: ServiceKey, node_name: str
                      ) -> dict[tuple[str, str], tuple[EndpointInfo, ...]]:
    """Endpoints of one Service merged from all its slices, keyed by (port name, protocol)."""
    slices = store.slices_for(key)
    if len(slices) == 1 and slices[0].address_type != "FQDN":
        # the common case, one slice (its port names are unique): no merging across slices
        sl = slices[0]
        one: dict[tuple[str, str], tuple[EndpointInfo, ...]] = {}
        for sp in sl.ports:
            infos = _slice_infos(sl.endpoints, sp.port, node_name)
            # one port: without duplicate addresses, sorting by ip is sorting by (ip, port)
            if len({e[0] for e in infos}) == len(infos):
                infos.sort(key=_IP)
                one[(sp.name, sp.protocol)] = tuple(infos)
            else:
                one[(sp.name, sp.protocol)] = _merge([infos])
        return one
    parts: dict[tuple[str, str], list[list[EndpointInfo]]] = {}
    for sl in slices:
        if sl.address_type == "FQDN":
            continue
        for sp in sl.ports:
            infos = _slice_infos(sl.endpoints, sp.port, node_name)
            pk = (sp.name, sp.protocol)
            got = parts.get(pk)
            if got is None:
                parts[pk] = [infos]
            else:
                got.append(infos)
    return {pk: _merge(got) for pk, got in parts.items()}


class ProxySnapshot:
    """Desired state of every proxied service port, updated incrementally from a ClusterStore."""

    CONSUMER = "proxy"

    def __init__(self, store: ClusterStore, node_name: str = "") -> None:
        self.store = store
        self.node_name = node_name or store.node_name
        self.services: dict[ServicePortName, ServicePort] = {}
        self.endpoints: dict[ServicePortName, tuple[EndpointInfo, ...]] = {}
        self._by_service: dict[ServiceKey, tuple[ServicePortName, ...]] = {}
        self.node: Node | None = None
        store.register(self.CONSUMER)

    def update(self) -> Changes:
        """Pull the store's dirty Services and recompute them; return what changed."""
        dirty, nodes_changed = self.store.take_dirty(self.CONSUMER)
        return self.recompute(dirty, nodes_changed)

    def recompute(self, keys: Iterable[ServiceKey], nodes_changed: bool = False) -> Changes:
        ch = Changes(node_changed=nodes_changed)
        if nodes_changed:
            self.node = self.store.node
        # Everything built here stays alive (a full recompute: ~100k endpoint tuples): the cyclic GC
        # would only rescan the store over and over (~1/3 of a 10k-Service recompute).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for key in keys:
                ch.service_keys.add(key)
                self._recompute_service(key, ch)
        finally:
            if gc_was_enabled:
                gc.enable()
        return ch

    def _recompute_service(self, key: ServiceKey, ch: Changes) -> None:
        svc = self.store.services.get(key)
        new_ports = service_ports(svc) if svc is not None else {}
        eps_by_port = service_endpoints(self.store, key, self.node_name) if new_ports else {}
        old_spns = self._by_service.get(key, ())
        for spn in old_spns:
            if spn not in new_ports:
                old_sp = self.services.pop(spn)
                old_eps = self.endpoints.pop(spn, ())
                ch.removed.add(spn)
                ch.changed.discard(spn)
                if spn.protocol == "UDP":
                    for ep in old_eps:
                        _stale_for(old_sp, ep.ip, ch.stale_udp)
        for spn, sp in new_ports.items():
            eps = eps_by_port.get((spn.port, spn.protocol), ())
            old_sp = self.services.get(spn)
            old_eps = self.endpoints.get(spn, ())
            if old_sp is not None and old_sp == sp and old_eps == eps:
                continue
            self.services[spn] = sp
            self.endpoints[spn] = eps
            ch.changed.add(spn)
            ch.removed.discard(spn)
            if spn.protocol == "UDP":
                new_ips = {e.ip for e in eps if e.ready or (e.serving and e.terminating)}
                old_ips = {e.ip for e in old_eps if e.ready or (e.serving and e.terminating)}
                if old_sp is not None:
                    for ip in old_ips - new_ips:
                        _stale_for(old_sp, ip, ch.stale_udp)
                if new_ips and not old_ips:
                    _stale_for(sp, "", ch.stale_udp)
        if new_ports:
            self._by_service[key] = tuple(new_ports)
        else:
            self._by_service.pop(key, None)


def _stale_for(sp: ServicePort, endpoint_ip: str, out: list[StaleUDP]) -> None:
    fam = family_of(endpoint_ip) if endpoint_ip else 0
    for vip in (*sp.cluster_ips, *sp.external_ips, *sp.lb_ips):
        if fam and family_of(vip) != fam:
            continue
        out.append(StaleUDP(vip, sp.port, sp.protocol, endpoint_ip))
    if sp.node_port:
        out.append(StaleUDP("", sp.node_port, sp.protocol, endpoint_ip, node_port=True))


# ---- endpoint selection shared by every data plane (kube-proxy's pkg/proxy/topology.go) -------------

class Categorized(NamedTuple):
    """Which endpoints each kind of traffic may use (one family's endpoints in, as given).

    ``internal`` serves traffic to the ClusterIP (subject to internalTrafficPolicy), ``external`` traffic
    to NodePorts, externalIPs and LoadBalancer IPs (subject to externalTrafficPolicy); ``reachable`` is
    their union, used for "does this Service have endpoints" decisions. (A NamedTuple: one is built per
    service port and family on every full sync.)
    """

    internal: tuple[EndpointInfo, ...]
    external: tuple[EndpointInfo, ...]
    reachable: tuple[EndpointInfo, ...]
    # kube-proxy's hasAnyEndpoints: a usable endpoint exists somewhere in the cluster, so traffic that
    # finds none under its policy is DROPped ("has no local endpoints") rather than REJECTed
    has_any: bool = False


def _can_use_topology(eps: Iterable[EndpointInfo], node_zone: str) -> bool:
    if not node_zone:
        return False
    has_zone = False
    for ep in eps:
        if not ep.ready:
            continue
        if not ep.hint_zones:
            return False
        if node_zone in ep.hint_zones:
            has_zone = True
    return has_zone


def categorize(sp: ServicePort, eps: Iterable[EndpointInfo], node_zone: str = "") -> Categorized:
    """Pick the usable endpoints for a service port, with topology hints and terminating fallback."""
    if type(eps) is not tuple:
        eps = tuple(eps)
    if node_zone and _can_use_topology(eps, node_zone):
        cluster = tuple([e for e in eps if e.ready and node_zone in e.hint_zones])
    else:
        cluster = tuple([e for e in eps if e.ready])
    if not cluster:
        cluster = tuple([e for e in eps if e.serving and e.terminating])
    if not (sp.external_local or sp.internal_local):
        return Categorized(cluster, cluster if sp.has_external else (), cluster, bool(cluster))
    local = tuple([e for e in eps if e.ready and e.is_local])
    if not local:
        local = tuple([e for e in eps if e.serving and e.terminating and e.is_local])
    internal = local if sp.internal_local else cluster
    external = (local if sp.external_local else cluster) if sp.has_external else ()
    if internal == external or not external:
        reachable = internal
    else:
        reachable = tuple(sorted(set(internal) | set(external)))
    return Categorized(internal, external, reachable, bool(cluster or local))
