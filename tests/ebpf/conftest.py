"""Fixtures for the ebpf mode tests: a private bpffs, a child cgroup, manifests, clients in the cgroup.

Nothing is attached to the host's root cgroup and nothing is pinned in the host's /sys/fs/bpf: each test
mounts its own bpffs and a second view of the cgroup v2 hierarchy under a temporary directory (so the
daemon, which runs under ``ip netns exec`` with a fresh /sys, still sees both) and creates a child cgroup
there. Teardown detaches our programs, kills the processes left in the child cgroup (all started by the
test), removes the cgroup and unmounts both filesystems, also when the test failed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from kproxy.dataplane.ebpf import loader
from kproxy.testing.topology import Topology

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CLIENT = os.path.join(HERE, "sockclient.py")
NODE = "node-a"
_n = itertools.count()

os.environ.setdefault("KPROXY_CACHE_DIR", os.path.join(REPO, ".cache", "kproxy"))


def _bcc_available() -> bool:
    try:
        import bcc  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


requires_bpf = pytest.mark.skipif(os.geteuid() != 0 or not _bcc_available(), reason="needs root and bcc")


@dataclass
class BpfEnv:
    root: str
    bpffs: str
    cgroup: str  # the child cgroup (path through our private cgroup2 mount)

    @property
    def pin(self) -> str:
        return os.path.join(self.bpffs, "kproxy")

    def flags(self, interfaces: str = "ext0") -> list[str]:
        return ["--bpf-cgroup-path", self.cgroup, "--bpf-pin-path", self.pin, "--bpf-interfaces", interfaces]

    def procs(self) -> list[int]:
        with open(os.path.join(self.cgroup, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


@contextlib.contextmanager
def bpf_environment() -> Iterator[BpfEnv]:
    root = tempfile.mkdtemp(prefix=f"kpebpf{os.getpid()}x{next(_n)}-")
    bpffs, cgmnt = os.path.join(root, "bpf"), os.path.join(root, "cg")
    os.mkdir(bpffs)
    os.mkdir(cgmnt)
    mounted: list[str] = []
    cg = ""
    try:
        _run(["mount", "-t", "bpf", "bpf", bpffs])
        mounted.append(bpffs)
        _run(["mount", "-t", "cgroup2", "none", cgmnt])
        mounted.append(cgmnt)
        cg = os.path.join(cgmnt, os.path.basename(root))
        os.mkdir(cg)
        yield BpfEnv(root, bpffs, cg)
    finally:
        if cg and os.path.isdir(cg):
            with contextlib.suppress(OSError):
                loader.detach_cgroup(cg)
            for _ in range(50):
                with open(os.path.join(cg, "cgroup.procs")) as f:
                    pids = [int(x) for x in f.read().split()]
                if not pids:
                    break
                for pid in pids:  # only processes this test started live here
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
                time.sleep(0.05)
            with contextlib.suppress(OSError):
                os.rmdir(cg)
        for mnt in reversed(mounted):
            _run(["umount", "-l", mnt], check=False)
        with contextlib.suppress(OSError):
            os.rmdir(bpffs)
            os.rmdir(cgmnt)
            os.rmdir(root)


@pytest.fixture
def bpf_env() -> Iterator[BpfEnv]:
    with bpf_environment() as env:
        yield env


@pytest.fixture
def topo() -> Iterator[Topology]:
    with Topology(pods=3, ipv6=True) as t:
        yield t


def in_cgroup(env: BpfEnv, ns: str, argv: list[str]) -> list[str]:
    """argv that runs ``argv`` inside the test cgroup and network namespace ``ns``."""
    script = f'echo $$ > {env.cgroup}/cgroup.procs && exec ip netns exec "$0" "$@"'
    return ["sh", "-c", script, ns, *argv]


def client(env: BpfEnv, ns: str, *args: Any, timeout: float = 60) -> dict[str, Any]:
    p = subprocess.run(in_cgroup(env, ns, [sys.executable, CLIENT, *map(str, args)]), capture_output=True,
                       text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"client {args} failed: {p.stderr.strip()}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---- manifests -------------------------------------------------------------------------------------------

def service(name: str, ips: list[str], ports: list[tuple[str, str, int, int, int]], **spec: Any) -> dict[str, Any]:
    """ports: (name, protocol, port, targetPort, nodePort or 0)."""
    s: dict[str, Any] = {
        "type": "NodePort" if any(p[4] for p in ports) else "ClusterIP",
        "clusterIP": ips[0], "clusterIPs": ips,
        "ipFamilies": ["IPv6" if ":" in ip else "IPv4" for ip in ips],
        "ipFamilyPolicy": "RequireDualStack" if len(ips) > 1 else "SingleStack",
        "ports": [{"name": n, "protocol": pr, "port": p, "targetPort": t, **({"nodePort": np} if np else {})}
                  for n, pr, p, t, np in ports],
        **spec,
    }
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"}, "spec": s}


def endpoint_slice(svc: str, family: int, ports: list[tuple[str, str, int]], eps: list[dict[str, Any]],
                   suffix: str = "") -> dict[str, Any]:
    """eps: {"ip":..., "ready": bool, "node": ..., "terminating": bool, "serving": bool}."""
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{svc}-v{family}{suffix}", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv6" if family == 6 else "IPv4",
        "ports": [{"name": n, "protocol": pr, "port": p} for n, pr, p in ports],
        "endpoints": [{"addresses": [e["ip"]],
                       "conditions": {"ready": e.get("ready", True), "serving": e.get("serving", e.get("ready", True)),
                                      "terminating": e.get("terminating", False)},
                       "nodeName": e.get("node", NODE)} for e in eps],
    }


def write_manifests(directory: str, name: str, docs: list[dict[str, Any]]) -> None:
    path = os.path.join(directory, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump_all(docs, f)
    os.replace(tmp, path)


WEB_PORTS = [("http", "TCP", 80, 8080, 30080), ("dns", "UDP", 53, 5300, 30053), ("echo", "TCP", 9000, 9000, 30900)]
WEB_EP_PORTS = [("http", "TCP", 8080), ("dns", "UDP", 5300), ("echo", "TCP", 9000)]


def web_docs(topo: Topology, pods: list[str] | None = None, **spec: Any) -> list[dict[str, Any]]:
    """The "web" Service (dual-stack ClusterIP + NodePort) with the given pods as endpoints."""
    names = pods if pods is not None else sorted(topo.pod)
    return [
        service("web", ["10.96.0.10", "fd00:10:96::10"], WEB_PORTS, **spec),
        endpoint_slice("web", 4, WEB_EP_PORTS, [{"ip": topo.pod[n].ip} for n in names]),
        endpoint_slice("web", 6, WEB_EP_PORTS, [{"ip": topo.pod[n].ip6} for n in names]),
    ]


def wait_until(cond: Any, timeout: float = 10, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(0.1)
    raise TimeoutError(f"{what} not reached in {timeout}s (last: {last!r})")
