"""Socket-level load balancing through the real daemon: ClusterIP reached from a client in the cgroup."""

from __future__ import annotations

import os

import pytest

from kproxy.testing.topology import NODE_EXT_IP

from .conftest import client, requires_bpf, wait_until, web_docs, write_manifests

pytestmark = [pytest.mark.netns, requires_bpf]


@pytest.fixture
def daemon(topo, bpf_env, tmp_path):
    mdir = str(tmp_path / "manifests")
    os.mkdir(mdir)
    write_manifests(mdir, "web.yaml", web_docs(topo))
    p = topo.start_daemon(mdir, "ebpf", *bpf_env.flags())
    try:
        topo.wait_healthy(timeout=60)
        yield mdir, p
    finally:
        if p.poll() is None:
            topo.stop_daemon(p)
        # the attachments outlive the daemon: the bpf_env fixture detaches them


def test_clusterip_tcp_and_udp_see_the_vip(topo, bpf_env, daemon):
    pods = set(topo.pod)
    r = client(bpf_env, topo.client, "http", "10.96.0.10", 80, "-n", 30)
    assert r["errors"] == 0, r
    assert set(r["counts"]) == pods  # spread over every backend
    assert dict(r["peers"]) == {"10.96.0.10:80": 30}  # getpeername shows the VIP, not the pod
    u = client(bpf_env, topo.client, "udp", "10.96.0.10", 53, "-n", 20)
    assert u["errors"] == 0, u
    assert set(u["counts"]) <= pods and len(u["counts"]) >= 2
    assert dict(u["peers"]) == {"recvfrom 10.96.0.10:53": 20}
    c = client(bpf_env, topo.client, "udp-connected", "10.96.0.10", 53, "-n", 10)
    assert c["errors"] == 0, c
    assert dict(c["peers"]) == {"getpeername 10.96.0.10:53": 10, "recvfrom 10.96.0.10:53": 10}


def test_clusterip_ipv6(topo, bpf_env, daemon):
    r = client(bpf_env, topo.client, "http", "fd00:10:96::10", 80, "-n", 20)
    assert r["errors"] == 0, r
    assert len(r["counts"]) >= 2
    assert dict(r["peers"]) == {"fd00:10:96::10:80": 20}
    u = client(bpf_env, topo.client, "udp", "fd00:10:96::10", 53, "-n", 10)
    assert u["errors"] == 0 and dict(u["peers"]) == {"recvfrom fd00:10:96::10:53": 10}, u


def test_process_outside_the_cgroup_is_not_balanced(topo, bpf_env, daemon):
    # same namespace, not in the cgroup: the VIP is not handled (no route to 10.96/16 from the client pod
    # except the default via the node, where nothing answers)
    p = topo.exec(topo.client, ["python3", "-c", "import socket; s=socket.socket(); s.settimeout(1); "
                                "print(s.connect_ex(('10.96.0.10', 80)))"], check=False)
    assert p.stdout.strip() not in ("0", ""), p


def test_pod_reaches_itself_through_the_vip(topo, bpf_env, daemon):
    # hairpin needs no bridge trick: connect() is rewritten to the pod's own address
    r = client(bpf_env, topo.pod["pod0"].ns, "http", "10.96.0.10", 80, "-n", 30)
    assert r["errors"] == 0 and "pod0" in r["counts"] and len(r["counts"]) == 3, r


def test_external_ip_from_pods_and_from_outside(topo, bpf_env, daemon):
    mdir, _ = daemon
    docs = web_docs(topo, externalIPs=["192.0.2.50"])
    write_manifests(mdir, "web.yaml", docs)
    topo.exec(topo.ext, ["ip", "route", "add", "192.0.2.50/32", "via", NODE_EXT_IP])

    def ok():
        r = client(bpf_env, topo.client, "http", "192.0.2.50", 80, "-n", 12)
        return r if r["errors"] == 0 else None

    r = wait_until(ok, timeout=15, what="externalIP programmed")
    assert len(r["counts"]) >= 2 and dict(r["peers"]) == {"192.0.2.50:80": 12}
    e = topo.probe(topo.ext, "http", "192.0.2.50", 80, "-n", 12)
    assert e["errors"] == 0 and len(e["counts"]) >= 2, e
