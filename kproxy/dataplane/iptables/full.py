"""The full ruleset of one IP family as ``iptables-restore --noflush`` input, produced in chunks.

A full sync streams these chunks into a running iptables-restore (see :mod:`.stream`), so the
layout is chosen for a parser that sees the input before it is complete: every chain is declared
before the first rule that jumps to it, and each chunk of service chains is declared right before its
rules::

    *nat
    :<dispatch chains>            flushed first: static chains jump to them, their rules come last
    :<static chain> + its rules
    :<service chains> <rules>     per chunk of ~4,000 rules, service ports in snapshot order
    <dispatch rules>              every service chain they jump to exists by now
    :<stale chain> ... -X <stale chain>
    COMMIT
    *filter                       (the same, without service chains)
    COMMIT

Declarations grouped per chunk, not each just before its own rules nor all at the top, and sorted by
name within the chunk: both restore programs insert every new chain into a name-ordered list, and
hash-named chains in random order make that walk long. Measured here (iptables 1.8.9, CPU of the
restore alone): iptables-nft-restore needs ~9.5 s for the 1,000 × 10 ruleset with each declaration next
to its rules, ~8 s with all declarations first (unsorted), ~4.0 s in unsorted chunks and ~2.6 s in
sorted chunks (~1.7 s with one globally sorted block, which streaming cannot have); the legacy one
4.1–5.2 s instead of 6.4 s at 10,000 × 10 (no change at 1,000).

The nat table comes first because it is where the bulk of the rules is; the filter table's rules are
collected while nat is rendered. Everything the last chunk needs, including the kernel's chain list
(to delete stale chains), is computed before that chunk is yielded: once the nat ``COMMIT`` is
written nothing in Python can fail half way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from ...snapshot import EndpointInfo, ServicePort, ServicePortName
from . import render as r

CHUNK_LINES = 4096  # ~300 KB of restore input per write


@dataclass(slots=True)
class FullOutcome:
    """What the proxier keeps once the restore of a full ruleset succeeded."""

    rendered: dict[ServicePortName, r.RenderedSummary] = field(default_factory=dict)
    chains: dict[str, set[str]] = field(default_factory=dict)  # kproxy chains in the kernel afterwards
    rules: int = 0


def full_restore_input(services: Mapping[ServicePortName, ServicePort],
                       endpoints: Mapping[ServicePortName, tuple[EndpointInfo, ...]], ctx: r.RenderContext,
                       static: dict[tuple[str, str], list[str]],
                       kernel_chains: Callable[[], dict[str, set[str]]], out: FullOutcome) -> Iterator[str]:
    """Yield the restore input (see the module docstring) and fill ``out`` along the way.

    ``static`` is :func:`render.static_chains` for this family; ``kernel_chains`` returns the chain
    names the kernel holds per table now (called once, just before the last chunk).
    """
    dispatch: dict[tuple[str, str], list[str]] = {k: [] for k in r.DISPATCH}
    declared: dict[str, set[str]] = {r.NAT: set(), r.FILTER: set()}
    lines = ["*nat", *_head(r.NAT, static, declared), ""]
    yield "\n".join(lines)  # at once: the restore takes the lock and reads the table while we render
    nat_names = declared[r.NAT]
    rendered = out.rendered
    summary = r.RenderedSummary.of
    render = r.render_service
    eps_get = endpoints.get
    decls: list[str] = []  # this chunk's chain declarations, written before its rules (see above)
    body: list[str] = []
    rules = 0
    for spn, sp in services.items():
        sr = render(sp, eps_get(spn, ()), ctx)
        s = rendered[spn] = summary(sr)
        rules += s.nat_rules + s.filter_rules
        for chain, chain_rules in sr.chains.items():
            decls.append(f":{chain} - [0:0]")
            body.extend(chain_rules)
            nat_names.add(chain)
        for key, dispatch_rules in sr.dispatch.items():
            dispatch[key].extend(dispatch_rules)
        if len(body) >= CHUNK_LINES:
            decls.sort()  # see the module docstring
            decls.extend(body)
            decls.append("")
            yield "\n".join(decls)
            decls = []
            body = []
    decls.sort()
    lines = decls + body
    kernel = kernel_chains()
    for table in (r.NAT, r.FILTER):
        if table == r.FILTER:
            lines += ["COMMIT", "*filter", *_head(r.FILTER, static, declared)]
        for (t, _chain), chain_rules in dispatch.items():
            if t == table:
                lines += chain_rules
        stale = sorted(c for c in kernel.get(table, ()) if c.startswith(r.PREFIX) and c not in declared[table])
        lines += [f":{c} - [0:0]" for c in stale]  # flushed before any is deleted: they may refer to each other
        lines += [f"-X {c}" for c in stale]
    lines += ["COMMIT", ""]
    out.rules = rules + sum(map(len, static.values()))
    out.chains = declared
    yield "\n".join(lines)


def _head(table: str, static: dict[tuple[str, str], list[str]], declared: dict[str, set[str]]) -> list[str]:
    """The dispatch chains' declarations, then the static chains with their rules, of ``table``."""
    lines: list[str] = []
    for t, chain in r.DISPATCH:
        if t == table:
            lines.append(f":{chain} - [0:0]")
            declared[table].add(chain)
    for (t, chain), chain_rules in static.items():
        if t == table:
            lines.append(f":{chain} - [0:0]")
            lines += chain_rules
            declared[table].add(chain)
    return lines
