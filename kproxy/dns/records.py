"""Record generation: Services, EndpointSlices and Nodes → DNS resource records (pure, no I/O).

Implements the Kubernetes DNS-Based Service Discovery specification, schema 1.1.0
(https://github.com/kubernetes/dns/blob/master/docs/specification.md), for one cluster zone:

- ClusterIP (also NodePort/LoadBalancer): ``<svc>.<ns>.svc.<zone>`` A/AAAA → ClusterIPs; SRV
  ``_<port>._<proto>.<svc>.<ns>.svc.<zone>`` for every named Service port, targeting the Service name;
  PTR (in-addr.arpa / ip6.arpa) for every ClusterIP.
- Headless: A/AAAA per *ready* endpoint (all endpoints with ``publishNotReadyAddresses``) at the Service
  name, ``<hostname>.<svc>.<ns>.svc.<zone>`` per endpoint, SRV per endpoint x named EndpointSlice port
  (the ports the pods really listen on, as CoreDNS does) and PTR to the hostname record. An endpoint
  without ``hostname`` gets the system-assigned hostname the spec allows: its address with ``.``/``:``
  replaced by ``-`` (CoreDNS's choice, e.g. ``10-244-1-7``). No ready endpoints → no records (NXDOMAIN).
- ExternalName: CNAME to the external name.
- kproxy extension for NodePort/LoadBalancer Services: SRV
  ``_<port>._<proto>.<svc>.<ns>.nodeport.<zone>`` → ``<node>.node.<zone>`` with the node port, one per
  node, and A/AAAA ``<node>.node.<zone>`` for every Node's addresses.
- Zone apex: SOA, NS ``ns.dns.<zone>`` (with its A/AAAA) and TXT ``dns-version.<zone>`` "1.1.0".

Records are ``RR(owner, rtype, rdata)``: owner is lower-case absolute text (``a.b.``), rdata is the record's
uncompressed wire form, so the table can assemble responses without dnspython on the hot path.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from ..model import EndpointSlice, Node, Service

SCHEMA_VERSION = "1.1.0"

# RR types (IANA)
A, NS, CNAME, SOA, PTR, TXT, AAAA, SRV = 1, 2, 5, 6, 12, 16, 28, 33
TYPE_NAMES = {A: "A", NS: "NS", CNAME: "CNAME", SOA: "SOA", PTR: "PTR", TXT: "TXT", AAAA: "AAAA", SRV: "SRV"}

REVERSE_ZONES = ("in-addr.arpa.", "ip6.arpa.")


class RR(NamedTuple):
    owner: str  # lower-case, absolute ("web.default.svc.cluster.local.")
    rtype: int
    rdata: bytes  # uncompressed wire rdata


class BadName(ValueError):
    pass


def normalize_zone(zone: str) -> str:
    z = zone.strip().lower().rstrip(".")
    if not z:
        raise BadName("empty zone")
    name_wire(z + ".")
    return z + "."


def name_wire(name: str) -> bytes:
    """Uncompressed wire form of an absolute lower-case name; raises BadName."""
    if name == ".":
        return b"\x00"
    if not name.endswith(".") or not name.isascii():
        raise BadName(f"not an absolute ASCII name: {name!r}")
    labels = name[:-1].encode("ascii").split(b".")
    for label in labels:
        if not 0 < len(label) <= 63:
            raise BadName(f"bad label {label!r} in {name!r}")
    out = b"".join([_LEN[len(label)] + label for label in labels]) + b"\x00"
    if len(out) > 255:
        raise BadName(f"name too long: {name!r}")
    return out


_LEN = [bytes((i,)) for i in range(64)]


def reverse_name(ip: str) -> str:
    """The in-addr.arpa / ip6.arpa owner for an IP (canonical text)."""
    if ":" in ip:
        nibbles = socket.inet_pton(socket.AF_INET6, ip).hex()
        return ".".join(reversed(nibbles)) + ".ip6.arpa."
    return ".".join(reversed(ip.split("."))) + ".in-addr.arpa."


def ip_rr(owner: str, ip: str) -> RR:
    if ":" in ip:
        return RR(owner, AAAA, socket.inet_pton(socket.AF_INET6, ip))
    return RR(owner, A, socket.inet_pton(socket.AF_INET, ip))


def srv_rdata(priority: int, weight: int, port: int, target: str) -> bytes:
    return struct.pack("!HHH", priority, weight, port) + name_wire(target)


def txt_rdata(*strings: str) -> bytes:
    out = bytearray()
    for s in strings:
        raw = s.encode()
        out.append(len(raw))
        out += raw
    return bytes(out)


def soa_rdata(zone: str, serial: int, ttl: int) -> bytes:
    mname = name_wire(f"ns.dns.{zone}")
    rname = name_wire(f"hostmaster.{zone}")
    # refresh 7200, retry 1800, expire 86400, minimum (negative TTL) = the record TTL (CoreDNS' choice)
    return mname + rname + struct.pack("!IIIII", serial & 0xFFFFFFFF, 7200, 1800, 86400, ttl)


def srv_weight(n: int) -> int:
    """Equal weights summing to about 100 (CoreDNS' scheme)."""
    return max(1, 100 // max(1, n))


def endpoint_hostname(hostname: str, address: str) -> str:
    """The spec's _hostname_: the endpoint's hostname, else a system-assigned one derived from its IP."""
    if hostname:
        return hostname.lower()
    return address.replace(".", "-").replace(":", "-")


def service_records(svc: Service, slices: Sequence[EndpointSlice], zone: str,
                    node_names: Sequence[str] = ()) -> list[RR]:
    """All records one Service contributes (deterministic order). ``zone`` is absolute lower-case."""
    base = f"{svc.name}.{svc.namespace}.svc.{zone}".lower()
    out: list[RR] = []
    if svc.type == "ExternalName":
        target = svc.external_name.strip().lower().rstrip(".") + "."
        try:
            out.append(RR(base, CNAME, name_wire(target)))
        except BadName:
            return []  # not a valid DNS name: nothing to publish (logged by the caller)
        return out
    if svc.headless:
        out.extend(_headless_records(svc, slices, base))
    else:
        for ip in svc.cluster_ips:
            out.append(ip_rr(base, ip))
        named = [p for p in svc.ports if p.name]
        for p in named:
            out.append(RR(f"_{p.name.lower()}._{p.protocol.lower()}.{base}", SRV,
                          srv_rdata(0, 100, p.port, base)))
        for ip in svc.cluster_ips:
            out.append(RR(reverse_name(ip), PTR, name_wire(base)))
    if svc.type in ("NodePort", "LoadBalancer") and node_names:
        np_base = f"{svc.name}.{svc.namespace}.nodeport.{zone}".lower()
        w = srv_weight(len(node_names))
        for p in svc.ports:
            if not p.name or not p.node_port:
                continue
            owner = f"_{p.name.lower()}._{p.protocol.lower()}.{np_base}"
            for node in node_names:
                out.append(RR(owner, SRV, srv_rdata(0, w, p.node_port, node_owner(node, zone))))
    return out


def _headless_records(svc: Service, slices: Sequence[EndpointSlice], base: str) -> list[RR]:
    # (hostname, ip) pairs of the published endpoints, deduplicated, in slice order
    eps: dict[tuple[str, str], None] = {}
    ports: dict[tuple[str, str, int], None] = {}
    for sl in sorted(slices, key=lambda s: s.name):
        if sl.address_type not in ("IPv4", "IPv6"):
            continue
        published = False
        for ep in sl.endpoints:
            if not (ep.ready or svc.publish_not_ready):
                continue
            for ip in ep.addresses:
                eps[(endpoint_hostname(ep.hostname, ip), ip)] = None
                published = True
        if published:
            for sp in sl.ports:
                if sp.name:
                    ports[(sp.name.lower(), sp.protocol.lower(), sp.port)] = None
    if not eps:
        return []
    out: list[RR] = []
    valid: list[tuple[str, str]] = []
    for host, ip in eps:
        owner = f"{host}.{base}"
        try:
            name_wire(owner)
        except BadName:
            continue
        valid.append((host, ip))
        out.append(ip_rr(base, ip))
        out.append(ip_rr(owner, ip))
    hosts = list(dict.fromkeys(h for h, _ in valid))
    w = srv_weight(len(hosts))
    for pname, proto, port in ports:
        owner = f"_{pname}._{proto}.{base}"
        for h in hosts:
            out.append(RR(owner, SRV, srv_rdata(0, w, port, f"{h}.{base}")))
    for host, ip in valid:
        out.append(RR(reverse_name(ip), PTR, name_wire(f"{host}.{base}")))
    return out


def node_owner(node: str, zone: str) -> str:
    return f"{node.lower().rstrip('.')}.node.{zone}"


def node_records(nodes: Iterable[Node], zone: str) -> list[RR]:
    out: list[RR] = []
    for n in sorted(nodes, key=lambda n: n.name):
        owner = node_owner(n.name, zone)
        try:
            name_wire(owner)
        except BadName:
            continue
        for ip in dict.fromkeys(n.addresses):
            out.append(ip_rr(owner, ip))
    return out


def apex_records(zone: str, ns_addresses: Sequence[str]) -> list[RR]:
    """NS, its address records and the schema version TXT (the SOA, which carries the serial, is added by
    the table builder)."""
    out = [
        RR(zone, NS, name_wire(f"ns.dns.{zone}")),
        RR(f"dns-version.{zone}", TXT, txt_rdata(SCHEMA_VERSION)),
    ]
    out.extend(ip_rr(f"ns.dns.{zone}", ip) for ip in dict.fromkeys(ns_addresses))
    return out
