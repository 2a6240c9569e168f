"""The streamed full sync against the real kernel (a fresh network namespace per test).

A full sync feeds iptables-restore while it renders. These tests check that the result is the same
ruleset the partial-sync path builds, that stale chains are found and deleted whether the kernel's
chains are known or read back, and that a failure half way through the stream (the restore rejecting
a line, or rendering raising) applies nothing and is recovered by the next full sync.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import subprocess
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest

from kproxy.config import ProxyConfig
from kproxy.dataplane import SyncError
from kproxy.dataplane.iptables import full as full_mod
from kproxy.dataplane.iptables import render as r
from kproxy.dataplane.iptables.proxier import IptablesDataPlane
from kproxy.snapshot import ProxySnapshot
from kproxy.store import ClusterStore, Event
from kproxy.testing.topology import scratch_netns

from .objs import ep, eps, svc

pytestmark = pytest.mark.netns

CLONE_NEWNET = 0x40000000
DISPATCH_CHAINS = {c for _, c in r.DISPATCH}


def _in_netns(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in a forked child that entered a fresh network namespace; return its result."""
    with scratch_netns("kpst") as ns, multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply(_enter_and_call, (ns, fn, args))


def _enter_and_call(ns: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns failed")
    os.close(fd)
    # the xtables lock file is global, not per namespace: a private one keeps other jobs' long restores
    # (in their own namespaces) from timing this test's restores out
    lock = f"/run/xtables-{ns}.lock"
    os.environ["XTABLES_LOCKFILE"] = lock
    try:
        return fn(*args)
    finally:
        if os.path.exists(lock):
            os.unlink(lock)


def _state(store: ClusterStore, n: int, gen: int) -> None:
    """n Services (every third dual-stack NodePort, one LoadBalancer with source ranges), 3 endpoints each."""
    events = []
    for i in range(n):
        if i % 3 == 0:
            s = svc(f"s{i}", ips=(f"10.96.{i // 250}.{i % 250 + 1}", f"fd00:96::{i + 1:x}"), type="NodePort",
                    ipFamilies=["IPv4", "IPv6"], ports=[{"name": "http", "port": 80, "nodePort": 30000 + i}])
            events.append(Event("ADDED", "EndpointSlice", eps(f"s{i}", [ep(f"fd00:244::{i + 1:x}")],
                                                              name=f"s{i}-v6", family="IPv6")))
        else:
            s = svc(f"s{i}", ips=(f"10.96.{i // 250}.{i % 250 + 1}",))
        events.insert(0, Event("ADDED", "Service", s))
        events.append(Event("ADDED", "EndpointSlice", eps(f"s{i}", [
            ep(f"10.244.{(i * 3 + j + gen) // 250}.{(i * 3 + j + gen) % 250 + 1}") for j in range(3)])))
    lb = svc("lb", ips=("10.96.200.1",), type="LoadBalancer", externalTrafficPolicy="Local",
             healthCheckNodePort=32000, loadBalancerSourceRanges=["198.51.100.0/24"],
             ports=[{"name": "http", "port": 80, "nodePort": 31999}])
    lb["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.200"}]}}
    events += [Event("ADDED", "Service", lb),
               Event("ADDED", "EndpointSlice", eps("lb", [ep("10.244.200.1"), ep("10.244.200.2", node="node-b")]))]
    store.apply(events)


def _world(n: int, gen: int = 0) -> tuple[ClusterStore, ProxySnapshot]:
    store = ClusterStore("node-a")
    snap = ProxySnapshot(store, "node-a")
    _state(store, n, gen)
    return store, snap


def _dp(backend: str = "legacy") -> IptablesDataPlane:
    dp = IptablesDataPlane(ProxyConfig(iptables_backend=backend, cluster_cidrs=("10.244.0.0/16", "fd00:244::/48"),
                                       hostname_override="node-a"))
    dp.setup()
    return dp


def _kernel(backend: str = "legacy") -> dict[str, dict[str, list[str]]]:
    """kproxy's chains per family/table as the kernel holds them; dispatch chains order-independent."""
    out: dict[str, dict[str, list[str]]] = {}
    for fam, tool in ((4, f"iptables-{backend}-save"), (6, f"ip6tables-{backend}-save")):
        table = ""
        for line in subprocess.run([tool], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":KPROXY-"):
                out.setdefault(f"{fam} {table}", {})[line[1:].split()[0]] = []
            elif line.startswith("-A KPROXY-"):
                out[f"{fam} {table}"][line.split()[1]].append(line)
    for chains in out.values():
        for name in DISPATCH_CHAINS & chains.keys():
            chains[name].sort()
    return out


def _children() -> list[str]:
    """Commands of this process's live child processes (a killed restore must not linger)."""
    me = str(os.getpid())
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if fields[1] == me and fields[0] != "Z":
                with open(f"/proc/{pid}/cmdline") as f:
                    found.append(f.read().replace("\0", " "))
        except OSError:
            continue
    return found


def _world_y() -> tuple[ClusterStore, ProxySnapshot]:
    """State Y: every endpoint moved, 40 of the 120 Services gone."""
    store, snap = _world(120, gen=7)
    store.apply([Event("DELETED", "Service", svc(f"s{i}")) for i in range(80, 120)])
    return store, snap


def _full_equals_partial(backend: str) -> None:
    store, snap = _world(120)
    dp = _dp(backend)
    dp.sync(snap, snap.update(), True)
    x = _kernel(backend)
    assert any(c.startswith("KPROXY-SEP-") for c in x["6 nat"])
    # X → Y with a partial sync
    _state(store, 120, gen=7)
    store.apply([Event("DELETED", "Service", svc(f"s{i}")) for i in range(80, 120)])
    dp.sync(snap, snap.update(), False)
    y = _kernel(backend)
    assert y != x
    # back to X with a full sync: Y's chains are stale, known to the data plane without iptables-save
    _, snap_x = _world(120)
    dp.sync(snap_x, snap_x.update(), True)
    assert _kernel(backend) == x
    # Y with a full sync of a new data plane (a restart): it reads the kernel's chains to find X's stale ones
    _, snap_y = _world_y()
    dp2 = _dp(backend)
    dp2.sync(snap_y, snap_y.update(), True)
    assert _kernel(backend) == y
    static_nat = sum(len(v) for (t, _), v in r.static_chains(4, dp2.mark, (), True).items() if t == r.NAT)
    assert dp2.rule_counts[(4, r.NAT)] + static_nat == sum(len(c) for c in y["4 nat"].values())


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_full_sync_equals_partial_syncs_and_deletes_stale_chains(backend: str) -> None:
    _in_netns(_full_equals_partial, backend)


def _bad_rule_mid_stream(bad_family: int) -> dict[str, Any]:
    store, snap = _world(600)
    dp = _dp()
    dp.sync(snap, snap.update(), True)
    before = _kernel()
    _state(store, 600, gen=3)
    real = r.render_service
    calls = {4: 0, 6: 0, "injected": 0}

    def render(sp: Any, e: Any, ctx: r.RenderContext) -> r.ServiceRules:
        out = real(sp, e, ctx)
        calls[ctx.family] += 1
        if ctx.family == bad_family and calls[ctx.family] >= 300 and out.chains and not calls["injected"]:
            chain = next(iter(out.chains))  # one rule the kernel's parser rejects, mid-stream
            out.chains[chain] = [*out.chains[chain], f"-A {chain} -j NO-SUCH-TARGET-X"]
            calls["injected"] = 1
        return out

    with mock.patch.object(r, "render_service", render), pytest.raises(SyncError) as err:
        dp.sync(snap, snap.update(), True)
    failed = _kernel()
    same = {fam: {k: v for k, v in failed.items() if k[0] == str(fam)} ==
            {k: v for k, v in before.items() if k[0] == str(fam)} for fam in (4, 6)}
    unknown = {fam: dp._kernel_chains[fam] is None for fam in (4, 6)}
    leftovers = _children()
    dp.sync(snap, snap.update(), True)  # the retry (the daemon makes it a full sync) applies everything
    healed = _kernel()
    # it read the kernel's chains back (iptables-save) and deleted the ones of the endpoints that moved
    return {"error": str(err.value), "same": same, "unknown": unknown, "children": leftovers,
            "healed": healed != before, "size": sum(len(c) for c in before["4 nat"].values()),
            "stale_deleted": bool(set(before["4 nat"]) - set(healed["4 nat"])),  # (IPv6 endpoints do not move)
            "exact": all(set(healed[f"{fam} nat"]) == dp._kernel_chains[fam][r.NAT] for fam in (4, 6))}


@pytest.mark.parametrize("bad_family", [4, 6])
def test_restore_rejecting_a_line_mid_stream_applies_nothing(bad_family: int) -> None:
    """IPv4 fails: nothing is applied (IPv6, rendered ahead meanwhile, is never fed). IPv6 fails: the
    IPv4 rules it followed are in place, IPv6 keeps its previous rules."""
    res = _in_netns(_bad_rule_mid_stream, bad_family)
    assert res["size"] > 4000  # large enough that the failing line is far from both ends of the stream
    assert "NO-SUCH-TARGET-X" in res["error"] and "[line " in res["error"], res["error"]
    assert res["same"] == {4: bad_family == 4, 6: True}
    assert res["unknown"] == {4: bad_family == 4, 6: True}
    assert res["healed"] and res["stale_deleted"] and res["exact"]
    assert not [c for c in res["children"] if "restore" in c]


def _render_error_mid_stream() -> dict[str, Any]:
    store, snap = _world(600)
    dp = _dp()
    dp.sync(snap, snap.update(), True)
    before = _kernel()
    _state(store, 600, gen=5)
    real = r.render_service
    calls = {"n": 0}

    def render(sp: Any, e: Any, ctx: r.RenderContext) -> r.ServiceRules:
        calls["n"] += 1
        if calls["n"] == 400:
            raise RuntimeError("rendering bug")
        return real(sp, e, ctx)

    with mock.patch.object(r, "render_service", render), pytest.raises(RuntimeError, match="rendering bug"):
        dp.sync(snap, snap.update(), True)
    unchanged = _kernel() == before
    leftovers = _children()
    dp.sync(snap, snap.update(), True)
    return {"unchanged": unchanged, "children": leftovers, "healed": _kernel() != before}


def test_rendering_error_mid_stream_applies_nothing() -> None:
    res = _in_netns(_render_error_mid_stream)
    assert res["unchanged"] and res["healed"]
    assert not [c for c in res["children"] if "restore" in c]


def test_stream_layout_declares_chains_before_use() -> None:
    """Every jump target is declared earlier in the stream (the parser sees it before the input ends)."""
    _, snap = _world(30)
    for fam in (4, 6):
        ctx = r.RenderContext(fam, False, r.local_detector("ClusterCIDR", fam, ("10.244.0.0/16",), (), "", ""))
        chunks = list(full_mod.full_restore_input(snap.services, snap.endpoints, ctx,
                                                  r.static_chains(fam, "0x4000", (), True),
                                                  lambda: {r.NAT: {"KPROXY-SVC-OLD"}, r.FILTER: set()},
                                                  full_mod.FullOutcome()))
        lines = "".join(chunks).splitlines()
        declared: set[str] = set()
        for line in lines:
            if line.startswith(":"):
                declared.add(line[1:].split()[0])
            elif line.startswith("-A ") and " -j KPROXY-" in line:
                assert line.split(" -j ")[1].split()[0] in declared, line
        assert lines.index("*nat") < lines.index("-X KPROXY-SVC-OLD") < lines.index("*filter")
        assert lines[-1] == "COMMIT" and lines.count("COMMIT") == 2
        assert "COMMIT" not in "".join(chunks[:-1])  # only the last chunk commits anything
