"""kube-proxy metric names, types, labels and buckets, and the metrics HTTP server on 127.0.0.1."""

from __future__ import annotations

import gzip
import http.client
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kproxy.config import ProxyConfig
from kproxy.healthz import HttpLoop
from kproxy.metrics import NETWORK_PROGRAMMING_BUCKETS, SYNC_BUCKETS, ProxyMetrics, start_metrics_server

pytestmark = pytest.mark.timeout(60)

# kube-proxy v1.33+ names -> (type, labels), from pkg/proxy/metrics/metrics.go and the metrics reference.
COMMON = {
    "kubeproxy_sync_proxy_rules_duration_seconds": ("histogram", {"ip_family"}),
    "kubeproxy_network_programming_duration_seconds": ("histogram", {"ip_family"}),
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds": ("gauge", {"ip_family"}),
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds": ("gauge", {"ip_family"}),
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending": ("gauge", set()),
    "kubeproxy_sync_proxy_rules_endpoint_changes_total": ("counter", set()),
    "kubeproxy_sync_proxy_rules_service_changes_pending": ("gauge", set()),
    "kubeproxy_sync_proxy_rules_service_changes_total": ("counter", set()),
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total": ("gauge", {"ip_family", "traffic_policy"}),
    "kubeproxy_proxy_healthz_total": ("counter", {"code"}),
    "kubeproxy_proxy_livez_total": ("counter", {"code"}),
    "kubeproxy_conntrack_reconciler_sync_duration_seconds": ("histogram", {"ip_family"}),
    "kubeproxy_conntrack_reconciler_deleted_entries_total": ("counter", {"ip_family"}),
    "kproxy_info": ("gauge", {"mode", "version"}),
}
FULL_PARTIAL = {  # kube-proxy registers the full/partial split in iptables and nftables modes
    "kubeproxy_sync_full_proxy_rules_duration_seconds": ("histogram", {"ip_family"}),
    "kubeproxy_sync_partial_proxy_rules_duration_seconds": ("histogram", {"ip_family"}),
}
IPTABLES = {
    **FULL_PARTIAL,
    "kubeproxy_sync_proxy_rules_iptables_total": ("gauge", {"ip_family", "table"}),
    "kubeproxy_sync_proxy_rules_iptables_last": ("gauge", {"ip_family", "table"}),
    "kubeproxy_sync_proxy_rules_iptables_restore_failures_total": ("counter", {"ip_family"}),
    "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total": ("counter", {"ip_family"}),
}
NFTABLES_ONLY = {
    "kubeproxy_sync_proxy_rules_nftables_sync_failures_total": ("counter", {"ip_family"}),
    "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total": ("counter", {"ip_family"}),
}
NFTABLES = {**NFTABLES_ONLY, **FULL_PARTIAL}
IPTABLES_ONLY = {k: v for k, v in IPTABLES.items() if k not in FULL_PARTIAL}


def exposition(m: ProxyMetrics) -> dict[str, object]:
    body, ctype = m.render()
    assert ctype.startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def full_name(fam) -> str:
    # The parser strips _total from counter family names; put it back to compare with kube-proxy's names.
    return fam.name + "_total" if fam.type == "counter" else fam.name


def exercise(m: ProxyMetrics) -> None:
    """Touch every labelled metric so its series (and label names) appear."""
    m.sync_queued(now=100.0)
    m.changes_seen(services=2, endpoints=3)
    m.set_pending(1, 2)
    m.sync_done(0.05, full=True, now=101.0)
    m.sync_done(0.003, full=False, now=102.0)
    m.network_programmed([99.0, 100.5], now=102.0)
    m.set_iptables_rules({"nat": 40, "filter": 7}, {"nat": 5})
    m.set_no_local_endpoints(1, 2)
    m.conntrack_reconciled(0.01, 4)
    m.healthz_answered(200)
    m.livez_answered(503)
    m.sync_failed()
    m.sync_failed(partial=True)
    m.cleanup_failed()


@pytest.mark.parametrize(("mode", "extra", "absent"), [
    ("iptables", IPTABLES, NFTABLES_ONLY),
    ("nftables", NFTABLES, IPTABLES_ONLY),
    ("ipvs", {"kubeproxy_sync_proxy_rules_iptables_restore_failures_total": ("counter", {"ip_family"})},
     {**NFTABLES_ONLY, "kubeproxy_sync_full_proxy_rules_duration_seconds": None}),
    ("ebpf", {}, {**NFTABLES, **IPTABLES}),
])
def test_names_types_labels_per_mode(mode, extra, absent):
    m = ProxyMetrics(mode, version="1.2.3", process=False)
    exercise(m)
    fams = {full_name(f): f for f in exposition(m).values()}
    for name, (typ, labels) in {**COMMON, **extra}.items():
        assert name in fams, name
        fam = fams[name]
        assert fam.type == typ, name
        seen = set()
        for s in fam.samples:
            seen |= set(s.labels) - {"le"}
        assert seen == labels, name
    for name in absent:
        assert name not in fams, name
    # No *_created series: the Go client (kube-proxy) has none.
    assert not any(n.endswith("_created") for f in fams.values() for n in (s.name for s in f.samples))


def test_values_after_syncs():
    m = ProxyMetrics("iptables", version="9.9.9", process=False)
    exercise(m)
    fams = exposition(m)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    v4 = (("ip_family", "IPv4"),)
    assert samples[("kubeproxy_sync_proxy_rules_duration_seconds_count", v4)] == 2
    assert samples[("kubeproxy_sync_full_proxy_rules_duration_seconds_count", v4)] == 1
    assert samples[("kubeproxy_sync_partial_proxy_rules_duration_seconds_count", v4)] == 1
    assert samples[("kubeproxy_sync_proxy_rules_last_timestamp_seconds", v4)] == 102.0
    assert samples[("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", v4)] == 100.0
    assert samples[("kubeproxy_sync_proxy_rules_service_changes_total", ())] == 2
    assert samples[("kubeproxy_sync_proxy_rules_endpoint_changes_total", ())] == 3
    assert samples[("kubeproxy_sync_proxy_rules_endpoint_changes_pending", ())] == 0  # reset by a sync
    assert samples[("kubeproxy_network_programming_duration_seconds_count", v4)] == 2
    assert samples[("kubeproxy_network_programming_duration_seconds_sum", v4)] == pytest.approx(4.5)
    assert samples[("kubeproxy_sync_proxy_rules_iptables_total", (("ip_family", "IPv4"), ("table", "nat")))] == 40
    assert samples[("kubeproxy_sync_proxy_rules_iptables_last", (("ip_family", "IPv4"), ("table", "nat")))] == 5
    assert samples[("kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                    (("ip_family", "IPv4"), ("traffic_policy", "external")))] == 2
    assert samples[("kubeproxy_conntrack_reconciler_deleted_entries_total", v4)] == 4
    assert samples[("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", v4)] == 1
    assert samples[("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", v4)] == 1
    assert samples[("kubeproxy_proxy_healthz_total", (("code", "200"),))] == 1
    assert samples[("kproxy_info", (("mode", "iptables"), ("version", "9.9.9")))] == 1


def test_buckets_match_kube_proxy():
    assert len(SYNC_BUCKETS) == 15
    assert SYNC_BUCKETS[0] == 0.001 and SYNC_BUCKETS[-1] == pytest.approx(16.384)
    # merge(): a leading 0, then 0.25, 0.5, 1..59, 60..115 (5 s), 120..300 (30 s) = 1 + 2 + 59 + 12 + 7.
    assert len(NETWORK_PROGRAMMING_BUCKETS) == 81
    assert NETWORK_PROGRAMMING_BUCKETS[:5] == (0.0, 0.25, 0.5, 1, 2)
    assert NETWORK_PROGRAMMING_BUCKETS[-1] == 300
    m = ProxyMetrics("iptables", process=False)
    m.sync_done(0.01, full=True)
    les = [s.labels["le"] for f in exposition(m).values() if f.name == "kubeproxy_sync_proxy_rules_duration_seconds"
           for s in f.samples if s.name.endswith("_bucket")]
    assert les[0] == "0.001" and les[-1] == "+Inf" and len(les) == 16


def test_dual_stack_families_and_separate_registries():
    a = ProxyMetrics("nftables", families=("IPv4", "IPv6"), process=False)
    b = ProxyMetrics("nftables", process=False)
    a.sync_failed()
    fams = exposition(a)
    fails = {s.labels["ip_family"]: s.value for s in fams["kubeproxy_sync_proxy_rules_nftables_sync_failures"].samples}
    assert fails == {"IPv4": 1, "IPv6": 1}
    fb = exposition(b)["kubeproxy_sync_proxy_rules_nftables_sync_failures"]
    assert [s.value for s in fb.samples] == [0]


def test_process_metrics_present():
    m = ProxyMetrics("iptables")
    names = set(exposition(m))
    assert "process_resident_memory_bytes" in names
    assert "python_info" in names


def _get(port, path, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_metrics_server_routes():
    loop = HttpLoop("test-metrics")
    m = ProxyMetrics("iptables", process=False)
    m.sync_done(0.02, full=True)
    cfg = ProxyConfig(mode="iptables")
    srv = start_metrics_server("127.0.0.1:0", m, config=cfg, loop=loop, ephemeral=True)
    try:
        assert srv is not None
        status, headers, body = _get(srv.port, "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
        assert b'kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv4"} 1.0' in body

        status, headers, body = _get(srv.port, "/metrics", {"Accept-Encoding": "gzip"})
        assert headers["content-encoding"] == "gzip"
        assert b"kubeproxy_sync_full_proxy_rules_duration_seconds" in gzip.decompress(body)

        status, headers, body = _get(srv.port, "/metrics",
                                     {"Accept": "application/openmetrics-text; version=1.0.0"})
        assert headers["content-type"].startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")

        assert _get(srv.port, "/healthz")[::2] == (200, b"ok")
        assert _get(srv.port, "/healthz/ping")[::2] == (200, b"ok")
        assert _get(srv.port, "/proxyMode")[::2] == (200, b"iptables")
        status, _, body = _get(srv.port, "/configz")
        assert status == 200 and json.loads(body)["kubeproxy.config.k8s.io"]["mode"] == "iptables"
        assert _get(srv.port, "/nope")[0] == 404
    finally:
        if srv is not None:
            srv.stop()
        loop.stop()


def test_metrics_server_disabled_addresses():
    m = ProxyMetrics("iptables", process=False)
    assert start_metrics_server("", m) is None
    assert start_metrics_server("127.0.0.1:0", m) is None  # port 0 disables it, as in kube-proxy
