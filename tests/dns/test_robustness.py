"""Malformed, truncated, oversized and unusual packets: the server never crashes and answers with the
right error (FORMERR / NOTIMP / REFUSED / BADVERS) or, where there is nothing to answer, stays silent.
Includes a hypothesis fuzz run against the live server and a differential fuzz of the fast path against
the dnspython slow path in-process."""

from __future__ import annotations

import random
import struct

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kdns_testlib import MANIFESTS, Server

from kproxy.dns.slow import Deferred, slow_response
from kproxy.dns.wire import fast_response
from kproxy.dns.zone import ClusterZone
from kproxy.sources.manifests import ManifestsSource
from kproxy.store import ClusterStore


def _hdr(qid: int = 0x1234, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


QNAME = b"\x03web\x07default\x03svc\x07cluster\x05local\x00"


def _rcode(resp: bytes) -> int:
    m = dns.message.from_wire(resp)
    return m.rcode()


@pytest.mark.parametrize("packet", [b"", b"\x00", b"\x12\x34\x01", _hdr()[:11]])
def test_too_short_for_a_header_is_dropped(server: Server, packet: bytes) -> None:
    assert server.raw(packet, timeout=0.3) is None


@pytest.mark.parametrize("packet,why", [
    (_hdr(qd=0), "no question"),
    (_hdr(qd=2) + QNAME + b"\x00\x01\x00\x01" + QNAME + b"\x00\x01\x00\x01", "two questions"),
    (_hdr() + QNAME[:10], "truncated qname"),
    (_hdr() + QNAME + b"\x00", "truncated qtype"),
    (_hdr() + b"\xc0\x0c\x00\x01\x00\x01", "compression pointer loop"),
    (_hdr() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01", "label longer than 63"),
    (_hdr(ar=1) + QNAME + b"\x00\x01\x00\x01" + b"\x00\x00\x29\x04", "truncated OPT"),
    (_hdr(ar=2) + QNAME + b"\x00\x01\x00\x01" + (b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00") * 2, "two OPTs"),
    (_hdr() + QNAME + b"\x00\x01\x00\x01" + b"\xff" * 40, "trailing garbage"),
    (_hdr() + b"\x3f" + b"a" * 63 + b"\x3f" + b"b" * 63 + b"\x3f" + b"c" * 63 + b"\x3f" + b"d" * 63
     + b"\x00\x00\x01\x00\x01", "name longer than 255"),
])
def test_formerr(server: Server, packet: bytes, why: str) -> None:
    resp = server.raw(packet)
    assert resp is not None, why
    assert resp[:2] == packet[:2] and resp[2] & 0x80
    assert resp[3] & 0x0F == dns.rcode.FORMERR, why


def test_oversized_packet(server: Server) -> None:
    # 60 kB of junk after a valid question: FORMERR, and the server goes on
    resp = server.raw(_hdr() + QNAME + b"\x00\x01\x00\x01" + b"\x00" * 60000)
    assert resp is not None and resp[3] & 0x0F == dns.rcode.FORMERR
    assert server.query("web.default.svc.cluster.local", "A").answer


@pytest.mark.parametrize("opcode", [dns.opcode.IQUERY, dns.opcode.STATUS, dns.opcode.NOTIFY, dns.opcode.UPDATE, 7])
def test_other_opcodes_notimp(server: Server, opcode: int) -> None:
    resp = server.raw(_hdr(flags=opcode << 11) + QNAME + b"\x00\x06\x00\x01")
    assert resp is not None and resp[3] & 0x0F == dns.rcode.NOTIMP
    assert (resp[2] >> 3) & 0x0F == opcode


@pytest.mark.parametrize("rdclass", ["CH", "HS", "ANY", "NONE"])
def test_other_classes_refused(server: Server, rdclass: str) -> None:
    q = dns.message.make_query("version.bind" if rdclass == "CH" else "web.default.svc.cluster.local", "TXT",
                               rdclass=dns.rdataclass.from_text(rdclass))
    resp = server.raw(q.to_wire())
    assert resp is not None and _rcode(resp) == dns.rcode.REFUSED


def test_zone_transfer_refused(server: Server) -> None:
    q = dns.message.make_query("cluster.local", "AXFR")
    assert _rcode(server.raw(q.to_wire()) or b"") == dns.rcode.REFUSED


def test_edns_version_1_badvers(server: Server) -> None:
    q = dns.message.make_query("web.default.svc.cluster.local", "A", use_edns=1)
    m = dns.message.from_wire(server.raw(q.to_wire()) or b"")
    assert m.rcode() == dns.rcode.BADVERS and m.edns == 0


def test_responses_are_not_answered(server: Server) -> None:
    q = dns.message.make_query("web.default.svc.cluster.local", "A")
    q.flags |= dns.flags.QR
    assert server.raw(q.to_wire(), timeout=0.3) is None


def test_edns_options_and_do_bit(server: Server) -> None:
    opts = [dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"\x01" * 8), dns.edns.ECSOption("192.0.2.0", 24)]
    q = dns.message.make_query("web.default.svc.cluster.local", "A", use_edns=0, options=opts, want_dnssec=True)
    m = dns.message.from_wire(server.raw(q.to_wire()) or b"")
    assert m.answer and m.edns == 0 and m.ednsflags & dns.flags.DO


def test_tcp_garbage_and_short_frames(server: Server) -> None:
    import socket

    with socket.create_connection((server.host, server.port), timeout=2) as s:
        s.sendall(b"\x00\x05hello")  # a 5-byte "message": no header to answer → dropped
        s.sendall(b"\x00\x0c" + _hdr(qd=0))  # header only → FORMERR
        n = struct.unpack("!H", s.recv(2))[0]
        resp = s.recv(n)
        assert resp[3] & 0x0F == dns.rcode.FORMERR
        s.sendall(b"\x00\xff" + b"\x01")  # frame longer than what follows, then close
    assert server.query("web.default.svc.cluster.local", "A", tcp=True).answer


# ---- fuzzing --------------------------------------------------------------------------------------------

_valid = [dns.message.make_query(n, t, use_edns=e).to_wire() for n, t, e in [
    ("web.default.svc.cluster.local", "A", -1), ("_pg._tcp.db.data.svc.cluster.local", "SRV", 0),
    ("20.0.96.10.in-addr.arpa", "PTR", 0), ("missing.cluster.local", "AAAA", 0)]]


def _mutate(data: bytes, rnd: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(4)
        if op == 0 and b:
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        elif op == 1 and b:
            del b[rnd.randrange(len(b)):]
        elif op == 2:
            b[rnd.randrange(len(b) + 1):0] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
        else:
            b[2:4] = rnd.randrange(65536).to_bytes(2, "big")
    return bytes(b)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(min_size=12, max_size=300),
                 st.tuples(st.sampled_from(_valid), st.randoms(use_true_random=False)).map(lambda t: _mutate(*t))))
def test_fuzz_live_server(server: Server, packet: bytes) -> None:
    silent = len(packet) < 12 or bool(packet[2] & 0x80)
    resp = server.raw(packet, timeout=0.2 if silent else 2.0)
    if resp is None:
        # silence is only right without a header to answer, or for responses (QR set)
        assert len(packet) < 12 or packet[2] & 0x80, packet
        return
    assert resp[:2] == packet[:2] and resp[2] & 0x80
    assert resp[3] & 0x0F in (0, 1, 3, 4, 5), resp  # NOERROR, FORMERR, NXDOMAIN, NOTIMP, REFUSED
    dns.message.from_wire(resp, question_only=True)  # our responses always parse


def test_server_survived_fuzz(server: Server) -> None:
    assert server.alive()
    assert server.query("web.default.svc.cluster.local", "A").answer


@pytest.fixture(scope="module")
def table():  # type: ignore[no-untyped-def]
    store = ClusterStore()
    zone = ClusterZone(store)
    ManifestsSource(str(MANIFESTS)).scan(store)
    zone.sync()
    return zone.table


_NAMES = ["web.default.svc.cluster.local", "_https._tcp.web.default.svc.cluster.local", "db.data.svc.cluster.local",
          "db-0.db.data.svc.cluster.local", "20.0.96.10.in-addr.arpa", "cluster.local", "dns-version.cluster.local",
          "missing.data.svc.cluster.local", "svc.cluster.local", "big.data.svc.cluster.local",
          "node-a.node.cluster.local", "_http._tcp.np.default.nodeport.cluster.local"]


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(_NAMES), case=st.randoms(use_true_random=False),
       rdtype=st.sampled_from(["A", "AAAA", "SRV", "PTR", "TXT", "SOA", "NS", "MX", "CNAME"]),
       edns=st.sampled_from([-1, 0]), payload=st.sampled_from([512, 1232, 4096]), do=st.booleans(),
       rd=st.booleans(), qid=st.integers(0, 65535))
def test_fast_path_matches_slow_path(table, name, case, rdtype, edns, payload, do, rd, qid) -> None:  # type: ignore[no-untyped-def]
    """Differential fuzz: for every plain query the hand-rolled fast path gives byte-identical responses to
    the dnspython slow path, both over UDP and TCP."""
    mixed = "".join(c.upper() if case.random() < 0.5 else c for c in name)
    q = dns.message.make_query(mixed, rdtype, use_edns=edns, payload=payload, want_dnssec=do and edns >= 0)
    q.id = qid
    if not rd:
        q.flags &= ~dns.flags.RD
    wire = q.to_wire()
    for tcp in (False, True):
        fast = fast_response(wire, table, tcp)
        slow = slow_response(wire, table, tcp)
        assert fast is not None and not isinstance(slow, Deferred)
        assert fast == slow
        m = dns.message.from_wire(fast)
        assert m.id == qid and m.question[0].name.to_text() == mixed + "."


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_in_process_never_raises(table, data: bytes) -> None:  # type: ignore[no-untyped-def]
    r = fast_response(data, table)
    if r is None:
        r = slow_response(data, table)
    if isinstance(r, bytes):
        assert r[:2] == data[:2]
