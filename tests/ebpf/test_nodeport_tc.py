"""NodePort (and ClusterIP) from an external host through the tc program on the node's ext0.

Checksum offload is off on the external host and the pods, so every TCP/UDP checksum is computed and
verified in software: a DNAT with a wrong L3/L4 checksum would be dropped (and counted in InCsumErrors)
instead of being trusted on the veth.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from kproxy.testing.topology import EXT_IP, GATEWAY, NODE_EXT_IP, NODE_EXT_IP6

from .conftest import (
    CLIENT,
    HERE,
    WEB_EP_PORTS,
    endpoint_slice,
    requires_bpf,
    service,
    wait_until,
    web_docs,
    write_manifests,
)

pytestmark = [pytest.mark.netns, requires_bpf]


def csum_errors(topo, ns: str) -> int:
    text = topo.exec(ns, ["cat", "/proc/net/snmp", "/proc/net/snmp6"]).stdout
    total = 0
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(("Tcp:", "Udp:")) and i + 1 < len(lines) and "InCsumErrors" in line:
            names, values = line.split(), lines[i + 1].split()
            total += int(values[names.index("InCsumErrors")])
        elif line.startswith(("Udp6InCsumErrors", "Tcp6InCsumErrors")):
            total += int(line.split()[1])
    return total


def ext_client(topo, *args) -> dict:
    p = topo.exec(topo.ext, [sys.executable, CLIENT, *map(str, args)], timeout=60)
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture
def nodeport(topo, bpf_env, tmp_path):
    for ns in (topo.ext, *(p.ns for p in topo.pod.values())):
        topo.exec(ns, [sys.executable, os.path.join(HERE, "csum_offload.py"), "eth0"])
    mdir = str(tmp_path / "manifests")
    os.mkdir(mdir)
    write_manifests(mdir, "web.yaml", web_docs(topo))
    p = topo.start_daemon(mdir, "ebpf", *bpf_env.flags("ext0"))
    try:
        topo.wait_healthy(timeout=60)
        yield mdir
    finally:
        if p.poll() is None:
            topo.stop_daemon(p)


def test_nodeport_tcp_udp_from_outside(topo, bpf_env, nodeport):
    namespaces = (topo.ext, *(p.ns for p in topo.pod.values()))
    before = {ns: csum_errors(topo, ns) for ns in namespaces}
    r = topo.probe(topo.ext, "http", NODE_EXT_IP, 30080, "-n", 30)
    assert r["errors"] == 0, r
    assert set(r["counts"]) == set(topo.pod)
    assert dict(r["peers"]) == {GATEWAY: 30}  # externalTrafficPolicy Cluster: masqueraded to the node
    u = ext_client(topo, "udp", NODE_EXT_IP, 30053, "-n", 10)
    assert u["errors"] == 0, u
    assert dict(u["peers"]) == {f"recvfrom {NODE_EXT_IP}:30053": 10}  # replies reverse-translated
    # a long-lived connection with payload in both directions
    h = ext_client(topo, "hold", NODE_EXT_IP, 30900, 1.0)
    assert h["fail"] == 0 and h["ok"] >= 10, h
    # the ClusterIP reached from outside (the external host routes the service range via the node)
    r = topo.probe(topo.ext, "http", "10.96.0.10", 80, "-n", 6)
    assert r["errors"] == 0, r
    after = {ns: csum_errors(topo, ns) for ns in namespaces}
    assert after == before, "checksum errors counted: the DNAT broke a checksum"


def test_nodeport_ipv6_from_outside(topo, bpf_env, nodeport):
    r = topo.probe(topo.ext, "http", NODE_EXT_IP6, 30080, "-n", 20)
    assert r["errors"] == 0, r
    assert len(r["counts"]) >= 2
    u = ext_client(topo, "udp", NODE_EXT_IP6, 30053, "-n", 5)
    assert u["errors"] == 0 and dict(u["peers"]) == {f"recvfrom {NODE_EXT_IP6}:30053": 5}, u


def test_external_traffic_policy_local_preserves_source(topo, bpf_env, nodeport):
    ip = {n: topo.pod[n].ip for n in topo.pod}
    write_manifests(nodeport, "local.yaml", [
        service("webl", ["10.96.0.40"], [("http", "TCP", 80, 8080, 30180)], externalTrafficPolicy="Local"),
        endpoint_slice("webl", 4, WEB_EP_PORTS, [{"ip": ip["pod0"]}, {"ip": ip["pod1"], "node": "node-b"}]),
    ])

    def probe():
        r = topo.probe(topo.ext, "http", NODE_EXT_IP, 30180, "-n", 10)
        return r if r["errors"] == 0 else None

    r = wait_until(probe, timeout=15, what="webl NodePort answering")
    assert dict(r["counts"]) == {"pod0": 10}  # only the local endpoint
    assert dict(r["peers"]) == {EXT_IP: 10}  # the client's address is preserved


def test_load_balancer_source_ranges(topo, bpf_env, nodeport):
    ip = {n: topo.pod[n].ip for n in topo.pod}
    topo.exec(topo.ext, ["ip", "route", "add", "192.0.2.60/32", "via", NODE_EXT_IP])

    def docs(ranges):
        svc = service("lbsr", ["10.96.0.41"], [("http", "TCP", 80, 8080, 30181)], type="LoadBalancer",
                      loadBalancerSourceRanges=ranges)
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": "192.0.2.60"}]}}
        return [svc, endpoint_slice("lbsr", 4, WEB_EP_PORTS, [{"ip": ip["pod0"]}, {"ip": ip["pod1"]}])]

    write_manifests(nodeport, "lbsr.yaml", docs([f"{EXT_IP}/32"]))

    def probe():
        r = topo.probe(topo.ext, "http", "192.0.2.60", 80, "-n", 10)
        return r if r["errors"] == 0 else None

    r = wait_until(probe, timeout=15, what="LB IP answering for an allowed source")
    assert set(r["counts"]) <= {"pod0", "pod1"}
    write_manifests(nodeport, "lbsr.yaml", docs(["192.0.2.0/24"]))
    wait_until(lambda: not topo.probe(topo.ext, "tcp-check", "192.0.2.60", 80, "--timeout", 1)["ok"],
               timeout=15, what="source outside loadBalancerSourceRanges dropped")
    assert topo.probe(topo.ext, "tcp-check", "192.0.2.60", 80, "--timeout", 1)["error"] == "timeout"
