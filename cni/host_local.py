"""``kproxy-host-local``: host-local IPAM plugin, on-disk compatible with the reference host-local.

On-disk layout (identical to containernetworking/plugins' ``host-local`` disk backend, so a node can
switch between the two plugins without losing or duplicating allocations)::

    <dataDir>/<network name>/
        lock                     flock(2)ed for the whole of every invocation (same lock the reference takes)
        <ip>                     one file per allocated IP: "<containerID>\\r\\n<ifname>"
        last_reserved_ip.<N>     last IP handed out from range set N (no trailing newline)

Allocation is round-robin: the next free IP after ``last_reserved_ip.N``, wrapping around, skipping the
gateway. A reservation is an ``O_CREAT|O_EXCL`` create of the IP file, so two allocators can never hand
out the same IP even without the lock. A kill at any point leaves either nothing, or an IP file whose
owner never got a result -- which DEL (by ID) or GC (not in ``cni.dev/valid-attachments``) reclaims; an
empty file (killed between create and write) belongs to no valid attachment and GC removes it too.

Differences from the reference, all compatible extensions:

- ADD for a containerID/ifname that already holds an IP in a range set returns that IP (idempotent retry
  after a runtime crash) instead of failing with "duplicate allocation is not allowed".
- STATUS (fails with code 50 when the data directory is unusable or every range set is exhausted) and GC.
"""

from __future__ import annotations

import os
import sys

from cni._ip import IP, Net
from cni._skel import (
    ERR_INTERNAL,
    ERR_INVALID_CONFIG,
    ERR_PLUGIN_NOT_AVAILABLE,
    VALID_ATTACHMENTS_KEY,
    Args,
    CNIError,
    run,
)

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~8 ms of import time per plugin call
    from typing import Any


DEFAULT_DATA_DIR = "/var/lib/cni/networks"
LINE_BREAK = "\r\n"
LAST_IP_PREFIX = "last_reserved_ip."


class Range:
    """One ``{subnet, rangeStart, rangeEnd, gateway}`` entry, canonicalized like the reference does."""

    def __init__(self, raw: dict[str, Any]) -> None:
        if not isinstance(raw, dict) or not raw.get("subnet"):
            raise CNIError(ERR_INVALID_CONFIG, "range has no subnet")
        try:
            self.subnet = Net.parse(str(raw["subnet"]))
        except ValueError as e:
            raise CNIError(ERR_INVALID_CONFIG, f"invalid subnet {raw['subnet']!r}: {e}") from None
        net = self.subnet
        if net.prefixlen > net.max_prefixlen - 2:
            raise CNIError(ERR_INVALID_CONFIG, f"Network {net} too small to allocate from")
        first = net.network_address + 1
        last = net.broadcast_address - 1 if net.version == 4 else net.broadcast_address
        self.start = self._ip(raw.get("rangeStart"), first, "rangeStart")
        self.end = self._ip(raw.get("rangeEnd"), last, "rangeEnd")
        self.gateway = self._ip(raw.get("gateway"), first, "gateway", check_subnet=False)
        if self.start > self.end:
            raise CNIError(ERR_INVALID_CONFIG, f"RangeStart {self.start} not before RangeEnd {self.end}")

    def _ip(self, value: Any, default: Any, what: str, check_subnet: bool = True) -> Any:
        if not value:
            return default
        try:
            ip = IP.parse(str(value))
        except ValueError:
            raise CNIError(ERR_INVALID_CONFIG, f"invalid {what} {value!r}") from None
        if check_subnet and ip not in self.subnet:
            raise CNIError(ERR_INVALID_CONFIG, f"{what} {ip} not in network {self.subnet}")
        return ip

    def contains(self, ip: Any) -> bool:
        return ip.version == self.start.version and self.start <= ip <= self.end

    def overlaps(self, other: Range) -> bool:
        return self.start.version == other.start.version and self.start <= other.end and other.start <= self.end

    def size(self) -> int:
        n = self.end.value - self.start.value + 1
        return n - 1 if self.contains(self.gateway) else n

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"


class IPAMConfig:
    def __init__(self, args: Args) -> None:
        conf = args.conf
        ipam = conf.get("ipam")
        if not isinstance(ipam, dict):
            raise CNIError(ERR_INVALID_CONFIG, "IPAM config missing 'ipam' key")
        self.name: str = conf["name"]
        raw_sets: list[Any] = []
        if ipam.get("subnet"):  # legacy single-range form, converted like the reference does
            raw_sets.append([{k: ipam.get(k) for k in ("subnet", "rangeStart", "rangeEnd", "gateway") if ipam.get(k)}])
        raw_sets.extend(ipam.get("ranges") or [])
        if not raw_sets:
            raise CNIError(ERR_INVALID_CONFIG, "no IP ranges specified")
        self.range_sets: list[list[Range]] = []
        for rs in raw_sets:
            if not isinstance(rs, list) or not rs:
                raise CNIError(ERR_INVALID_CONFIG, "empty range set")
            ranges = [Range(r) for r in rs]
            for i, a in enumerate(ranges):
                if a.start.version != ranges[0].start.version:
                    raise CNIError(ERR_INVALID_CONFIG, "mixed address families in one range set")
                for b in ranges[i + 1 :]:
                    if a.overlaps(b):
                        raise CNIError(ERR_INVALID_CONFIG, f"range {a} overlaps with range {b}")
            for other in self.range_sets:
                for a in ranges:
                    for b in other:
                        if a.overlaps(b):
                            raise CNIError(ERR_INVALID_CONFIG, f"range set {a} overlaps with {b}")
            self.range_sets.append(ranges)
        self.routes: list[dict[str, Any]] = list(ipam.get("routes") or [])
        self.data_dir = os.path.join(str(ipam.get("dataDir") or DEFAULT_DATA_DIR), self.name)
        self.resolv_conf: str = str(ipam.get("resolvConf") or "")
        self.requested = self._requested_ips(args, conf)

    @staticmethod
    def _requested_ips(args: Args, conf: dict[str, Any]) -> list[Any]:
        raw: list[str] = []
        cni_args = args.cni_args() if args.args else {}
        if cni_args.get("IP"):
            raw.extend(x for x in cni_args["IP"].split(",") if x)
        a = conf.get("args")
        if isinstance(a, dict) and isinstance(a.get("cni"), dict):
            raw.extend(a["cni"].get("ips") or [])
        rc = conf.get("runtimeConfig")
        if isinstance(rc, dict):
            raw.extend(rc.get("ips") or [])
        out = []
        for s in raw:
            try:
                ip = IP.parse(str(s).split("/")[0])
            except ValueError:
                raise CNIError(ERR_INVALID_CONFIG, f"invalid requested IP {s!r}") from None
            if ip not in out:
                out.append(ip)
        return out


class Store:
    """The reference disk store, guarded by the reference's flock on ``<dir>/lock``."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        os.makedirs(directory, 0o755, exist_ok=True)
        self._lock_fd = -1

    def __enter__(self) -> Store:
        import fcntl

        self._lock_fd = os.open(os.path.join(self.dir, "lock"), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._lock_fd)  # closing drops the flock
        self._lock_fd = -1

    def reserve(self, cid: str, ifname: str, ip: Any, set_idx: int) -> bool:
        path = os.path.join(self.dir, str(ip))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, (cid.strip() + LINE_BREAK + ifname).encode())
        finally:
            os.close(fd)
        self.write_last(set_idx, ip)
        return True

    def write_last(self, set_idx: int, ip: Any) -> None:
        fd = os.open(
            os.path.join(self.dir, f"{LAST_IP_PREFIX}{set_idx}"),
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
            0o644,
        )
        try:
            os.write(fd, str(ip).encode())
        finally:
            os.close(fd)

    def last_reserved(self, set_idx: int) -> Any:
        try:
            with open(os.path.join(self.dir, f"{LAST_IP_PREFIX}{set_idx}"), "rb") as f:
                return IP.parse(f.read().decode().strip())
        except (OSError, ValueError):
            return None

    def entries(self) -> list[tuple[Any, str, str]]:
        """All allocations as (ip, containerID, ifname); ifname is "" for the pre-0.7 ID-only format."""
        out = []
        for name in os.listdir(self.dir):
            if name == "lock" or name.startswith(LAST_IP_PREFIX):
                continue
            try:
                ip = IP.parse(name)
            except ValueError:
                continue
            try:
                with open(os.path.join(self.dir, name), "rb") as f:
                    data = f.read().decode(errors="replace").strip()
            except (OSError, IsADirectoryError):
                continue
            cid, _, ifn = data.partition(LINE_BREAK)
            out.append((ip, cid.strip(), ifn.strip()))
        return out

    def get_by_id(self, cid: str, ifname: str) -> list[Any]:
        return [ip for ip, c, i in self.entries() if c == cid and (i == ifname or not i)]

    def release(self, ip: Any) -> None:
        try:
            os.unlink(os.path.join(self.dir, str(ip)))
        except FileNotFoundError:
            pass


def _iter_candidates(ranges: list[Range], last: Any) -> Any:
    """Round-robin over the range set, starting right after ``last`` (reference RangeIter semantics).

    Without a usable ``last`` it starts at the first range's start; with one, ``last`` itself comes last.
    """

    def step(ri: int, cur: Any) -> tuple[int, Any]:
        if cur >= ranges[ri].end:
            ri = (ri + 1) % len(ranges)
            return ri, ranges[ri].start
        return ri, cur + 1

    ri, cur = 0, None
    if last is not None:
        for i, r in enumerate(ranges):
            if r.contains(last):
                ri, cur = i, last
                break
    if cur is None:
        origin = cur = ranges[0].start
        yield cur
        while True:
            ri, cur = step(ri, cur)
            if cur == origin:
                return
            yield cur
    else:
        origin = cur
        while True:
            ri, cur = step(ri, cur)
            yield cur
            if cur == origin:
                return


def _allocate(store: Store, conf: IPAMConfig, cid: str, ifname: str) -> list[tuple[Any, Range]]:
    existing = store.get_by_id(cid, ifname)
    requested = list(conf.requested)
    got: list[tuple[Any, Range]] = []
    reserved: list[Any] = []
    try:
        for idx, ranges in enumerate(conf.range_sets):
            prior = next(((ip, r) for ip in existing for r in ranges if r.contains(ip)), None)
            if prior is not None:
                got.append(prior)
                continue
            want = next(((ip, r) for ip in requested for r in ranges if r.contains(ip)), None)
            if want is not None:
                ip, r = want
                requested.remove(ip)
                if ip == r.gateway or not store.reserve(cid, ifname, ip, idx):
                    raise CNIError(
                        ERR_INTERNAL,
                        f"requested IP address {ip} is not available in range set {','.join(map(str, ranges))}",
                    )
                reserved.append(ip)
                got.append(want)
                continue
            for ip in _iter_candidates(ranges, store.last_reserved(idx)):
                if any(ip == r.gateway for r in ranges):
                    continue
                if store.reserve(cid, ifname, ip, idx):
                    reserved.append(ip)
                    got.append((ip, next(r for r in ranges if r.contains(ip))))
                    break
            else:
                raise CNIError(ERR_INTERNAL, f"no IP addresses available in range set: {','.join(map(str, ranges))}")
        if requested:
            raise CNIError(ERR_INTERNAL, f"requested IP address(es) {', '.join(map(str, requested))} not in any range")
    except BaseException:
        for ip in reserved:  # all or nothing: an ADD that fails leaves no allocation behind
            store.release(ip)
        raise
    return got


def parse_resolv_conf(path: str) -> dict[str, Any]:
    dns: dict[str, Any] = {}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise CNIError(ERR_INVALID_CONFIG, f"cannot read resolvConf {path}: {e.strerror}") from None
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        key, vals = fields[0], fields[1:]
        if key == "nameserver":
            dns.setdefault("nameservers", []).extend(vals)
        elif key == "domain":
            dns["domain"] = vals[0]
        elif key == "search":
            dns["search"] = vals
        elif key == "options":
            dns.setdefault("options", []).extend(vals)
    return dns


def cmd_add(args: Args) -> dict[str, Any]:
    conf = IPAMConfig(args)
    dns = parse_resolv_conf(conf.resolv_conf) if conf.resolv_conf else {}
    with Store(conf.data_dir) as store:
        got = _allocate(store, conf, args.container_id, args.ifname)
    ips = [{"address": f"{ip}/{r.subnet.prefixlen}", "gateway": str(r.gateway) if r.gateway else None} for ip, r in got]
    return {"ips": ips, "routes": conf.routes, "dns": dns}


def cmd_del(args: Args) -> None:
    conf = IPAMConfig(args)
    if not os.path.isdir(conf.data_dir):
        return
    with Store(conf.data_dir) as store:
        for ip, cid, ifn in store.entries():
            if cid == args.container_id.strip() and (ifn == args.ifname or not ifn):
                store.release(ip)


def cmd_check(args: Args) -> None:
    conf = IPAMConfig(args)
    if not os.path.isdir(conf.data_dir):
        raise CNIError(ERR_INTERNAL, "host-local: Failed to find address added")
    with Store(conf.data_dir) as store:
        mine = set(store.get_by_id(args.container_id, args.ifname))
    if not mine:
        raise CNIError(ERR_INTERNAL, "host-local: Failed to find address added")
    prev = args.conf.get("prevResult")
    if isinstance(prev, dict):
        for ipc in prev.get("ips") or []:
            ip = IP.parse(str(ipc["address"]).split("/")[0])
            if any(r.contains(ip) for rs in conf.range_sets for r in rs) and ip not in mine:
                raise CNIError(ERR_INTERNAL, f"host-local: address {ip} is not allocated to {args.container_id}")


def cmd_status(args: Args) -> None:
    conf = IPAMConfig(args)
    try:
        os.makedirs(conf.data_dir, 0o755, exist_ok=True)
        if not os.access(conf.data_dir, os.W_OK):
            raise PermissionError(f"{conf.data_dir} is not writable")
        with Store(conf.data_dir) as store:
            entries = store.entries()
    except OSError as e:
        raise CNIError(ERR_PLUGIN_NOT_AVAILABLE, f"host-local: data directory unusable: {e}") from None
    for ranges in conf.range_sets:
        used = sum(1 for ip, _, _ in entries if any(r.contains(ip) and ip != r.gateway for r in ranges))
        if used >= sum(r.size() for r in ranges):
            raise CNIError(
                ERR_PLUGIN_NOT_AVAILABLE, f"no IP addresses available in range set: {','.join(map(str, ranges))}"
            )


def cmd_gc(args: Args) -> None:
    conf = IPAMConfig(args)
    valid = args.conf.get(VALID_ATTACHMENTS_KEY) or []
    if not isinstance(valid, list):
        raise CNIError(ERR_INVALID_CONFIG, f"{VALID_ATTACHMENTS_KEY} must be a list")
    keep = {(str(a.get("containerID", "")), str(a.get("ifname", ""))) for a in valid if isinstance(a, dict)}
    keep_ids = {c for c, _ in keep}
    if not os.path.isdir(conf.data_dir):
        return
    with Store(conf.data_dir) as store:
        for ip, cid, ifn in store.entries():
            if (cid, ifn) in keep or (not ifn and cid in keep_ids):
                continue
            store.release(ip)


HANDLERS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status, "GC": cmd_gc}


def main() -> int:
    return run(HANDLERS)


if __name__ == "__main__":
    sys.exit(main())
