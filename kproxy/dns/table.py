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
from collections import Counter
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
        zw = self.zone_wire
        if qname.endswith(zw):
            # in the zone if the zone starts at a label boundary of a well-formed name
            cut = len(qname) - len(zw)
            i = labels = 0
            while i < cut:
                ln = qname[i]
                if ln > 63:
                    return FORWARD
                i += ln + 1
                labels += 1
            if i == cut:
                if labels <= 3 and qname.endswith(self.pod_suffix):
                    # <ip>.<ns>.pod.<zone> is synthesized; pod.<zone> and <ns>.pod.<zone> therefore exist
                    # (NODATA, so resolvers doing QNAME minimisation do not stop at an NXDOMAIN)
                    return SYNTH if labels == 3 else self.nodata[ZONE_FORWARD]
                return self.nxdomain
        return FORWARD


def _target(rtype: int, rdata: bytes) -> bytes:
    """The name (wire) an SRV or NS record points at."""
    return rdata[6:] if rtype == SRV else rdata


_H = struct.Struct("!H")
_RRHDR = struct.Struct("!HHIH")


class TableBuilder:
    """Merges per-source records into RRsets and builds :class:`Table` snapshots incrementally.

    By default a build updates the previous table's dicts in place and returns a new :class:`Table`
    around them (copying 10,000 Services' worth of answers costs tens of milliseconds per update). That
    is atomic for the server because builds and queries run on the same event loop thread: no query runs
    while a build is half done, and the new negative answers (SOA serial) are published by the same swap.
    ``copy_on_build=True`` gives independent snapshots instead (for multi-threaded readers).
    """

    def __init__(self, zone: str, ttl: int = 5, ra: bool = False, copy_on_build: bool = False) -> None:
        self.copy_on_build = copy_on_build
        self.zone = zone
        self.zone_wire = name_wire(zone)
        self.ttl = ttl
        self.ra = ra
        self.contrib: dict[object, list[RR]] = {}
        self.rrsets: dict[tuple[str, int], dict[bytes, int]] = {}  # rdata → refcount, insertion-ordered
        # a name exists while it has RRsets or existing children (empty non-terminals): count of both
        self.name_refs: dict[str, int] = {}
        self.refs: dict[bytes, set[tuple[str, int]]] = {}  # SRV/NS target wire → RRsets naming it
        self._touched: set[tuple[str, int]] = set()
        self._names_touched: set[str] = set()
        self._wire_cache: dict[str, bytes] = {}
        self._text_by_wire: dict[bytes, str] = {}
        self.serial = 0
        self.table: Table | None = None

    # ---- records ------------------------------------------------------------------------------------
    def set_records(self, source: object, rrs: Iterable[RR]) -> None:
        """Replace everything ``source`` contributes with ``rrs`` (empty: remove the source)."""
        new = list(rrs)
        old = self.contrib.pop(source, [])
        if new:
            self.contrib[source] = new
        if old == new:
            return
        if old:
            old_c, new_c = Counter(old), Counter(new)
            for rr, n in (old_c - new_c).items():
                for _ in range(n):
                    self._remove(rr)
            for rr, n in (new_c - old_c).items():
                for _ in range(n):
                    self._add(rr)
        else:
            for rr in new:
                self._add(rr)

    def _zone_of(self, owner: str) -> int | None:
        if owner == self.zone or owner.endswith("." + self.zone):
            return ZONE_FORWARD
        if owner.endswith("." + REVERSE_ZONES[0]) or owner == REVERSE_ZONES[0]:
            return ZONE_V4REV
        if owner.endswith("." + REVERSE_ZONES[1]) or owner == REVERSE_ZONES[1]:
            return ZONE_V6REV
        return None

    def _apex(self, z: int) -> str:
        return self.zone if z == ZONE_FORWARD else REVERSE_ZONES[z - 1]

    def _add(self, rr: RR) -> None:
        key = (rr.owner, rr.rtype)
        rs = self.rrsets.get(key)
        if rs is None:
            rs = self.rrsets[key] = {}
            self._ref_name(rr.owner, +1)
        rs[rr.rdata] = rs.get(rr.rdata, 0) + 1
        self._touched.add(key)
        if rr.rtype in (SRV, NS):
            self.refs.setdefault(_target(rr.rtype, rr.rdata), set()).add(key)

    def _remove(self, rr: RR) -> None:
        key = (rr.owner, rr.rtype)
        rs = self.rrsets.get(key)
        if rs is None or rr.rdata not in rs:
            return
        rs[rr.rdata] -= 1
        if rs[rr.rdata] <= 0:
            del rs[rr.rdata]
            if rr.rtype in (SRV, NS):
                t = _target(rr.rtype, rr.rdata)
                if not any(_target(rr.rtype, rd) == t for rd in rs):
                    s = self.refs.get(t)
                    if s is not None:
                        s.discard(key)
                        if not s:
                            del self.refs[t]
        if not rs:
            del self.rrsets[key]
            self._ref_name(rr.owner, -1)
        self._touched.add(key)

    def _ref_name(self, name: str, delta: int) -> None:
        """Count an RRset (or an existing child) at name; a name appearing or vanishing counts at its
        parent, up to the zone apex."""
        z = self._zone_of(name)
        if z is None:
            return
        apex = self._apex(z)
        refs = self.name_refs
        while True:
            n = refs.get(name, 0) + delta
            if n > 0:
                refs[name] = n
            else:
                refs.pop(name, None)
            if not ((delta > 0 and n == 1) or (delta < 0 and n <= 0)):
                return  # existence of name did not change: ancestors unaffected
            self._names_touched.add(name)
            if name == apex:
                return
            name = name.split(".", 1)[1]

    def _wire(self, name: str) -> bytes:
        w = self._wire_cache.get(name)
        if w is None:
            w = self._wire_cache[name] = name_wire(name)
            self._text_by_wire[w] = name
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
                touched.update(self.refs.get(self._wire(owner), ()))
        if prev is None:
            answers: dict[bytes, Entry] = {}
            names: dict[bytes, int] = {}
            cnames: dict[bytes, bytes] = {}
        elif self.copy_on_build:
            answers, names, cnames = dict(prev.answers), dict(prev.names), dict(prev.cnames)
        else:  # see the class docstring: in place is atomic when queries and builds share one thread
            answers, names, cnames = prev.answers, prev.names, prev.cnames
        ttl = self.ttl
        rrsets = self.rrsets
        wire = self._wire
        for key in touched:
            owner, rtype = key
            ow = wire(owner)
            rs = rrsets.get(key)
            if rtype == CNAME:
                if rs:
                    cnames[ow] = next(iter(rs))
                else:
                    cnames.pop(ow, None)
            if not rs:
                answers.pop(ow + _H.pack(rtype), None)
            elif rtype != SOA:  # the SOA is rebuilt below with the new serial
                # canonical (sorted) record order: identical bytes however the RRset was reached
                answers[ow + _H.pack(rtype)] = self._positive(rtype, sorted(rs))
        for name in self._names_touched:
            w = wire(name)
            if name in self.name_refs:
                z = self._zone_of(name)
                if z is not None:
                    names[w] = z
            else:
                names.pop(w, None)
        # the apex SOA carries the serial; negative answers carry the SOA of their zone
        soa = self.soa_rdata()
        soas = [_rr_bytes(wire(self._apex(z)), SOA, ttl, soa) for z in (ZONE_FORWARD, ZONE_V4REV, ZONE_V6REV)]
        answers[self.zone_wire + _H.pack(SOA)] = self._positive(SOA, [soa])
        ns = [wire(f"ns.dns.{self.zone}")]
        for apex in REVERSE_ZONES:  # reverse zones with records: their apex SOA/NS, as in the export
            w = wire(apex)
            if apex in self.name_refs:
                answers[w + _H.pack(SOA)] = self._positive(SOA, [soa])
                answers[w + _H.pack(NS)] = self._positive(NS, ns)
            else:
                answers.pop(w + _H.pack(SOA), None)
                answers.pop(w + _H.pack(NS), None)
        nodata = (make_entry(0, [], [soas[0]], [], self.ra), make_entry(0, [], [soas[1]], [], self.ra),
                  make_entry(0, [], [soas[2]], [], self.ra))
        nxdomain = make_entry(RCODE_NXDOMAIN, [], [soas[0]], [], self.ra)
        self._touched = set()
        self._names_touched = set()
        self.table = Table(self.zone, self.zone_wire, answers, names, cnames, nodata, nxdomain, self.serial, ttl,
                           self.ra, wire(f"pod.{self.zone}"))
        return self.table

    def _positive(self, rtype: int, rdatas: list[bytes]) -> Entry:
        ttl = self.ttl
        pack = _RRHDR.pack
        answer = [b"\xc0\x0c" + pack(rtype, 1, ttl, len(rd)) + rd for rd in rdatas]
        additional: list[bytes] = []
        if rtype in (SRV, NS):  # the targets' addresses go to the additional section
            for tw in dict.fromkeys(_target(rtype, rd) for rd in rdatas):
                target = self._text_by_wire.get(tw)
                if target is None:
                    continue
                for t in (A, AAAA):
                    for rd in sorted(self.rrsets.get((target, t), ())):
                        additional.append(tw + pack(t, 1, ttl, len(rd)) + rd)
        return make_entry(0, answer, [], additional, self.ra)

    def soa_rdata(self) -> bytes:
        return soa_rdata(self.zone, self.serial, self.ttl)

    def rrset_items(self) -> list[tuple[str, int, list[bytes]]]:
        """Every RRset as (owner, rtype, rdatas), for export."""
        return [(o, t, list(rs)) for (o, t), rs in self.rrsets.items()]
