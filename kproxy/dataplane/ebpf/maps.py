"""Byte layouts of the pinned BPF maps (must match the structs in bpf/kproxy_lb.c) and their handles.

Addresses are stored as 16 bytes in network order (IPv4 in the first 4), ports as 2 bytes in network
order; ids and counters in host order.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from .bpfsys import Map

KIND_SOCK = 0  # VIP reached from a socket in the cgroup
KIND_TC = 1  # VIP reached from outside through an external interface
KIND_NODEPORT = 2  # any node address : nodePort, from outside
KIND_SOCK_NP = 3  # any node address : nodePort, from a socket in the cgroup
KIND_NAMES = {KIND_SOCK: "socket", KIND_TC: "tc", KIND_NODEPORT: "tc-nodeport", KIND_SOCK_NP: "socket-nodeport"}

# svc_val.flags: what the frontend is (for status; the programs do not branch on it)
FE_CLUSTER_IP = 1
FE_EXTERNAL_IP = 2
FE_LB_IP = 4
FE_NODE_PORT = 8
F_SNAT = 0x100  # tc: masquerade the client (externalTrafficPolicy Cluster, or a ClusterIP from outside)
F_SRC_RANGES = 0x200  # tc: only sources in kp_srcrange for this affinity id (loadBalancerSourceRanges)
F_DROP = 0x400  # no endpoint for this traffic's policy but some elsewhere: drop (ETIMEDOUT), not reject

BE_LOCAL = 1

_ZERO16 = bytes(16)
_ZERO12 = bytes(12)

PROTO = {"TCP": 6, "UDP": 17, "SCTP": 132}
PROTO_NAME = {v: k for k, v in PROTO.items()}

META_ATTACHMENTS = 0  # kp_meta[0]: JSON record of where the programs are attached

MAPS: dict[str, tuple[int, int]] = {  # name -> (key size, value size)
    "kp_svc": (20, 20),
    "kp_be": (8, 20),
    "kp_member": (24, 20),
    "kp_aff": (32, 32),
    "kp_revsk": (32, 20),
    "kp_ct_fwd": (40, 32),
    "kp_ct_rev": (40, 32),
    "kp_nodeaddr": (20, 4),
    "kp_meta": (4, 256),
    "kp_srcrange": (24, 4),
}


@functools.lru_cache(maxsize=65536)
def addr16(ip: str) -> bytes:
    if not ip:
        return _ZERO16
    if ":" in ip:
        return socket.inet_pton(socket.AF_INET6, ip)
    return socket.inet_pton(socket.AF_INET, ip) + _ZERO12


def addr_str(raw: bytes, family: int) -> str:
    return socket.inet_ntop(socket.AF_INET, raw[:4]) if family == 4 else str(ipaddress.ip_address(raw[:16]))


def port_be(port: int) -> bytes:
    return port.to_bytes(2, "big")


def svc_key(addr: str, port: int, proto: str, kind: int, family: int) -> bytes:
    return addr16(addr) + port_be(port) + bytes([PROTO[proto], (kind << 4) | family])


@dataclass(frozen=True, slots=True)
class SvcKey:
    addr: str  # "" for a NodePort wildcard
    port: int
    proto: str
    kind: int
    family: int


def parse_svc_key(raw: bytes) -> SvcKey:
    family = raw[19] & 0xF
    kind = raw[19] >> 4
    wildcard = raw[:16] == bytes(16)
    return SvcKey("" if wildcard else addr_str(raw[:16], family), int.from_bytes(raw[16:18], "big"),
                  PROTO_NAME.get(raw[18], str(raw[18])), kind, family)


_SVC_VAL = struct.Struct("=5I")


def svc_val(set_id: int, count: int, aff_id: int, aff_timeout: int, flags: int) -> bytes:
    return _SVC_VAL.pack(set_id, count, aff_id, aff_timeout, flags)


def parse_svc_val(raw: bytes) -> tuple[int, int, int, int, int]:
    return _SVC_VAL.unpack(raw)  # type: ignore[return-value]


_BE_KEY = struct.Struct("=II")


def be_key(set_id: int, slot: int) -> bytes:
    return _BE_KEY.pack(set_id, slot)


def parse_be_key(raw: bytes) -> tuple[int, int]:
    return _BE_KEY.unpack(raw)  # type: ignore[return-value]


def be_val(ip: str, port: int, local: bool) -> bytes:
    family = 6 if ":" in ip else 4
    return addr16(ip) + port_be(port) + bytes([family, BE_LOCAL if local else 0])


def parse_be_val(raw: bytes) -> tuple[str, int, bool]:
    family = raw[18]
    return addr_str(raw[:16], family), int.from_bytes(raw[16:18], "big"), bool(raw[19] & BE_LOCAL)


def member_key(aff_id: int, ip: str, port: int) -> bytes:
    return struct.pack("=I", aff_id) + addr16(ip) + port_be(port) + b"\0\0"


def src_key(aff_id: int, cidr: str) -> bytes:
    net = ipaddress.ip_network(cidr, strict=False)
    return struct.pack("=II", 32 + net.prefixlen, aff_id) + addr16(str(net.network_address))


def parse_src_key(raw: bytes, family: int) -> tuple[int, str]:
    plen, aff_id = struct.unpack_from("=II", raw, 0)
    return aff_id, f"{addr_str(raw[8:24], family)}/{plen - 32}"


ONE = (1).to_bytes(4, "little")


def meta_key(aff_id: int) -> bytes:
    return struct.pack("=I", aff_id)


def meta_val(text: str) -> bytes:
    raw = text.encode()[:255]
    return raw + bytes(256 - len(raw))


def parse_meta_val(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def addr_key(ip: str) -> bytes:
    return addr16(ip) + struct.pack("=I", 6 if ":" in ip else 4)


def parse_addr_key(raw: bytes) -> str:
    family = struct.unpack_from("=I", raw, 16)[0]
    return addr_str(raw[:16], family)


class LBMaps:
    """Handles on every pinned map under ``pin_dir`` (opened by path; closed by :meth:`close`)."""

    def __init__(self, pin_dir: str) -> None:
        self.pin_dir = pin_dir
        self.maps: dict[str, Map] = {}
        try:
            for name, (ks, vs) in MAPS.items():
                self.maps[name] = Map(os.path.join(pin_dir, name), ks, vs)
        except BaseException:
            self.close()
            raise
        self.svc = self.maps["kp_svc"]
        self.be = self.maps["kp_be"]
        self.member = self.maps["kp_member"]
        self.aff = self.maps["kp_aff"]
        self.revsk = self.maps["kp_revsk"]
        self.ct_fwd = self.maps["kp_ct_fwd"]
        self.ct_rev = self.maps["kp_ct_rev"]
        self.nodeaddr = self.maps["kp_nodeaddr"]
        self.meta = self.maps["kp_meta"]
        self.srcrange = self.maps["kp_srcrange"]

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps.clear()


def pins_present(pin_dir: str) -> list[str]:
    return [n for n in MAPS if os.path.exists(os.path.join(pin_dir, n))]
