"""DnsService exactly as the daemon starts it (store shared with the proxy, listener from another thread)."""

from __future__ import annotations

import asyncio
import time

import dns.asyncquery
import dns.message
import dns.rcode
import uvloop
from kdns_testlib import MANIFESTS

from kproxy.dns.server import DnsService, parse_hostport
from kproxy.sources.manifests import ManifestsSource
from kproxy.store import ClusterStore, Event


async def _ask(port: int, name: str, rdtype: str = "A") -> dns.message.Message:
    return await dns.asyncquery.udp(dns.message.make_query(name, rdtype), "127.0.0.1", port=port, timeout=3)


def _ips(m: dns.message.Message) -> set[str]:
    return {rd.to_text() for rrset in m.answer for rd in rrset}


def test_dns_service_in_the_daemon_shape() -> None:
    async def main() -> None:
        store = ClusterStore("node-a")
        src_task = asyncio.create_task(ManifestsSource(str(MANIFESTS)).run(store))
        while not store.synced:
            await asyncio.sleep(0.01)
        svc = DnsService(store, zone="cluster.local", listen="127.0.0.1:0", upstream="")
        task = asyncio.create_task(svc.run())
        try:
            await asyncio.wait_for(svc.ready.wait(), 10)
            assert svc.bound is not None
            port = svc.bound[1]
            assert _ips(await _ask(port, "web.default.svc.cluster.local")) == {"10.96.0.20"}
            # a change applied from another thread (as the Kubernetes source does) is served within 1 s
            obj = {"metadata": {"name": "late", "namespace": "default"},
                   "spec": {"clusterIP": "10.96.9.9", "ports": [{"port": 80}]}}
            loop = asyncio.get_running_loop()
            t0 = time.monotonic()
            await loop.run_in_executor(None, store.apply, [Event("ADDED", "Service", obj)])
            while _ips(await _ask(port, "late.default.svc.cluster.local")) != {"10.96.9.9"}:
                assert time.monotonic() - t0 < 1.0
                await asyncio.sleep(0.01)
            # TCP on the same port
            r = await dns.asyncquery.tcp(dns.message.make_query("late.default.svc.cluster.local", "A"),
                                         "127.0.0.1", port=port, timeout=3)
            assert _ips(r) == {"10.96.9.9"}
            assert (await _ask(port, "example.org")).rcode() == dns.rcode.REFUSED
        finally:
            task.cancel()
            src_task.cancel()
            await asyncio.gather(task, src_task, return_exceptions=True)
        assert svc.errors == 0
        st = svc.stats()
        assert st["udp_queries"] >= 3 and st["tcp_queries"] == 1 and st["errors"] == 0 and st["answers"] > 10

    uvloop.run(main())


def test_parse_hostport() -> None:
    assert parse_hostport("10.0.0.1") == ("10.0.0.1", 53)
    assert parse_hostport("10.0.0.1:5353") == ("10.0.0.1", 5353)
    assert parse_hostport("[fd00::1]:5353") == ("fd00::1", 5353)
    assert parse_hostport("fd00::1") == ("fd00::1", 53)
    for bad in ("example.com:53", "10.0.0.1:99999", "10.0.0.1:x"):
        try:
            parse_hostport(bad)
        except ValueError:
            continue
        raise AssertionError(bad)


def test_initial_build_does_not_block_the_event_loop() -> None:
    """The daemon's event loop also drives the proxy: the first full build must not freeze it."""
    async def main() -> None:
        store = ClusterStore()
        store.apply([Event("ADDED", "Service", {
            "metadata": {"name": f"s{i}", "namespace": f"n{i % 50}"},
            "spec": {"clusterIP": f"10.96.{i // 250}.{i % 250 + 1}",
                     "ports": [{"name": "http", "port": 80}, {"name": "grpc", "port": 9090}]}})
            for i in range(4000)])
        svc = DnsService(store, listen="127.0.0.1:0")
        ticks = 0
        done = asyncio.Event()

        async def heartbeat() -> None:
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0.005)
                ticks += 1

        hb = asyncio.create_task(heartbeat())
        t0 = time.monotonic()
        await svc.initial_sync()
        took = time.monotonic() - t0
        done.set()
        await hb
        assert len(svc.table.answers) > 4000 * 4
        # the loop kept running while the build ran in its thread
        assert ticks >= 3, f"event loop starved: {ticks} heartbeats in {took:.2f} s"

    uvloop.run(main())
