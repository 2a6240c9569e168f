"""What kproxy has committed to one family's table, kept in memory so a sync never lists the kernel.

Every service port *claims* elements; a key claimed by several service ports (a shared hairpin entry,
or an invalid duplicate VIP:port) stays in the kernel while any claim remains, with the value of the
first claimant. :meth:`ElementIndex.replace` swaps one service port's claims and records which keys
changed, so a partial sync sends exactly the changed elements.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ...snapshot import ServicePortName
from .render import DATA_SETS, ServiceElements

Owner = ServicePortName


@dataclass(slots=True)
class Delta:
    """Element operations of one transaction, per set: deletes (keys) and adds (key → tail)."""

    deletes: dict[str, set[str]] = field(default_factory=dict)
    adds: dict[str, dict[str, str]] = field(default_factory=dict)

    def count(self) -> int:
        return sum(map(len, self.deletes.values())) + sum(map(len, self.adds.values()))


class ElementIndex:
    def __init__(self) -> None:
        self.by_owner: dict[Owner, ServiceElements] = {}
        # set → key → (owner, tail) of the claim in force; extra claims live in ``shadow``
        self.current: dict[str, dict[str, tuple[Owner, str]]] = {s: {} for s in DATA_SETS}
        self.shadow: dict[tuple[str, str], dict[Owner, str]] = {}
        self.chains: Counter[str] = Counter()
        self.sets: Counter[str] = Counter()

    def snapshot_sets(self) -> dict[str, dict[str, str]]:
        return {s: {k: v[1] for k, v in d.items()} for s, d in self.current.items()}

    def replace(self, owner: Owner, new: ServiceElements | None, delta: Delta) -> None:
        """Swap ``owner``'s claims for ``new`` (None = drop them) and record kernel changes in ``delta``."""
        old = self.by_owner.pop(owner, None)
        if old is not None and new is not None and old.elements == new.elements:
            self.by_owner[owner] = new
            self.chains.update(new.chains)
            self.chains.subtract(old.chains)
            self.sets.update(new.sets)
            self.sets.subtract(old.sets)
            return
        touched: dict[str, dict[str, str | None]] = {}  # set → key → kernel tail before (None = absent)
        if old is not None:
            for s, elems in old.elements.items():
                cur = self.current.setdefault(s, {})
                t = touched.setdefault(s, {})
                for k in elems:
                    if k not in t:
                        c = cur.get(k)
                        t[k] = c[1] if c is not None else None
                    self._unclaim(s, k, owner)
            self.chains.subtract(old.chains)
            self.sets.subtract(old.sets)
        if new is not None:
            self.by_owner[owner] = new
            for s, elems in new.elements.items():
                cur = self.current.setdefault(s, {})
                t = touched.setdefault(s, {})
                for k, v in elems.items():
                    if k not in t:
                        c = cur.get(k)
                        t[k] = c[1] if c is not None else None
                    self._claim(s, k, owner, v)
            self.chains.update(new.chains)
            self.sets.update(new.sets)
        for s, keys in touched.items():
            cur = self.current[s]
            for k, before in keys.items():
                c = cur.get(k)
                after = c[1] if c is not None else None
                if before == after:
                    continue
                if before is not None:
                    delta.deletes.setdefault(s, set()).add(k)
                if after is not None:
                    delta.adds.setdefault(s, {})[k] = after

    def load(self, owner: Owner, new: ServiceElements) -> None:
        """Claim ``new`` for an owner not yet in the index (full syncs build a fresh index this way)."""
        self.by_owner[owner] = new
        for s, elems in new.elements.items():
            cur = self.current.setdefault(s, {})
            for k, v in elems.items():
                if k in cur and cur[k][0] != owner:
                    self.shadow.setdefault((s, k), {})[owner] = v
                else:
                    cur[k] = (owner, v)
        self.chains.update(new.chains)
        self.sets.update(new.sets)

    def _claim(self, s: str, k: str, owner: Owner, v: str) -> None:
        cur = self.current[s]
        c = cur.get(k)
        if c is None or c[0] == owner:
            cur[k] = (owner, v)
        else:
            self.shadow.setdefault((s, k), {})[owner] = v

    def _unclaim(self, s: str, k: str, owner: Owner) -> None:
        cur = self.current[s]
        c = cur.get(k)
        sh = self.shadow.get((s, k))
        if c is not None and c[0] == owner:
            if sh:
                nxt = min(sh)
                cur[k] = (nxt, sh.pop(nxt))
                if not sh:
                    del self.shadow[(s, k)]
            else:
                del cur[k]
        elif sh is not None:
            sh.pop(owner, None)
            if not sh:
                del self.shadow[(s, k)]

    def live_chains(self) -> set[str]:
        return {c for c, n in self.chains.items() if n > 0}

    def live_sets(self) -> set[str]:
        return {c for c, n in self.sets.items() if n > 0}
