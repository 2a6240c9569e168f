"""kubeproxy_network_programming_duration_seconds: measured from the EndpointSlice trigger-time annotation.

The data plane is a recorder (this is about what the daemon measures, not about kernel rules); the
metrics are the real prometheus-client collectors read back from their registry.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest

from kproxy import dataplane, metrics
from kproxy.config import ProxyConfig
from kproxy.daemon import Daemon
from kproxy.model import TRIGGER_TIME_ANNOTATION, parse_endpoint_slice, parse_timestamp
from kproxy.store import Event

from .objs import ep, eps, svc


class RecordingDataPlane:
    """Stands in for a kernel data plane: records the syncs it was asked for."""

    def __init__(self) -> None:
        self.syncs: list[bool] = []

    def sync(self, snap: Any, changes: Any, full: bool) -> dataplane.SyncResult:
        self.syncs.append(full)
        return dataplane.SyncResult(full=full)


def _rfc3339(t: float, nanos: bool = True) -> str:
    base = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    frac = f"{t % 1:.9f}"[2:] if nanos else ""
    return f"{base}.{frac}Z" if frac else f"{base}Z"


def _slice(ips: list[str], trigger: str | None) -> dict[str, Any]:
    obj = eps("web", [ep(ip) for ip in ips])
    if trigger is not None:
        obj["metadata"]["annotations"] = {TRIGGER_TIME_ANNOTATION: trigger}
    return obj


def _latency(m: metrics.ProxyMetrics) -> tuple[float, float]:
    """(count, sum) of the IPv4 programming-latency histogram."""
    count = total = 0.0
    for fam in m.network_programming_latency.collect():
        for s in fam.samples:
            if s.labels.get("ip_family") == "IPv4":
                if s.name.endswith("_count"):
                    count = s.value
                elif s.name.endswith("_sum"):
                    total = s.value
    return count, total


@pytest.mark.parametrize(("text", "want"), [
    ("2026-11-24T21:00:00Z", datetime(2026, 11, 24, 21, tzinfo=UTC).timestamp()),
    ("2026-11-24T21:00:00.123456789Z", datetime(2026, 11, 24, 21, tzinfo=UTC).timestamp() + 0.123456),
    ("2026-11-24T22:00:00.5+01:00", datetime(2026, 11, 24, 21, tzinfo=UTC).timestamp() + 0.5),
    ("yesterday", 0.0), ("", 0.0), (None, 0.0), (17, 0.0),
])
def test_parse_timestamp(text: object, want: float) -> None:
    assert parse_timestamp(text) == pytest.approx(want, abs=1e-6)


def test_slice_carries_trigger_time_and_bad_value_is_not_an_error() -> None:
    assert parse_endpoint_slice(_slice(["10.0.0.1"], "2026-11-24T21:00:00Z")).trigger_time > 0
    assert parse_endpoint_slice(_slice(["10.0.0.1"], "not a time")).trigger_time == 0.0


def _daemon() -> tuple[Daemon, RecordingDataPlane, metrics.ProxyMetrics]:
    dp = RecordingDataPlane()
    d = Daemon(ProxyConfig(hostname_override="node-a"), dp=dp)  # type: ignore[arg-type]
    d.metrics = m = metrics.ProxyMetrics(mode="iptables", families=(4, 6))
    return d, dp, m


def test_latency_is_measured_from_the_trigger_time() -> None:
    d, dp, m = _daemon()
    d.store.apply([Event("ADDED", "Service", svc())])
    d.sync()  # first (full) sync: nothing from slices yet
    assert _latency(m) == (0, 0)
    d.started_at -= 10  # the daemon has been up for a while
    now = time.time()
    d.store.apply([Event("ADDED", "EndpointSlice", _slice(["10.0.0.1"], _rfc3339(now - 2.5)))])
    d.sync()
    count, total = _latency(m)
    assert count == 1
    assert 2.5 <= total < 2.5 + (time.time() - now) + 0.01
    assert dp.syncs == [True, False]


def test_slice_without_annotation_counts_from_when_it_arrived() -> None:
    d, _, m = _daemon()
    d.store.apply([Event("ADDED", "Service", svc())])
    d.sync()
    d.store.apply([Event("ADDED", "EndpointSlice", _slice(["10.0.0.1"], None))])
    time.sleep(0.2)
    d.sync()
    count, total = _latency(m)
    assert count == 1 and 0.2 <= total < 5


def test_changes_older_than_the_daemon_are_not_its_latency() -> None:
    d, _, m = _daemon()
    d.store.apply([Event("ADDED", "Service", svc()),
                   Event("ADDED", "EndpointSlice", _slice(["10.0.0.1"], _rfc3339(time.time() - 3600)))])
    d.sync()
    assert _latency(m) == (0, 0)


def test_failed_sync_keeps_the_trigger_for_the_retry() -> None:
    d, dp, m = _daemon()
    d.store.apply([Event("ADDED", "Service", svc())])
    d.sync()
    d.started_at -= 10
    failing = {"on": True}
    real_sync = dp.sync

    def flaky(snap: Any, changes: Any, full: bool) -> dataplane.SyncResult:
        if failing["on"]:
            raise RuntimeError("restore failed")
        return real_sync(snap, changes, full)

    dp.sync = flaky  # type: ignore[method-assign]
    d.store.apply([Event("ADDED", "EndpointSlice", _slice(["10.0.0.1"], _rfc3339(time.time() - 1)))])
    with pytest.raises(RuntimeError):
        d.sync()
    assert _latency(m) == (0, 0)
    failing["on"] = False
    d.sync()
    assert _latency(m)[0] == 1
