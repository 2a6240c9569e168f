"""Conntrack housekeeping: deleting stale UDP flows and the conntrack sysctls kube-proxy sets.

UDP has no connection teardown, so a conntrack entry created while a Service pointed at endpoint A keeps
sending the client's datagrams to A (or into a black hole) after A is gone, until the entry times out --
forever for a client that keeps talking (DNS, syslog, QUIC). kube-proxy therefore deletes, after each sync,
the flows the snapshot reports as stale (:class:`kproxy.snapshot.StaleUDP`), with the same filters as
kube-proxy's ``pkg/proxy/conntrack``:

* VIP + endpoint: original destination ``vip:port`` and reply source ``endpoint_ip`` (the endpoint left);
* VIP only: every flow to ``vip:port`` (the Service just got endpoints; flows created while it rejected
  or black-holed traffic must not pin clients to that state);
* NodePort + endpoint: original destination port ``node_port`` and reply source ``endpoint_ip``, on any
  node address (optionally restricted to ``nodeport_addresses``).

Deletion goes through ctnetlink (pyroute2): one dump of the UDP/SCTP table per IP family, matched in
Python against all records at once, then one delete per matching flow -- a sync with thousands of stale
records costs one table walk, not thousands. When netlink is unusable it falls back to the ``conntrack``
CLI, one ``conntrack -D`` per record.

Everything acts on the network namespace of the calling process.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import logging
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .snapshot import StaleUDP

log = logging.getLogger(__name__)

_PROTO = {"UDP": socket.IPPROTO_UDP, "SCTP": socket.IPPROTO_SCTP, "TCP": socket.IPPROTO_TCP}


@dataclass(slots=True)
class _Matcher:
    """All filters of one IP family, as sets for O(1) lookups per conntrack entry."""

    vip_ep: set[tuple[str, int, int, str]] = field(default_factory=set)  # (vip, port, proto, endpoint)
    vip: set[tuple[str, int, int]] = field(default_factory=set)  # (vip, port, proto)
    nodeport_ep: set[tuple[int, int, str]] = field(default_factory=set)  # (node port, proto, endpoint)
    nodeport: set[tuple[int, int]] = field(default_factory=set)  # (node port, proto): every flow
    protos: set[int] = field(default_factory=set)
    nodeport_nets: tuple[Any, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.vip_ep or self.vip or self.nodeport_ep or self.nodeport)

    def matches(self, proto: int, daddr: str, dport: int, reply_saddr: str) -> bool:
        if (daddr, dport, proto) in self.vip or (daddr, dport, proto, reply_saddr) in self.vip_ep:
            return True
        if (dport, proto, reply_saddr) in self.nodeport_ep or (dport, proto) in self.nodeport:
            if not self.nodeport_nets:
                return True
            addr = ipaddress.ip_address(daddr)
            return any(addr in net for net in self.nodeport_nets)
        return False


def _norm(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


def _matchers(stale: Iterable[StaleUDP], nodeport_addresses: Iterable[str]) -> dict[int, _Matcher]:
    nets = []
    for cidr in nodeport_addresses or ():
        if cidr and cidr != "primary":
            nets.append(ipaddress.ip_network(cidr, strict=False))
    out: dict[int, _Matcher] = {}
    for rec in stale:
        proto = _PROTO.get(rec.protocol.upper())
        if proto is None:
            continue
        ep = _norm(rec.endpoint_ip) if rec.endpoint_ip else ""
        if rec.node_port:
            # Without an endpoint (the Service just got endpoints) every flow to the port goes, in both
            # families since the record names none (kube-proxy's ClearEntriesForPort).
            fams = [socket.AF_INET6 if ":" in ep else socket.AF_INET] if ep else [socket.AF_INET, socket.AF_INET6]
            for fam in fams:
                m = out.setdefault(fam, _Matcher())
                if ep:
                    m.nodeport_ep.add((rec.port, proto, ep))
                else:
                    m.nodeport.add((rec.port, proto))
                m.nodeport_nets = tuple(n for n in nets if (n.version == 6) == (fam == socket.AF_INET6))
                m.protos.add(proto)
            continue
        else:
            if not rec.vip:
                continue
            vip = _norm(rec.vip)
            fam = socket.AF_INET6 if ":" in vip else socket.AF_INET
            m = out.setdefault(fam, _Matcher())
            if ep:
                m.vip_ep.add((vip, rec.port, proto, ep))
            else:
                m.vip.add((vip, rec.port, proto))
        m.protos.add(proto)
    return out


def delete_stale_udp(stale: Iterable[StaleUDP], nodeport_addresses: Iterable[str] = (), *,
                     backend: str = "auto", metrics: Any = None) -> int:
    """Delete the conntrack flows described by ``stale``; return how many were deleted.

    ``backend`` is ``auto`` (netlink, falling back to the CLI), ``netlink`` or ``cli``. Errors are logged,
    never raised: a failed cleanup must not fail the sync (the flows will time out eventually).
    With ``metrics`` (a :class:`kproxy.metrics.ProxyMetrics`) the per-family duration and deletions are
    recorded as kube-proxy's ``kubeproxy_conntrack_reconciler_*`` metrics.

    Blocking; call it from a worker thread (``asyncio.to_thread``). Called from a thread that runs an
    event loop it hands the netlink work to a helper thread, because pyroute2's synchronous API drives its
    own loop.
    """
    stale = list(stale)
    matchers = _matchers(stale, nodeport_addresses)
    if not matchers:
        return 0
    if backend in ("auto", "netlink"):
        try:
            per_family = _off_loop(lambda: [_timed(_delete_netlink, fam, m) for fam, m in matchers.items()])
        except Exception as e:
            if backend == "netlink":
                log.error("conntrack cleanup over netlink failed: %s", e)
                return 0
            log.warning("conntrack cleanup over netlink failed (%s); using the conntrack CLI", e)
        else:
            if metrics is not None:
                for fam, (deleted, seconds) in zip(matchers, per_family, strict=True):
                    metrics.conntrack_reconciled(seconds, deleted, "IPv6" if fam == socket.AF_INET6 else "IPv4")
            return sum(deleted for deleted, _ in per_family)
    t0 = time.monotonic()
    by_family = _delete_cli(stale, nodeport_addresses)
    if metrics is not None:
        seconds = time.monotonic() - t0
        for fam, deleted in by_family.items():
            metrics.conntrack_reconciled(seconds, deleted, "IPv6" if fam == "ipv6" else "IPv4")
    return sum(by_family.values())


def _timed(fn: Any, *args: Any) -> tuple[int, float]:
    t0 = time.monotonic()
    n = fn(*args)
    return n, time.monotonic() - t0


def _off_loop(fn: Any) -> Any:
    try:
        import asyncio
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kproxy-conntrack") as pool:
        return pool.submit(fn).result()


def _delete_netlink(family: int, m: _Matcher) -> int:
    from pyroute2 import Conntrack
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    deleted = 0
    ct = Conntrack(nfgen_family=family)
    try:
        victims = []
        for proto in sorted(m.protos):
            for entry in ct.dump_entries(tuple_orig=NFCTAttrTuple(family=family, proto=proto)):
                orig, reply = entry.tuple_orig, entry.tuple_reply
                if orig.proto != proto or orig.daddr is None or reply.saddr is None:
                    continue
                if m.matches(proto, _norm(orig.daddr), int(orig.dport or 0), _norm(reply.saddr)):
                    victims.append(orig)
        for orig in victims:
            try:
                ct.entry("del", tuple_orig=orig)
                deleted += 1
            except NetlinkError as e:
                if e.code != 2:  # ENOENT: expired or deleted meanwhile
                    log.warning("deleting conntrack entry %s failed: %s", orig, e)
    finally:
        ct.close()
    if deleted:
        log.info("deleted %d stale conntrack entries (%s)", deleted,
                 "IPv6" if family == socket.AF_INET6 else "IPv4")
    return deleted


_DELETED = re.compile(r"(\d+) flow entr(?:y|ies) ha(?:s|ve) been deleted")


def _delete_cli(stale: Iterable[StaleUDP], nodeport_addresses: Iterable[str] = ()) -> dict[str, int]:
    """``conntrack -D`` per record and family; returns deletions by family (``ipv4``/``ipv6``).

    Exit status 1 with "0 flow entries" just means nothing matched. The CLI cannot filter by destination
    CIDR, so ``nodeport_addresses`` does not narrow NodePort deletions here.
    """
    binary = shutil.which("conntrack")
    if binary is None:
        log.error("cannot delete stale conntrack entries: no netlink and no conntrack binary")
        return {}
    total: dict[str, int] = {}
    seen: set[tuple[str, int, str, str, bool]] = set()
    for rec in stale:
        key = (rec.vip, rec.port, rec.protocol, rec.endpoint_ip, rec.node_port)
        if key in seen or rec.protocol.upper() not in _PROTO:
            continue
        seen.add(key)
        addr = rec.endpoint_ip or rec.vip
        fams = ["ipv6" if ":" in addr else "ipv4"] if addr else ["ipv4", "ipv6"]
        for fam in fams:
            total[fam] = total.get(fam, 0) + _cli_one(binary, fam, rec)
    return total


def _cli_one(binary: str, fam: str, rec: StaleUDP) -> int:
    args = [binary, "-D", "-f", fam, "-p", rec.protocol.lower()]
    if rec.node_port:
        args += ["--dport", str(rec.port)]
        if rec.endpoint_ip:
            args += ["--reply-src", rec.endpoint_ip]
    else:
        args += ["--orig-dst", rec.vip, "--dport", str(rec.port)]
        if rec.endpoint_ip:
            args += ["--reply-src", rec.endpoint_ip]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("%s failed: %s", " ".join(args), e)
        return 0
    out = proc.stdout + proc.stderr
    found = _DELETED.search(out)
    if found:
        return int(found.group(1))
    if proc.returncode != 0:
        log.warning("%s failed: %s", " ".join(args), out.strip())
    return 0


def count_entries(family: int = socket.AF_INET) -> list[tuple[int, str, int, str]]:
    """The current (proto, orig dst, orig dport, reply src) of every flow of ``family`` (status and tests)."""
    from pyroute2 import Conntrack

    def dump() -> list[tuple[int, str, int, str]]:
        ct = Conntrack(nfgen_family=family)
        try:
            return [(e.tuple_orig.proto, e.tuple_orig.daddr, int(e.tuple_orig.dport or 0), e.tuple_reply.saddr)
                    for e in ct.dump_entries()]
        finally:
            ct.close()
    return _off_loop(dump)


# ---- sysctls (kube-proxy's conntrack configurer) -----------------------------------------------------

def conntrack_max(max_per_core: int, minimum: int, cpus: int | None = None) -> int:
    """kube-proxy's ``getConntrackMax``: max(maxPerCore x CPUs, min); 0 (leave alone) when maxPerCore is 0."""
    if max_per_core <= 0:
        return 0
    if cpus is None:
        cpus = len(os.sched_getaffinity(0))  # Go's runtime.NumCPU counts the affinity mask
    return max(max_per_core * cpus, minimum)


def set_sysctls(config: Any, *, cpus: int | None = None, proc_root: str = "/proc/sys",
                sys_root: str = "/sys") -> dict[str, int]:
    """Apply the conntrack settings of a ProxyConfig like kube-proxy; return what was changed.

    Sets ``nf_conntrack_max`` (and raises the hash table to max/4, as kube-proxy does), the TCP
    established/close-wait and UDP/UDP-stream timeouts when configured (> 0). A value already in place is
    not rewritten. Files that do not exist or are not writable (a read-only /proc/sys, a non-initial
    network namespace for ``nf_conntrack_max``) are logged and skipped.
    """
    wanted: list[tuple[str, int]] = []
    cmax = conntrack_max(config.conntrack_max_per_core, config.conntrack_min, cpus)
    if cmax > 0:
        wanted.append(("net/netfilter/nf_conntrack_max", cmax))
    for attr, name in (
        ("conntrack_tcp_established_timeout", "nf_conntrack_tcp_timeout_established"),
        ("conntrack_tcp_close_wait_timeout", "nf_conntrack_tcp_timeout_close_wait"),
        ("conntrack_udp_timeout", "nf_conntrack_udp_timeout"),
        ("conntrack_udp_stream_timeout", "nf_conntrack_udp_timeout_stream"),
    ):
        seconds = int(getattr(config, attr, 0) or 0)
        if seconds > 0:
            wanted.append((f"net/netfilter/{name}", seconds))
    changed: dict[str, int] = {}
    for rel, value in wanted:
        if _write_int(os.path.join(proc_root, rel), value):
            changed[rel.rsplit("/", 1)[1]] = value
    if cmax > 0:
        # The hash table should hold max/4 buckets; it is a module parameter, often read-only in containers.
        hashsize = os.path.join(sys_root, "module/nf_conntrack/parameters/hashsize")
        cur = _read_int(hashsize)
        if cur is not None and cur < cmax // 4 and _write_int(hashsize, cmax // 4):
            changed["hashsize"] = cmax // 4
    return changed


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _write_int(path: str, value: int) -> bool:
    cur = _read_int(path)
    if cur is None:
        log.warning("conntrack setting %s not available; skipping", path)
        return False
    if cur == value:
        return False
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(f"{value}\n")
    except OSError as e:
        log.warning("cannot set %s to %d (current %d): %s; skipping", path, value, cur, e.strerror or e)
        return False
    log.info("set %s to %d (was %d)", path, value, cur)
    return True
