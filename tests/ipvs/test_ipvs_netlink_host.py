"""The IPVS mode's netlink clients against the host kernel (ipset and rtnetlink work here; IPVS does not).

Each test runs a small program inside a network namespace it creates: the ipset listing must read back
exactly what ``ipset save`` prints, and a batch whose requests ask for no ACK but the last must still name
every failed request.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from kproxy.testing.topology import scratch_netns

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120),
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
              pytest.mark.skipif(shutil.which("ipset") is None, reason="needs the ipset tool")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def netns() -> Iterator[str]:
    with scratch_netns("kpipvs") as name:
        yield name


def run_in(ns: str, program: str) -> Any:
    code = f"import sys; sys.path.insert(0, {ROOT!r})\n" + textwrap.dedent(program)
    p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=100)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


MEMBERS = {
    "KUBE-CLUSTER-IP": ["10.96.0.1,tcp:80", "10.96.0.2,udp:53", "10.96.0.3,sctp:9"],
    "KUBE-LOOP-BACK": ["10.0.0.1,tcp:8080,10.0.0.1"],
    "KUBE-LOAD-BALANCER-SOURCE-CIDR": ["1.2.3.4,tcp:80,10.0.0.0/8", "1.2.3.4,tcp:80,10.0.0.9/32"],
    "KUBE-NODE-PORT-TCP": ["30000", "31234"],
    "KUBE-IPVS-IPS": ["10.96.0.1"],
    "KUBE-6-CLUSTER-IP": ["fd00::1,tcp:80"],
    "KUBE-6-LOOP-BACK": ["fd00:1::5,tcp:80,fd00:1::5"],
    "KUBE-6-LB-SOURCE-CIDR": ["fd00::7,tcp:443,fd01::/64"],
}


def test_ipset_listing_reads_back_what_ipset_save_prints(netns: str) -> None:
    out = run_in(netns, f"""
        import json, subprocess
        from kproxy.dataplane.ipvs import desired as d, ipsets
        from kproxy.dataplane.ipvs.netlink import IPSetClient
        ipsets.ensure_sets()
        c = IPSetClient()
        types = {{n: d.SET_TYPES[d.base_name(n)][0] for n, _ in d.all_set_names()}}
        for name, members in {MEMBERS!r}.items():
            for m in members:
                c.add(name, types[name], ipsets.normalize(m))
        for i in range(3000):  # more than one dump message
            c.add("KUBE-EXTERNAL-IP", "hash:ip,port", f"10.1.{{i >> 8}}.{{i & 255}},tcp:{{1000 + i}}")
        assert c.commit() == []
        got = ipsets.read_members(c)
        saved = {{}}
        for line in subprocess.run(["ipset", "save"], capture_output=True, text=True, check=True).stdout.splitlines():
            w = line.split()
            if w[0] == "create":
                saved.setdefault(w[1], set())
            elif w[0] == "add":
                saved.setdefault(w[1], set()).add(w[2])
        print(json.dumps({{"got": {{k: sorted(v) for k, v in got.items()}},
                          "saved": {{k: sorted(v) for k, v in saved.items()}}}}))
    """)
    assert out["got"] == out["saved"]
    assert len(out["got"]["KUBE-EXTERNAL-IP"]) == 3000
    assert out["got"]["KUBE-LOAD-BALANCER-SOURCE-CIDR"] == ["1.2.3.4,tcp:80,10.0.0.0/8", "1.2.3.4,tcp:80,10.0.0.9"]
    assert out["got"]["KUBE-NODE-PORT-TCP"] == ["30000", "31234"]


def test_batch_reports_each_failed_request(netns: str) -> None:
    out = run_in(netns, """
        import json, socket
        from kproxy.dataplane.ipvs import ipsets
        from kproxy.dataplane.ipvs.netlink import AddrClient, IPSetClient
        ipsets.ensure_sets()
        a, s = AddrClient(), IPSetClient()
        lo = socket.if_nametoindex("lo")
        for i in range(2000):  # several send() batches
            a.add(f"10.200.{i >> 8}.{i & 255}", lo)
            if i == 700:
                a.add("10.201.0.1", 999999)  # no such device: must be reported, by name
        a.add("10.200.0.5", lo)  # exists already: tolerated
        addr_errors = [e.strerror for e in a.commit()]
        s.add("KUBE-IPVS-IPS", "hash:ip", "10.96.0.1")
        s.add("NO-SUCH-SET", "hash:ip", "10.96.0.2")
        s.add("KUBE-IPVS-IPS", "hash:ip", "10.96.0.3")  # the last request (the one that asks for the ACK)
        set_errors = [e.strerror for e in s.commit()]
        on_lo = sum(1 for i, ip, _ in a.dump() if i == lo and ip.startswith("10.200."))
        print(json.dumps({"addr": addr_errors, "set": set_errors, "on_lo": on_lo,
                          "members": sorted(ipsets.read_members(s)["KUBE-IPVS-IPS"])}))
    """)
    assert out["addr"] == ["add address 10.201.0.1: No such device"]
    assert out["on_lo"] == 2000
    assert out["set"] == ["ipset add NO-SUCH-SET 10.96.0.2: No such file or directory"]
    assert out["members"] == ["10.96.0.1", "10.96.0.3"]


def test_ipv6_forwarding_off_is_reported_once(netns: str) -> None:
    """The VM suite showed IPv6 NodePort traffic timing out with IPv6 forwarding off; kproxy warns about it
    (once, and only on nodes with an IPv6 NodePort address) instead of changing the setting."""
    out = run_in(netns, """
        import json, logging
        from kproxy.config import ProxyConfig
        from kproxy.dataplane.ipvs.proxier import IpvsDataPlane
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("kproxy.dataplane.ipvs.proxier").addHandler(handler)
        def warnings(value, *node_ips_per_sync):
            with open("/proc/sys/net/ipv6/conf/all/forwarding", "w") as f:
                f.write(value)
            records.clear()
            dp = IpvsDataPlane(ProxyConfig())
            for node_ips in node_ips_per_sync:
                dp._check_ipv6_forwarding(node_ips)
            return [r.getMessage() for r in records]
        print(json.dumps({"off": warnings("0", ["10.0.0.1"], ["10.0.0.1", "2001:db8::1"], ["2001:db8::1"]),
                          "off_v4_only": warnings("0", ["10.0.0.1"]),
                          "on": warnings("1", ["2001:db8::1"])}))
    """)
    assert len(out["off"]) == 1 and "net.ipv6.conf.all.forwarding is 0" in out["off"][0], out
    assert out["off_v4_only"] == [] and out["on"] == [], out
