"""kproxy-bridge in real network namespaces: a node netns (bridge, iptables) and pod netns per test."""

from __future__ import annotations

import os
import subprocess

import pytest
from cnihelpers import (
    Netns,
    Plugins,
    bridge_conf,
    ip_files,
    ip_json,
    iptables_nat,
    netns_path,
    ping,
)

pytestmark = pytest.mark.netns

Node = tuple[str, Plugins]


def links(ns: str) -> dict[str, dict]:
    return {link["ifname"]: link for link in ip_json(ns, "-d", "link", "show")}


def addrs(ns: str, ifname: str) -> set[str]:
    out = set()
    for itf in ip_json(ns, "addr", "show", "dev", ifname):
        for a in itf.get("addr_info", []):
            if a.get("scope") != "link":
                out.add(f"{a['local']}/{a['prefixlen']}")
    return out


def test_two_pods_ping_each_other_and_gateway(node: Node, netns: Netns, data_dir: str) -> None:
    nname, pl = node
    conf = bridge_conf("t1", data_dir, "10.244.11.0/24", mtu=1400, ipMasq=True, hairpinMode=True)
    pods = [netns.new("a"), netns.new("b")]
    res = [pl.ok(conf, "ADD", f"cid-{p}", netns_path(p), "eth0") for p in pods]
    ips = [r["ips"][0]["address"].split("/")[0] for r in res]
    assert ips == ["10.244.11.2", "10.244.11.3"]

    # result layout like the reference: bridge, host veth, container interface (with sandbox)
    r0 = res[0]
    assert r0["interfaces"][0]["name"] == "kpcnibr0"
    assert r0["interfaces"][1]["name"].startswith("veth")
    assert r0["interfaces"][2] == {
        "name": "eth0",
        "mac": links(pods[0])["eth0"]["address"],
        "sandbox": netns_path(pods[0]),
    }  # no "mtu": that interface field only exists from CNI 1.1.0 on
    assert r0["ips"] == [{"address": "10.244.11.2/24", "gateway": "10.244.11.1", "interface": 2}]
    assert r0["routes"] == [{"dst": "0.0.0.0/0"}] and r0["dns"] == {}

    # kernel state: MTU everywhere, addresses, routes, bridge port flags, gateway on bridge, forwarding
    eth0 = links(pods[0])["eth0"]
    assert eth0["mtu"] == 1400 and "UP" in eth0["flags"]
    assert addrs(pods[0], "eth0") == {"10.244.11.2/24"}
    routes = ip_json(pods[0], "route", "show")
    assert {"dst": "default", "gateway": "10.244.11.1", "dev": "eth0"}.items() <= routes[0].items()
    node_links = links(nname)
    hv = node_links[r0["interfaces"][1]["name"]]
    assert hv["master"] == "kpcnibr0" and hv["mtu"] == 1400
    assert hv["linkinfo"]["info_slave_data"]["hairpin"] is True
    assert addrs(nname, "kpcnibr0") == {"10.244.11.1/24"}
    fwd = subprocess.run(
        ["ip", "netns", "exec", nname, "cat", "/proc/sys/net/ipv4/ip_forward"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert fwd == "1"

    assert ping(pods[0], ips[1]) and ping(pods[1], ips[0])
    assert ping(pods[0], "10.244.11.1")

    # ipMasq: the reference chain layout, one chain per pod
    nat = iptables_nat(nname)
    for p, ip in zip(pods, ips, strict=True):
        assert f'-A POSTROUTING -s {ip}/32 -m comment --comment "name: \\"t1\\" id: \\"cid-{p}\\"" -j CNI-' in nat
    assert nat.count("-j MASQUERADE") == 2


def test_check_then_break_interface(node: Node, netns: Netns, data_dir: str) -> None:
    _, pl = node
    conf = bridge_conf("chk", data_dir, "10.244.12.0/24", isDefaultGateway=True)
    pod = netns.new("p")
    res = pl.ok(conf, "ADD", "c1", netns_path(pod), "eth0")
    assert res["routes"] == [{"dst": "0.0.0.0/0"}]  # isDefaultGateway does not duplicate the IPAM default
    conf_chk = dict(conf, prevResult=res)
    assert pl.call(conf_chk, "CHECK", "c1", netns_path(pod), "eth0") == (0, None)
    subprocess.run(["ip", "-n", pod, "addr", "flush", "dev", "eth0"], check=True)
    rc, out = pl.call(conf_chk, "CHECK", "c1", netns_path(pod), "eth0")
    assert rc == 1 and out is not None and "10.244.12.2/24" in out["msg"]
    subprocess.run(["ip", "-n", pod, "link", "set", "eth0", "down"], check=True)
    rc, out = pl.call(conf_chk, "CHECK", "c1", netns_path(pod), "eth0")
    assert rc == 1 and out is not None and "down" in out["msg"]


def test_del_twice_and_after_netns_is_gone_leaves_nothing(node: Node, netns: Netns, data_dir: str) -> None:
    nname, pl = node
    conf = bridge_conf("del", data_dir, "10.244.13.0/24", ipMasq=True)
    pods = [netns.new("a"), netns.new("b")]
    res = [pl.ok(conf, "ADD", f"c{i}", netns_path(p), "eth0") for i, p in enumerate(pods)]
    assert len(ip_files(data_dir, "del")) == 2
    pl.ok(conf, "DEL", "c0", netns_path(pods[0]), "eth0")
    pl.ok(conf, "DEL", "c0", netns_path(pods[0]), "eth0")
    assert "eth0" not in links(pods[0])
    # second pod: the runtime deletes the netns first, then calls DEL (also without CNI_NETNS)
    netns.delete(pods[1])
    pl.ok(dict(conf, prevResult=res[1]), "DEL", "c1", netns_path(pods[1]), "eth0")
    pl.ok(conf, "DEL", "c1", "", "eth0")
    stale = os.path.join(os.path.dirname(data_dir), "stale-netns")  # a path that exists but is no netns
    open(stale, "w").close()
    pl.ok(conf, "DEL", "c1", stale, "eth0")
    assert ip_files(data_dir, "del") == []
    assert [n for n in links(nname) if n.startswith("veth")] == []
    assert "CNI-" not in iptables_nat(nname)


def test_failed_add_rolls_back_everything(node: Node, netns: Netns, data_dir: str) -> None:
    nname, pl = node
    conf = bridge_conf("full", data_dir, "10.244.14.0/30", ipMasq=True)  # exactly one pod address
    a, b = netns.new("a"), netns.new("b")
    pl.ok(conf, "ADD", "ca", netns_path(a), "eth0")
    before_files = ip_files(data_dir, "full")
    rc, out = pl.call(conf, "ADD", "cb", netns_path(b), "eth0")
    assert rc == 1 and out is not None and out["code"] == 999 and "no IP addresses available" in out["msg"]
    # unlike the reference bridge, no DOWN veth is left behind in the pod or on the node
    assert "eth0" not in links(b)
    assert len([n for n in links(nname) if n.startswith("veth")]) == 1
    assert ip_files(data_dir, "full") == before_files
    assert iptables_nat(nname).count("-j MASQUERADE") == 1
    # a second ADD for an existing attachment fails without disturbing the first one
    rc, out = pl.call(conf, "ADD", "ca", netns_path(a), "eth0")
    assert rc == 1 and out is not None and "already exists" in out["msg"]
    assert ip_files(data_dir, "full") == before_files and iptables_nat(nname).count("-j MASQUERADE") == 1
    assert ping(a, "10.244.14.1")


def test_nonexistent_netns(node: Node, data_dir: str) -> None:
    nname, pl = node
    conf = bridge_conf("nons", data_dir, "10.244.15.0/24")
    rc, out = pl.call(conf, "ADD", "c1", "/var/run/netns/kpcni-does-not-exist", "eth0")
    assert rc == 1 and out is not None and out["code"] == 3
    assert ip_files(data_dir, "nons") == []
    assert [n for n in links(nname) if n.startswith("veth")] == []
    pl.ok(conf, "DEL", "c1", "/var/run/netns/kpcni-does-not-exist", "eth0")


@pytest.mark.parametrize(
    ("raw", "drop", "code"),
    [
        (b'{"cniVersion": "1.0.0", "name": "x", "type": "kproxy-bridge", ', (), 6),
        (b'{"cniVersion": "0.2.0", "name": "x", "type": "kproxy-bridge"}', (), 1),
        (b'{"cniVersion": "1.0.0", "name": "x", "type": "kproxy-bridge", "mtu": "big"}', (), 7),
        (b'{"cniVersion": "1.0.0", "name": "x", "type": "kproxy-bridge", "vlan": 5000}', (), 7),
        (None, ("CNI_NETNS",), 4),
        (None, ("CNI_COMMAND",), 4),
    ],
)
def test_bridge_errors_leak_nothing(
    node: Node, netns: Netns, data_dir: str, raw: bytes | None, drop: tuple[str, ...], code: int
) -> None:
    nname, pl = node
    pod = netns.new("p")
    conf = bridge_conf("err", data_dir, "10.244.16.0/24")
    rc, out = pl.call(conf, "ADD", "c1", netns_path(pod), "eth0", raw=raw, env_drop=drop)
    assert rc == 1 and out is not None and out["code"] == code, out
    assert ip_files(data_dir, "err") == []
    assert set(links(nname)) == {"lo"} and set(links(pod)) == {"lo"}


def test_dual_stack_pods(node: Node, netns: Netns, data_dir: str) -> None:
    nname, pl = node
    conf = bridge_conf("ds", data_dir, "10.244.17.0/24", ipMasq=True)
    conf["ipam"]["ranges"] = [[{"subnet": "10.244.17.0/24"}], [{"subnet": "fd00:17::/64"}]]
    conf["ipam"]["routes"] = [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]
    a, b = netns.new("a"), netns.new("b")
    ra = pl.ok(conf, "ADD", "ca", netns_path(a), "eth0")
    pl.ok(conf, "ADD", "cb", netns_path(b), "eth0")
    assert [ip["address"] for ip in ra["ips"]] == ["10.244.17.2/24", "fd00:17::2/64"]
    assert ping(a, "fd00:17::3") and ping(b, "fd00:17::2") and ping(a, "fd00:17::1") and ping(a, "10.244.17.3")
    v6routes = ip_json(a, "-6", "route", "show", "default")
    assert v6routes and v6routes[0]["gateway"] == "fd00:17::1"
    assert "MASQUERADE" in iptables_nat(nname, v6=True)
    for cid, p in (("ca", a), ("cb", b)):
        pl.ok(conf, "DEL", cid, netns_path(p), "eth0")
    assert "CNI-" not in iptables_nat(nname, v6=True) and "CNI-" not in iptables_nat(nname)


def test_vlan_isolates_pods(node: Node, netns: Netns, data_dir: str) -> None:
    nname, pl = node
    probe = subprocess.run(
        ["ip", "-n", nname, "link", "add", "kpvlprobe", "type", "bridge", "vlan_filtering", "1"], capture_output=True
    )
    if probe.returncode != 0:
        # e.g. a kernel without CONFIG_BRIDGE_VLAN_FILTERING: the reference bridge fails the same way
        rc, out = pl.call(
            bridge_conf("vl", data_dir, "10.244.18.0/24", vlan=100), "ADD", "c", netns_path(netns.new("x")), "eth0"
        )
        assert rc == 1 and out is not None and "VLAN filtering" in out["msg"] and ip_files(data_dir, "vl") == []
        pytest.skip("kernel has no bridge VLAN filtering")
    subprocess.run(["ip", "-n", nname, "link", "del", "kpvlprobe"], check=True)
    a, b, c = netns.new("a"), netns.new("b"), netns.new("c")
    v100 = bridge_conf("vl", data_dir, "10.244.18.0/24", vlan=100, isGateway=False)
    v200 = dict(v100, vlan=200)
    pl.ok(v100, "ADD", "ca", netns_path(a), "eth0")
    pl.ok(v100, "ADD", "cb", netns_path(b), "eth0")
    pl.ok(v200, "ADD", "cc", netns_path(c), "eth0")
    assert ping(a, "10.244.18.3")
    assert not ping(a, "10.244.18.4", timeout=1.0)


def test_macspoofchk_drops_frames_with_a_foreign_mac(node: Node, netns: Netns, data_dir: str) -> None:
    nname, pl = node
    conf = bridge_conf("ms", data_dir, "10.244.22.0/24", macspoofchk=True)
    a, b = netns.new("a"), netns.new("b")
    pl.ok(conf, "ADD", "ca", netns_path(a), "eth0")
    pl.ok(conf, "ADD", "cb", netns_path(b), "eth0")
    assert ping(a, "10.244.22.3")
    ruleset = subprocess.run(
        ["ip", "netns", "exec", nname, "nft", "list", "table", "bridge", "kproxy-cni"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert ruleset.count("ether saddr !=") == 2
    subprocess.run(["ip", "-n", a, "link", "set", "eth0", "address", "02:00:00:00:00:99"], check=True)
    subprocess.run(["ip", "-n", a, "neigh", "flush", "all"], check=True)
    assert not ping(a, "10.244.22.3", timeout=1.5)
    for cid, p in (("ca", a), ("cb", b)):
        pl.ok(conf, "DEL", cid, netns_path(p), "eth0")
        pl.ok(conf, "DEL", cid, netns_path(p), "eth0")
    ruleset = subprocess.run(
        ["ip", "netns", "exec", nname, "nft", "list", "table", "bridge", "kproxy-cni"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "chain" not in ruleset


def test_forceaddress_and_existing_bridge_address(node: Node, netns: Netns, data_dir: str) -> None:
    nname, pl = node
    subprocess.run(["ip", "-n", nname, "link", "add", "kpcnibr0", "type", "bridge"], check=True)
    subprocess.run(["ip", "-n", nname, "addr", "add", "10.244.19.254/24", "dev", "kpcnibr0"], check=True)
    conf = bridge_conf("fa", data_dir, "10.244.19.0/24")
    a = netns.new("a")
    rc, out = pl.call(conf, "ADD", "ca", netns_path(a), "eth0")
    assert rc == 1 and out is not None and "already has an IP address" in out["msg"]
    assert ip_files(data_dir, "fa") == [] and "eth0" not in links(a)
    pl.ok(dict(conf, forceAddress=True), "ADD", "ca", netns_path(a), "eth0")
    assert addrs(nname, "kpcnibr0") == {"10.244.19.1/24"}


def test_version_status_gc(node: Node, netns: Netns, data_dir: str) -> None:
    nname, pl = node
    rc, out = pl.call({"type": "kproxy-bridge", "cniVersion": "1.0.0"}, "VERSION")
    assert rc == 0 and out is not None and out["supportedVersions"][-1] == "1.1.0" and out["cniVersion"] == "1.0.0"
    conf = bridge_conf("gc", data_dir, "10.244.20.0/24", ipMasq=True, cniVersion="1.1.0")
    assert pl.call(conf, "STATUS") == (0, None)
    pods = [netns.new(t) for t in "abc"]
    for i, p in enumerate(pods):
        pl.ok(conf, "ADD", f"c{i}", netns_path(p), "eth0")
    # the runtime lost track of c0 and c2 (e.g. a crash): GC frees their IPs and masquerade chains
    gc = dict(conf, **{"cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}]})
    assert pl.call(gc, "GC") == (0, None)
    assert ip_files(data_dir, "gc") == ["10.244.20.3"]
    nat = iptables_nat(nname)
    assert nat.count("-j MASQUERADE") == 1 and 'id: \\"c1\\"' in nat
    # STATUS is delegated to IPAM: an exhausted range makes the network "not available"
    tiny = bridge_conf("gc2", data_dir, "10.244.21.0/30", cniVersion="1.1.0", bridge="kpcnibr1")
    pl.ok(tiny, "ADD", "x", netns_path(pods[0]), "eth1")
    rc, out = pl.call(tiny, "STATUS")
    assert rc == 1 and out is not None and out["code"] == 50


def test_installed_console_scripts_answer_version() -> None:
    import sys

    bindir = os.path.dirname(sys.executable)
    for name in ("kproxy-bridge", "kproxy-host-local"):
        exe = os.path.join(bindir, name)
        if not os.access(exe, os.X_OK):
            pytest.skip(f"{name} console script not installed in {bindir}")
        p = subprocess.run(
            [exe], input=b'{"cniVersion": "0.4.0"}', env={"CNI_COMMAND": "VERSION"}, capture_output=True, check=True
        )
        assert b'"supportedVersions"' in p.stdout and b'"0.4.0"' in p.stdout


def test_add_retried_after_lost_interface_is_idempotent(node: Node, netns: Netns, data_dir: str) -> None:
    """A retried ADD (e.g. the runtime crashed and the pod's interface is gone) reuses the allocation and
    re-installs the masquerade rules without duplicating them."""
    nname, pl = node
    conf = bridge_conf("retry", data_dir, "10.244.24.0/24", ipMasq=True)
    a, b = netns.new("a"), netns.new("b")
    first = pl.ok(conf, "ADD", "ca", netns_path(a), "eth0")
    pl.ok(conf, "ADD", "cb", netns_path(b), "eth0")
    subprocess.run(["ip", "-n", a, "link", "del", "eth0"], check=True)
    again = pl.ok(conf, "ADD", "ca", netns_path(a), "eth0")
    assert first is not None and again is not None and again["ips"] == first["ips"]
    nat = iptables_nat(nname)
    assert nat.count("-A POSTROUTING -s 10.244.24.2/32") == 1 and nat.count("-j MASQUERADE") == 2
    assert ip_files(data_dir, "retry") == ["10.244.24.2", "10.244.24.3"]
    assert ping(a, "10.244.24.3")
