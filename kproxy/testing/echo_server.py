"""A backend for tests and the demo: answers with its own name and the peer address it sees.

Runs inside a pod network namespace. Protocols:
- HTTP (``--http``): ``GET /`` → ``<name> <peer-ip>\\n`` (the peer shows whether the proxy masqueraded).
- UDP (``--udp``): any datagram → ``<name> <peer-ip>``.
- TCP line echo (``--tcp``): each line → ``<name> <line>``; for long-lived connection tests.
Servers listen on both families (``::`` with dual-stack sockets) and stop on SIGTERM.
"""

from __future__ import annotations

import argparse
import http.server
import signal
import socket
import socketserver
import sys
import threading


def _peer(addr: tuple) -> str:
    ip = addr[0]
    return ip[7:] if ip.startswith("::ffff:") else ip


class _DualStackHTTP(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def serve_http(name: str, port: int) -> threading.Thread:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = f"{name} {_peer(self.client_address)}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = _DualStackHTTP(("::", port), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    return t


def serve_udp(name: str, port: int) -> threading.Thread:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))

    def loop() -> None:
        while True:
            _data, addr = s.recvfrom(2048)
            s.sendto(f"{name} {_peer(addr)}".encode(), addr)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def serve_tcp_echo(name: str, port: int) -> threading.Thread:
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                self.wfile.write(f"{name} {line.decode(errors='replace').strip()}\n".encode())
                self.wfile.flush()

    class Server(socketserver.ThreadingTCPServer):
        address_family = socket.AF_INET6
        daemon_threads = True
        allow_reuse_address = True

        def server_bind(self) -> None:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    srv = Server(("::", port), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--name", required=True)
    ap.add_argument("--http", type=int, default=0)
    ap.add_argument("--udp", type=int, default=0)
    ap.add_argument("--tcp", type=int, default=0)
    args = ap.parse_args(argv)
    if args.http:
        serve_http(args.name, args.http)
    if args.udp:
        serve_udp(args.name, args.udp)
    if args.tcp:
        serve_tcp_echo(args.name, args.tcp)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("ready", flush=True)
    while not stop.wait(3600):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
