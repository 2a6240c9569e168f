"""The DNS server: UDP and TCP on one address, answers from the current table, forwarding the rest.

:class:`DnsService` is what the daemon (``--dns-listen``) and ``kproxy dns`` run. It listens to the store
and rebuilds the table at most every ``debounce`` seconds after a change (default 50 ms; a 1 s timer
catches anything missed), swapping a single reference so every query sees one consistent table.

Per datagram the hot path is :func:`~.wire.fast_response`; the rest goes to :func:`~.slow.slow_response`.
Queries outside the zone (and reverse names we have no record for) go to ``upstream`` when configured,
else get REFUSED. ExternalName answers follow the CNAME inside the zone, or through the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

import dns.message
import dns.name
import dns.rdatatype

from ..store import ClusterStore
from .records import CNAME
from .slow import FORWARD, Deferred, Query, error_for, respond_entry, slow_response, split_rrs
from .table import RCODE_REFUSED, RCODE_SERVFAIL, Table, make_entry
from .wire import fast_response
from .zone import ClusterZone

log = logging.getLogger(__name__)

FORWARD_TIMEOUT = 2.0
MAX_INFLIGHT_FORWARDS = 1024
TCP_IDLE_TIMEOUT = 10.0
MAX_TCP_CLIENTS = 1024


def parse_hostport(value: str, default_port: int = 53) -> tuple[str, int]:
    """"1.2.3.4", "1.2.3.4:53", "[fd00::1]:53", "fd00::1" → (host, port); ValueError otherwise."""
    v = value.strip()
    if v.startswith("["):
        host, _, rest = v[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
    elif v.count(":") == 1:
        host, _, p = v.partition(":")
        port = int(p)
    else:
        host, port = v, default_port
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    try:
        socket.getaddrinfo(host, port, proto=socket.IPPROTO_UDP, flags=socket.AI_NUMERICHOST)
    except OSError:
        raise ValueError(f"not an IP address: {value!r}") from None
    return host, port


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, svc: DnsService) -> None:
        self.svc = svc
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        svc = self.svc
        svc.udp_queries += 1
        try:
            r = fast_response(data, svc.table)
            if r is None:
                r = self.svc.slow(data, False, lambda resp: self.transport.sendto(resp, addr))
            if r is not None:
                self.transport.sendto(r, addr)
        except Exception:  # never let one packet stop the server
            self.svc.errors += 1
            log.exception("dns: error answering a UDP query")

    def error_received(self, exc: Exception) -> None:  # ICMP errors from earlier sends: ignore
        pass


class _UdpReader:
    """UDP without uvloop's transport/protocol layer: on readability, drain the socket with non-blocking
    recvfrom/sendto (up to ``batch`` datagrams, then yield to the loop). About 10 % less CPU per query
    than a DatagramProtocol at saturation (bench/dns_qps.py, drain measurement). Every datagram of a
    batch uses the table current at the batch start; tables are swapped between loop callbacks."""

    batch = 128

    def __init__(self, svc: DnsService, sock: socket.socket) -> None:
        self.svc = svc
        self.sock = sock
        sock.setblocking(False)

    def on_readable(self) -> None:
        svc = self.svc
        table = svc.table
        recv = self.sock.recvfrom
        send = self.sock.sendto
        for _ in range(self.batch):
            try:
                data, addr = recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. a queued ICMP error from an earlier send
                continue
            svc.udp_queries += 1
            try:
                r = fast_response(data, table)
                if r is None:
                    r = svc.slow(data, False, functools.partial(self._send, addr))
                if r is not None:
                    send(r, addr)
            except (BlockingIOError, InterruptedError):
                svc.dropped += 1  # send buffer full: the client retries, as with any loss
            except Exception:
                svc.errors += 1
                log.exception("dns: error answering a UDP query")

    def _send(self, addr: Any, resp: bytes) -> None:
        try:
            self.sock.sendto(resp, addr)
        except OSError:
            self.svc.dropped += 1


class _ReaderHandle:
    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop, self.sock = loop, sock

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class DnsService:
    """Serve the cluster zone from ``store`` on ``listen`` (UDP+TCP)."""

    def __init__(self, store: ClusterStore, zone: str = "cluster.local", listen: str = "127.0.0.1:53",
                 upstream: str = "", ttl: int = 5, debounce: float = 0.05) -> None:
        self.store = store
        self.listen = parse_hostport(listen)
        self.upstream = parse_hostport(upstream) if upstream else None
        ns_addr = self.listen[0] if self.listen[0] not in ("0.0.0.0", "::") else "127.0.0.1"
        self.zone = ClusterZone(store, zone, ttl, (ns_addr,), ra=self.upstream is not None)
        self.table: Table = self.zone.table
        self.debounce = debounce
        self.errors = 0
        self.dropped = 0  # UDP answers dropped because the socket's send buffer was full
        self.udp_queries = 0
        self.tcp_queries = 0
        self.forwards = 0
        self.bound: tuple[str, int] | None = None
        self.ready = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: asyncio.TimerHandle | None = None
        self._inflight = 0
        self._syncing = False
        self._tcp_clients = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---- table updates ------------------------------------------------------------------------------
    def resync(self) -> None:
        t = self.zone.sync()
        if t is not None:
            self.table = t  # the atomic swap

    def _on_store_change(self) -> None:  # may be called from another thread
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop closed
            loop.call_soon_threadsafe(self._schedule)

    def _schedule(self) -> None:
        if self._pending is None and self._loop is not None:
            self._pending = self._loop.call_later(self.debounce, self._run_sync)

    async def initial_sync(self) -> None:
        """The first, full build (10,000 Services: seconds of CPU) runs in a worker thread on fresh dicts,
        so the event loop it shares with the proxy keeps running; the result is swapped in here."""
        builder = self.zone.builder
        self._syncing = True
        builder.copy_on_build = True
        try:
            t = await asyncio.to_thread(self.zone.sync)
        finally:
            builder.copy_on_build = False
            self._syncing = False
        if t is not None:
            self.table = t

    def _run_sync(self) -> None:
        self._pending = None
        if self._syncing:  # the initial build is still running in its thread
            self._schedule()
            return
        try:
            self.resync()
        except Exception:
            log.exception("dns: table rebuild failed; retrying")
            self._schedule()

    def stats(self) -> dict[str, int]:
        """Counters for metrics: datagrams/messages received, forwards, internal errors, table size."""
        t = self.table
        return {"udp_queries": self.udp_queries, "tcp_queries": self.tcp_queries, "forwards": self.forwards,
                "errors": self.errors, "answers": len(t.answers), "names": len(t.names), "serial": t.serial}

    # ---- serving ------------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self.store.add_listener(self._on_store_change)
        await self.initial_sync()
        host, port = self.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for attempt in range(20):
            udp_sock = socket.socket(family, socket.SOCK_DGRAM)
            udp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _big_rcvbuf(udp_sock)
            udp_sock.bind((host, port))
            bound_port = udp_sock.getsockname()[1]
            tcp_sock = socket.socket(family, socket.SOCK_STREAM)
            tcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp_sock.bind((host, bound_port))
            except OSError:
                udp_sock.close()
                tcp_sock.close()
                if port or attempt == 19:
                    raise
                continue
            break
        tcp_sock.listen(512)
        if os.environ.get("KPROXY_DNS_UDP") == "protocol":  # uvloop's DatagramProtocol (for comparison)
            self._udp_transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp_sock)
        else:
            reader = _UdpReader(self, udp_sock)
            loop.add_reader(udp_sock.fileno(), reader.on_readable)
            self._udp_transport = _ReaderHandle(loop, udp_sock)
        self._tcp_server = await asyncio.start_server(self._tcp_client, sock=tcp_sock)
        self.bound = (host, bound_port)
        log.info("dns: serving %s on %s port %d (udp+tcp), upstream %s", self.zone.zone, host, bound_port,
                 f"{self.upstream[0]}:{self.upstream[1]}" if self.upstream else "none (REFUSED)")
        self.ready.set()

    async def run(self) -> None:
        """Serve until cancelled (rebuilding on store changes; a 1 s timer catches anything missed)."""
        await self.start()
        try:
            while True:
                await asyncio.sleep(1.0)
                self._run_sync()
        finally:
            await self.close()

    async def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        with contextlib.suppress(Exception):
            self._udp_transport.close()
        with contextlib.suppress(Exception):
            self._tcp_server.close()
        for t in list(self._tasks):
            t.cancel()

    def slow(self, data: bytes, tcp: bool, reply: Callable[[bytes], None]) -> bytes | None:
        """The slow path; Deferred results are finished in a task that calls ``reply``."""
        res = slow_response(data, self.table, tcp, ra=self.upstream is not None)
        if not isinstance(res, Deferred):
            return res
        if self._inflight >= MAX_INFLIGHT_FORWARDS:
            return error_for(data, RCODE_SERVFAIL)
        self._inflight += 1
        task = asyncio.ensure_future(self._finish(res, tcp, reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return None

    async def _finish(self, d: Deferred, tcp: bool, reply: Callable[[bytes], None]) -> None:
        try:
            if d.kind == FORWARD:
                if self.upstream is None:
                    r = error_for(d.query.raw, RCODE_REFUSED)
                else:
                    self.forwards += 1
                    r = await self._forward_raw(d.query.raw, tcp)
                    if r is None:
                        r = error_for(d.query.raw, RCODE_SERVFAIL)
            else:
                r = await self._cname(d, tcp)
            if r is not None:
                reply(r)
        except Exception:
            self.errors += 1
            log.exception("dns: error finishing a query")
        finally:
            self._inflight -= 1

    # ---- forwarding ---------------------------------------------------------------------------------
    async def _forward_raw(self, query: bytes, tcp: bool) -> bytes | None:
        assert self.upstream is not None
        host, port = self.upstream
        try:
            if not tcp:
                r = await asyncio.wait_for(_udp_exchange(query, host, port), FORWARD_TIMEOUT)
                if r is None or not r[2] & 0x02:
                    return r
            return await asyncio.wait_for(_tcp_exchange(query, host, port), FORWARD_TIMEOUT)
        except (TimeoutError, OSError) as e:
            log.debug("dns: upstream %s:%d failed: %s", host, port, e)
            return None

    async def _cname(self, d: Deferred, tcp: bool) -> bytes | None:
        """ExternalName: the CNAME, then the target's records (from our table, or via the upstream)."""
        q: Query = d.query
        table = self.table
        ttl = table.ttl
        answer = [b"\xc0\x0c" + struct.pack("!HHIH", CNAME, 1, ttl, len(d.target)) + d.target]
        rcode = 0
        tres = table.lookup(d.target, struct.pack("!H", q.qtype))
        if not isinstance(tres, str):
            an = struct.unpack("!H", tres.counts_min[:2])[0]
            answer += [d.target + rr[2:] for rr in split_rrs(tres.body_min, an)]
        elif tres == FORWARD and self.upstream is not None:
            try:
                name = dns.name.from_wire(d.target, 0)[0]
                uq = dns.message.make_query(name, dns.rdatatype.RdataType.make(q.qtype), use_edns=0)
                raw = await self._forward_raw(uq.to_wire(), tcp)
                if raw is not None:
                    um = dns.message.from_wire(raw)
                    rcode = um.rcode()
                    for rrset in um.answer:
                        buf = io.BytesIO()
                        rrset.to_wire(buf)
                        answer.extend(_split_uncompressed(buf.getvalue(), len(rrset)))
            except Exception as e:
                log.debug("dns: upstream lookup of ExternalName target failed: %s", e)
        e = make_entry(rcode, answer, [], [], self.upstream is not None)
        return respond_entry(q, e, tcp)

    # ---- TCP ----------------------------------------------------------------------------------------
    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tcp_clients >= MAX_TCP_CLIENTS:
            writer.close()  # over the limit: refuse the connection rather than exhaust memory
            return
        self._tcp_clients += 1
        try:
            await self._tcp_serve(reader, writer)
        finally:
            self._tcp_clients -= 1

    async def _tcp_serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def reply(resp: bytes) -> None:
            if not writer.is_closing():
                writer.write(struct.pack("!H", len(resp)) + resp)

        try:
            while True:
                hdr = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT)
                data = await asyncio.wait_for(reader.readexactly(struct.unpack("!H", hdr)[0]), TCP_IDLE_TIMEOUT)
                self.tcp_queries += 1
                try:
                    r = fast_response(data, self.table, True)
                    if r is None:
                        r = self.slow(data, True, reply)
                except Exception:
                    self.errors += 1
                    log.exception("dns: error answering a TCP query")
                    r = None
                if r is not None:
                    reply(r)
                    await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _split_uncompressed(buf: bytes, count: int) -> list[bytes]:
    out, i = [], 0
    for _ in range(count):
        j = i
        while buf[j]:
            j += buf[j] + 1
        j += 1
        rdlen = struct.unpack_from("!H", buf, j + 8)[0]
        out.append(buf[i:j + 10 + rdlen])
        i = j + 10 + rdlen
    return out


def _big_rcvbuf(sock: socket.socket, size: int = 4 << 20) -> None:
    """A 4 MiB receive buffer absorbs query bursts; SO_RCVBUFFORCE (CAP_NET_ADMIN, which the daemon has)
    goes past net.core.rmem_max, else the capped SO_RCVBUF."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), size)
    except OSError:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


class _Once(asyncio.DatagramProtocol):
    def __init__(self, fut: asyncio.Future[bytes], qid: bytes) -> None:
        self.fut, self.qid = fut, qid

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if data[:2] == self.qid and not self.fut.done():
            self.fut.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.fut.done():
            self.fut.set_exception(exc)


async def _udp_exchange(query: bytes, host: str, port: int) -> bytes | None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bytes] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(lambda: _Once(fut, query[:2]), remote_addr=(host, port))
    try:
        transport.sendto(query)
        return await fut
    finally:
        transport.close()


async def _tcp_exchange(query: bytes, host: str, port: int) -> bytes | None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(struct.pack("!H", len(query)) + query)
        await writer.drain()
        n = struct.unpack("!H", await reader.readexactly(2))[0]
        return await reader.readexactly(n)
    finally:
        writer.close()
