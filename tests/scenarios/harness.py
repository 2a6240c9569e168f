"""The scenario harness: one Topology, one kproxy daemon watching a manifests directory, and traffic helpers.

Convergence is observed with real packets rather than by sleeping: :meth:`Scenario.barrier` rewrites a
*sentinel* Service (a fresh port on a fixed VIP, in a file whose name sorts after every test file and
changes every time) and waits until a TCP connection to that new port succeeds from the client pod. The
manifests source lists the directory before it stats the files, so a scan that sees the new sentinel file
also sees every test file written before it; and syncs apply in order. So when the sentinel answers, the
kernel holds every earlier change, in any proxy mode.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kproxy.testing.topology import (
    CLIENT_IP,
    EXT_IP,
    EXT_IP6,
    GATEWAY,
    HTTP_PORT,
    NODE_EXT_IP,
    NODE_EXT_IP6,
    Topology,
    terminate,
)

from . import manifests as m

T = TypeVar("T")

SENTINEL_VIP = "10.96.255.254"
SENTINEL_BASE_PORT = 20000
NODE_B = "node-b"


@dataclass(frozen=True)
class ModeSpec:
    """One way to run the daemon: ``--proxy-mode MODE`` plus extra flags, and what it cannot do."""

    mode: str
    args: tuple[str, ...] = ()
    unsupported: dict[str, str] = field(default_factory=dict)  # feature → reason
    state_cmd: str = ""  # shell command (node ns) dumping the mode's kernel state
    state_pattern: str = ""  # regex matching kproxy's own state in that dump

    @property
    def id(self) -> str:
        values = [a for a in self.args if not a.startswith("-") and "/" not in a]
        return "-".join([self.mode, *values])


@dataclass
class Probe:
    """Result of a batch of requests: replies per backend name, source addresses the backends saw, errors."""

    counts: collections.Counter[str]
    peers: collections.Counter[str]
    errors: int
    error_kinds: dict[str, int]

    @classmethod
    def of(cls, d: dict[str, Any]) -> Probe:
        return cls(collections.Counter(d.get("counts", {})), collections.Counter(d.get("peers", {})),
                   int(d.get("errors", 0)), dict(d.get("error_kinds", {})))

    @property
    def ok(self) -> int:
        return sum(self.counts.values())

    @property
    def backends(self) -> set[str]:
        return set(self.counts)

    def __str__(self) -> str:
        return (f"counts={dict(self.counts)} peers={dict(self.peers)} errors={self.errors} "
                f"{self.error_kinds or ''}")


def assert_fair(p: Probe, backends: Iterable[str], n: int, min_ratio: float = 0.5) -> None:
    """Every backend got at least ``min_ratio`` of its fair share of ``n`` requests, nobody else got any.

    With n=300 over 3 backends the expected count is 100 with a binomial sd of ~8.2; the default bound
    (50) is 6 sd away, so a correct proxy fails it with probability ~1e-9, while a broken one (a backend
    never chosen, or a skewed probability ladder such as 1/n at every step) fails it reliably.
    """
    want = set(backends)
    assert p.errors == 0, f"errors: {p}"
    assert p.backends == want, f"expected exactly {sorted(want)}, got {p}"
    floor = n / len(want) * min_ratio
    for b in want:
        assert p.counts[b] >= floor, f"{b} got {p.counts[b]} of {n} (< {floor:.0f}): {p}"


class Scenario:
    """A node namespace running kproxy against a manifests directory, plus pods, a client and an external host."""

    def __init__(self, topo: Topology, mode: ModeSpec, flags: Iterable[str] = ()) -> None:
        self.topo = topo
        self.mode = mode
        self.flags = list(flags)
        self.dir = topo.log_path("manifests")
        os.makedirs(self.dir, exist_ok=True)
        # The node routes unknown destinations back out ext0 (its default route points at the external
        # host). Forwarding out of the interface a packet came in on makes the kernel send an ICMP redirect,
        # which spends the per-host ICMP rate-limit token, so the REJECT's port-unreachable that follows is
        # suppressed and the external host sees a timeout. Real nodes do not hairpin like this; turn
        # redirects off so REJECT semantics are observable from the external host.
        topo.sysctl(topo.node, {"net.ipv4.conf.all.send_redirects": 0, "net.ipv4.conf.ext0.send_redirects": 0})
        self.daemon: subprocess.Popen[str] | None = None
        self.daemon_runs = 0
        self._gen = 0
        self._sentinel_file = ""
        self._vip = itertools.count(10)
        self._np = itertools.count(30100)
        self._test_files: set[str] = set()
        self._cleanups: list[Callable[[], object]] = []

    # ---- names of things ------------------------------------------------------------------------
    @property
    def pods(self) -> list[str]:
        return sorted(self.topo.pod)

    def ip(self, pod: str) -> str:
        return self.topo.pod[pod].ip

    def ip6(self, pod: str) -> str:
        return self.topo.pod[pod].ip6

    def ns(self, pod: str) -> str:
        return self.topo.pod[pod].ns

    def vip(self) -> str:
        """A fresh IPv4 ClusterIP (unique within this scenario)."""
        n = next(self._vip)
        return f"10.96.{n // 250 + 1}.{n % 250 + 1}"

    def vip6(self) -> str:
        return f"fd00:10:96::{0x100 + next(self._vip):x}"

    def node_port(self) -> int:
        return next(self._np)

    # ---- the daemon -----------------------------------------------------------------------------
    def start(self, *extra: str, wait: bool = True) -> subprocess.Popen[str]:
        self.daemon_runs += 1
        log_name = "kproxy.log" if self.daemon_runs == 1 else f"kproxy.{self.daemon_runs}.log"
        self.daemon = self.topo.start_daemon(self.dir, self.mode.mode, *self.mode.args, *self.flags, *extra,
                                             log_name=log_name)
        if wait:
            try:
                self.topo.wait_healthy(timeout=30)
            except TimeoutError:
                raise TimeoutError(f"kproxy ({self.mode.id}) did not become healthy; log:\n{self.log()}") from None
            self.barrier()
        return self.daemon

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.daemon is None:
            return None
        p, self.daemon = self.daemon, None
        if p.poll() is not None:
            with contextlib.suppress(ValueError):
                self.topo.procs.remove(p)
            return p.returncode
        return self.topo.stop_daemon(p, sig)

    def log(self, all_runs: bool = False) -> str:
        names = ["kproxy.log"] + [f"kproxy.{i}.log" for i in range(2, self.daemon_runs + 1)]
        if not all_runs:
            names = names[-1:]
        out = []
        for n in names:
            with contextlib.suppress(OSError), open(self.topo.log_path(n)) as f:
                out.append(f.read())
        return "\n".join(out)

    def node_run(self, argv: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.topo.exec(self.topo.node, argv, check=check, timeout=timeout)

    def kproxy_cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``python -m kproxy ARGS`` in the node namespace."""
        return self.node_run([sys.executable, "-m", "kproxy", *args], check=check)

    def state(self) -> str:
        """The mode's kernel state in the node namespace (for failure reports and cleanup checks)."""
        cmd = self.mode.state_cmd or "iptables-save 2>&1; ip6tables-save 2>&1"
        return self.node_run(["sh", "-c", cmd], check=False).stdout

    def metric(self, name: str) -> dict[str, float]:
        """Samples of one metric family from the daemon's /metrics: {label string: value}."""
        p = self.node_run(["curl", "-s", "--max-time", "2", "http://127.0.0.1:10249/metrics"], check=False,
                          timeout=10)
        out = {}
        for line in p.stdout.splitlines():
            if line.startswith(name) and (line[len(name):len(name) + 1] in ("{", " ")):
                key, _, val = line.rpartition(" ")
                out[key[len(name):]] = float(val)
        return out

    # ---- manifests and convergence ----------------------------------------------------------------
    def apply(self, filename: str, *objs: dict[str, Any], wait: bool = True) -> None:
        """Write ``objs`` as ``filename`` in the watched directory, then wait until the kernel has them."""
        m.write(self.dir, filename, objs)
        self._test_files.add(filename)
        if wait:
            self.barrier()

    def delete(self, filename: str, wait: bool = True) -> None:
        m.remove(self.dir, filename)
        self._test_files.discard(filename)
        if wait:
            self.barrier()

    def barrier(self, timeout: float = 15.0) -> float:
        """Wait until every manifest change written so far is programmed (see the module docstring).

        Returns the seconds it took the sentinel to answer.
        """
        self._gen += 1
        port = SENTINEL_BASE_PORT + self._gen
        name = f"zz-sentinel-{self._gen:06d}.json"
        pod0 = self.topo.pod[sorted(self.topo.pod)[0]]
        m.write(self.dir, name, [
            m.service("kproxy-sentinel", SENTINEL_VIP, [m.port(port, HTTP_PORT, name="s")]),
            m.endpoint_slice("kproxy-sentinel", [m.endpoint(pod0.ip)], [m.slice_port(HTTP_PORT, name="s")]),
        ])
        if self._sentinel_file:
            m.remove(self.dir, self._sentinel_file)
        self._sentinel_file = name
        r = self.clients(self.topo.client, "wait-connect", SENTINEL_VIP, port, "--deadline", timeout)
        if not r["ok"]:
            raise TimeoutError(f"kproxy ({self.mode.id}) did not program a manifest change within {timeout}s "
                               f"(sentinel {SENTINEL_VIP}:{port}: {r['error']}); daemon alive: "
                               f"{self.daemon is not None and self.daemon.poll() is None}; log tail:\n"
                               f"{self.log()[-3000:]}")
        return float(r["elapsed"])

    # ---- traffic --------------------------------------------------------------------------------
    def clients(self, ns: str, *args: object, timeout: float = 120) -> dict[str, Any]:
        p = self.topo.exec(ns, [sys.executable, "-m", "kproxy.testing.clients", *map(str, args)], timeout=timeout)
        return json.loads(p.stdout)

    def http(self, ns: str, ip: str, port: int, n: int = 1, timeout: float = 2.0, src: str = "") -> Probe:
        args: list[object] = ["http", ip, port, "-n", n, "--timeout", timeout]
        if src:
            args += ["--src", src]
        return Probe.of(self.topo.probe(ns, *args))

    def udp(self, ns: str, ip: str, port: int, n: int = 1, timeout: float = 1.0, same_socket: bool = False) -> Probe:
        args: list[object] = ["udp-ask", ip, port, "-n", n, "--timeout", timeout]
        if same_socket:
            args.append("--same-socket")
        return Probe.of(self.clients(ns, *args))

    def tcp_check(self, ns: str, ip: str, port: int, timeout: float = 1.0) -> tuple[str, float]:
        """One TCP connect: ("ok" | "refused" | "timeout" | ..., seconds it took)."""
        t0 = time.monotonic()
        r = self.topo.probe(ns, "tcp-check", ip, port, "--timeout", timeout)
        return ("ok" if r["ok"] else r["error"]), time.monotonic() - t0

    def udp_session(self, ns: str, ip: str, port: int, timeout: float = 1.0) -> UdpSession:
        """One connected UDP socket in ``ns`` kept open for the rest of the test (one conntrack flow)."""
        s = UdpSession(self.topo, ns, ip, port, timeout)
        self._cleanups.append(s.close)
        return s

    def spawn_client(self, ns: str, *args: object, wait_for: str = "") -> subprocess.Popen[str]:
        """A long-running ``kproxy.testing.clients`` process (killed at the end of the test if still running)."""
        p = self.topo.spawn(ns, [sys.executable, "-m", "kproxy.testing.clients", *map(str, args)], wait_for=wait_for)
        self._cleanups.append(lambda: _kill(self.topo, p))
        return p

    def finish_client(self, p: subprocess.Popen[str], timeout: float = 10) -> dict[str, Any]:
        """SIGTERM a :meth:`spawn_client` process and return the JSON summary it prints on exit."""
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=timeout)
        with contextlib.suppress(ValueError):
            self.topo.procs.remove(p)
        lines = [ln for ln in (out or "").splitlines() if ln.startswith("{")]
        if not lines:
            raise AssertionError(f"client exited ({p.returncode}) without a summary: {out!r}")
        return json.loads(lines[-1])

    def eventually(self, fn: Callable[[], T], ok: Callable[[T], bool], timeout: float = 5.0,
                   interval: float = 0.1, what: str = "") -> T:
        """Call ``fn`` until ``ok(result)``; return that result or fail with the last one."""
        deadline = time.monotonic() + timeout
        while True:
            v = fn()
            if ok(v):
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"{what or 'condition'} not reached within {timeout}s; last: {v}")
            time.sleep(interval)

    # ---- namespace plumbing (undone at the end of each test) --------------------------------------
    def ext_route(self, ip: str) -> None:
        """Route ``ip`` from the external host via the node (an externalIP / LB IP announced to the node)."""
        via = NODE_EXT_IP6 if ":" in ip else NODE_EXT_IP
        plen = 128 if ":" in ip else 32
        self.topo.exec(self.topo.ext, ["ip", "route", "replace", f"{ip}/{plen}", "via", via])
        self._cleanups.append(lambda: self.topo.exec(self.topo.ext, ["ip", "route", "del", f"{ip}/{plen}"],
                                                     check=False))

    def client_addresses(self, n: int, first: int = 150) -> list[str]:
        """Give the client pod ``n`` extra addresses (distinct ClientIP-affinity sources)."""
        ips = [f"10.244.1.{first + i}" for i in range(n)]
        for ip in ips:
            self.topo.exec(self.topo.client, ["ip", "addr", "add", f"{ip}/24", "dev", "eth0"])
        self._cleanups.append(lambda: [self.topo.exec(self.topo.client, ["ip", "addr", "del", f"{ip}/24", "dev",
                                                                          "eth0"], check=False) for ip in ips])
        return ips

    def on_cleanup(self, fn: Callable[[], object]) -> None:
        self._cleanups.append(fn)

    def daemon_died(self) -> int | None:
        """The exit code if the daemon this scenario started has exited on its own, else None."""
        if self.daemon is not None and self.daemon.poll() is not None:
            return self.daemon.returncode
        return None

    def begin_test(self) -> None:
        self._test_files.clear()
        self._cleanups.clear()
        if self.daemon_died() is not None:  # a previous test crashed it (and failed): start afresh
            self.stop()
            self.start()

    def end_test(self) -> None:
        for fn in reversed(self._cleanups):
            with contextlib.suppress(Exception):
                fn()
        self._cleanups.clear()
        for f in list(self._test_files):
            m.remove(self.dir, f)
        self._test_files.clear()
        if self.daemon is not None and self.daemon.poll() is None:
            with contextlib.suppress(TimeoutError):
                self.barrier()


class UdpSession:
    """Drives ``clients udp-session``: :meth:`ask` sends one datagram on the long-lived socket."""

    def __init__(self, topo: Topology, ns: str, ip: str, port: int, timeout: float) -> None:
        self.topo = topo
        self.p = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "kproxy.testing.clients", "udp-session", ip,
             str(port), "--timeout", str(timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        topo.procs.append(self.p)
        assert self.p.stdout is not None
        hello = json.loads(self.p.stdout.readline() or "{}")
        if not hello.get("ready"):
            self.close()
            raise RuntimeError(f"udp-session in {ns} did not start: {hello}")
        self.local = tuple(hello["local"])

    def ask(self) -> tuple[str, str]:
        """(backend name or "", error kind or "")."""
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write("ping\n")
        self.p.stdin.flush()
        r = json.loads(self.p.stdout.readline())
        return r["reply"].partition(" ")[0], r["error"]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.p.stdin is not None:
                self.p.stdin.close()
        _kill(self.topo, self.p)


def _kill(topo: Topology, p: subprocess.Popen[str]) -> None:
    terminate(p)
    with contextlib.suppress(ValueError):
        topo.procs.remove(p)


# Addresses used across the tests, re-exported for readability.
__all__ = ["CLIENT_IP", "EXT_IP", "EXT_IP6", "GATEWAY", "NODE_B", "NODE_EXT_IP", "NODE_EXT_IP6", "ModeSpec",
           "Probe", "Scenario", "assert_fair"]
