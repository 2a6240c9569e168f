"""kube-proxy-compatible health endpoints: the proxy's ``/healthz`` + ``/livez`` and per-Service health checks.

:class:`ProxyHealthServer` answers on ``--healthz-bind-address`` (default ``0.0.0.0:10256``) exactly like
kube-proxy's ``pkg/proxy/healthcheck/proxy_health.go``: the proxy is unhealthy when an update was queued
and not applied within ``healthTimeout`` (2 x syncPeriod); ``/healthz`` additionally fails while the Node
is being deleted or is tainted ``ToBeDeletedByClusterAutoscaler`` (so cloud load balancers drain it),
``/livez`` ignores the Node.

:class:`ServiceHealthServer` opens one listener per ``healthCheckNodePort`` of a Service with
``externalTrafficPolicy: Local`` and answers 200 while the node has local ready endpoints for it (and the
proxy is healthy), 503 otherwise -- the signal cloud load balancers use to send traffic only to nodes
that can serve it locally (``service_health.go``).

All listeners are served by one background thread running its own asyncio loop (:class:`HttpLoop`), not
by the daemon's event loop: a long rule sync must never delay a liveness probe, and thousands of
health-check ports cost one socket each rather than one thread each. Handlers only read in-memory state
under a lock, so they are fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import email.utils
import errno
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

log = logging.getLogger(__name__)

TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"
"""Taint the Cluster Autoscaler puts on a node before deleting it (kube-proxy's ``ToBeDeletedTaint``)."""

IPV4 = "IPv4"
IPV6 = "IPv6"

ServiceName = tuple[str, str]  # (namespace, name)


# ---- a minimal HTTP/1.1 server on a private asyncio loop ---------------------------------------------

@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: Mapping[str, str]  # lower-cased names


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request], Response]

_MAX_HEADER_BYTES = 16 * 1024
_READ_TIMEOUT = 10.0


def not_found() -> Response:
    """Go's ``http.NotFound`` answer."""
    return Response(404, b"404 page not found\n",
                    [("Content-Type", "text/plain; charset=utf-8"), ("X-Content-Type-Options", "nosniff")])


def _bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket; a wildcard host listens dual-stack, as Go's ``net.Listen("tcp", ...)`` does."""
    wildcard = host in ("", "0.0.0.0", "::")
    candidates: list[tuple[int, str]]
    if wildcard:
        candidates = [(socket.AF_INET6, "::")]
        if host != "::":
            candidates.append((socket.AF_INET, "0.0.0.0"))
    else:
        candidates = [(socket.AF_INET6 if ":" in host else socket.AF_INET, host)]
    last: OSError | None = None
    for fam, addr in candidates:
        try:
            sock = socket.socket(fam, socket.SOCK_STREAM)
        except OSError as e:  # IPv6 disabled in this kernel / netns
            last = e
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6 and wildcard:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((addr, port))
            sock.listen(128)
            sock.setblocking(False)
            return sock
        except OSError as e:
            sock.close()
            last = e
            # Only fall back to IPv4 when IPv6 itself is unusable; a port conflict is a real error.
            if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
                raise
    assert last is not None
    raise last


class Listener:
    """One listening socket served by an :class:`HttpLoop`; :meth:`close` stops it (idempotent)."""

    def __init__(self, loop: HttpLoop, server: asyncio.base_events.Server, host: str, port: int) -> None:
        self._loop = loop
        self._server = server
        self.host = host
        self.port = port
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.call(self._close())

    async def _close(self) -> None:
        self._server.close()


class HttpLoop:
    """A daemon thread running an asyncio loop that serves tiny HTTP handlers.

    Thread-safe: :meth:`listen` and :meth:`Listener.close` may be called from any thread except the loop's
    own (they block until done). Each request is answered with ``Connection: close``.
    """

    _default: HttpLoop | None = None
    _default_lock = threading.Lock()

    def __init__(self, name: str = "kproxy-http") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @classmethod
    def default(cls) -> HttpLoop:
        """The process-wide loop shared by every health, service-health and metrics listener."""
        with cls._default_lock:
            if cls._default is None or not cls._default._thread.is_alive():
                cls._default = cls()
            return cls._default

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        if threading.current_thread() is self._thread:
            raise RuntimeError("HttpLoop.call from the HTTP loop thread would deadlock")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def listen(self, host: str, port: int, handler: Handler) -> Listener:
        """Bind ``host:port`` (port 0 picks a free one) and serve ``handler``; raises OSError on bind errors."""
        sock = _bind_socket(host, port)
        bound_port = sock.getsockname()[1]

        async def start() -> asyncio.base_events.Server:
            return await asyncio.start_server(lambda r, w: self._serve(r, w, handler), sock=sock)

        try:
            server = self.call(start())
        except BaseException:
            sock.close()
            raise
        return Listener(self, server, host, bound_port)

    def stop(self) -> None:
        """Stop the loop thread (tests; the default loop lives as long as the process)."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler) -> None:
        try:
            try:
                raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                return
            if len(raw) > _MAX_HEADER_BYTES:
                return
            lines = raw.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                resp = Response(400, b"400 Bad Request")
                method = "GET"
            else:
                method, target, _ = parts
                path, _, query = target.partition("?")
                headers = {}
                for line in lines[1:]:
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                try:
                    resp = handler(Request(method, path, query, headers))
                except Exception:
                    log.exception("HTTP handler for %s failed", path)
                    resp = Response(500, b"internal error\n")
            writer.write(_render(resp, head_only=method == "HEAD"))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _render(resp: Response, head_only: bool) -> bytes:
    try:
        reason = HTTPStatus(resp.status).phrase
    except ValueError:
        reason = ""
    head = [f"HTTP/1.1 {resp.status} {reason}"]
    names = {k.lower() for k, _ in resp.headers}
    head.extend(f"{k}: {v}" for k, v in resp.headers)
    if "content-type" not in names:
        head.append("Content-Type: text/plain; charset=utf-8")
    head.append(f"Date: {email.utils.formatdate(usegmt=True)}")
    head.append(f"Content-Length: {len(resp.body)}")
    head.append("Connection: close")
    out = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
    return out if head_only else out + resp.body


# ---- proxy health (/healthz, /livez) ------------------------------------------------------------------

_ZERO_TIME = "0001-01-01T00:00:00Z"


def go_time(ts: float | None) -> str:
    """Render a Unix timestamp like Go's ``time.Time`` JSON (RFC 3339, trailing fraction zeros trimmed).

    ``None`` is Go's zero time, which kube-proxy reports before the first successful sync.
    """
    if ts is None:
        return _ZERO_TIME
    dt = _dt.datetime.fromtimestamp(ts, _dt.UTC)
    out = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if dt.microsecond:
        out += "." + f"{dt.microsecond:06d}".rstrip("0")
    return out + "Z"


def _family(family: str | int) -> str:
    if family in (IPV4, 4, socket.AF_INET, "4", "ipv4"):
        return IPV4
    if family in (IPV6, 6, socket.AF_INET6, "6", "ipv6"):
        return IPV6
    raise ValueError(f"unknown IP family {family!r}")


@dataclass(slots=True)
class ProxyHealth:
    """kube-proxy's ``ProxyHealth``: overall state plus one entry per IP family proxier."""

    healthy: bool
    last_updated: float | None
    current_time: float
    status: dict[str, tuple[float, bool]] = field(default_factory=dict)  # family -> (lastUpdated, healthy)

    def to_json(self, node_eligible: bool | None = None, last_updated: float | None = None) -> bytes:
        """kube-proxy's exact JSON (Go ``encoding/json`` of ProxyHealth: same keys, order, no spaces)."""
        doc: dict[str, Any] = {
            "lastUpdated": go_time(self.last_updated if last_updated is None else last_updated),
            "currentTime": go_time(self.current_time),
        }
        if node_eligible is not None:
            doc["nodeEligible"] = node_eligible
        doc["healthy"] = self.healthy
        if self.status:
            doc["status"] = {fam: {"lastUpdated": go_time(ts), "healthy": ok}
                             for fam, (ts, ok) in sorted(self.status.items())}
        return json.dumps(doc, separators=(",", ":")).encode()


class _HealthMetrics(Protocol):
    def healthz_answered(self, code: int) -> None: ...
    def livez_answered(self, code: int) -> None: ...


def node_eligible(node: Mapping[str, Any] | None) -> bool:
    """kube-proxy's node eligibility from a raw v1 Node: not being deleted, not ToBeDeletedByClusterAutoscaler.

    A missing Node (not seen yet) counts as eligible, as in kube-proxy before v1.32: a proxy that cannot
    read its Node must not take itself out of every load balancer.
    """
    if not node:
        return True
    meta = node.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return False
    taints = (node.get("spec") or {}).get("taints") or []
    return not any(isinstance(t, Mapping) and t.get("key") == TO_BE_DELETED_TAINT for t in taints)


class ProxyHealthServer:
    """The proxy's ``/healthz`` and ``/livez`` (kube-proxy's ProxyHealthServer).

    Call :meth:`queued_update` when a Service/EndpointSlice/Node change needing a sync arrives and
    :meth:`updated` after a sync was applied successfully (per IP family; single-stack callers can omit it).
    The proxy turns unhealthy when the oldest still-pending update is older than ``health_timeout``.

    One deliberate difference from kube-proxy: a family that has queued updates but never completed a sync
    turns unhealthy after ``health_timeout`` too (kube-proxy only judges families that synced once, so a
    proxy stuck before its first sync reports healthy forever). Before anything is queued the proxy is
    healthy, as in kube-proxy (starting up).
    """

    def __init__(self, addr: str = "0.0.0.0:10256", health_timeout: float = 60.0, *,
                 metrics: _HealthMetrics | None = None, clock: Callable[[], float] = time.time,
                 loop: HttpLoop | None = None) -> None:
        host, _, port = addr.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.health_timeout = health_timeout
        self.metrics = metrics
        self.clock = clock
        self._loop = loop
        self._lock = threading.Lock()
        self._last_updated: dict[str, float] = {}
        self._oldest_pending: dict[str, float] = {}
        self._node_eligible = True
        self._listener: Listener | None = None

    @classmethod
    def from_config(cls, config: Any, **kw: Any) -> ProxyHealthServer | None:
        """Build from a ProxyConfig: ``healthTimeout = 2 * syncPeriod``; None when the address disables it."""
        addr = config.healthz_bind_address
        if not addr or addr.endswith(":0"):
            return None
        return cls(addr, 2 * config.sync_period, **kw)

    # --- state

    def queued_update(self, family: str | int = IPV4) -> None:
        fam = _family(family)
        with self._lock:
            self._oldest_pending.setdefault(fam, self.clock())

    def updated(self, family: str | int = IPV4) -> None:
        fam = _family(family)
        with self._lock:
            self._oldest_pending.pop(fam, None)
            self._last_updated[fam] = self.clock()

    def set_node_eligible(self, eligible: bool) -> None:
        with self._lock:
            self._node_eligible = bool(eligible)

    def sync_node(self, node: Mapping[str, Any] | None) -> bool:
        """Update eligibility from a raw v1 Node object (see :func:`node_eligible`); returns it."""
        eligible = node_eligible(node)
        self.set_node_eligible(eligible)
        return eligible

    @property
    def node_is_eligible(self) -> bool:
        with self._lock:
            return self._node_eligible

    def health(self) -> ProxyHealth:
        with self._lock:
            now = self.clock()
            status: dict[str, tuple[float, bool]] = {}
            healthy = True
            for fam in sorted(set(self._last_updated) | set(self._oldest_pending)):
                last = self._last_updated.get(fam)
                pending = self._oldest_pending.get(fam)
                ok = pending is None or now - pending < self.health_timeout
                healthy = healthy and ok
                if last is not None:
                    status[fam] = (last, ok)
            last_any = max(self._last_updated.values(), default=None)
        return ProxyHealth(healthy, last_any, now, status)

    def is_healthy(self) -> bool:
        """The proxier's health alone (ignores the Node), as the service health checks use it."""
        return self.health().healthy

    # --- HTTP

    def handle(self, req: Request) -> Response:
        if req.path not in ("/healthz", "/livez"):
            return not_found()
        health = self.health()
        headers = [("Content-Type", "application/json"), ("X-Content-Type-Options", "nosniff")]
        if req.path == "/healthz":
            eligible = self.node_is_eligible
            ok = health.healthy and eligible
            # Healthy answers report lastUpdated = now (kube-proxy keeps that for compatibility).
            body = health.to_json(eligible, health.current_time if ok else None)
            if self.metrics is not None:
                self.metrics.healthz_answered(200 if ok else 503)
        else:
            ok = health.healthy
            body = health.to_json(None, health.current_time if ok else None)
            if self.metrics is not None:
                self.metrics.livez_answered(200 if ok else 503)
        return Response(200 if ok else 503, body, headers)

    def start(self) -> None:
        """Bind and serve (raises OSError when the address is unusable). Idempotent."""
        if self._listener is not None:
            return
        self._listener = (self._loop or HttpLoop.default()).listen(self.host, self.port, self.handle)
        self.port = self._listener.port
        log.info("serving proxy health on %s:%d (/healthz, /livez)", self.host or "*", self.port)

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# ---- per-Service health checks (healthCheckNodePort) -------------------------------------------------

class _HealthSource(Protocol):
    def is_healthy(self) -> bool: ...


@dataclass(slots=True)
class _HcInstance:
    name: ServiceName
    port: int
    listeners: list[Listener] = field(default_factory=list)
    endpoints: int = 0


class ServiceHealthServer:
    """Health-check listeners for ``externalTrafficPolicy: Local`` Services (kube-proxy's ServiceHealthServer).

    ``node_ips`` are the addresses to listen on (the node IPs matching ``--nodeport-addresses``); empty or
    None listens on every address. ``proxy_health`` (usually the :class:`ProxyHealthServer`) makes every
    check fail while the proxy itself is unhealthy.
    """

    def __init__(self, proxy_health: _HealthSource | None = None, node_ips: Iterable[str] | None = None, *,
                 loop: HttpLoop | None = None, on_error: Callable[[ServiceName, int, OSError], None] | None = None
                 ) -> None:
        self.proxy_health = proxy_health
        ips = [ip for ip in (node_ips or ()) if ip]
        self.node_ips = ips or ["0.0.0.0"]
        self._loop = loop
        self._on_error = on_error
        self._lock = threading.Lock()  # guards _services and the counts (taken by request handlers)
        self._sync_lock = threading.Lock()  # serialises sync_services callers
        self._services: dict[ServiceName, _HcInstance] = {}

    def sync_services(self, services: Mapping[ServiceName, int]) -> None:
        """Make exactly ``services`` (name -> healthCheckNodePort) served; keep unchanged ones open.

        A port that cannot be opened (in use, no such address) is logged and skipped; it is retried on the
        next call, as kube-proxy does.
        """
        # Listeners are opened and closed without holding self._lock: the HTTP loop thread takes that lock
        # to answer requests, and opening/closing waits for the loop thread.
        with self._sync_lock:
            with self._lock:
                stale = [inst for name, inst in self._services.items() if services.get(name) != inst.port]
                for inst in stale:
                    del self._services[inst.name]
                missing = {n: int(p) for n, p in services.items() if p and n not in self._services}
            for inst in stale:
                log.info("closing health check for service %s/%s on port %d", *inst.name, inst.port)
                for lst in inst.listeners:
                    lst.close()
            for name, port in missing.items():
                inst = _HcInstance(name, port)
                try:
                    for ip in self.node_ips:
                        inst.listeners.append((self._loop or HttpLoop.default()).listen(
                            ip, port, lambda req, n=name: self._handle(n, req)))
                except OSError as e:
                    for lst in inst.listeners:
                        lst.close()
                    log.error("node failed to start health check for service %s/%s on port %d: %s",
                              name[0], name[1], port, e)
                    if self._on_error is not None:
                        self._on_error(name, port, e)
                    continue
                log.info("opened health check for service %s/%s on port %d", *name, port)
                with self._lock:
                    self._services[name] = inst

    def sync_endpoints(self, endpoints: Mapping[ServiceName, int]) -> None:
        """Set the number of local ready endpoints per Service; Services not named get 0."""
        with self._lock:
            for name, inst in self._services.items():
                inst.endpoints = int(endpoints.get(name, 0))

    def serving(self) -> dict[ServiceName, int]:
        """The Services currently served, with their ports."""
        with self._lock:
            return {n: i.port for n, i in self._services.items()}

    def stop(self) -> None:
        self.sync_services({})

    def _handle(self, name: ServiceName, req: Request) -> Response:
        with self._lock:
            inst = self._services.get(name)
            count = inst.endpoints if inst is not None else 0
        if inst is None:
            log.error("request for closed health check of service %s/%s", *name)
            return Response(503, b"")
        proxy_ok = self.proxy_health.is_healthy() if self.proxy_health is not None else True
        # Byte-for-byte kube-proxy's body (a dedented Go template), field order and indentation included.
        body = (
            "{\n"
            '\t"service": {\n'
            f'\t\t"namespace": {json.dumps(name[0])},\n'
            f'\t\t"name": {json.dumps(name[1])}\n'
            "\t},\n"
            f'\t"localEndpoints": {count},\n'
            f'\t"serviceProxyHealthy": {"true" if proxy_ok else "false"}\n'
            "}"
        ).encode()
        headers = [("Content-Type", "application/json"), ("X-Content-Type-Options", "nosniff"),
                   ("X-Load-Balancing-Endpoint-Weight", str(count))]
        return Response(200 if count and proxy_ok else 503, body, headers)


def health_check_targets(snapshot: Any) -> tuple[dict[ServiceName, int], dict[ServiceName, int]]:
    """Compute ``(services, endpoints)`` for :class:`ServiceHealthServer` from a ProxySnapshot.

    ``services``: Services with ``externalTrafficPolicy: Local`` and a healthCheckNodePort (kube-proxy's
    ``HealthCheckNodePorts``). ``endpoints``: per Service, the number of distinct local *ready* endpoint IPs
    over all its ports and families (kube-proxy's ``LocalReadyEndpoints``: a node whose local endpoints are
    all terminating must fail the check so load balancers drain it, even though those endpoints still
    serve existing traffic).
    """
    services: dict[ServiceName, int] = {}
    for spn, sp in snapshot.services.items():
        if sp.external_local and sp.health_check_node_port:
            services[spn.service_key] = sp.health_check_node_port
    local_ips: dict[ServiceName, set[str]] = {}
    for spn, eps in snapshot.endpoints.items():
        for ep in eps:
            if ep.is_local and ep.ready:
                local_ips.setdefault(spn.service_key, set()).add(ep.ip)
    return services, {k: len(v) for k, v in local_ips.items()}


def node_ips_for(nodeport_addresses: Iterable[str]) -> list[str]:
    """Local addresses matching ``--nodeport-addresses`` CIDRs, where health-check ports should listen.

    Empty (or ``primary``, which kube-proxy resolves from the Node object) means every address, returned as
    ``[]`` so :class:`ServiceHealthServer` listens on the wildcard -- kube-proxy's fallback as well when the
    addresses cannot be read.
    """
    import ipaddress

    nets = [ipaddress.ip_network(c, strict=False) for c in nodeport_addresses if c and c != "primary"]
    if not nets:
        return []

    def read() -> list[str]:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            return [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr()]

    try:
        try:
            asyncio.get_running_loop()
            in_loop = True
        except RuntimeError:
            in_loop = False
        if in_loop:
            # pyroute2's synchronous API drives its own event loop: keep it off a thread that runs one.
            import concurrent.futures

            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                addrs = pool.submit(read).result(10)
        else:
            addrs = read()
    except Exception as e:
        log.error("cannot read node addresses for nodePortAddresses (%s); health checks listen on all", e)
        return []
    ips = sorted({a for a in addrs if a and any(ipaddress.ip_address(a) in n for n in nets)})
    if not ips:
        log.warning("no local address matches nodePortAddresses %s; health checks listen on all addresses",
                    ", ".join(map(str, nets)))
    return ips
