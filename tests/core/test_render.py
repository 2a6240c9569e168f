"""Golden tests of the iptables rendering (in addition to, never instead of, the packet tests).

Regenerate after an intended change with ``KPROXY_REGEN_GOLDEN=1 pytest tests/core/test_render.py``.
"""

import os
import subprocess
from pathlib import Path

import pytest

from kproxy.dataplane.iptables import render as r
from kproxy.snapshot import ProxySnapshot
from kproxy.store import ClusterStore, Event
from kproxy.testing.topology import scratch_netns

from .objs import ep, eps, svc

GOLDEN = Path(__file__).parent / "golden"


def _snapshot() -> ProxySnapshot:
    st = ClusterStore("node-a")
    snap = ProxySnapshot(st, "node-a")
    udp = [{"name": "dns", "port": 53, "protocol": "UDP"}]
    lb = svc("local", ips=("10.96.0.12",), type="LoadBalancer", externalTrafficPolicy="Local",
             healthCheckNodePort=32000, externalIPs=["203.0.113.50"], loadBalancerSourceRanges=["198.51.100.0/24"],
             ports=[{"name": "http", "port": 80, "nodePort": 30081}])
    lb["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.200"}]}}
    st.apply([
        Event("ADDED", "Service", svc("web", ips=("10.96.0.10", "fd00:10:96::10"), type="NodePort",
                                      ports=[{"name": "http", "port": 80, "nodePort": 30080}])),
        Event("ADDED", "EndpointSlice", eps("web", [ep("10.244.1.10"), ep("10.244.1.11", node="node-b")])),
        Event("ADDED", "EndpointSlice", eps("web", [ep("fd00:10:244:1::a")], name="web-v6", family="IPv6")),
        Event("ADDED", "Service", svc("sticky", ips=("10.96.0.11",), sessionAffinity="ClientIP",
                                      sessionAffinityConfig={"clientIP": {"timeoutSeconds": 30}})),
        Event("ADDED", "EndpointSlice", eps("sticky", [ep("10.244.1.10"), ep("10.244.1.12")])),
        Event("ADDED", "Service", lb),
        Event("ADDED", "EndpointSlice", eps("local", [ep("10.244.1.10"), ep("10.244.1.11", node="node-b")])),
        Event("ADDED", "Service", svc("empty", ips=("10.96.0.13",), ports=udp)),
    ])
    snap.update()
    return snap


def render_all(fam: int) -> str:
    snap = _snapshot()
    ctx = r.RenderContext(fam, False, r.local_detector("ClusterCIDR", fam, ("10.244.0.0/16", "fd00:10:244::/48"),
                                                       (), "", ""))
    lines = []
    for spn in sorted(snap.services):
        sr = r.render_service(snap.services[spn], snap.endpoints[spn], ctx)
        lines.append(f"# {spn}")
        for chain, rules in sr.chains.items():
            lines.append(f":{chain}")
            lines.extend(rules)
        for (table, chain), rules in sorted(sr.dispatch.items()):
            lines.append(f"# {table} {chain}")
            lines.extend(rules)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("fam", [4, 6])
def test_golden(fam: int) -> None:
    path = GOLDEN / f"services-ipv{fam}.txt"
    text = render_all(fam)
    if os.environ.get("KPROXY_REGEN_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_semantics_visible_in_rules() -> None:
    text = render_all(4)
    # affinity: recent match per endpoint with the Service's timeout
    assert text.count("--rcheck --seconds 30 --reap") == 2
    # Local external policy: EXT chain jumps to the local chain; only the local endpoint is in it
    assert "-m addrtype --src-type LOCAL -j KPROXY-MARK-MASQ" in text
    assert "-j REJECT" in text and "default/empty:dns/UDP has no endpoints" in text
    # loadBalancerSourceRanges: an FW chain allowing the range, the rest dropped in filter
    assert "-s 198.51.100.0/24 -j KPROXY-EXT-" in text
    assert "traffic not accepted by KPROXY-FW-" in text
    # two endpoints → first rule takes 1/2, last is unconditional
    assert "--probability 0.5000000000" in text


def test_rendering_is_deterministic() -> None:
    assert render_all(4) == render_all(4)


@pytest.mark.netns
@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_full_restore_text_is_accepted_by_iptables_restore(backend: str) -> None:
    """The kernel's own parser accepts what we render (--test: parse and check, commit nothing)."""
    with scratch_netns("kpgold") as ns:
        snap = _snapshot()
        for fam in (4, 6):
            ctx = r.RenderContext(fam, True, r.LocalDetector())
            script = r.RestoreScript()
            dispatch: dict = {k: [] for k in r.DISPATCH}
            for (table, chain), rules in r.static_chains(fam, "0x4000", (), True).items():
                script.flush_chain(table, chain, rules)
            for spn, sp in snap.services.items():
                sr = r.render_service(sp, snap.endpoints[spn], ctx)
                for chain, rules in sr.chains.items():
                    script.flush_chain(r.NAT, chain, rules)
                for k, rules in sr.dispatch.items():
                    dispatch[k].extend(rules)
            for (table, chain), rules in dispatch.items():
                script.flush_chain(table, chain, rules)
            tool = f"{'ip6' if fam == 6 else 'ip'}tables-{backend}-restore"
            p = subprocess.run(["ip", "netns", "exec", ns, tool, "--test", "--noflush"], input=script.text(),
                               capture_output=True, text=True)
            assert p.returncode == 0, p.stderr
