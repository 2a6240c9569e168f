"""kproxy's own light model of Services and EndpointSlices.

Objects are parsed straight from the API's JSON (plain dicts) into frozen slotted dataclasses: the
generated Kubernetes client models are far too slow and heavy at 100k endpoints. Everything here is
pure: no I/O, no kernel, no clock.

Parsing is strict where a bad value would produce a wrong rule (IPs, ports, protocols, duplicate port
names) and raises :class:`InvalidObject` with a human-readable reason; callers skip and log such objects
while everything else keeps syncing.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

PROTOCOLS = ("TCP", "UDP", "SCTP")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds, Kubernetes' default for sessionAffinity ClientIP
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
IPVS_SCHEDULER_ANNOTATION = "kproxy.io/ipvs-scheduler"
# set by the EndpointSlice controller: when the change that produced this slice version happened
# (kube-proxy measures network programming latency from it)
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"


class InvalidObject(ValueError):
    """A Service or EndpointSlice that cannot be programmed; the message says why."""


def family_of(ip: str) -> int:
    """4 or 6 for a canonical IP string."""
    return 6 if ":" in ip else 4


def canonical_ip(value: str) -> str | None:
    """The canonical text of an IP address, or None. (inet_pton is ~20x faster than ipaddress.)"""
    try:
        if ":" in value:
            return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, value))
        socket.inet_pton(socket.AF_INET, value)  # strict: rejects short forms and leading zeros
        return value
    except (OSError, ValueError, TypeError):
        return None


def _ip(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidObject(f"{what}: missing or not a string: {value!r}")
    ip = canonical_ip(value)
    if ip is None:
        raise InvalidObject(f"{what}: invalid IP address {value!r}")
    return ip


def _port(value: Any, what: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidObject(f"{what}: port must be an integer, got {value!r}")
    lo = 0 if allow_zero else 1
    if not lo <= value <= 65535:
        raise InvalidObject(f"{what}: port {value} out of range")
    return value


def _protocol(value: Any, what: str) -> str:
    proto = "TCP" if value is None else value
    if proto not in PROTOCOLS:
        raise InvalidObject(f"{what}: unknown protocol {value!r} (want one of {', '.join(PROTOCOLS)})")
    return proto


class PortSpec(NamedTuple):
    """One entry of a Service's spec.ports."""

    name: str
    protocol: str
    port: int
    node_port: int = 0
    target_port: int | str = 0
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class Service:
    """The parts of a v1 Service that the proxy, the health checker and DNS need."""

    namespace: str
    name: str
    type: str = "ClusterIP"
    cluster_ips: tuple[str, ...] = ()  # empty for headless and ExternalName
    headless: bool = False
    external_name: str = ""
    ports: tuple[PortSpec, ...] = ()
    external_ips: tuple[str, ...] = ()
    lb_ips: tuple[str, ...] = ()  # status.loadBalancer.ingress[].ip
    lb_source_ranges: tuple[str, ...] = ()
    affinity_timeout: int = 0  # seconds; 0 means no session affinity
    external_local: bool = False  # externalTrafficPolicy: Local
    internal_local: bool = False  # internalTrafficPolicy: Local
    health_check_node_port: int = 0
    publish_not_ready: bool = False
    scheduler: str = ""  # per-Service IPVS scheduler annotation
    resource_version: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def proxied(self) -> bool:
        """Whether the proxy programs this Service at all (not headless, not ExternalName)."""
        return bool(self.cluster_ips) and self.type != "ExternalName"


class Endpoint(NamedTuple):
    """One endpoint of an EndpointSlice (all of its addresses share the conditions)."""

    addresses: tuple[str, ...]
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    hostname: str = ""
    node_name: str = ""
    zone: str = ""
    hint_zones: tuple[str, ...] = ()
    target_ref: str = ""  # "Kind/namespace/name" of the backing object, for DNS and status


class SlicePort(NamedTuple):
    name: str
    protocol: str
    port: int


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    namespace: str
    name: str
    service_name: str
    address_type: str  # IPv4 | IPv6 | FQDN
    ports: tuple[SlicePort, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    resource_version: str = ""
    trigger_time: float = 0.0  # TRIGGER_TIME_ANNOTATION as a Unix timestamp; 0 when absent or unparsable

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    addresses: tuple[str, ...] = ()  # InternalIP/ExternalIP in order
    zone: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    pod_cidrs: tuple[str, ...] = ()


def _meta(obj: dict[str, Any], kind: str) -> tuple[str, str, dict[str, Any]]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        raise InvalidObject(f"{kind}: missing metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidObject(f"{kind}: missing metadata.name")
    ns = meta.get("namespace") or "default"
    if not isinstance(ns, str):
        raise InvalidObject(f"{kind} {name}: metadata.namespace is not a string")
    return ns, name, meta


def parse_service(obj: dict[str, Any]) -> Service:
    """Parse a v1 Service (as decoded JSON) or raise InvalidObject."""
    ns, name, meta = _meta(obj, "Service")
    where = f"Service {ns}/{name}"
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise InvalidObject(f"{where}: missing spec")
    stype = spec.get("type") or "ClusterIP"
    if stype not in SERVICE_TYPES:
        raise InvalidObject(f"{where}: unknown type {stype!r}")

    raw_ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    if not isinstance(raw_ips, list):
        raise InvalidObject(f"{where}: spec.clusterIPs is not a list")
    headless = bool(raw_ips) and raw_ips[0] == "None"
    cluster_ips: tuple[str, ...] = ()
    if not headless and stype != "ExternalName":
        ips = [_ip(v, f"{where}: spec.clusterIPs") for v in raw_ips]
        if len({family_of(i) for i in ips}) != len(ips):
            raise InvalidObject(f"{where}: spec.clusterIPs has two IPs of one family")
        cluster_ips = tuple(ips)

    external_name = ""
    if stype == "ExternalName":
        external_name = spec.get("externalName") or ""
        if not isinstance(external_name, str) or not external_name:
            raise InvalidObject(f"{where}: type ExternalName without spec.externalName")

    raw_ports = spec.get("ports") or []
    if not isinstance(raw_ports, list):
        raise InvalidObject(f"{where}: spec.ports is not a list")
    if not raw_ports and stype != "ExternalName" and not headless:
        raise InvalidObject(f"{where}: no ports")
    ports: list[PortSpec] = []
    seen_names: set[str] = set()
    seen_pp: set[tuple[int, str]] = set()
    for i, p in enumerate(raw_ports):
        if not isinstance(p, dict):
            raise InvalidObject(f"{where}: spec.ports[{i}] is not an object")
        pname = p.get("name") or ""
        if not isinstance(pname, str):
            raise InvalidObject(f"{where}: spec.ports[{i}].name is not a string")
        if pname in seen_names:
            raise InvalidObject(f"{where}: duplicate port name {pname!r}")
        if len(raw_ports) > 1 and not pname:
            raise InvalidObject(f"{where}: spec.ports[{i}] needs a name when there are several ports")
        seen_names.add(pname)
        what = f"{where}: spec.ports[{i}]"
        proto = _protocol(p.get("protocol"), what)
        port = _port(p.get("port"), what)
        if (port, proto) in seen_pp:
            raise InvalidObject(f"{where}: duplicate port {port}/{proto}")
        seen_pp.add((port, proto))
        node_port = _port(p.get("nodePort", 0) or 0, f"{what}.nodePort", allow_zero=True)
        tp = p.get("targetPort", port)
        if isinstance(tp, bool) or not isinstance(tp, int | str):
            raise InvalidObject(f"{what}: bad targetPort {tp!r}")
        ports.append(PortSpec(pname, proto, port, node_port if stype in ("NodePort", "LoadBalancer") else 0,
                              tp, p.get("appProtocol") or ""))

    ext = spec.get("externalIPs") or []
    if not isinstance(ext, list):
        raise InvalidObject(f"{where}: spec.externalIPs is not a list")
    external_ips = tuple(_ip(v, f"{where}: spec.externalIPs") for v in ext)

    lb_ips: list[str] = []
    if stype == "LoadBalancer":
        ingress = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        for ing in ingress if isinstance(ingress, list) else []:
            if isinstance(ing, dict) and ing.get("ip"):
                # ipMode Proxy means the LB delivers to the node; the VIP must not be short-circuited.
                if ing.get("ipMode") == "Proxy":
                    continue
                lb_ips.append(_ip(ing["ip"], f"{where}: status.loadBalancer.ingress.ip"))
    ranges = spec.get("loadBalancerSourceRanges") or []
    lb_source_ranges = []
    for r in ranges if isinstance(ranges, list) else []:
        try:
            lb_source_ranges.append(str(ipaddress.ip_network(str(r).strip(), strict=False)))
        except ValueError:
            raise InvalidObject(f"{where}: bad loadBalancerSourceRanges entry {r!r}") from None

    affinity_timeout = 0
    if spec.get("sessionAffinity") == "ClientIP":
        cfg = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
        t = cfg.get("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT)
        if isinstance(t, bool) or not isinstance(t, int) or not 0 < t <= 86400:
            raise InvalidObject(f"{where}: sessionAffinityConfig.clientIP.timeoutSeconds {t!r} out of range")
        affinity_timeout = t
    elif spec.get("sessionAffinity") not in (None, "", "None"):
        raise InvalidObject(f"{where}: unknown sessionAffinity {spec.get('sessionAffinity')!r}")

    hc = spec.get("healthCheckNodePort", 0) or 0
    external_local = spec.get("externalTrafficPolicy") in ("Local",) and stype in ("NodePort", "LoadBalancer")
    annotations = meta.get("annotations") or {}
    return Service(
        namespace=ns,
        name=name,
        type=stype,
        cluster_ips=cluster_ips,
        headless=headless,
        external_name=external_name,
        ports=tuple(ports),
        external_ips=external_ips,
        lb_ips=tuple(lb_ips),
        lb_source_ranges=tuple(lb_source_ranges),
        affinity_timeout=affinity_timeout,
        external_local=external_local,
        internal_local=spec.get("internalTrafficPolicy") == "Local",
        health_check_node_port=_port(hc, f"{where}: healthCheckNodePort", allow_zero=True)
        if external_local else 0,
        publish_not_ready=bool(spec.get("publishNotReadyAddresses")),
        scheduler=str(annotations.get(IPVS_SCHEDULER_ANNOTATION, "")) if isinstance(annotations, dict) else "",
        resource_version=str(meta.get("resourceVersion") or ""),
    )


def parse_endpoint_slice(obj: dict[str, Any]) -> EndpointSlice:
    """Parse a discovery.k8s.io/v1 EndpointSlice or raise InvalidObject."""
    ns, name, meta = _meta(obj, "EndpointSlice")
    where = f"EndpointSlice {ns}/{name}"
    labels = meta.get("labels") or {}
    svc = labels.get(SERVICE_NAME_LABEL) if isinstance(labels, dict) else None
    if not svc or not isinstance(svc, str):
        raise InvalidObject(f"{where}: no {SERVICE_NAME_LABEL} label")
    atype = obj.get("addressType") or "IPv4"
    if atype not in ("IPv4", "IPv6", "FQDN"):
        raise InvalidObject(f"{where}: unknown addressType {atype!r}")
    raw_ports = obj.get("ports") or []
    if not isinstance(raw_ports, list):
        raise InvalidObject(f"{where}: ports is not a list")
    ports = []
    seen: set[str] = set()
    for i, p in enumerate(raw_ports):
        if not isinstance(p, dict):
            raise InvalidObject(f"{where}: ports[{i}] is not an object")
        pname = p.get("name") or ""
        if pname in seen:
            raise InvalidObject(f"{where}: duplicate port name {pname!r}")
        seen.add(pname)
        what = f"{where}: ports[{i}]"
        ports.append(SlicePort(pname, _protocol(p.get("protocol"), what), _port(p.get("port"), what)))
    endpoints = []
    raw_eps = obj.get("endpoints") or []
    if not isinstance(raw_eps, list):
        raise InvalidObject(f"{where}: endpoints is not a list")
    want = 6 if atype == "IPv6" else 4
    new = tuple.__new__  # positional construction: this loop runs 100k times on a full relist
    for i, e in enumerate(raw_eps):
        if not isinstance(e, dict):
            raise InvalidObject(f"{where}: endpoints[{i}] is not an object")
        addrs = e.get("addresses")
        if not addrs or not isinstance(addrs, list):
            raise InvalidObject(f"{where}: endpoints[{i}] has no addresses")
        if atype == "FQDN":
            parsed = tuple(str(a) for a in addrs)
        else:
            parsed = tuple([_ip(a, f"{where}: endpoints[{i}].addresses") for a in addrs])
            for a in parsed:
                if (6 if ":" in a else 4) != want:
                    raise InvalidObject(f"{where}: endpoints[{i}] address family does not match {atype}")
        cond = e.get("conditions")
        if cond:
            # Per the API: nil ready means ready; nil serving means equal to ready; nil terminating false.
            ready = cond.get("ready")
            ready = True if ready is None else bool(ready)
            serving = cond.get("serving")
            serving = ready if serving is None else bool(serving)
            terminating = bool(cond.get("terminating"))
        else:
            ready = serving = True
            terminating = False
        hints = e.get("hints")
        zones: tuple[str, ...] = ()
        if hints:
            zones = tuple(str(h.get("name")) for h in hints.get("forZones") or ()
                          if isinstance(h, dict) and h.get("name"))
        tref = e.get("targetRef")
        ref = ""
        if tref and isinstance(tref, dict) and tref.get("name"):
            ref = f"{tref.get('kind', '')}/{tref.get('namespace', '')}/{tref.get('name', '')}"
        endpoints.append(new(Endpoint, (parsed, ready, serving, terminating, str(e.get("hostname") or ""),
                                        str(e.get("nodeName") or ""), str(e.get("zone") or ""), zones, ref)))
    annotations = meta.get("annotations")
    trigger = annotations.get(TRIGGER_TIME_ANNOTATION) if isinstance(annotations, dict) else None
    return EndpointSlice(ns, name, svc, atype, tuple(ports), tuple(endpoints),
                         str(meta.get("resourceVersion") or ""), parse_timestamp(trigger))


def parse_timestamp(value: object) -> float:
    """An RFC 3339 timestamp (``2026-11-24T21:00:00.123456789Z``) as a Unix time; 0.0 if it is not one.

    Only an observability input (never fails the object): Python's parser takes at most microseconds, so
    nanosecond fractions are cut to six digits first.
    """
    if not isinstance(value, str) or not value:
        return 0.0
    text = value.strip()
    dot = text.find(".")
    if dot != -1:
        end = dot + 1
        while end < len(text) and text[end].isdigit():
            end += 1
        text = text[:dot + 1] + text[dot + 1:end][:6].ljust(6, "0") + text[end:]
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        return 0.0
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.timestamp()


def parse_node(obj: dict[str, Any]) -> Node:
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):
        raise InvalidObject("Node: missing metadata.name")
    labels = meta.get("labels") or {}
    addrs = []
    for a in ((obj.get("status") or {}).get("addresses") or []):
        if isinstance(a, dict) and a.get("type") in ("InternalIP", "ExternalIP") and a.get("address"):
            try:
                addrs.append(str(ipaddress.ip_address(a["address"])))
            except ValueError:
                continue
    spec = obj.get("spec") or {}
    cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    return Node(
        name=str(meta["name"]),
        addresses=tuple(addrs),
        zone=str(labels.get("topology.kubernetes.io/zone", "")),
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
        pod_cidrs=tuple(str(c) for c in cidrs),
    )


def is_proxyable(obj_meta: dict[str, Any]) -> bool:
    """kube-proxy ignores Services labelled with a service-proxy-name (another proxy owns them)."""
    labels = obj_meta.get("labels") or {}
    return not (isinstance(labels, dict) and labels.get(SERVICE_PROXY_NAME_LABEL))
