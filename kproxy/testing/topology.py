"""A throw-away node with pods, a client and an external host, built from network namespaces.

Used by the integration tests, the benchmarks and ``kproxy demo``. Nothing touches the host's own
namespace: every link, address, route and rule lives in namespaces created here, and :meth:`destroy`
(also run by ``with Topology(...)`` on any error) kills every process started inside them and deletes them.

Layout (IPv4; IPv6 mirrors it when ``ipv6=True``)::

    pod namespaces  <prefix>-pod<i>   eth0 10.244.1.(10+i)/24, fd00:10:244:1::(10+i)/64
    client          <prefix>-client   eth0 10.244.1.100/24  (an in-cluster client pod)
        |  veth (hairpin on)
    node            <prefix>-node     bridge kbr0 10.244.1.1/24, fd00:10:244:1::1/64; ext0 203.0.113.1/24
        |  veth
    external host   <prefix>-ext      eth0 203.0.113.2/24, 2001:db8:1::2/64 (routes the pod and service
                                      ranges via the node, like a router outside the cluster)

203.0.113.0/24 and 2001:db8::/32 are documentation ranges; here they exist only inside these namespaces.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

POD_CIDR = "10.244.1.0/24"
POD_CIDR6 = "fd00:10:244:1::/64"
GATEWAY = "10.244.1.1"
GATEWAY6 = "fd00:10:244:1::1"
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_CIDR6 = "fd00:10:96::/112"
NODE_EXT_IP = "203.0.113.1"
EXT_IP = "203.0.113.2"
NODE_EXT_IP6 = "2001:db8:1::1"
EXT_IP6 = "2001:db8:1::2"
CLIENT_IP = "10.244.1.100"
CLIENT_IP6 = "fd00:10:244:1::100"
BRIDGE = "kbr0"
HTTP_PORT = 8080
UDP_PORT = 5300
TCP_PORT = 9000

_counter = itertools.count()


def run(argv: list[str], check: bool = True, timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def scratch_netns(prefix: str) -> Iterator[str]:
    """A fresh, empty network namespace (loopback up) named ``<prefix>-<random>``; deleted on exit."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        yield name
    finally:
        run(["ip", "netns", "del", name], check=False)


def unique_prefix(base: str = "kpt") -> str:
    """A short prefix unique to this process (netns names must not collide between parallel runs)."""
    return f"{base}{os.getpid() % 100000}x{next(_counter)}"


@dataclass
class Pod:
    name: str
    ns: str
    ip: str
    ip6: str
    port_dev: str  # its bridge port in the node namespace
    proc: subprocess.Popen[str] | None = None


@dataclass
class Topology:
    prefix: str = field(default_factory=unique_prefix)
    pods: int = 3
    ipv6: bool = True
    node_name: str = "node-a"
    servers: bool = True
    cni: bool = False  # create pods through kproxy's CNI plugins (as kubelet would) instead of `ip` commands

    def __post_init__(self) -> None:
        self.node = f"{self.prefix}-node"
        self.client = f"{self.prefix}-client"
        self.ext = f"{self.prefix}-ext"
        self.pod: dict[str, Pod] = {}
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []
        self.workdir = tempfile.mkdtemp(prefix=f"{self.prefix}-")
        self._next_index = 0

    # ---- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> Topology:
        self._trap_sigterm()
        try:
            self.create()
        except BaseException:
            self.destroy()
            self._restore_sigterm()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.destroy()
        finally:
            self._restore_sigterm()

    def _trap_sigterm(self) -> None:
        """Turn SIGTERM into SystemExit while the topology exists, so ``__exit__`` deletes the namespaces.

        Without it a plain ``kill`` of a benchmark or test process would leave its namespaces behind. Only
        where nobody else handles SIGTERM (the default action) and only from the main thread (Python allows
        signal handlers nowhere else).
        """
        self._old_sigterm: Any = None
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._old_sigterm = signal.SIG_DFL
            signal.signal(signal.SIGTERM, _exit_on_sigterm)

    def _restore_sigterm(self) -> None:
        if self._old_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    def _add_ns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])

    def sysctl(self, ns: str, values: dict[str, str | int]) -> None:
        script = "; ".join(f"echo {v} > /proc/sys/{k.replace('.', '/')}" for k, v in values.items())
        run(["ip", "netns", "exec", ns, "sh", "-c", script])

    def create(self) -> None:
        self._add_ns(self.node)
        self.sysctl(self.node, {"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1,
                                "net.ipv4.conf.all.route_localnet": 1})
        ipn = ["ip", "-n", self.node]
        run([*ipn, "link", "add", BRIDGE, "type", "bridge"])
        run([*ipn, "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE])
        if self.ipv6:
            run([*ipn, "addr", "add", f"{GATEWAY6}/64", "dev", BRIDGE, "nodad"])
        run([*ipn, "link", "set", BRIDGE, "up"])
        # bridged pod-to-pod traffic must traverse netfilter for same-bridge ClusterIP replies to be un-NATed
        with contextlib.suppress(RuntimeError):
            self.sysctl(self.node, {"net.bridge.bridge-nf-call-iptables": 1,
                                    "net.bridge.bridge-nf-call-ip6tables": 1})
        # external host
        self._add_ns(self.ext)
        run([*ipn, "link", "add", "ext0", "type", "veth", "peer", "name", "eth0", "netns", self.ext])
        run([*ipn, "addr", "add", f"{NODE_EXT_IP}/24", "dev", "ext0"])
        run([*ipn, "link", "set", "ext0", "up"])
        ipe = ["ip", "-n", self.ext]
        run([*ipe, "addr", "add", f"{EXT_IP}/24", "dev", "eth0"])
        run([*ipe, "link", "set", "eth0", "up"])
        run([*ipe, "route", "add", POD_CIDR, "via", NODE_EXT_IP])
        run([*ipe, "route", "add", SERVICE_CIDR, "via", NODE_EXT_IP])
        # the node's default route points at the external host so node-originated VIP traffic has a route
        run([*ipn, "route", "add", "default", "via", EXT_IP])
        if self.ipv6:
            run([*ipn, "addr", "add", f"{NODE_EXT_IP6}/64", "dev", "ext0", "nodad"])
            run([*ipe, "addr", "add", f"{EXT_IP6}/64", "dev", "eth0", "nodad"])
            run([*ipe, "route", "add", POD_CIDR6, "via", NODE_EXT_IP6])
            run([*ipe, "route", "add", SERVICE_CIDR6, "via", NODE_EXT_IP6])
            run([*ipn, "route", "add", "default", "via", EXT_IP6])
        self._attach(self.client, CLIENT_IP, CLIENT_IP6, "vcl")
        for _ in range(self.pods):
            self.add_pod()

    def cni_conf(self) -> dict[str, Any]:
        """The network configuration list the pods get when ``cni`` is set (bridge + host-local IPAM)."""
        ranges = [[{"subnet": POD_CIDR, "gateway": GATEWAY}]]
        if self.ipv6:
            ranges.append([{"subnet": POD_CIDR6, "gateway": GATEWAY6}])
        return {"cniVersion": "1.1.0", "name": "kproxy-demo", "plugins": [{
            "type": "kproxy-bridge", "bridge": BRIDGE, "isGateway": True, "isDefaultGateway": True,
            "hairpinMode": True, "capabilities": {"ips": True},
            "ipam": {"type": "kproxy-host-local", "dataDir": os.path.join(self.workdir, "ipam"),
                     "ranges": ranges},
        }]}

    def _attach(self, ns: str, ip: str, ip6: str, port_dev: str) -> None:
        if self.cni:
            self._attach_cni(ns, ip, ip6)
            return
        self._add_ns(ns)
        ipn = ["ip", "-n", self.node]
        run([*ipn, "link", "add", port_dev, "type", "veth", "peer", "name", "eth0", "netns", ns])
        run([*ipn, "link", "set", port_dev, "master", BRIDGE])
        run([*ipn, "link", "set", port_dev, "type", "bridge_slave", "hairpin", "on"])
        run([*ipn, "link", "set", port_dev, "up"])
        ipp = ["ip", "-n", ns]
        run([*ipp, "addr", "add", f"{ip}/24", "dev", "eth0"])
        run([*ipp, "link", "set", "eth0", "up"])
        run([*ipp, "route", "add", "default", "via", GATEWAY])
        if self.ipv6:
            run([*ipp, "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad"])
            run([*ipp, "route", "add", "default", "via", GATEWAY6])

    def _attach_cni(self, ns: str, ip: str, ip6: str) -> None:
        from cni import runtime

        self._add_ns(ns)
        bindir = os.path.dirname(sys.executable)
        ips = [f"{ip}/24"] + ([f"{ip6}/64"] if self.ipv6 else [])
        # the plugin runs inside the node namespace, so the bridge and its rules live there, as on a node
        runtime.add(self.cni_conf(), f"{self.prefix}-{ns}", f"/var/run/netns/{ns}", "eth0",
                    cni_path=[bindir, "/usr/lib/cni"], runtime_config={"ips": ips}, netns_exec=self.node)

    def add_pod(self, name: str | None = None) -> Pod:
        i = self._next_index
        self._next_index += 1
        name = name or f"pod{i}"
        pod = Pod(name, f"{self.prefix}-{name}", f"10.244.1.{10 + i}", f"fd00:10:244:1::{10 + i:x}", f"vp{i}")
        self._attach(pod.ns, pod.ip, pod.ip6, pod.port_dev)
        if self.servers:
            pod.proc = self.spawn(pod.ns, [sys.executable, "-m", "kproxy.testing.echo_server", "--name", name,
                                           "--http", str(HTTP_PORT), "--udp", str(UDP_PORT), "--tcp", str(TCP_PORT)],
                                  wait_for="ready")
        self.pod[name] = pod
        return pod

    def remove_pod(self, name: str) -> None:
        pod = self.pod.pop(name)
        self._kill_ns(pod.ns)
        run(["ip", "netns", "del", pod.ns], check=False)
        self.namespaces.remove(pod.ns)

    def destroy(self) -> None:
        for p in self.procs:
            terminate(p)
        for ns in reversed(self.namespaces):
            self._kill_ns(ns)
            run(["ip", "netns", "del", ns], check=False)
        self.namespaces.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def _kill_ns(ns: str) -> None:
        pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)

    # ---- running things inside ---------------------------------------------------------------------
    def exec(self, ns: str, argv: list[str], check: bool = True, timeout: float = 60,
             **kw: Any) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", ns, *argv], check=check, timeout=timeout, **kw)

    def spawn(self, ns: str, argv: list[str], wait_for: str = "", log_name: str = "",
              env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """Start a background process in ``ns``; optionally wait for a line on its stdout."""
        out: Any = subprocess.PIPE if wait_for else subprocess.DEVNULL
        if log_name:
            out = open(os.path.join(self.workdir, log_name), "w")  # noqa: SIM115 - owned by the process
        p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=out, stderr=subprocess.STDOUT
                             if not log_name else out, text=True, start_new_session=True,
                             env={**os.environ, **(env or {})})
        self.procs.append(p)
        if wait_for and p.stdout is not None:
            line = p.stdout.readline()
            if wait_for not in line:
                terminate(p)
                raise RuntimeError(f"{argv[0]} in {ns} did not start: {line!r}")
        return p

    def probe(self, ns: str, *args: str | int, timeout: float = 120) -> dict[str, Any]:
        p = self.exec(ns, [sys.executable, "-m", "kproxy.testing.probe", *map(str, args)], timeout=timeout)
        return json.loads(p.stdout)

    def log_path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    # ---- the daemon --------------------------------------------------------------------------------
    def daemon_args(self, manifests: str, mode: str = "iptables", *extra: str) -> list[str]:
        return [sys.executable, "-m", "kproxy", "--manifests", manifests, "--proxy-mode", mode,
                "--hostname-override", self.node_name,
                "--cluster-cidr", POD_CIDR + ("," + POD_CIDR6 if self.ipv6 else ""),
                "--healthz-bind-address", "127.0.0.1:10256", "--metrics-bind-address", "127.0.0.1:10249",
                "--min-sync-period", "0s", *extra]

    def start_daemon(self, manifests: str, mode: str = "iptables", *extra: str,
                     log_name: str = "kproxy.log") -> subprocess.Popen[str]:
        return self.spawn(self.node, self.daemon_args(manifests, mode, *extra), log_name=log_name)

    def stop_daemon(self, p: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        p.send_signal(sig)
        rc = p.wait(timeout)
        self.procs.remove(p)
        return rc

    def wait_healthy(self, timeout: float = 30, port: int = 10256) -> None:
        """Wait until the daemon in the node namespace has completed its first sync.

        /healthz answers 200 while no update is overdue (kube-proxy's rule, which also reports the top-level
        ``lastUpdated`` as "now" when healthy), so the first successful sync is recognised by the per-family
        ``status`` entries, which appear only once a family has been programmed.
        """
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                p = self.exec(self.node, ["curl", "-s", "-m", "5", "-w", "\n%{http_code}",
                                          f"http://127.0.0.1:{port}/healthz"],
                              check=False, timeout=max(1.0, min(20.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:  # a slow machine (or the TCG VM): keep polling until the deadline
                last = "(curl timed out)"
                continue
            last = p.stdout
            body, _, code = last.rpartition("\n")
            if code == "200":
                with contextlib.suppress(ValueError):
                    if json.loads(body).get("status"):
                        return
            time.sleep(0.1)
        raise TimeoutError(f"kproxy did not complete a sync in {timeout}s (last /healthz {last!r}); "
                           f"log: {self.read_log()}")

    def read_log(self, name: str = "kproxy.log") -> str:
        try:
            with open(self.log_path(name)) as f:
                return f.read()[-4000:]
        except OSError:
            return ""


def terminate(p: subprocess.Popen[str]) -> None:
    """SIGTERM the process group, SIGKILL it after 5 s."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
