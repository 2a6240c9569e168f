"""In-process unit tests: JSON fast path, result conversion, allocator iteration, install script."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from typing import Any

import pytest
from cnihelpers import REPO, Netns, Plugins, bridge_conf, ip_files, ip_json, netns_path, ping
from hypothesis import given
from hypothesis import strategies as st

from cni import _json, runtime
from cni._ip import IP, Net
from cni._skel import CNIError, convert_result, parse_invocation
from cni.host_local import Range, _iter_candidates

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@given(json_values)
def test_json_fast_path_matches_stdlib(value: Any) -> None:
    text = json.dumps(value)
    assert _json.dumps(value) == text
    assert _json.loads(text) == json.loads(text)
    assert _json.loads(f" \n{text}\t".encode()) == json.loads(text)


@pytest.mark.parametrize("bad", ["", "{", "[1,]", "[1] 2", '{"a" 1}', "nul", '"\\x"'])
def test_json_fast_path_rejects_like_stdlib(bad: str) -> None:
    with pytest.raises(ValueError):
        json.loads(bad)
    with pytest.raises(ValueError):
        _json.loads(bad)


RESULT = {
    "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/x", "mtu": 1400}],
    "ips": [
        {"address": "10.0.0.2/24", "gateway": "10.0.0.1", "interface": 0},
        {"address": "fd00::2/64", "interface": 0},
    ],
    "routes": [{"dst": "0.0.0.0/0", "mtu": 1300, "priority": 5}],
    "dns": {"nameservers": ["10.96.0.10"]},
}


def test_convert_result_per_version() -> None:
    r03 = convert_result(RESULT, "0.3.1")
    assert [ip["version"] for ip in r03["ips"]] == ["4", "6"]
    assert r03["routes"] == [{"dst": "0.0.0.0/0"}] and "mtu" not in r03["interfaces"][0]
    r10 = convert_result(RESULT, "1.0.0")
    assert all("version" not in ip for ip in r10["ips"]) and r10["routes"] == [{"dst": "0.0.0.0/0"}]
    r11 = convert_result(RESULT, "1.1.0")
    assert r11["routes"] == [{"dst": "0.0.0.0/0", "mtu": 1300, "priority": 5}] and r11["interfaces"][0]["mtu"] == 1400
    assert r11["dns"] == {"nameservers": ["10.96.0.10"]} and r11["cniVersion"] == "1.1.0"


@pytest.mark.parametrize(
    ("env", "raw", "code"),
    [
        ({}, b"{}", 4),
        ({"CNI_COMMAND": "FROB"}, b"{}", 4),
        (
            {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "-bad", "CNI_NETNS": "/x", "CNI_IFNAME": "e", "CNI_PATH": "/"},
            b'{"cniVersion":"1.0.0","name":"n"}',
            4,
        ),
        (
            {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "ok", "CNI_NETNS": "/x", "CNI_IFNAME": "a/b", "CNI_PATH": "/"},
            b'{"cniVersion":"1.0.0","name":"n"}',
            4,
        ),
        (
            {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "ok", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0", "CNI_PATH": "/"},
            b'{"name":"n"}',
            1,
        ),
        (
            {"CNI_COMMAND": "CHECK", "CNI_CONTAINERID": "ok", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0", "CNI_PATH": "/"},
            b'{"cniVersion":"0.3.1","name":"n"}',
            1,
        ),
        (
            {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "ok", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0", "CNI_PATH": "/"},
            b'{"cniVersion":"1.0.0"}',
            7,
        ),
    ],
)
def test_parse_invocation_errors(env: dict[str, str], raw: bytes, code: int) -> None:
    with pytest.raises(CNIError) as ei:
        parse_invocation(env, raw)
    assert ei.value.code == code


v4 = st.integers(0, 2**32 - 1).map(lambda v: ipaddress.IPv4Address(v))
v6 = (
    st.integers(0, 2**128 - 1)
    .map(lambda v: ipaddress.IPv6Address(v))
    .filter(
        lambda a: a.ipv4_mapped is None and a not in ipaddress.ip_network("::/96")  # dotted-quad spellings differ
    )
)


@given(st.one_of(v4, v6), st.integers(0, 128), st.integers(-3, 3))
def test_ip_arithmetic_matches_ipaddress(addr: Any, plen: int, delta: int) -> None:
    ip = IP.parse(str(addr))
    assert str(ip) == str(addr) and ip.version == addr.version and ip.value == int(addr)
    assert IP.parse(str(ip)) == ip and hash(IP.parse(str(ip))) == hash(ip)
    if 0 <= int(addr) + delta < 2 ** (32 if addr.version == 4 else 128):
        assert str(ip + delta) == str(addr + delta)
        assert (ip + delta > ip) == (delta > 0) and (ip + delta == ip) == (delta == 0)
    plen = min(plen, addr.max_prefixlen)
    net, ref = Net.parse(f"{addr}/{plen}"), ipaddress.ip_network(f"{addr}/{plen}", strict=False)
    assert str(net) == str(ref) and str(net.broadcast_address) == str(ref.broadcast_address)
    assert (ip in net) and (IP.parse(str(ref.network_address)) in net)
    assert ip.is_link_local == addr.is_link_local


@pytest.mark.parametrize("bad", ["", "1.2.3", "1.2.3.256", "010.1.1.1", "fe80::1::2", "10.0.0.0/33x", "lock"])
def test_ip_parse_rejects_garbage(bad: str) -> None:
    with pytest.raises(ValueError):
        Net.parse(bad)


def _ranges(*specs: dict[str, str]) -> list[Range]:
    return [Range(s) for s in specs]


def test_iteration_order_matches_reference_semantics() -> None:
    rs = _ranges({"subnet": "10.0.0.0/29"}, {"subnet": "10.0.1.0/30"})
    ip = IP.parse
    fresh = [str(x) for x in _iter_candidates(rs, None)]
    assert fresh == ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.1.1", "10.0.1.2"]
    after = [str(x) for x in _iter_candidates(rs, ip("10.0.0.6"))]
    assert after == ["10.0.1.1", "10.0.1.2", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
    # a last-reserved IP outside the set (config changed) restarts at the beginning
    assert [str(x) for x in _iter_candidates(rs, ip("192.168.0.1"))] == fresh


def test_install_script_layout_conflist_and_reinstall(tmp_path: Any) -> None:
    bindir, confdir = tmp_path / "bin", tmp_path / "net.d"
    cmd = [
        os.path.join(REPO, "deploy", "cni", "install-cni.sh"),
        "--bin-dir",
        str(bindir),
        "--conf-dir",
        str(confdir),
        "--pod-cidr",
        "10.244.77.0/24",
    ]
    env = dict(os.environ, SRC_PYTHON=sys.executable)
    for _ in range(2):  # idempotent re-run (an upgrade)
        subprocess.run(cmd, check=True, env=env, capture_output=True)
    assert sorted(os.listdir(bindir)) == ["kproxy-bridge", "kproxy-cni.d", "kproxy-host-local"]
    assert sorted(os.listdir(bindir / "kproxy-cni.d")) == ["cni", "pyroute2"]
    with open(bindir / "kproxy-bridge") as f:
        assert f.readline() == "#!/usr/bin/python3 -SE\n"
    conflist = json.loads((confdir / "10-kproxy.conflist").read_text())
    assert conflist["plugins"][0]["type"] == "kproxy-bridge"
    assert conflist["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "10.244.77.0/24"}]]
    out = subprocess.run(
        [str(bindir / "kproxy-host-local")],
        input=b"{}",
        env={"CNI_COMMAND": "VERSION"},
        capture_output=True,
        check=True,
    ).stdout
    assert json.loads(out)["supportedVersions"][-1] == "1.1.0"


@pytest.mark.netns
def test_shipped_conflist_brings_up_a_pod(netns: Netns, tmp_path: Any, cni_path: list[str]) -> None:
    """deploy/cni/10-kproxy.conflist as installed, driven through cni.runtime (what kproxy demo uses)."""
    confdir = tmp_path / "net.d"
    subprocess.run(
        [
            os.path.join(REPO, "deploy", "cni", "install-cni.sh"),
            "--bin-dir",
            str(tmp_path / "bin"),
            "--conf-dir",
            str(confdir),
            "--pod-cidr",
            "10.244.78.0/24",
        ],
        check=True,
        env=dict(os.environ, SRC_PYTHON=sys.executable),
        capture_output=True,
    )
    conflist = json.loads((confdir / "10-kproxy.conflist").read_text())
    conflist["plugins"][0]["ipam"]["dataDir"] = str(tmp_path / "ipam")  # keep the node's /var/lib/cni untouched
    node, a, b = netns.new("node"), netns.new("a"), netns.new("b")
    ra = runtime.add(conflist, "ca", netns_path(a), "eth0", cni_path=cni_path, netns_exec=node)
    runtime.add(conflist, "cb", netns_path(b), "eth0", cni_path=cni_path, netns_exec=node)
    assert ra["ips"][0]["address"] == "10.244.78.2/24" and ra["cniVersion"] == "1.1.0"
    assert {"dst": "0.0.0.0/0", "gw": "10.244.78.1"} in ra["routes"]  # isDefaultGateway
    assert ping(a, "10.244.78.3")
    runtime.check(conflist, "ca", netns_path(a), "eth0", prev_result=ra, cni_path=cni_path, netns_exec=node)
    runtime.status(conflist, cni_path=cni_path, netns_exec=node)
    runtime.gc(conflist, [{"containerID": "ca", "ifname": "eth0"}], cni_path=cni_path, netns_exec=node)
    assert ip_files(str(tmp_path / "ipam"), "kproxy") == ["10.244.78.2"]
    with pytest.raises(runtime.PluginError) as ei:
        runtime.add(conflist, "ca", "/var/run/netns/kpcni-none", "eth0", cni_path=cni_path, netns_exec=node)
    assert ei.value.code == 3
    runtime.delete(conflist, "ca", netns_path(a), "eth0", prev_result=ra, cni_path=cni_path, netns_exec=node)
    runtime.delete(conflist, "cb", netns_path(b), "eth0", cni_path=cni_path, netns_exec=node)
    assert ip_files(str(tmp_path / "ipam"), "kproxy") == []
    assert runtime.version("kproxy-bridge", cni_path=cni_path)["supportedVersions"][0] == "0.3.0"


@pytest.mark.netns
def test_promisc_mode(node: tuple[str, Plugins], netns: Netns, data_dir: str) -> None:
    nname, pl = node
    pod = netns.new("p")
    pl.ok(bridge_conf("pr", data_dir, "10.244.79.0/24", promiscMode=True), "ADD", "c", netns_path(pod), "eth0")
    br = ip_json(nname, "-d", "link", "show", "kpcnibr0")[0]
    assert br["promiscuity"] >= 1


LINK_MESSAGES = [
    {
        "attrs": [
            ("IFLA_IFNAME", "br0"),
            ("IFLA_MTU", 1400),
            (
                "IFLA_LINKINFO",
                {
                    "attrs": [
                        ("IFLA_INFO_KIND", "bridge"),
                        ("IFLA_INFO_DATA", {"attrs": [("IFLA_BR_VLAN_FILTERING", 1)]}),
                    ]
                },
            ),
        ]
    },
    {
        "attrs": [
            ("IFLA_IFNAME", "vethx"),
            ("IFLA_MTU", 1400),
            (
                "IFLA_LINKINFO",
                {
                    "attrs": [
                        ("IFLA_INFO_KIND", "veth"),
                        (
                            "IFLA_INFO_DATA",
                            {
                                "attrs": [
                                    (
                                        "VETH_INFO_PEER",
                                        {"attrs": [("IFLA_IFNAME", "eth0"), ("IFLA_NET_NS_FD", 5), ("IFLA_MTU", 1400)]},
                                    )
                                ]
                            },
                        ),
                    ]
                },
            ),
        ]
    },
    {"index": 7, "flags": 1, "change": 1, "attrs": [("IFLA_MASTER", 3)]},
    {
        "family": 7,
        "index": 7,
        "attrs": [
            ("IFLA_PROTINFO", {"attrs": [("IFLA_BRPORT_MODE", 1)]}),
            (
                "IFLA_AF_SPEC",
                {"attrs": [("IFLA_BRIDGE_FLAGS", 2), ("IFLA_BRIDGE_VLAN_INFO", {"flags": 6, "vid": 100})]},
            ),
        ],
    },
    {"index": 0, "attrs": [("IFLA_IFNAME", "eth0")]},
]


@pytest.mark.parametrize("spec", LINK_MESSAGES)
def test_link_message_subset_encodes_like_pyroute2(spec: dict[str, Any]) -> None:
    """cni._rtnl.ifinfmsg must put the same bytes on the wire as pyroute2's full ifinfmsg."""
    from pyroute2.netlink import NLA_F_NESTED
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg as full
    from pyroute2.netlink.rtnl.ifinfmsg import protinfo_bridge

    from cni._rtnl import ifinfmsg as subset

    saved = protinfo_bridge.nla_flags
    protinfo_bridge.nla_flags = NLA_F_NESTED  # what the kernel requires for IFLA_PROTINFO
    try:
        wire = []
        for cls in (full, subset):
            m = cls()
            for k, v in spec.items():
                m[k] = v
            m["header"]["type"], m["header"]["flags"], m["header"]["sequence_number"] = 16, 5, 1
            m.encode()
            wire.append(m.data)
    finally:
        protinfo_bridge.nla_flags = saved
    assert wire[0] == wire[1]


def test_link_message_subset_decodes_kernel_replies() -> None:
    """Decode a real RTM_NEWLINK dump (loopback and whatever else exists) with the subset."""
    from cni import _nl

    with _nl.NL() as nl:
        links = nl.links()
        lo = nl.link("lo")
    assert lo is not None and lo.index == 1 and lo.mac == "00:00:00:00:00:00" and lo.mtu > 0
    assert any(link.name == "lo" for link in links)
    import pyroute2  # still the real package afterwards

    assert hasattr(pyroute2, "IPRoute")
