"""Prometheus metrics with kube-proxy's names, types, labels and buckets, and the metrics HTTP server.

Names follow kube-proxy's ``pkg/proxy/metrics/metrics.go`` (v1.33+, where most per-proxier metrics carry
an ``ip_family`` label of ``IPv4``/``IPv6``), so existing dashboards and alerts for kube-proxy work
unchanged. Like kube-proxy, mode-specific metrics are exposed only in their mode (iptables restore
counters in iptables and ipvs mode, nftables failure counters in nftables mode).

Everything lives in a dedicated :class:`~prometheus_client.CollectorRegistry` owned by
:class:`ProxyMetrics`, so several daemons (or tests) in one process do not clash.

:func:`start_metrics_server` serves what kube-proxy serves on ``--metrics-bind-address``:
``/metrics``, ``/healthz`` (+ ``/healthz/ping``, plain ``ok``), ``/proxyMode`` and ``/configz``.
"""

from __future__ import annotations

import gzip
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, is_dataclass
from importlib import metadata
from typing import Any

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder

from .healthz import HttpLoop, Listener, Request, Response, not_found

log = logging.getLogger(__name__)

FAMILIES = ("IPv4", "IPv6")
TABLES = ("filter", "nat", "mangle")


def exponential_buckets(start: float, factor: float, count: int) -> tuple[float, ...]:
    """Go client's ``ExponentialBuckets``."""
    return tuple(start * factor**i for i in range(count))


def linear_buckets(start: float, width: float, count: int) -> tuple[float, ...]:
    """Go client's ``LinearBuckets``."""
    return tuple(start + width * i for i in range(count))


SYNC_BUCKETS = exponential_buckets(0.001, 2, 15)  # 1 ms .. ~16 s
# kube-proxy merges these after a leading 0 bucket: 0, 0.25, 0.5, 1..59, 60..115 step 5, 120..300 step 30.
NETWORK_PROGRAMMING_BUCKETS = (0.0, *linear_buckets(0.25, 0.25, 2), *linear_buckets(1, 1, 59),
                               *linear_buckets(60, 5, 12), *linear_buckets(120, 30, 7))


def _version() -> str:
    try:
        return metadata.version("kproxy")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def family_label(family: str | int) -> str:
    """``IPv4``/``IPv6`` from 4/6, socket families or the label itself."""
    if family in ("IPv4", 4, 2, "4"):
        return "IPv4"
    if family in ("IPv6", 6, 10, "6"):
        return "IPv6"
    raise ValueError(f"unknown IP family {family!r}")


class ProxyMetrics:
    """kube-proxy's metrics for one proxy mode, in a private registry.

    Attribute names mirror kube-proxy's Go variables (``sync_proxy_rules_latency`` is
    ``SyncProxyRulesLatency``). The helper methods cover what a sync loop reports; the attributes stay
    available for anything else.
    """

    def __init__(self, mode: str = "iptables", version: str | None = None,
                 families: Iterable[str | int] = ("IPv4",), *, process: bool = True) -> None:
        # kube-proxy (Go client) exposes no *_created series; drop them so names and series match.
        prometheus_client.disable_created_metrics()
        self.mode = mode
        self.version = version or _version()
        self.families = tuple(family_label(f) for f in families)
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        fam = ["ip_family"]

        def hist(name: str, doc: str, buckets: tuple[float, ...], labels: list[str], register: bool = True
                 ) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=reg if register else None)

        def gauge(name: str, doc: str, labels: list[str] | None = None, register: bool = True) -> Gauge:
            return Gauge(name, doc, labels or [], registry=reg if register else None)

        def counter(name: str, doc: str, labels: list[str] | None = None, register: bool = True) -> Counter:
            return Counter(name, doc, labels or [], registry=reg if register else None)

        iptables = mode == "iptables"
        restore = mode in ("iptables", "ipvs")
        nft = mode == "nftables"

        # --- every mode
        self.sync_proxy_rules_latency = hist(
            "kubeproxy_sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds", SYNC_BUCKETS, fam)
        self.sync_proxy_rules_last_queued_timestamp = gauge(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued", fam)
        self.sync_proxy_rules_last_timestamp = gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced", fam)
        self.endpoint_changes_pending = gauge(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending", "Pending proxy rules Endpoint changes")
        self.endpoint_changes_total = counter(
            "kubeproxy_sync_proxy_rules_endpoint_changes_total", "Cumulative proxy rules Endpoint changes")
        self.service_changes_pending = gauge(
            "kubeproxy_sync_proxy_rules_service_changes_pending", "Pending proxy rules Service changes")
        self.service_changes_total = counter(
            "kubeproxy_sync_proxy_rules_service_changes_total", "Cumulative proxy rules Service changes")
        self.proxy_healthz_total = counter(
            "kubeproxy_proxy_healthz_total", "Cumulative proxy healthz HTTP status", ["code"])
        self.proxy_livez_total = counter(
            "kubeproxy_proxy_livez_total", "Cumulative proxy livez HTTP status", ["code"])
        self.network_programming_latency = hist(
            "kubeproxy_network_programming_duration_seconds", "In Cluster Network Programming Latency in seconds",
            NETWORK_PROGRAMMING_BUCKETS, fam)
        self.sync_proxy_rules_no_local_endpoints_total = gauge(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints", ["ip_family", "traffic_policy"])
        self.conntrack_reconciler_sync_latency = hist(
            "kubeproxy_conntrack_reconciler_sync_duration_seconds",
            "ReconcileConntrackFlowsLatency latency in seconds", SYNC_BUCKETS, fam)
        self.conntrack_reconciler_deleted_entries_total = counter(
            "kubeproxy_conntrack_reconciler_deleted_entries_total",
            "Cumulative conntrack flows deleted by conntrack reconciler", fam)
        # --- iptables and nftables (full/partial split), iptables (rule counts), ipvs (restore failures)
        self.sync_full_proxy_rules_latency = hist(
            "kubeproxy_sync_full_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for full resyncs",
            SYNC_BUCKETS, fam, register=iptables or nft)
        self.sync_partial_proxy_rules_latency = hist(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs", SYNC_BUCKETS, fam, register=iptables or nft)
        self.iptables_restore_failures_total = counter(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
            "Cumulative proxy iptables restore failures", fam, register=restore)
        self.iptables_partial_restore_failures_total = counter(
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
            "Cumulative proxy iptables partial restore failures", fam, register=iptables)
        self.iptables_rules_total = gauge(
            "kubeproxy_sync_proxy_rules_iptables_total", "Total number of iptables rules owned by kube-proxy",
            ["ip_family", "table"], register=iptables)
        self.iptables_rules_last_sync = gauge(
            "kubeproxy_sync_proxy_rules_iptables_last", "Number of iptables rules written by kube-proxy in last sync",
            ["ip_family", "table"], register=iptables)
        # --- nftables
        self.nftables_sync_failures_total = counter(
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total", "Cumulative proxy nftables sync failures",
            fam, register=nft)
        self.nftables_cleanup_failures_total = counter(
            "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total",
            "Cumulative proxy nftables cleanup failures", fam, register=nft)
        # --- kproxy's own
        self.info = gauge("kproxy_info", "kproxy build and proxy mode (always 1)", ["mode", "version"])
        self.info.labels(mode=mode, version=self.version).set(1)

        if process:
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)

        # Materialise the per-family children so dashboards see 0 rather than no series.
        for f in self.families:
            for m in (self.iptables_restore_failures_total, self.iptables_partial_restore_failures_total,
                      self.nftables_sync_failures_total, self.nftables_cleanup_failures_total,
                      self.conntrack_reconciler_deleted_entries_total):
                m.labels(ip_family=f)
            for policy in ("internal", "external"):
                self.sync_proxy_rules_no_local_endpoints_total.labels(ip_family=f, traffic_policy=policy).set(0)

    # --- what a sync loop reports

    def sync_queued(self, families: Iterable[str | int] | None = None, now: float | None = None) -> None:
        """A change needing a sync arrived (kube-proxy's ``Sync()``)."""
        ts = time.time() if now is None else now
        for f in self._fams(families):
            self.sync_proxy_rules_last_queued_timestamp.labels(ip_family=f).set(ts)

    def changes_seen(self, services: int = 0, endpoints: int = 0) -> None:
        """Count Service / EndpointSlice events received (the ``*_changes_total`` counters)."""
        if services:
            self.service_changes_total.inc(services)
        if endpoints:
            self.endpoint_changes_total.inc(endpoints)

    def set_pending(self, services: int, endpoints: int) -> None:
        self.service_changes_pending.set(services)
        self.endpoint_changes_pending.set(endpoints)

    def sync_done(self, seconds: float, full: bool, families: Iterable[str | int] | None = None,
                  now: float | None = None) -> None:
        """A successful sync: latency histograms and the last-sync timestamp; pending changes go to 0."""
        ts = time.time() if now is None else now
        for f in self._fams(families):
            self.sync_proxy_rules_latency.labels(ip_family=f).observe(seconds)
            split = self.sync_full_proxy_rules_latency if full else self.sync_partial_proxy_rules_latency
            split.labels(ip_family=f).observe(seconds)
            self.sync_proxy_rules_last_timestamp.labels(ip_family=f).set(ts)
        self.set_pending(0, 0)

    def sync_failed(self, partial: bool = False, families: Iterable[str | int] | None = None) -> None:
        """A failed apply: iptables(-restore) or nftables failure counter of the current mode."""
        for f in self._fams(families):
            if self.mode == "nftables":
                self.nftables_sync_failures_total.labels(ip_family=f).inc()
            elif partial and self.mode == "iptables":
                self.iptables_partial_restore_failures_total.labels(ip_family=f).inc()
            else:
                self.iptables_restore_failures_total.labels(ip_family=f).inc()

    def cleanup_failed(self, families: Iterable[str | int] | None = None) -> None:
        for f in self._fams(families):
            self.nftables_cleanup_failures_total.labels(ip_family=f).inc()

    def network_programmed(self, trigger_times: Iterable[float], now: float | None = None,
                           families: Iterable[str | int] | None = None) -> None:
        """Observe programming latency from EndpointSlice ``endpoints.kubernetes.io/last-change-trigger-time``s."""
        ts = time.time() if now is None else now
        fams = self._fams(families)
        for t in trigger_times:
            if ts >= t:
                for f in fams:
                    self.network_programming_latency.labels(ip_family=f).observe(ts - t)

    def set_iptables_rules(self, total: dict[str, int], last_sync: dict[str, int] | None = None,
                           family: str | int = "IPv4") -> None:
        """Rules owned per table (``filter``/``nat``/``mangle``) and rules written in the last sync."""
        f = family_label(family)
        for table, n in total.items():
            self.iptables_rules_total.labels(ip_family=f, table=table).set(n)
        for table, n in (last_sync or {}).items():
            self.iptables_rules_last_sync.labels(ip_family=f, table=table).set(n)

    def set_no_local_endpoints(self, internal: int, external: int, family: str | int = "IPv4") -> None:
        """Services with a Local traffic policy and no local endpoints, by policy."""
        f = family_label(family)
        self.sync_proxy_rules_no_local_endpoints_total.labels(ip_family=f, traffic_policy="internal").set(internal)
        self.sync_proxy_rules_no_local_endpoints_total.labels(ip_family=f, traffic_policy="external").set(external)

    def conntrack_reconciled(self, seconds: float, deleted: int, family: str | int = "IPv4") -> None:
        f = family_label(family)
        self.conntrack_reconciler_sync_latency.labels(ip_family=f).observe(seconds)
        if deleted:
            self.conntrack_reconciler_deleted_entries_total.labels(ip_family=f).inc(deleted)

    # --- used by ProxyHealthServer

    def healthz_answered(self, code: int) -> None:
        self.proxy_healthz_total.labels(code=str(code)).inc()

    def livez_answered(self, code: int) -> None:
        self.proxy_livez_total.labels(code=str(code)).inc()

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """Exposition for an ``Accept`` header: (body, content type)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def _fams(self, families: Iterable[str | int] | None) -> tuple[str, ...]:
        return self.families if families is None else tuple(family_label(f) for f in families)


class MetricsServer:
    """The metrics endpoint; ``port`` is the bound port (useful with port 0), :meth:`stop` closes it."""

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self.host = listener.host
        self.port = listener.port

    def stop(self) -> None:
        self._listener.close()


def _configz(config: Any) -> bytes:
    if is_dataclass(config) and not isinstance(config, type):
        doc = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    else:
        doc = config
    return json.dumps({"kubeproxy.config.k8s.io": doc}, default=str).encode()


def start_metrics_server(addr: str, metrics: ProxyMetrics, *, config: Any = None,
                         loop: HttpLoop | None = None, ephemeral: bool = False) -> MetricsServer | None:
    """Serve kube-proxy's metrics endpoints on ``addr`` (``host:port``); None when the address disables it.

    Routes: ``/metrics`` (Prometheus text or OpenMetrics by ``Accept``, gzip when asked), ``/healthz`` and
    ``/healthz/ping`` (``ok``, the process is up), ``/proxyMode`` (the mode name) and ``/configz`` (the
    resolved configuration as JSON, when ``config`` is given). Port 0 disables the server, as in kube-proxy,
    unless ``ephemeral`` asks for a free port (tests). Raises OSError when the bind fails.
    """
    if not addr:
        return None
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    port_n = int(port)
    if port_n == 0 and not ephemeral:
        return None

    text = [("Content-Type", "text/plain; charset=utf-8"), ("X-Content-Type-Options", "nosniff")]

    def handle(req: Request) -> Response:
        if req.path == "/metrics":
            body, ctype = metrics.render(req.headers.get("accept", ""))
            headers = [("Content-Type", ctype)]
            if "gzip" in req.headers.get("accept-encoding", ""):
                body = gzip.compress(body)
                headers.append(("Content-Encoding", "gzip"))
            return Response(200, body, headers)
        if req.path in ("/healthz", "/healthz/ping"):
            return Response(200, b"ok", list(text))
        if req.path == "/proxyMode":
            return Response(200, metrics.mode.encode(), list(text))
        if req.path == "/configz" and config is not None:
            return Response(200, _configz(config), [("Content-Type", "application/json")])
        return not_found()

    listener = (loop or HttpLoop.default()).listen(host, port_n, handle)
    log.info("serving metrics on %s:%d", host or "*", listener.port)
    return MetricsServer(listener)
