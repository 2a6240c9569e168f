"""The node daemon: source → store → snapshot → data plane, driven by the sync runner.

Startup waits for the source's initial list (so no Service is programmed before its endpoints are
known), then the first sync is a full one; later syncs are partial unless a sync failed (the next is
full) or the full-resync period elapsed. On SIGTERM/SIGINT the daemon exits and leaves every rule in
place: a restarted daemon adopts them, so established and new connections keep working meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from typing import Any

from . import dataplane
from .config import ProxyConfig
from .snapshot import Changes, ProxySnapshot
from .store import ClusterStore

log = logging.getLogger(__name__)

FULL_SYNC_PERIOD = 3600.0  # like kube-proxy: a partial sync is the norm, a full one at least hourly


class Daemon:
    def __init__(self, config: ProxyConfig, dp: dataplane.DataPlane | None = None) -> None:
        self.config = config
        self.node_name = config.node_name
        self.store = ClusterStore(self.node_name)
        self.snapshot = ProxySnapshot(self.store, self.node_name)
        self.dp = dp or dataplane.load(config.mode, config)
        self.pending = Changes()
        self.need_full = True
        self.last_full = 0.0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.runner: Any = None
        self.health: Any = None
        self.service_health: Any = None
        self.metrics: Any = None
        self.store.track_trigger_times = True
        self._triggers: list[float] = []  # EndpointSlice change times not yet programmed
        self.started_at = time.time()

    # ---- wiring ---------------------------------------------------------------------------------
    def _source(self) -> Any:
        if self.config.manifests:
            from .sources.manifests import ManifestsSource

            return ManifestsSource(self.config.manifests)
        from .sources.kube import KubeSource

        return KubeSource(self.config, all_nodes=bool(self.config.dns_listen))

    def _start_servers(self) -> None:
        from . import healthz, metrics

        families = (4, 6)
        self.metrics = metrics.ProxyMetrics(mode=self.config.mode, families=families)
        if self.config.metrics_bind_address:
            try:
                metrics.start_metrics_server(self.config.metrics_bind_address, self.metrics, config=self.config)
            except OSError as e:
                if self.config.bind_address_hard_fail:
                    raise
                log.error("cannot serve metrics on %s: %s", self.config.metrics_bind_address, e)
        self.health = healthz.ProxyHealthServer.from_config(self.config, metrics=self.metrics)
        if self.health is not None:
            try:
                self.health.start()
            except OSError as e:
                if self.config.bind_address_hard_fail:
                    raise
                log.error("cannot serve healthz on %s: %s", self.config.healthz_bind_address, e)
                self.health = None
        self.service_health = healthz.ServiceHealthServer(self.health,
                                                          healthz.node_ips_for(self.config.nodeport_addresses))

    def _on_store_change(self) -> None:
        if self.health is not None:
            self.health.queued_update()
        if self.metrics is not None:
            self.metrics.sync_queued()
        if self._loop is not None and self.runner is not None:
            self._loop.call_soon_threadsafe(self.runner.request)

    # ---- one sync (worker thread) ---------------------------------------------------------------
    def sync(self, periodic: bool = False) -> None:
        with self._lock:
            # taken before the snapshot: a slice applied in between is counted at the next sync (later,
            # never earlier than it really was programmed)
            self._triggers.extend(self.store.take_trigger_times())
            changes = self.snapshot.update()
            self.pending.merge(changes)
            period = getattr(self.dp, "full_resync_period", FULL_SYNC_PERIOD) or FULL_SYNC_PERIOD
            full = self.need_full or (time.monotonic() - self.last_full >= period)
            if not full and not self.pending:
                if self.health is not None:
                    self.health.updated()
                # slice versions that changed nothing the data plane holds are in effect already
                self._observe_programmed(self._triggers)
                self._triggers = []
                return
            t0 = time.monotonic()
            try:
                result = self.dp.sync(self.snapshot, self.pending, full)
            except Exception:
                self.need_full = True
                self._observe_failure(partial=not full)
                raise
            elapsed = time.monotonic() - t0
            if full:
                self.need_full = False
                self.last_full = time.monotonic()
            done, self.pending = self.pending, Changes()
            triggers, self._triggers = self._triggers, []
        stale = self._cleanup_conntrack(done)
        self._after_sync(done, full, elapsed, triggers, result, stale)
        log.info("%s sync: %d service ports (%d changed), %d rules written, render %.1f ms, apply %.1f ms, "
                 "total %.1f ms%s", "full" if full else "partial", len(self.snapshot.services), len(done.changed)
                 + len(done.removed), result.rules, result.render_seconds * 1e3, result.apply_seconds * 1e3,
                 elapsed * 1e3, f", {stale} stale UDP conntrack entries deleted" if stale else "")

    def _cleanup_conntrack(self, done: Changes) -> int:
        if not done.stale_udp:
            return 0
        try:
            from . import conntrack

            return conntrack.delete_stale_udp(done.stale_udp, self.config.nodeport_addresses, metrics=self.metrics)
        except Exception as e:  # conntrack cleanup must never fail a sync
            log.warning("stale UDP conntrack cleanup failed: %s", e)
            return 0

    def _after_sync(self, done: Changes, full: bool, elapsed: float, triggers: list[float],
                    result: dataplane.SyncResult, stale: int) -> None:
        if self.health is not None:
            if done.node_changed:
                self.health.sync_node(self.store.own_node_obj)
            self.health.updated()
        if self.service_health is not None:
            try:
                self._sync_service_health()
            except Exception as e:
                log.warning("health check node port update failed: %s", e)
        m = self.metrics
        if m is not None:
            m.changes_seen(services=len(done.service_keys))
            m.sync_done(elapsed, full)
            self._observe_programmed(triggers)
            counts = getattr(self.dp, "rule_counts", None)
            if counts:
                for fam in (4, 6):
                    m.set_iptables_rules({t: n for (f, t), n in counts.items() if f == fam}, family=fam)
            for fam, (internal, external) in getattr(self.dp, "no_local_endpoints", {}).items():
                m.set_no_local_endpoints(internal, external, family=fam)

    def _observe_programmed(self, triggers: list[float]) -> None:
        """kube-proxy's network programming latency: from each EndpointSlice change to its programming.

        Changes from before this process started are left out (after a restart they would report the age of
        the cluster's objects, not a programming delay) — as kube-proxy does.
        """
        if self.metrics is not None and triggers:
            self.metrics.network_programmed([t for t in triggers if t >= self.started_at])

    def _observe_failure(self, partial: bool) -> None:
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                self.metrics.sync_failed(partial=partial)

    def _sync_service_health(self) -> None:
        from . import healthz

        services, endpoints = healthz.health_check_targets(self.snapshot)
        self.service_health.sync_services(services)
        self.service_health.sync_endpoints(endpoints)

    # ---- main loop ------------------------------------------------------------------------------
    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, stop.set)
        self.dp.setup()
        from . import conntrack

        conntrack.set_sysctls(self.config)
        self._start_servers()
        from .runner import SyncRunner

        self.runner = SyncRunner(self.sync, self.config.min_sync_period, self.config.sync_period)
        self.store.add_listener(self._on_store_change)
        if self.health is not None:
            self.health.queued_update()  # unhealthy until the first sync has programmed the kernel
        source = self._source()
        tasks = [asyncio.create_task(source.run(self.store), name="source")]
        if self.config.dns_listen:
            tasks.append(asyncio.create_task(self._run_dns(), name="dns"))
        waiter = asyncio.create_task(stop.wait())
        while not self.store.synced:
            done, _ = await asyncio.wait([waiter, *tasks], timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
            if done:
                break
        if not stop.is_set() and all(not t.done() for t in tasks):
            log.info("initial state loaded: %d Services, %d EndpointSlices; starting %s proxy on node %s",
                     len(self.store.services), len(self.store.slices), self.config.mode, self.node_name)
            tasks.append(asyncio.create_task(self.runner.run(), name="runner"))
            await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        rc = 0
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                log.error("%s stopped: %s", t.get_name(), t.exception())
                rc = 1
            t.cancel()
        waiter.cancel()
        await asyncio.gather(*tasks, waiter, return_exceptions=True)
        if self.health is not None:
            self.health.stop()
        log.info("exiting; rules stay in place")
        return rc

    async def _run_dns(self) -> None:
        from .dns.server import DnsService

        svc = DnsService(self.store, zone=self.config.dns_zone, listen=self.config.dns_listen,
                         upstream=self.config.dns_upstream)
        await svc.run()


def run(config: ProxyConfig) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        return asyncio.run(Daemon(config).run())
    return uvloop.run(Daemon(config).run())
