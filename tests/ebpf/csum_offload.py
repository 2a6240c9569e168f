"""Turn rx/tx checksum offload off on interfaces (legacy SIOCETHTOOL), so the kernel computes and
verifies every TCP/UDP checksum in software: a packet with a wrong checksum is then dropped and counted
in InCsumErrors instead of being trusted as CHECKSUM_UNNECESSARY on a veth. Usage: csum_offload.py IFNAME..."""

from __future__ import annotations

import ctypes
import fcntl
import socket
import struct
import sys

SIOCETHTOOL = 0x8946
ETHTOOL_SRXCSUM = 0x15
ETHTOOL_STXCSUM = 0x17


def set_value(sock: socket.socket, ifname: str, cmd: int, value: int) -> None:
    ev = ctypes.create_string_buffer(struct.pack("=II", cmd, value), 8)
    ifr = struct.pack("16sP", ifname.encode(), ctypes.addressof(ev)) + bytes(16)
    fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifr)


def main() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for ifname in sys.argv[1:]:
            set_value(s, ifname, ETHTOOL_SRXCSUM, 0)
            set_value(s, ifname, ETHTOOL_STXCSUM, 0)


if __name__ == "__main__":
    main()
