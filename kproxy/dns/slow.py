"""The slow path: any query the fast path declined, parsed with dnspython.

Decides error responses (FORMERR for unparsable packets, NOTIMP for other opcodes, REFUSED for other
classes and zone transfers, BADVERS for EDNS versions above 0), answers ANY with every RRset of the name,
synthesizes the deprecated ``<a>-<b>-<c>-<d>.<ns>.pod.<zone>`` records (spec section 2.6) and hands
ExternalName and out-of-zone queries back to the server (:class:`Deferred`), which may need the upstream.
Answers come from the same :class:`~.table.Table` as the fast path, so both paths always agree.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rdataclass
import dns.rdatatype

from .records import AAAA, CNAME, TYPE_NAMES, A
from .table import FORWARD, RCODE_FORMERR, RCODE_NOTIMP, RCODE_NXDOMAIN, RCODE_REFUSED, Entry, Table, make_entry
from .wire import OPT, OPT_DO, render

ANY, AXFR, IXFR = 255, 252, 251
BADVERS = 16


@dataclass(slots=True)
class Query:
    qid: bytes
    rd: int
    qname: bytes  # lower-case wire
    qtype: int
    question: bytes  # as the client sent it (case preserved), uncompressed
    payload: int | None  # EDNS UDP payload size, None without EDNS
    do: int
    raw: bytes


@dataclass(slots=True)
class Deferred:
    """The server must finish this one: ``kind`` is FORWARD (not our zone) or "cname" (ExternalName)."""

    kind: str
    query: Query
    target: bytes = b""  # CNAME target wire (lower-case)


def _error(data: bytes, rcode: int, question: bytes = b"", qd: int = 0, opt: bytes = b"") -> bytes:
    b2 = 0x80 | (data[2] & 0x79)  # QR, echo opcode and RD
    ext, low = rcode >> 4, rcode & 0xF
    if ext and opt:
        opt = opt[:5] + bytes((ext,)) + opt[6:]
    return data[:2] + bytes((b2, low)) + struct.pack("!HHHH", qd, 0, 0, 1 if opt else 0) + question + opt


def slow_response(data: bytes, table: Table, tcp: bool = False, ra: bool = False) -> bytes | Deferred | None:
    """Response bytes, a Deferred for the server, or None to drop (not a query, or too short to answer)."""
    if len(data) < 12 or data[2] & 0x80:
        return None  # no header to answer, or a response: never answer responses (loops)
    try:
        msg = dns.message.from_wire(data, question_only=False)
    except Exception:  # dnspython raises many kinds for malformed input; all mean FORMERR
        return _error(data, RCODE_FORMERR)
    opt = (OPT_DO if msg.ednsflags & dns.flags.DO else OPT) if msg.edns >= 0 else b""
    if msg.opcode() != dns.opcode.QUERY:
        return _error(data, RCODE_NOTIMP, opt=opt)
    if len(msg.question) != 1:
        return _error(data, RCODE_FORMERR, opt=opt)
    rrset = msg.question[0]
    question = rrset.name.to_wire() + struct.pack("!HH", rrset.rdtype, rrset.rdclass)
    if msg.edns > 0:
        return _error(data, BADVERS, question, 1, opt)
    if rrset.rdclass != dns.rdataclass.IN or rrset.rdtype in (AXFR, IXFR, dns.rdatatype.OPT):
        return _error(data, RCODE_REFUSED, question, 1, opt)
    payload = msg.payload if msg.edns >= 0 else None
    q = Query(data[:2], data[2] & 1, rrset.name.to_wire().lower(), int(rrset.rdtype), question, payload,
              0x80 if msg.ednsflags & dns.flags.DO else 0, data)
    qtype = struct.pack("!H", q.qtype)
    if q.qtype == ANY:
        e = any_entry(table, q.qname, ra)
        if e is None:
            res = table.lookup(q.qname, struct.pack("!H", A))
            if isinstance(res, str):
                return Deferred(FORWARD, q) if res == FORWARD else pod_or_cname(table, q, ra, tcp)
            e = res
        return render(q.qid, q.rd, e, q.question, q.payload, q.do, tcp)
    res = table.lookup(q.qname, qtype)
    if res == FORWARD:
        return Deferred(FORWARD, q)
    if isinstance(res, str):
        return pod_or_cname(table, q, ra, tcp)
    return render(q.qid, q.rd, res, q.question, q.payload, q.do, tcp)


def respond_entry(q: Query, e: Entry, tcp: bool) -> bytes:
    return render(q.qid, q.rd, e, q.question, q.payload, q.do, tcp)


def any_entry(table: Table, qname: bytes, ra: bool) -> Entry | None:
    """All RRsets of an existing name (RFC 8482 allows less; this is small and more useful)."""
    answer: list[bytes] = []
    for t in TYPE_NAMES:
        e = table.answers.get(qname + struct.pack("!H", t))
        if e is not None:
            answer.extend(split_rrs(e.body_min, struct.unpack("!H", e.counts_min[:2])[0]))
    cn = table.cnames.get(qname)
    if cn is not None:
        answer.append(b"\xc0\x0c" + struct.pack("!HHIH", CNAME, 1, table.ttl, len(cn)) + cn)
    if not answer:
        return None
    return make_entry(0, answer, [], [], ra)


def split_rrs(body: bytes, count: int) -> list[bytes]:
    """The first ``count`` records of a section whose owners are all the 2-byte pointer to the question."""
    out, i = [], 0
    for _ in range(count):
        rdlen = struct.unpack_from("!H", body, i + 10)[0]
        out.append(body[i:i + 12 + rdlen])
        i += 12 + rdlen
    return out


def pod_or_cname(table: Table, q: Query, ra: bool, tcp: bool = False) -> bytes | Deferred:
    if q.qname in table.cnames:
        return Deferred("cname", q, table.cnames[q.qname])
    return respond_entry(q, pod_entry(table, q, ra), tcp)


def pod_entry(table: Table, q: Query, ra: bool) -> Entry:
    """Spec 2.6 (deprecated but required): ``<a>-<b>-<c>-<d>.<ns>.pod.<zone>`` A → a.b.c.d, and likewise
    AAAA for IPv6 with ``:`` written as ``-``. Any well-formed address in any namespace answers."""
    label = q.qname[1:1 + q.qname[0]].decode("ascii", "replace")
    ip4 = label.replace("-", ".")
    ip6 = label.replace("-", ":")
    rr: bytes | None = None
    family = 0
    try:
        rr = socket.inet_pton(socket.AF_INET, ip4)
        family = A
    except OSError:
        try:
            rr = socket.inet_pton(socket.AF_INET6, ip6)
            family = AAAA
        except OSError:
            rr = None
    soa = table.nxdomain.body_min  # the zone SOA as an authority record
    if rr is None:
        return make_entry(RCODE_NXDOMAIN, [], [soa], [], ra)
    if q.qtype != family:
        return make_entry(0, [], [soa], [], ra)
    return make_entry(0, [b"\xc0\x0c" + struct.pack("!HHIH", family, 1, table.ttl, len(rr)) + rr], [], [], ra)


def error_for(data: bytes, rcode: int) -> bytes | None:
    """An error response echoing the question when it can be parsed (REFUSED/SERVFAIL from the server)."""
    if len(data) < 12:
        return None
    try:
        msg = dns.message.from_wire(data)
        rrset = msg.question[0]
        question = rrset.name.to_wire() + struct.pack("!HH", rrset.rdtype, rrset.rdclass)
        opt = (OPT_DO if msg.ednsflags & dns.flags.DO else OPT) if msg.edns >= 0 else b""
        return _error(data, rcode, question, 1, opt)
    except Exception:
        return _error(data, rcode)
