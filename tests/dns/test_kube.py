"""``kproxy dns`` and ``kproxy dns export`` with --kubeconfig, against the fake API server of the source tests
(loaded by path: it lives in tests/sources, owned by the sources tests)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest
from kdns_testlib import MANIFESTS, free_port

from kproxy.sources.manifests import parse_documents

FAKE = Path(__file__).resolve().parent.parent / "sources" / "fake_apiserver.py"
pytestmark = pytest.mark.skipif(not FAKE.exists(), reason="fake API server not present")


def _fake_module() -> Any:
    spec = importlib.util.spec_from_file_location("kdns_fake_apiserver", FAKE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def kubeconfig(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    fake = _fake_module().FakeApiServer().start()
    by_resource: dict[str, list[dict[str, Any]]] = {"services": [], "endpointslices": [], "nodes": []}
    names = {"Service": "services", "EndpointSlice": "endpointslices", "Node": "nodes"}
    for f in sorted(MANIFESTS.iterdir()):
        for kind, obj in parse_documents(f.read_text(), f.name):
            by_resource[names[kind]].append(obj)
    for res, objs in by_resource.items():
        fake.load(res, objs)
    path = tmp_path / "kubeconfig"
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{fake.url}"}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: u}}}}]
current-context: fake
""")
    try:
        yield str(path), fake
    finally:
        fake.stop()


def test_export_from_kubeconfig(kubeconfig: tuple[str, Any]) -> None:
    path, _ = kubeconfig
    out = subprocess.run([sys.executable, "-m", "kproxy", "dns", "export", "--kubeconfig", path],
                         capture_output=True, text=True, timeout=90, check=True).stdout
    assert "web.default.svc.cluster.local. 5 IN A 10.96.0.20" in out
    assert "_pg._tcp.db.data.svc.cluster.local. 5 IN SRV 0 50 5432 db-0.db.data.svc.cluster.local." in out
    # all Nodes are watched (not just one node's, as the proxy daemon does): the nodeport extension
    assert "node-a.node.cluster.local. 5 IN A 192.168.50.1" in out
    assert "node-b.node.cluster.local. 5 IN A 192.168.50.2" in out
    assert "_http._tcp.np.default.nodeport.cluster.local. 5 IN SRV 0 50 30080 node-b.node.cluster.local." in out


def test_serve_from_kubeconfig_follows_watch(kubeconfig: tuple[str, Any], tmp_path: Path) -> None:
    path, fake = kubeconfig
    port = free_port()
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kproxy", "dns", "--kubeconfig", path,
                                 "--listen", f"127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        def ask(name: str) -> dns.message.Message | None:
            try:
                return dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=1)
            except (dns.exception.Timeout, OSError):
                return None

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = ask("web.default.svc.cluster.local")
            if r is not None and r.answer:
                break
            time.sleep(0.1)
        else:
            raise AssertionError((tmp_path / "log").read_text())
        fake.upsert("services", {"metadata": {"name": "watched", "namespace": "default"},
                                 "spec": {"clusterIP": "10.96.7.7", "ports": [{"port": 80}]}})
        t0 = time.monotonic()
        while True:
            r = ask("watched.default.svc.cluster.local")
            if r is not None and r.answer:
                break
            assert time.monotonic() - t0 < 1.0, "watch event not served within 1 s"
            time.sleep(0.02)
        assert {rd.to_text() for rrset in r.answer for rd in rrset} == {"10.96.7.7"}
        fake.delete("services", "watched", "default")
        t0 = time.monotonic()
        while (r := ask("watched.default.svc.cluster.local")) is None or r.rcode() != dns.rcode.NXDOMAIN:
            assert time.monotonic() - t0 < 1.0
            time.sleep(0.02)
    finally:
        proc.terminate()
        proc.wait(10)
