"""Socket-level client for the ebpf tests: reports what the application sees (peer addresses).

Run inside the client namespace *and* the test cgroup. Prints one JSON object.

``http IP PORT -n N``          N HTTP GETs, a new connection each: {"counts", "peers" (getpeername), "errors"}
``udp IP PORT -n N``           N datagrams on unconnected sockets: {"counts", "peers" (recvfrom source)}
``udp-connected IP PORT -n N`` N connected UDP sockets: {"counts", "peers" (getpeername and recvfrom)}
``hold IP PORT SECONDS``       one TCP connection to the line-echo port, one round trip every 50 ms
                               for SECONDS (stdin closed early ends it): {"ok", "fail", "error"}
"""

from __future__ import annotations

import collections
import json
import socket
import sys
import time


def fam(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def peer(addr: tuple) -> str:  # type: ignore[type-arg]
    return f"{addr[0]}:{addr[1]}"


def http(ip: str, port: int, n: int) -> dict:  # type: ignore[type-arg]
    counts: collections.Counter[str] = collections.Counter()
    peers: collections.Counter[str] = collections.Counter()
    errors = []
    for _ in range(n):
        try:
            with socket.socket(fam(ip), socket.SOCK_STREAM) as s:
                s.settimeout(3)
                s.connect((ip, port))
                peers[peer(s.getpeername())] += 1
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
                counts[data.split(b"\r\n\r\n", 1)[1].decode().split()[0]] += 1
        except OSError as e:
            errors.append(f"{type(e).__name__}: {e}")
    return {"counts": counts, "peers": peers, "errors": len(errors), "error_list": errors[:3]}


def udp(ip: str, port: int, n: int, connected: bool) -> dict:  # type: ignore[type-arg]
    counts: collections.Counter[str] = collections.Counter()
    peers: collections.Counter[str] = collections.Counter()
    errors = []
    for _ in range(n):
        try:
            with socket.socket(fam(ip), socket.SOCK_DGRAM) as s:
                s.settimeout(2)
                if connected:
                    s.connect((ip, port))
                    peers["getpeername " + peer(s.getpeername())] += 1
                    s.send(b"hello")
                else:
                    s.sendto(b"hello", (ip, port))
                data, src = s.recvfrom(2048)
                peers["recvfrom " + peer(src)] += 1
                counts[data.decode().split()[0]] += 1
        except OSError as e:
            errors.append(f"{type(e).__name__}: {e}")
    return {"counts": counts, "peers": peers, "errors": len(errors), "error_list": errors[:3]}


def hold(ip: str, port: int, seconds: float) -> dict:  # type: ignore[type-arg]
    ok = fail = 0
    err = ""
    s = socket.create_connection((ip, port), timeout=3)
    print(json.dumps({"connected": peer(s.getpeername())}), flush=True)
    deadline = time.monotonic() + seconds
    f = s.makefile("rb")
    i = 0
    while time.monotonic() < deadline:
        i += 1
        try:
            s.sendall(f"ping {i}\n".encode())
            line = f.readline()
            if line.strip().endswith(f"ping {i}".encode()):
                ok += 1
            else:
                fail += 1
                err = repr(line)
        except OSError as e:
            fail += 1
            err = str(e)
            break
        time.sleep(0.05)
    s.close()
    return {"ok": ok, "fail": fail, "error": err}


def main() -> None:
    kind, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    n = int(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[4] == "-n" else 1
    if kind == "http":
        out = http(ip, port, n)
    elif kind == "udp":
        out = udp(ip, port, n, connected=False)
    elif kind == "udp-connected":
        out = udp(ip, port, n, connected=True)
    elif kind == "hold":
        out = hold(ip, port, float(sys.argv[4]))
    else:
        raise SystemExit(f"unknown kind {kind}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
