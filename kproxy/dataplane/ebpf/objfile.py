"""Precompiled programs: load the BPF bytecode without bcc, clang or kernel headers.

bcc compiles the C source to bytecode in which every map reference is a ``ld_imm64`` carrying the map's
fd (``BPF_PSEUDO_MAP_FD``). :func:`save` records that bytecode with the map *name* of each such
instruction; :func:`load` opens (or creates) the pinned maps, patches their fds in and loads the programs
with plain ``BPF_PROG_LOAD``. The programs use only stable UAPI contexts and helpers, so the bytecode is
valid on any kernel with the features (no CO-RE needed).

The same file serves as the daemon's compile cache (``$KPROXY_CACHE_DIR/bpf/``: a restart skips the 1-5 s
compile) and as a shippable object for nodes without headers (``kproxy-bpf-precompile OUT`` on a build
host, then ``KPROXY_BPF_OBJECT=OUT`` on the node).
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import os
import struct
from typing import Any

from . import bpfsys
from . import maps as m

FORMAT = 1
BPF_PROG_LOAD = 5
BPF_MAP_CREATE = 0
BPF_OBJ_PIN = 6
LD_IMM64 = 0x18
PSEUDO_MAP_FD = 1

# must match the map definitions in bpf/kproxy_lb.c: name -> (type, max entries, flags)
MAP_SPECS: dict[str, tuple[int, int, int]] = {
    "kp_svc": (1, 131072, 1),
    "kp_be": (1, 524288, 1),
    "kp_member": (1, 524288, 1),
    "kp_aff": (9, 65536, 0),
    "kp_revsk": (9, 65536, 0),
    "kp_ct_fwd": (9, 65536, 0),
    "kp_ct_rev": (9, 65536, 0),
    "kp_nodeaddr": (1, 1024, 1),
    "kp_meta": (1, 131072, 1),
    "kp_srcrange": (11, 16384, 1),
}


class ObjectError(RuntimeError):
    pass


def source_key(source: str, masq_mark: int, defines: tuple[str, ...] = ()) -> str:
    h = hashlib.sha256(f"{FORMAT}\0{masq_mark}\0{','.join(defines)}\0".encode() + source.encode()).hexdigest()
    return h[:16]


def save(path: str, key: str, progs: dict[str, tuple[int, int, bytes]], map_fds: dict[str, int]) -> None:
    """progs: name -> (prog type, expected attach type or -1, bytecode); map_fds: map name -> fd."""
    by_fd = {fd: name for name, fd in map_fds.items()}
    out: dict[str, Any] = {"format": FORMAT, "key": key, "programs": {}}
    for name, (ptype, attach, insns) in progs.items():
        relocs = []
        for i in range(0, len(insns) // 8):
            code, regs, _off, imm = struct.unpack_from("=BBhi", insns, i * 8)
            if code == LD_IMM64 and (regs >> 4) == PSEUDO_MAP_FD:
                if imm not in by_fd:
                    raise ObjectError(f"{name}: instruction {i} references an unknown map fd {imm}")
                relocs.append([i, by_fd[imm]])
        out["programs"][name] = {"type": ptype, "attach_type": attach, "relocs": relocs,
                                 "insns": base64.b64encode(insns).decode()}
    tmp = f"{path}.{os.getpid()}.tmp"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, path)


def read(path: str, key: str | None = None) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    if obj.get("format") != FORMAT or (key is not None and obj.get("key") != key):
        return None
    return obj


def ensure_maps(pin_dir: str) -> None:
    """Create and pin every map that is not pinned yet (bcc does this itself when it compiles)."""
    os.makedirs(pin_dir, exist_ok=True)
    for name, (mtype, max_entries, flags) in MAP_SPECS.items():
        path = os.path.join(pin_dir, name)
        if os.path.exists(path):
            continue
        ks, vs = m.MAPS[name]
        a = ctypes.create_string_buffer(128)
        struct.pack_into("=6I", a, 0, mtype, ks, vs, max_entries, flags, 0)
        struct.pack_into("16s", a, 28, name.encode())  # map_name follows inner_map_fd and numa_node
        fd = bpfsys._sys(BPF_MAP_CREATE, a)
        try:
            p = ctypes.create_string_buffer(os.fsencode(path))
            pa = ctypes.create_string_buffer(128)
            struct.pack_into("=QI", pa, 0, ctypes.addressof(p), fd)
            bpfsys._sys(BPF_OBJ_PIN, pa)
        finally:
            os.close(fd)


def load_program(name: str, ptype: int, attach_type: int, insns: bytes) -> int:
    buf = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 20)
    for level in (0, 1):  # load quietly; on failure again with the verifier log for the message
        a = ctypes.create_string_buffer(144)
        struct.pack_into("=IIQQIIQII", a, 0, ptype, len(insns) // 8, ctypes.addressof(buf), ctypes.addressof(lic),
                         level, len(log) if level else 0, ctypes.addressof(log) if level else 0, 0, 0)
        struct.pack_into("16s", a, 48, name[:15].encode())
        struct.pack_into("=II", a, 64, 0, max(attach_type, 0))
        try:
            return bpfsys._sys(BPF_PROG_LOAD, a)
        except bpfsys.BpfError as e:
            err = e
    text = log.value.decode(errors="replace").strip().splitlines()[-3:]
    raise ObjectError(f"loading {name} failed ({err.strerror}): {' / '.join(text)}")


def load(obj: dict[str, Any], pin_dir: str, names: list[str]) -> dict[str, int]:
    """Load ``names`` from a saved object against the maps pinned in ``pin_dir``; returns name -> fd."""
    ensure_maps(pin_dir)
    map_fds: dict[str, int] = {}
    fds: dict[str, int] = {}
    try:
        for name in MAP_SPECS:
            map_fds[name] = bpfsys.obj_get(os.path.join(pin_dir, name))
        for name in names:
            p = obj["programs"].get(name)
            if p is None:
                raise ObjectError(f"precompiled object lacks program {name}")
            insns = bytearray(base64.b64decode(p["insns"]))
            for idx, map_name in p["relocs"]:
                struct.pack_into("=i", insns, idx * 8 + 4, map_fds[map_name])
            fds[name] = load_program(name, p["type"], p["attach_type"], bytes(insns))
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    finally:
        for fd in map_fds.values():
            os.close(fd)
    return fds


