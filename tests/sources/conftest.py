"""Fixtures for the Kubernetes source tests: a fake API server, a kubeconfig pointing at it, objects,
and a helper that runs a KubeSource on its own event loop thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kproxy.config import ProxyConfig
from kproxy.sources.kube import KubeSource
from kproxy.store import ClusterStore

from .fake_apiserver import FakeApiServer

NODE = "node-a"


def service(name: str, ns: str = "default", ip: str = "10.96.0.10", port: int = 80, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns},
            "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                     "ports": [{"name": "http", "protocol": "TCP", "port": port, "targetPort": 8080}], **spec}}


def endpoint_slice(name: str, svc: str, ips: list[str], ns: str = "default") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": NODE} for ip in ips]}


def node(name: str, ip: str = "192.168.0.10") -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


class RecordingStore(ClusterStore):
    """A ClusterStore that records every watch event it is given (not the ones a relist derives)."""

    def __init__(self, node_name: str = NODE) -> None:
        super().__init__(node_name)
        self.applied: list[tuple[str, str, str, str]] = []  # (kind, type, ns/name, resourceVersion)
        self.replaced: list[tuple[str, int]] = []
        self.changes = 0
        self._in_replace = threading.local()

    def apply(self, events: Any) -> int:
        events = list(events)
        if not getattr(self._in_replace, "on", False):
            with self._lock:
                for ev in events:
                    meta = ev.obj.get("metadata") or {}
                    self.applied.append((ev.kind, ev.type, f"{meta.get('namespace', '')}/{meta.get('name')}",
                                         str(meta.get("resourceVersion", ""))))
        n = super().apply(events)
        self.changes += n
        return n

    def replace(self, kind: str, objs: Any) -> int:
        objs = list(objs)
        with self._lock:
            self.replaced.append((kind, len(objs)))
        self._in_replace.on = True
        try:
            return super().replace(kind, objs)
        finally:
            self._in_replace.on = False

    def watch_events(self, kind: str) -> list[tuple[str, str, str, str]]:
        with self._lock:
            return [a for a in self.applied if a[0] == kind]


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class SourceRunner:
    """Runs ``source.run(store)`` on an event loop in a background thread."""

    def __init__(self, source: KubeSource, store: ClusterStore) -> None:
        self.source = source
        self.store = store
        self.loop = asyncio.new_event_loop()
        self.task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._main, name="source-loop", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def go() -> None:
            self.task = asyncio.current_task()  # type: ignore[assignment]
            self._started.set()
            await self.source.run(self.store)

        try:
            self.loop.run_until_complete(go())
        except asyncio.CancelledError:
            pass
        except BaseException as e:
            self.error = e
        finally:
            self._started.set()
            self.loop.close()

    def start(self) -> SourceRunner:
        self.thread.start()
        self._started.wait(5)
        return self

    def wait_synced(self, timeout: float = 10.0) -> None:
        wait_for(lambda: self.store.synced or self.error, timeout, "initial sync")
        if self.error:
            raise self.error

    def stop(self) -> None:
        if self.thread.is_alive() and self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(5)
        self.source.join(5)


@pytest.fixture
def fake() -> Iterator[FakeApiServer]:
    srv = FakeApiServer().start()
    try:
        yield srv
    finally:
        srv.stop()


def write_kubeconfig(path: Any, server: str, token: str = "test-token") -> str:
    path.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {server}
users:
- name: kproxy
  user:
    token: {token}
contexts:
- name: fake
  context:
    cluster: fake
    user: kproxy
current-context: fake
""")
    return str(path)


@pytest.fixture
def kubeconfig(tmp_path: Any, fake: FakeApiServer) -> str:
    return write_kubeconfig(tmp_path / "kubeconfig", fake.url)


@pytest.fixture
def run_source(kubeconfig: str) -> Iterator[Callable[..., tuple[SourceRunner, RecordingStore]]]:
    runners: list[SourceRunner] = []

    def start(store: RecordingStore | None = None, **kw: Any) -> tuple[SourceRunner, RecordingStore]:
        store = store or RecordingStore()
        opts: dict[str, Any] = {"backoff_initial": 0.05, "backoff_cap": 0.5}
        opts.update(kw)
        cfg = ProxyConfig(kubeconfig=kubeconfig, hostname_override=NODE, api_qps=0)
        r = SourceRunner(KubeSource(cfg, **opts), store).start()
        runners.append(r)
        return r, store

    yield start
    for r in runners:
        r.stop()
