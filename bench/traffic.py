"""Data-path benchmark: packets, connections, requests and throughput through a Service vs straight to a pod.

One run, one namespace topology (``kproxy.testing.Topology``, 3 pods; nothing touches the host's namespace),
one kproxy daemon in the node namespace in the chosen ``--proxy-mode``. Every measurement alternates the
Service path and the direct path in the same conditions, ``--repeats`` times:

- **packets** (scapy traffic generator): frames are built with scapy (TCP SYN and UDP datagrams from
  ``--sources`` distinct source addresses added to the sender's eth0, random source ports, ``--flows``
  distinct flows; cached in .cache/kproxy) and sent as pre-serialised bytes in a tight loop over an
  ``AF_PACKET`` socket (scapy's own send loop manages a few thousand packets/s; raw bytes several 10k/s).
  One generator process alternates in ``--slice`` (50 ms) slices between the Service path and its
  baselines, each sending from its own block of source addresses, so every path sees the same background
  load: client pod -> ClusterIP vs client pod -> pod IPs (bridged: the pod-to-pod path) and vs pod IPs
  routed via the node (same hops as the ClusterIP path, no translation); external host -> NodePort vs
  external host -> pod IPs (routed through the node). nft counters *inside* the pod namespaces count what
  each backend received per path (delivered packets/s, per-backend share); counters in the sender's
  namespace count what came back (SYN-ACKs, UDP echoes).
- **conn/s**: ``wrk`` with ``Connection: close`` (one TCP connection per request) to the ClusterIP vs pod0;
  per-backend share from the pods' SYN counters.
- **HTTP req/s**: ``wrk`` with keep-alive, ClusterIP vs pod0.
- **iperf3**: client pod -> ClusterIP vs pod0, external host -> NodePort vs pod0 (routed).

Servers in the pods: a small epoll C server (HTTP on 8080, UDP echo on 5300, 2 SO_REUSEPORT threads, so
one pod can use the whole machine and the direct path is not server-bound) and ``iperf3 -s`` in pod0.
The measured processes run at ``--nice`` -20 so that other work on the machine disturbs them less.
Reported: median [min–max] over the repeats; ratio = Service path / direct path, the median of the
per-repeat ratios (each pair measured back to back or interleaved). Target: ratio ≥ 0.95. A full run takes
~3.5 minutes with the defaults.

    sudo .venv/bin/python bench/traffic.py --proxy-mode iptables --iptables-backend legacy \
        --out bench/results/traffic-iptables-legacy.md
    sudo .venv/bin/python bench/traffic.py --proxy-mode nftables -- --v 2   # extra daemon flags after --

Modes: iptables (both back ends), nftables, ebpf (clients run in a child cgroup where the socket-LB
programs are attached; tc programs on the node's external interface and on the client's bridge port, so
raw frames to the ClusterIP are translated too), ipvs (needs a kernel with IP_VS, e.g. inside the VM of
``kproxy/testing/vm.py``: refused with a clear message elsewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CACHE = os.path.join(REPO, ".cache", "kproxy")
MODES = ("iptables", "nftables", "ebpf", "ipvs")

VIP = "10.96.50.10"  # ClusterIP: TCP 8080 (HTTP), UDP 5300
NP_VIP = "10.96.50.12"  # NodePort Service: TCP 30080, UDP 30053
IPERF_VIP = "10.96.50.11"  # ClusterIP + NodePort 30201 -> pod0:5201 (one endpoint: iperf3 needs two
#                            connections of one test on the same server)
HTTP_PORT, UDP_PORT, IPERF_PORT = 8080, 5300, 5201
NP_HTTP, NP_UDP, NP_IPERF = 30080, 30053, 30201
CLIENT_SRC_BASE = "10.244.1.128"  # --sources extra addresses on the client's eth0 (free in the pod /24)
EXT_SRC_BASE = "203.0.113.128"  # ... and on the external host's eth0
COUNTER_TABLE = "kpbench"

SERVER_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

static const char *name;
static int http_port, udp_port;
static char ka[256], cl[256], body[64];
static int ka_len, cl_len, body_len;

static int bound(int type, int port) {
    int s = socket(AF_INET6, type | SOCK_NONBLOCK, 0), zero = 0, one = 1;
    setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    setsockopt(s, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(port), .sin6_addr = in6addr_any};
    if (bind(s, (void *)&a, sizeof(a))) { perror("bind"); exit(1); }
    if (type == SOCK_STREAM && listen(s, 4096)) { perror("listen"); exit(1); }
    return s;
}

static void *worker(void *arg) {
    (void)arg;
    int lt = bound(SOCK_STREAM, http_port), lu = bound(SOCK_DGRAM, udp_port);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lt};
    epoll_ctl(ep, EPOLL_CTL_ADD, lt, &ev);
    ev.data.fd = lu;
    epoll_ctl(ep, EPOLL_CTL_ADD, lu, &ev);
    struct epoll_event evs[64];
    char buf[8192];
    for (;;) {
        int n = epoll_wait(ep, evs, 64, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lt) {
                for (;;) {
                    int c = accept4(lt, NULL, NULL, SOCK_NONBLOCK);
                    if (c < 0) break;
                    int one = 1;
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                    struct epoll_event ce = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce);
                }
            } else if (fd == lu) {
                for (int k = 0; k < 64; k++) {
                    struct sockaddr_in6 from;
                    socklen_t fl = sizeof(from);
                    ssize_t r = recvfrom(lu, buf, sizeof(buf), 0, (void *)&from, &fl);
                    if (r < 0) break;
                    sendto(lu, body, body_len, MSG_DONTWAIT, (void *)&from, fl);
                }
            } else {
                ssize_t r = read(fd, buf, sizeof(buf) - 1);
                if (r <= 0) { close(fd); continue; }
                buf[r] = 0;
                int reqs = 0, close_it = 0;
                for (char *p = buf; (p = strstr(p, "\r\n\r\n")); p += 4) reqs++;
                if (strcasestr(buf, "connection: close")) close_it = 1;
                for (int k = 0; k < reqs; k++) {
                    if (close_it) send(fd, cl, cl_len, MSG_NOSIGNAL);
                    else send(fd, ka, ka_len, MSG_NOSIGNAL);
                }
                if (close_it) close(fd);
            }
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "usage: NAME HTTP_PORT UDP_PORT THREADS\n"); return 2; }
    name = argv[1]; http_port = atoi(argv[2]); udp_port = atoi(argv[3]);
    int threads = atoi(argv[4]);
    body_len = snprintf(body, sizeof(body), "%s\n", name);
    ka_len = snprintf(ka, sizeof(ka), "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n\r\n%s",
                      body_len, body);
    cl_len = snprintf(cl, sizeof(cl), "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n"
                      "Content-Type: text/plain\r\n\r\n%s", body_len, body);
    pthread_t t[16];
    for (int i = 0; i < threads && i < 16; i++) pthread_create(&t[i], NULL, worker, NULL);
    usleep(100000);
    printf("ready\n");
    fflush(stdout);
    pthread_join(t[0], NULL);
    return 0;
}
"""


# ---- frames ---------------------------------------------------------------------------------------------
def l3_frames(label: str, src_base: str, targets: list[tuple[str, int]], proto: str, flows: int,
              sources: int) -> list[bytes]:
    """Frames built with scapy, without their first 12 bytes (the MAC addresses), cached on disk."""
    key = hashlib.sha256(json.dumps([label, src_base, targets, proto, flows, sources, 1]).encode()).hexdigest()[:16]
    path = os.path.join(CACHE, "traffic-frames", f"{key}.bin")
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return unpack_frames(f.read())
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether

    rnd = random.Random(f"{label}-{proto}")
    out: list[bytes] = []
    for i in range(flows):
        dip, dport = targets[i % len(targets)]
        src = addr_plus(src_base, i % sources)
        sport = rnd.randrange(10000, 60000)
        l3 = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=dip, ttl=64)
        if proto == "tcp":
            pkt = l3 / TCP(sport=sport, dport=dport, flags="S", seq=rnd.randrange(1 << 32), window=64240)
        else:
            pkt = l3 / UDP(sport=sport, dport=dport) / b"kproxy-bench-payload"
        out.append(bytes(pkt)[12:])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(b"".join(struct.pack("!H", len(r)) + r for r in out))
    os.replace(tmp, path)
    return out


def unpack_frames(data: bytes) -> list[bytes]:
    """Length-prefixed (2 bytes, big endian) frames."""
    frames: list[bytes] = []
    off = 0
    while off < len(data):
        (n,) = struct.unpack_from("!H", data, off)
        frames.append(data[off + 2:off + 2 + n])
        off += 2 + n
    return frames


# ---- the sender (runs inside the sender's namespace, no scapy import) ----------------------------------------
def sender_main(frames_paths: list[str], duration: float, slice_s: float, max_packets: int, ifname: str) -> int:
    """Send pre-built frame sets over AF_PACKET, alternating between them every ``slice_s`` seconds.

    Each set gets ``duration`` seconds in total. Alternating in short slices makes the paths share whatever
    the rest of the machine does at the time (a fair comparison on a busy machine). Prints JSON: per set
    the frames sent, send errors and the seconds spent on it.
    """
    sets: list[list[bytes]] = []
    for path in frames_paths:
        with open(path, "rb") as f:
            sets.append(unpack_frames(f.read()))
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with contextlib.suppress(OSError):
        s.setsockopt(263, 20, 1)  # SOL_PACKET, PACKET_QDISC_BYPASS
    s.bind((ifname, 0))
    send = s.send
    n = len(sets)
    sent, errors, secs, pos = [0] * n, [0] * n, [0.0] * n, [0] * n
    chunk = 64
    clock = time.perf_counter
    k = 0
    while min(secs) < duration and sum(sent) + sum(errors) < max_packets:
        frames, nf = sets[k], len(sets[k])
        t0 = clock()
        end = t0 + min(slice_s, duration - secs[k] + 1e-4)
        i, ok, bad = pos[k], 0, 0
        while True:
            for fr in frames[i:i + chunk]:
                try:
                    send(fr)
                    ok += 1
                except OSError:
                    bad += 1
            i = (i + chunk) % nf
            if clock() >= end:
                break
        secs[k] += clock() - t0
        sent[k] += ok
        errors[k] += bad
        pos[k] = i
        k = (k + 1) % n
    print(json.dumps([{"sent": sent[j], "errors": errors[j], "seconds": secs[j]} for j in range(n)]))
    return 0


# ---- helpers ------------------------------------------------------------------------------------------------
def build_server() -> str:
    sys.path.insert(0, HERE)
    from ccache import compile_cached

    return compile_cached(CACHE, "kpbsrv", SERVER_C)


def stat(values: list[float], digits: int = 0) -> str:
    if not values:
        return "–"
    return f"{statistics.median(values):,.{digits}f} [{min(values):,.{digits}f}–{max(values):,.{digits}f}]"


def load_avg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def addr_plus(base: str, k: int) -> str:
    return socket.inet_ntoa(struct.pack("!I", struct.unpack("!I", socket.inet_aton(base))[0] + k))


def manifests(directory: str, pods: list[tuple[str, str]]) -> None:
    """The benchmark's Services and EndpointSlices (``pods``: (name, ip))."""
    def svc(name: str, ip: str, ports: list[dict[str, Any]], nodeport: bool = False) -> dict[str, Any]:
        spec: dict[str, Any] = {"clusterIP": ip, "clusterIPs": [ip], "ports": ports}
        spec["type"] = "NodePort" if nodeport else "ClusterIP"
        return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "bench"},
                "spec": spec}

    def eps(name: str, ports: list[dict[str, Any]], backends: list[tuple[str, str]]) -> dict[str, Any]:
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": f"{name}-x1", "namespace": "bench",
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4", "ports": ports,
                "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node-a",
                               "targetRef": {"kind": "Pod", "namespace": "bench", "name": n}}
                              for n, ip in backends]}

    http = {"name": "http", "protocol": "TCP", "port": HTTP_PORT, "targetPort": HTTP_PORT}
    udp = {"name": "udp", "protocol": "UDP", "port": UDP_PORT, "targetPort": UDP_PORT}
    ep_ports = [{"name": "http", "protocol": "TCP", "port": HTTP_PORT},
                {"name": "udp", "protocol": "UDP", "port": UDP_PORT}]
    iperf = {"name": "iperf", "protocol": "TCP", "port": IPERF_PORT, "targetPort": IPERF_PORT,
             "nodePort": NP_IPERF}
    items = [
        svc("bench", VIP, [http, udp]),
        eps("bench", ep_ports, pods),
        svc("bench-np", NP_VIP, [{**http, "nodePort": NP_HTTP}, {**udp, "nodePort": NP_UDP}], nodeport=True),
        eps("bench-np", ep_ports, pods),
        svc("bench-iperf", IPERF_VIP, [iperf], nodeport=True),
        eps("bench-iperf", [{"name": "iperf", "protocol": "TCP", "port": IPERF_PORT}], pods[:1]),
    ]
    tmp = os.path.join(directory, ".bench.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"apiVersion": "v1", "kind": "List", "items": items}, f)
    os.replace(tmp, os.path.join(directory, "bench.json"))


# ---- counters inside the namespaces -------------------------------------------------------------------------
SIDES = 3  # frame sets alternated in one generator run: the Service path and up to two baselines
BLOCK = 32  # source addresses per side: side j sends from base + 32*j .. + 31


def side_blocks(j: int) -> str:
    return f"{addr_plus(CLIENT_SRC_BASE, BLOCK * j)}/27, {addr_plus(EXT_SRC_BASE, BLOCK * j)}/27"


def pod_counters() -> str:
    """nft counters inside a pod: all SYNs / datagrams to the test ports, and per generator side.

    A side is recognised by its source block; side 0 (the Service path) also by the node's pod-network
    address, the source of masqueraded packets (a NodePort with externalTrafficPolicy Cluster).
    """
    from kproxy.testing.topology import GATEWAY

    decl = ["counter c_syn {}", "counter c_udp {}"]
    rules = [f"tcp dport {HTTP_PORT} tcp flags & (syn | ack) == syn counter name c_syn",
             f"udp dport {UDP_PORT} counter name c_udp"]
    for j in range(SIDES):
        decl += [f"counter c_syn{j} {{}}", f"counter c_udp{j} {{}}"]
        src = side_blocks(j) + (f", {GATEWAY}" if j == 0 else "")
        rules += [f"ip saddr {{ {src} }} tcp dport {HTTP_PORT} tcp flags & (syn | ack) == syn counter name c_syn{j}",
                  f"ip saddr {{ {src} }} udp dport {UDP_PORT} counter name c_udp{j}"]
    return _table(decl, rules)


def sender_counters() -> str:
    """nft counters in the generator's namespace: replies per side (by destination block).

    UDP echoes are dropped after counting (no socket: they would only cause ICMP errors); SYN-ACKs are let
    through so the sender's kernel resets the half-open connections.
    """
    decl: list[str] = []
    rules: list[str] = []
    for j in range(SIDES):
        decl += [f"counter c_synack{j} {{}}", f"counter c_udp{j} {{}}"]
        rules += [f"ip daddr {{ {side_blocks(j)} }} tcp sport {{ {HTTP_PORT}, {NP_HTTP} }} "
                  f"tcp flags & (syn | ack) == syn | ack counter name c_synack{j}",
                  f"ip daddr {{ {side_blocks(j)} }} udp sport {{ {UDP_PORT}, {NP_UDP} }} counter name c_udp{j} drop"]
    return _table(decl, rules)


def _table(decl: list[str], rules: list[str]) -> str:
    body = "\n  ".join(decl)
    chain = "\n    ".join(["type filter hook prerouting priority -400; policy accept;", *rules])
    return f"table inet {COUNTER_TABLE} {{\n  {body}\n  chain pre {{\n    {chain}\n  }}\n}}\n"


@dataclass
class Bench:
    topo: Any
    args: argparse.Namespace
    cgroup: str = ""
    frames_dir: str = ""
    pods: list[Any] = field(default_factory=list)
    macs: dict[str, str] = field(default_factory=dict)

    @property
    def nice(self) -> list[str]:
        """Prefix for the measured processes (sender, servers, clients): see ``--nice``."""
        return ["nice", "-n", str(self.args.nice)] if self.args.nice else []

    # -- namespaces ---------------------------------------------------------------------------------------
    def mac(self, ns: str, dev: str) -> str:
        out = self.topo.exec(ns, ["ip", "-j", "link", "show", dev]).stdout
        return str(json.loads(out)[0]["address"])

    def prepare(self, server: str) -> None:
        t = self.topo
        self.pods = [t.pod[n] for n in sorted(t.pod)]
        for pod in self.pods:
            t.spawn(pod.ns, [*self.nice, server, pod.name, str(HTTP_PORT), str(UDP_PORT), "2"], wait_for="ready")
            t.exec(pod.ns, ["nft", "-f", "-"], input=pod_counters())
        t.spawn(self.pods[0].ns, [*self.nice, "iperf3", "-s", "-p", str(IPERF_PORT)])
        for ns, base in ((t.client, CLIENT_SRC_BASE), (t.ext, EXT_SRC_BASE)):
            batch = "".join(f"addr add {addr_plus(base, BLOCK * j + k)}/32 dev eth0\n"
                            for j in range(SIDES) for k in range(self.args.sources))
            t.exec(ns, ["ip", "-batch", "-"], input=batch)
            t.exec(ns, ["nft", "-f", "-"], input=sender_counters())
        from kproxy.testing.topology import BRIDGE

        self.macs = {"client": self.mac(t.client, "eth0"), "gw": self.mac(t.node, BRIDGE),
                     "ext": self.mac(t.ext, "eth0"), "node_ext": self.mac(t.node, "ext0")}
        for pod in self.pods:
            self.macs[pod.name] = self.mac(pod.ns, "eth0")
        # pods learn the generator's source addresses up front (no ARP storm at the first packets)
        for pod in self.pods:
            batch = "".join(f"neigh replace {addr_plus(CLIENT_SRC_BASE, BLOCK * j + k)} lladdr "
                            f"{self.macs['client']} dev eth0 nud permanent\n"
                            for j in range(SIDES) for k in range(self.args.sources))
            t.exec(pod.ns, ["ip", "-batch", "-"], input=batch)
        time.sleep(0.3)  # let iperf3 bind

    def counters(self, namespaces: list[str]) -> dict[str, dict[str, int]]:
        """Packet counts of our nft counters in each namespace (one shell for all)."""
        script = "; ".join(f"echo '#{ns}'; ip netns exec {ns} nft -j list counters table inet {COUNTER_TABLE}"
                           for ns in namespaces)
        out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60, check=True).stdout
        res: dict[str, dict[str, int]] = {}
        cur = ""
        for line in out.splitlines():
            if line.startswith("#"):
                cur = line[1:]
                res[cur] = {}
            elif line.strip():
                for obj in json.loads(line).get("nftables", []):
                    if "counter" in obj:
                        res[cur][obj["counter"]["name"].removeprefix("c_")] = int(obj["counter"]["packets"])
        return res

    # -- the packet generator -------------------------------------------------------------------------------
    def frames(self, label: str, side: int, src_base: str, src_mac: str, targets: list[tuple[str, str, int]],
               proto: str) -> str:
        """``--flows`` frames; ``targets``: (dst MAC, dst IP, dst port), used round-robin. Returns a file path.

        scapy builds ~1k frames/s here, so its output (L3 and up; MACs depend on the topology) is cached in
        .cache/kproxy and the Ethernet addresses are filled in per run.
        """
        l3 = l3_frames(label, addr_plus(src_base, BLOCK * side), [(ip, port) for _, ip, port in targets], proto,
                       self.args.flows, self.args.sources)
        smac = bytes.fromhex(src_mac.replace(":", ""))
        dmacs = [bytes.fromhex(t[0].replace(":", "")) for t in targets]
        out = bytearray()
        for i, raw in enumerate(l3):
            frame = dmacs[i % len(dmacs)] + smac + raw
            out += struct.pack("!H", len(frame)) + frame
        path = os.path.join(self.frames_dir, f"{label}-{proto}.bin")
        with open(path, "wb") as f:
            f.write(out)
        return path

    def send(self, ns: str, paths: list[str], duration: float) -> list[dict[str, Any]]:
        a = self.args
        p = self.topo.exec(ns, [*self.nice, sys.executable, os.path.abspath(__file__), "--send", ",".join(paths),
                                "--duration", str(duration), "--slice", str(a.slice),
                                "--max-packets", str(a.max_packets)], timeout=duration * len(paths) + 60)
        return list(json.loads(p.stdout))

    def packet_round(self, ns: str, paths: list[str], proto: str) -> list[dict[str, Any]]:
        """One generator run alternating between the sides; per side: rates, replies, per-pod counts."""
        watch = [p.ns for p in self.pods] + [ns]
        before = self.counters(watch)
        res = self.send(ns, paths, self.args.duration)
        time.sleep(0.3)  # replies in flight
        after = self.counters(watch)
        out = []
        for j, r in enumerate(res):
            key_in, key_back = (f"syn{j}", f"synack{j}") if proto == "tcp" else (f"udp{j}", f"udp{j}")
            per_pod = {p.name: after[p.ns][key_in] - before[p.ns][key_in] for p in self.pods}
            back = after[ns][key_back] - before[ns][key_back]
            secs = r["seconds"]
            out.append({"sent_pps": r["sent"] / secs, "delivered_pps": sum(per_pod.values()) / secs,
                        "reply_pps": back / secs, "per_pod": per_pod, "sent": r["sent"],
                        "send_errors": r["errors"]})
        return out

    # -- socket clients -------------------------------------------------------------------------------------
    def client_argv(self, ns: str, argv: list[str]) -> list[str]:
        """``argv`` in ``ns``; in the ebpf mode inside the child cgroup the socket-LB programs are attached to."""
        argv = [*self.nice, *argv]
        if self.cgroup:
            return ["sh", "-c", f'echo $$ > {self.cgroup}/cgroup.procs && exec ip netns exec "$0" "$@"', ns, *argv]
        return ["ip", "netns", "exec", ns, *argv]

    def run_client(self, ns: str, argv: list[str], timeout: float) -> str:
        p = subprocess.run(self.client_argv(ns, argv), capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {p.stderr.strip() or p.stdout.strip()}")
        return p.stdout

    def wrk(self, ip: str, close: bool) -> dict[str, Any]:
        d = max(1, round(self.args.duration))
        argv = ["wrk", "-t", "2", "-c", str(self.args.connections), "-d", f"{d}s"]
        if close:
            argv += ["-H", "Connection: close"]
        pods_ns = [p.ns for p in self.pods]
        before = self.counters(pods_ns) if close else {}
        out = self.run_client(self.topo.client, [*argv, f"http://{ip}:{HTTP_PORT}/"], timeout=d + 60)
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if not m:
            raise RuntimeError(f"unexpected wrk output: {out}")
        errs = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        res: dict[str, Any] = {"rate": float(m.group(1)), "errors": errs + (int(non2xx.group(1)) if non2xx else 0)}
        if close:
            after = self.counters(pods_ns)
            res["per_pod"] = {p.name: after[p.ns]["syn"] - before[p.ns]["syn"] for p in self.pods}
        return res

    def iperf(self, ns: str, ip: str, port: int) -> float:
        d = max(1, round(self.args.duration))
        out = self.run_client(ns, ["iperf3", "-c", ip, "-p", str(port), "-t", str(d), "-J"], timeout=d + 60)
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9

    def wait_reachable(self) -> None:
        """The first sync may be reported before every rule is in: wait for the VIP to answer."""
        deadline = time.monotonic() + 30
        argv = ["curl", "-s", "-m", "1", f"http://{VIP}:{HTTP_PORT}/"]
        while time.monotonic() < deadline:
            p = subprocess.run(self.client_argv(self.topo.client, argv), capture_output=True, text=True,
                               timeout=10)
            if p.returncode == 0 and p.stdout.strip():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{VIP}:{HTTP_PORT} not reachable from the client")

    # -- the whole run ----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        t, a = self.topo, self.args
        m = self.macs
        pod_targets = [(m[p.name], p.ip, HTTP_PORT) for p in self.pods]
        pod_targets_udp = [(m[p.name], p.ip, UDP_PORT) for p in self.pods]
        routed = [(m["node_ext"], p.ip, HTTP_PORT) for p in self.pods]
        routed_udp = [(m["node_ext"], p.ip, UDP_PORT) for p in self.pods]
        from kproxy.testing.topology import NODE_EXT_IP

        # (key, sender namespace, frames): service path first, its baseline second
        via_node = [(m["gw"], p.ip, HTTP_PORT) for p in self.pods]
        via_node_udp = [(m["gw"], p.ip, UDP_PORT) for p in self.pods]
        csrc, esrc = (CLIENT_SRC_BASE, m["client"]), (EXT_SRC_BASE, m["ext"])
        # (service key, proto, sender namespace, service frames, [(baseline key, frames), ...])
        groups = [
            ("clusterip", "tcp", t.client, (*csrc, [(m["gw"], VIP, HTTP_PORT)]),
             [("pod", (*csrc, pod_targets)), ("pod-via-node", (*csrc, via_node))]),
            ("clusterip", "udp", t.client, (*csrc, [(m["gw"], VIP, UDP_PORT)]),
             [("pod", (*csrc, pod_targets_udp)), ("pod-via-node", (*csrc, via_node_udp))]),
            ("nodeport", "tcp", t.ext, (*esrc, [(m["node_ext"], NODE_EXT_IP, NP_HTTP)]),
             [("pod-routed", (*esrc, routed))]),
            ("nodeport", "udp", t.ext, (*esrc, [(m["node_ext"], NODE_EXT_IP, NP_UDP)]),
             [("pod-routed", (*esrc, routed_udp))]),
        ]
        want = set(a.only.split(",")) if a.only else {"packets", "conn", "http", "iperf"}
        results: dict[str, Any] = {"packets": [], "conn": None, "http": None, "iperf": []}
        if "packets" in want:
            for key, proto, ns, svc_frames, baselines in groups:
                sides = [(key, self.frames(key, 0, *svc_frames, proto))]
                sides += [(bkey, self.frames(f"{key}-{bkey}", j, *bf, proto))
                          for j, (bkey, bf) in enumerate(baselines, 1)]
                paths = [path for _, path in sides]
                self.send(ns, paths, 0.2)  # warm up: ARP, conntrack, caches
                rounds: dict[str, list[dict[str, Any]]] = {k: [] for k, _ in sides}
                for _ in range(a.repeats):
                    for (k, _), r in zip(sides, self.packet_round(ns, paths, proto), strict=True):
                        rounds[k].append(r)
                row = {"service": key, "proto": proto, "sides": [k for k, _ in sides], "rounds": rounds}
                results["packets"].append(row)
                print(json.dumps({"packets": key, "proto": proto,
                                  **{k: [round(r["delivered_pps"]) for r in v] for k, v in rounds.items()}}),
                      flush=True)
        pod0 = self.pods[0]
        for kind, close in (("conn", True), ("http", False)):
            if kind not in want:
                continue
            self.wrk(VIP, close)  # warm up
            r2: dict[str, list[dict[str, Any]]] = {"svc": [], "direct": []}
            for _ in range(a.repeats):
                r2["svc"].append(self.wrk(VIP, close))
                r2["direct"].append(self.wrk(pod0.ip, close))
            results[kind] = r2
            print(json.dumps({kind: {k: [round(x["rate"]) for x in v] for k, v in r2.items()}}), flush=True)
        if "iperf" in want:
            for label, ns, vip, port in (("ClusterIP (client pod)", t.client, IPERF_VIP, IPERF_PORT),
                                         ("NodePort (external host)", t.ext, NODE_EXT_IP, NP_IPERF)):
                r3: dict[str, list[float]] = {"svc": [], "direct": []}
                for _ in range(a.repeats):
                    r3["svc"].append(self.iperf(ns, vip, port))
                    r3["direct"].append(self.iperf(ns, pod0.ip, IPERF_PORT))
                results["iperf"].append({"label": label, **r3})
                print(json.dumps({"iperf": label, **{k: [round(x, 2) for x in v] for k, v in r3.items()}}),
                      flush=True)
        return results


# ---- report -------------------------------------------------------------------------------------------------
def ratios(svc: list[float], direct: list[float]) -> list[float]:
    return [s / d for s, d in zip(svc, direct, strict=True) if d > 0]


def share(per_pod_rounds: list[dict[str, int]]) -> dict[str, float]:
    tot: dict[str, int] = {}
    for r in per_pod_rounds:
        for k, v in r.items():
            tot[k] = tot.get(k, 0) + v
    n = sum(tot.values())
    return {k: (v / n if n else 0.0) for k, v in sorted(tot.items())}


def fmt_share(sh: dict[str, float]) -> str:
    return " / ".join(f"{v * 100:.1f}" for v in sh.values()) + " %" if sh else "–"


def verdict(rs: list[float]) -> str:
    if not rs:
        return "–"
    med = statistics.median(rs)
    return f"{med:.3f} [{min(rs):.2f}–{max(rs):.2f}] {'✓' if med >= 0.95 else '✗'}"


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Numbers for the JSON output (and the smoke test)."""
    out: dict[str, Any] = {"packets": {}, "conn": {}, "http": {}, "iperf": {}}
    for row in results["packets"]:
        k = f"{row['service']}-{row['proto']}"
        rounds = row["rounds"]
        out["packets"][k] = {
            side: {"delivered_pps": statistics.median(r["delivered_pps"] for r in rounds[side]),
                   "sent_pps": statistics.median(r["sent_pps"] for r in rounds[side]),
                   "reply_pps": statistics.median(r["reply_pps"] for r in rounds[side]),
                   "share": share([r["per_pod"] for r in rounds[side]])}
            for side in row["sides"]}
        # "svc" / "direct": the Service path and its first baseline (the path a client would take without it)
        out["packets"][k]["svc"] = out["packets"][k][row["sides"][0]]
        out["packets"][k]["direct"] = out["packets"][k][row["sides"][1]]
        svc, base = rounds[row["sides"][0]], rounds[row["sides"][1]]
        out["packets"][k]["ratio"] = statistics.median(ratios(
            [r["delivered_pps"] for r in svc], [r["delivered_pps"] for r in base]) or [0])
    for kind in ("conn", "http"):
        r = results.get(kind)
        if r:
            out[kind] = {side: statistics.median(x["rate"] for x in r[side]) for side in ("svc", "direct")}
            out[kind]["errors"] = sum(x["errors"] for side in ("svc", "direct") for x in r[side])
            if kind == "conn":
                out[kind]["share"] = share([x["per_pod"] for x in r["svc"]])
    for row in results["iperf"]:
        out["iperf"][row["label"]] = {"svc": statistics.median(row["svc"]), "direct": statistics.median(row["direct"])}
    return out


def render(results: dict[str, Any], a: argparse.Namespace, meta: dict[str, str]) -> str:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    mode = a.proxy_mode + (f" ({a.iptables_backend} back end)" if a.proxy_mode == "iptables" else "")
    lines = [
        f"# Data path through kproxy, {mode}: Service vs straight to the pod",
        "",
        f"`{meta['command']}` — {os.cpu_count()} cores ({cpu}), kernel {os.uname().release}, "
        f"{meta['date']}. Load average (1/5/15 min) before the run: {meta['load_before']}, after: "
        f"{meta['load_after']}; the measured processes (generator, servers, wrk, iperf3) ran at nice {a.nice}. "
        "On a machine shared with other CPU-heavy work the absolute numbers are noisy; the paths were "
        "measured alternately, so the ratios are the meaningful part.",
        "",
        f"Median [min–max] over {a.repeats} repeats of {a.duration:g} s; *ratio* = Service path / direct "
        "path, the median [min–max] of the per-repeat ratios (✓ = ratio ≥ 0.95, the target).",
    ]
    if a.proxy_mode == "ebpf":
        lines += ["", "ebpf mode: the ClusterIP is translated at connect()/sendmsg() for sockets in the cgroup "
                  "(wrk and iperf3 run there). Raw frames bypass sockets, so for the packet rows the benchmark "
                  "also attaches the tc programs to the client's bridge port (`--bpf-interfaces ext0,vcl`): the "
                  "ClusterIP packet rows measure that tc path (with source NAT), not the socket LB. The tc "
                  "programs also see the baseline traffic (a map lookup that misses)."]
    if results["packets"]:
        lines += [
            "",
            "## Packets: scapy-built frames sent as raw bytes over AF_PACKET",
            "",
            f"{a.flows} distinct flows per path from {a.sources} source addresses (random source ports), TCP "
            "SYN to the HTTP port or 20-byte UDP datagrams to the UDP echo port. One generator process "
            f"alternates between the Service path and its baselines every {a.slice * 1000:g} ms (each path "
            f"gets {a.duration:g} s per repeat), so all paths share whatever else the machine is doing. "
            "*delivered* = packets counted by nft counters inside the pod namespaces (per path: each path "
            "sends from its own source block) / time spent on the path; *replies* = SYN-ACKs or UDP echoes "
            "counted back in the sender's namespace; *share* = per-backend share of the delivered packets, "
            "pod0 / pod1 / pod2 (the baselines address the pods round-robin).",
            "",
            "Nothing is dropped (delivered = sent): the sender is CPU-bound and the kernel processes each frame "
            "in the sender's context (veth → node → bridge → pod; for a SYN also the SYN-ACK and the sender's "
            "RST), so the rate measures the per-packet cost of the path. The ratio on a baseline row is "
            "*Service path / that path*: the bridged pod-to-pod path is what a client would take without the "
            "Service; the path routed via the node (same hops as the ClusterIP path, no translation) isolates "
            "the cost of the proxy's translation from the cost of routing.",
            "",
            "| path | proto | sent pkt/s | delivered pkt/s | replies pkt/s | ratio (delivered) | share |",
            "|---|---|---|---|---|---|---|",
        ]
        names = {"clusterip": "client pod → ClusterIP", "pod": "client pod → pod IPs (bridged)",
                 "pod-via-node": "client pod → pod IPs routed via the node",
                 "nodeport": "external → NodePort", "pod-routed": "external → pod IPs (routed)"}
        for row in results["packets"]:
            rounds = row["rounds"]
            svc = rounds[row["sides"][0]]
            for i, key in enumerate(row["sides"]):
                rr = rounds[key]
                rs = verdict(ratios([r["delivered_pps"] for r in svc], [r["delivered_pps"] for r in rr])) if i else ""
                lines.append(
                    f"| {names[key]} | {row['proto'].upper()} | {stat([r['sent_pps'] for r in rr])} | "
                    f"{stat([r['delivered_pps'] for r in rr])} | {stat([r['reply_pps'] for r in rr])} | {rs} | "
                    f"{fmt_share(share([r['per_pod'] for r in rr]))} |")
    if results["conn"] or results["http"]:
        lines += ["", "## Connections and requests (wrk in the client pod, "
                  f"2 threads, {a.connections} connections)", "",
                  "| measurement | through the ClusterIP | straight to pod0 | ratio | errors | share (Service) |",
                  "|---|---|---|---|---|---|"]
        for kind, label in (("conn", "new TCP connections/s (`Connection: close`)"),
                            ("http", "HTTP requests/s (keep-alive)")):
            r = results[kind]
            if not r:
                continue
            svc = [x["rate"] for x in r["svc"]]
            direct = [x["rate"] for x in r["direct"]]
            errs = sum(x["errors"] for side in ("svc", "direct") for x in r[side])
            sh = fmt_share(share([x["per_pod"] for x in r["svc"]])) if kind == "conn" else "–"
            lines.append(f"| {label} | {stat(svc)} | {stat(direct)} | {verdict(ratios(svc, direct))} | {errs} | "
                         f"{sh} |")
    if results["iperf"]:
        lines += ["", "## iperf3 throughput (Gbit/s, one TCP stream; the Service has one endpoint, pod0)", "",
                  "| from | through the Service | straight to pod0 | ratio |", "|---|---|---|---|"]
        for row in results["iperf"]:
            lines.append(f"| {row['label']} | {stat(row['svc'], 2)} | {stat(row['direct'], 2)} | "
                         f"{verdict(ratios(row['svc'], row['direct']))} |")
    return "\n".join(lines) + "\n"


# ---- setup of the mode ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def mode_environment(a: argparse.Namespace) -> Iterator[tuple[str, list[str]]]:
    """(cgroup for the clients or "", extra daemon flags) for ``--proxy-mode``."""
    if a.proxy_mode == "iptables":
        yield "", ["--iptables-backend", a.iptables_backend]
    elif a.proxy_mode == "ebpf":
        sys.path.insert(0, REPO)
        from tests.ebpf.conftest import bpf_environment

        with bpf_environment() as env:
            # tc on the client's bridge port too, so raw frames to the ClusterIP are translated (socket LB
            # only sees sockets)
            yield env.cgroup, env.flags("ext0,vcl")
    else:
        yield "", []


def start_daemon(topo: Any, manifests_dir: str, mode: str, flags: list[str], attempts: int = 3) -> Any:
    """Start the daemon and wait for its first sync; start it again if it exited first.

    The xtables lock is a file shared by every namespace on the machine: when other iptables users hold it
    long enough, the iptables mode gives up at start-up. That is the machine, not the path we measure.
    """
    for attempt in range(1, attempts + 1):
        p = topo.start_daemon(manifests_dir, mode, *flags, log_name=f"kproxy-{attempt}.log")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and p.poll() is None:
            with contextlib.suppress(TimeoutError):
                topo.wait_healthy(timeout=2)
                return p
        log = topo.read_log(f"kproxy-{attempt}.log")
        if p.poll() is None:
            topo.stop_daemon(p)
            raise RuntimeError(f"kproxy did not complete a sync in 60 s; log: {log}")
        topo.procs.remove(p)
        print(f"# kproxy exited before its first sync (attempt {attempt}/{attempts}): {log[-300:]}",
              file=sys.stderr, flush=True)
        time.sleep(2)
    raise RuntimeError(f"kproxy exited before its first sync {attempts} times")


@contextlib.contextmanager
def running_bench(a: argparse.Namespace, workdir: str, daemon_extra: Iterable[str] = (),
                  prefix: str = "kpb") -> Iterator[Bench]:
    """The namespaces, servers and counters of a run plus a daemon in ``--proxy-mode`` answering on the VIP;
    all torn down on exit (``workdir`` holds the frames and the manifests; the caller removes it)."""
    from kproxy.testing.topology import Topology, unique_prefix

    server = build_server()
    with mode_environment(a) as (cgroup, mode_flags), \
            Topology(prefix=unique_prefix(prefix), pods=3, ipv6=False, servers=False) as topo:
        bench = Bench(topo, a, cgroup=cgroup, frames_dir=workdir)
        bench.prepare(server)
        man = os.path.join(workdir, "manifests")
        os.mkdir(man)
        manifests(man, [(p.name, p.ip) for p in bench.pods])
        flags = [*mode_flags, *daemon_extra]
        p = start_daemon(topo, man, a.proxy_mode, flags)
        try:
            bench.wait_reachable()
            yield bench
        finally:
            topo.stop_daemon(p)
            if a.proxy_mode == "ebpf":  # cgroup attachments and pinned maps outlive the namespaces
                topo.exec(topo.node, [*topo.daemon_args(man, a.proxy_mode, *flags), "--cleanup"],
                          check=False, timeout=120)


def check_mode(mode: str) -> str:
    """An error message when ``mode`` cannot run here, else ""."""
    if mode not in MODES:
        return f"unknown proxy mode {mode!r}; supported: {', '.join(MODES)}"
    if mode == "ipvs" and not os.path.exists("/proc/net/ip_vs"):
        return ("the ipvs mode needs a kernel with IP_VS (this one has none: /proc/net/ip_vs is missing); "
                "run the benchmark inside the VM of kproxy/testing/vm.py")
    if mode == "ebpf":
        try:
            import bcc  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            return "the ebpf mode needs bcc (python3-bpfcc, see shared/README.md)"
    return ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    full = list(argv)
    daemon_extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, daemon_extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxy-mode", default="iptables", help="iptables, nftables, ebpf or ipvs")
    ap.add_argument("--iptables-backend", default="legacy", help="legacy or nft (iptables mode)")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flows", type=int, default=1024, help="distinct frames (flows) per generator run")
    ap.add_argument("--sources", type=int, default=32, help="distinct source addresses per path (≤ 32)")
    ap.add_argument("--slice", type=float, default=0.05,
                    help="the generator alternates between the Service path and its baselines every SLICE s")
    ap.add_argument("--max-packets", type=int, default=2_000_000, help="cap on frames per generator run")
    ap.add_argument("--connections", type=int, default=16, help="wrk connections")
    ap.add_argument("--nice", type=int, default=-20,
                    help="run the measured processes (generator, servers, wrk, iperf3) at this nice level, so "
                         "other work on the machine disturbs the measurement less (0: leave them alone)")
    ap.add_argument("--only", default="", help="comma list of packets,conn,http,iperf (default: all)")
    ap.add_argument("--out", default="", help="write the Markdown table here (default: print only)")
    ap.add_argument("--json", default="", help="write the summarised numbers as JSON here")
    # internal: the sender process inside a namespace
    ap.add_argument("--send", default="", help=argparse.SUPPRESS)
    ap.add_argument("--ifname", default="eth0", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.send:
        return sender_main(a.send.split(","), a.duration, a.slice, a.max_packets, a.ifname)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    if not 1 <= a.sources <= BLOCK:
        ap.error(f"--sources must be 1..{BLOCK}")
    err = check_mode(a.proxy_mode)
    if err:
        print(f"traffic.py: {err}", file=sys.stderr)
        return 2
    sys.path.insert(0, REPO)
    os.environ.setdefault("KPROXY_CACHE_DIR", CACHE)

    shown = list(full)
    if "--json" in shown:  # where the raw numbers went does not belong in the report
        i = shown.index("--json")
        del shown[i:i + 2]
    meta = {"command": "bench/traffic.py " + " ".join(shown),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_before": load_avg()}
    mdir = tempfile.mkdtemp(prefix="kpbench-traffic-")
    try:
        with running_bench(a, mdir, daemon_extra) as bench:
            results = bench.run()
    finally:
        shutil.rmtree(mdir, ignore_errors=True)
    meta["load_after"] = load_avg()
    report = render(results, a, meta)
    print(report)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(report)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"summary": summarize(results), "raw": results, "meta": meta}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
