"""Compile and load the BPF programs with bcc, and attach / detach them (cgroup v2 and tc clsact).

Attachments outlive the loader: a cgroup attachment or a tc filter keeps its program alive after the
daemon exits (even on kill -9), which is what keeps Services working across a daemon restart. Hence
attach is "replace what a previous run left" (``BPF_F_REPLACE`` on the cgroup, ``replace-filter`` on
tc; no window without a program) and cleanup must detach explicitly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

from . import bpfsys as sys_
from . import objfile
from .kheaders import HeadersError, cache_dir, ensure_kernel_source

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

TC_PRIO = 0xC1  # our filters' priority and handle on clsact ingress/egress
TC_HANDLE = 0xC1
TC_INGRESS = 0xFFFFFFF2
TC_EGRESS = 0xFFFFFFF3

# program name -> (attach type, what the kernel must support, minimum Linux version)
SOCK_PROGS: dict[str, tuple[int, str]] = {
    "kp_connect4": (sys_.CGROUP_INET4_CONNECT, "BPF_CGROUP_INET4_CONNECT (Linux 4.17)"),
    "kp_sendmsg4": (sys_.CGROUP_UDP4_SENDMSG, "BPF_CGROUP_UDP4_SENDMSG (Linux 4.18)"),
    "kp_recvmsg4": (sys_.CGROUP_UDP4_RECVMSG, "BPF_CGROUP_UDP4_RECVMSG (Linux 5.2)"),
    "kp_getpeer4": (sys_.CGROUP_INET4_GETPEERNAME, "BPF_CGROUP_INET4_GETPEERNAME (Linux 5.8)"),
    "kp_connect6": (sys_.CGROUP_INET6_CONNECT, "BPF_CGROUP_INET6_CONNECT (Linux 4.17)"),
    "kp_sendmsg6": (sys_.CGROUP_UDP6_SENDMSG, "BPF_CGROUP_UDP6_SENDMSG (Linux 4.18)"),
    "kp_recvmsg6": (sys_.CGROUP_UDP6_RECVMSG, "BPF_CGROUP_UDP6_RECVMSG (Linux 5.2)"),
    "kp_getpeer6": (sys_.CGROUP_INET6_GETPEERNAME, "BPF_CGROUP_INET6_GETPEERNAME (Linux 5.8)"),
}
TC_PROGS = ("kp_tc_in", "kp_tc_out")


def off_loop(fn: Callable[P, T]) -> Callable[P, T]:
    """Run ``fn`` in a helper thread when this thread runs an asyncio loop.

    pyroute2's synchronous API drives its own event loop and fails inside a running one (the daemon calls
    the data plane from its loop).
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return fn(*args, **kwargs)
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            return ex.submit(fn, *args, **kwargs).result()

    return wrapper


class LoadError(RuntimeError):
    """Loading or attaching failed; the message names the missing kernel feature or tool."""


def source_path() -> Path:
    """bpf/kproxy_lb.c: $KPROXY_BPF_DIR, the source checkout, or /usr/share/kproxy/bpf."""
    candidates = []
    if os.environ.get("KPROXY_BPF_DIR"):
        candidates.append(Path(os.environ["KPROXY_BPF_DIR"]))
    candidates += [Path(__file__).resolve().parents[3] / "bpf", Path("/usr/share/kproxy/bpf")]
    for d in candidates:
        if (d / "kproxy_lb.c").is_file():
            return d / "kproxy_lb.c"
    raise LoadError(f"BPF source kproxy_lb.c not found in {', '.join(map(str, candidates))} (set KPROXY_BPF_DIR)")


PROG_TYPE_SCHED_CLS = 3
PROG_TYPE_CGROUP_SOCK_ADDR = 18


@dataclass
class Programs:
    """Loaded (not yet attached) programs: name -> fd (closed by :meth:`close`; attachments keep theirs)."""

    fds: dict[str, int]
    source: str = ""  # "cache", "object" or "bcc"

    def close(self) -> None:
        fds, self.fds = self.fds, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)


def _wanted(want_tc: bool) -> dict[str, tuple[int, int]]:
    """name -> (program type, expected attach type or -1)."""
    out = {name: (PROG_TYPE_CGROUP_SOCK_ADDR, at) for name, (at, _) in SOCK_PROGS.items()}
    if want_tc:
        out.update({name: (PROG_TYPE_SCHED_CLS, -1) for name in TC_PROGS})
    return out


VARIANTS: tuple[tuple[str, ...], ...] = (("KP_SET_RETVAL",), ())  # best first; () works on older kernels


def compile_object(path: str, masq_mark: int = 0x4000, defines: tuple[str, ...] = VARIANTS[0]) -> None:
    """Compile bpf/kproxy_lb.c with bcc (used as a compiler only) into a precompiled object at ``path``."""
    try:
        from bcc import BPF  # type: ignore[import-not-found]
    except ImportError as e:
        raise LoadError("compiling the BPF programs needs bcc's Python module (Debian: apt-get install "
                        "python3-bpfcc, made visible to this interpreter), or a precompiled object in "
                        f"KPROXY_BPF_OBJECT: {e}") from None
    try:
        ensure_kernel_source()
    except HeadersError as e:
        raise LoadError(f"{e}; or ship a precompiled object (KPROXY_BPF_OBJECT)") from None
    raw = source_path().read_text()
    try:
        b = BPF(text=raw.encode(), cflags=["-Wno-unused-function", f"-DKP_MASQ_MARK={masq_mark:#x}",
                                  *(f"-D{d}" for d in defines)])
    except Exception as e:
        raise LoadError(f"compiling {source_path()} with bcc failed (kernel headers at "
                        f"{os.environ.get('BCC_KERNEL_SOURCE', '/lib/modules/.../build')}): {e}") from None
    try:
        progs = {name: (pt, at, bytes(b.dump_func(name.encode()))) for name, (pt, at) in _wanted(True).items()}
        map_fds = {name: b.get_table(name.encode()).map_fd for name in objfile.MAP_SPECS}
        objfile.save(path, objfile.source_key(raw, masq_mark, defines), progs, map_fds)
    finally:
        b.cleanup()


def compile_and_load(pin_dir: str, want_tc: bool = True, masq_mark: int = 0x4000) -> Programs:
    """Load the programs against the maps pinned in ``pin_dir`` (created if missing).

    The bytecode comes from, in order: the compile cache (same source, masquerade mark and variant), the
    precompiled object named by ``$KPROXY_BPF_OBJECT``, or a fresh bcc compile (which fills the cache).
    The best variant the kernel accepts wins (``KP_SET_RETVAL`` needs Linux 5.18).
    """
    err: LoadError | None = None
    for defines in VARIANTS:
        try:
            return _load_variant(pin_dir, want_tc, masq_mark, defines)
        except _Rejected as e:
            err = e.error
            if defines:
                log.warning("ebpf: the %s variant is unavailable (%s); trying without", ",".join(defines), e.error)
    assert err is not None
    raise err


class _Rejected(Exception):
    def __init__(self, error: LoadError) -> None:
        self.error = error


def _load_variant(pin_dir: str, want_tc: bool, masq_mark: int, defines: tuple[str, ...]) -> Programs:
    key = objfile.source_key(source_path().read_text(), masq_mark, defines)
    suffix = "-".join(d.lower() for d in defines) or "base"
    cache = os.path.join(cache_dir(), "bpf", f"kproxy_lb-{key}-{suffix}.json")
    obj, origin = objfile.read(cache, key), "cache"
    shipped = os.environ.get("KPROXY_BPF_OBJECT", "")
    if obj is None and shipped:
        obj, origin = objfile.read(shipped), "object"
        if obj is None:
            raise LoadError(f"KPROXY_BPF_OBJECT={shipped} is not a readable precompiled object")
        if obj.get("key") != key:
            if defines:  # the shipped object may be another variant: let the next one match it
                raise _Rejected(LoadError(f"KPROXY_BPF_OBJECT={shipped} is not the {suffix} variant"))
            raise LoadError(f"KPROXY_BPF_OBJECT={shipped} was built from another bpf/kproxy_lb.c or masquerade "
                            f"bit (key {obj.get('key')}); rebuild it with python -m kproxy.dataplane.ebpf.loader")
    if obj is None:
        compile_object(cache, masq_mark, defines)
        obj, origin = objfile.read(cache, key), "bcc"
        if obj is None:
            raise LoadError(f"the compiled object {cache} is unreadable")
    wanted = _wanted(want_tc)
    fds: dict[str, int] = {}
    try:
        for name in wanted:
            try:
                fds.update(objfile.load(obj, pin_dir, [name]))
            except objfile.ObjectError as e:
                feature = (f"BPF_PROG_TYPE_CGROUP_SOCK_ADDR with {SOCK_PROGS[name][1]} and bpf_get_netns_cookie "
                           "(Linux 5.7)" if name in SOCK_PROGS else
                           "BPF_PROG_TYPE_SCHED_CLS with checksum-fixing rewrite helpers (Linux 4.5)")
                if defines:
                    feature += f" and {', '.join(defines)} (bpf_set_retval, Linux 5.18)"
                raise _Rejected(LoadError(f"the kernel rejected {name}: it needs {feature}: {e}")) from None
            except sys_.BpfError as e:
                raise LoadError(f"creating or opening the pinned maps in {pin_dir} failed: {e}") from None
    except BaseException:
        Programs(fds).close()
        raise
    log.info("ebpf: %d programs loaded (bytecode from %s, variant %s)", len(fds), origin, suffix)
    return Programs(fds, origin)


def main(argv: list[str] | None = None) -> int:
    """``python -m kproxy.dataplane.ebpf.loader OUT [MASQUERADE_BIT]``: write a precompiled object."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m kproxy.dataplane.ebpf.loader OUT.json [masquerade-bit (14)] [DEFINES (KP_SET_RETVAL; "
              "'' for kernels < 5.18)]", file=sys.stderr)
        return 2
    bit = int(args[1]) if len(args) > 1 else 14
    compile_object(args[0], 1 << bit, tuple(args[2].split(",")) if len(args) > 2 and args[2] else VARIANTS[0])
    print(f"wrote {args[0]}")
    return 0


# ---- cgroup -----------------------------------------------------------------------------------------

def default_cgroup_path() -> str:
    """The first cgroup2 mount point (the node's cgroup v2 root)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return left.split(" ")[4]
    return ""


def check_cgroup(path: str) -> None:
    if not path:
        raise LoadError("no cgroup v2 hierarchy is mounted (socket-level load balancing needs cgroup v2; "
                        "mount -t cgroup2 none /sys/fs/cgroup or pass --bpf-cgroup-path)")
    if not os.path.isdir(path):
        raise LoadError(f"--bpf-cgroup-path {path}: no such directory")
    if sys_.fs_magic(path) != sys_.CGROUP2_SUPER_MAGIC:
        raise LoadError(f"--bpf-cgroup-path {path} is not on a cgroup v2 filesystem")


def _our_attached(cg_fd: int, attach_type: int, name: str) -> list[int]:
    out = []
    for pid in sys_.prog_query(cg_fd, attach_type):
        try:
            fd = sys_.prog_fd_by_id(pid)
        except OSError:
            continue
        try:
            if sys_.prog_info(fd)["name"] == name:
                out.append(pid)
        finally:
            os.close(fd)
    return out


def attach_cgroup(path: str, progs: Programs) -> None:
    """Attach the socket-LB programs to ``path``, atomically replacing those of a previous run."""
    cg = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, (attach_type, feature) in SOCK_PROGS.items():
            new_fd = progs.fds[name]
            old = _our_attached(cg, attach_type, name)
            try:
                if old:
                    old_fd = sys_.prog_fd_by_id(old[0])
                    try:
                        sys_.prog_attach(cg, new_fd, attach_type, sys_.BPF_F_ALLOW_MULTI | sys_.BPF_F_REPLACE, old_fd)
                    finally:
                        os.close(old_fd)
                    for extra in old[1:]:
                        _detach_id(cg, extra, attach_type)
                else:
                    sys_.prog_attach(cg, new_fd, attach_type, sys_.BPF_F_ALLOW_MULTI)
            except OSError as e:
                raise LoadError(f"attaching {name} to cgroup {path} failed ({e.strerror}): the kernel needs "
                                f"{feature} and multi-program cgroup attachment (Linux 4.15; BPF_F_REPLACE 5.6)"
                                ) from None
    finally:
        os.close(cg)


def _detach_id(cg: int, prog_id: int, attach_type: int) -> None:
    fd = sys_.prog_fd_by_id(prog_id)
    try:
        sys_.prog_detach(cg, fd, attach_type)
    finally:
        os.close(fd)


def detach_cgroup(path: str) -> int:
    """Detach every kproxy socket-LB program from ``path``; return how many were attached."""
    if not path or not os.path.isdir(path):
        return 0
    n = 0
    cg = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, (attach_type, _) in SOCK_PROGS.items():
            try:
                ids = _our_attached(cg, attach_type, name)
            except OSError:
                continue
            for pid in ids:
                with contextlib.suppress(OSError):
                    _detach_id(cg, pid, attach_type)
                    n += 1
    finally:
        os.close(cg)
    return n


def attached_cgroup_progs(path: str) -> dict[str, list[int]]:
    """Program ids of ours attached to ``path`` per program name (for status and tests)."""
    out: dict[str, list[int]] = {}
    if not path or not os.path.isdir(path):
        return out
    cg = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, (attach_type, _) in SOCK_PROGS.items():
            with contextlib.suppress(OSError):
                ids = _our_attached(cg, attach_type, name)
                if ids:
                    out[name] = ids
    finally:
        os.close(cg)
    return out


# ---- tc ------------------------------------------------------------------------------------------------

@off_loop
def default_interfaces() -> list[str]:
    """Interfaces that carry a default route in this network namespace (the node's external ones)."""
    from pyroute2 import IPRoute

    names: list[str] = []
    with IPRoute() as ipr:
        idx_name = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for fam in (2, 10):
            for r in ipr.get_routes(family=fam, table=254):
                if r["dst_len"] == 0 and r.get_attr("RTA_OIF") in idx_name:
                    name = idx_name[r.get_attr("RTA_OIF")]
                    if name not in names:
                        names.append(name)
    return names


@off_loop
def all_interfaces() -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]


@off_loop
def attach_tc(interfaces: Iterable[str], progs: Programs) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        for ifname in interfaces:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                raise LoadError(f"--bpf-interfaces: no interface {ifname!r} in this network namespace")
            try:
                ipr.tc("add", "clsact", idx[0])
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise LoadError(f"adding the clsact qdisc to {ifname} failed ({e}): the kernel needs "
                                    "CONFIG_NET_SCH_INGRESS (clsact, Linux 4.5)") from None
            for name, parent in (("kp_tc_in", TC_INGRESS), ("kp_tc_out", TC_EGRESS)):
                try:
                    ipr.tc("replace-filter", "bpf", idx[0], TC_HANDLE, fd=progs.fds[name], name=name,
                           parent=parent, prio=TC_PRIO, classid=1, direct_action=True)
                except NetlinkError as e:
                    raise LoadError(f"attaching {name} to {ifname} failed ({e}): the kernel needs "
                                    "CONFIG_NET_CLS_BPF with direct-action (Linux 4.4)") from None


@off_loop
def tc_attached(ifname: str) -> list[str]:
    """Names of our tc programs on ``ifname`` (ingress and egress)."""
    from pyroute2 import IPRoute

    out = []
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return out
        for parent in (TC_INGRESS, TC_EGRESS):
            try:
                filters = ipr.get_filters(index=idx[0], parent=parent)
            except Exception:
                continue
            for f in filters:
                opts = f.get_attr("TCA_OPTIONS")
                name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
                if name and name.split(":")[0] in TC_PROGS:
                    out.append(name)
    return out


@off_loop
def detach_tc(interfaces: Iterable[str]) -> int:
    """Delete our filters (not the clsact qdisc: other tools may share it) from ``interfaces``."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    n = 0
    with IPRoute() as ipr:
        for ifname in interfaces:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                continue
            for parent in (TC_INGRESS, TC_EGRESS):
                try:
                    ipr.tc("del-filter", "bpf", idx[0], TC_HANDLE, parent=parent, prio=TC_PRIO)
                    n += 1
                except NetlinkError:
                    pass
    return n


if __name__ == "__main__":
    raise SystemExit(main())
