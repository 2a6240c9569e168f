"""Out-of-zone queries go to --upstream (a fake DNS server of ours on loopback); ExternalName targets are
resolved through it."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from kdns_testlib import Server, free_port, start_server, stop_server

UPSTREAM_HOST = "127.0.0.2"  # another loopback address


class FakeUpstream:
    """UDP+TCP authoritative toy: example.com A, www.example.com A, big.example.com (TC over UDP)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.port = free_port(host)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((host, self.port))
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((host, self.port))
        self.tcp.listen(16)
        self.queries: list[tuple[str, str, str]] = []
        self._stop = False
        self.threads = [threading.Thread(target=self._serve_udp, daemon=True),
                        threading.Thread(target=self._serve_tcp, daemon=True)]
        for t in self.threads:
            t.start()

    def answer(self, wire: bytes, tcp: bool) -> bytes:
        q = dns.message.from_wire(wire)
        name = q.question[0].name.to_text().lower()
        rdtype = q.question[0].rdtype
        self.queries.append(("tcp" if tcp else "udp", name, dns.rdatatype.to_text(rdtype)))
        r = dns.message.make_response(q)
        if name == "big.example.com." and not tcp:
            r.flags |= dns.flags.TC
        elif name in ("example.com.", "www.example.com.", "big.example.com.") and rdtype == dns.rdatatype.A:
            ip = {"example.com.": "192.0.2.7", "www.example.com.": "192.0.2.80", "big.example.com.": "192.0.2.99"}
            r.answer.append(dns.rrset.from_text(name, 300, "IN", "A", ip[name]))
        else:
            r.set_rcode(dns.rcode.NXDOMAIN)
        return r.to_wire()

    def _serve_udp(self) -> None:
        while not self._stop:
            try:
                data, addr = self.udp.recvfrom(4096)
                self.udp.sendto(self.answer(data, False), addr)
            except OSError:
                return

    def _serve_tcp(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            with conn:
                n = struct.unpack("!H", conn.recv(2))[0]
                data = b""
                while len(data) < n:
                    data += conn.recv(n - len(data))
                resp = self.answer(data, True)
                conn.sendall(struct.pack("!H", len(resp)) + resp)

    def close(self) -> None:
        self._stop = True
        self.udp.close()
        self.tcp.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    up = FakeUpstream(UPSTREAM_HOST)
    yield up
    up.close()


@pytest.fixture(scope="module")
def fwd_server(tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream) -> Iterator[Server]:
    srv = start_server(Path(tmp_path_factory.mktemp("dnsfwd")), "--upstream", f"{upstream.host}:{upstream.port}")
    yield srv
    stop_server(srv)


def test_forwarded(fwd_server: Server, upstream: FakeUpstream) -> None:
    r = fwd_server.query("example.com", "A")
    assert r.rcode() == dns.rcode.NOERROR
    assert {rd.to_text() for rrset in r.answer for rd in rrset} == {"192.0.2.7"}
    assert ("udp", "example.com.", "A") in upstream.queries
    assert fwd_server.query("nonexistent.example.com", "A").rcode() == dns.rcode.NXDOMAIN
    # in-zone names are still ours and flagged authoritative; RA is set since we recurse via the upstream
    own = fwd_server.query("web.default.svc.cluster.local", "A")
    assert own.flags & dns.flags.AA and own.flags & dns.flags.RA
    assert not any(n == "web.default.svc.cluster.local." for _, n, _ in upstream.queries)


def test_forwarded_truncation_retries_over_tcp(fwd_server: Server, upstream: FakeUpstream) -> None:
    r = fwd_server.query("big.example.com", "A")
    assert {rd.to_text() for rrset in r.answer for rd in rrset} == {"192.0.2.99"}
    assert ("tcp", "big.example.com.", "A") in upstream.queries
    # and a TCP client is forwarded over TCP
    r = fwd_server.query("example.com", "A", tcp=True)
    assert {rd.to_text() for rrset in r.answer for rd in rrset} == {"192.0.2.7"}


def test_externalname_target_resolved_upstream(fwd_server: Server) -> None:
    r = fwd_server.query("ext.default.svc.cluster.local", "A")
    texts = {(rrset.name.to_text(), rd.to_text()) for rrset in r.answer for rd in rrset}
    assert texts == {("ext.default.svc.cluster.local.", "www.example.com."), ("www.example.com.", "192.0.2.80")}


def test_unknown_reverse_name_forwarded(fwd_server: Server, upstream: FakeUpstream) -> None:
    r = fwd_server.query("1.2.0.192.in-addr.arpa", "PTR")
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert any(n == "1.2.0.192.in-addr.arpa." for _, n, _ in upstream.queries)


def test_dead_upstream_servfail(tmp_path: Path) -> None:
    port = free_port(UPSTREAM_HOST)  # nothing listens there
    srv = start_server(tmp_path, "--upstream", f"{UPSTREAM_HOST}:{port}")
    try:
        r = srv.query("example.com", "A")
        assert r.rcode() == dns.rcode.SERVFAIL
        assert srv.query("web.default.svc.cluster.local", "A").answer
    finally:
        stop_server(srv)
