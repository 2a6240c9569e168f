"""IPVS scenarios with real packets; run INSIDE the test VM (see test_ipvs_vm.py), in this order.

One dual-stack topology (node netns with a bridge, 3 pods with HTTP/UDP/TCP-echo servers, a client pod and
an external host; IPv4 and IPv6 addresses everywhere) and one kproxy daemon in ``--proxy-mode ipvs`` reading
a manifests directory. Each test writes manifests, waits until the kernel's IPVS table (``ipvsadm -Ln`` in
the node namespace) shows the expected state, then sends traffic from the client or the external host.
IPv6 (``test_ipv6_dual_stack``) uses the same VM boot; its Service stays defined so the restart, status
and cleanup scenarios cover the IPv6 state too.

Not collected on the host (the file name does not start with ``test_``); the outer test runs
``pytest tests/ipvs/vm_scenarios.py`` in the VM.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kproxy.testing import topology as topo

if not os.environ.get("KPROXY_IN_VM"):
    pytest.skip("runs inside the IPVS test VM only", allow_module_level=True)

NODE = "node-a"
GRACE = 45  # KPROXY_IPVS_GRACE_PERIOD for the daemon: a drained real server goes at the latest after this
EXT_VIP = "198.51.100.10"
NODEPORT = 30080
# the dual-stack Service of test_ipv6_dual_stack (kept until the end: restart, status and cleanup cover it)
DS_VIP, DS_VIP6 = "10.96.0.60", "fd00:10:96::60"
EXT_VIP6 = "2001:db8:ff::10"
NODEPORT6 = 30082


# ---- manifests ------------------------------------------------------------------------------------------

def service(name: str, ip: str | list[str], ports: list[dict[str, Any]], annotations: dict[str, str] | None = None,
            **spec: Any) -> dict[str, Any]:
    """A Service; ``ip`` is one cluster IP or one per family (dual-stack, primary family first)."""
    meta: dict[str, Any] = {"name": name, "namespace": "default"}
    if annotations:
        meta["annotations"] = annotations
    ips = [ip] if isinstance(ip, str) else ip
    families = ["IPv6" if ":" in x else "IPv4" for x in ips]
    policy = "RequireDualStack" if len(ips) > 1 else "SingleStack"
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {"clusterIP": ips[0], "clusterIPs": ips, "ipFamilies": families, "ipFamilyPolicy": policy,
                     "ports": ports, **spec}}


def endpoint(ip: str, node: str = NODE, ready: bool = True, serving: bool | None = None,
             terminating: bool = False) -> dict[str, Any]:
    cond: dict[str, Any] = {"ready": ready, "terminating": terminating}
    if serving is not None:
        cond["serving"] = serving
    return {"addresses": [ip], "conditions": cond, "nodeName": node}


def slice_(svc: str, eps: list[dict[str, Any]], ports: list[dict[str, Any]], family: int = 4) -> dict[str, Any]:
    """An EndpointSlice of one address family (a dual-stack Service has one per family, as from the API)."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{svc}-1" if family == 4 else f"{svc}-v6", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4" if family == 4 else "IPv6", "ports": ports, "endpoints": eps}


HTTP = {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}
DNS = {"name": "dns", "port": 53, "targetPort": 5300, "protocol": "UDP"}
ECHO = {"name": "echo", "port": 9000, "targetPort": 9000, "protocol": "TCP"}
EP_HTTP = {"name": "http", "port": 8080, "protocol": "TCP"}
EP_DNS = {"name": "dns", "port": 5300, "protocol": "UDP"}
EP_ECHO = {"name": "echo", "port": 9000, "protocol": "TCP"}


class Env:
    """The topology, the manifests directory and the running daemon."""

    def __init__(self, t: topo.Topology) -> None:
        self.t = t
        self.manifests = tempfile.mkdtemp(prefix="ipvs-manifests-")
        self.daemon: subprocess.Popen[str] | None = None
        self.pods = [t.pod[f"pod{i}"] for i in range(3)]

    def put(self, name: str, *objs: dict[str, Any]) -> None:
        path = os.path.join(self.manifests, f"{name}.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"apiVersion": "v1", "kind": "List", "items": list(objs)}, f)
        os.rename(tmp, path)

    def drop(self, name: str) -> None:
        os.unlink(os.path.join(self.manifests, f"{name}.json"))

    def start(self, *extra: str) -> None:
        env = {"KPROXY_IPVS_GRACE_PERIOD": str(GRACE)}
        self.daemon = d = self.t.spawn(self.t.node, self.t.daemon_args(self.manifests, "ipvs", *extra),
                                       log_name="kproxy.log", env=env)
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            if d.poll() is not None:
                raise AssertionError(f"kproxy exited with {d.returncode}:\n{self.log()}")
            try:
                self.t.wait_healthy(timeout=3)
                return
            except TimeoutError:
                continue
        raise AssertionError(f"kproxy did not become healthy:\n{self.log()}")

    def stop(self) -> int:
        assert self.daemon is not None
        rc = self.t.stop_daemon(self.daemon, timeout=60)
        self.daemon = None
        return rc

    def node(self, *argv: str, check: bool = True) -> str:
        return self.t.exec(self.t.node, list(argv), check=check).stdout

    def ipvsadm(self) -> str:
        return self.node("ipvsadm", "-Ln")

    def probe(self, ns: str, *args: str | int) -> dict[str, Any]:
        return self.t.probe(ns, *args)

    def log(self) -> str:
        return self.t.read_log()


def parse_ipvsadm(text: str) -> dict[str, dict[str, Any]]:
    """``ipvsadm -Ln`` → {"TCP 10.96.0.10:80": {"sched", "flags", "dests": {"ip:port": (fwd, weight, act, inact)}}}."""
    out: dict[str, dict[str, Any]] = {}
    cur: dict[str, Any] | None = None
    for line in text.splitlines():
        m = re.match(r"^(TCP|UDP|SCTP)\s+(\S+)\s+(\S+)\s*(.*)$", line)
        if m:
            cur = out[f"{m.group(1)} {m.group(2)}"] = {"sched": m.group(3), "flags": m.group(4).strip(), "dests": {}}
            continue
        m = re.match(r"^\s+->\s+(\S+)\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+)", line)
        if m and cur is not None and m.group(1) != "RemoteAddress:Port":
            cur["dests"][m.group(1)] = (m.group(2), int(m.group(3)), int(m.group(4)), int(m.group(5)))
    return out


def wait_for(env: Env, what: str, pred: Callable[[dict[str, dict[str, Any]]], bool], timeout: float = 90
             ) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    table: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        table = parse_ipvsadm(env.ipvsadm())
        if pred(table):
            return table
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; ipvsadm -Ln:\n{env.ipvsadm()}\nlog:\n{env.log()}")


def serving(text: str) -> dict[str, tuple[str, str, set[str]]]:
    """Virtual servers with scheduler, flags and the real servers that have a weight (connection counts ignored)."""
    return {k: (v["sched"], v["flags"], {d for d, (_, w, _, _) in v["dests"].items() if w > 0})
            for k, v in parse_ipvsadm(text).items()}


def dests(table: dict[str, dict[str, Any]], vs: str) -> dict[str, tuple[str, int, int, int]]:
    return table.get(vs, {}).get("dests", {})


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with topo.Topology(pods=3, ipv6=True) as t:
        # the external host reaches externalIPs through the node, like a router outside the cluster
        topo.run(["ip", "-n", t.ext, "route", "add", EXT_VIP, "via", topo.NODE_EXT_IP])
        topo.run(["ip", "-n", t.ext, "-6", "route", "add", EXT_VIP6, "via", topo.NODE_EXT_IP6])
        e = Env(t)
        e.start("--ipvs-tcp-timeout", "7260s", "--ipvs-tcpfin-timeout", "5s", "--ipvs-udp-timeout", "30s",
                "--ipvs-strict-arp", "true")
        try:
            yield e
        finally:
            if e.daemon is not None:
                e.stop()
            sys.stderr.write("---- daemon log tail\n" + e.log()[-3000:])


# ---- scenarios (run in file order) ---------------------------------------------------------------------

def test_clusterip_tcp_and_udp(env: Env) -> None:
    p = env.pods
    env.put("web", service("web", "10.96.0.10", [HTTP, DNS]),
            slice_("web", [endpoint(x.ip) for x in p], [EP_HTTP, EP_DNS]))
    table = wait_for(env, "web with 3 real servers",
                     lambda t: len(dests(t, "TCP 10.96.0.10:80")) == 3 and len(dests(t, "UDP 10.96.0.10:53")) == 3)
    assert table["TCP 10.96.0.10:80"]["sched"] == "rr"
    assert dests(table, "TCP 10.96.0.10:80") == {f"{x.ip}:8080": ("Masq", 1, 0, 0) for x in p}
    assert dests(table, "UDP 10.96.0.10:53") == {f"{x.ip}:5300": ("Masq", 1, 0, 0) for x in p}
    # the VIP is on kube-ipvs0 and in the ipsets the fixed rules match on
    assert "10.96.0.10/32" in env.node("ip", "-o", "addr", "show", "dev", "kube-ipvs0")
    assert "10.96.0.10,tcp:80" in env.node("ipset", "list", "KUBE-CLUSTER-IP")
    assert "10.96.0.10,udp:53" in env.node("ipset", "list", "KUBE-CLUSTER-IP")
    r = env.probe(env.t.client, "http", "10.96.0.10", 80, "-n", 30)
    assert r["errors"] == 0, r
    assert r["counts"] == {"pod0": 10, "pod1": 10, "pod2": 10}, r  # rr: strict rotation
    assert set(r["peers"]) == {topo.CLIENT_IP}  # pod-to-service from inside the cluster CIDR: no SNAT
    u = env.probe(env.t.client, "udp", "10.96.0.10", 53, "-n", 9)
    assert u["errors"] == 0, u
    assert sorted(u["counts"]) == ["pod0", "pod1", "pod2"], u
    # a VIP port with no Service is rejected by the fixed filter rules, not left hanging
    assert env.probe(env.t.client, "tcp-check", "10.96.0.10", 81)["error"] == "refused"
    # the node itself reaches the ClusterIP too
    n = env.probe(env.t.node, "http", "10.96.0.10", 80, "-n", 3)
    assert n["errors"] == 0, n


def test_iptables_rules_are_fixed(env: Env) -> None:
    before = env.node("iptables-save")
    count = sum(1 for line in before.splitlines() if line.startswith("-A KPROXY-IPVS-"))
    env.put("extra", *[service(f"extra{i}", f"10.96.1.{i + 1}", [HTTP]) for i in range(20)])
    wait_for(env, "20 more virtual servers", lambda t: all(f"TCP 10.96.1.{i + 1}:80" in t for i in range(20)))
    after = env.node("iptables-save")
    assert sum(1 for line in after.splitlines() if line.startswith("-A KPROXY-IPVS-")) == count
    # a Service without endpoints rejects connections
    assert env.probe(env.t.client, "tcp-check", "10.96.1.1", 80)["error"] == "refused"
    env.drop("extra")
    wait_for(env, "extra services gone", lambda t: not any(k.startswith("TCP 10.96.1.") for k in t))
    assert "10.96.1.1/32" not in env.node("ip", "-o", "addr", "show", "dev", "kube-ipvs0")


def test_nodeport_and_external_ip(env: Env) -> None:
    p = env.pods
    env.put("np", service("np", "10.96.0.20", [{**HTTP, "nodePort": NODEPORT}, {**DNS, "nodePort": NODEPORT}],
                          type="NodePort", externalIPs=[EXT_VIP]),
            slice_("np", [endpoint(x.ip) for x in p], [EP_HTTP, EP_DNS]))
    table = wait_for(env, "NodePort virtual servers on the node addresses",
                     lambda t: len(dests(t, f"TCP {topo.NODE_EXT_IP}:{NODEPORT}")) == 3
                     and len(dests(t, f"UDP {topo.NODE_EXT_IP}:{NODEPORT}")) == 3
                     and len(dests(t, f"TCP {EXT_VIP}:80")) == 3)
    assert f"TCP {topo.GATEWAY}:{NODEPORT}" in table  # every node address gets one
    assert not any(k.endswith(f"127.0.0.1:{NODEPORT}") for k in table)
    assert str(NODEPORT) in env.node("ipset", "list", "KUBE-NODE-PORT-TCP")
    r = env.probe(env.t.ext, "http", topo.NODE_EXT_IP, NODEPORT, "-n", 9)
    assert r["errors"] == 0 and sorted(r["counts"]) == ["pod0", "pod1", "pod2"], r
    assert topo.EXT_IP not in r["peers"], r  # Cluster policy: masqueraded
    u = env.probe(env.t.ext, "udp", topo.NODE_EXT_IP, NODEPORT, "-n", 6)
    assert u["errors"] == 0, u
    x = env.probe(env.t.ext, "http", EXT_VIP, 80, "-n", 6)
    assert x["errors"] == 0 and sorted(x["counts"]) == ["pod0", "pod1", "pod2"], x
    xu = env.probe(env.t.ext, "udp", EXT_VIP, 53, "-n", 6)
    assert xu["errors"] == 0, xu
    # the in-cluster client reaches the NodePort on the node's pod-network address too
    c = env.probe(env.t.client, "http", topo.GATEWAY, NODEPORT, "-n", 3)
    assert c["errors"] == 0, c


def ip6tables_ours(env: Env) -> str:
    """``ip6tables-save`` of the one back end (legacy or nft) holding kproxy's IPv6 chains."""
    saved = {tool: env.node(tool, check=False) for tool in ("ip6tables-legacy-save", "ip6tables-nft-save")}
    ours = [text for text in saved.values() if ":KPROXY-IPVS-SERVICES" in text]
    assert len(ours) == 1, f"expected kproxy's IPv6 chains in exactly one back end: {list(saved)}"
    return ours[0]


def test_ipv6_dual_stack(env: Env) -> None:
    p = env.pods
    env.put("ds", service("ds", [DS_VIP, DS_VIP6], [{**HTTP, "nodePort": NODEPORT6}, {**DNS, "nodePort": NODEPORT6},
                                                    ECHO], type="NodePort", externalIPs=[EXT_VIP6]),
            slice_("ds", [endpoint(x.ip) for x in p], [EP_HTTP, EP_DNS, EP_ECHO]),
            slice_("ds", [endpoint(x.ip6) for x in p], [EP_HTTP, EP_DNS, EP_ECHO], family=6))
    tcp6, udp6 = f"TCP [{DS_VIP6}]:80", f"UDP [{DS_VIP6}]:53"
    np_tcp6, np_udp6 = f"TCP [{topo.NODE_EXT_IP6}]:{NODEPORT6}", f"UDP [{topo.NODE_EXT_IP6}]:{NODEPORT6}"
    wanted = (tcp6, udp6, np_tcp6, np_udp6, f"TCP [{EXT_VIP6}]:80", f"TCP [{DS_VIP6}]:9000", f"TCP {DS_VIP}:80")
    table = wait_for(env, "IPv6 virtual servers", lambda t: all(len(dests(t, vs)) == 3 for vs in wanted))
    # IPv6 virtual servers with the IPv6 pod addresses as masquerading real servers; IPv4 ones stay IPv4
    assert table[tcp6]["sched"] == "rr", table[tcp6]
    assert dests(table, tcp6) == {f"[{x.ip6}]:8080": ("Masq", 1, 0, 0) for x in p}
    assert dests(table, udp6) == {f"[{x.ip6}]:5300": ("Masq", 1, 0, 0) for x in p}
    assert dests(table, np_tcp6) == {f"[{x.ip6}]:8080": ("Masq", 1, 0, 0) for x in p}
    assert dests(table, f"TCP {DS_VIP}:80") == {f"{x.ip}:8080": ("Masq", 1, 0, 0) for x in p}
    assert dests(table, f"TCP {topo.NODE_EXT_IP}:{NODEPORT6}") == {f"{x.ip}:8080": ("Masq", 1, 0, 0) for x in p}
    # a NodePort on every global node address of the family; never on link-local or loopback addresses
    assert f"TCP [{topo.GATEWAY6}]:{NODEPORT6}" in table, table
    assert not [k for k in table if "[fe80:" in k or "[::1]" in k], table
    # the VIPs are IPv6 addresses on kube-ipvs0
    addrs = env.node("ip", "-6", "-o", "addr", "show", "dev", "kube-ipvs0")
    assert f"{DS_VIP6}/128" in addrs and f"{EXT_VIP6}/128" in addrs, addrs
    # the IPv6 ipsets: family inet6, holding the IPv6 members (and the IPv4 sets none of them)
    for name, member in (("KUBE-6-CLUSTER-IP", f"{DS_VIP6},tcp:80"), ("KUBE-6-CLUSTER-IP", f"{DS_VIP6},udp:53"),
                         ("KUBE-6-IPVS-IPS", DS_VIP6), ("KUBE-6-EXTERNAL-IP", f"{EXT_VIP6},tcp:80"),
                         ("KUBE-6-LOOP-BACK", f"{p[0].ip6},tcp:8080,{p[0].ip6}")):
        listed = env.node("ipset", "list", name)
        assert "family inet6" in listed and member in listed, listed
    assert DS_VIP6 not in env.node("ipset", "list", "KUBE-CLUSTER-IP")
    assert str(NODEPORT6) in env.node("ipset", "list", "KUBE-NODE-PORT-UDP")  # bitmap:port, both families
    # the fixed ip6tables rules match the IPv6 sets and exempt the IPv6 cluster CIDR
    rules6 = ip6tables_ours(env)
    assert "-A KPROXY-IPVS-SERVICES -m set --match-set KUBE-6-CLUSTER-IP dst,dst -j KPROXY-IPVS-CLUSTER-IP" \
        in rules6, rules6
    assert f"-A KPROXY-IPVS-CLUSTER-IP -s {topo.POD_CIDR6} -j RETURN" in rules6, rules6
    assert any(line.startswith("-A PREROUTING") and line.endswith("-j KPROXY-IPVS-SERVICES")
               for line in rules6.splitlines()), rules6
    assert "KUBE-CLUSTER-IP " not in rules6 and topo.POD_CIDR not in rules6, rules6
    # traffic: pod → IPv6 ClusterIP (TCP strictly rotated, UDP spread), source kept inside the cluster CIDR
    r = env.probe(env.t.client, "http", DS_VIP6, 80, "-n", 30)
    assert r["errors"] == 0 and r["counts"] == {"pod0": 10, "pod1": 10, "pod2": 10}, r
    assert set(r["peers"]) == {topo.CLIENT_IP6}, r
    u = env.probe(env.t.client, "udp", DS_VIP6, 53, "-n", 9)
    assert u["errors"] == 0 and sorted(u["counts"]) == ["pod0", "pod1", "pod2"], u
    assert env.probe(env.t.client, "tcp-check", DS_VIP6, 81)["error"] == "refused"  # ip6tables REJECT
    # hairpin over IPv6: pod0 reaching itself through the VIP (KUBE-6-LOOP-BACK masquerade)
    h = env.probe(env.t.pod["pod0"].ns, "http", DS_VIP6, 80, "-n", 6)
    assert h["errors"] == 0 and h["counts"] == {"pod0": 2, "pod1": 2, "pod2": 2}, h
    # the external host → IPv6 NodePort (TCP and UDP) and IPv6 externalIP: masqueraded to the node
    x = env.probe(env.t.ext, "http", topo.NODE_EXT_IP6, NODEPORT6, "-n", 9)
    assert x["errors"] == 0 and x["counts"] == {"pod0": 3, "pod1": 3, "pod2": 3}, x
    assert set(x["peers"]) == {topo.GATEWAY6}, x
    xu = env.probe(env.t.ext, "udp", topo.NODE_EXT_IP6, NODEPORT6, "-n", 6)
    assert xu["errors"] == 0 and len(xu["counts"]) >= 2, xu
    xe = env.probe(env.t.ext, "http", EXT_VIP6, 80, "-n", 6)
    assert xe["errors"] == 0 and sorted(xe["counts"]) == ["pod0", "pod1", "pod2"], xe
    # the node itself reaches the IPv6 ClusterIP; the Service's IPv4 ClusterIP works alongside
    n = env.probe(env.t.node, "http", DS_VIP6, 80, "-n", 3)
    assert n["errors"] == 0, n
    v4 = env.probe(env.t.client, "http", DS_VIP, 80, "-n", 3)
    assert v4["errors"] == 0 and set(v4["peers"]) == {topo.CLIENT_IP}, v4


def test_schedulers_per_service(env: Env) -> None:
    p = env.pods
    ann = {"kproxy.io/ipvs-scheduler": "sh"}
    env.put("web", service("web", "10.96.0.10", [HTTP, DNS], annotations=ann),
            slice_("web", [endpoint(x.ip) for x in p], [EP_HTTP, EP_DNS]))
    wait_for(env, "sh scheduler", lambda t: t.get("TCP 10.96.0.10:80", {}).get("sched") == "sh")
    r = env.probe(env.t.client, "http", "10.96.0.10", 80, "-n", 12)
    assert r["errors"] == 0 and len(r["counts"]) == 1 and sum(r["counts"].values()) == 12, r  # source hashing
    busy = next(iter(r["counts"]))  # now holds 12 connections in TIME_WAIT (IPVS "InActConn")
    env.put("web", service("web", "10.96.0.10", [HTTP, DNS], annotations={"kproxy.io/ipvs-scheduler": "wrr"}),
            slice_("web", [endpoint(x.ip) for x in p], [EP_HTTP, EP_DNS]))
    wait_for(env, "wrr scheduler", lambda t: t.get("TCP 10.96.0.10:80", {}).get("sched") == "wrr")
    r = env.probe(env.t.client, "http", "10.96.0.10", 80, "-n", 12)
    assert r["errors"] == 0 and r["counts"] == {"pod0": 4, "pod1": 4, "pod2": 4}, r  # equal weights
    env.put("web", service("web", "10.96.0.10", [HTTP, DNS], annotations={"kproxy.io/ipvs-scheduler": "lc"}),
            slice_("web", [endpoint(x.ip) for x in p], [EP_HTTP, EP_DNS]))
    table = wait_for(env, "lc scheduler", lambda t: t.get("TCP 10.96.0.10:80", {}).get("sched") == "lc")
    assert dests(table, "TCP 10.96.0.10:80")[f"{env.t.pod[busy].ip}:8080"][3] >= 12, table
    r = env.probe(env.t.client, "http", "10.96.0.10", 80, "-n", 12)
    # least connections: the backend still holding 16 inactive connections gets none of the new ones
    assert r["errors"] == 0 and busy not in r["counts"] and len(r["counts"]) == 2, (busy, r)
    env.put("web", service("web", "10.96.0.10", [HTTP, DNS]),
            slice_("web", [endpoint(x.ip) for x in p], [EP_HTTP, EP_DNS]))
    wait_for(env, "back to the default rr", lambda t: t.get("TCP 10.96.0.10:80", {}).get("sched") == "rr")


def test_session_affinity(env: Env) -> None:
    p = env.pods
    env.put("sticky", service("sticky", "10.96.0.30", [HTTP], sessionAffinity="ClientIP",
                              sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}),
            slice_("sticky", [endpoint(x.ip) for x in p], [EP_HTTP]))
    table = wait_for(env, "persistent service", lambda t: len(dests(t, "TCP 10.96.0.30:80")) == 3)
    assert "persistent 60" in table["TCP 10.96.0.30:80"]["flags"], table
    r = env.probe(env.t.client, "http", "10.96.0.30", 80, "-n", 15)
    assert r["errors"] == 0 and len(r["counts"]) == 1, r


def test_local_traffic_policies(env: Env) -> None:
    p = env.pods
    eps = [endpoint(p[0].ip), endpoint(p[1].ip, node="node-b"), endpoint(p[2].ip, node="node-b")]
    env.put("loc", service("loc", "10.96.0.40", [{**HTTP, "nodePort": 30081}], type="NodePort",
                           externalTrafficPolicy="Local"),
            slice_("loc", eps, [EP_HTTP]))
    env.put("iloc", service("iloc", "10.96.0.41", [HTTP], internalTrafficPolicy="Local"),
            slice_("iloc", eps, [EP_HTTP]))
    table = wait_for(env, "Local policies", lambda t: len(dests(t, f"TCP {topo.NODE_EXT_IP}:30081")) == 1
                     and len(dests(t, "TCP 10.96.0.41:80")) == 1)
    assert list(dests(table, f"TCP {topo.NODE_EXT_IP}:30081")) == [f"{p[0].ip}:8080"]
    assert len(dests(table, "TCP 10.96.0.40:80")) == 3  # internal traffic: every endpoint
    assert "30081" in env.node("ipset", "list", "KUBE-NODE-PORT-LOCAL-TCP")
    r = env.probe(env.t.ext, "http", topo.NODE_EXT_IP, 30081, "-n", 6)
    assert r["errors"] == 0 and r["counts"] == {"pod0": 6}, r
    assert set(r["peers"]) == {topo.EXT_IP}, r  # Local: client source IP preserved
    i = env.probe(env.t.client, "http", "10.96.0.41", 80, "-n", 6)
    assert i["errors"] == 0 and i["counts"] == {"pod0": 6}, i


class LongConnection:
    """A TCP connection through a VIP held open by a helper process in the client namespace."""

    CODE = (
        "import socket,sys\n"
        "s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=10)\n"
        "f=s.makefile('rw')\n"
        "for line in sys.stdin:\n"
        "    f.write(line); f.flush()\n"
        "    print(f.readline().strip(), flush=True)\n"
    )

    def __init__(self, env: Env, ip: str, port: int) -> None:
        self.p = subprocess.Popen(["ip", "netns", "exec", env.t.client, sys.executable, "-c", self.CODE, ip,
                                   str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, text: str) -> str:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(text + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def close(self) -> None:
        if self.p.stdin:
            self.p.stdin.close()
        self.p.wait(20)


def echo_new_connections(env: Env, ip: str, n: int) -> list[str]:
    code = ("import socket,sys\nout=[]\nfor i in range(int(sys.argv[3])):\n"
            "    s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=5)\n"
            "    s.sendall(b'x\\n'); out.append(s.makefile().readline().split()[0]); s.close()\n"
            "print(' '.join(out))\n")
    return env.t.exec(env.t.client, [sys.executable, "-c", code, ip, "9000", str(n)]).stdout.split()


def test_graceful_termination(env: Env) -> None:
    p = env.pods
    vs = "TCP 10.96.0.50:9000"
    env.put("echo", service("echo", "10.96.0.50", [ECHO]), slice_("echo", [endpoint(x.ip) for x in p], [EP_ECHO]))
    wait_for(env, "echo service", lambda t: len(dests(t, vs)) == 3)
    conn = LongConnection(env, "10.96.0.50", 9000)
    try:
        victim = conn.ask("hello").split()[0]
        assert victim in ("pod0", "pod1", "pod2")
        vip = env.t.pod[victim].ip
        # 1) the endpoint starts terminating (serving, not ready): weight 0, connection kept
        env.put("echo", service("echo", "10.96.0.50", [ECHO]), slice_("echo", [
            endpoint(x.ip, ready=x.name != victim, serving=True, terminating=x.name == victim) for x in p], [EP_ECHO]))
        table = wait_for(env, "weight 0 for the terminating endpoint",
                         lambda t: dests(t, vs).get(f"{vip}:9000", ("", 1))[1] == 0)
        assert dests(table, vs)[f"{vip}:9000"][2] == 1  # its established connection is still counted
        assert conn.ask("still there") == f"{victim} still there"
        fresh = echo_new_connections(env, "10.96.0.50", 8)
        assert len(fresh) == 8 and victim not in fresh, fresh
        # 2) the endpoint disappears from the slice: still draining, not deleted, connection alive
        env.put("echo", service("echo", "10.96.0.50", [ECHO]),
                slice_("echo", [endpoint(x.ip) for x in p if x.name != victim], [EP_ECHO]))
        time.sleep(3)
        table = parse_ipvsadm(env.ipvsadm())
        assert dests(table, vs)[f"{vip}:9000"][1] == 0, table
        assert conn.ask("after removal") == f"{victim} after removal"
    finally:
        conn.close()
    # 3) once the connection is gone (or the grace period is over) the real server is deleted
    wait_for(env, "drained real server deleted", lambda t: f"{vip}:9000" not in dests(t, vs), timeout=GRACE + 60)
    assert len(dests(parse_ipvsadm(env.ipvsadm()), vs)) == 2


def test_udp_endpoint_removed_immediately(env: Env) -> None:
    p = env.pods
    env.put("web", service("web", "10.96.0.10", [HTTP, DNS]),
            slice_("web", [endpoint(x.ip) for x in p[:2]], [EP_HTTP, EP_DNS]))
    table = wait_for(env, "UDP real server removed", lambda t: len(dests(t, "UDP 10.96.0.10:53")) == 2)
    assert f"{p[2].ip}:5300" not in dests(table, "UDP 10.96.0.10:53")
    u = env.probe(env.t.client, "udp", "10.96.0.10", 53, "-n", 6, "--same-socket")
    assert u["errors"] == 0 and "pod2" not in u["counts"], u


def test_timeouts_and_strict_arp(env: Env) -> None:
    out = env.node("ipvsadm", "-L", "--timeout")
    assert "7260 5 30" in out, out
    assert env.node("cat", "/proc/sys/net/ipv4/conf/all/arp_ignore").strip() == "1"
    assert env.node("cat", "/proc/sys/net/ipv4/conf/all/arp_announce").strip() == "2"


def test_status_reads_kernel(env: Env) -> None:
    out = env.t.exec(env.t.node, [sys.executable, "-m", "kproxy", "status", "--proxy-mode", "ipvs", "-o", "json"],
                     timeout=120).stdout
    services = json.loads(out)["ipvs"]
    by_name = {s["name"]: s for s in services}
    web = by_name["10.96.0.10:80/TCP"]
    assert web["frontends"][0]["kind"] == "ClusterIP"
    assert {b["address"] for b in web["backends"] if b["weight"]} == {f"{x.ip}:8080" for x in env.pods[:2]}
    # pod2 left the Service in the previous scenario: gone, or still draining (weight 0) with a note
    drained = [b for b in web["backends"] if not b["weight"]]
    assert drained == [] or (drained[0]["address"] == f"{env.pods[2].ip}:8080"
                             and any(n.startswith("draining") for n in web["notes"])), web
    assert by_name[f"{topo.NODE_EXT_IP}:{NODEPORT}/TCP"]["frontends"][0]["kind"] == "NodePort"
    assert by_name[f"{EXT_VIP}:80/TCP"]["frontends"][0]["kind"] == "ExternalIP"
    assert by_name["10.96.0.30:80/TCP"]["affinity_seconds"] == 60
    ds6 = by_name[f"[{DS_VIP6}]:80/TCP"]
    assert ds6["family"] == 6 and ds6["frontends"][0]["kind"] == "ClusterIP", ds6
    assert {b["address"] for b in ds6["backends"]} == {f"[{x.ip6}]:8080" for x in env.pods}, ds6
    assert by_name[f"[{topo.NODE_EXT_IP6}]:{NODEPORT6}/UDP"]["frontends"][0]["kind"] == "NodePort"
    assert by_name[f"[{EXT_VIP6}]:80/TCP"]["frontends"][0]["kind"] == "ExternalIP"


def test_restart_keeps_traffic_flowing(env: Env) -> None:
    before = env.ipvsadm()
    conn = LongConnection(env, "10.96.0.50", 9000)
    conn6 = LongConnection(env, DS_VIP6, 9000)
    try:
        first = conn.ask("a").split()[0]
        first6 = conn6.ask("a6").split()[0]
        rc = env.stop()
        assert rc == 0, env.log()
        # no daemon: the kernel keeps serving
        r = env.probe(env.t.client, "http", "10.96.0.10", 80, "-n", 4)
        assert r["errors"] == 0, r
        env.start("--ipvs-tcp-timeout", "7260s", "--ipvs-tcpfin-timeout", "5s", "--ipvs-udp-timeout", "30s")
        after = env.ipvsadm()
        # the same virtual servers and live real servers (draining ones may have been reaped meanwhile)
        assert serving(after) == serving(before), f"before:\n{before}\nafter:\n{after}"
        # the established connections (IPv4 and IPv6) survived the restart: the adopting full sync left
        # their real servers alone
        assert conn.ask("b") == f"{first} b"
        assert conn6.ask("b6") == f"{first6} b6"
        r = env.probe(env.t.client, "http", "10.96.0.10", 80, "-n", 4)
        assert r["errors"] == 0, r
        r6 = env.probe(env.t.client, "http", DS_VIP6, 80, "-n", 3)
        assert r6["errors"] == 0, r6
    finally:
        conn.close()
        conn6.close()


def test_cleanup_removes_everything(env: Env) -> None:
    # IPv6 state is there to be removed (the dual-stack Service is still defined)
    assert any(k.startswith("TCP [") for k in parse_ipvsadm(env.ipvsadm()))
    assert "KPROXY-IPVS-" in ip6tables_ours(env)
    assert "KUBE-6-CLUSTER-IP" in env.node("ipset", "list", "-n")
    env.stop()
    out = env.t.exec(env.t.node, [sys.executable, "-m", "kproxy", "--cleanup"], timeout=120)
    assert out.returncode == 0, out.stderr
    table = env.ipvsadm()
    assert parse_ipvsadm(table) == {}, table
    assert "KUBE-" not in env.node("ipset", "list", "-n")
    for tool in ("iptables-legacy-save", "iptables-nft-save", "ip6tables-legacy-save", "ip6tables-nft-save"):
        saved = env.node(tool, check=False)
        assert "KPROXY-" not in saved, (tool, saved)
    assert "kube-ipvs0" not in env.node("ip", "-o", "link")
