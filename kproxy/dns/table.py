"""The answer table: every response the server can give, prebuilt as bytes, swapped atomically.

:class:`TableBuilder` keeps the records each source (a Service, the Nodes, the zone apex) contributes and
merges them into RRsets. :meth:`TableBuilder.build` returns a new immutable :class:`Table`; only RRsets
touched since the previous build are re-encoded (a Service change costs microseconds even with 10,000
Services in the zone), the rest of the dicts are copied by reference. The server swaps one reference, so
a query sees either the old table or the new one, never half an update.

A :class:`Entry` is a complete response minus the 2-byte ID and the echoed question: header flags and
counts for queries with and without EDNS, the answer/authority/additional sections (owner names of answer
records are a compression pointer to the question, ``\\xc0\\x0c``, so the client's 0x20 case is kept),
and a smaller variant without the additional section for when the full one does not fit.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from .records import AAAA, CNAME, NS, REVERSE_ZONES, RR, SOA, SRV, A, name_wire, soa_rdata

RCODE_NOERROR, RCODE_FORMERR, RCODE_SERVFAIL, RCODE_NXDOMAIN, RCODE_NOTIMP, RCODE_REFUSED = 0, 1, 2, 3, 4, 5

ZONE_FORWARD, ZONE_V4REV, ZONE_V6REV = 0, 1, 2

FORWARD = "forward"  # sentinel: not ours (forward upstream or REFUSED)
SYNTH = "synth"  # sentinel: needs query-time synthesis (pod A records, ExternalName chase)


class Entry(NamedTuple):
    hdr: tuple[bytes, bytes]  # flags + QDCOUNT=1, indexed by the query's RD bit
    counts: bytes  # AN, NS, AR counts (6 bytes), no EDNS
    counts_edns: bytes  # same with AR + 1 for the OPT record
    body: bytes
    counts_min: bytes  # without the additional section (if the full response does not fit)
    counts_min_edns: bytes
    body_min: bytes
    rcode: int


def _rr_bytes(owner_wire: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner_wire + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


def make_entry(rcode: int, answer: list[bytes], authority: list[bytes], additional: list[bytes],
               ra: bool, aa: bool = True) -> Entry:
    b2 = 0x80 | (0x04 if aa else 0)
    b3 = (0x80 if ra else 0) | rcode
    hdr = (bytes((b2, b3, 0, 1)), bytes((b2 | 1, b3, 0, 1)))
    an, ns, ar = len(answer), len(authority), len(additional)
    body_min = b"".join(answer) + b"".join(authority)
    return Entry(hdr, struct.pack("!HHH", an, ns, ar), struct.pack("!HHH", an, ns, ar + 1),
                 body_min + b"".join(additional), struct.pack("!HHH", an, ns, 0), struct.pack("!HHH", an, ns, 1),
                 body_min, rcode)


def label_offsets(wire: bytes) -> list[int] | None:
    """Offsets of every label start (and the root) in an uncompressed wire name, or None if malformed."""
    out = []
    i, n = 0, len(wire)
    while i < n:
        out.append(i)
        ln = wire[i]
        if ln == 0:
            return out if i == n - 1 else None
        if ln > 63:
            return None
        i += ln + 1
    return None


@dataclass(frozen=True, slots=True)
class Table:
    zone: str  # absolute lower-case text
    zone_wire: bytes
    answers: dict[bytes, Entry]  # lower-case qname wire + 2-byte qtype → response
    names: dict[bytes, int]  # every existing name (incl. empty non-terminals) → ZONE_* it belongs to
    cnames: dict[bytes, bytes]  # ExternalName owner → target name wire
    nodata: tuple[Entry, Entry, Entry]  # per ZONE_*
    nxdomain: Entry
    serial: int
    ttl: int
    ra: bool
    pod_suffix: bytes = field(default=b"")

    def lookup(self, qname: bytes, qtype: bytes) -> Entry | str:
        """Entry for a lower-case qname wire and qtype, FORWARD (not our zone) or SYNTH."""
        e = self.answers.get(qname + qtype)
        if e is not None:
            return e
        if qname in self.cnames:
            return SYNTH
        z = self.names.get(qname)
        if z is not None:
            return self.nodata[z]
        offs = label_offsets(qname)
        if offs is None:
            return FORWARD
        zw = self.zone_wire
        for o in offs:
            if qname[o:] == zw:
                return SYNTH if self._is_pod_name(qname, offs) else self.nxdomain
        return FORWARD

    def _is_pod_name(self, qname: bytes, offs: list[int]) -> bool:
        # <ip>.<ns>.pod.<zone>: exactly two labels above pod.<zone>
        return len(offs) >= 3 and qname[offs[2]:] == self.pod_suffix


class TableBuilder:
    """Merges per-source records into RRsets and builds :class:`Table` snapshots incrementally."""

    def __init__(self, zone: str, ttl: int = 5, ra: bool = False) -> None:
        self.zone = zone
        self.zone_wire = name_wire(zone)
        self.ttl = ttl
        self.ra = ra
        self.contrib: dict[object, list[RR]] = {}
        self.rrsets: dict[tuple[str, int], dict[bytes, int]] = {}  # rdata → refcount, insertion-ordered
        self.name_refs: dict[str, int] = {}
        self.refs: dict[str, set[tuple[str, int]]] = {}  # SRV target owner → SRV RRsets naming it
        self._touched: set[tuple[str, int]] = set()
        self._names_touched: set[str] = set()
        self._wire_cache: dict[str, bytes] = {}
        self.serial = 0
        self.table: Table | None = None

    # ---- records ------------------------------------------------------------------------------------
    def set_records(self, source: object, rrs: Iterable[RR]) -> None:
        """Replace everything ``source`` contributes with ``rrs`` (empty: remove the source)."""
        new = list(rrs)
        old = self.contrib.pop(source, [])
        if old == new:
            if new:
                self.contrib[source] = new
            return
        for rr in old:
            self._remove(rr)
        for rr in new:
            self._add(rr)
        if new:
            self.contrib[source] = new

    def _zone_of(self, owner: str) -> int | None:
        if owner == self.zone or owner.endswith("." + self.zone):
            return ZONE_FORWARD
        if owner.endswith("." + REVERSE_ZONES[0]):
            return ZONE_V4REV
        if owner.endswith("." + REVERSE_ZONES[1]):
            return ZONE_V6REV
        return None

    def _apex(self, z: int) -> str:
        return self.zone if z == ZONE_FORWARD else REVERSE_ZONES[z - 1]

    def _add(self, rr: RR) -> None:
        key = (rr.owner, rr.rtype)
        rs = self.rrsets.get(key)
        if rs is None:
            rs = self.rrsets[key] = {}
            self._ref_names(rr.owner, +1)
        rs[rr.rdata] = rs.get(rr.rdata, 0) + 1
        self._touched.add(key)
        if rr.rtype == SRV:
            self.refs.setdefault(_srv_target(rr.rdata), set()).add(key)

    def _remove(self, rr: RR) -> None:
        key = (rr.owner, rr.rtype)
        rs = self.rrsets.get(key)
        if rs is None or rr.rdata not in rs:
            return
        rs[rr.rdata] -= 1
        if rs[rr.rdata] <= 0:
            del rs[rr.rdata]
        if not rs:
            del self.rrsets[key]
            self._ref_names(rr.owner, -1)
        self._touched.add(key)
        if rr.rtype == SRV and key not in self.rrsets:
            t = _srv_target(rr.rdata)
            s = self.refs.get(t)
            if s is not None:
                s.discard(key)
                if not s:
                    del self.refs[t]

    def _ref_names(self, owner: str, delta: int) -> None:
        """Count an RRset at owner and its ancestors up to the apex (empty non-terminals exist)."""
        z = self._zone_of(owner)
        if z is None:
            return
        apex = self._apex(z)
        name = owner
        while True:
            n = self.name_refs.get(name, 0) + delta
            if n <= 0:
                self.name_refs.pop(name, None)
            else:
                self.name_refs[name] = n
            if (n <= 0 and delta < 0) or (n == delta and delta > 0):
                self._names_touched.add(name)
            if name == apex:
                break
            name = name.split(".", 1)[1]

    def _wire(self, name: str) -> bytes:
        w = self._wire_cache.get(name)
        if w is None:
            w = self._wire_cache[name] = name_wire(name)
        return w

    # ---- building -----------------------------------------------------------------------------------
    def build(self, serial: int | None = None) -> Table:
        """A new Table reflecting every set_records call so far (incremental after the first)."""
        self.serial = serial if serial is not None else self.serial + 1
        prev = self.table
        touched = self._touched
        # SRV additional sections name their targets' addresses: re-encode SRVs whose targets changed
        for owner, rtype in list(touched):
            if rtype in (A, AAAA):
                touched.update(self.refs.get(owner, ()))
        answers = dict(prev.answers) if prev is not None else {}
        names = dict(prev.names) if prev is not None else {}
        cnames = dict(prev.cnames) if prev is not None else {}
        ttl = self.ttl
        for key in touched:
            owner, rtype = key
            qkey = self._wire(owner) + struct.pack("!H", rtype)
            rs = self.rrsets.get(key)
            if rtype == CNAME:
                if rs:
                    cnames[self._wire(owner)] = next(iter(rs))
                else:
                    cnames.pop(self._wire(owner), None)
            if not rs:
                answers.pop(qkey, None)
                continue
            if rtype == SOA:
                continue  # rebuilt below with the new serial
            answers[qkey] = self._positive(rtype, list(rs))
        for name in self._names_touched:
            w = self._wire(name)
            if name in self.name_refs:
                z = self._zone_of(name)
                if z is not None:
                    names[w] = z
            else:
                names.pop(w, None)
        # the apex SOA carries the serial; negative answers carry the SOA of their zone
        soa = self.soa_rdata()
        soas = [_rr_bytes(self._wire(self._apex(z)), SOA, ttl, soa) for z in (ZONE_FORWARD, ZONE_V4REV, ZONE_V6REV)]
        answers[self.zone_wire + struct.pack("!H", SOA)] = self._positive(SOA, [soa])
        ns = [self._wire(f"ns.dns.{self.zone}")]
        for apex in REVERSE_ZONES:  # reverse zones with records: their apex SOA/NS, as in the export
            w = self._wire(apex)
            if apex in self.name_refs:
                answers[w + struct.pack("!H", SOA)] = self._positive(SOA, [soa])
                answers[w + struct.pack("!H", NS)] = self._positive(NS, ns)
            else:
                answers.pop(w + struct.pack("!H", SOA), None)
                answers.pop(w + struct.pack("!H", NS), None)
        nodata = (make_entry(0, [], [soas[0]], [], self.ra), make_entry(0, [], [soas[1]], [], self.ra),
                  make_entry(0, [], [soas[2]], [], self.ra))
        nxdomain = make_entry(RCODE_NXDOMAIN, [], [soas[0]], [], self.ra)
        self._touched = set()
        self._names_touched = set()
        self.table = Table(self.zone, self.zone_wire, answers, names, cnames, nodata, nxdomain, self.serial, ttl,
                           self.ra, self._wire(f"pod.{self.zone}"))
        return self.table

    def _positive(self, rtype: int, rdatas: list[bytes]) -> Entry:
        ttl = self.ttl
        hdr = struct.pack("!HHI", rtype, 1, ttl)
        answer = [b"\xc0\x0c" + hdr + struct.pack("!H", len(rd)) + rd for rd in rdatas]
        additional: list[bytes] = []
        if rtype == SRV:
            for target in dict.fromkeys(_srv_target(rd) for rd in rdatas):
                for t in (A, AAAA):
                    for rd in self.rrsets.get((target, t), ()):
                        additional.append(_rr_bytes(self._wire(target), t, ttl, rd))
        return make_entry(0, answer, [], additional, self.ra)

    def soa_rdata(self) -> bytes:
        return soa_rdata(self.zone, self.serial, self.ttl)

    def rrset_items(self) -> list[tuple[str, int, list[bytes]]]:
        """Every RRset as (owner, rtype, rdatas), for export."""
        return [(o, t, list(rs)) for (o, t), rs in self.rrsets.items()]


def _srv_target(rdata: bytes) -> str:
    """The SRV target of an rdata this module produced (uncompressed, lower-case) as text."""
    labels = []
    i = 6
    while rdata[i]:
        ln = rdata[i]
        labels.append(rdata[i + 1:i + 1 + ln].decode("ascii"))
        i += ln + 1
    return ".".join(labels) + "." if labels else "."


