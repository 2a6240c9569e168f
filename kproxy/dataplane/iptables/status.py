"""Read kproxy's iptables state back from ``iptables-save`` output, by service port.

Follows the chains the kernel actually holds: dispatch rule (VIP or NodePort, named by its comment)
→ EXT/FW → SVC/SVL → SEP → DNAT target, turning the chained ``statistic`` probabilities into each
endpoint's effective share.
"""

from __future__ import annotations

import shlex

from .. import BackendStatus, FrontendStatus, ServiceStatus
from . import render as r


def _parse(save: str) -> dict[str, list[list[str]]]:
    chains: dict[str, list[list[str]]] = {}
    for line in save.splitlines():
        if line.startswith(":"):
            chains.setdefault(line[1:].split(" ", 1)[0], [])
        elif line.startswith("-A "):
            parts = shlex.split(line)
            chains.setdefault(parts[1], []).append(parts[2:])
    return chains


def _opt(rule: list[str], name: str) -> str:
    try:
        return rule[rule.index(name) + 1]
    except (ValueError, IndexError):
        return ""


def _backends(chains: dict[str, list[list[str]]], chain: str, depth: int = 0
              ) -> tuple[list[BackendStatus], int]:
    """Endpoints reachable from a selection chain with effective probabilities, and affinity seconds."""
    if depth > 4:
        return [], 0
    remaining = 1.0
    out: list[BackendStatus] = []
    affinity = 0
    for rule in chains.get(chain, []):
        target = _opt(rule, "-j")
        if "--rcheck" in rule:
            affinity = int(_opt(rule, "--seconds") or 0)
            continue
        if target == r.MARK_MASQ or not target.startswith(r.PREFIX):
            continue
        if target.startswith("KPROXY-SEP-"):
            p = float(_opt(rule, "--probability") or 1.0)
            share = remaining * p
            remaining -= share
            for sep_rule in chains.get(target, []):
                dest = _opt(sep_rule, "--to-destination")
                if dest:
                    # endpoints selected from a KPROXY-SVL chain are this node's (Local traffic policies)
                    out.append(BackendStatus(dest, round(share, 4), local=chain.startswith("KPROXY-SVL-")))
        elif target.startswith(("KPROXY-SVC-", "KPROXY-SVL-", "KPROXY-EXT-", "KPROXY-FW-")):
            if "--src-type" in rule or "-s" in rule:
                continue  # short-circuits for pod / node traffic; the final jump is the one that counts
            sub, aff = _backends(chains, target, depth + 1)
            out.extend(sub)
            affinity = affinity or aff
            break
    return out, affinity


def read_status(nat_save: str, filter_save: str, family: int) -> list[ServiceStatus]:
    nat = _parse(nat_save)
    flt = _parse(filter_save)
    by_name: dict[str, ServiceStatus] = {}

    def entry(rule: list[str]) -> ServiceStatus:
        comment = _opt(rule, "--comment")
        name = comment.split(" ", 1)[0] if comment else "?"
        st = by_name.get(name)
        if st is None:
            st = by_name[name] = ServiceStatus(name=name, family=family)
        return st

    kinds = {"cluster": "ClusterIP", "external": "ExternalIP", "loadbalancer": "LoadBalancer", "node": "NodePort"}
    for chain in (r.SERVICES, r.NODEPORTS):
        for rule in nat.get(chain, []):
            st = entry(rule)
            comment = _opt(rule, "--comment")
            kind = kinds.get(comment.split(" ", 2)[1] if " " in comment else "", "ClusterIP")
            dest = _opt(rule, "-d").rsplit("/", 1)[0]
            port = _opt(rule, "--dport")
            proto = _opt(rule, "-p").upper()
            addr = f"[{dest}]:{port}" if ":" in dest else (f"{dest}:{port}" if dest else f"*:{port}")
            st.frontends.append(FrontendStatus(kind, addr, proto))
            if not st.backends:
                st.backends, st.affinity_seconds = _backends(nat, _opt(rule, "-j"))
    for chain in (r.SERVICES, r.EXTERNAL_SERVICES):
        for rule in flt.get(chain, []):
            st = entry(rule)
            comment = _opt(rule, "--comment")
            dest = _opt(rule, "-d").rsplit("/", 1)[0] or "*"
            if chain == r.SERVICES and not st.frontends:  # a Service without endpoints: show its VIP anyway
                port = _opt(rule, "--dport")
                addr = f"[{dest}]:{port}" if ":" in dest else f"{dest}:{port}"
                st.frontends.append(FrontendStatus("ClusterIP", addr, _opt(rule, "-p").upper()))
            st.notes.append(f"{dest}:{_opt(rule, '--dport')} {comment.split(' ', 1)[1] if ' ' in comment else ''}"
                            f" → {_opt(rule, '-j')}")
    return sorted(by_name.values(), key=lambda s: s.name)
