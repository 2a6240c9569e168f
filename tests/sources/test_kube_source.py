"""KubeSource against a fake kube-apiserver (tests/sources/fake_apiserver.py).

The fake stands in for kube-apiserver's list/watch read path over real HTTP (paginated lists,
chunked watch streams, resourceVersions, bookmarks, 410 Gone after compaction, dropped connections,
error statuses); see its docstring for what it does not fake. The source is configured exactly as in
production: from a kubeconfig file (written to tmp_path) that points at the fake server.
"""

from __future__ import annotations

import time

import pytest

from kproxy.config import ProxyConfig
from kproxy.sources.kube import KubeConfigError, KubeSource, load_api_configuration, rv_newer
from kproxy.store import KIND_NODE, KIND_SERVICE, KIND_SLICE

from .conftest import NODE, RecordingStore, SourceRunner, endpoint_slice, node, service, wait_for
from .fake_apiserver import FakeApiServer

pytestmark = pytest.mark.timeout(60)


def _populate(fake: FakeApiServer, n_services: int = 3) -> None:
    for i in range(n_services):
        fake.create("services", service(f"svc-{i}", ip=f"10.96.0.{10 + i}"))
        fake.create("endpointslices", endpoint_slice(f"svc-{i}-abc", f"svc-{i}", [f"10.244.0.{10 + i}"]))
    fake.create("nodes", node(NODE))
    fake.create("nodes", node("node-b", "192.168.0.11"))


def _store_matches_server(store: RecordingStore, fake: FakeApiServer) -> bool:
    with store._lock:
        svcs = {k: s.resource_version for k, s in store.services.items()}
        slices = {k: s.resource_version for k, s in store.slices.items()}
        nodes = set(store.nodes)
    want_svcs = {k: v["metadata"]["resourceVersion"] for k, v in fake.state("services").items()}
    want_slices = {k: v["metadata"]["resourceVersion"] for k, v in fake.state("endpointslices").items()}
    return svcs == want_svcs and slices == want_slices and nodes == ({NODE} & {k[1] for k in fake.state("nodes")})


def test_initial_list_paginated_then_synced(fake, run_source):
    _populate(fake, 7)
    runner, store = run_source(page_size=3)
    runner.wait_synced()
    assert len(store.services) == 7 and len(store.slices) == 7
    assert set(store.nodes) == {NODE}, "only this node is watched"
    pages = fake.list_requests("services")
    assert [p.get("limit") for p in pages] == ["3", "3", "3"]
    assert "continue" not in pages[0] and all("continue" in p for p in pages[1:])
    assert runner.source.ready is not None and runner.source.ready.is_set()
    # the watch starts from the list's resourceVersion, with bookmarks and a 5-10 min timeout
    fake.wait_watching(3)
    w = fake.watch_requests("services")[0]
    assert w["resourceVersion"] == pages[0 if len(pages) == 1 else -1].get("resourceVersion", w["resourceVersion"])
    assert w["allowWatchBookmarks"] == "true"
    assert 300 <= int(w["timeoutSeconds"]) <= 600
    assert "fieldSelector" not in w, "Services are watched unfiltered (DNS wants all of them)"
    assert fake.watch_requests("nodes")[0]["fieldSelector"] == f"metadata.name={NODE}"
    assert fake.list_requests("nodes")[0]["fieldSelector"] == f"metadata.name={NODE}"


def test_rv_newer():
    assert rv_newer("11", "10") and not rv_newer("10", "10") and not rv_newer("9", "10")
    assert rv_newer("abc", "10") and rv_newer("5", "")
