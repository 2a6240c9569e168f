"""Proxy and service health servers over real HTTP on 127.0.0.1 (kube-proxy's status codes and JSON)."""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import subprocess
import time

import pytest

from kproxy.config import ProxyConfig
from kproxy.healthz import (
    HttpLoop,
    ProxyHealthServer,
    ServiceHealthServer,
    go_time,
    health_check_targets,
    node_eligible,
    node_ips_for,
)
from kproxy.metrics import ProxyMetrics
from kproxy.snapshot import ProxySnapshot
from kproxy.store import ClusterStore, Event

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self, t: float = 1_700_000_000.5) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused(port: int) -> bool:
    try:
        get(port, "/")
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def loop():
    lp = HttpLoop("test-http")
    yield lp
    lp.stop()


@pytest.fixture
def proxy(loop):
    clock = Clock()
    metrics = ProxyMetrics("iptables", process=False)
    srv = ProxyHealthServer("127.0.0.1:0", 60.0, metrics=metrics, clock=clock, loop=loop)
    srv.start()
    yield srv, clock, metrics
    srv.stop()


def test_go_time_format():
    assert go_time(None) == "0001-01-01T00:00:00Z"
    assert go_time(0) == "1970-01-01T00:00:00Z"
    assert go_time(1.5) == "1970-01-01T00:00:01.5Z"
    assert go_time(1_700_000_000.123456) == "2023-11-14T22:13:20.123456Z"


def test_starting_proxy_is_healthy_with_kube_proxy_json(proxy):
    srv, clock, _ = proxy
    status, headers, body = get(srv.port, "/healthz")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["x-content-type-options"] == "nosniff"
    doc = json.loads(body)
    # Go's encoding/json of kube-proxy's ProxyHealth: these keys in this order, no status before a sync.
    assert list(doc) == ["lastUpdated", "currentTime", "nodeEligible", "healthy"]
    assert doc == {"lastUpdated": go_time(clock.t), "currentTime": go_time(clock.t),
                   "nodeEligible": True, "healthy": True}
    assert body == json.dumps(doc, separators=(",", ":")).encode()
    status, _, body = get(srv.port, "/livez")
    assert status == 200
    assert "nodeEligible" not in json.loads(body)


def test_stale_queued_update_flips_to_503_and_back(proxy):
    srv, clock, metrics = proxy
    srv.queued_update()
    srv.updated()
    synced_at = clock.t
    clock.t += 5
    srv.queued_update()
    clock.t += 59  # oldest pending update 59 s old < 60 s timeout
    assert get(srv.port, "/healthz")[0] == 200
    srv.queued_update()  # a newer queued update does not reset the oldest one
    clock.t += 2
    status, _, body = get(srv.port, "/healthz")
    assert status == 503
    doc = json.loads(body)
    assert doc["healthy"] is False and doc["nodeEligible"] is True
    assert doc["lastUpdated"] == go_time(synced_at)  # unhealthy answers carry the real last sync
    assert doc["currentTime"] == go_time(clock.t)
    assert doc["status"] == {"IPv4": {"lastUpdated": go_time(synced_at), "healthy": False}}
    assert get(srv.port, "/livez")[0] == 503
    assert not srv.is_healthy()

    srv.updated()
    status, _, body = get(srv.port, "/healthz")
    assert status == 200
    assert json.loads(body)["status"]["IPv4"] == {"lastUpdated": go_time(clock.t), "healthy": True}
    assert get(srv.port, "/livez")[0] == 200

    assert metrics.proxy_healthz_total.labels(code="200")._value.get() == 2
    assert metrics.proxy_healthz_total.labels(code="503")._value.get() == 1
    assert metrics.proxy_livez_total.labels(code="503")._value.get() == 1
    assert metrics.proxy_livez_total.labels(code="200")._value.get() == 1


def test_never_synced_proxy_turns_unhealthy_after_timeout(proxy):
    srv, clock, _ = proxy
    srv.queued_update("IPv4")
    clock.t += 30
    assert get(srv.port, "/livez")[0] == 200
    clock.t += 31
    status, _, body = get(srv.port, "/livez")
    assert status == 503
    assert json.loads(body)["lastUpdated"] == "0001-01-01T00:00:00Z"


def test_dual_stack_one_stale_family_is_unhealthy(proxy):
    srv, clock, _ = proxy
    srv.updated(4)
    srv.updated(6)
    srv.queued_update(6)
    clock.t += 61
    status, _, body = get(srv.port, "/healthz")
    assert status == 503
    st = json.loads(body)["status"]
    assert st["IPv4"]["healthy"] is True and st["IPv6"]["healthy"] is False


def test_node_not_eligible_fails_healthz_only(proxy):
    srv, _, _ = proxy
    srv.updated()
    srv.set_node_eligible(False)
    status, _, body = get(srv.port, "/healthz")
    doc = json.loads(body)
    assert status == 503 and doc["nodeEligible"] is False and doc["healthy"] is True
    assert get(srv.port, "/livez")[0] == 200
    srv.set_node_eligible(True)
    assert get(srv.port, "/healthz")[0] == 200


def test_node_eligibility_from_node_object(proxy):
    srv, _, _ = proxy
    node = {"metadata": {"name": "n1"}, "spec": {"taints": [{"key": "other", "effect": "NoSchedule"}]}}
    assert node_eligible(node) and srv.sync_node(node)
    tainted = {"metadata": {"name": "n1"},
               "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}}
    assert srv.sync_node(tainted) is False
    assert get(srv.port, "/healthz")[0] == 503
    deleting = {"metadata": {"name": "n1", "deletionTimestamp": "2024-01-01T00:00:00Z"}}
    assert node_eligible(deleting) is False
    assert srv.sync_node(node) is True
    assert get(srv.port, "/healthz")[0] == 200


def test_unknown_path_and_head(proxy):
    srv, _, _ = proxy
    status, _, body = get(srv.port, "/metrics")
    assert status == 404 and body == b"404 page not found\n"
    status, headers, body = get(srv.port, "/healthz", "HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


def test_stop_closes_the_port(loop):
    srv = ProxyHealthServer("127.0.0.1:0", 1.0, loop=loop)
    srv.start()
    port = srv.port
    assert get(port, "/livez")[0] == 200
    srv.stop()
    assert refused(port)


def test_from_config_timeout_and_disabled():
    cfg = ProxyConfig(sync_period=15.0, healthz_bind_address="127.0.0.1:10256")
    srv = ProxyHealthServer.from_config(cfg)
    assert srv is not None and srv.health_timeout == 30.0 and srv.port == 10256
    assert ProxyHealthServer.from_config(ProxyConfig(healthz_bind_address="")) is None
    assert ProxyHealthServer.from_config(ProxyConfig(healthz_bind_address="0.0.0.0:0")) is None


def test_bind_conflict_raises(loop):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        srv = ProxyHealthServer(f"127.0.0.1:{s.getsockname()[1]}", 1.0, loop=loop)
        with pytest.raises(OSError):
            srv.start()


# ---- service health ----------------------------------------------------------------------------------

def test_service_health_server_ports_and_counts(loop, proxy):
    health, clock, _ = proxy
    svc = ServiceHealthServer(health, ["127.0.0.1"], loop=loop)
    a, b, c = free_port(), free_port(), free_port()
    try:
        svc.sync_services({("default", "web"): a, ("kube-system", "dns"): b})
        assert svc.serving() == {("default", "web"): a, ("kube-system", "dns"): b}

        status, headers, body = get(a, "/")
        assert status == 503
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-load-balancing-endpoint-weight"] == "0"
        assert json.loads(body) == {"service": {"namespace": "default", "name": "web"},
                                    "localEndpoints": 0, "serviceProxyHealthy": True}
        # kube-proxy's exact bytes (a dedented Go template with tabs).
        assert body.startswith(b'{\n\t"service": {\n\t\t"namespace": "default",\n')

        svc.sync_endpoints({("default", "web"): 2, ("other", "x"): 5})
        status, headers, body = get(a, "/any/path")
        assert status == 200 and headers["x-load-balancing-endpoint-weight"] == "2"
        assert json.loads(body)["localEndpoints"] == 2
        assert get(b, "/")[0] == 503

        # The proxy itself unhealthy: every check fails, body says so.
        health.queued_update()
        clock.t += 120
        status, _, body = get(a, "/")
        assert status == 503 and json.loads(body)["serviceProxyHealthy"] is False
        health.updated()
        assert get(a, "/")[0] == 200

        # Port change: the old port closes, the new one opens; a removed service closes.
        svc.sync_services({("default", "web"): c})
        assert refused(a) and refused(b)
        assert get(c, "/")[0] == 503  # a re-opened check starts at 0 endpoints until sync_endpoints
        svc.sync_endpoints({("default", "web"): 1})
        assert get(c, "/")[0] == 200
        svc.sync_endpoints({})
        assert get(c, "/")[0] == 503
    finally:
        svc.stop()
    assert refused(c)


def test_service_health_port_in_use_is_skipped_and_retried(loop):
    errors = []
    svc = ServiceHealthServer(None, ["127.0.0.1"], loop=loop, on_error=lambda n, p, e: errors.append((n, p)))
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    ok = free_port()
    try:
        want = {("default", "taken"): taken, ("default", "ok"): ok}
        svc.sync_services(want)
        assert svc.serving() == {("default", "ok"): ok}
        assert errors == [(("default", "taken"), taken)]
        svc.sync_endpoints({("default", "ok"): 1})
        assert get(ok, "/")[0] == 200
        blocker.close()
        svc.sync_services(want)  # retried on the next sync once the port is free
        assert svc.serving() == want
        assert get(taken, "/")[0] == 503
        assert get(ok, "/")[0] == 200  # untouched listener kept its count
    finally:
        blocker.close()
        svc.stop()


def _service(name, hc_port, policy="Local"):
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                     "externalTrafficPolicy": policy, "healthCheckNodePort": hc_port,
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080},
                               {"name": "https", "port": 443, "protocol": "TCP", "nodePort": 30443}]}}


def _slice(svc, endpoints):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{svc}-abc", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "https", "port": 8443, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "nodeName": node,
                           "conditions": {"ready": ready, "serving": True, "terminating": not ready}}
                          for ip, node, ready in endpoints]}


def test_health_check_targets_from_snapshot():
    store = ClusterStore(node_name="node-a")
    snap = ProxySnapshot(store)
    store.apply([
        Event("ADDED", "Service", _service("web", 31000)),
        Event("ADDED", "Service", _service("cluster-policy", 0, policy="Cluster")),
        Event("ADDED", "EndpointSlice", _slice("web", [
            ("10.244.1.10", "node-a", True),   # local ready: counted once although it backs two ports
            ("10.244.1.11", "node-a", False),  # local but terminating: not counted (LB must drain)
            ("10.244.2.10", "node-b", True),   # remote
        ])),
        Event("ADDED", "EndpointSlice", _slice("cluster-policy", [("10.244.1.12", "node-a", True)])),
    ])
    snap.update()
    services, endpoints = health_check_targets(snap)
    assert services == {("default", "web"): 31000}
    assert endpoints[("default", "web")] == 1


def test_service_health_with_many_ports_opens_and_closes_quickly(loop):
    svc = ServiceHealthServer(None, ["127.0.0.1"], loop=loop)
    ports = {}
    for i in range(40):
        ports[("ns", f"s{i}")] = free_port()
    try:
        t0 = time.monotonic()
        svc.sync_services(ports)
        assert len(svc.serving()) == len(ports)
        svc.sync_services({})
        assert time.monotonic() - t0 < 10
        assert all(refused(p) for p in list(ports.values())[:5])
    finally:
        svc.stop()


def test_sync_services_while_checks_are_being_answered(loop):
    """Opening/closing listeners must not deadlock with the HTTP thread answering other checks."""
    import threading

    svc = ServiceHealthServer(None, ["127.0.0.1"], loop=loop)
    a, b = free_port(), free_port()
    svc.sync_services({("ns", "a"): a})
    svc.sync_endpoints({("ns", "a"): 1})
    stop = threading.Event()
    answers: list[int] = []

    def hammer() -> None:
        while not stop.is_set():
            answers.append(get(a, "/")[0])

    t = threading.Thread(target=hammer)
    t.start()
    try:
        for i in range(30):
            svc.sync_services({("ns", "a"): a, ("ns", "b"): b} if i % 2 == 0 else {("ns", "a"): a})
    finally:
        stop.set()
        t.join(10)
        svc.stop()
    assert not t.is_alive()
    assert answers and set(answers) == {200}


def test_node_ips_for_nodeport_addresses(loop):
    assert node_ips_for([]) == [] and node_ips_for(["primary"]) == []  # wildcard
    assert node_ips_for(["127.0.0.0/8"]) == ["127.0.0.1"]
    # Every local address in a CIDR, per iproute2's view of this namespace.
    out = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout
    local = {a["local"] for link in json.loads(out) for a in link.get("addr_info", [])}
    want = sorted(a for a in local if ipaddress.ip_address(a) in ipaddress.ip_network("192.0.0.0/2"))
    assert node_ips_for(["192.0.0.0/2"]) == want
    if "198.51.100.254" not in local:
        assert node_ips_for(["198.51.100.254/32"]) == []  # nothing matches: wildcard (logged)
    svc = ServiceHealthServer(None, node_ips_for(["127.0.0.0/8"]), loop=loop)
    port = free_port()
    try:
        svc.sync_services({("ns", "x"): port})
        assert get(port, "/")[0] == 503
    finally:
        svc.stop()
