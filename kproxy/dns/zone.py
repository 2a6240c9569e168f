"""The cluster zone: keeps a :class:`~.table.TableBuilder` in step with a :class:`~kproxy.store.ClusterStore`.

:meth:`ClusterZone.sync` takes the Services the store marked dirty for the ``dns`` consumer, regenerates
only their records and builds the next table. A Node change regenerates the node records and every
Service with node ports (their ``nodeport`` SRV records list the nodes).

The NS record's target ``ns.dns.<zone>`` gets the ClusterIPs of ``kube-system/kube-dns`` when that
Service exists (as CoreDNS does), else the configured fallback addresses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from ..store import ClusterStore
from .records import RR, BadName, apex_records, node_records, normalize_zone, service_records
from .table import Table, TableBuilder

log = logging.getLogger(__name__)

KUBE_DNS = ("kube-system", "kube-dns")
_NODES = ("__nodes__",)
_APEX = ("__apex__",)


class ClusterZone:
    def __init__(self, store: ClusterStore, zone: str = "cluster.local", ttl: int = 5,
                 ns_addresses: Sequence[str] = ("127.0.0.1",), ra: bool = False, consumer: str = "dns") -> None:
        self.store = store
        self.zone = normalize_zone(zone)
        self.ttl = ttl
        self.fallback_ns = tuple(ns_addresses)
        self.consumer = consumer
        self.builder = TableBuilder(self.zone, ttl, ra)
        self._nodeport_keys: set[tuple[str, str]] = set()
        self._node_names: list[str] = []
        store.register(consumer)
        self.builder.set_records(_APEX, apex_records(self.zone, self.fallback_ns))
        self.table: Table = self.builder.build(serial=int(time.time()))

    def sync(self) -> Table | None:
        """Apply what changed in the store; return the new table, or None if nothing changed."""
        dirty, nodes_changed = self.store.take_dirty(self.consumer)
        if not dirty and not nodes_changed:
            return None
        try:
            self._apply(dirty, nodes_changed)
        except Exception:
            self.store.requeue(self.consumer, dirty, nodes_changed)
            raise
        serial = max(self.builder.serial + 1, int(time.time()))
        self.table = self.builder.build(serial=serial)
        return self.table

    def _apply(self, dirty: set[tuple[str, str]], nodes_changed: bool) -> None:
        store = self.store
        if nodes_changed:
            self._node_names = sorted(store.nodes)
            self.builder.set_records(_NODES, node_records(list(store.nodes.values()), self.zone))
            dirty = dirty | self._nodeport_keys
        unproxied = getattr(store, "unproxied", {})  # service-proxy-name Services: not proxied, still in DNS
        for key in dirty:
            svc = store.services.get(key) or unproxied.get(key)
            if svc is None:
                self.builder.set_records(key, [])
                self._nodeport_keys.discard(key)
                continue
            try:
                rrs: list[RR] = service_records(svc, store.slices_for(key), self.zone, self._node_names)
            except (BadName, ValueError, OSError) as e:  # one odd object must not stop every update
                log.warning("dns: Service %s/%s: no records: %s", key[0], key[1], e)
                rrs = []
            if svc.type == "ExternalName" and not rrs:
                log.warning("dns: Service %s/%s: externalName %r is not a valid DNS name; no record",
                            key[0], key[1], svc.external_name)
            self.builder.set_records(key, rrs)
            if any(p.node_port for p in svc.ports):
                self._nodeport_keys.add(key)
            else:
                self._nodeport_keys.discard(key)
        if KUBE_DNS in dirty:
            svc = store.services.get(KUBE_DNS) or unproxied.get(KUBE_DNS)
            addrs = svc.cluster_ips if svc is not None and svc.cluster_ips else self.fallback_ns
            self.builder.set_records(_APEX, apex_records(self.zone, addrs))
