"""What kproxy has committed to one family's table, kept in memory so a sync never lists the kernel.

Every service port *claims* elements. Keys of the shared sets (``hairpin``: one pod IP serves several
service ports) are reference-counted. In the maps a key normally has one claimant (a frontend belongs to
one service port); an invalid duplicate (two Services on the same VIP:port) is tracked in ``shadow``: the
element stays while any claim remains, with the value of the lowest-named claimant.

:meth:`ElementIndex.load` bulk-claims at C speed (full syncs); :meth:`ElementIndex.replace` swaps one
service port's claims and records exactly which elements changed (partial syncs).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ...snapshot import ServicePortName
from .render import DATA_SETS, HAIRPIN, ServiceElements

Owner = ServicePortName
REFCOUNTED = frozenset({HAIRPIN})


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
        self.current: dict[str, dict[str, str]] = {s: {} for s in DATA_SETS}  # what the kernel holds
        self.refs: dict[str, Counter[str]] = {s: Counter() for s in REFCOUNTED}
        self.shadow: dict[tuple[str, str], dict[Owner, str]] = {}  # every claim of a contested map key
        self.chains: Counter[str] = Counter()
        self.sets: Counter[str] = Counter()
        # holder of every key of a set that saw a collision during bulk loading (built on demand)
        self._rev: dict[str, dict[str, Owner]] = {}
        # (chains, sets) of the service ports loaded since the last end_load → how many share them
        self._shapes: dict[tuple[frozenset[str], frozenset[str]], int] = {}

    # ---- bulk ------------------------------------------------------------------------------------
    def load(self, owner: Owner, new: ServiceElements) -> None:
        """Claim ``new`` for an owner not yet in the index (full syncs build a fresh index this way).

        Call :meth:`end_load` after the last one. The hot path (every key new to its set) is one
        ``isdisjoint`` and one ``update`` per set; chains and sets are counted per distinct frozenset.
        """
        self.by_owner[owner] = new
        current, revs = self.current, self._rev
        for s, elems in new.elements.items():
            cur = current.get(s)
            if cur is None:
                cur = current[s] = {}
            if s in REFCOUNTED:
                cur.update(elems)
                self.refs[s].update(elems.keys())
            elif s not in revs and cur.keys().isdisjoint(elems):
                cur.update(elems)
            else:
                self._load_contested(owner, s, cur, elems)
        shapes = self._shapes
        if new.chains or new.sets:
            shape = (new.chains, new.sets)
            shapes[shape] = shapes.get(shape, 0) + 1

    def _load_contested(self, owner: Owner, s: str, cur: dict[str, str], elems: dict[str, str]) -> None:
        """Load one set's elements once some key of a set was claimed twice (a duplicate frontend)."""
        rev = self._rev.get(s)
        if cur.keys().isdisjoint(elems):
            cur.update(elems)
            if rev is not None:
                rev.update(dict.fromkeys(elems, owner))
            return
        if rev is None:
            rev = self._rev[s] = {}
            for o, se in self.by_owner.items():
                if o != owner:
                    rev.update(dict.fromkeys(se.elements.get(s, ()), o))
        for k, v in elems.items():
            first = rev.get(k)
            if first is None or first == owner:
                cur[k] = v  # not contested (the holder map knows every key of this set)
            else:
                self._claim(s, k, owner, v, first)
            rev.setdefault(k, owner)

    def end_load(self) -> None:
        self._rev.clear()
        for (chains, sets), n in self._shapes.items():
            for c in chains:
                self.chains[c] += n
            for c in sets:
                self.sets[c] += n
        self._shapes.clear()

    # ---- incremental ---------------------------------------------------------------------------------
    def replace(self, owner: Owner, new: ServiceElements | None, delta: Delta) -> None:
        """Swap ``owner``'s claims for ``new`` (None = drop them) and record kernel changes in ``delta``."""
        old = self.by_owner.pop(owner, None)
        if new is not None:
            self.by_owner[owner] = new
            self.chains.update(new.chains)
            self.sets.update(new.sets)
        if old is not None:
            self.chains.subtract(old.chains)
            self.sets.subtract(old.sets)
        if old is not None and new is not None and old.elements == new.elements:
            return
        old_e = old.elements if old is not None else {}
        new_e = new.elements if new is not None else {}
        for s in old_e.keys() | new_e.keys():
            before = old_e.get(s, {})
            after = new_e.get(s, {})
            cur = self.current.get(s)
            if cur is None:
                cur = self.current[s] = {}
            for k in before.keys() | after.keys():
                prev = cur.get(k)
                if k in before:
                    self._unclaim(s, k, owner)
                if k in after:
                    self._claim(s, k, owner, after[k])
                now = cur.get(k)
                if prev == now:
                    continue
                if prev is not None:
                    delta.deletes.setdefault(s, set()).add(k)
                if now is not None:
                    delta.adds.setdefault(s, {})[k] = now

    def _first_claimant(self, s: str, k: str, owner: Owner) -> Owner | None:
        """Another holder of a map key that has no shadow entry yet (rare: a duplicate frontend)."""
        for o, se in self.by_owner.items():
            if o != owner and k in se.elements.get(s, ()):
                return o
        return None

    def _claim(self, s: str, k: str, owner: Owner, v: str, first: Owner | None = None) -> None:
        cur = self.current[s]
        if s in REFCOUNTED:
            self.refs[s][k] += 1
            cur[k] = v
            return
        sh = self.shadow.get((s, k))
        if sh is not None:
            sh[owner] = v
            cur[k] = sh[min(sh)]
            return
        if k not in cur:
            cur[k] = v
            return
        if first is None or first == owner:
            first = self._first_claimant(s, k, owner)
        if first is None:
            cur[k] = v
            return
        sh = self.shadow[(s, k)] = {first: cur[k], owner: v}
        cur[k] = sh[min(sh)]

    def _unclaim(self, s: str, k: str, owner: Owner) -> None:
        cur = self.current[s]
        if s in REFCOUNTED:
            refs = self.refs[s]
            refs[k] -= 1
            if refs[k] <= 0:
                del refs[k]
                cur.pop(k, None)
            return
        sh = self.shadow.get((s, k))
        if sh is None:
            cur.pop(k, None)
            return
        sh.pop(owner, None)
        if len(sh) <= 1:
            del self.shadow[(s, k)]
        if sh:
            cur[k] = sh[min(sh)]
        else:
            cur.pop(k, None)

    def live_chains(self) -> set[str]:
        return {c for c, n in self.chains.items() if n > 0}

    def live_sets(self) -> set[str]:
        return {c for c, n in self.sets.items() if n > 0}
