"""Record sets follow manifest changes within about a second, and atomically."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
from kdns_testlib import Server


def _write(path: Path, docs: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
    tmp.rename(path)  # atomic replace: the source never sees half a file


def _headless(name: str, prefix: str, n: int) -> list[dict]:
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "upd"},
         "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": f"{name}-1", "namespace": "upd", "labels": {"kubernetes.io/service-name": name}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
         "endpoints": [{"addresses": [f"{prefix}.{i + 1}"], "hostname": f"{prefix.replace('.', '-')}-{i}"}
                       for i in range(n)]},
    ]


def _wait_for(fn, timeout: float = 5.0) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if fn():
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def _a(server: Server, name: str) -> set[str]:
    r = server.query(name, "A")
    return {rd.to_text() for rrset in r.answer for rd in rrset if rrset.rdtype == dns.rdatatype.A}


def test_add_change_delete_within_a_second(fresh_server: Server) -> None:
    srv = fresh_server
    f = srv.manifests / "upd.json"
    name = "new.upd.svc.cluster.local"
    assert srv.query(name, "A").rcode() == dns.rcode.NXDOMAIN
    _write(f, [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "new", "namespace": "upd"},
                "spec": {"clusterIP": "10.96.5.5", "ports": [{"name": "http", "port": 80}]}}])
    took = _wait_for(lambda: _a(srv, name) == {"10.96.5.5"})
    assert took < 1.0, f"add took {took:.2f}s"
    _write(f, [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "new", "namespace": "upd"},
                "spec": {"clusterIP": "10.96.5.6", "ports": [{"name": "http", "port": 80}]}}])
    took = _wait_for(lambda: _a(srv, name) == {"10.96.5.6"})
    assert took < 1.0, f"change took {took:.2f}s"
    f.unlink()
    took = _wait_for(lambda: srv.query(name, "A").rcode() == dns.rcode.NXDOMAIN)
    assert took < 1.0, f"delete took {took:.2f}s"
    # the reverse record went with it
    assert srv.query("6.5.96.10.in-addr.arpa", "PTR").rcode() == dns.rcode.REFUSED


def test_endpoint_readiness_change(fresh_server: Server) -> None:
    srv = fresh_server
    f = srv.manifests / "statefulset.yaml"
    text = f.read_text()
    old, new = "hostname: db-2\n  conditions: {ready: false}", "hostname: db-2\n  conditions: {ready: true}"
    assert old in text
    f.write_text(text.replace(old, new))
    _wait_for(lambda: _a(srv, "db.data.svc.cluster.local") == {"10.244.1.10", "10.244.2.11", "10.244.3.12"})
    assert _a(srv, "db-2.db.data.svc.cluster.local") == {"10.244.3.12"}


def test_updates_are_atomic(fresh_server: Server) -> None:
    """Flip a headless Service between two endpoint sets while querying SRV (answer + additional): every
    response is entirely the old or entirely the new set."""
    srv = fresh_server
    f = srv.manifests / "flip.json"
    sets = {"10.50.1": None, "10.50.2": None}
    _write(f, _headless("flip", "10.50.1", 20))
    _wait_for(lambda: len(_a(srv, "flip.upd.svc.cluster.local")) == 20)
    stop = threading.Event()
    seen: list[tuple[frozenset[str], frozenset[str]]] = []

    def query_loop() -> None:
        q = dns.message.make_query("_http._tcp.flip.upd.svc.cluster.local", "SRV")
        while not stop.is_set():
            r = dns.query.tcp(q, srv.host, port=srv.port, timeout=3)
            targets = frozenset(rd.target.to_text().split(".")[0] for rrset in r.answer for rd in rrset)
            addrs = frozenset(rd.to_text() for rrset in r.additional for rd in rrset)
            seen.append((targets, addrs))

    t = threading.Thread(target=query_loop)
    t.start()
    try:
        for i in range(6):
            prefix = list(sets)[i % 2 == 0]
            _write(f, _headless("flip", prefix, 20))
            time.sleep(0.35)
    finally:
        stop.set()
        t.join()
    assert len(seen) > 20
    kinds = set()
    for targets, addrs in seen:
        assert len(targets) == 20 and len(addrs) == 20
        prefixes = {a.rsplit(".", 1)[0] for a in addrs}
        assert len(prefixes) == 1, "additional section mixes two versions"
        (p,) = prefixes
        assert {x.rsplit("-", 1)[0] for x in targets} == {p.replace(".", "-")}, "answer and additional disagree"
        kinds.add(p)
    assert kinds == set(sets), "the flip was not observed"
