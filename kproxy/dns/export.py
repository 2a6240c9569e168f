"""Export the answer table as RFC 1035 master files (``named-checkzone`` accepts them).

The cluster zone holds everything under ``<zone>``; PTR records live in ``in-addr.arpa.`` and ``ip6.arpa.``,
which are separate zones and therefore separate files. Every record the server answers from its table is
in one of them; the synthesized ``<ip>.<ns>.pod.<zone>`` records (spec 2.6: any address answers) cannot
be enumerated and are not.
"""

from __future__ import annotations

import dns.rdata
import dns.rdataclass
import dns.rdatatype

from .records import NS, REVERSE_ZONES, SOA, name_wire
from .table import TableBuilder

_ORDER = {SOA: 0, NS: 1}


def zone_files(builder: TableBuilder) -> dict[str, str]:
    """{origin: master file text} for the cluster zone and each reverse zone that has records."""
    by_zone: dict[str, list[tuple[str, int, list[bytes]]]] = {builder.zone: []}
    for owner, rtype, rdatas in builder.rrset_items():
        for apex in (builder.zone, *REVERSE_ZONES):
            if owner == apex or owner.endswith("." + apex):
                by_zone.setdefault(apex, []).append((owner, rtype, rdatas))
                break
    out = {}
    soa = builder.soa_rdata()
    ns = name_wire(f"ns.dns.{builder.zone}")
    for apex, items in by_zone.items():
        items.append((apex, SOA, [soa]))
        if apex != builder.zone:
            items.append((apex, NS, [ns]))
        out[apex] = render_zone(apex, builder.ttl, items)
    return out


def _name_key(owner: str) -> tuple[str, ...]:
    return tuple(reversed(owner.rstrip(".").split(".")))


def render_zone(origin: str, ttl: int, items: list[tuple[str, int, list[bytes]]]) -> str:
    lines = [f"; kproxy cluster DNS, schema 1.1.0; zone {origin}", f"$ORIGIN {origin}", f"$TTL {ttl}"]
    items = sorted(items, key=lambda i: (i[0] != origin, _name_key(i[0]), _ORDER.get(i[1], 2), i[1]))
    for owner, rtype, rdatas in items:
        tname = dns.rdatatype.to_text(dns.rdatatype.RdataType.make(rtype))
        for rd in rdatas:
            rdata = dns.rdata.from_wire(dns.rdataclass.IN, rtype, rd, 0, len(rd))
            lines.append(f"{owner} {ttl} IN {tname} {rdata.to_text()}")
    return "\n".join(lines) + "\n"
