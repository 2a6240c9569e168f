"""A fake kube-apiserver: just the list/watch HTTP protocol, for testing kproxy's Kubernetes source.

It stands in for kube-apiserver's (watch cache + etcd) read path for three collections, over plain HTTP
on 127.0.0.1:<free port>:

- ``GET /api/v1/services``, ``GET /apis/discovery.k8s.io/v1/endpointslices``, ``GET /api/v1/nodes``.
- **List**: a ``*List`` object with ``metadata.resourceVersion``; ``limit`` + ``continue`` pagination
  over a consistent snapshot (every page of one list is at the same resourceVersion, as etcd serves them);
  ``resourceVersion`` ""/"0"/N with ``resourceVersionMatch`` NotOlderThan (default) or Exact; N newer
  than the server → 504 "Too large resource version"; a continue token or Exact resourceVersion older
  than the compaction horizon → 410 Expired.
- **Watch** (``watch=1``): HTTP/1.1 chunked transfer encoding, one JSON line per chunk
  (``{"type": ..., "object": ...}``), ADDED/MODIFIED/DELETED from a global, increasing resourceVersion
  (like etcd's revision, shared by all collections), BOOKMARK events (object of the watched kind with only
  ``metadata.resourceVersion``) when ``allowWatchBookmarks=true``, ``timeoutSeconds`` (the stream ends
  with the terminating chunk). Watching from ""/"0" first sends synthetic ADDED events for the current
  state. Watching from a resourceVersion older than the compaction horizon gives HTTP 200 and an ERROR
  event with a 410 Expired Status (what the etcd-backed watch does), or an HTTP 410 status with
  ``gone_as_http_status``.
- ``fieldSelector=metadata.name=<x>`` (the only field selector supported; anything else is a 400).
- gzip ``Content-Encoding`` for list responses over 128 KiB when the client sends ``Accept-Encoding: gzip``.

Test controls (thread-safe): :meth:`create`/:meth:`update`/:meth:`upsert`/:meth:`delete`/:meth:`load`
change objects and record history; :meth:`bookmark` makes every bookmark-enabled watch send a BOOKMARK;
:meth:`compact` drops history (older watches then get 410); :meth:`drop_watches` cuts every watch
connection mid-stream (optionally in the middle of an event line); :meth:`fail_next` makes the next N
requests return an error status (500, 429...); :meth:`stop`/:meth:`start` make the port refuse
connections for a while; ``replay`` makes resumed watches re-send events the client already has (a
misbehaving proxy) to prove the client drops replays. Every request is recorded in :attr:`requests`.

What it does NOT fake: authentication/authorization (no TLS, tokens are accepted and ignored), protobuf
and content negotiation, ``labelSelector``, the watch-list streaming protocol
(``sendInitialEvents``/``k8s.io/initial-events-end``), namespaced paths, ``remainingItemCount``,
server-side apply/writes through HTTP (objects are changed through the Python controls), API priority &
fairness, and the watch cache's "too large resourceVersion" waiting for watches (it just waits for
events).
"""

from __future__ import annotations

import base64
import bisect
import gzip
import json
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

RESOURCES: dict[str, tuple[str, str, str, bool]] = {
    # path: (resource, kind, apiVersion, namespaced)
    "/api/v1/services": ("services", "Service", "v1", True),
    "/apis/discovery.k8s.io/v1/endpointslices": ("endpointslices", "EndpointSlice", "discovery.k8s.io/v1", True),
    "/api/v1/nodes": ("nodes", "Node", "v1", False),
}
GZIP_MIN = 128 * 1024  # kube-apiserver compresses responses above 128 KiB for clients that accept gzip
_BY_RESOURCE = {v[0]: (path, *v[1:]) for path, v in RESOURCES.items()}

Key = tuple[str, str]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass(slots=True)
class _Stored:
    rv: int
    obj: dict[str, Any]
    raw: bytes


@dataclass(slots=True)
class _HistEvent:
    rv: int
    resource: str
    type: str
    name: str
    raw_obj: bytes


@dataclass
class RecordedRequest:
    resource: str
    watch: bool
    params: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased names
    at: float = field(default_factory=time.monotonic)


@dataclass
class _Failure:
    count: int
    status: int
    resource: str | None
    watch: bool | None
    retry_after: float | None


class FakeApiServer:
    """See the module docstring. Use as a context manager or start()/stop()."""

    def __init__(self, *, start_rv: int = 1000) -> None:
        self.cond = threading.Condition()
        self.rv = start_rv
        self.objects: dict[str, dict[Key, _Stored]] = {r: {} for r in _BY_RESOURCE}
        self._hist: list[_HistEvent] = []
        self._hist_rvs: list[int] = []
        self.compacted_rv = 0  # watches from resourceVersion < this get 410
        self.requests: list[RecordedRequest] = []
        self.gone_as_http_status = False
        self.max_watch_seconds: float | None = None  # cap on timeoutSeconds (to exercise normal watch ends)
        self.bookmark_interval: float | None = None  # periodic bookmarks, like the real server (~1/min)
        self.replay = 0  # resumed watches re-send this many already-delivered events
        self.after_list_page: Any = None  # callable(resource, params) run after a list page is sent
        self._failures: list[_Failure] = []
        self._snapshots: dict[int, tuple[int, list[bytes]]] = {}
        self._snap_seq = 0
        self._bookmark_epoch = 0
        self._drop_epoch = 0
        self._drop_partial = False
        self.active_watches = 0
        self.gzipped_responses = 0
        self.port = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeApiServer:
        """Listen (again) on 127.0.0.1; a restart keeps the port."""
        handler = type("Handler", (_Handler,), {"fake": self})
        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        httpd.daemon_threads = True
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-apiserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listening socket and every open watch: connections are refused until start()."""
        if self._httpd is None:
            return
        self.drop_watches()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd = None

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- object controls -------------------------------------------------------------------------------
    @staticmethod
    def _key(resource: str, obj: dict[str, Any]) -> Key:
        meta = obj.get("metadata") or {}
        namespaced = _BY_RESOURCE[resource][3]
        return ((meta.get("namespace") or "default") if namespaced else "", meta["name"])

    def _record(self, resource: str, etype: str, key: Key, obj: dict[str, Any]) -> int:
        """Store a change at the next resourceVersion (caller holds the lock)."""
        self.rv += 1
        _, kind, api_version, _ = _BY_RESOURCE[resource]
        obj = dict(obj)
        obj.setdefault("kind", kind)
        obj.setdefault("apiVersion", api_version)
        meta = dict(obj.get("metadata") or {})
        meta["resourceVersion"] = str(self.rv)
        if key[0]:
            meta["namespace"] = key[0]
        obj["metadata"] = meta
        raw = _dumps(obj)
        if etype == "DELETED":
            self.objects[resource].pop(key, None)
        else:
            self.objects[resource][key] = _Stored(self.rv, obj, raw)
        self._hist.append(_HistEvent(self.rv, resource, etype, key[1], raw))
        self._hist_rvs.append(self.rv)
        return self.rv

    def upsert(self, resource: str, obj: dict[str, Any]) -> int:
        """Create or update; returns the new resourceVersion."""
        with self.cond:
            key = self._key(resource, obj)
            rv = self._record(resource, "MODIFIED" if key in self.objects[resource] else "ADDED", key, obj)
            self.cond.notify_all()
            return rv

    create = upsert
    update = upsert

    def delete(self, resource: str, name: str, namespace: str = "default") -> int:
        with self.cond:
            key = (namespace if _BY_RESOURCE[resource][3] else "", name)
            old = self.objects[resource][key]
            rv = self._record(resource, "DELETED", key, old.obj)
            self.cond.notify_all()
            return rv

    def load(self, resource: str, objs: list[dict[str, Any]]) -> None:
        """Bulk create (one resourceVersion each, one notification)."""
        with self.cond:
            for obj in objs:
                key = self._key(resource, obj)
                self._record(resource, "MODIFIED" if key in self.objects[resource] else "ADDED", key, obj)
            self.cond.notify_all()

    def state(self, resource: str) -> dict[Key, dict[str, Any]]:
        with self.cond:
            return {k: v.obj for k, v in self.objects[resource].items()}

    # ---- protocol controls ------------------------------------------------------------------------------
    def bookmark(self) -> int:
        """Every open watch with allowWatchBookmarks sends a BOOKMARK at the current resourceVersion."""
        with self.cond:
            self._bookmark_epoch += 1
            self.cond.notify_all()
            return self.rv

    def compact(self) -> int:
        """Forget all history up to now: watches from an older resourceVersion get 410 Gone."""
        with self.cond:
            self.compacted_rv = self.rv
            i = bisect.bisect_right(self._hist_rvs, self.rv)
            del self._hist[:i], self._hist_rvs[:i]
            return self.rv

    def drop_watches(self, partial: bool = False, wait: float = 2.0) -> None:
        """Cut every open watch connection without the terminating chunk; with ``partial`` the last thing
        on the wire is half an event line. Waits (up to ``wait`` s) until they are gone."""
        with self.cond:
            self._drop_epoch += 1
            self._drop_partial = partial
            self.cond.notify_all()
            deadline = time.monotonic() + wait
            while self.active_watches and time.monotonic() < deadline:
                self.cond.wait(0.02)

    def fail_next(self, count: int = 1, status: int = 500, resource: str | None = None,
                  watch: bool | None = None, retry_after: float | None = None) -> None:
        """The next ``count`` matching requests get ``status`` with a Status body."""
        with self.cond:
            self._failures.append(_Failure(count, status, resource, watch, retry_after))

    def watch_requests(self, resource: str) -> list[dict[str, str]]:
        with self.cond:
            return [r.params for r in self.requests if r.resource == resource and r.watch]

    def list_requests(self, resource: str) -> list[dict[str, str]]:
        with self.cond:
            return [r.params for r in self.requests if r.resource == resource and not r.watch]

    def wait_watching(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` watches are open (the client has caught up and is waiting for events)."""
        with self.cond:
            deadline = time.monotonic() + timeout
            while self.active_watches < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"only {self.active_watches} of {count} watches open")
                self.cond.wait(left)

    # ---- request handling (called from handler threads) ------------------------------------------------
    def _take_failure(self, resource: str, watch: bool) -> _Failure | None:
        with self.cond:
            for f in self._failures:
                if f.count > 0 and f.resource in (None, resource) and f.watch in (None, watch):
                    f.count -= 1
                    return f
            return None


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


_REASONS = {400: "BadRequest", 404: "NotFound", 410: "Expired", 429: "TooManyRequests",
            500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}


class _Handler(BaseHTTPRequestHandler):
    fake: FakeApiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # ---- helpers
    def _send_json(self, code: int, body: bytes, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _send_status(self, code: int, message: str, reason: str = "",
                     extra: dict[str, str] | None = None) -> None:
        self._send_json(code, _dumps(_status(code, reason or _REASONS.get(code, "Unknown"), message)), extra)

    def _client_gone(self) -> bool:
        """Whether the client closed the connection (a watch client sends nothing after its request)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    # ---- dispatch
    def do_GET(self) -> None:
        fake = self.fake
        parts = urlsplit(self.path)
        if parts.path not in RESOURCES:
            self._send_status(404, f"the server could not find the requested resource {parts.path}")
            return
        resource = RESOURCES[parts.path][0]
        params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        watch = params.get("watch") in ("1", "true")
        with fake.cond:
            headers = {k.lower(): v for k, v in self.headers.items()}
            fake.requests.append(RecordedRequest(resource, watch, params, headers))
        failure = fake._take_failure(resource, watch)
        if failure is not None:
            extra = {"Retry-After": str(failure.retry_after)} if failure.retry_after is not None else None
            self._send_status(failure.status, "injected failure", extra=extra)
            return
        name_filter = ""
        fs = params.get("fieldSelector", "")
        if fs:
            if not fs.startswith("metadata.name=") or "," in fs:
                self._send_status(400, f"unsupported field selector {fs!r}")
                return
            name_filter = fs.split("=", 1)[1]
        if "labelSelector" in params:
            self._send_status(400, "labelSelector is not supported by the fake")
            return
        if watch:
            self._watch(resource, params, name_filter)
        else:
            self._list(resource, params, name_filter)

    # ---- list
    def _list(self, resource: str, params: dict[str, str], name_filter: str) -> None:
        fake = self.fake
        _, kind, api_version, _ = _BY_RESOURCE[resource]
        limit = int(params.get("limit") or 0)
        cont = params.get("continue", "")
        rv_param = params.get("resourceVersion", "")
        match = params.get("resourceVersionMatch", "")
        with fake.cond:
            if cont:
                try:
                    tok = json.loads(base64.urlsafe_b64decode(cont))
                    snap_rv, raws = fake._snapshots[tok["s"]]
                    offset = int(tok["o"])
                except Exception:
                    self._send_status(400, "invalid continue token")
                    return
                if snap_rv < fake.compacted_rv:
                    self._send_status(410, "The provided continue parameter is too old to display a consistent "
                                      "list result. You can start a new list without the continue parameter.",
                                      "Expired")
                    return
            else:
                if rv_param not in ("", "0"):
                    try:
                        want = int(rv_param)
                    except ValueError:
                        self._send_status(400, f"invalid resourceVersion {rv_param!r}")
                        return
                    if want > fake.rv:
                        self._send_status(504, f"Too large resource version: {want}, current: {fake.rv}")
                        return
                    if match == "Exact" and want != fake.rv:
                        if want < fake.compacted_rv:
                            self._send_status(410, f"too old resource version: {want} ({fake.compacted_rv})",
                                              "Expired")
                        else:
                            self._send_status(400, "the fake serves Exact lists only at the current version")
                        return
                snap_rv = fake.rv
                items = sorted(fake.objects[resource].items())
                raws = [s.raw for k, s in items if not name_filter or k[1] == name_filter]
                offset = 0
            page = raws[offset:offset + limit] if limit else raws[offset:]
            next_offset = offset + len(page)
            meta: dict[str, Any] = {"resourceVersion": str(snap_rv)}
            if next_offset < len(raws):
                if not cont:
                    fake._snap_seq += 1
                    sid = fake._snap_seq
                    fake._snapshots[sid] = (snap_rv, raws)
                else:
                    sid = tok["s"]
                meta["continue"] = base64.urlsafe_b64encode(_dumps({"s": sid, "o": next_offset})).decode()
        body = b'{"kind":"%s","apiVersion":"%s","metadata":%s,"items":[%s]}' % (
            kind.encode() + b"List", api_version.encode(), _dumps(meta), b",".join(page))
        extra = None
        if len(body) > GZIP_MIN and "gzip" in (self.headers.get("Accept-Encoding") or ""):
            body = gzip.compress(body, compresslevel=1)
            extra = {"Content-Encoding": "gzip"}
            with fake.cond:
                fake.gzipped_responses += 1
        self._send_json(200, body, extra)
        if fake.after_list_page is not None:
            fake.after_list_page(resource, params)

    # ---- watch
    def _watch(self, resource: str, params: dict[str, str], name_filter: str) -> None:
        fake = self.fake
        _, kind, api_version, _ = _BY_RESOURCE[resource]
        bookmarks = params.get("allowWatchBookmarks") in ("true", "1")
        timeout = float(params.get("timeoutSeconds") or 1800)
        if fake.max_watch_seconds is not None:
            timeout = min(timeout, fake.max_watch_seconds)
        deadline = time.monotonic() + timeout
        rv_param = params.get("resourceVersion", "")
        initial: list[bytes] = []
        gone = ""
        with fake.cond:
            if rv_param in ("", "0"):
                cursor = fake.rv
                initial = [_dumps({"type": "ADDED", "object": s.obj}) for k, s in sorted(
                    fake.objects[resource].items()) if not name_filter or k[1] == name_filter]
            else:
                try:
                    cursor = int(rv_param)
                except ValueError:
                    self._send_status(400, f"invalid resourceVersion {rv_param!r}")
                    return
                if cursor < fake.compacted_rv:
                    gone = f"too old resource version: {cursor} ({fake.compacted_rv})"
                elif fake.replay:
                    # Re-send the last `replay` matching events at or before the requested version.
                    i = bisect.bisect_right(fake._hist_rvs, cursor)
                    back = [e for e in fake._hist[:i] if e.resource == resource
                            and (not name_filter or e.name == name_filter)][-fake.replay:]
                    if back:
                        cursor = back[0].rv - 1
            if gone and fake.gone_as_http_status:
                self._send_status(410, gone, "Expired")
                return
            drop_epoch = fake._drop_epoch
            bm_epoch = fake._bookmark_epoch
            fake.active_watches += 1
            fake.cond.notify_all()
        self.close_connection = True  # a watch never goes back to keep-alive in this fake
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if gone:
                self._chunk(_dumps({"type": "ERROR", "object": _status(410, "Expired", gone)}) + b"\n")
                self._chunk(b"")
                return
            for line in initial:
                self._chunk(line + b"\n")
            last_bookmark = time.monotonic()
            while True:
                with fake.cond:
                    while True:
                        if fake._drop_epoch != drop_epoch:
                            break
                        i = bisect.bisect_right(fake._hist_rvs, cursor)
                        pending = [e for e in fake._hist[i:] if e.resource == resource
                                   and (not name_filter or e.name == name_filter)]
                        now = time.monotonic()
                        want_bm = bookmarks and (fake._bookmark_epoch != bm_epoch or (
                            fake.bookmark_interval is not None and now - last_bookmark >= fake.bookmark_interval))
                        if pending or want_bm or now >= deadline:
                            break
                        if self._client_gone():
                            return
                        fake.cond.wait(min(deadline - now, 0.1))
                    if fake._drop_epoch != drop_epoch:
                        partial = fake._drop_partial
                        break
                    bm_epoch = fake._bookmark_epoch
                    current = fake.rv
                for e in pending:
                    self._chunk(b'{"type":"%s","object":%s}\n' % (e.type.encode(), e.raw_obj))
                    cursor = e.rv
                if want_bm:
                    cursor = max(cursor, current)
                    last_bookmark = time.monotonic()
                    bm = {"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": str(current)}}
                    self._chunk(_dumps({"type": "BOOKMARK", "object": bm}) + b"\n")
                if not pending and not want_bm and time.monotonic() >= deadline:
                    self._chunk(b"")  # the terminating chunk: a normal end of the watch
                    return
            # Dropped: optionally half an event line, then cut the TCP connection.
            if partial:
                with fake.cond:
                    tail = [e for e in fake._hist if e.resource == resource]
                sample = tail[-1].raw_obj if tail else b'{"metadata":{}}'
                line = b'{"type":"MODIFIED","object":%s}\n' % sample
                self._chunk(line[: len(line) // 2])
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        finally:
            with fake.cond:
                fake.active_watches -= 1
                fake.cond.notify_all()
