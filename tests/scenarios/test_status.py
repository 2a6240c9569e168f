"""``kproxy status`` reads the programmed Services back from the kernel (table and JSON)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kproxy.testing.topology import HTTP_PORT, UDP_PORT

from . import manifests as m
from .harness import Scenario

pytestmark = [pytest.mark.netns]

EXTERNAL_IP = "198.51.100.7"


def status_args(sc: Scenario) -> list[str]:
    """``--proxy-mode`` plus the mode flags ``kproxy status`` understands (the iptables back end)."""
    args = ["--proxy-mode", sc.mode.mode]
    a = list(sc.mode.args)
    if "--iptables-backend" in a:
        args += a[a.index("--iptables-backend"):a.index("--iptables-backend") + 2]
    return args


def entry(services: list[dict[str, Any]], name: str, family: int) -> dict[str, Any]:
    found = [s for s in services if s["name"] == name and s["family"] == family]
    assert len(found) == 1, f"status has {len(found)} entries for {name} IPv{family}: {[s['name'] for s in services]}"
    return found[0]


@pytest.mark.feature("status")
def test_status_reports_kernel_state(sc: Scenario) -> None:
    vip, vip6, np = sc.vip(), sc.vip6(), sc.node_port()
    empty_vip = sc.vip()
    sports = [m.slice_port(HTTP_PORT, name="http"), m.slice_port(UDP_PORT, name="dns", protocol="UDP")]
    sc.apply("st",
             m.service("st", [vip, vip6], [m.port(80, HTTP_PORT, name="http", node_port=np),
                                           m.port(53, UDP_PORT, name="dns", protocol="UDP")],
                       affinity_timeout=60, external_ips=[EXTERNAL_IP]),
             m.endpoint_slice("st", [m.endpoint(sc.ip(p)) for p in sc.pods], sports),
             m.endpoint_slice("st", [m.endpoint(sc.ip6(p)) for p in sc.pods], sports),
             m.service("st-empty", empty_vip, [m.port(80, HTTP_PORT, name="p")]))

    # Read it back with the daemon stopped: the answer must come from the kernel, not from the daemon.
    sc.stop()
    try:
        table = sc.kproxy_cli("status", *status_args(sc)).stdout
        doc = json.loads(sc.kproxy_cli("status", "-o", "json", *status_args(sc)).stdout)
    finally:
        sc.start()

    for needle in ("default/st:http/TCP", "default/st:dns/UDP", f"{vip}:80", f"{vip}:53", f"[{vip6}]:80",
                   f"{EXTERNAL_IP}:80", f"{np}", *(f"{sc.ip(p)}:{HTTP_PORT}" for p in sc.pods),
                   *(f"[{sc.ip6(p)}]:{HTTP_PORT}" for p in sc.pods), "default/st-empty:p/TCP"):
        assert needle in table, f"{needle!r} missing from 'kproxy status':\n{table}"

    assert sc.mode.mode in doc, f"status JSON has no {sc.mode.mode} section: {list(doc)}"
    services = doc[sc.mode.mode]
    http4 = entry(services, "default/st:http/TCP", 4)
    fronts = {(f["kind"], f["address"], f["protocol"]) for f in http4["frontends"]}
    assert ("ClusterIP", f"{vip}:80", "TCP") in fronts, fronts
    assert ("ExternalIP", f"{EXTERNAL_IP}:80", "TCP") in fronts, fronts
    assert any(k == "NodePort" and a.endswith(f":{np}") for k, a, _ in fronts), fronts
    assert {b["address"] for b in http4["backends"]} == {f"{sc.ip(p)}:{HTTP_PORT}" for p in sc.pods}
    weights = [b["weight"] for b in http4["backends"]]
    assert all(isinstance(w, int | float) for w in weights) and abs(sum(weights) - 1.0) < 0.01, weights
    assert http4["affinity_seconds"] == 60, http4

    dns4 = entry(services, "default/st:dns/UDP", 4)
    assert ("ClusterIP", f"{vip}:53", "UDP") in {(f["kind"], f["address"], f["protocol"]) for f in dns4["frontends"]}
    assert {b["address"] for b in dns4["backends"]} == {f"{sc.ip(p)}:{UDP_PORT}" for p in sc.pods}

    http6 = entry(services, "default/st:http/TCP", 6)
    assert ("ClusterIP", f"[{vip6}]:80", "TCP") in {(f["kind"], f["address"], f["protocol"])
                                                    for f in http6["frontends"]}
    assert {b["address"] for b in http6["backends"]} == {f"[{sc.ip6(p)}]:{HTTP_PORT}" for p in sc.pods}

    empty = entry(services, "default/st-empty:p/TCP", 4)
    assert empty["backends"] == [], empty
    assert any(empty_vip in str(x) for x in (*empty["frontends"], *empty["notes"])), \
        f"the endpoint-less Service's VIP is not reported: {empty}"
