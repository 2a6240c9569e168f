"""Read one family's ``kproxy`` table back from the kernel (``nft -j list table``) into ServiceStatus.

Service port names come from the element comments kproxy writes on the frontend maps
(``"<namespace>/<name>:<port>/<protocol> <Kind>"``); backends from the endpoint maps, in slot order.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .. import BackendStatus, FrontendStatus, ServiceStatus
from . import render as r
from .nft import comment_of, flat


def _maps(objs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for obj in objs:
        for kind in ("map", "set"):
            m = obj.get(kind)
            if m is not None:
                out[m["name"]] = m.get("elem", []) or []
    return out


def _join(parts: list[Any]) -> str:
    return " . ".join(str(p) for p in parts)


def _addr(ip: str, port: Any) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def read_status(objs: list[dict[str, Any]], fam: int) -> list[ServiceStatus]:
    if not objs:
        return []
    maps = _maps(objs)
    # endpoint maps: frontend key → {slot: "ip:port"}
    backends: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)
    # per-slot endpoint maps: (map family, frontend key) → {slot: "ip:port"}
    for name, elems in maps.items():
        parts = name.split("-")
        if len(parts) == 3 and parts[0] == "ep" and parts[2].isdigit():
            for pair in elems:
                key, val = flat(pair[0]), flat(pair[1])
                backends[(parts[1], _join(key))][int(parts[2])] = _addr(str(val[0]), val[1])
    services: dict[str, ServiceStatus] = {}

    def svc(name: str) -> ServiceStatus:
        s = services.get(name)
        if s is None:
            s = services[name] = ServiceStatus(name=name, family=fam)
        return s

    for m, ep_map, np in ((r.SVC, "e", False), (r.NODEPORTS, "n", True), (r.NO_EP, "", False),
                          (r.NO_EP_NP, "", True)):
        for pair in maps.get(m, []):
            key = flat(pair[0])
            comment = comment_of(pair[0])
            name, _, kind = comment.rpartition(" ")
            if not name:
                name, kind = f"(unnamed {_join(key)})", "NodePort" if np else "Service"
            s = svc(name)
            k = _join(key)
            addr = f"*:{key[1]}" if np else _addr(str(key[0]), key[2])
            proto = str(key[0] if np else key[1]).upper()
            if not any(fe.address == addr and fe.protocol == proto for fe in s.frontends):
                s.frontends.append(FrontendStatus(kind, addr, proto))
            if not ep_map:
                verdict = flat(pair[1])[0]
                why = "REJECT (no endpoints)" if isinstance(verdict, tuple) and verdict[0] == "goto" \
                    else "DROP (no endpoints for its traffic policy)"
                s.notes.append(f"{kind} {addr}: {why}")
                continue
            target = flat(pair[1])[0]
            chain = target[1] if isinstance(target, tuple) else ""
            parsed = r.parse_sel_chain(chain)
            slots = backends.get((ep_map, k), {})
            if parsed is not None and parsed[2]:
                s.affinity_seconds = parsed[2]
            if parsed is not None and parsed[0] in ("l", "nl"):
                s.notes.append(f"{kind} {addr}: external traffic to local endpoints only (Local policy)")
            if kind != "ClusterIP" and s.backends:
                continue
            if kind == "ClusterIP" or not s.backends:
                n = len(slots)
                s.backends = [BackendStatus(a, 1.0 / n if n else None) for _, a in sorted(slots.items())]
    return sorted(services.values(), key=lambda s: s.name)
