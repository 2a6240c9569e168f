"""``kproxy status``: read every data plane's kernel state back and format it by Service."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from . import dataplane
from .config import ProxyConfig

log = logging.getLogger(__name__)


def collect(cfg: ProxyConfig, modes: list[str], explicit: bool = False) -> dict[str, list[dict[str, Any]]]:
    """{mode: [service status as dict]} for every mode that holds state (or the one asked for)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for mode in modes:
        try:
            dp = dataplane.load(mode, cfg)
            services = dp.status()
        except (dataplane.SetupError, dataplane.SyncError, ImportError, OSError) as e:
            if explicit:
                raise dataplane.SetupError(f"{mode}: {e}") from None
            log.debug("status of %s unavailable: %s", mode, e)
            continue
        if services or explicit:
            out[mode] = [dataclasses.asdict(s) for s in services]
    return out


def format_table(results: dict[str, list[dict[str, Any]]]) -> str:
    if not results:
        return "no kproxy state found in this network namespace"
    lines: list[str] = []
    for mode, services in results.items():
        lines.append(f"== {mode} mode: {len(services)} service port(s)")
        for s in services:
            aff = f"  affinity ClientIP {s['affinity_seconds']}s" if s.get("affinity_seconds") else ""
            lines.append(f"{s['name']}  (IPv{s['family']}){aff}")
            for fe in s["frontends"]:
                lines.append(f"    {fe['kind']:<12} {fe['address']:<28} {fe['protocol']}")
            if not s["backends"]:
                lines.append("    (no backends)")
            for be in s["backends"]:
                w = be.get("weight")
                share = f"{w * 100:5.1f}%" if isinstance(w, float) and w <= 1 else (f"weight {w}" if w is not None
                                                                                    else "")
                lines.append(f"    -> {be['address']:<28} {share}{'  local' if be.get('local') else ''}")
            for note in s.get("notes", []):
                lines.append(f"    ! {note}")
    return "\n".join(lines)
