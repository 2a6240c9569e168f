"""externalTrafficPolicy / internalTrafficPolicy Local, healthCheckNodePort, terminating-endpoint fallback.

"Remote" endpoints are the same pods listed with ``nodeName: node-b`` in the slice: the packets can still
reach them (same bridge), so any traffic that lands on one proves the policy was not applied.
"""

from __future__ import annotations

import json

import pytest

from kproxy.testing.topology import CLIENT_IP, EXT_IP, GATEWAY, HTTP_PORT, NODE_EXT_IP

from . import manifests as m
from .harness import NODE_B, Scenario, assert_fair

pytestmark = [pytest.mark.netns]


def eps(sc: Scenario, local: list[str], remote: list[str]) -> list[dict]:
    return [m.endpoint(sc.ip(p)) for p in local] + [m.endpoint(sc.ip(p), node=NODE_B) for p in remote]


def health(sc: Scenario, port: int) -> tuple[int, dict]:
    """GET the healthCheckNodePort from the external host: (status, parsed JSON body)."""
    p = sc.topo.exec(sc.topo.ext, ["curl", "-s", "--max-time", "3", "-w", "\n%{http_code}",
                                   f"http://{NODE_EXT_IP}:{port}/"], check=False, timeout=10)
    body, _, code = p.stdout.rpartition("\n")
    try:
        doc = json.loads(body) if body.strip() else {}
    except json.JSONDecodeError:
        doc = {"unparsable": body}
    return int(code or 0), doc


@pytest.mark.feature("etp_local", "nodeport")
def test_external_traffic_policy_local(sc: Scenario) -> None:
    vip, np, hc = sc.vip(), sc.node_port(), sc.node_port()
    local, remote = ["pod0", "pod1"], ["pod2"]

    def svc(policy: str) -> dict:
        return m.service("etp", vip, [m.port(80, HTTP_PORT, name="p", node_port=np)],
                         external_traffic_policy=policy, health_check_node_port=hc if policy == "Local" else None)

    sl = m.endpoint_slice("etp", eps(sc, local, remote), [m.slice_port(HTTP_PORT, name="p")])
    sc.apply("etp", svc("Local"), sl)
    p = sc.http(sc.topo.ext, NODE_EXT_IP, np, n=200)
    assert_fair(p, local, 200)  # never the node-b endpoint
    assert set(p.peers) == {EXT_IP}, f"policy Local must preserve the client source address: {p}"
    # ClusterIP traffic is not affected by the external policy
    pc = sc.http(sc.topo.client, vip, 80, n=150)
    assert_fair(pc, sc.pods, 150)

    # Cluster policy: every endpoint, source masqueraded to the node's address on the pod network
    sc.apply("etp", svc("Cluster"), sl)
    p = sc.http(sc.topo.ext, NODE_EXT_IP, np, n=150)
    assert_fair(p, sc.pods, 150)
    assert set(p.peers) == {GATEWAY}, f"policy Cluster must masquerade external traffic: {p}"


@pytest.mark.feature("etp_local", "nodeport")
def test_external_traffic_policy_local_without_local_endpoints(sc: Scenario) -> None:
    vip, np = sc.vip(), sc.node_port()
    sc.apply("etp0", m.service("etp0", vip, [m.port(80, HTTP_PORT, name="p", node_port=np)],
                               external_traffic_policy="Local", health_check_node_port=sc.node_port()),
             m.endpoint_slice("etp0", eps(sc, [], sc.pods), [m.slice_port(HTTP_PORT, name="p")]))
    verdict, _ = sc.tcp_check(sc.topo.ext, NODE_EXT_IP, np, timeout=1.5)
    assert verdict == "timeout", f"NodePort with policy Local and no local endpoints must DROP, got {verdict}"
    # kube-proxy semantics: pods and the node itself reaching the NodePort are not subject to the policy
    p = sc.http(sc.topo.client, GATEWAY, np, n=30)
    assert p.ok == 30 and p.backends <= set(sc.pods) and set(p.peers) == {CLIENT_IP}, \
        f"pod → NodePort (policy Local) is short-circuited to all endpoints: {p}"
    p = sc.http(sc.topo.node, NODE_EXT_IP, np, n=10)
    assert p.ok == 10, f"node → own NodePort (policy Local) uses all endpoints: {p}"


@pytest.mark.feature("etp_local", "health_check_node_port")
def test_health_check_node_port(sc: Scenario) -> None:
    vip, np, hc = sc.vip(), sc.node_port(), sc.node_port()

    def apply(local: list[str], remote: list[str]) -> None:
        sc.apply("hc", m.service("hc", vip, [m.port(80, HTTP_PORT, name="p", node_port=np)],
                                 external_traffic_policy="Local", health_check_node_port=hc),
                 m.endpoint_slice("hc", eps(sc, local, remote), [m.slice_port(HTTP_PORT, name="p")]))

    apply(["pod0", "pod1"], ["pod2"])
    _, doc = sc.eventually(lambda: health(sc, hc), lambda r: r[0] == 200, timeout=5,
                              what="healthCheckNodePort answering 200")
    assert doc.get("service") == {"namespace": "default", "name": "hc"}, doc
    assert doc.get("localEndpoints") == 2, doc
    assert doc.get("serviceProxyHealthy") is True, doc

    apply([], sc.pods)
    _, doc = sc.eventually(lambda: health(sc, hc), lambda r: r[0] == 503, timeout=5,
                              what="healthCheckNodePort answering 503 without local endpoints")
    assert doc.get("localEndpoints") == 0, doc

    # the Service goes away: the health check port closes
    sc.delete("hc")
    sc.eventually(lambda: health(sc, hc), lambda r: r[0] == 0, timeout=5,
                            what="healthCheckNodePort closed after the Service was deleted")


@pytest.mark.feature("itp_local")
def test_internal_traffic_policy_local(sc: Scenario) -> None:
    vip = sc.vip()

    def apply(local: list[str], remote: list[str]) -> None:
        sc.apply("itp", m.service("itp", vip, [m.port(80, HTTP_PORT, name="p")], internal_traffic_policy="Local"),
                 m.endpoint_slice("itp", eps(sc, local, remote), [m.slice_port(HTTP_PORT, name="p")]))

    apply(["pod0"], ["pod1", "pod2"])
    p = sc.http(sc.topo.client, vip, 80, n=60)
    assert p.counts == {"pod0": 60}, f"internalTrafficPolicy Local must only use node-a's endpoint: {p}"
    assert set(p.peers) == {CLIENT_IP}, str(p)

    apply([], sc.pods)
    verdict, _ = sc.tcp_check(sc.topo.client, vip, 80, timeout=1.5)
    assert verdict == "timeout", f"no local endpoints with internalTrafficPolicy Local must DROP, got {verdict}"


@pytest.mark.feature("terminating_fallback")
def test_terminating_endpoint_fallback(sc: Scenario) -> None:
    vip = sc.vip()

    def apply(endpoints: list[dict]) -> None:
        sc.apply("term", m.service("term", vip, [m.port(80, HTTP_PORT, name="p")]),
                 m.endpoint_slice("term", endpoints, [m.slice_port(HTTP_PORT, name="p")]))

    # every endpoint terminating but still serving: kube-proxy keeps sending new connections to them
    apply([m.terminating(sc.ip(p)) for p in sc.pods])
    p = sc.http(sc.topo.client, vip, 80, n=150)
    assert_fair(p, sc.pods, 150)

    # a ready endpoint appears: only it receives new connections
    apply([m.terminating(sc.ip("pod0")), m.terminating(sc.ip("pod1")), m.endpoint(sc.ip("pod2"))])
    p = sc.http(sc.topo.client, vip, 80, n=60)
    assert p.counts == {"pod2": 60}, f"ready endpoints must win over terminating ones: {p}"

    # terminating and no longer serving: unusable → the Service has no endpoints → REJECT
    apply([m.terminating(sc.ip(p), serving=False) for p in sc.pods])
    verdict, _ = sc.tcp_check(sc.topo.client, vip, 80, timeout=2)
    assert verdict == "refused", f"terminating, non-serving endpoints must not be used: {verdict}"

    # not ready and not terminating (starting up): not used either
    apply([m.endpoint(sc.ip("pod0"), ready=False), m.endpoint(sc.ip("pod1"))])
    p = sc.http(sc.topo.client, vip, 80, n=30)
    assert p.counts == {"pod1": 30}, str(p)


@pytest.mark.feature("etp_local", "terminating_fallback", "nodeport")
def test_external_local_terminating_fallback(sc: Scenario) -> None:
    """Policy Local with only terminating local endpoints: they still serve external traffic."""
    vip, np = sc.vip(), sc.node_port()
    sc.apply("etpt", m.service("etpt", vip, [m.port(80, HTTP_PORT, name="p", node_port=np)],
                               external_traffic_policy="Local", health_check_node_port=sc.node_port()),
             m.endpoint_slice("etpt", [m.terminating(sc.ip("pod0")), m.endpoint(sc.ip("pod1"), node=NODE_B)],
                              [m.slice_port(HTTP_PORT, name="p")]))
    p = sc.http(sc.topo.ext, NODE_EXT_IP, np, n=30)
    assert p.counts == {"pod0": 30}, f"the local terminating endpoint must keep serving external traffic: {p}"


@pytest.mark.feature("topology_hints")
def test_topology_aware_hints(sc: Scenario) -> None:
    """Endpoints hinted for this node's zone are preferred; without usable hints every endpoint is used."""
    vip = sc.vip()
    sc.apply("node", m.node("node-a", zone="zone-a", addresses=[NODE_EXT_IP]), wait=False)
    hinted = [m.endpoint(sc.ip("pod0"), zone="zone-a", hints=["zone-a"]),
              m.endpoint(sc.ip("pod1"), zone="zone-b", hints=["zone-b"]),
              m.endpoint(sc.ip("pod2"), zone="zone-b", hints=["zone-b"])]
    sc.apply("topo", m.service("topo", vip, [m.port(80, HTTP_PORT, name="p")]),
             m.endpoint_slice("topo", hinted, [m.slice_port(HTTP_PORT, name="p")]))
    p = sc.http(sc.topo.client, vip, 80, n=60)
    assert p.counts == {"pod0": 60}, f"only the endpoint hinted for zone-a should be used: {p}"

    # one ready endpoint without hints: kube-proxy ignores hints altogether
    hinted[2] = m.endpoint(sc.ip("pod2"), zone="zone-b")
    sc.apply("topo", m.service("topo", vip, [m.port(80, HTTP_PORT, name="p")]),
             m.endpoint_slice("topo", hinted, [m.slice_port(HTTP_PORT, name="p")]))
    p = sc.http(sc.topo.client, vip, 80, n=150)
    assert_fair(p, sc.pods, 150)
