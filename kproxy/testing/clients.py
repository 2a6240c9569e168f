"""Traffic clients for the scenario tests that :mod:`kproxy.testing.probe` does not cover.

Run inside a namespace with ``python -m kproxy.testing.clients <command> ...``; every command prints JSON.

``wait-connect IP PORT --deadline S``  retry TCP connects until one succeeds (a convergence barrier)
``http-by-src IP PORT --src A,B -n N``  N HTTP GETs from each source address → {src: {backend: count}}
``udp-ask IP PORT -n N``                N datagrams on *connected* UDP sockets (one per datagram unless
                                        --same-socket), so ICMP port-unreachable shows as "refused"
``udp-session IP PORT``                 one connected UDP socket kept open; each stdin line sends a datagram
                                        and prints one JSON line {"reply", "error"} (stale-conntrack tests)
``tcp-hold IP PORT --interval S``       one long-lived TCP connection to a line-echo server: prints
                                        ``connected <backend>``, sends a line every S seconds, and on
                                        SIGTERM/SIGINT prints a JSON summary (sent, received, errors, gaps)
``http-loop IP PORT --interval S``      a new HTTP connection every S seconds until SIGTERM/SIGINT; prints
                                        ``started``, then a JSON summary (ok, errors, error samples, backends)
``sctp-serve --name N --port P``        SCTP one-to-one echo server answering ``<name> <peer-ip>``
``sctp-ask IP PORT -n N``               N SCTP associations, one message each → counts per backend
Dependency-free (stdlib only) so it starts fast under ``ip netns exec``.
"""

from __future__ import annotations

import argparse
import collections
import json
import select
import signal
import socket
import sys
import threading
import time
from typing import Any

from .probe import _family, http_get


def _err_kind(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, TimeoutError | socket.timeout):
        return "timeout"
    if isinstance(e, ConnectionResetError):
        return "reset"
    if isinstance(e, OSError) and e.errno is not None:
        return f"{type(e).__name__}:{e.errno}"
    return type(e).__name__


def _emit(obj: Any) -> None:
    print(json.dumps(obj), flush=True)


def wait_connect(ip: str, port: int, deadline: float, attempt_timeout: float) -> dict[str, Any]:
    t0 = time.monotonic()
    attempts = 0
    last = ""
    while True:
        attempts += 1
        try:
            with socket.socket(_family(ip), socket.SOCK_STREAM) as s:
                s.settimeout(attempt_timeout)
                s.connect((ip, port))
            return {"ok": True, "elapsed": time.monotonic() - t0, "attempts": attempts, "error": ""}
        except OSError as e:
            last = _err_kind(e)
        if time.monotonic() - t0 > deadline:
            return {"ok": False, "elapsed": time.monotonic() - t0, "attempts": attempts, "error": last}
        time.sleep(0.03)


def http_by_src(ip: str, port: int, sources: list[str], n: int, timeout: float) -> dict[str, Any]:
    out: dict[str, Any] = {"by_src": {}, "errors": 0}
    for src in sources:
        counts: collections.Counter[str] = collections.Counter()
        for _ in range(n):
            try:
                counts[http_get(ip, port, timeout, src).partition(" ")[0]] += 1
            except OSError:
                out["errors"] += 1
        out["by_src"][src] = dict(counts)
    return out


def _udp_socket(ip: str, port: int, timeout: float) -> socket.socket:
    s = socket.socket(_family(ip), socket.SOCK_DGRAM)
    s.settimeout(timeout)
    s.connect((ip, port))  # connected: ICMP errors are reported to the socket
    return s


def _udp_once(s: socket.socket, payload: bytes = b"hello") -> str:
    s.send(payload)
    return s.recv(2048).decode().strip()


def udp_ask(ip: str, port: int, n: int, timeout: float, same_socket: bool) -> dict[str, Any]:
    counts: collections.Counter[str] = collections.Counter()
    peers: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    shared = _udp_socket(ip, port, timeout) if same_socket else None
    for _ in range(n):
        s = shared or _udp_socket(ip, port, timeout)
        try:
            name, _, peer = _udp_once(s).partition(" ")
            counts[name] += 1
            peers[peer] += 1
        except OSError as e:
            errors[_err_kind(e)] += 1
        finally:
            if shared is None:
                s.close()
    return {"counts": counts, "peers": peers, "errors": sum(errors.values()), "error_kinds": errors}


def udp_session(ip: str, port: int, timeout: float) -> int:
    s = _udp_socket(ip, port, timeout)
    _emit({"ready": True, "local": list(s.getsockname()[:2])})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            _emit({"reply": _udp_once(s, line.strip().encode()), "error": ""})
        except OSError as e:
            _emit({"reply": "", "error": _err_kind(e)})
    return 0


def tcp_hold(ip: str, port: int, interval: float, timeout: float) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stats: dict[str, Any] = {"sent": 0, "received": 0, "errors": [], "backend": "", "max_gap": 0.0,
                             "duration": 0.0}
    t0 = time.monotonic()
    try:
        s = socket.create_connection((ip, port), timeout=timeout)
    except OSError as e:
        _emit({**stats, "errors": [f"connect: {_err_kind(e)}"]})
        return 1
    s.settimeout(timeout)
    f = s.makefile("rb")
    last_ok = time.monotonic()
    first = True
    while not stop.is_set():
        seq = stats["sent"]
        try:
            s.sendall(f"line {seq}\n".encode())
            stats["sent"] += 1
            reply = f.readline().decode().strip()
            if not reply:
                raise ConnectionResetError("connection closed by peer")
            backend, _, echoed = reply.partition(" ")
            if echoed != f"line {seq}":
                stats["errors"].append(f"seq {seq}: unexpected reply {reply!r}")
            stats["received"] += 1
            now = time.monotonic()
            stats["max_gap"] = max(stats["max_gap"], now - last_ok)
            last_ok = now
            if first:
                stats["backend"] = backend
                print(f"connected {backend}", flush=True)
                first = False
            elif backend != stats["backend"]:
                stats["errors"].append(f"seq {seq}: backend changed to {backend}")
        except OSError as e:
            stats["errors"].append(f"seq {seq}: {_err_kind(e)}")
            if first:
                print("failed", flush=True)
            break
        stop.wait(interval)
    stats["duration"] = time.monotonic() - t0
    s.close()
    _emit(stats)
    return 0


def http_loop(ip: str, port: int, interval: float, timeout: float) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    t0 = time.monotonic()
    out: dict[str, Any] = {"ok": 0, "errors": 0, "samples": [], "backends": {}}
    backends: collections.Counter[str] = collections.Counter()
    print("started", flush=True)
    while not stop.is_set():
        try:
            backends[http_get(ip, port, timeout).partition(" ")[0]] += 1
            out["ok"] += 1
        except OSError as e:
            out["errors"] += 1
            if len(out["samples"]) < 20:
                out["samples"].append(f"{time.monotonic() - t0:.2f}s {_err_kind(e)}")
        stop.wait(interval)
    out["backends"] = dict(backends)
    out["duration"] = time.monotonic() - t0
    _emit(out)
    return 0


def sctp_serve(name: str, port: int) -> int:
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("::", port))
    srv.listen(64)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    while not stop.is_set():
        r, _, _ = select.select([srv], [], [], 0.5)
        if not r:
            continue
        conn, addr = srv.accept()
        with conn:
            conn.settimeout(2)
            try:
                conn.recv(2048)
                peer = addr[0][7:] if addr[0].startswith("::ffff:") else addr[0]
                conn.sendall(f"{name} {peer}".encode())
            except OSError:
                pass
    return 0


def sctp_ask(ip: str, port: int, n: int, timeout: float) -> dict[str, Any]:
    counts: collections.Counter[str] = collections.Counter()
    peers: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        try:
            with socket.socket(_family(ip), socket.SOCK_STREAM, socket.IPPROTO_SCTP) as s:
                s.settimeout(timeout)
                s.connect((ip, port))
                s.sendall(b"hello")
                name, _, peer = s.recv(2048).decode().strip().partition(" ")
                counts[name] += 1
                peers[peer] += 1
        except OSError as e:
            errors[_err_kind(e)] += 1
    return {"counts": counts, "peers": peers, "errors": sum(errors.values()), "error_kinds": errors}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def target(p: argparse.ArgumentParser) -> None:
        p.add_argument("ip")
        p.add_argument("port", type=int)
        p.add_argument("--timeout", type=float, default=2.0)

    p = sub.add_parser("wait-connect")
    target(p)
    p.add_argument("--deadline", type=float, default=10.0)
    p = sub.add_parser("http-by-src")
    target(p)
    p.add_argument("--src", required=True, help="comma-separated source addresses")
    p.add_argument("-n", "--count", type=int, default=1)
    p = sub.add_parser("udp-ask")
    target(p)
    p.add_argument("-n", "--count", type=int, default=1)
    p.add_argument("--same-socket", action="store_true")
    p = sub.add_parser("udp-session")
    target(p)
    p = sub.add_parser("tcp-hold")
    target(p)
    p.add_argument("--interval", type=float, default=0.2)
    p = sub.add_parser("http-loop")
    target(p)
    p.add_argument("--interval", type=float, default=0.05)
    p = sub.add_parser("sctp-serve")
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("sctp-ask")
    target(p)
    p.add_argument("-n", "--count", type=int, default=1)
    a = ap.parse_args(argv)

    if a.cmd == "wait-connect":
        _emit(wait_connect(a.ip, a.port, a.deadline, min(a.timeout, 0.5)))
    elif a.cmd == "http-by-src":
        _emit(http_by_src(a.ip, a.port, [s for s in a.src.split(",") if s], a.count, a.timeout))
    elif a.cmd == "udp-ask":
        _emit(udp_ask(a.ip, a.port, a.count, a.timeout, a.same_socket))
    elif a.cmd == "udp-session":
        return udp_session(a.ip, a.port, a.timeout)
    elif a.cmd == "tcp-hold":
        return tcp_hold(a.ip, a.port, a.interval, a.timeout)
    elif a.cmd == "http-loop":
        return http_loop(a.ip, a.port, a.interval, a.timeout)
    elif a.cmd == "sctp-serve":
        return sctp_serve(a.name, a.port)
    elif a.cmd == "sctp-ask":
        _emit(sctp_ask(a.ip, a.port, a.count, a.timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
