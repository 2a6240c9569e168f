"""The few bpf(2) commands kproxy needs, via ctypes: pinned maps, program queries, cgroup attachment.

bcc is only needed to compile and load the programs; reading and writing the pinned maps (sync,
``kproxy status``, ``--cleanup``) works through these calls alone, so status and cleanup run on nodes
where bcc or kernel headers are missing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from collections.abc import Iterator

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_NR_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}

MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
OBJ_GET = 7
PROG_ATTACH = 8
PROG_DETACH = 9
PROG_GET_FD_BY_ID = 13
MAP_GET_FD_BY_ID = 14
OBJ_GET_INFO_BY_FD = 15
PROG_QUERY = 16
MAP_LOOKUP_BATCH = 24
MAP_UPDATE_BATCH = 26
MAP_DELETE_BATCH = 27

BPF_ANY = 0
BPF_F_ALLOW_MULTI = 2
BPF_F_REPLACE = 4

# enum bpf_attach_type
CGROUP_INET4_CONNECT = 10
CGROUP_INET6_CONNECT = 11
CGROUP_UDP4_SENDMSG = 14
CGROUP_UDP6_SENDMSG = 15
CGROUP_UDP4_RECVMSG = 19
CGROUP_UDP6_RECVMSG = 20
CGROUP_INET4_GETPEERNAME = 29
CGROUP_INET6_GETPEERNAME = 30

BPF_FS_MAGIC = 0xCAFE4A11
CGROUP2_SUPER_MAGIC = 0x63677270


ENOTSUPP = 524  # kernel-internal "operation not supported" (no Python errno name)
_UNSUPPORTED = (errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP, errno.ENOSYS)


class BpfError(OSError):
    pass


def _sys(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(errno.ENOSYS, f"bpf syscall number unknown for {platform.machine()}")
    r = _libc.syscall(nr, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if r < 0:
        e = ctypes.get_errno()
        raise BpfError(e, os.strerror(e))
    return int(r)


def _attr(size: int = 128) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(size)


def _addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def obj_get(path: str) -> int:
    """Open a pinned object; returns an fd (caller closes)."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    a = _attr()
    struct.pack_into("=QII", a, 0, ctypes.addressof(p), 0, 0)
    return _sys(OBJ_GET, a)


class Map:
    """A pinned BPF map opened by path, with fixed key/value sizes (raw bytes in and out)."""

    def __init__(self, path: str, key_size: int, value_size: int) -> None:
        self.path = path
        self.key_size = key_size
        self.value_size = value_size
        self.fd = obj_get(path)
        info = map_info(self.fd)
        if (info["key_size"], info["value_size"]) != (key_size, value_size):
            os.close(self.fd)
            raise BpfError(errno.EINVAL, f"{path}: pinned map has key/value sizes {info['key_size']}/"
                           f"{info['value_size']}, expected {key_size}/{value_size} (layout changed?)")
        self.max_entries = info["max_entries"]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _kv(self, key: bytes, value: bytes | None = None) -> tuple[ctypes.Array[ctypes.c_char], ...]:
        if len(key) != self.key_size:
            raise ValueError(f"{self.path}: key of {len(key)} bytes, want {self.key_size}")
        k = ctypes.create_string_buffer(key, self.key_size)
        v = ctypes.create_string_buffer(value if value is not None else b"", self.value_size)
        if value is not None and len(value) != self.value_size:
            raise ValueError(f"{self.path}: value of {len(value)} bytes, want {self.value_size}")
        return k, v

    def get(self, key: bytes) -> bytes | None:
        k, v = self._kv(key)
        a = _attr()
        struct.pack_into("=IIQQQ", a, 0, self.fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0)
        try:
            _sys(MAP_LOOKUP_ELEM, a)
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return v.raw

    def put(self, key: bytes, value: bytes) -> None:
        k, v = self._kv(key, value)
        a = _attr()
        struct.pack_into("=IIQQQ", a, 0, self.fd, 0, ctypes.addressof(k), ctypes.addressof(v), BPF_ANY)
        _sys(MAP_UPDATE_ELEM, a)

    def delete(self, key: bytes) -> bool:
        k, _ = self._kv(key)
        a = _attr()
        struct.pack_into("=IIQ", a, 0, self.fd, 0, ctypes.addressof(k))
        try:
            _sys(MAP_DELETE_ELEM, a)
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def keys(self) -> Iterator[bytes]:
        """All keys (a snapshot: collected before yielding, so callers may delete while iterating)."""
        try:
            return iter([k for k, _ in self._items_batch()])
        except BpfError as e:
            if e.errno not in _UNSUPPORTED:
                raise
        return self._keys_one_by_one()

    def _keys_one_by_one(self) -> Iterator[bytes]:
        out = []
        cur: ctypes.Array[ctypes.c_char] | None = None
        nxt = ctypes.create_string_buffer(self.key_size)
        a = _attr()
        while True:
            struct.pack_into("=IIQQ", a, 0, self.fd, 0, _addr(cur), ctypes.addressof(nxt))
            try:
                _sys(MAP_GET_NEXT_KEY, a)
            except BpfError as e:
                if e.errno == errno.ENOENT:
                    break
                raise
            out.append(nxt.raw)
            cur = ctypes.create_string_buffer(nxt.raw, self.key_size)
        return iter(out)

    def __iter__(self) -> Iterator[bytes]:
        return self.keys()

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """All entries (a snapshot), read with BPF_MAP_LOOKUP_BATCH where the kernel has it."""
        try:
            return iter(self._items_batch())
        except BpfError as e:
            if e.errno not in _UNSUPPORTED:
                raise
        out = []
        for k in self._keys_one_by_one():
            v = self.get(k)
            if v is not None:
                out.append((k, v))
        return iter(out)

    def _items_batch(self, chunk: int = 4096) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        tok_in = ctypes.create_string_buffer(8)
        tok_out = ctypes.create_string_buffer(8)
        first = True
        while True:
            keys = ctypes.create_string_buffer(self.key_size * chunk)
            vals = ctypes.create_string_buffer(self.value_size * chunk)
            a = _attr()
            struct.pack_into("=QQQQIIQQ", a, 0, 0 if first else ctypes.addressof(tok_in), ctypes.addressof(tok_out),
                             ctypes.addressof(keys), ctypes.addressof(vals), chunk, self.fd, 0, 0)
            done = False
            try:
                _sys(MAP_LOOKUP_BATCH, a)
            except BpfError as e:
                if e.errno == errno.ENOSPC:  # one bucket holds more than chunk entries
                    chunk *= 4
                    continue
                if e.errno != errno.ENOENT:
                    raise
                done = True
            n = struct.unpack_from("=I", a, 32)[0]
            kr, vr = keys.raw, vals.raw
            for i in range(n):
                out.append((kr[i * self.key_size:(i + 1) * self.key_size],
                            vr[i * self.value_size:(i + 1) * self.value_size]))
            if done:
                return out
            ctypes.memmove(tok_in, tok_out, 8)
            first = False

    def put_many(self, items: dict[bytes, bytes]) -> None:
        """Update many entries with BPF_MAP_UPDATE_BATCH (element by element where unsupported)."""
        if not items:
            return
        ks = list(items)
        keys = ctypes.create_string_buffer(b"".join(ks), self.key_size * len(ks))
        vals = ctypes.create_string_buffer(b"".join(items[k] for k in ks), self.value_size * len(ks))
        a = _attr()
        struct.pack_into("=QQQQIIQQ", a, 0, 0, 0, ctypes.addressof(keys), ctypes.addressof(vals), len(ks), self.fd,
                         BPF_ANY, 0)
        try:
            _sys(MAP_UPDATE_BATCH, a)
            return
        except BpfError as e:
            if e.errno not in _UNSUPPORTED:
                raise
            done = struct.unpack_from("=I", a, 32)[0]
        for k in ks[done:]:
            self.put(k, items[k])

    def delete_many(self, keys: list[bytes]) -> int:
        """Delete many keys (missing ones are skipped); returns how many were deleted."""
        deleted = 0
        pos = 0
        while pos < len(keys):
            rest = keys[pos:]
            buf = ctypes.create_string_buffer(b"".join(rest), self.key_size * len(rest))
            a = _attr()
            struct.pack_into("=QQQQIIQQ", a, 0, 0, 0, ctypes.addressof(buf), 0, len(rest), self.fd, 0, 0)
            try:
                _sys(MAP_DELETE_BATCH, a)
                return deleted + len(rest)
            except BpfError as e:
                n = struct.unpack_from("=I", a, 32)[0]
                if e.errno == errno.ENOENT:  # rest[n] is missing: skip it
                    deleted += n
                    pos += n + 1
                    continue
                if e.errno not in _UNSUPPORTED:
                    raise
                deleted += n
                for k in rest[n:]:
                    deleted += self.delete(k)
                return deleted
        return deleted

    def __enter__(self) -> Map:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _info(fd: int, size: int) -> bytes:
    buf = ctypes.create_string_buffer(size)
    a = _attr()
    struct.pack_into("=IIQ", a, 0, fd, size, ctypes.addressof(buf))
    _sys(OBJ_GET_INFO_BY_FD, a)
    return buf.raw


def map_info(fd: int) -> dict[str, int | str]:
    raw = _info(fd, 80)
    typ, mid, ks, vs, me, fl = struct.unpack_from("=6I", raw, 0)
    name = raw[24:40].split(b"\0", 1)[0].decode()
    return {"type": typ, "id": mid, "key_size": ks, "value_size": vs, "max_entries": me, "flags": fl, "name": name}


def prog_info(fd: int) -> dict[str, int | str]:
    raw = _info(fd, 232)
    typ, pid = struct.unpack_from("=II", raw, 0)
    name = raw[64:80].split(b"\0", 1)[0].decode()
    return {"type": typ, "id": pid, "name": name}


def prog_fd_by_id(prog_id: int) -> int:
    a = _attr()
    struct.pack_into("=III", a, 0, prog_id, 0, 0)
    return _sys(PROG_GET_FD_BY_ID, a)


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached to a cgroup fd for one attach type."""
    ids = (ctypes.c_uint32 * 64)()
    a = _attr()
    struct.pack_into("=IIIIQI", a, 0, target_fd, attach_type, 0, 0, ctypes.addressof(ids), 64)
    _sys(PROG_QUERY, a)
    count = struct.unpack_from("=I", a, 24)[0]
    return list(ids[: min(count, 64)])


def prog_attach(target_fd: int, prog_fd: int, attach_type: int, flags: int = BPF_F_ALLOW_MULTI,
                replace_fd: int = 0) -> None:
    a = _attr()
    struct.pack_into("=IIIII", a, 0, target_fd, prog_fd, attach_type, flags, replace_fd)
    _sys(PROG_ATTACH, a)


def prog_detach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    a = _attr()
    struct.pack_into("=IIII", a, 0, target_fd, prog_fd, attach_type, 0)
    _sys(PROG_DETACH, a)


def fs_magic(path: str) -> int:
    """f_type of the filesystem holding ``path`` (statfs)."""

    class _Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]

    st = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(st)) != 0:
        e = ctypes.get_errno()
        raise BpfError(e, f"statfs {path}: {os.strerror(e)}")
    return st.f_type & 0xFFFFFFFF
