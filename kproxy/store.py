"""The desired-state store fed by a source (Kubernetes watch or a manifests directory).

Sources hand raw API objects (decoded JSON dicts) to :meth:`ClusterStore.apply`. The store parses them
into the light model, skips malformed ones with a logged reason (keeping the last good version out of the
way as well: a Service that turns invalid is removed rather than left half-programmed) and records, per
consumer, which Services changed. A Service's key is ``(namespace, name)``; an EndpointSlice counts as a
change of the Service named by its ``kubernetes.io/service-name`` label.

Consumers (the proxy snapshot, DNS) call :meth:`ClusterStore.take_dirty` with their own cursor so each
sees every change exactly once regardless of how often the others sync.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .model import (
    EndpointSlice,
    InvalidObject,
    Node,
    Service,
    is_proxyable,
    parse_endpoint_slice,
    parse_node,
    parse_service,
)

log = logging.getLogger(__name__)

ServiceKey = tuple[str, str]

KIND_SERVICE = "Service"
KIND_SLICE = "EndpointSlice"
KIND_NODE = "Node"


@dataclass(slots=True)
class Event:
    """One change from a source: ``type`` is ADDED, MODIFIED or DELETED (watch semantics)."""

    type: str
    kind: str
    obj: dict[str, Any]


@dataclass(slots=True)
class InvalidRecord:
    kind: str
    key: str
    reason: str


@dataclass
class _Consumer:
    dirty: set[ServiceKey] = field(default_factory=set)
    nodes_dirty: bool = True


class ClusterStore:
    """Thread-safe store of parsed Services, EndpointSlices and Nodes with per-consumer dirty sets."""

    def __init__(self, node_name: str = "") -> None:
        self.node_name = node_name
        self.services: dict[ServiceKey, Service] = {}
        # Services labelled service.kubernetes.io/service-proxy-name: not proxied (kube-proxy semantics)
        # but still published by DNS. Changes to them mark consumers dirty like any Service.
        self.unproxied: dict[ServiceKey, Service] = {}
        self.slices: dict[ServiceKey, EndpointSlice] = {}  # keyed by (namespace, slice name)
        self.slices_by_service: dict[ServiceKey, set[str]] = {}
        self.nodes: dict[str, Node] = {}
        self.own_node_obj: dict[str, Any] | None = None  # this node's raw object (taints, deletion for healthz)
        self.invalid: dict[tuple[str, str], InvalidRecord] = {}
        self._consumers: dict[str, _Consumer] = {}
        self._lock = threading.RLock()
        self._listeners: list[Callable[[], None]] = []
        # when the change happened, per applied EndpointSlice version, for the network programming
        # latency metric; taken by the proxy after it programmed the change
        self._trigger_times: list[float] = []
        self.track_trigger_times = False  # only the daemon reads them; off, nothing accumulates
        self.synced = False  # set by the source once the initial list is complete

    # ---- consumers -------------------------------------------------------------------------------
    def register(self, consumer: str) -> None:
        """Register a consumer; its first take_dirty returns every known Service."""
        with self._lock:
            c = _Consumer()
            c.dirty.update(self.services)
            c.dirty.update(self.unproxied)
            c.dirty.update(self.slices_by_service)
            self._consumers[consumer] = c

    def add_listener(self, fn: Callable[[], None]) -> None:
        """fn() is called (from the applying thread) after every batch that changed something."""
        self._listeners.append(fn)

    def take_dirty(self, consumer: str) -> tuple[set[ServiceKey], bool]:
        """Return (changed service keys, nodes changed) since this consumer's last call, and reset."""
        with self._lock:
            c = self._consumers[consumer]
            dirty, nodes = c.dirty, c.nodes_dirty
            c.dirty, c.nodes_dirty = set(), False
            return dirty, nodes

    def requeue(self, consumer: str, keys: Iterable[ServiceKey], nodes: bool = False) -> None:
        """Give keys back to a consumer (its sync failed and must be retried)."""
        with self._lock:
            c = self._consumers[consumer]
            c.dirty.update(keys)
            c.nodes_dirty |= nodes

    def take_trigger_times(self) -> list[float]:
        """The change time of every EndpointSlice version applied since the last call.

        The change time is the slice's ``endpoints.kubernetes.io/last-change-trigger-time`` (set by the
        EndpointSlice controller; what kube-proxy measures from) or, without one, when the store applied it.
        """
        with self._lock:
            out, self._trigger_times = self._trigger_times, []
            return out

    def _mark(self, key: ServiceKey) -> None:
        for c in self._consumers.values():
            c.dirty.add(key)

    def _mark_nodes(self) -> None:
        for c in self._consumers.values():
            c.nodes_dirty = True

    # ---- reading ----------------------------------------------------------------------------------
    def slices_for(self, key: ServiceKey) -> list[EndpointSlice]:
        ns = key[0]
        with self._lock:
            return [self.slices[(ns, n)] for n in self.slices_by_service.get(key, ())]

    @property
    def node(self) -> Node | None:
        return self.nodes.get(self.node_name)

    # ---- writing ----------------------------------------------------------------------------------
    def apply(self, events: Iterable[Event]) -> int:
        """Apply a batch of events; return how many changed the store."""
        changed = 0
        with self._lock:
            for ev in events:
                try:
                    changed += self._apply_one(ev)
                except Exception:  # never let one object stop the rest
                    log.exception("failed to apply %s %s", ev.type, ev.kind)
        if changed:
            for fn in self._listeners:
                fn()
        return changed

    def replace(self, kind: str, objs: Iterable[dict[str, Any]]) -> int:
        """Replace every object of ``kind`` with ``objs`` (a relist); deletions are derived."""
        objs = list(objs)
        with self._lock:
            if kind == KIND_SERVICE:
                old = {f"{k[0]}/{k[1]}" for k in (*self.services, *self.unproxied)}
            elif kind == KIND_SLICE:
                old = {f"{k[0]}/{k[1]}" for k in self.slices}
            else:
                old = set(self.nodes)
            old |= {k for (kk, k) in self.invalid if kk == kind}
            seen = set()
            events = []
            for o in objs:
                meta = o.get("metadata") or {}
                name = meta.get("name", "")
                seen.add(name if kind == KIND_NODE else f"{meta.get('namespace') or 'default'}/{name}")
                events.append(Event("MODIFIED", kind, o))
            for gone in old - seen:
                ns, _, name = gone.rpartition("/")
                meta = {"name": name, "namespace": ns} if kind != KIND_NODE else {"name": gone}
                events.append(Event("DELETED", kind, {"metadata": meta}))
        return self.apply(events)

    def _invalid(self, kind: str, key: str, reason: str) -> None:
        prev = self.invalid.get((kind, key))
        if prev is None or prev.reason != reason:
            log.warning("skipping invalid %s %s: %s", kind, key, reason)
        self.invalid[(kind, key)] = InvalidRecord(kind, key, reason)

    def _apply_one(self, ev: Event) -> int:
        meta = ev.obj.get("metadata") or {}
        name = meta.get("name", "")
        ns = meta.get("namespace") or "default"
        if ev.kind == KIND_NODE:
            return self._apply_node(ev, name)
        key = (ns, name)
        skey = f"{ns}/{name}"
        if ev.kind == KIND_SERVICE:
            if ev.type == "DELETED" or not is_proxyable(meta):
                self.invalid.pop((ev.kind, skey), None)
                changed = self.services.pop(key, None) is not None
                if ev.type != "DELETED":  # another proxy's Service: not proxied, but DNS still serves it
                    try:
                        unproxied: Service | None = parse_service(ev.obj)
                    except InvalidObject:
                        unproxied = None
                    if unproxied is not None and self.unproxied.get(key) != unproxied:
                        self.unproxied[key] = unproxied
                        changed = True
                    elif unproxied is None:
                        changed |= self.unproxied.pop(key, None) is not None
                else:
                    changed |= self.unproxied.pop(key, None) is not None
                if changed:
                    self._mark(key)
                    return 1
                return 0
            had_unproxied = self.unproxied.pop(key, None) is not None
            try:
                svc = parse_service(ev.obj)
            except InvalidObject as e:
                self._invalid(ev.kind, skey, str(e))
                if self.services.pop(key, None) is not None or had_unproxied:
                    self._mark(key)
                    return 1
                return 0
            self.invalid.pop((ev.kind, skey), None)
            if self.services.get(key) == svc:
                return 0
            self.services[key] = svc
            self._mark(key)
            return 1
        if ev.kind == KIND_SLICE:
            old = self.slices.get(key)
            if ev.type == "DELETED":
                self.invalid.pop((ev.kind, skey), None)
                return self._drop_slice(key, old)
            try:
                sl = parse_endpoint_slice(ev.obj)
            except InvalidObject as e:
                self._invalid(ev.kind, skey, str(e))
                return self._drop_slice(key, old)
            self.invalid.pop((ev.kind, skey), None)
            if old == sl:
                return 0
            if old is not None and old.service_name != sl.service_name:
                self._drop_slice(key, old)
            self.slices[key] = sl
            self.slices_by_service.setdefault((ns, sl.service_name), set()).add(name)
            self._mark((ns, sl.service_name))
            if self.track_trigger_times:
                self._trigger_times.append(sl.trigger_time or time.time())
            return 1
        log.debug("ignoring event for kind %s", ev.kind)
        return 0

    def _drop_slice(self, key: ServiceKey, old: EndpointSlice | None) -> int:
        if old is None:
            return 0
        del self.slices[key]
        skey = (key[0], old.service_name)
        names = self.slices_by_service.get(skey)
        if names is not None:
            names.discard(key[1])
            if not names:
                del self.slices_by_service[skey]
        self._mark(skey)
        return 1

    def _apply_node(self, ev: Event, name: str) -> int:
        if name == self.node_name:
            self.own_node_obj = None if ev.type == "DELETED" else ev.obj
        if ev.type == "DELETED":
            if self.nodes.pop(name, None) is not None:
                self._mark_nodes()
                return 1
            return 0
        try:
            node = parse_node(ev.obj)
        except InvalidObject as e:
            self._invalid(ev.kind, name, str(e))
            return 0
        if self.nodes.get(name) == node:
            return 0
        self.nodes[name] = node
        self._mark_nodes()
        return 1
