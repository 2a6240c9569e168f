"""Traffic probes run inside a client network namespace; print one JSON object with the results.

``http IP PORT -n N``  : N HTTP GETs (a new TCP connection each) → {"counts": {name: n}, "peers": {...}, "errors": k}
``udp IP PORT -n N``   : N datagrams from N fresh sockets (so each is a new conntrack flow unless --same-socket)
``tcp-check IP PORT``  : one TCP connect; {"ok": bool, "error": "..."} (distinguishes refused vs timeout)
Kept dependency-free so it starts fast under ``ip netns exec``.
"""

from __future__ import annotations

import argparse
import collections
import json
import socket
import sys


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def http_get(ip: str, port: int, timeout: float, src: str = "") -> str:
    with socket.socket(_family(ip), socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        if src:
            s.bind((src, 0))
        s.connect((ip, port))
        host = f"[{ip}]" if ":" in ip else ip
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.split(b"\r\n\r\n", 1)[1].decode().strip()


def udp_ask(ip: str, port: int, timeout: float, sock: socket.socket | None = None) -> str:
    own = sock is None
    s = sock or socket.socket(_family(ip), socket.SOCK_DGRAM)
    try:
        s.settimeout(timeout)
        s.sendto(b"hello", (ip, port))
        data, _ = s.recvfrom(2048)
        return data.decode().strip()
    finally:
        if own:
            s.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("kind", choices=("http", "udp", "tcp-check"))
    ap.add_argument("ip")
    ap.add_argument("port", type=int)
    ap.add_argument("-n", "--count", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--src", default="", help="bind the client socket to this source address")
    ap.add_argument("--same-socket", action="store_true", help="udp: reuse one socket (one flow)")
    a = ap.parse_args(argv)
    counts: collections.Counter[str] = collections.Counter()
    peers: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    if a.kind == "tcp-check":
        try:
            with socket.socket(_family(a.ip), socket.SOCK_STREAM) as s:
                s.settimeout(a.timeout)
                s.connect((a.ip, a.port))
            print(json.dumps({"ok": True, "error": ""}))
        except OSError as e:
            kind = "refused" if isinstance(e, ConnectionRefusedError) else (
                "timeout" if isinstance(e, TimeoutError | socket.timeout) else type(e).__name__)
            print(json.dumps({"ok": False, "error": kind}))
        return 0
    sock = None
    if a.kind == "udp" and a.same_socket:
        sock = socket.socket(_family(a.ip), socket.SOCK_DGRAM)
    for _ in range(a.count):
        try:
            if a.kind == "http":
                reply = http_get(a.ip, a.port, a.timeout, a.src)
            else:
                reply = udp_ask(a.ip, a.port, a.timeout, sock)
            name, _, peer = reply.partition(" ")
            counts[name] += 1
            peers[peer] += 1
        except OSError as e:
            errors["refused" if isinstance(e, ConnectionRefusedError) else
                   "timeout" if isinstance(e, TimeoutError | socket.timeout) else type(e).__name__] += 1
    print(json.dumps({"counts": counts, "peers": peers, "errors": sum(errors.values()), "error_kinds": errors}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
