"""The Kubernetes API as the source of desired state: list+watch Services, EndpointSlices and this Node.

This is client-go's reflector, reduced to what kproxy needs and tuned for 100k endpoints:

- **Transport and auth** come from the ``kubernetes`` package (``load_kube_config`` /
  ``load_incluster_config``, its urllib3 pool manager with the client certificates, bearer tokens with
  their refresh hooks, proxies). The JSON is parsed here with :func:`json.loads` (orjson when installed)
  and the plain dicts go to the store: the generated client models are far too slow at this scale.
  Connections get TCP keepalive like client-go's dialer, so a dead peer under an idle watch is noticed.
- **List**: paginated (``limit=500`` + ``continue``) so 100k endpoints never become one giant response.
  The first list asks for the most recent state (``resourceVersion`` unset: a consistent read, served
  from the watch cache on 1.31+). A relist after a 410 asks for ``resourceVersion=<last seen>`` with
  ``resourceVersionMatch=NotOlderThan`` so the store never goes back in time, falling back to the most
  recent state if that is refused. An expired ``continue`` token (410 mid-list) restarts the list. A list
  is handed to :meth:`ClusterStore.replace`, which derives the deletions that happened while we were not
  watching.
- **Watch** from the list's resourceVersion with ``allowWatchBookmarks=true`` and a random
  ``timeoutSeconds`` of 5-10 min (as client-go, so thousands of nodes don't reconnect in lockstep). The
  resourceVersion is tracked from every event and bookmark; a watch that ends (timeout, EOF, reset,
  5xx, connection refused) resumes from it, so nothing is lost and nothing is relisted. Events whose
  resourceVersion is not newer than the last one seen (a replay) are dropped before they reach the store.
- **410 Gone** (HTTP status of the watch request, or an ERROR event with code 410 in the stream): the
  resourceVersion was compacted away; relist that kind.
- **Backoff**: exponential with jitter (0.8 s doubling to a 30 s cap, as client-go) after failures that
  made no progress; a shared token bucket (``api_qps``/``api_burst``) bounds the request rate so no error
  path can hot-loop against the API server.

Threads: one per kind runs the blocking HTTP (list pages, then the watch stream) and parses; one applier
thread drains a FIFO and applies everything that queued up while it was busy as one batch (so a burst of
10k events is one ``store.apply``, and a slow store never stalls the sockets). One FIFO keeps a kind's
relist ordered after its earlier events. ``store.synced`` is set once the three initial lists are
applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import urllib3

from ..config import ProxyConfig
from ..store import KIND_NODE, KIND_SERVICE, KIND_SLICE, ClusterStore, Event

log = logging.getLogger(__name__)

try:  # orjson is ~3x faster on big lists; optional
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment
    import json

    _loads = json.loads

PAGE_SIZE = 500
MIN_WATCH_TIMEOUT = 300  # seconds; a watch asks for 5-10 min like client-go
CONNECT_TIMEOUT = 10.0
LIST_READ_TIMEOUT = 60.0
WATCH_READ_SLACK = 30.0  # read timeout = the watch's timeoutSeconds + this: a silent dead server is noticed
READ_SIZE = 256 * 1024
PROGRESS_AFTER = 10.0  # a watch that stayed up this long counts as healthy (its end resets the backoff)


class KubeConfigError(RuntimeError):
    """The API client configuration could not be loaded; the message names the file or the mode."""


class ApiStatusError(Exception):
    """A failure status from the API server: an HTTP error or an ERROR event in a watch stream."""

    def __init__(self, code: int, reason: str = "", message: str = "", retry_after: float = 0.0) -> None:
        super().__init__(f"{code} {reason}: {message}".strip(": "))
        self.code = code
        self.reason = reason
        self.message = message
        self.retry_after = retry_after

    @property
    def gone(self) -> bool:
        """410 Gone / Expired: the requested resourceVersion (or continue token) was compacted."""
        return self.code == 410 or self.reason in ("Expired", "Gone")


@dataclass(frozen=True, slots=True)
class Resource:
    """One watched collection."""

    kind: str  # the store's kind
    path: str  # the cluster-wide list/watch path
    field_selector: str = ""


def resources_for(node_name: str, all_nodes: bool = False) -> tuple[Resource, ...]:
    """The three collections kproxy watches. Services are not filtered server-side: DNS wants all of them
    (the store itself ignores ``service.kubernetes.io/service-proxy-name`` Services for proxying). The
    proxy needs only its own Node; DNS publishes every node (``<node>.node.<zone>``, nodeport SRV)."""
    return (
        Resource(KIND_SERVICE, "/api/v1/services"),
        Resource(KIND_SLICE, "/apis/discovery.k8s.io/v1/endpointslices"),
        Resource(KIND_NODE, "/api/v1/nodes", "" if all_nodes else f"metadata.name={node_name}"),
    )


def rv_newer(rv: str, than: str) -> bool:
    """Whether resourceVersion ``rv`` is newer than ``than``.

    resourceVersions are opaque per the API contract, but every real server (etcd revisions) issues
    increasing integers; when both parse as integers they are compared so a replayed event is
    recognised. Anything else counts as newer (apply it: the store is idempotent by value anyway).
    """
    if not than or not rv or not rv.isdigit() or not than.isdigit():
        return True
    return int(rv) > int(than)


class Backoff:
    """Exponential backoff with jitter: delay d, then 2d... up to ``cap``; each sleep is d..2d."""

    def __init__(self, initial: float = 0.8, cap: float = 30.0, factor: float = 2.0) -> None:
        self.initial, self.cap, self.factor = initial, cap, factor
        self._next = initial

    def next(self) -> float:
        d = self._next
        self._next = min(self.cap, d * self.factor)
        return min(self.cap, d * (1.0 + random.random()))

    def reset(self) -> None:
        self._next = self.initial


class TokenBucket:
    """A thread-safe token bucket (``qps`` tokens per second, at most ``burst``); qps <= 0 disables it."""

    def __init__(self, qps: float, burst: int) -> None:
        self.qps = qps
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self, stop: threading.Event) -> None:
        if self.qps <= 0:
            return
        while not stop.is_set():
            with self._lock:
                now = time.monotonic()
                self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.qps)
                self._at = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                wait = (1.0 - self._tokens) / self.qps
            stop.wait(wait)


@dataclass
class Stats:
    """Counters for tests, logs and metrics."""

    lists: int = 0  # complete lists (initial + relists)
    relists: int = 0
    pages: int = 0
    watches: int = 0  # watch requests started
    events: int = 0  # watch events handed to the store
    bookmarks: int = 0
    replays_dropped: int = 0
    errors: int = 0
    batches: int = 0
    last_rv: dict[str, str] = field(default_factory=dict)


def keepalive_socket_options(idle: int = 30, interval: int = 15, count: int = 9) -> list[tuple[int, int, int]]:
    import socket

    opts = list(urllib3.connection.HTTPConnection.default_socket_options)  # keeps TCP_NODELAY
    opts.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
        if hasattr(socket, name):
            opts.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return opts


class _Stopped(Exception):
    pass


def load_api_configuration(config: ProxyConfig) -> Any:
    """Build a ``kubernetes.client.Configuration`` from --kubeconfig, --master or the in-cluster env."""
    from kubernetes import client as kclient
    from kubernetes import config as kconfig

    cfg = kclient.Configuration()
    if config.kubeconfig:
        try:
            kconfig.load_kube_config(config_file=config.kubeconfig, client_configuration=cfg)
        except Exception as e:
            raise KubeConfigError(f"cannot load kubeconfig {config.kubeconfig}: {e}") from None
    elif not config.master:
        try:
            kconfig.load_incluster_config(client_configuration=cfg)
        except Exception as e:
            raise KubeConfigError(
                f"no --kubeconfig or --master given and the in-cluster configuration is unavailable: {e}"
            ) from None
    if config.master:
        # Note: a kubeconfig's token refresh hook re-applies the kubeconfig (host included) to cfg on
        # every auth_settings() call, so KubeSource also applies the override per request.
        cfg.host = config.master
    if not cfg.host:
        raise KubeConfigError(f"no API server address in kubeconfig {config.kubeconfig or '(none)'}")
    return cfg


class KubeSource:
    """Feeds a ClusterStore from the Kubernetes API (list+watch of Services, EndpointSlices, this Node)."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        backoff_initial: float = 0.8,
        backoff_cap: float = 30.0,
        min_watch_timeout: int = MIN_WATCH_TIMEOUT,
        watch_read_slack: float = WATCH_READ_SLACK,
        page_size: int = PAGE_SIZE,
        all_nodes: bool = False,
    ) -> None:
        self.config = config
        self.node_name = config.node_name
        self.resources = resources_for(self.node_name, all_nodes)
        self.backoff_initial = backoff_initial
        self.backoff_cap = backoff_cap
        self.min_watch_timeout = min_watch_timeout
        self.watch_read_slack = watch_read_slack
        self.page_size = page_size
        self.stats = Stats()
        self.ready: asyncio.Event | None = None  # set once the initial lists are applied
        self._stop = threading.Event()
        self._limiter = TokenBucket(config.api_qps, config.api_burst)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._open: set[Any] = set()  # live urllib3 responses, shut down on stop
        self._open_lock = threading.Lock()
        self._auth_lock = threading.Lock()
        self._api_client: Any = None
        self._api_config: Any = None
        self._pool: Any = None
        self._threads: list[threading.Thread] = []

    # ---- lifecycle ------------------------------------------------------------------------------------
    async def run(self, store: ClusterStore) -> None:
        """List and watch until cancelled; raises :class:`KubeConfigError` on an unusable configuration."""
        loop = asyncio.get_running_loop()
        self.ready = asyncio.Event()
        self._connect(await asyncio.to_thread(load_api_configuration, self.config))
        log.info("kube source: API server %s, node %s", self.config.master or self._api_config.host, self.node_name)
        fatal: asyncio.Future[BaseException] = loop.create_future()

        def report(exc: BaseException) -> None:
            if not fatal.done():
                fatal.set_result(exc)

        def guarded(fn: Callable[[], None], name: str) -> Callable[[], None]:
            def target() -> None:
                try:
                    fn()
                except _Stopped:
                    pass
                except BaseException as e:  # a bug: surface it to the daemon rather than hang silently
                    if not self._stop.is_set():
                        log.exception("kube source: %s thread died", name)
                        loop.call_soon_threadsafe(report, e)
            return target

        ready = self.ready

        def on_synced() -> None:
            store.synced = True
            loop.call_soon_threadsafe(ready.set)

        self._threads = [threading.Thread(target=guarded(lambda: self._apply_loop(store, on_synced), "applier"),
                                          name="kube-applier", daemon=True)]
        for res in self.resources:
            refl = _Reflector(self, res)
            self._threads.append(threading.Thread(target=guarded(refl.run, res.kind),
                                                  name=f"kube-{res.kind}", daemon=True))
        for t in self._threads:
            t.start()
        try:
            exc = await fatal
            raise RuntimeError(f"kube source failed: {exc}") from exc
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop all threads (idempotent; does not wait for them)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._queue.put(None)
        with self._open_lock:
            responses = list(self._open)
        for r in responses:
            _shutdown(r)

    def join(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _connect(self, api_config: Any) -> None:
        from kubernetes import client as kclient

        if getattr(api_config, "socket_options", None) is None:
            # TCP keepalive like client-go's dialer (30 s idle, 15 s probes): a watch on a dead peer
            # (node lost its route, apiserver VM gone) is noticed in ~3 min, not at the read timeout.
            api_config.socket_options = keepalive_socket_options()
        self._api_config = api_config
        self._api_client = kclient.ApiClient(api_config)
        self._pool = self._api_client.rest_client.pool_manager

    # ---- HTTP -----------------------------------------------------------------------------------------
    def request(self, path: str, params: dict[str, str], read_timeout: float, gzip: bool = False) -> Any:
        """GET with auth, streaming; returns the urllib3 response (status not checked)."""
        self._limiter.acquire(self._stop)
        if self._stop.is_set():
            raise _Stopped
        headers = {"Accept": "application/json", "User-Agent": "kproxy"}
        if gzip:
            # Like client-go: the apiserver gzips responses over 128 KiB (list pages of a big cluster are
            # ~1 MB of JSON each; x thousands of nodes on a relist); urllib3 decodes transparently.
            headers["Accept-Encoding"] = "gzip"
        # auth_settings() runs the configuration's refresh hook (exec plugins, rotated in-cluster tokens),
        # which rewrites the shared configuration: one thread at a time.
        with self._auth_lock:
            for auth in self._api_config.auth_settings().values():
                if auth.get("in") == "header" and auth.get("value"):
                    headers[auth["key"]] = auth["value"]
            url = (self.config.master or self._api_config.host).rstrip("/") + path
        if params:
            url += "?" + urlencode(params)
        resp = self._pool.request(
            "GET", url, headers=headers, preload_content=False, retries=False,
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=read_timeout),
        )
        with self._open_lock:
            self._open.add(resp)
        if self._stop.is_set():
            self.release(resp, broken=True)
            raise _Stopped
        return resp

    def release(self, resp: Any, broken: bool) -> None:
        with self._open_lock:
            self._open.discard(resp)
        if broken:
            with contextlib.suppress(Exception):
                resp.close()
        with contextlib.suppress(Exception):
            resp.release_conn()

    # ---- applying ---------------------------------------------------------------------------------------
    def _apply_loop(self, store: ClusterStore, on_synced: Callable[[], None]) -> None:
        """Drain the FIFO; everything queued since the last round is applied as one batch, in order."""
        pending_initial = {r.kind for r in self.resources}
        while True:
            item = self._queue.get()
            items = [item]
            with contextlib.suppress(queue.Empty):
                while len(items) < 10_000:
                    items.append(self._queue.get_nowait())
            events: list[Event] = []
            for it in items:
                if it is None:
                    return
                op = it[0]
                if op == "events":
                    events.extend(it[2])
                    continue
                if events:
                    self._apply(store, events)
                    events = []
                if op == "replace":
                    _, kind, objs, initial = it
                    t0 = time.perf_counter()
                    changed = store.replace(kind, objs)
                    self.stats.batches += 1
                    log.info("kube source: applied the list of %d %s objects to the store in %.2fs (%d changes)",
                             len(objs), kind, time.perf_counter() - t0, changed)
                    if initial and kind in pending_initial:
                        pending_initial.discard(kind)
                        if not pending_initial:
                            on_synced()
            if events:
                self._apply(store, events)

    def _apply(self, store: ClusterStore, events: list[Event]) -> None:
        store.apply(events)
        self.stats.batches += 1
        self.stats.events += len(events)


def _shutdown(resp: Any) -> None:
    """Unblock a thread reading ``resp`` (urllib3 >= 2.3 has shutdown(); else close the socket)."""
    with contextlib.suppress(Exception):
        if hasattr(resp, "shutdown"):
            resp.shutdown()
        else:  # pragma: no cover - old urllib3
            resp.close()


def _status_from(resp: Any, body: bytes | None = None) -> ApiStatusError:
    """An ApiStatusError from a non-2xx response (the body is a metav1.Status when the API says so)."""
    if body is None:
        try:
            body = resp.read()
        except Exception:
            body = b""
    reason, message = resp.reason or "", ""
    try:
        st = _loads(body or b"{}")
        if isinstance(st, dict):
            reason = st.get("reason") or reason
            message = st.get("message") or ""
    except ValueError:
        message = (body or b"")[:200].decode("utf-8", "replace")
    retry_after = 0.0
    with contextlib.suppress(TypeError, ValueError):
        retry_after = float(resp.headers.get("Retry-After") or 0)
    return ApiStatusError(resp.status, reason, message, retry_after)


def _meta_rv(obj: Any) -> str:
    if isinstance(obj, dict):
        meta = obj.get("metadata")
        if isinstance(meta, dict):
            rv = meta.get("resourceVersion")
            if isinstance(rv, str):
                return rv
    return ""


_NETWORK_ERRORS = (urllib3.exceptions.HTTPError, OSError, ValueError)


class _Reflector:
    """List+watch of one collection; runs in its own thread."""

    def __init__(self, src: KubeSource, res: Resource) -> None:
        self.src = src
        self.res = res
        self.rv = ""  # the last resourceVersion seen (list, event or bookmark)
        self.synced = False
        self.received = 0  # watch lines received by the current attempt
        self.pages = 0  # pages of the last list
        self.watch_started = 0.0  # monotonic start of the current watch (0: none)
        self.backoff = Backoff(src.backoff_initial, src.backoff_cap)

    def _made_progress(self) -> bool:
        """Whether the last watch got anything or stayed up a while (client-go resets its backoff after
        2 min without failures; a quiet watch cut after hours must not inherit an old backoff)."""
        return bool(self.received) or (
            self.watch_started > 0 and time.monotonic() - self.watch_started >= PROGRESS_AFTER)

    def _sleep(self, delay: float) -> None:
        if self.src._stop.wait(delay):
            raise _Stopped

    def run(self) -> None:
        need_list = True
        relist_without_progress = 0
        while not self.src._stop.is_set():
            self.received = 0
            self.watch_started = 0.0
            try:
                if need_list:
                    self.list()
                    need_list = False
                    self.backoff.reset()
                progressed = self.watch()
                if progressed:
                    relist_without_progress = 0
                    self.backoff.reset()
                    continue  # a normal end of a watch (timeoutSeconds): resume at once
                self._sleep(self.backoff.next())
            except _Stopped:
                return
            except ApiStatusError as e:
                self.src.stats.errors += 1
                if e.gone:
                    # Compacted: the watch cannot resume; relist (deletions are derived by replace).
                    log.info("kube source: %s watch from resourceVersion %s: %s; relisting",
                             self.res.kind, self.rv, e)
                    need_list = True
                    relist_without_progress = 1 if self._made_progress() else relist_without_progress + 1
                    if relist_without_progress > 1:  # a server that keeps saying 410: don't hot-loop
                        self._sleep(self.backoff.next())
                    continue
                log.warning("kube source: %s %s failed: %s", self.res.kind,
                            "watch" if not need_list else "list", e)
                if self._made_progress():
                    self.backoff.reset()
                delay = self.backoff.next()
                if e.code == 429 and e.retry_after:
                    delay = max(delay, min(e.retry_after, self.src.backoff_cap))
                self._sleep(delay)
            except _NETWORK_ERRORS as e:
                if self.src._stop.is_set():
                    return
                if self._made_progress():  # the watch worked for a while: a fresh disconnect, retry soon
                    self.backoff.reset()
                self.src.stats.errors += 1
                log.warning("kube source: %s %s interrupted: %s", self.res.kind,
                            "watch" if not need_list else "list", e)
                self._sleep(self.backoff.next())

    # ---- list -------------------------------------------------------------------------------------------
    def list(self) -> None:
        """List the whole collection (paginated) and queue a replace of the store's objects of this kind."""
        src = self.src
        relist = self.synced
        rv_from = self.rv if relist else ""
        t0 = time.perf_counter()
        try:
            items, rv = self._list_pages(rv_from)
        except ApiStatusError as e:
            if not (e.gone or e.code in (400, 422, 504)) or not rv_from:
                raise
            # Our last resourceVersion is unavailable / too large, or the continue token expired: get
            # the most recent state (client-go's isLastSyncResourceVersionUnavailable path).
            log.info("kube source: %s list at resourceVersion %s refused (%s); listing latest",
                     self.res.kind, rv_from, e)
            items, rv = self._list_pages("")
        src.stats.lists += 1
        log.info("kube source: %s %d %s objects at resourceVersion %s in %.2fs (%d pages)",
                 "relisted" if relist else "listed", len(items), self.res.kind, rv, time.perf_counter() - t0,
                 self.pages)
        src.stats.relists += relist
        self.rv = rv
        src.stats.last_rv[self.res.kind] = rv
        src._queue.put(("replace", self.res.kind, items, not self.synced))
        self.synced = True

    def _list_pages(self, rv_from: str) -> tuple[list[dict[str, Any]], str]:
        src = self.src
        items: list[dict[str, Any]] = []
        cont = ""
        restarts = 0
        self.pages = 0
        while True:
            params = {"limit": str(src.page_size)}
            if cont:
                params["continue"] = cont
            elif rv_from:
                params["resourceVersion"] = rv_from
                params["resourceVersionMatch"] = "NotOlderThan"
            if self.res.field_selector:
                params["fieldSelector"] = self.res.field_selector
            resp = src.request(self.res.path, params, LIST_READ_TIMEOUT, gzip=True)
            try:
                body = resp.read()
            except BaseException:
                src.release(resp, broken=True)
                raise
            src.release(resp, broken=False)
            if resp.status != 200:
                err = _status_from(resp, body)
                if err.gone and cont and restarts < 3:
                    # The continue token expired (compaction during a long list): start over.
                    log.info("kube source: %s list continue token expired; restarting the list", self.res.kind)
                    items, cont, restarts = [], "", restarts + 1
                    continue
                raise err
            doc = _loads(body)
            src.stats.pages += 1
            self.pages += 1
            page = doc.get("items") or []
            items.extend(page)
            meta = doc.get("metadata") or {}
            cont = meta.get("continue") or ""
            if not cont:
                return items, str(meta.get("resourceVersion") or "")

    # ---- watch ------------------------------------------------------------------------------------------
    def watch(self) -> bool:
        """Watch from self.rv until the stream ends; True when it made progress (events, bookmarks or a
        full timeout period), False when it ended early without any (then the caller backs off)."""
        src = self.src
        timeout = int(src.min_watch_timeout * (1.0 + random.random()))
        params = {
            "watch": "1",
            "resourceVersion": self.rv,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout),
        }
        if self.res.field_selector:
            params["fieldSelector"] = self.res.field_selector
        started = self.watch_started = time.monotonic()
        resp = src.request(self.res.path, params, timeout + src.watch_read_slack)
        src.stats.watches += 1
        clean = False
        try:
            if resp.status != 200:
                raise _status_from(resp)
            pending: list[bytes] = []
            for chunk in resp.stream(READ_SIZE):
                if src._stop.is_set():
                    raise _Stopped
                if b"\n" not in chunk:
                    pending.append(chunk)
                    continue
                pending.append(chunk)
                lines = b"".join(pending).split(b"\n")
                pending = [lines.pop()] if lines[-1] else []
                self.received += self._handle_lines(lines)
            clean = True
            if pending and b"".join(pending).strip():
                raise urllib3.exceptions.ProtocolError("watch stream ended inside an event")
        finally:
            src.release(resp, broken=not clean)
        if self.received:
            return True
        # No event at all: a quiet watch that lasted is fine; an immediate EOF is not (back off).
        return time.monotonic() - started >= min(timeout * 0.9, PROGRESS_AFTER)

    def _handle_lines(self, lines: list[bytes]) -> int:
        """Parse complete watch lines, queue the events in one batch; raise on an ERROR event."""
        kind = self.res.kind
        stats = self.src.stats
        events: list[Event] = []
        n = 0
        try:
            for line in lines:
                if not line.strip():
                    continue
                ev = _loads(line)
                n += 1
                etype = ev.get("type")
                obj = ev.get("object")
                if etype == "ERROR":
                    st = obj if isinstance(obj, dict) else {}
                    raise ApiStatusError(int(st.get("code") or 500), st.get("reason") or "",
                                         st.get("message") or "watch error")
                rv = _meta_rv(obj)
                if etype == "BOOKMARK":
                    stats.bookmarks += 1
                    if rv and rv_newer(rv, self.rv):
                        self.rv = rv
                    continue
                if etype not in ("ADDED", "MODIFIED", "DELETED") or not isinstance(obj, dict):
                    log.warning("kube source: %s: ignoring watch event of type %r", kind, etype)
                    continue
                if rv and not rv_newer(rv, self.rv):
                    stats.replays_dropped += 1
                    continue
                events.append(Event(etype, kind, obj))
                if rv:
                    self.rv = rv
        finally:
            if events:
                self.src._queue.put(("events", kind, events))
            stats.last_rv[kind] = self.rv
        return n
