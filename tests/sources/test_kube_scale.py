"""Scale: 10,000 Services and 10,000 EndpointSlices x 10 endpoints (100,000 endpoints) listed through the
fake kube-apiserver (real HTTP, 500-object pages) into the store, then a burst of watch events."""

from __future__ import annotations

import time

import pytest

from .conftest import NODE, endpoint_slice, node, service, wait_for

N_SERVICES = 10_000
ENDPOINTS_PER_SLICE = 10

pytestmark = pytest.mark.timeout(120)


def _objects() -> tuple[list[dict], list[dict]]:
    svcs, slices = [], []
    for i in range(N_SERVICES):
        ns = f"ns-{i % 50}"
        svcs.append(service(f"svc-{i}", ns=ns, ip=f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}"))
        base = i * ENDPOINTS_PER_SLICE
        ips = [f"10.{128 + (base + j) // 65536}.{((base + j) // 256) % 256}.{(base + j) % 256}"
               for j in range(ENDPOINTS_PER_SLICE)]
        slices.append(endpoint_slice(f"svc-{i}-x1", f"svc-{i}", ips, ns=ns))
    return svcs, slices


def test_list_100k_endpoints(fake, run_source, capsys):
    svcs, slices = _objects()
    t0 = time.perf_counter()
    fake.load("services", svcs)
    fake.load("endpointslices", slices)
    fake.create("nodes", node(NODE))
    t_load = time.perf_counter() - t0

    t0 = time.perf_counter()
    runner, store = run_source()
    runner.wait_synced(timeout=90)
    t_sync = time.perf_counter() - t0
    assert len(store.services) == N_SERVICES
    assert len(store.slices) == N_SERVICES
    assert sum(len(s.endpoints) for s in store.slices.values()) == N_SERVICES * ENDPOINTS_PER_SLICE
    pages = len(fake.list_requests("endpointslices"))
    assert pages == N_SERVICES // 500
    assert fake.gzipped_responses >= pages, "big list pages travel gzipped"

    # A burst of 2,000 endpoint changes must arrive as a few large store batches, not 2,000 tiny ones.
    fake.wait_watching(3)
    batches0 = runner.source.stats.batches
    t0 = time.perf_counter()
    for i in range(2_000):
        sl = endpoint_slice(f"svc-{i}-x1", f"svc-{i}", [f"10.200.{i // 256}.{i % 256}"], ns=f"ns-{i % 50}")
        fake.update("endpointslices", sl)
    wait_for(lambda: runner.source.stats.events >= 2_000, timeout=60, what="2000 watch events")
    t_burst = time.perf_counter() - t0
    batches = runner.source.stats.batches - batches0
    with capsys.disabled():
        print(f"\n[scale] fake server load {t_load:.1f}s; list {N_SERVICES} Services + {N_SERVICES} slices "
              f"({N_SERVICES * ENDPOINTS_PER_SLICE} endpoints, {pages} slice pages) into the store: {t_sync:.2f}s; "
              f"2000 watch events: {t_burst:.2f}s in {batches} store batches")
    assert t_sync < 30, f"initial sync took {t_sync:.1f}s"
    assert t_burst < 20
