"""Stale UDP conntrack cleanup against real kernel conntrack entries, inside throw-away namespaces.

Layout (nothing touches the host's namespace)::

    kpops-ct…-node  eth0 10.99.0.1/24 fd00:99::1/64   nft DNAT: VIP 10.96.0.10:53 -> 10.99.0.2:5353,
         | veth                                                 VIP 10.96.0.11:53 -> 10.99.0.3:5353,
    kpops-ct…-eps   eth0 10.99.0.2,.3 fd00:99::2,::3              NodePort 30053 -> .2, 30054 -> .3 (+ IPv6)

Flows are created by sending real datagrams (from the node for VIPs, from the endpoint namespace to the
node's address for NodePorts), listed with the ``conntrack`` tool and deleted by kproxy.conntrack running
in a subprocess inside the node namespace.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("conntrack") is None or not shutil.which("nft"):
    pytest.skip("needs root, ip, nft and conntrack", allow_module_level=True)

NFT = """
table ip kpops {
  chain out {
    type nat hook output priority -100;
    ip daddr 10.96.0.10 udp dport 53 dnat to 10.99.0.2:5353
    ip daddr 10.96.0.11 udp dport 53 dnat to 10.99.0.3:5353
  }
  chain pre {
    type nat hook prerouting priority -100;
    ip daddr 10.99.0.1 udp dport 30053 dnat to 10.99.0.2:5353
    ip daddr 10.99.0.1 udp dport 30054 dnat to 10.99.0.3:5353
  }
}
table ip6 kpops6 {
  chain out {
    type nat hook output priority -100;
    ip6 daddr fd00:96::10 udp dport 53 dnat to [fd00:99::2]:5353
    ip6 daddr fd00:96::11 udp dport 53 dnat to [fd00:99::3]:5353
  }
}
"""


def run(*args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, input=input, timeout=30)


class Netns:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.node = f"kpops-ct{tag}-node"
        self.eps = f"kpops-ct{tag}-eps"
        self.created: list[str] = []

    def setup(self) -> None:
        for ns in (self.node, self.eps):
            run("ip", "netns", "add", ns)
            self.created.append(ns)
        n, e = self.node, self.eps
        run("ip", "-n", n, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", e)
        for ns in (n, e):
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
        run("ip", "-n", n, "addr", "add", "10.99.0.1/24", "dev", "eth0")
        run("ip", "-n", n, "addr", "add", "fd00:99::1/64", "dev", "eth0", "nodad")
        for a in ("10.99.0.2/24", "10.99.0.3/24"):
            run("ip", "-n", e, "addr", "add", a, "dev", "eth0")
        for a in ("fd00:99::2/64", "fd00:99::3/64"):
            run("ip", "-n", e, "addr", "add", a, "dev", "eth0", "nodad")
        for ns in (n, e):
            run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("ip", "-n", n, "route", "add", "default", "dev", "eth0")
        run("ip", "-n", n, "-6", "route", "add", "default", "dev", "eth0")
        run("ip", "netns", "exec", n, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        run("ip", "netns", "exec", n, "nft", "-f", "-", input=NFT)

    def destroy(self) -> None:
        for ns in self.created:
            run("ip", "netns", "del", ns, check=False)

    def send(self, ns: str, flows: list[tuple[str, str, int]]) -> None:
        """Send one datagram per (source address or "", destination, port) from namespace ``ns``."""
        script = textwrap.dedent("""
            import json, socket, sys
            for src, dst, port in json.loads(sys.argv[1]):
                fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
                s = socket.socket(fam, socket.SOCK_DGRAM)
                if src:
                    s.bind((src, 0))
                s.sendto(b"kpops", (dst, port))
                s.close()
        """)
        run("ip", "netns", "exec", ns, sys.executable, "-c", script, json.dumps(flows))

    def entries(self, family: str = "ipv4") -> list[tuple[str, int, str]]:
        """(orig dst, orig dport, reply src) of every UDP flow in the node namespace, per the conntrack tool."""
        out = run("ip", "netns", "exec", self.node, "conntrack", "-L", "-f", family, "-p", "udp", check=False).stdout
        res = []
        for line in out.splitlines():
            srcs = re.findall(r"src=(\S+)", line)
            dsts = re.findall(r"dst=(\S+)", line)
            dports = re.findall(r"dport=(\d+)", line)
            if len(srcs) >= 2 and dsts and dports:
                res.append((dsts[0], int(dports[0]), srcs[1]))
        return sorted(res)

    def kproxy(self, code: str) -> object:
        """Run ``code`` (which must set ``result``) with kproxy inside the node namespace."""
        script = "import json\nfrom kproxy.conntrack import *\nfrom kproxy.snapshot import StaleUDP\n" + code + \
                 "\nprint(json.dumps(result))"
        proc = run("ip", "netns", "exec", self.node, sys.executable, "-c", script, check=False)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def ns():
    n = Netns()
    try:
        n.setup()
        yield n
    finally:
        n.destroy()
    assert not any(x in run("ip", "netns", "list").stdout for x in n.created)


def make_flows(ns: Netns) -> None:
    ns.send(ns.node, [("", "10.96.0.10", 53), ("", "10.96.0.10", 53), ("", "10.96.0.11", 53),
                      ("", "fd00:96::10", 53), ("", "fd00:96::11", 53)])
    ns.send(ns.eps, [("10.99.0.3", "10.99.0.1", 30053), ("10.99.0.2", "10.99.0.1", 30054)])
    assert ns.entries() == sorted([
        ("10.96.0.10", 53, "10.99.0.2"), ("10.96.0.10", 53, "10.99.0.2"), ("10.96.0.11", 53, "10.99.0.3"),
        ("10.99.0.1", 30053, "10.99.0.2"), ("10.99.0.1", 30054, "10.99.0.3"),
    ])
    assert ns.entries("ipv6") == [("fd00:96::10", 53, "fd00:99::2"), ("fd00:96::11", 53, "fd00:99::3")]


@pytest.mark.parametrize("backend", ["netlink", "cli"])
def test_vip_endpoint_vip_only_and_nodeport(ns, backend):
    make_flows(ns)
    # The endpoint 10.99.0.2 left the VIP: both its flows go, the other VIP's flow and NodePorts stay.
    assert ns.kproxy(f"result = delete_stale_udp([StaleUDP('10.96.0.10', 53, 'UDP', '10.99.0.2')], "
                     f"backend={backend!r})") == 2
    assert ns.entries() == [("10.96.0.11", 53, "10.99.0.3"), ("10.99.0.1", 30053, "10.99.0.2"),
                            ("10.99.0.1", 30054, "10.99.0.3")]
    # A record for another endpoint of the VIP deletes nothing.
    assert ns.kproxy(f"result = delete_stale_udp([StaleUDP('10.96.0.11', 53, 'UDP', '10.99.0.9')], "
                     f"backend={backend!r})") == 0
    # NodePort + endpoint: any node address, reply from the endpoint.
    assert ns.kproxy(f"result = delete_stale_udp([StaleUDP('', 30053, 'UDP', '10.99.0.2', node_port=True)], "
                     f"backend={backend!r})") == 1
    assert ns.entries() == [("10.96.0.11", 53, "10.99.0.3"), ("10.99.0.1", 30054, "10.99.0.3")]
    # VIP only (the Service just got endpoints): every flow to vip:port.
    assert ns.kproxy(f"result = delete_stale_udp([StaleUDP('10.96.0.11', 53, 'UDP')], backend={backend!r})") == 1
    assert ns.entries() == [("10.99.0.1", 30054, "10.99.0.3")]
    # IPv6 VIP + endpoint; the other IPv6 flow stays.
    assert ns.kproxy(f"result = delete_stale_udp([StaleUDP('fd00:96::10', 53, 'UDP', 'fd00:99::2')], "
                     f"backend={backend!r})") == 1
    assert ns.entries("ipv6") == [("fd00:96::11", 53, "fd00:99::3")]
    assert ns.entries() == [("10.99.0.1", 30054, "10.99.0.3")]


def test_batch_of_records_in_one_call(ns):
    make_flows(ns)
    records = ("[StaleUDP('10.96.0.10', 53, 'UDP', '10.99.0.2'), StaleUDP('10.96.0.11', 53, 'UDP', '10.99.0.3'),"
               " StaleUDP('', 30054, 'UDP', '', node_port=True), StaleUDP('fd00:96::11', 53, 'UDP'),"
               " StaleUDP('10.96.0.12', 53, 'UDP', '10.99.0.2')]")
    # 2 flows to .10 via .2, 1 to .11 via .3, 1 to NodePort 30054, 1 to fd00:96::11; nothing for .12.
    assert ns.kproxy(f"result = delete_stale_udp({records})") == 5
    assert ns.entries() == [("10.99.0.1", 30053, "10.99.0.2")]
    assert ns.entries("ipv6") == [("fd00:96::10", 53, "fd00:99::2")]


def test_nodeport_addresses_restrict_nodeport_matches(ns):
    make_flows(ns)
    rec = "[StaleUDP('', 30053, 'UDP', '10.99.0.2', node_port=True)]"
    assert ns.kproxy(f"result = delete_stale_udp({rec}, ['192.0.2.0/24'])") == 0
    assert ("10.99.0.1", 30053, "10.99.0.2") in ns.entries()
    assert ns.kproxy(f"result = delete_stale_udp({rec}, ['10.99.0.0/24'])") == 1
    assert ("10.99.0.1", 30053, "10.99.0.2") not in ns.entries()


def test_called_from_a_running_event_loop(ns):
    make_flows(ns)
    code = textwrap.dedent("""
        import asyncio
        async def main():
            return delete_stale_udp([StaleUDP('10.96.0.10', 53, 'UDP', '10.99.0.2')])
        result = asyncio.run(main())
    """)
    assert ns.kproxy(code) == 2
    assert ("10.96.0.10", 53, "10.99.0.2") not in ns.entries()


def test_set_sysctls_in_a_namespace(ns, tmp_path):
    host_udp = Path("/proc/sys/net/netfilter/nf_conntrack_udp_timeout").read_text().strip()
    code = textwrap.dedent(f"""
        from kproxy.config import ProxyConfig
        cfg = ProxyConfig(conntrack_udp_timeout=45.0, conntrack_udp_stream_timeout=150.0,
                          conntrack_tcp_established_timeout=7200.0, conntrack_tcp_close_wait_timeout=1800.0)
        changed = set_sysctls(cfg, sys_root={str(tmp_path)!r})
        vals = {{n: int(open('/proc/sys/net/netfilter/' + n).read()) for n in (
            'nf_conntrack_udp_timeout', 'nf_conntrack_udp_timeout_stream',
            'nf_conntrack_tcp_timeout_established', 'nf_conntrack_tcp_timeout_close_wait')}}
        again = set_sysctls(cfg, sys_root={str(tmp_path)!r})
        result = [changed, vals, again]
    """)
    changed, vals, again = ns.kproxy(code)
    assert vals == {"nf_conntrack_udp_timeout": 45, "nf_conntrack_udp_timeout_stream": 150,
                    "nf_conntrack_tcp_timeout_established": 7200, "nf_conntrack_tcp_timeout_close_wait": 1800}
    # nf_conntrack_max is read-only outside the initial namespace: skipped, not an error.
    assert "nf_conntrack_max" not in changed
    assert set(changed) == set(vals)
    assert again == {}  # values already in place are not rewritten
    assert Path("/proc/sys/net/netfilter/nf_conntrack_udp_timeout").read_text().strip() == host_udp


def test_conntrack_max_rule():
    from kproxy.conntrack import conntrack_max

    assert conntrack_max(32768, 131072, cpus=2) == 131072
    assert conntrack_max(32768, 131072, cpus=8) == 262144
    assert conntrack_max(0, 131072, cpus=8) == 0


@pytest.mark.parametrize("backend", ["netlink", "cli"])
def test_reconciler_metrics_per_family(ns, backend):
    make_flows(ns)
    code = textwrap.dedent(f"""
        from kproxy.metrics import ProxyMetrics
        m = ProxyMetrics('iptables', families=('IPv4', 'IPv6'), process=False)
        n = delete_stale_udp([StaleUDP('10.96.0.10', 53, 'UDP', '10.99.0.2'),
                              StaleUDP('fd00:96::11', 53, 'UDP', 'fd00:99::3')], backend={backend!r}, metrics=m)
        deleted = {{f: m.conntrack_reconciler_deleted_entries_total.labels(ip_family=f)._value.get()
                   for f in ('IPv4', 'IPv6')}}
        count = {{s.labels['ip_family']: s.value for f in m.registry.collect()
                 if f.name == 'kubeproxy_conntrack_reconciler_sync_duration_seconds'
                 for s in f.samples if s.name.endswith('_count')}}
        result = [n, deleted, count]
    """)
    n, deleted, count = ns.kproxy(code)
    assert n == 3
    assert deleted == {"IPv4": 2, "IPv6": 1}
    assert count == {"IPv4": 1, "IPv6": 1}
