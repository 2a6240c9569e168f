"""The wire fast path: answer a plain query from the prebuilt table without building message objects.

A "plain" query is QUERY opcode, QR clear, one question of class IN, no answer/authority records, and
either no additional record or exactly one EDNS(0) OPT (any options, which are ignored). Its qname is
sliced straight out of the packet, lower-cased (``bytes.lower`` only touches ASCII letters, and label
length octets are at most 63 so they are never changed) and looked up together with the raw 2-byte qtype.
The response is the query's ID and question plus the prebuilt sections of the :class:`~.table.Entry`.

Everything else returns None and goes to :mod:`.slow` (dnspython), which produces the same answers from
the same table plus the error responses.
"""

from __future__ import annotations

from .table import Entry, Table

MAX_UDP = 1232  # our EDNS UDP payload size (DNS flag day 2020); larger answers are truncated
MAX_TCP = 65535
OPT = b"\x00\x00\x29" + MAX_UDP.to_bytes(2, "big") + b"\x00\x00\x00\x00\x00\x00"
OPT_DO = b"\x00\x00\x29" + MAX_UDP.to_bytes(2, "big") + b"\x00\x00\x80\x00\x00\x00"
_PLAIN_COUNTS = b"\x00\x01\x00\x00\x00\x00"


def fast_response(data: bytes, table: Table, tcp: bool = False) -> bytes | None:
    """The response to a plain in-table query, or None when the slow path must decide."""
    n = len(data)
    if n < 17 or data[2] & 0xF8 or data[4:10] != _PLAIN_COUNTS or data[10]:
        return None
    qend = data.find(b"\x00", 12) + 1  # end of the qname; a zero inside a label is caught below
    if qend <= 12:
        return None
    qe4 = qend + 4
    ar = data[11]
    if ar == 0:
        if n != qe4:
            return None
    elif ar == 1:  # OPT: root owner, TYPE 41, CLASS = payload, TTL = ext-rcode/version/DO+Z, RDLEN, options
        if (n < qe4 + 11 or data[qe4] or data[qe4 + 1] or data[qe4 + 2] != 41 or data[qe4 + 5] or data[qe4 + 6]
                or n != qe4 + 11 + (data[qe4 + 9] << 8 | data[qe4 + 10])):
            return None
    else:
        return None
    if data[qend + 2] or data[qend + 3] != 1:  # class IN only
        return None
    # qname + qtype lower-cased in one go: the stored types (1-33) are outside A-Z, and a qtype byte
    # that lower() changes lands on a type the table never holds (a miss, decided below)
    e = table.answers.get(data[12:qend + 2].lower())
    if e is None:
        qt = data[qend + 1]
        if data[qend] or qt > 127 or qt == 41 or not qt:  # meta types (ANY, AXFR, OPT, ...): slow path
            return None
        e = table.lookup(data[12:qend].lower(), data[qend:qend + 2])  # type: ignore[assignment]
        if e.__class__ is str:
            return None
    if ar:
        r = b"".join((data[:2], e.hdr[data[2] & 1], e.counts_edns, data[12:qe4], e.body,
                      OPT_DO if data[qe4 + 7] & 0x80 else OPT))
        if len(r) <= 512 or tcp:
            return r
        return render(data[:2], data[2] & 1, e, data[12:qe4], data[qe4 + 3] << 8 | data[qe4 + 4],
                      data[qe4 + 7] & 0x80, tcp)
    r = b"".join((data[:2], e.hdr[data[2] & 1], e.counts, data[12:qe4], e.body))
    if len(r) <= 512 or tcp:
        return r
    return render(data[:2], data[2] & 1, e, data[12:qe4], None, 0, tcp)


def udp_limit(payload: int | None) -> int:
    if payload is None:
        return 512
    return min(max(payload, 512), MAX_UDP)


def render(qid: bytes, rd: int, e: Entry, question: bytes, payload: int | None, do: int, tcp: bool) -> bytes:
    """Assemble a response, truncating for UDP: drop the additional section, else set TC (RFC 2181 9)."""
    limit = MAX_TCP if tcp else udp_limit(payload)
    edns = payload is not None
    opt = (OPT_DO if do else OPT) if edns else b""
    hdr = e.hdr[rd]
    r = b"".join((qid, hdr, e.counts_edns if edns else e.counts, question, e.body, opt))
    if len(r) <= limit:
        return r
    r = b"".join((qid, hdr, e.counts_min_edns if edns else e.counts_min, question, e.body_min, opt))
    if len(r) <= limit:
        return r
    tc = bytes((hdr[0] | 0x02,)) + hdr[1:]
    return b"".join((qid, tc, b"\x00\x00\x00\x00\x00\x01" if edns else b"\x00\x00\x00\x00\x00\x00", question, opt))
