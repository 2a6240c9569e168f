"""Side by side with the reference plugins (containernetworking-plugins in /usr/lib/cni)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from cnihelpers import (
    Netns,
    Plugins,
    bridge_conf,
    ip_files,
    ip_json,
    iptables_nat,
    needs_reference,
    netns_path,
    ping,
)

from cni import runtime

pytestmark = [pytest.mark.netns, needs_reference]

Node = tuple[str, Plugins]


def shape(res: dict[str, Any]) -> dict[str, Any]:
    """What must agree between the two implementations: everything but names and MACs that are random."""
    return {
        "cniVersion": res["cniVersion"],
        "interfaces": [sorted(k for k in i) for i in res["interfaces"]],
        "sandbox": [i.get("sandbox") is not None for i in res["interfaces"]],
        "ips": res["ips"],
        "routes": res.get("routes"),
        "dns": res.get("dns"),
    }


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0"])
def test_same_config_same_result(node: Node, netns: Netns, tmp_path: Any, version: str) -> None:
    _, pl = node
    shapes = []
    for ours in (True, False):
        data = str(tmp_path / f"d{ours}")
        conf = bridge_conf(
            "same",
            data,
            "10.244.40.0/24",
            ours=ours,
            bridge=f"kpbr{int(ours)}",
            cniVersion=version,
            isDefaultGateway=True,
            ipMasq=True,
        )
        conf["ipam"]["routes"] = [{"dst": "10.96.0.0/12"}]
        pod = netns.new(f"p{int(ours)}")
        res = pl.ok(conf, "ADD", "c1", netns_path(pod), "eth0")
        assert res is not None
        shapes.append(shape(res))
        assert [r["dst"] for r in ip_json(pod, "route", "show")][:2] == ["default", "10.96.0.0/12"]
        pl.ok(conf, "DEL", "c1", netns_path(pod), "eth0")
    assert shapes[0] == shapes[1]


def test_kproxy_bridge_with_reference_host_local(node: Node, netns: Netns, data_dir: str) -> None:
    nname, pl = node
    conf = bridge_conf("mixa", data_dir, "10.244.41.0/24", ipam_ours=False, ipMasq=True)
    a, b = netns.new("a"), netns.new("b")
    pl.ok(conf, "ADD", "ca", netns_path(a), "eth0")
    pl.ok(conf, "ADD", "cb", netns_path(b), "eth0")
    assert ping(a, "10.244.41.3") and ping(b, "10.244.41.1")
    assert ip_files(data_dir, "mixa") == ["10.244.41.2", "10.244.41.3"]
    pl.ok(conf, "DEL", "ca", netns_path(a), "eth0")
    pl.ok(conf, "DEL", "cb", netns_path(b), "eth0")
    assert ip_files(data_dir, "mixa") == [] and "CNI-" not in iptables_nat(nname)


def test_reference_bridge_with_kproxy_host_local(node: Node, netns: Netns, data_dir: str) -> None:
    nname, pl = node
    conf = bridge_conf("mixb", data_dir, "10.244.42.0/24", ours=False, ipam_ours=True, ipMasq=True)
    a, b = netns.new("a"), netns.new("b")
    pl.ok(conf, "ADD", "ca", netns_path(a), "eth0")
    pl.ok(conf, "ADD", "cb", netns_path(b), "eth0")
    assert ping(a, "10.244.42.3") and ping(b, "10.244.42.1")
    for cid, p in (("ca", a), ("cb", b)):
        pl.ok(conf, "DEL", cid, netns_path(p), "eth0")
    assert ip_files(data_dir, "mixb") == [] and "CNI-" not in iptables_nat(nname)


def test_node_switches_implementation_with_pods_running(node: Node, netns: Netns, data_dir: str) -> None:
    """Pods made by the reference pair are torn down by kproxy's pair (and vice versa), same config."""
    nname, pl = node
    ref = bridge_conf("switch", data_dir, "10.244.43.0/24", ours=False, ipMasq=True)
    ours = bridge_conf("switch", data_dir, "10.244.43.0/24", ours=True, ipMasq=True)
    a, b = netns.new("a"), netns.new("b")
    pl.ok(ref, "ADD", "ca", netns_path(a), "eth0")
    pl.ok(ours, "ADD", "cb", netns_path(b), "eth0")  # same bridge, no duplicate IP
    assert ping(b, "10.244.43.2")
    ra = {"cniVersion": "1.0.0", "ips": [{"address": "10.244.43.2/24"}]}
    pl.ok(dict(ours, prevResult=ra), "DEL", "ca", netns_path(a), "eth0")
    pl.ok(ref, "DEL", "cb", netns_path(b), "eth0")
    assert ip_files(data_dir, "switch") == []
    assert "CNI-" not in iptables_nat(nname)


SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80)); s.listen(4); print("ready", flush=True)
for _ in range(4):
    c, _ = s.accept(); c.sendall(b"hello-from-pod"); c.close()
"""


CLIENT = "import socket; s = socket.create_connection(('10.244.44.1', 8080), timeout=5); print(s.recv(64).decode())"


def test_portmap_chained_after_kproxy_bridge(node: Node, netns: Netns, data_dir: str, cni_path: list[str]) -> None:
    nname, _ = node
    conflist = {
        "cniVersion": "1.0.0",
        "name": "pm",
        "plugins": [
            {k: v for k, v in bridge_conf("pm", data_dir, "10.244.44.0/24", ipMasq=True).items() if k != "name"},
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
        ],
    }
    server, client = netns.new("srv"), netns.new("cli")
    mappings = {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}
    res = runtime.add(
        conflist, "csrv", netns_path(server), "eth0", runtime_config=mappings, cni_path=cni_path, netns_exec=nname
    )
    runtime.add(conflist, "ccli", netns_path(client), "eth0", cni_path=cni_path, netns_exec=nname)
    assert res["ips"][0]["address"] == "10.244.44.2/24"
    assert "--dport 8080" in iptables_nat(nname) and "10.244.44.2:80" in iptables_nat(nname)
    srv = subprocess.Popen(["ip", "netns", "exec", server, sys.executable, "-c", SERVER], stdout=subprocess.PIPE)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == b"ready"
        # the client pod reaches the server pod through the node's hostPort (gateway address), hairpin NAT
        got = subprocess.run(
            ["ip", "netns", "exec", client, sys.executable, "-c", CLIENT],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert got.stdout.strip() == "hello-from-pod", got.stderr
    finally:
        srv.kill()
        srv.wait()
    # CHECK of the bridge with the chain's final result (portmap 1.1.1's own CHECK wrongly looks for an IPv6
    # chain on IPv4-only pods and fails the same way after the reference bridge, so it is left out here)
    bridge_only = dict(conflist, plugins=conflist["plugins"][:1])
    runtime.check(bridge_only, "csrv", netns_path(server), "eth0", prev_result=res, cni_path=cni_path, netns_exec=nname)
    runtime.delete(
        conflist,
        "csrv",
        netns_path(server),
        "eth0",
        prev_result=res,
        runtime_config=mappings,
        cni_path=cni_path,
        netns_exec=nname,
    )
    runtime.delete(conflist, "ccli", netns_path(client), "eth0", cni_path=cni_path, netns_exec=nname)
    assert "8080" not in iptables_nat(nname)
    assert ip_files(data_dir, "pm") == []


def test_kproxy_bridge_with_reference_static_ipam(node: Node, netns: Netns) -> None:
    _, pl = node
    a, b = netns.new("a"), netns.new("b")
    for i, p in enumerate((a, b)):
        conf = {
            "cniVersion": "1.0.0",
            "name": "static",
            "type": "kproxy-bridge",
            "bridge": "kpcnibr0",
            "isGateway": True,
            "ipam": {
                "type": "static",
                "addresses": [{"address": f"10.244.23.{10 + i}/24", "gateway": "10.244.23.1"}],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        }
        res = pl.ok(conf, "ADD", f"c{i}", netns_path(p), "eth0")
        assert res is not None and res["ips"] == [
            {"address": f"10.244.23.{10 + i}/24", "gateway": "10.244.23.1", "interface": 2}
        ]
    assert ping(a, "10.244.23.11") and ping(b, "10.244.23.1")
    pl.ok(conf, "DEL", "c1", netns_path(b), "eth0")
    assert "eth0" not in {x["ifname"] for x in ip_json(b, "link", "show")}
