"""The daemon's /healthz and /metrics (kube-proxy compatible) follow real syncs."""

from __future__ import annotations

import json
import time

import pytest

from kproxy.testing.topology import HTTP_PORT

from . import manifests as m
from .harness import Scenario

pytestmark = [pytest.mark.netns]

LAST_SYNC = "kubeproxy_sync_proxy_rules_last_timestamp_seconds"
SYNC_COUNT = "kubeproxy_sync_proxy_rules_duration_seconds_count"


@pytest.mark.feature("metrics")
def test_metrics_follow_syncs(sc: Scenario) -> None:
    before_ts = sc.metric(LAST_SYNC)
    before_n = sc.metric(SYNC_COUNT)
    assert before_ts and before_n, f"{LAST_SYNC} / {SYNC_COUNT} not exported"
    t0 = time.time()
    vip = sc.vip()
    sc.apply("obs", m.service("obs", vip, [m.port(80, HTTP_PORT, name="p")]),
             m.endpoint_slice("obs", [m.endpoint(sc.ip("pod0"))], [m.slice_port(HTTP_PORT, name="p")]))
    after_ts = sc.metric(LAST_SYNC)
    after_n = sc.metric(SYNC_COUNT)
    v4 = '{ip_family="IPv4"}'
    assert after_ts.get(v4, 0) >= t0 - 0.5, f"last sync timestamp did not move: {before_ts} → {after_ts}"
    assert after_n.get(v4, 0) > before_n.get(v4, 0), f"sync count did not grow: {before_n} → {after_n}"


@pytest.mark.feature("metrics")
def test_healthz(sc: Scenario) -> None:
    p = sc.node_run(["curl", "-s", "-w", "\n%{http_code}", "http://127.0.0.1:10256/healthz"], check=False)
    body, _, code = p.stdout.rpartition("\n")
    assert code == "200", p.stdout
    doc = json.loads(body)
    assert "lastUpdated" in doc and "currentTime" in doc, doc
