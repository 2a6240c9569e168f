"""Endpoint semantics, map updates, daemon restart and --cleanup of the ebpf mode (real daemon)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kproxy.config import ProxyConfig
from kproxy.dataplane.ebpf import EbpfDataPlane, loader
from kproxy.testing.topology import NODE_EXT_IP

from .conftest import (
    CLIENT,
    WEB_EP_PORTS,
    client,
    endpoint_slice,
    in_cgroup,
    requires_bpf,
    service,
    wait_until,
    web_docs,
    write_manifests,
)

pytestmark = [pytest.mark.netns, requires_bpf]


def backends_of(env, name_prefix: str) -> set[str]:
    dp = EbpfDataPlane(ProxyConfig(bpf_pin_path=env.pin))
    return {b.address for s in dp.status() if s.name.startswith(name_prefix) and s.family == 4 for b in s.backends}


@pytest.fixture
def running(topo, bpf_env, tmp_path):
    mdir = str(tmp_path / "manifests")
    os.mkdir(mdir)
    write_manifests(mdir, "web.yaml", web_docs(topo))
    state = {"p": topo.start_daemon(mdir, "ebpf", *bpf_env.flags())}
    try:
        topo.wait_healthy(timeout=60)
        yield mdir, state
    finally:
        if state["p"] is not None and state["p"].poll() is None:
            topo.stop_daemon(state["p"])


def test_session_affinity_socket_and_nodeport(topo, bpf_env, running):
    mdir, _ = running
    pods = sorted(topo.pod)
    write_manifests(mdir, "aff.yaml", [
        service("aff", ["10.96.0.20"], [("http", "TCP", 80, 8080, 30081)], sessionAffinity="ClientIP",
                sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}}),
        endpoint_slice("aff", 4, WEB_EP_PORTS, [{"ip": topo.pod[n].ip} for n in pods]),
    ])
    wait_until(lambda: len(backends_of(bpf_env, "default/aff:")) == 3, what="aff programmed")
    r = client(bpf_env, topo.client, "http", "10.96.0.20", 80, "-n", 20)
    assert r["errors"] == 0 and len(r["counts"]) == 1, r  # every connection to the same pod
    r2 = topo.probe(topo.ext, "http", NODE_EXT_IP, 30081, "-n", 15)
    assert r2["errors"] == 0 and len(r2["counts"]) == 1, r2
    # control: without affinity the same client spreads
    r3 = client(bpf_env, topo.client, "http", "10.96.0.10", 80, "-n", 20)
    assert len(r3["counts"]) >= 2, r3


def test_removed_backend_gets_no_new_connections(topo, bpf_env, running):
    mdir, _ = running
    write_manifests(mdir, "web.yaml", web_docs(topo, pods=["pod1", "pod2"]))
    wait_until(lambda: backends_of(bpf_env, "default/web:http") == {f"{topo.pod[n].ip}:8080" for n in ("pod1", "pod2")},
               what="pod0 removed from the maps")
    r = client(bpf_env, topo.client, "http", "10.96.0.10", 80, "-n", 40)
    assert r["errors"] == 0 and set(r["counts"]) == {"pod1", "pod2"}, r
    u = client(bpf_env, topo.client, "udp", "10.96.0.10", 53, "-n", 20)
    assert u["errors"] == 0 and "pod0" not in u["counts"], u
    e = topo.probe(topo.ext, "http", NODE_EXT_IP, 30080, "-n", 20)
    assert e["errors"] == 0 and set(e["counts"]) <= {"pod1", "pod2"}, e
    # and back
    write_manifests(mdir, "web.yaml", web_docs(topo))
    wait_until(lambda: len(backends_of(bpf_env, "default/web:http")) == 3, what="pod0 back")
    r = client(bpf_env, topo.client, "http", "10.96.0.10", 80, "-n", 40)
    assert set(r["counts"]) == set(topo.pod), r


def test_traffic_policy_terminating_and_no_endpoints(topo, bpf_env, running):
    mdir, _ = running
    ip = {n: topo.pod[n].ip for n in topo.pod}
    write_manifests(mdir, "pol.yaml", [
        # internalTrafficPolicy Local: only pod0 is on this node
        service("local", ["10.96.0.30"], [("http", "TCP", 80, 8080, 0)], internalTrafficPolicy="Local"),
        endpoint_slice("local", 4, WEB_EP_PORTS, [{"ip": ip["pod0"]}, {"ip": ip["pod1"], "node": "node-b"},
                                                  {"ip": ip["pod2"], "node": "node-b"}]),
        service("nolocal", ["10.96.0.33"], [("http", "TCP", 80, 8080, 0)], internalTrafficPolicy="Local"),
        endpoint_slice("nolocal", 4, WEB_EP_PORTS, [{"ip": ip["pod1"], "node": "node-b"}]),
        # no ready endpoint: fall back to the serving terminating one
        service("term", ["10.96.0.31"], [("http", "TCP", 80, 8080, 0)]),
        endpoint_slice("term", 4, WEB_EP_PORTS, [
            {"ip": ip["pod0"], "ready": False, "serving": False, "terminating": True},
            {"ip": ip["pod1"], "ready": False, "serving": True, "terminating": True}]),
        # no endpoints at all: connect fails at once
        service("empty", ["10.96.0.32"], [("http", "TCP", 80, 8080, 0)]),
    ])
    wait_until(lambda: backends_of(bpf_env, "default/term:") == {f"{ip['pod1']}:8080"}, what="policies programmed")
    r = client(bpf_env, topo.client, "http", "10.96.0.30", 80, "-n", 15)
    assert r["errors"] == 0 and dict(r["counts"]) == {"pod0": 15}, r
    r = client(bpf_env, topo.client, "http", "10.96.0.33", 80, "-n", 2)
    # endpoints exist, none on this node: kube-proxy DROPs; the socket LB fails connect() with ETIMEDOUT at once
    assert r["errors"] == 2 and all(e.startswith("TimeoutError") for e in r["error_list"]), r
    r = client(bpf_env, topo.client, "http", "10.96.0.31", 80, "-n", 10)
    assert r["errors"] == 0 and dict(r["counts"]) == {"pod1": 10}, r
    t0 = time.monotonic()
    r = client(bpf_env, topo.client, "http", "10.96.0.32", 80, "-n", 3)
    assert r["errors"] == 3 and time.monotonic() - t0 < 5, r
    # refused at once, like kube-proxy's REJECT (bpf_set_retval; EPERM on kernels before 5.18)
    assert all(e.startswith("ConnectionRefusedError") for e in r["error_list"]), r


@pytest.mark.slow
def test_restart_keeps_connections_and_readopts(topo, bpf_env, running):
    mdir, state = running
    ext_hold = subprocess.Popen(["ip", "netns", "exec", topo.ext, sys.executable, CLIENT, "hold", NODE_EXT_IP,
                                 "30900", "8"], stdout=subprocess.PIPE, text=True)
    in_hold = subprocess.Popen(in_cgroup(bpf_env, topo.client, [sys.executable, CLIENT, "hold", "10.96.0.10",
                                                                 "9000", "8"]), stdout=subprocess.PIPE, text=True)
    try:
        for h in (ext_hold, in_hold):
            assert "connected" in h.stdout.readline()
        time.sleep(1)
        assert topo.stop_daemon(state["p"], sig=signal.SIGKILL) == -signal.SIGKILL
        state["p"] = None
        # daemon down: attachments and pinned maps keep Services working, old and new connections
        r = client(bpf_env, topo.client, "http", "10.96.0.10", 80, "-n", 10)
        assert r["errors"] == 0, r
        e = topo.probe(topo.ext, "http", NODE_EXT_IP, 30080, "-n", 10)
        assert e["errors"] == 0, e
        # change a Service while down, then restart: the new daemon adopts the maps and syncs
        write_manifests(mdir, "web.yaml", web_docs(topo, pods=["pod1", "pod2"]))
        state["p"] = topo.start_daemon(mdir, "ebpf", *bpf_env.flags(), log_name="kproxy2.log")
        topo.wait_healthy(timeout=60)
        wait_until(lambda: len(backends_of(bpf_env, "default/web:http")) == 2, what="resync after restart")
        r = client(bpf_env, topo.client, "http", "10.96.0.10", 80, "-n", 20)
        assert r["errors"] == 0 and set(r["counts"]) == {"pod1", "pod2"}, r
        for h in (ext_hold, in_hold):
            out = json.loads(h.communicate(timeout=30)[0].strip().splitlines()[-1])
            assert out["fail"] == 0 and out["ok"] > 50, out
        # one program per hook: the restart replaced, not stacked
        progs = loader.attached_cgroup_progs(bpf_env.cgroup)
        assert set(progs) == set(loader.SOCK_PROGS) and all(len(v) == 1 for v in progs.values()), progs
    finally:
        for h in (ext_hold, in_hold):
            if h.poll() is None:
                h.kill()
                h.wait()


def test_cleanup_detaches_and_unpins(topo, bpf_env, running):
    _, state = running
    topo.stop_daemon(state["p"])
    state["p"] = None
    assert loader.attached_cgroup_progs(bpf_env.cgroup)  # still attached after the daemon exited
    shown = subprocess.run(["bpftool", "-j", "cgroup", "show", bpf_env.cgroup], capture_output=True, text=True)
    assert {p["name"] for p in json.loads(shown.stdout)} == set(loader.SOCK_PROGS)
    args = topo.daemon_args(os.devnull, "ebpf", *bpf_env.flags())
    p = topo.exec(topo.node, [*args, "--cleanup"], check=False)
    assert p.returncode == 0, p.stderr
    cg = subprocess.run(["bpftool", "-j", "cgroup", "show", bpf_env.cgroup], capture_output=True, text=True)
    assert cg.returncode == 0 and json.loads(cg.stdout.strip() or "[]") == [], cg
    assert not os.path.exists(bpf_env.pin) or os.listdir(bpf_env.pin) == []
    net = topo.exec(topo.node, ["bpftool", "-j", "net", "show", "dev", "ext0"]).stdout
    assert "kp_tc" not in net, net
    r = client(bpf_env, topo.client, "http", "10.96.0.10", 80, "-n", 1)
    assert r["errors"] == 1  # nothing balances the VIP any more
