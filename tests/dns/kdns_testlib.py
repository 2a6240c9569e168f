"""Helpers for the DNS tests: a real ``kproxy dns`` process on a free loopback port, fed from a copy of
the manifests in tests/dns/manifests, and helpers to query it with dnspython and dig."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.query
import dns.rcode

HERE = Path(__file__).parent
MANIFESTS = HERE / "manifests"
ZONE = "cluster.local"


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on host."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


@dataclass
class Server:
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    manifests: Path
    log: Path

    def query(self, name: str, rdtype: str = "A", *, tcp: bool = False, edns: int = 0,
              payload: int = 1232, **kw: object) -> dns.message.Message:
        q = dns.message.make_query(name, rdtype, use_edns=edns, payload=payload, **kw)  # type: ignore[arg-type]
        if tcp:
            return dns.query.tcp(q, self.host, port=self.port, timeout=3)
        return dns.query.udp(q, self.host, port=self.port, timeout=3, ignore_trailing=False)

    def raw(self, packet: bytes, timeout: float = 1.0) -> bytes | None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(packet, (self.host, self.port))
            try:
                return s.recv(65535)
            except TimeoutError:
                return None

    def dig(self, *args: str) -> str:
        out = subprocess.run(["dig", f"@{self.host}", "-p", str(self.port), "+norec", "+time=2", "+tries=1", *args],
                             capture_output=True, text=True, timeout=20)
        return out.stdout

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_server(tmp: Path, *extra: str, manifests: Path = MANIFESTS) -> Server:
    mdir = tmp / "manifests"
    shutil.copytree(manifests, mdir)
    port = free_port()
    log = tmp / "dns.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "kproxy", "dns", "--manifests", str(mdir),
                                 "--listen", f"127.0.0.1:{port}", *extra],
                                stdout=logf, stderr=subprocess.STDOUT, env=env)
    srv = Server("127.0.0.1", port, proc, mdir, log)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kproxy dns exited: {log.read_text()}")
        try:
            r = srv.query(f"web.default.svc.{ZONE}", "A")
            if r.answer:
                return srv
        except (dns.exception.Timeout, OSError):
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"kproxy dns did not come up: {log.read_text()}")


def stop_server(srv: Server) -> None:
    srv.proc.terminate()
    try:
        srv.proc.wait(5)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        srv.proc.wait()
