"""Helpers for the CNI plugin tests (see conftest.py for the fixtures).

Plugins are always exec'd the way a runtime does (env + stdin), through :mod:`cni.runtime`.
kproxy's plugins are the launchers written by ``deploy/cni/install-cni.sh`` into a temporary bin
directory (what a node runs); the reference plugins come from Debian's containernetworking-plugins.

Network-namespace tests create a "node" netns per test (bridges and iptables rules live there; the
plugins run inside it through ``ip netns exec``) plus one netns per pod, all named ``kpcni-<random>``
and removed again by the fixture finalizers, whatever the outcome.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from cni import runtime

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REF_DIR = "/usr/lib/cni"
IS_ROOT = os.geteuid() == 0


def have_reference() -> bool:
    return all(os.access(os.path.join(REF_DIR, p), os.X_OK) for p in ("bridge", "host-local", "portmap"))


needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root for network namespaces")
needs_reference = pytest.mark.skipif(
    not have_reference(), reason="reference plugins missing: apt-get install containernetworking-plugins"
)


class Plugins:
    """Exec plugins like a runtime; returns (exit code, parsed stdout) so error cases can be asserted."""

    def __init__(self, cni_path: list[str], node: str | None = None) -> None:
        self.cni_path = cni_path
        self.node = node

    def call(
        self,
        conf: dict[str, Any],
        command: str,
        cid: str = "",
        netns: str = "",
        ifname: str = "",
        args: dict[str, str] | None = None,
        env_drop: tuple[str, ...] = (),
        raw: bytes | None = None,
    ) -> tuple[int, dict[str, Any] | None]:
        path = runtime.find(conf["type"], self.cni_path)
        env = dict(os.environ)
        env.update(
            {
                "CNI_COMMAND": command,
                "CNI_CONTAINERID": cid,
                "CNI_NETNS": netns,
                "CNI_IFNAME": ifname,
                "CNI_ARGS": ";".join(f"{k}={v}" for k, v in (args or {}).items()),
                "CNI_PATH": os.pathsep.join(self.cni_path),
            }
        )
        for k in [k for k, v in env.items() if k.startswith("CNI_") and not v] + list(env_drop):
            env.pop(k, None)
        argv = ["ip", "netns", "exec", self.node, path] if self.node else [path]
        stdin = raw if raw is not None else json.dumps(conf).encode()
        p = subprocess.run(argv, input=stdin, env=env, capture_output=True, timeout=60)
        out = p.stdout.decode()
        return p.returncode, (json.loads(out) if out.strip() else None)

    def ok(self, conf: dict[str, Any], command: str, *a: Any, **kw: Any) -> dict[str, Any] | None:
        rc, out = self.call(conf, command, *a, **kw)
        assert rc == 0, f"{conf['type']} {command} failed: {out}"
        return out


class Netns:
    """Creates uniquely named network namespaces and removes them all at teardown."""

    def __init__(self) -> None:
        self.prefix = "kpcni-" + secrets.token_hex(3)
        self.created: list[str] = []

    def new(self, tag: str) -> str:
        name = f"{self.prefix}-{tag}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.created.append(name)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        return name

    def delete(self, name: str) -> None:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        if name in self.created:
            self.created.remove(name)

    def cleanup(self) -> None:
        for name in reversed(list(self.created)):
            self.delete(name)


def netns_path(name: str) -> str:
    return f"/var/run/netns/{name}"


def ip_json(ns: str, *args: str) -> Any:
    out = subprocess.run(["ip", "-j", "-n", ns, *args], check=True, capture_output=True).stdout
    return json.loads(out or b"[]")


def iptables_nat(ns: str, v6: bool = False) -> str:
    exe = "ip6tables" if v6 else "iptables"
    return subprocess.run(
        ["ip", "netns", "exec", ns, exe, "-w", "-t", "nat", "-S"], check=True, capture_output=True, text=True
    ).stdout


PING = r"""
import os, socket, struct, sys, time
dst = sys.argv[1]
v6 = ":" in dst
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
ident = os.getpid() & 0xFFFF
fam, proto, typ = (socket.AF_INET6, socket.IPPROTO_ICMPV6, 128) if v6 else (socket.AF_INET, socket.IPPROTO_ICMP, 8)
s = socket.socket(fam, socket.SOCK_RAW, proto)
s.settimeout(0.5)
deadline = time.time() + float(sys.argv[2])
seq = 0
while time.time() < deadline:
    seq += 1
    hdr = struct.pack("!BBHHH", typ, 0, 0, ident, seq) + b"kproxy-cni-ping"
    if not v6:
        hdr = hdr[:2] + struct.pack("!H", csum(hdr)) + hdr[4:]
    s.sendto(hdr, (dst, 0))
    end = time.time() + 0.5
    while time.time() < end:
        try:
            data, addr = s.recvfrom(2048)
        except (socket.timeout, BlockingIOError):
            break
        icmp = data if v6 else data[(data[0] & 0x0F) * 4:]
        t, _, _, rid, _ = struct.unpack("!BBHHH", icmp[:8])
        if t == (129 if v6 else 0) and rid == ident and addr[0] == dst:
            sys.exit(0)
sys.exit(1)
"""


def ping(ns: str, dst: str, timeout: float = 3.0) -> bool:
    """ICMP echo from inside netns ``ns`` (raw socket; no ping binary needed)."""
    p = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", PING, dst, str(timeout)], capture_output=True, timeout=30
    )
    return p.returncode == 0


def ip_files(data_dir: str, network: str) -> list[str]:
    d = os.path.join(data_dir, network)
    if not os.path.isdir(d):
        return []
    return sorted(f for f in os.listdir(d) if f != "lock" and not f.startswith("last_reserved_ip"))


def bridge_conf(
    name: str,
    data_dir: str,
    subnet: str = "10.244.1.0/24",
    *,
    ours: bool = True,
    ipam_ours: bool | None = None,
    **extra: Any,
) -> dict[str, Any]:
    ipam_ours = ours if ipam_ours is None else ipam_ours
    conf: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "name": name,
        "type": "kproxy-bridge" if ours else "bridge",
        "bridge": "kpcnibr0",
        "isGateway": True,
        "ipam": {
            "type": "kproxy-host-local" if ipam_ours else "host-local",
            "dataDir": data_dir,
            "ranges": [[{"subnet": subnet}]],
            "routes": [{"dst": "0.0.0.0/0"}],
        },
    }
    conf.update(extra)
    return conf


def hl_conf(name: str, data_dir: str, ranges: list[Any] | None = None, ours: bool = True, **ipam: Any) -> dict:
    conf: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "name": name,
        "type": "kproxy-bridge",
        "ipam": {
            "type": "kproxy-host-local" if ours else "host-local",
            "dataDir": data_dir,
            **({"ranges": ranges} if ranges is not None else {}),
            **ipam,
        },
    }
    return conf


def ipam_only(conf: dict[str, Any]) -> dict[str, Any]:
    """The config as the IPAM plugin itself sees it when called directly (type = the IPAM plugin)."""
    c = dict(conf)
    c["type"] = conf["ipam"]["type"]
    return c


RunAll = Callable[..., Any]


def which(x: str) -> str | None:
    return shutil.which(x)
