"""nftables data plane against the real kernel, in network namespaces these tests create.

Kernel-state tests drive :class:`NftablesDataPlane` directly inside a fresh namespace (a small program run
with ``ip netns exec``) and read the kernel back with ``nft``; traffic tests run the real daemon in a
:class:`~kproxy.testing.topology.Topology` and count which pod answered each new connection.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from scenarios import manifests as m

from kproxy.testing.topology import Topology, scratch_netns

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300),
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs inside the namespace: builds services from a JSON spec and exposes helpers to the test's program.
PRELUDE = textwrap.dedent("""
    import json, subprocess, sys
    sys.path.insert(0, ROOT)
    from kproxy.config import ProxyConfig
    from kproxy.dataplane.nftables import NftablesDataPlane
    from kproxy.snapshot import ProxySnapshot
    from kproxy.store import ClusterStore, Event

    store = ClusterStore("node-a")
    snap = ProxySnapshot(store, "node-a")
    cfg = ProxyConfig(mode="nftables", cluster_cidrs=("10.244.0.0/16", "fd00:10:244::/48"),
                      hostname_override="node-a")

    def svc(i, n, port=80, proto="TCP", gen=0, v6=False):
        ip = f"fd00:10:96::{i + 1:x}" if v6 else f"10.96.{i // 250}.{i % 250 + 1}"
        s = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"s{i}", "namespace": "t"},
             "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                      "ports": [{"name": "p", "port": port, "targetPort": 8080, "protocol": proto}]}}
        eps = [{"addresses": [f"fd00:10:245::{i * 64 + k + gen:x}" if v6 else
                              f"10.{128 + (i >> 8) % 64}.{i & 255}.{k + gen}"],
                "conditions": {"ready": True}, "nodeName": "node-b"} for k in range(n)]
        sl = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
              "metadata": {"name": f"s{i}-x", "namespace": "t", "labels": {"kubernetes.io/service-name": f"s{i}"}},
              "addressType": "IPv6" if v6 else "IPv4",
              "ports": [{"name": "p", "port": 8080, "protocol": proto}], "endpoints": eps}
        return s, sl

    def apply(*objs, kind="ADDED"):
        evs = []
        for o in objs:
            evs.append(Event(kind, o["kind"], o))
        store.apply(evs)

    def nft_json(*what):
        out = subprocess.run(["nft", "-j", "list", *what], capture_output=True, text=True, check=True).stdout
        return json.loads(out)["nftables"]

    def elems(fam, name):
        for o in nft_json("map", fam, "kproxy", name):
            if "map" in o:
                return o["map"].get("elem", [])
        return []

    def dump(fam):
        return subprocess.run(["nft", "list", "table", fam, "kproxy"], capture_output=True, text=True).stdout
""")


@pytest.fixture
def netns() -> Iterator[str]:
    with scratch_netns("kpnft") as name:
        yield name


def run_in(ns: str, program: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``program`` (after PRELUDE) inside ``ns``; it must print one JSON object last."""
    code = f"ROOT = {ROOT!r}\n" + PRELUDE + textwrap.dedent(program)
    p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=240, env={**os.environ, **(env or {})})
    assert p.returncode == 0, f"program failed:\n{p.stderr[-3000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_incremental_sync_writes_only_the_changed_elements(netns: str) -> None:
    out = run_in(netns, """
        dp = NftablesDataPlane(cfg)
        dp.setup()
        objs = [o for i in range(500) for o in svc(i, 10)]
        apply(*objs)
        full = dp.sync(snap, snap.update(), True)
        res = {"full": full.rules}
        # one endpoint of one Service replaced: slot 3 rewritten, nothing else
        s, sl = svc(7, 10)
        sl["endpoints"][3]["addresses"] = ["10.99.0.3"]
        apply(sl, kind="MODIFIED")
        r1 = dp.sync(snap, snap.update(), False)
        res["replace_one"] = r1.rules
        res["slot3"] = [e for e in elems("ip", "ep-e-3") if e[0]["concat"][0] == "10.96.0.8"]
        # one endpoint removed: the last slot moves into the hole; the verdict goes to the 9-way chain
        sl["endpoints"] = sl["endpoints"][:5] + sl["endpoints"][6:]
        apply(sl, kind="MODIFIED")
        r2 = dp.sync(snap, snap.update(), False)
        res["remove_one"] = r2.rules
        res["svc_verdict"] = [e[1] for e in elems("ip", "svc")
                              if e[0]["elem"]["val"]["concat"][0] == "10.96.0.8"]
        res["slot9_left"] = [e for e in elems("ip", "ep-e-9") if e[0]["concat"][0] == "10.96.0.8"]
        # a new Service: its frontend, 10 endpoints; then removed again
        apply(*svc(600, 10))
        res["add_service"] = dp.sync(snap, snap.update(), False).rules
        s600, sl600 = svc(600, 10)
        apply(s600, sl600, kind="DELETED")
        res["remove_service"] = dp.sync(snap, snap.update(), False).rules
        res["gone"] = [e for e in elems("ip", "svc") if e[0]["elem"]["val"]["concat"][0] == "10.96.2.101"]
        print(json.dumps(res))
    """)
    assert out["full"] == 500 * 11
    assert out["replace_one"] == 2  # delete + add of one element
    assert out["slot3"] == [[{"concat": ["10.96.0.8", "tcp", 80]}, {"concat": ["10.99.0.3", 8080]}]]
    # removal: slot 5 gets slot 9's endpoint (del+add), slot 9 deleted, the verdict rewritten (del+add)
    assert out["remove_one"] == 5
    assert out["svc_verdict"] == [{"goto": {"target": "c-9"}}]
    assert out["slot9_left"] == []
    assert out["add_service"] == 11
    assert out["remove_service"] == 11
    assert out["gone"] == []


def test_netlink_and_nft_paths_write_the_same_kernel_state(netns: str) -> None:
    program = """
        dp = NftablesDataPlane(cfg)
        dp.setup()
        objs = [o for i in range(20) for o in svc(i, 1 + i % 4)]
        objs += [o for i in range(3) for o in svc(100 + i, 2, v6=True)]
        s, sl = svc(50, 3, proto="UDP")
        s["spec"].update({"type": "LoadBalancer", "externalIPs": ["203.0.113.9"], "sessionAffinity": "ClientIP",
                          "externalTrafficPolicy": "Local", "loadBalancerSourceRanges": ["198.51.100.0/24"]})
        s["spec"]["ports"][0]["nodePort"] = 30053
        s["status"] = {"loadBalancer": {"ingress": [{"ip": "192.0.2.7"}]}}
        sl["endpoints"][0]["nodeName"] = "node-a"
        e, el = svc(51, 0)
        apply(*objs, s, sl, e, el)
        dp.sync(snap, snap.update(), True)
        a = {"4": dump("ip"), "6": dump("ip6")}
        dp.cleanup()
        dp2 = NftablesDataPlane(cfg)
        dp2.use_netlink = False
        dp2.setup()
        snap2 = ProxySnapshot(store, "node-a")
        dp2.sync(snap2, snap2.update(), True)
        b = {"4": dump("ip"), "6": dump("ip6")}
        print(json.dumps({"a": a, "b": b}))
    """
    out = run_in(netns, program)

    def norm(text: str) -> list[str]:
        # element order within a listing depends on insertion order; compare the sorted lines
        return sorted(line.strip().rstrip(",") for line in text.replace("{ ", "{\n").replace(", ", ",\n")
                      .splitlines() if line.strip())

    for fam in ("4", "6"):
        assert out["a"][fam] and "goto c-" in out["a"][fam]
        assert norm(out["a"][fam]) == norm(out["b"][fam]), f"IPv{fam}: netlink and nft -f disagree"
    v4 = out["a"]["4"]
    assert 'comment "t/s50:p/UDP LoadBalancer"' in v4 and "goto l-1-a10800" in v4
    assert "192.0.2.7 . udp . 80 . 198.51.100.0/24" in v4  # loadBalancerSourceRanges
    assert 'comment "t/s51:p/TCP ClusterIP" : goto reject-chain' in v4


def test_other_tables_untouched_and_cleanup_and_recovery(netns: str) -> None:
    other = ("table inet filter { chain input { type filter hook input priority 0; policy accept; "
             "tcp dport 22 counter accept; }; }\n"
             "table ip nat { chain postrouting { type nat hook postrouting priority 100; "
             "oifname \"x\" masquerade; }; }\n")
    subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=other, text=True, check=True)
    before = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "table", "inet", "filter"],
                            capture_output=True, text=True, check=True).stdout
    out = run_in(netns, """
        from kproxy.dataplane import SyncError
        dp = NftablesDataPlane(cfg)
        dp.setup()
        apply(*[o for i in range(5) for o in svc(i, 3)])
        dp.sync(snap, snap.update(), True)
        res = {"status": [(s.name, s.family, len(s.backends)) for s in dp.status()]}
        # somebody deletes kproxy's table: the partial sync fails, the next full sync restores everything
        subprocess.run(["nft", "delete", "table", "ip", "kproxy"], check=True)
        apply(*svc(9, 2))
        try:
            dp.sync(snap, snap.update(), False)
            res["partial"] = "ok"
        except SyncError as e:
            res["partial"] = "failed: " + str(e)[:100]
        changes = snap.update()
        dp.sync(snap, changes, False)  # the data plane itself forces a full sync after a failure
        res["restored"] = len(elems("ip", "svc"))
        res["cleanup"] = dp.cleanup()
        res["tables"] = [o["table"]["name"] + "/" + o["table"]["family"] for o in nft_json("tables") if "table" in o]
        res["cleanup_again"] = dp.cleanup()
        print(json.dumps(res))
    """)
    assert sorted(out["status"]) == sorted([f"t/s{i}:p/TCP", 4, 3] for i in range(5))
    assert out["partial"].startswith("failed"), out
    assert out["restored"] == 6  # s0..s4 and s9, whose partial sync failed: the full sync renders everything
    assert out["cleanup"] is True and out["cleanup_again"] is False
    assert sorted(out["tables"]) == ["filter/inet", "nat/ip"]
    after = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "table", "inet", "filter"],
                           capture_output=True, text=True, check=True).stdout
    assert after == before


def test_full_resync_keeps_affinity_memory_and_slots(netns: str) -> None:
    out = run_in(netns, """
        dp = NftablesDataPlane(cfg)
        dp.setup()
        s, sl = svc(3, 4)
        s["spec"]["sessionAffinity"] = "ClientIP"
        s["spec"]["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 600}}
        apply(s, sl, *svc(4, 2))
        dp.sync(snap, snap.update(), True)
        # what the packet path records for a client pinned to slot 2 (update @aff-2 in a2-600-e)
        subprocess.run(["nft", "add", "element", "ip", "kproxy", "aff-2",
                        "{ 10.244.1.100 . 10.96.0.4 . tcp . 80 timeout 600s }"], check=True)
        before = {"ep2": elems("ip", "ep-e-2")}
        dp.sync(snap, snap.update(), True)  # the periodic full resync
        after = {"ep2": elems("ip", "ep-e-2")}
        aff = [o for o in nft_json("set", "ip", "kproxy", "aff-2") if "set" in o][0]["set"].get("elem", [])
        chain = [o for o in nft_json("chain", "ip", "kproxy", "c-4-a600") if "rule" in o]
        print(json.dumps({"before": before, "after": after, "aff": aff, "rules": len(chain)}))
    """)
    assert out["before"] == out["after"]
    assert len(out["aff"]) == 1 and out["aff"][0]["elem"]["val"]["concat"][:2] == ["10.244.1.100", "10.96.0.4"]
    assert out["rules"] == 4 + 1 + 1  # 4 affinity lookups, the random pick, the masquerade rule


# ---- traffic -----------------------------------------------------------------------------------------

def _counts(topo: Topology, ns: str, kind: str, ip: str, port: int, n: int) -> dict[str, int]:
    res = topo.probe(ns, kind, ip, port, "-n", n, "--timeout", 3)
    # a lost UDP datagram or a timed-out connect on a loaded machine is not a proxy fault; more is
    assert res["errors"] <= n // 100, res
    return dict(res["counts"])


def _assert_fair(counts: dict[str, int], pods: list[str], n: int, what: str) -> None:
    """Each endpoint within ±40% of n/len(pods): ≥ 4.5 binomial sd at these sizes, so a correct proxy never
    fails, while a slot-rounding error (e.g. 64 slots over 3 endpoints) or a wrong modulus does."""
    assert set(counts) == set(pods), f"{what}: expected exactly {pods}, got {counts}"
    want = n / len(pods)
    for p in pods:
        assert 0.6 * want <= counts[p] <= 1.4 * want, f"{what}: {p} got {counts[p]} of {n}: {counts}"


@pytest.mark.slow
def test_fair_share_with_unequal_endpoint_counts_tcp_udp_ipv6() -> None:
    with Topology(pods=5) as topo:
        d = os.path.join(topo.workdir, "manifests")
        os.makedirs(d)
        pods = list(topo.pod)
        layout = {"two": pods[:2], "three": pods[2:5], "five": pods}
        for i, (name, members) in enumerate(layout.items()):
            ip4, ip6 = f"10.96.7.{10 + i}", f"fd00:10:96::7{i}"
            ports = [m.port(80, 8080, name="http"), m.port(53, 5300, name="dns", protocol="UDP")]
            sl_ports = [m.slice_port(8080, name="http"), m.slice_port(5300, name="dns", protocol="UDP")]
            m.write(d, name, [
                m.service(name, [ip4, ip6], ports),
                m.endpoint_slice(name, [m.endpoint(topo.pod[p].ip) for p in members], sl_ports),
                m.endpoint_slice(name, [m.endpoint(topo.pod[p].ip6) for p in members], sl_ports),
            ])
        topo.start_daemon(d, "nftables")
        topo.wait_healthy()
        n = 300
        for i, (name, members) in enumerate(layout.items()):
            _assert_fair(_counts(topo, topo.client, "http", f"10.96.7.{10 + i}", 80, n), members, n, f"{name} TCP")
        _assert_fair(_counts(topo, topo.client, "udp", "10.96.7.11", 53, n), layout["three"], n, "three UDP")
        _assert_fair(_counts(topo, topo.client, "http", "fd00:10:96::72", 80, n), layout["five"], n, "five TCPv6")
        _assert_fair(_counts(topo, topo.client, "udp", "fd00:10:96::70", 53, n), layout["two"], n, "two UDPv6")
        # the kernel's own view agrees: `kproxy status -o json` reads the endpoint maps back
        st = topo.exec(topo.node, [sys.executable, "-m", "kproxy", "status", "--proxy-mode", "nftables", "-o",
                                   "json"]).stdout
        services = {(s["name"], s["family"]): s for s in json.loads(st)["nftables"]}
        five = services[("default/five:http/TCP", 6)]
        assert len(five["backends"]) == 5 and all(abs(b["weight"] - 0.2) < 1e-9 for b in five["backends"])
        # metrics: nftables-mode series exist, syncs were timed, none failed
        met = topo.exec(topo.node, ["curl", "-s", "http://127.0.0.1:10249/metrics"]).stdout
        assert 'kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family="IPv4"} 0.0' in met, met[:2000]
        count = [line for line in met.splitlines()
                 if line.startswith('kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv4"}')]
        assert count and float(count[0].split()[-1]) >= 1, count


def test_restart_drops_dynamic_chains_the_new_state_does_not_need(netns: str) -> None:
    """A new process adopts the table: the first full sync reads the kernel's dynamic chains and sets
    (listing chains/sets/maps, not the elements) and deletes those nothing needs any more — only in
    kproxy's table, not in another table that happens to use the same names."""
    out = run_in(netns, """
        from kproxy.dataplane.nftables import render as r

        def names():
            return {(o["chain"]["table"], o["chain"]["name"]) for o in nft_json("chains", "ip") if "chain" in o}

        dp = NftablesDataPlane(cfg)
        dp.setup()
        apply(*svc(0, 3), *svc(1, 7))
        dp.sync(snap, snap.update(), True)
        before = names()
        dynamic = sorted(c for t, c in before if t == "kproxy" and r.is_dynamic_chain(c))
        # another table with chains named like all of ours
        script = "add table ip other\\n" + "".join(f"add chain ip other {c}\\n" for c in dynamic)
        subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)
        # "restart": a new data plane and snapshot over the existing table, Service s1 gone meanwhile
        apply(*svc(1, 7), kind="DELETED")
        snap2 = ProxySnapshot(store, "node-a")
        dp2 = NftablesDataPlane(cfg)
        dp2.setup()
        dp2.sync(snap2, snap2.update(), True)
        after = names()
        print(json.dumps({"before": sorted(c for t, c in before if t == "kproxy"),
                          "after": sorted(c for t, c in after if t == "kproxy"), "dynamic": dynamic,
                          "other": sorted(c for t, c in after if t == "other"),
                          "svc": len(elems("ip", "svc"))}))
    """)
    gone = set(out["before"]) - set(out["after"])
    assert gone and gone <= set(out["dynamic"]), out  # s1's 7-endpoint selection chains were deleted
    assert set(out["after"]) < set(out["before"])
    assert out["other"] == out["dynamic"]  # the other table's chains of the same names are untouched
    assert out["svc"] == 1
