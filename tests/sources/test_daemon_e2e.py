"""The daemon end to end against the list/watch protocol: fake API server → KubeSource → iptables → packets.

The fake API server (see fake_apiserver.py for what it stands in for) listens inside the test's node
namespace — its listening socket is created by a thread that joined that namespace — so the daemon,
running in the node namespace with --kubeconfig, reaches it on 127.0.0.1 there. Traffic goes from the
topology's client pod through the ClusterIP to the pods.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from pathlib import Path

import pytest

from kproxy.testing.topology import Topology

from .conftest import endpoint_slice, node, service, write_kubeconfig
from .fake_apiserver import FakeApiServer

pytestmark = pytest.mark.netns

CLONE_NEWNET = 0x40000000


def _start_in_netns(fake: FakeApiServer, ns: str) -> None:
    """Create the server's listening socket inside network namespace ``ns``."""
    err: list[BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
            fake.start()  # this thread only: the socket lives in ns, the serving threads just use it
        except BaseException as e:
            err.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if err:
        raise err[0]


def _until(fn, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(0.2)


def test_daemon_follows_the_api_server(tmp_path: Path) -> None:
    fake = FakeApiServer()
    with Topology(pods=3, ipv6=False) as topo:
        _start_in_netns(fake, topo.node)
        try:
            fake.load("services", [service("web")])
            fake.load("endpointslices", [endpoint_slice("web-1", "web", ["10.244.1.10", "10.244.1.11"])])
            fake.load("nodes", [node("node-a")])
            kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", fake.url)
            args = list(topo.daemon_args("", "iptables", "--kubeconfig", kubeconfig, "--iptables-backend", "legacy"))
            i = args.index("--manifests")
            del args[i:i + 2]
            p = topo.spawn(topo.node, args, log_name="kproxy.log")
            topo.wait_healthy(30)

            def hits() -> set[str]:
                return set(topo.probe(topo.client, "http", "10.96.0.10", 80, "-n", "20", "--timeout", "1")["counts"])

            assert hits() == {"pod0", "pod1"}
            # a watch event (endpoint change) reaches the kernel
            fake.upsert("endpointslices", endpoint_slice("web-1", "web", ["10.244.1.12"]))
            assert _until(lambda: hits() == {"pod2"}), topo.read_log()
            # the watch connection breaks: the daemon resumes from its resourceVersion and keeps following
            fake.drop_watches()
            fake.upsert("endpointslices", endpoint_slice("web-1", "web", ["10.244.1.10", "10.244.1.12"]))
            assert _until(lambda: hits() == {"pod0", "pod2"}), topo.read_log()
            # history compacted while a deletion happens: 410 Gone → relist, and the deleted Service is gone
            fake.drop_watches()
            fake.delete("services", "web")
            fake.compact()

            def programmed() -> bool:
                return "10.96.0.10" in topo.exec(topo.node, ["iptables-legacy-save", "-t", "nat"]).stdout

            assert _until(lambda: not programmed(), 15), topo.read_log()
            assert topo.probe(topo.client, "tcp-check", "10.96.0.10", 80, "--timeout", "1")["ok"] is False
            assert any(r.get("resourceVersionMatch") == "NotOlderThan" for r in fake.list_requests("services")[1:])
            topo.stop_daemon(p)
        finally:
            fake.stop()
