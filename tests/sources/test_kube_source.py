"""KubeSource against a fake kube-apiserver (tests/sources/fake_apiserver.py).

The fake stands in for kube-apiserver's list/watch read path over real HTTP (paginated lists,
chunked watch streams, resourceVersions, bookmarks, 410 Gone after compaction, dropped connections,
error statuses); see its docstring for what it does not fake. The source is configured exactly as in
production: from a kubeconfig file (written to tmp_path) that points at the fake server.
"""

from __future__ import annotations

import itertools
import socket
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
    wait_for(lambda: runner.source.ready is not None and runner.source.ready.is_set(), what="ready event")
    # the watch starts from the list's resourceVersion, with bookmarks and a 5-10 min timeout
    fake.wait_watching(3)
    w = fake.watch_requests("services")[0]
    assert w["resourceVersion"] == str(fake.rv)
    assert w["allowWatchBookmarks"] == "true"
    assert 300 <= int(w["timeoutSeconds"]) <= 600
    assert "fieldSelector" not in w, "Services are watched unfiltered (DNS wants all of them)"
    assert fake.watch_requests("nodes")[0]["fieldSelector"] == f"metadata.name={NODE}"
    assert fake.list_requests("nodes")[0]["fieldSelector"] == f"metadata.name={NODE}"
    # the kubeconfig's credentials are used on every request
    assert {r.headers.get("authorization") for r in fake.requests} == {"Bearer test-token"}
    # TCP keepalive on the API connections (a dead peer is noticed long before the watch's read timeout)
    assert (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1) in runner.source._api_config.socket_options


def test_rv_newer():
    assert rv_newer("11", "10") and not rv_newer("10", "10") and not rv_newer("9", "10")
    assert rv_newer("abc", "10") and rv_newer("5", "")


def _no_duplicates(store: RecordingStore) -> None:
    """Every (kind, object, resourceVersion) reached the store at most once, in increasing order per kind."""
    for kind in (KIND_SERVICE, KIND_SLICE, KIND_NODE):
        evs = store.watch_events(kind)
        assert len(evs) == len(set(evs)), f"{kind} event applied twice"
        rvs = [int(e[3]) for e in evs]
        assert rvs == sorted(rvs), f"{kind} events out of order"


def test_incremental_events_reach_the_store(fake, run_source):
    _populate(fake)
    runner, store = run_source()
    runner.wait_synced()
    fake.wait_watching(3)
    fake.create("services", service("new", ip="10.96.1.1"))
    fake.update("services", service("svc-0", ip="10.96.0.10", port=81))
    fake.delete("services", "svc-1")
    fake.create("endpointslices", endpoint_slice("new-1", "new", ["10.244.1.1", "10.244.1.2"]))
    fake.delete("endpointslices", "svc-2-abc")
    wait_for(lambda: _store_matches_server(store, fake), what="store == server")
    assert store.services[("default", "svc-0")].ports[0].port == 81
    assert ("default", "svc-1") not in store.services
    assert len(store.slices[("default", "new-1")].endpoints) == 2
    assert [e[1] for e in store.watch_events(KIND_SERVICE)] == ["ADDED", "MODIFIED", "DELETED"]
    assert [e[1] for e in store.watch_events(KIND_SLICE)] == ["ADDED", "DELETED"]
    # other nodes' changes never arrive; ours do
    fake.update("nodes", node("node-b", "192.168.0.99"))
    fake.update("nodes", node(NODE, "192.168.0.77"))
    wait_for(lambda: store.node is not None and "192.168.0.77" in store.node.addresses, what="node update")
    assert set(store.nodes) == {NODE}
    assert [e[2] for e in store.watch_events(KIND_NODE)] == [f"/{NODE}"]
    assert len(store.replaced) == 3, "no relist"
    _no_duplicates(store)


def test_bookmarks_advance_the_resource_version(fake, run_source):
    _populate(fake)
    runner, store = run_source()
    runner.wait_synced()
    fake.wait_watching(3)
    listed_rv = fake.watch_requests("services")[0]["resourceVersion"]
    # Lots of churn in other collections moves the (global) resourceVersion far past the Services' one.
    for i in range(20):
        fake.create("endpointslices", endpoint_slice(f"churn-{i}", "svc-0", [f"10.244.2.{i}"]))
    bm_rv = fake.bookmark()
    last_rv = runner.source.stats.last_rv
    wait_for(lambda: all(last_rv.get(k) == str(bm_rv) for k in (KIND_SERVICE, KIND_SLICE, KIND_NODE)),
             what="bookmarks seen by all three watches")
    fake.drop_watches()
    wait_for(lambda: len(fake.watch_requests("services")) >= 2, what="services re-watch")
    again = fake.watch_requests("services")[1]
    assert again["resourceVersion"] == str(bm_rv) != listed_rv, "the re-watch resumes from the bookmark"
    assert len(fake.list_requests("services")) == 1, "no relist after a plain disconnect"
    assert len(store.watch_events(KIND_SERVICE)) == 0, "a bookmark is not an object change"


@pytest.mark.parametrize("partial", [False, True], ids=["clean-cut", "cut-inside-an-event"])
def test_disconnects_lose_nothing_and_apply_nothing_twice(fake, run_source, partial):
    _populate(fake)
    runner, store = run_source()
    runner.wait_synced()
    fake.wait_watching(3)
    for round_ in range(5):
        for i in range(30):
            fake.upsert("services", service(f"svc-{i % 7}", ip=f"10.96.0.{10 + i % 7}", port=1000 + round_ * 100 + i))
            fake.upsert("endpointslices", endpoint_slice(f"s-{i % 5}", f"svc-{i % 5}", [f"10.244.3.{i}"]))
            if i == 15:
                fake.drop_watches(partial=partial, wait=0)  # cut while events are in flight
        if round_ == 2:
            fake.delete("services", "svc-3")
        wait_for(lambda r=round_: len(fake.watch_requests("services")) >= r + 2, what="re-watch")
    wait_for(lambda: _store_matches_server(store, fake), what="store == server")
    _no_duplicates(store)
    # Every Service change after the initial list arrived exactly once, as a watch event.
    listed = int(fake.watch_requests("services")[0]["resourceVersion"])
    want = [(str(e.rv), e.type) for e in fake._hist if e.resource == "services" and e.rv > listed]
    got = [(e[3], e[1]) for e in store.watch_events(KIND_SERVICE)]
    assert got == want
    assert len(fake.list_requests("services")) == 1, "resumed from the resourceVersion, no relist"
    assert len(fake.watch_requests("services")) >= 6


def test_replayed_events_are_dropped(fake, run_source):
    _populate(fake)
    runner, store = run_source()
    runner.wait_synced()
    fake.wait_watching(3)
    for i in range(5):
        fake.upsert("services", service("svc-0", port=2000 + i))
    wait_for(lambda: len(store.watch_events(KIND_SERVICE)) == 5, what="5 events")
    fake.replay = 3  # a resumed watch re-sends the last 3 events (a misbehaving proxy or server)
    fake.drop_watches()
    wait_for(lambda: len(fake.watch_requests("services")) >= 2, what="re-watch")
    fake.upsert("services", service("svc-0", port=3000))
    wait_for(lambda: _store_matches_server(store, fake), what="store == server")
    assert len(store.watch_events(KIND_SERVICE)) == 6
    assert runner.source.stats.replays_dropped >= 3
    _no_duplicates(store)


@pytest.mark.parametrize("as_http", [False, True], ids=["410-error-event", "410-http-status"])
def test_gone_relists_and_derives_deletions(fake, run_source, as_http):
    fake.gone_as_http_status = as_http
    _populate(fake, 5)
    runner, store = run_source()
    runner.wait_synced()
    fake.wait_watching(3)
    old_rv = fake.watch_requests("services")[0]["resourceVersion"]
    fake.stop()  # the API server goes away...
    fake.delete("services", "svc-1")  # ...things change meanwhile...
    fake.delete("endpointslices", "svc-1-abc")
    fake.create("services", service("while-away", ip="10.96.5.5"))
    fake.update("services", service("svc-2", ip="10.96.0.12", port=8443))
    fake.compact()  # ...and the history the client needs is compacted away
    fake.start()
    wait_for(lambda: _store_matches_server(store, fake), timeout=15, what="store == server after relist")
    assert ("default", "svc-1") not in store.services and ("default", "svc-1-abc") not in store.slices
    assert ("default", "while-away") in store.services
    lists = fake.list_requests("services")
    assert len(lists) == 2
    assert lists[1]["resourceVersion"] == old_rv and lists[1]["resourceVersionMatch"] == "NotOlderThan"
    assert runner.source.stats.relists >= 2
    # watching resumes from the relist's resourceVersion
    wait_for(lambda: fake.watch_requests("services")[-1]["resourceVersion"] == str(fake.rv), what="re-watch")
    fake.create("services", service("after", ip="10.96.6.6"))
    wait_for(lambda: ("default", "after") in store.services, what="event after relist")


def test_expired_continue_token_restarts_the_list(fake, run_source):
    _populate(fake, 10)
    compacted: list[int] = []

    def after_page(resource, params):
        if resource == "services" and not compacted:
            fake.create("services", service("mid-list", ip="10.96.7.7"))
            compacted.append(fake.compact())

    fake.after_list_page = after_page
    runner, store = run_source(page_size=4)
    runner.wait_synced()
    assert ("default", "mid-list") in store.services
    pages = fake.list_requests("services")
    assert "continue" in pages[1] and "continue" not in pages[2], "restarted from the first page"
    wait_for(lambda: _store_matches_server(store, fake), what="store == server")


def test_server_errors_back_off_then_recover(fake, run_source):
    _populate(fake)
    fake.fail_next(2, 500, resource="services", watch=False)  # the initial list fails twice
    runner, store = run_source(backoff_initial=0.05, backoff_cap=2.0)
    runner.wait_synced()
    assert len(fake.list_requests("services")) == 3
    fake.wait_watching(3)
    fake.fail_next(4, 500, resource="services", watch=True)
    fake.drop_watches()
    fake.create("services", service("during-errors", ip="10.96.8.8"))
    wait_for(lambda: ("default", "during-errors") in store.services, what="recovery")
    times = [r.at for r in fake.requests if r.resource == "services" and r.watch][1:]
    assert len(times) == 5
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g >= 0.04 for g in gaps), gaps
    assert gaps[-1] > 2 * gaps[0], f"exponential backoff: {gaps}"
    assert runner.source.stats.errors >= 6
    assert len(fake.list_requests("services")) == 3, "errors are retried from the resourceVersion, no relist"
    _no_duplicates(store)


def test_too_many_requests_honours_retry_after(fake, run_source):
    _populate(fake)
    fake.fail_next(1, 429, resource="services", watch=False, retry_after=0.4)
    runner, _store = run_source(backoff_initial=0.01, backoff_cap=5.0)
    runner.wait_synced()
    t = [r.at for r in fake.requests if r.resource == "services"]
    assert t[1] - t[0] >= 0.38


def test_connection_refused_then_reconnect(fake, run_source):
    _populate(fake)
    runner, store = run_source()
    runner.wait_synced()
    fake.wait_watching(3)
    fake.stop()
    time.sleep(0.5)  # several refused connection attempts
    fake.create("services", service("back", ip="10.96.9.9"))
    fake.start()
    wait_for(lambda: ("default", "back") in store.services, what="reconnect")
    assert len(fake.list_requests("services")) == 1
    assert runner.source.stats.errors >= 2
    _no_duplicates(store)


def test_watch_timeout_ends_are_resumed_without_relist(fake, run_source):
    fake.max_watch_seconds = 0.2
    _populate(fake)
    runner, store = run_source()
    runner.wait_synced()
    for i in range(6):
        fake.upsert("services", service("svc-0", port=4000 + i))
        time.sleep(0.1)
    wait_for(lambda: _store_matches_server(store, fake), what="store == server")
    assert len(fake.watch_requests("services")) >= 3
    assert len(fake.list_requests("services")) == 1
    _no_duplicates(store)


def test_master_overrides_the_host(fake, tmp_path):
    from .conftest import write_kubeconfig

    _populate(fake)
    path = write_kubeconfig(tmp_path / "kc", "http://127.0.0.1:1")  # nothing listens there
    cfg = ProxyConfig(kubeconfig=path, master=fake.url, hostname_override=NODE)
    assert load_api_configuration(cfg).host == fake.url
    runner = SourceRunner(KubeSource(cfg, backoff_initial=0.05), RecordingStore()).start()
    try:
        runner.wait_synced()
    finally:
        runner.stop()
    # --master alone (no kubeconfig, not in a cluster) also works
    assert load_api_configuration(ProxyConfig(master=fake.url)).host == fake.url


def test_unloadable_kubeconfig_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "nope" / "kubeconfig")
    with pytest.raises(KubeConfigError, match=missing):
        load_api_configuration(ProxyConfig(kubeconfig=missing))
    bad = tmp_path / "bad"
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\n")
    with pytest.raises(KubeConfigError, match=str(bad)):
        load_api_configuration(ProxyConfig(kubeconfig=str(bad)))
    # and run() surfaces it (the daemon exits with it)
    runner = SourceRunner(KubeSource(ProxyConfig(kubeconfig=missing)), RecordingStore()).start()
    runner.thread.join(5)
    assert isinstance(runner.error, KubeConfigError)


def test_cancel_stops_all_threads(fake, run_source):
    _populate(fake)
    runner, _store = run_source()
    runner.wait_synced()
    fake.wait_watching(3)
    runner.stop()
    assert not any(t.is_alive() for t in runner.source._threads)
    n = len(fake.requests)
    time.sleep(0.3)
    assert len(fake.requests) == n
    wait_for(lambda: fake.active_watches == 0, what="watch connections closed")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_churn_with_faults_converges(fake, run_source, seed):
    """Random creates/updates/deletes interleaved with dropped connections (clean and mid-event), replays,
    5xx bursts, bookmarks, and outages with compaction (→ 410 → relist). Whatever happens, the store ends
    equal to the server and no watch event is applied twice."""
    import random

    rng = random.Random(seed)
    _populate(fake, 5)
    runner, store = run_source()
    runner.wait_synced()
    names = [f"svc-{i}" for i in range(12)]
    for _ in range(300):
        r = rng.random()
        name = rng.choice(names)
        live = ("default", name) in fake.state("services")
        if r < 0.45:
            fake.upsert("services", service(name, ip=f"10.96.0.{10 + names.index(name)}", port=rng.randint(1, 9999)))
        elif r < 0.6:
            fake.upsert("endpointslices", endpoint_slice(f"{name}-abc", name, [f"10.244.9.{rng.randint(1, 250)}"]))
        elif r < 0.7 and live:
            fake.delete("services", name)
        elif r < 0.75:
            fake.drop_watches(partial=rng.random() < 0.5, wait=0)
        elif r < 0.78:
            fake.bookmark()
        elif r < 0.8:
            fake.fail_next(rng.randint(1, 3), rng.choice([500, 503, 429]))
        elif r < 0.81:
            fake.replay = rng.randint(0, 3)
        elif r < 0.82:
            fake.stop()
            fake.upsert("services", service(name, ip=f"10.96.0.{10 + names.index(name)}", port=7))
            if fake.state("endpointslices"):
                ns, sl = rng.choice(sorted(fake.state("endpointslices")))
                fake.delete("endpointslices", sl, ns)
            fake.compact()
            fake.start()
        time.sleep(0.05 if rng.random() < 0.1 else 0.002)  # let the client keep up now and then
    fake.replay = 0
    wait_for(lambda: _store_matches_server(store, fake), timeout=20, what="store == server")
    _no_duplicates(store)
    st = runner.source.stats
    print(f"seed {seed}: {st.watches} watches, {st.relists} relists, {st.errors} errors, "
          f"{st.replays_dropped} replays dropped, {st.events} events in {st.batches} batches")
