"""Minimal synchronous rtnetlink client on top of pyroute2's message classes.

Why not ``pyroute2.IPRoute``: importing the ``pyroute2`` package runs its ``__init__`` which pulls in
NDB, IPDB, conntrack, asyncio and friends -- ~300 ms on this class of machine, more than a whole
reference-plugin ADD. The message classes only cost a fraction of that, so we load just those
(registering a bare package object for ``pyroute2`` so its ``__init__`` does not run) and speak netlink
over a plain ``socket``: pyroute2's ``ifaddrmsg`` and ``rtmsg``, and for links :mod:`cni._rtnl`, a subset
of pyroute2's ``ifinfmsg`` on pyroute2's own nla encoder/decoder.

Network namespaces are entered with ``setns(2)`` through ctypes; a netlink socket stays bound to the
namespace it was created in, so :class:`NL` objects for the host and the pod can coexist.
"""

from __future__ import annotations

import os
import struct
import sys
import types

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~8 ms of import time per plugin call
    from typing import Any

NETLINK_ROUTE = 0
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26

IFF_UP = 0x1
IFF_PROMISC = 0x100
IFA_F_NODAD = 0x02
AF_BRIDGE = 7
BRIDGE_VLAN_INFO_PVID = 0x2
BRIDGE_VLAN_INFO_UNTAGGED = 0x4
CLONE_NEWNET = 0x40000000

_msgs: Any = None


def _load() -> Any:
    """Import pyroute2's rtnl message classes without executing ``pyroute2/__init__.py``."""
    global _msgs
    if _msgs is not None:
        return _msgs
    stub = None
    if "pyroute2" not in sys.modules:
        for d in sys.path:
            pkg = os.path.join(d or ".", "pyroute2")
            if os.path.isfile(os.path.join(pkg, "__init__.py")):
                stub = types.ModuleType("pyroute2")
                stub.__path__ = [pkg]
                stub.__file__ = os.path.join(pkg, "__init__.py")
                sys.modules["pyroute2"] = stub
                break
    try:
        from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
        from pyroute2.netlink.rtnl.rtmsg import rtmsg

        from cni._rtnl import ifinfmsg  # a subset of pyroute2's, without its dozen link-kind plugin modules
    finally:
        # Don't leave the bare package behind: whoever imports pyroute2 later in this process (tests, the
        # runtime helper's users) gets the real package, which reuses the submodules loaded here.
        if stub is not None and sys.modules.get("pyroute2") is stub:
            del sys.modules["pyroute2"]

    _msgs = types.SimpleNamespace(ifinfmsg=ifinfmsg, ifaddrmsg=ifaddrmsg, rtmsg=rtmsg)
    return _msgs


_setns: Any = None


def _libc_setns() -> Any:
    """libc's setns(2) through the ``_ctypes`` C module.

    ``import ctypes`` costs 5-20 ms (it builds the whole type zoo); one function pointer needs none of it.
    Falls back to ctypes proper should the private API ever differ.
    """
    try:
        import _ctypes

        class _Int(_ctypes._SimpleCData):  # what ctypes.c_int is
            _type_ = "i"

        class _Fn(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
            _restype_ = _Int
            _argtypes_ = (_Int, _Int)

        class _Lib:
            _handle = _ctypes.dlopen(None, 0)

        fn = _Fn(("setns", _Lib()))
        return lambda fd, nstype: (fn(fd, nstype), _ctypes.get_errno())
    except Exception:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return lambda fd, nstype: (libc.setns(fd, nstype), ctypes.get_errno())


def setns(fd: int) -> None:
    """Move this (single-threaded) process into the network namespace open at ``fd``."""
    global _setns
    if hasattr(os, "setns"):  # Python >= 3.12
        os.setns(fd, CLONE_NEWNET)
        return
    if _setns is None:
        _setns = _libc_setns()
    rc, err = _setns(fd, CLONE_NEWNET)
    if rc != 0:
        raise OSError(err, f"setns: {os.strerror(err)}")


def delete_link_by_index(index: int) -> None:
    """RTM_DELLINK for ``index`` in the current netns, without loading pyroute2.

    DEL is on the pod-teardown path and deleting by index needs no attribute encoding at all, so
    this one message is packed by hand (nlmsghdr + ifinfomsg) to spare DEL the ~45 ms pyroute2 import.
    """
    import _socket

    s = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        s.bind((0, 0))
        s.send(struct.pack("=IHHIIBxHiII", 32, RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, 1, 0, 0, 0, index, 0, 0))
        while True:
            data = s.recv(65536)
            _, t, _, seq, _ = struct.unpack_from("=IHHII", data)
            if t == NLMSG_ERROR and seq == 1:
                err = struct.unpack_from("=i", data, 16)[0]
                if err and -err not in (19, 2):  # ENODEV/ENOENT: already gone
                    raise OSError(-err, os.strerror(-err))
                return
    finally:
        s.close()


class Link:
    __slots__ = ("flags", "index", "kind", "mac", "master", "mtu", "name", "peer_index")

    def __init__(self, msg: Any) -> None:
        self.index: int = msg["index"]
        self.flags: int = msg["flags"]
        self.name: str = msg.get_attr("IFLA_IFNAME")
        self.mac: str = msg.get_attr("IFLA_ADDRESS") or ""
        self.mtu: int = msg.get_attr("IFLA_MTU") or 0
        self.master: int = msg.get_attr("IFLA_MASTER") or 0
        self.peer_index: int = msg.get_attr("IFLA_LINK") or 0
        info = msg.get_attr("IFLA_LINKINFO")
        self.kind: str = (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""


class NL:
    """One NETLINK_ROUTE socket, bound to the netns that is current when it is created."""

    def __init__(self) -> None:
        import socket

        self.m = _load()
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NL:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, msg: Any, mtype: int, flags: int = 0) -> list[bytes]:
        """Send ``msg`` and collect the replies; raise OSError on a netlink error."""
        self.seq += 1
        dump = (flags & NLM_F_DUMP) == NLM_F_DUMP
        msg["header"]["type"] = mtype
        msg["header"]["flags"] = NLM_F_REQUEST | flags | (0 if dump else NLM_F_ACK)
        msg["header"]["sequence_number"] = self.seq
        msg["header"]["pid"] = 0
        msg.encode()
        self.sock.send(msg.data)
        out: list[bytes] = []
        while True:
            data = self.sock.recv(1 << 20)
            off = 0
            while off + 16 <= len(data):
                length, t, _f, seq, _pid = struct.unpack_from("=IHHII", data, off)
                if length < 16:
                    break
                chunk = data[off : off + length]
                off += (length + 3) & ~3
                if seq != self.seq:
                    continue
                if t == NLMSG_ERROR:
                    err = struct.unpack_from("=i", chunk, 16)[0]
                    if err:
                        raise OSError(-err, os.strerror(-err))
                    return out
                if t == NLMSG_DONE:
                    return out
                out.append(chunk)

    def _decode(self, cls: Any, raw: bytes) -> Any:
        m = cls(raw)
        m.decode()
        return m

    # ---- links

    def link(self, name: str | None = None, index: int = 0) -> Link | None:
        msg = self.m.ifinfmsg()
        msg["index"] = index
        if name is not None:
            msg["attrs"] = [("IFLA_IFNAME", name)]
        try:
            replies = self.request(msg, RTM_GETLINK)
        except OSError as e:
            if e.errno in (19, 2):  # ENODEV, ENOENT
                return None
            raise
        return Link(self._decode(self.m.ifinfmsg, replies[0])) if replies else None

    def links(self) -> list[Link]:
        return [
            Link(self._decode(self.m.ifinfmsg, r)) for r in self.request(self.m.ifinfmsg(), RTM_GETLINK, NLM_F_DUMP)
        ]

    def add_bridge(self, name: str, mtu: int = 0, vlan_filtering: bool = False) -> None:
        msg = self.m.ifinfmsg()
        data: list[Any] = [("IFLA_INFO_KIND", "bridge")]
        if vlan_filtering:
            data.append(("IFLA_INFO_DATA", {"attrs": [("IFLA_BR_VLAN_FILTERING", 1)]}))
        attrs: list[Any] = [("IFLA_IFNAME", name), ("IFLA_LINKINFO", {"attrs": data})]
        if mtu:
            attrs.append(("IFLA_MTU", mtu))
        msg["attrs"] = attrs
        self.request(msg, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL)

    def add_veth(self, name: str, peer: str, peer_netns_fd: int, mtu: int = 0) -> None:
        """Create a veth pair whose ``peer`` end is born directly inside the netns open at ``peer_netns_fd``."""
        pattrs: list[Any] = [("IFLA_IFNAME", peer), ("IFLA_NET_NS_FD", peer_netns_fd)]
        attrs: list[Any] = [("IFLA_IFNAME", name)]
        if mtu:
            pattrs.append(("IFLA_MTU", mtu))
            attrs.append(("IFLA_MTU", mtu))
        attrs.append(
            (
                "IFLA_LINKINFO",
                {
                    "attrs": [
                        ("IFLA_INFO_KIND", "veth"),
                        ("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", {"attrs": pattrs})]}),
                    ]
                },
            )
        )
        msg = self.m.ifinfmsg()
        msg["attrs"] = attrs
        self.request(msg, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL)

    def set_link(
        self,
        index: int,
        *,
        up: bool | None = None,
        promisc: bool | None = None,
        master: int | None = None,
        mtu: int | None = None,
    ) -> None:
        msg = self.m.ifinfmsg()
        msg["index"] = index
        flags = change = 0
        if up is not None:
            change |= IFF_UP
            flags |= IFF_UP if up else 0
        if promisc is not None:
            change |= IFF_PROMISC
            flags |= IFF_PROMISC if promisc else 0
        msg["flags"], msg["change"] = flags, change
        attrs: list[Any] = []
        if master is not None:
            attrs.append(("IFLA_MASTER", master))
        if mtu:
            attrs.append(("IFLA_MTU", mtu))
        msg["attrs"] = attrs
        self.request(msg, RTM_NEWLINK)

    def set_brport(self, index: int, *, hairpin: bool | None = None, vlan: int = 0, self_port: bool = False) -> None:
        """Bridge port settings (AF_BRIDGE RTM_SETLINK): hairpin mode and/or an untagged PVID."""
        msg = self.m.ifinfmsg()
        msg["family"] = AF_BRIDGE
        msg["index"] = index
        attrs: list[Any] = []
        if hairpin is not None:
            attrs.append(("IFLA_PROTINFO", {"attrs": [("IFLA_BRPORT_MODE", 1 if hairpin else 0)]}))
        if vlan:
            spec: list[Any] = [
                ("IFLA_BRIDGE_VLAN_INFO", {"flags": BRIDGE_VLAN_INFO_PVID | BRIDGE_VLAN_INFO_UNTAGGED, "vid": vlan})
            ]
            if self_port:
                spec.insert(0, ("IFLA_BRIDGE_FLAGS", 2))  # BRIDGE_FLAGS_SELF
            attrs.append(("IFLA_AF_SPEC", {"attrs": spec}))
        msg["attrs"] = attrs
        self.request(msg, RTM_SETLINK)

    def del_link(self, index: int = 0, name: str | None = None) -> bool:
        msg = self.m.ifinfmsg()
        msg["index"] = index
        if name is not None:
            msg["attrs"] = [("IFLA_IFNAME", name)]
        try:
            self.request(msg, RTM_DELLINK)
        except OSError as e:
            if e.errno in (19, 2):
                return False
            raise
        return True

    # ---- addresses

    def addrs(self, index: int = 0, family: int = 0) -> list[tuple[int, str, int]]:
        """(family, address, prefixlen) of ``index`` (all links when 0)."""
        msg = self.m.ifaddrmsg()
        msg["family"] = family
        out = []
        for raw in self.request(msg, RTM_GETADDR, NLM_F_DUMP):
            a = self._decode(self.m.ifaddrmsg, raw)
            if index and a["index"] != index:
                continue
            addr = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
            out.append((a["family"], addr, a["prefixlen"]))
        return out

    def add_addr(self, index: int, family: int, address: str, prefixlen: int, *, delete: bool = False) -> None:
        msg = self.m.ifaddrmsg()
        msg["family"] = family
        msg["prefixlen"] = prefixlen
        msg["index"] = index
        attrs: list[Any] = [("IFA_LOCAL", address), ("IFA_ADDRESS", address)]
        if family == 2 and prefixlen < 31 and not delete:
            from cni._ip import Net

            attrs.append(("IFA_BROADCAST", str(Net.parse(f"{address}/{prefixlen}").broadcast_address)))
        if family == 10 and not delete:
            msg["flags"] = IFA_F_NODAD  # no tentative phase: the pod is usable as soon as ADD returns
        msg["attrs"] = attrs
        if delete:
            self.request(msg, RTM_DELADDR)
        else:
            self.request(msg, RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL)

    # ---- routes

    def add_route(
        self,
        family: int,
        dst: str,
        dst_len: int,
        *,
        gateway: str | None = None,
        oif: int = 0,
        table: int = 0,
        priority: int = 0,
        mtu: int = 0,
        advmss: int = 0,
        scope: int | None = None,
    ) -> None:
        msg = self.m.rtmsg()
        msg["family"] = family
        msg["dst_len"] = dst_len
        msg["table"] = table if 0 < table < 256 else 254
        msg["proto"] = 3  # RTPROT_BOOT, like `ip route add` and netlink.RouteAdd
        msg["type"] = 1  # RTN_UNICAST
        msg["scope"] = scope if scope is not None else (0 if gateway else 253)  # universe / link
        attrs: list[Any] = []
        if dst_len:
            attrs.append(("RTA_DST", dst))
        if gateway:
            attrs.append(("RTA_GATEWAY", gateway))
        if oif:
            attrs.append(("RTA_OIF", oif))
        if table >= 256:
            attrs.append(("RTA_TABLE", table))
        if priority:
            attrs.append(("RTA_PRIORITY", priority))
        metrics = [(k, v) for k, v in (("RTAX_MTU", mtu), ("RTAX_ADVMSS", advmss)) if v]
        if metrics:
            attrs.append(("RTA_METRICS", {"attrs": metrics}))
        msg["attrs"] = attrs
        self.request(msg, RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL)

    def routes(self, family: int) -> list[dict[str, Any]]:
        msg = self.m.rtmsg()
        msg["family"] = family
        out = []
        for raw in self.request(msg, RTM_GETROUTE, NLM_F_DUMP):
            r = self._decode(self.m.rtmsg, raw)
            out.append(
                {
                    "dst": r.get_attr("RTA_DST"),
                    "dst_len": r["dst_len"],
                    "gateway": r.get_attr("RTA_GATEWAY"),
                    "oif": r.get_attr("RTA_OIF"),
                    "table": r.get_attr("RTA_TABLE") or r["table"],
                }
            )
        return out
