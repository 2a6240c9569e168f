"""Fixtures of the scenario suite: every test runs once per proxy mode listed in :data:`MODES`.

To add a mode, append ``(mode, [extra daemon flags])`` to :data:`MODES`; list what it cannot do (yet) in
:data:`UNSUPPORTED` (tests marked ``@pytest.mark.feature("<name>")`` then skip with the reason) and how to
dump its kernel state in :data:`STATE` (used by the cleanup test and attached to failure reports).

Features (marker names): clusterip, udp, ipv6, nodeport, nodeport_ipv6, nodeport_addresses, external_ips,
lb_ips, lb_source_ranges, session_affinity, etp_local, health_check_node_port, itp_local, terminating_fallback,
topology_hints, masquerade, masquerade_all, hairpin, reject_no_endpoints, udp_conntrack, sctp, bad_input, restart,
cleanup, status, metrics, scale_down.

Fixture scopes: ``proxy_mode`` is session-scoped (the run is grouped mode by mode); ``scenario`` (a Topology
plus a daemon) is module-scoped, so each test module pays ~1.5 s of setup per mode; ``sc`` is per test and
removes the manifests, routes and addresses the test added. A module can set ``DAEMON_FLAGS`` (extra daemon
flags) or ``START_DAEMON = False`` (the test drives the daemon itself).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from kproxy.testing.topology import Topology

from .harness import ModeSpec, Scenario

MODES: list[tuple[str, list[str]]] = [
    ("iptables", ["--iptables-backend", "legacy"]),
    ("iptables", ["--iptables-backend", "nft"]),
    ("nftables", []),
]

TEST_TIMEOUT = 180  # seconds per test (setup of the module's topology included)

# mode → {feature: reason it is not supported}
UNSUPPORTED: dict[str, dict[str, str]] = {
    "iptables": {},
}

# mode → (shell command run in the node namespace that dumps the mode's kernel state,
#         regex that matches any state kproxy created in that dump)
STATE: dict[str, tuple[str, str]] = {
    "iptables": ("for t in iptables-legacy iptables-nft ip6tables-legacy ip6tables-nft; do echo \"## $t\"; "
                 "$t-save 2>&1; done", r"KPROXY-"),
    "nftables": ("nft list ruleset 2>&1", r"table (ip|ip6|inet) kproxy"),
}


def mode_specs() -> list[ModeSpec]:
    out = []
    for mode, args in MODES:
        cmd, pattern = STATE.get(mode, ("", ""))
        out.append(ModeSpec(mode, tuple(args), dict(UNSUPPORTED.get(mode, {})), cmd, pattern))
    return out


SPECS = mode_specs()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "feature(*names): the proxy-mode features a scenario test needs")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests whose mode lacks a feature (decided at collection: no topology is built for them)."""
    root = os.geteuid() == 0
    for item in items:
        if "scenarios" not in item.nodeid:
            continue
        if not root:
            item.add_marker(pytest.mark.skip(reason="scenario tests need root (network namespaces)"))
            continue
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT))  # a wedged daemon must not hang CI
        spec = getattr(item, "callspec", None) and item.callspec.params.get("proxy_mode")
        if not isinstance(spec, ModeSpec):
            continue
        for mark in item.iter_markers("feature"):
            for feat in mark.args:
                if feat in spec.unsupported:
                    item.add_marker(pytest.mark.skip(reason=f"{spec.id}: {feat} unsupported: "
                                                            f"{spec.unsupported[feat]}"))


@pytest.fixture(scope="session", params=SPECS, ids=[s.id for s in SPECS])
def proxy_mode(request: pytest.FixtureRequest) -> ModeSpec:
    return request.param


@pytest.fixture(scope="module")
def scenario(request: pytest.FixtureRequest, proxy_mode: ModeSpec) -> Iterator[Scenario]:
    flags = list(getattr(request.module, "DAEMON_FLAGS", []))
    with Topology(pods=int(getattr(request.module, "PODS", 3))) as topo:
        s = Scenario(topo, proxy_mode, flags)
        if getattr(request.module, "START_DAEMON", True):
            s.start()
        try:
            yield s
        finally:
            s.stop()


@pytest.fixture
def sc(request: pytest.FixtureRequest, scenario: Scenario) -> Iterator[Scenario]:
    """The module's scenario, with this test's manifests and namespace changes undone afterwards."""
    scenario.begin_test()
    request.node._kproxy_scenario = scenario
    yield scenario
    rc = scenario.daemon_died()
    scenario.end_test()
    if rc is not None:
        pytest.fail(f"kproxy ({scenario.mode.id}) exited with {rc} during the test; log tail:\n"
                    f"{scenario.log()[-3000:]}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    """On a failed scenario test, attach the kernel state and the daemon log to the report."""
    outcome = yield
    rep = outcome.get_result()
    s = getattr(item, "_kproxy_scenario", None)
    if rep.when == "call" and rep.failed and isinstance(s, Scenario):
        try:
            rep.sections.append((f"kproxy kernel state ({s.mode.id})", s.state()[-12000:]))
            rep.sections.append(("kproxy log (tail)", s.log()[-6000:]))
        except Exception as e:  # a report must never fail
            rep.sections.append(("kproxy diagnostics", f"unavailable: {e}"))
