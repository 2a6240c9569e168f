"""Just enough IPv4/IPv6 arithmetic for the plugins, without ``import ipaddress``.

``ipaddress`` (with the functools/collections machinery it pulls in) costs ~10 ms of CPU per process,
and host-local runs it in every ADD and DEL. Addresses here are (version, int) pairs, parsed by the C
inet_pton and printed in the RFC 5952 form that both Go's net.IP.String() (so the reference host-local's
file names) and ``ipaddress`` use -- not glibc's inet_ntop, which writes ``::a.b.c.d`` for ::/96.
"""

from __future__ import annotations

from _socket import AF_INET, AF_INET6, inet_ntop, inet_pton


def _format6(value: int) -> str:
    words = [(value >> (112 - 16 * i)) & 0xFFFF for i in range(8)]
    best, best_len, i = -1, 1, 0
    while i < 8:  # the longest run (first one on a tie) of two or more zero words becomes "::"
        if words[i]:
            i += 1
            continue
        j = i
        while j < 8 and not words[j]:
            j += 1
        if j - i > best_len:
            best, best_len = i, j - i
        i = j
    if best < 0:
        return ":".join(f"{w:x}" for w in words)
    head = ":".join(f"{w:x}" for w in words[:best])
    tail = ":".join(f"{w:x}" for w in words[best + best_len :])
    return f"{head}::{tail}"


class IP:
    __slots__ = ("value", "version")

    def __init__(self, version: int, value: int) -> None:
        self.version = version
        self.value = value

    @classmethod
    def parse(cls, text: str) -> IP:
        """Parse an address; ValueError if it is not one (like ipaddress.ip_address)."""
        text = str(text).strip()
        try:
            if ":" in text:
                return cls(6, int.from_bytes(inet_pton(AF_INET6, text), "big"))
            return cls(4, int.from_bytes(inet_pton(AF_INET, text), "big"))
        except OSError:
            raise ValueError(f"{text!r} does not appear to be an IPv4 or IPv6 address") from None

    @property
    def bits(self) -> int:
        return 32 if self.version == 4 else 128

    def __str__(self) -> str:
        if self.version == 4:
            return inet_ntop(AF_INET, self.value.to_bytes(4, "big"))
        return _format6(self.value)

    def __repr__(self) -> str:
        return f"IP({self})"

    def __add__(self, n: int) -> IP:
        v = self.value + n
        if not 0 <= v < (1 << self.bits):
            raise ValueError("address out of range")
        return IP(self.version, v)

    def __sub__(self, n: int) -> IP:
        return self + (-n)

    def _key(self) -> tuple[int, int]:
        return (self.version, self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IP) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __lt__(self, other: IP) -> bool:
        return self._key() < other._key()

    def __le__(self, other: IP) -> bool:
        return self._key() <= other._key()

    def __gt__(self, other: IP) -> bool:
        return self._key() > other._key()

    def __ge__(self, other: IP) -> bool:
        return self._key() >= other._key()

    @property
    def is_link_local(self) -> bool:
        if self.version == 4:
            return self.value >> 16 == 0xA9FE  # 169.254.0.0/16
        return self.value >> 118 == 0x3FA  # fe80::/10


class Net:
    """A prefix; ``Net.parse("10.1.2.3/24")`` is 10.1.2.0/24 (non-strict, like ip_network(strict=False))."""

    __slots__ = ("network_address", "prefixlen")

    def __init__(self, address: IP, prefixlen: int) -> None:
        if not 0 <= prefixlen <= address.bits:
            raise ValueError(f"invalid prefix length {prefixlen}")
        host_bits = address.bits - prefixlen
        self.network_address = IP(address.version, address.value >> host_bits << host_bits)
        self.prefixlen = prefixlen

    @classmethod
    def parse(cls, text: str) -> Net:
        addr, sep, plen = str(text).partition("/")
        ip = IP.parse(addr)
        if not sep:
            return cls(ip, ip.bits)
        if not plen.isdigit():
            raise ValueError(f"invalid prefix length in {text!r}")
        return cls(ip, int(plen))

    @property
    def version(self) -> int:
        return self.network_address.version

    @property
    def max_prefixlen(self) -> int:
        return self.network_address.bits

    @property
    def broadcast_address(self) -> IP:
        """The last address of the prefix."""
        host_bits = self.max_prefixlen - self.prefixlen
        return IP(self.version, self.network_address.value | ((1 << host_bits) - 1))

    def __contains__(self, ip: IP) -> bool:
        return ip.version == self.version and self.network_address <= ip <= self.broadcast_address

    def overlaps(self, other: Net) -> bool:
        return other.network_address in self or self.network_address in other

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Net) and (self.network_address, self.prefixlen) == (
            other.network_address,
            other.prefixlen,
        )

    def __hash__(self) -> int:
        return hash((self.network_address, self.prefixlen))

    def __str__(self) -> str:
        return f"{self.network_address}/{self.prefixlen}"

    def __repr__(self) -> str:
        return f"Net({self})"
