"""Set-element transactions over raw nfnetlink: the fast path for kproxy's map contents.

``nft -f`` spends ~20 µs of user-space parsing and evaluation per element (about 2 s for 100k
endpoints). kproxy's elements are simple concatenations of addresses, protocols and ports, so this
module packs them straight into one ``NFNL_MSG_BATCH_BEGIN … END`` batch of ``NFT_MSG_NEWSETELEM`` /
``NFT_MSG_DELSETELEM`` messages — one kernel transaction, all-or-nothing like ``nft -f``.

Element text is the same as in the ``nft`` scripts (``"10.96.0.10 . tcp . 80"``, tails
``" comment \\"…\\" : goto c-3"`` or ``" : 10.244.1.10 . 8080"``), so both paths share one renderer. Only
the layouts kproxy uses are supported: concatenations of IPv4/IPv6 addresses, protocol names and port
numbers, with no data, address.port data or a verdict (goto/jump chain, drop, accept), and an optional
comment. Interval sets are not (``fw-allow`` stays on the ``nft`` path).
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
from collections.abc import Iterable

from .. import SyncError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 16
NFNL_MSG_BATCH_END = 17
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_CREATE = 0x400
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_DATA = 2
NFTA_SET_ELEM_USERDATA = 6
NFTA_DATA_VALUE = 1
NFTA_DATA_VERDICT = 2
NFTA_VERDICT_CODE = 1
NFTA_VERDICT_CHAIN = 2
NFTNL_UDATA_SET_ELEM_COMMENT = 0
VERDICTS = {"accept": 1, "drop": 0, "continue": -1, "return": -5}
JUMPS = {"jump": -3, "goto": -4}
PROTOS = {"tcp": 6, "udp": 17, "sctp": 132, "icmp": 1, "icmpv6": 58}
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
MAX_MSG = 65000  # bytes of elements per message: the element list is one attribute (u16 length)
PER_MSG = 400  # elements per message; kproxy's largest elements (with a comment) are < 160 bytes

_SOCK_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
_NFPROTO = {4: 2, 6: 10}


def _attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n & 3)


def _nest(kind: int, payload: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, payload)


def _component(text: str) -> bytes:
    """One concatenation component, padded to a 32-bit register as the kernel stores it."""
    if text in PROTOS:
        return bytes((PROTOS[text], 0, 0, 0))
    if text.isdigit():
        return struct.pack(">H", int(text)) + b"\0\0"
    if ":" in text:
        return socket.inet_pton(socket.AF_INET6, text)
    return socket.inet_pton(socket.AF_INET, text)


def encode_value(text: str) -> bytes:
    return b"".join(map(_component, text.split(" . ")))


# Encoded attribute blocks by element text: frontend keys repeat in every slot map, endpoint values in
# every service port that uses them. Bounded: cleared when they grow past CACHE_MAX entries.
CACHE_MAX = 1 << 20
_key_cache: dict[str, bytes] = {}
_tail_cache: dict[str, bytes] = {}
_HDR = struct.Struct("=HHHH")
_ELEM = struct.Struct("=HH")


def _key_block(key: str) -> bytes:
    kb = _key_cache.get(key)
    if kb is None:
        v = encode_value(key)
        kb = _HDR.pack(8 + len(v), NFTA_SET_ELEM_KEY | NLA_F_NESTED, 4 + len(v), NFTA_DATA_VALUE) + v
        if len(_key_cache) > CACHE_MAX:
            _key_cache.clear()
        _key_cache[key] = kb
    return kb


def _tail_block(tail: str) -> bytes:
    tb = _tail_cache.get(tail)
    if tb is None:
        tb = _encode_tail(tail)
        if len(_tail_cache) > CACHE_MAX:
            _tail_cache.clear()
        _tail_cache[tail] = tb
    return tb


_DATA_HDR4 = _HDR.pack(16, NFTA_SET_ELEM_DATA | NLA_F_NESTED, 12, NFTA_DATA_VALUE)
_DATA_HDR6 = _HDR.pack(28, NFTA_SET_ELEM_DATA | NLA_F_NESTED, 24, NFTA_DATA_VALUE)
_PORT = struct.Struct(">HH")


def _encode_tail(tail: str) -> bytes:
    if tail.startswith(" : ") and tail[3:4].isalnum():
        # fast path for the most common tail, an endpoint " : <ip> . <port>"
        ip, sep, port = tail[3:].partition(" . ")
        if sep and port.isdigit() and " " not in ip:
            if ":" in ip:
                return _DATA_HDR6 + socket.inet_pton(socket.AF_INET6, ip) + _PORT.pack(int(port), 0)
            if ip.count(".") == 3:
                return _DATA_HDR4 + socket.inet_pton(socket.AF_INET, ip) + _PORT.pack(int(port), 0)
    comment = ""
    rest = tail
    body = b""
    if rest.startswith(" comment \""):
        end = rest.index("\"", 10)
        comment = rest[10:end]
        rest = rest[end + 1:]
        if rest:
            body = _tail_block(rest)  # the verdict after a (unique) comment repeats: cached
            rest = ""
    if rest.startswith(" : "):
        data = rest[3:]
        word, _, target = data.partition(" ")
        if word in JUMPS:
            verdict = _attr(NFTA_VERDICT_CODE, struct.pack(">i", JUMPS[word])) + \
                _attr(NFTA_VERDICT_CHAIN, target.encode() + b"\0")
            body += _nest(NFTA_SET_ELEM_DATA, _nest(NFTA_DATA_VERDICT, verdict))
        elif word in VERDICTS and not target:
            body += _nest(NFTA_SET_ELEM_DATA, _nest(NFTA_DATA_VERDICT,
                                                    _attr(NFTA_VERDICT_CODE, struct.pack(">i", VERDICTS[word]))))
        else:
            v = encode_value(data)
            body += _HDR.pack(8 + len(v), NFTA_SET_ELEM_DATA | NLA_F_NESTED, 4 + len(v), NFTA_DATA_VALUE) + v
    elif rest:
        raise ValueError(f"unsupported element tail {tail!r}")
    if comment:
        c = comment.encode() + b"\0"
        body += _attr(NFTA_SET_ELEM_USERDATA, bytes((NFTNL_UDATA_SET_ELEM_COMMENT, len(c))) + c)
    return body


def encode_element(key: str, tail: str = "") -> bytes:
    """NFTA_LIST_ELEM for ``key`` + ``tail`` (the nft element text split as the renderer does)."""
    return encode_elements(((key, tail),))[0]


_LIST_ELEM = NFTA_LIST_ELEM | NLA_F_NESTED
# everything of an endpoint element before the address, by key, per family (the key repeats in every
# slot map); and the encoded ports
_ep_prefix: dict[int, dict[str, bytes]] = {4: {}, 6: {}}
_port_cache: dict[str, bytes] = {}


def _endpoint_prefix(key: str, fam: int) -> bytes:
    kb = _key_block(key)
    hdr = _DATA_HDR6 if fam == 6 else _DATA_HDR4
    b = _ELEM.pack(4 + len(kb) + len(hdr) + (16 if fam == 6 else 4) + 4, _LIST_ELEM) + kb + hdr
    cache = _ep_prefix[fam]
    if len(cache) > CACHE_MAX:
        cache.clear()
    cache[key] = b
    return b


def _port_block(port: str) -> bytes | None:
    if not port.isdigit() or int(port) > 65535:
        return None
    b = _port_cache[port] = _PORT.pack(int(port), 0)
    return b


def encode_elements(items: Iterable[tuple[str, str]]) -> list[bytes]:
    """:func:`encode_element` for many elements: the full sync's hot loop (~100k elements), inlined.

    Endpoint tails (``" : <ip> . <port>"``) are unique per element: they are encoded here directly
    after the cached bytes of their key; verdict tails repeat and are cached; anything else goes
    through :func:`_encode_tail`.
    """
    out: list[bytes] = []
    append = out.append
    key_cache, tail_cache, ports = _key_cache, _tail_cache, _port_cache
    prefix4, prefix6 = _ep_prefix[4], _ep_prefix[6]
    elem, inet_pton, af4, af6 = _ELEM.pack, socket.inet_pton, socket.AF_INET, socket.AF_INET6
    for key, tail in items:
        if tail:
            head, sep, port = tail.rpartition(" . ")
            if sep and head.startswith(" : "):
                pb = ports.get(port)
                if pb is None:
                    pb = _port_block(port)
                ip = head[3:]
                try:
                    if pb is None:
                        pass
                    elif ":" in ip:
                        append((prefix6.get(key) or _endpoint_prefix(key, 6)) + inet_pton(af6, ip) + pb)
                        continue
                    else:
                        append((prefix4.get(key) or _endpoint_prefix(key, 4)) + inet_pton(af4, ip) + pb)
                        continue
                except OSError:
                    pass  # not an address: the general path below says what is wrong with it
        kb = key_cache.get(key)
        if kb is None:
            kb = _key_block(key)
        if not tail:
            append(elem(4 + len(kb), _LIST_ELEM) + kb)
            continue
        if tail.startswith(" : goto"):
            tb = tail_cache.get(tail) or _tail_block(tail)
        else:
            # comments make these tails unique per service: not cached
            tb = _encode_tail(tail)
        append(elem(4 + len(kb) + len(tb), _LIST_ELEM) + kb + tb)
    return out


class Batch:
    """One nftables transaction of set-element operations for one family's ``table``."""

    def __init__(self, family: int, table: str) -> None:
        self.family = family
        self.table = table.encode() + b"\0"
        self.msgs: list[tuple[int, bytes]] = []  # (message type, payload after nfgenmsg)
        self.elements = 0

    def __bool__(self) -> bool:
        return bool(self.msgs)

    def _header(self, set_name: str) -> bytes:
        return _attr(NFTA_SET_ELEM_LIST_TABLE, self.table) + _attr(NFTA_SET_ELEM_LIST_SET, set_name.encode() + b"\0")

    def flush(self, set_name: str) -> None:
        """Delete every element (``nft flush set``)."""
        self.msgs.append((NFT_MSG_DELSETELEM, self._header(set_name)))

    def _elements(self, kind: int, set_name: str, encoded: Iterable[bytes]) -> None:
        """Pack encoded elements into messages whose element list stays under the 64 KiB attribute limit."""
        head = self._header(set_name)
        it = iter(encoded)
        while True:
            # PER_MSG elements of at most MAX_ELEM bytes fit; check the rare oversized chunk below
            chunk = list(itertools.islice(it, PER_MSG))
            if not chunk:
                return
            self.elements += len(chunk)
            body = b"".join(chunk)
            if len(body) > MAX_MSG:
                half = len(chunk) // 2
                parts = [b"".join(chunk[:half]), b"".join(chunk[half:])]
            else:
                parts = [body]
            for part in parts:
                self.msgs.append((kind, head + _nest(NFTA_SET_ELEM_LIST_ELEMENTS, part)))

    def add(self, set_name: str, items: Iterable[tuple[str, str]]) -> None:
        self._elements(NFT_MSG_NEWSETELEM, set_name, encode_elements(items))

    def delete(self, set_name: str, keys: Iterable[str]) -> None:
        self._elements(NFT_MSG_DELSETELEM, set_name, encode_elements((k, "") for k in keys))

    def commit(self) -> None:
        """Send the batch and wait for every acknowledgement; SyncError (nothing applied) on failure."""
        commit_all([self])


def _nlmsg(kind: int, flags: int, seq: int, family: int, res_id: int, payload: bytes) -> bytes:
    body = struct.pack("=BBH", family, 0, socket.htons(res_id)) + payload
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def commit_all(batches: list[Batch]) -> None:
    """Send the element operations of several families' batches as ONE kernel transaction."""
    msgs = [(_NFPROTO[b.family], kind, payload) for b in batches for kind, payload in b.msgs]
    if not msgs:
        return
    parts = [_nlmsg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES, b"")]
    flags = NLM_F_REQUEST | NLM_F_ACK
    for i, (nfproto, kind, payload) in enumerate(msgs, start=1):
        f = flags | (NLM_F_CREATE if kind == NFT_MSG_NEWSETELEM else 0)
        parts.append(_nlmsg((NFNL_SUBSYS_NFTABLES << 8) | kind, f, i, nfproto, 0, payload))
    last = len(msgs)
    parts.append(_nlmsg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, last + 1, socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES, b""))
    data = b"".join(parts)
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError as e:
        raise SyncError(f"nfnetlink socket: {e}") from None
    with s:
        try:
            for opt, fallback in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
                try:
                    s.setsockopt(socket.SOL_SOCKET, opt, max(len(data) * 2, 1 << 20))
                except OSError:
                    s.setsockopt(socket.SOL_SOCKET, fallback, max(len(data) * 2, 1 << 20))
            s.bind((0, 0))
            s.sendall(data)
            _wait_acks(s, last)
        except OSError as e:
            raise SyncError(f"nfnetlink batch failed: {os.strerror(e.errno) if e.errno else e}") from None


def _wait_acks(s: socket.socket, last: int) -> None:
    pending = set(range(1, last + 1))
    errors: list[str] = []
    s.settimeout(30.0)
    while pending:
        try:
            buf = s.recv(1 << 20)
        except TimeoutError:
            break
        off = 0
        while off + 16 <= len(buf):
            ln, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", buf, off)
            if ln < 16:
                break
            if kind == NLMSG_ERROR:
                (err,) = struct.unpack_from("=i", buf, off + 16)
                pending.discard(seq)
                if err:
                    errors.append(f"message {seq}: {os.strerror(-err)} ({errno.errorcode.get(-err, err)})")
            off += (ln + 3) & ~3
        if errors:
            s.settimeout(0.05)  # the kernel aborted the transaction; collect what else it reports
    if errors:
        raise SyncError("nfnetlink transaction aborted: " + "; ".join(errors[:5]))
    if pending:
        raise SyncError(f"nfnetlink: no acknowledgement for {len(pending)} message(s)")
