"""The nftables data plane: flat verdict maps in ``ip kproxy`` / ``ip6 kproxy``, synced with ``nft -f``.

A full sync (start, failure recovery, periodic) rewrites the whole table in one transaction: it flushes
every Service-derived set and map and re-adds their elements, rewrites the fixed chains, creates the
shared selection chains in use and deletes the unused ones. Existing connections are untouched (NAT is
decided once per connection) and the per-slot affinity sets filled by the packet path are kept.

A partial sync re-renders only the changed service ports, diffs their elements against what was
committed (kept in memory, see :mod:`.state`) and sends exactly the changed elements — plus any new
selection chain — in one transaction. Nothing outside the ``kproxy`` tables is ever touched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from ...config import ProxyConfig
from ...snapshot import Changes, ProxySnapshot
from .. import DataPlane, ServiceStatus, SetupError, SyncError, SyncResult
from . import nft
from . import render as r
from .state import Delta, ElementIndex
from .status import read_status

log = logging.getLogger(__name__)

CHUNK = 20000  # elements per "add element" statement


class NftablesDataPlane(DataPlane):
    mode = "nftables"

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.families: list[int] = []
        self.index: dict[int, ElementIndex] = {4: ElementIndex(), 6: ElementIndex()}
        self.kernel_chains: dict[int, set[str]] = {4: set(), 6: set()}
        self.kernel_sets: dict[int, set[str]] = {4: set(), 6: set()}
        self.ctx: dict[int, r.Context | None] = {4: None, 6: None}
        self._need_full = True
        self.last_script_bytes = 0
        self.last_elements = 0

    # ---- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        nft.available()
        self.families = []
        for fam in (4, 6):
            try:
                self._ensure_skeleton(fam)
            except SyncError as e:
                if fam == 6:
                    log.warning("nftables: IPv6 disabled: %s", e)
                    continue
                raise SetupError(f"cannot program nftables: {e}") from None
            self.families.append(fam)
        if self.config.localhost_nodeports and not self.config.nodeport_addresses:
            try:
                with open("/proc/sys/net/ipv4/conf/all/route_localnet", "w") as f:
                    f.write("1")
            except OSError as e:
                log.warning("cannot enable route_localnet (localhost NodePorts will not work): %s", e)

    def _skeleton(self, fam: int) -> list[str]:
        f = r.nft_family(fam)
        t = f"{f} {r.TABLE}"
        lines = [f"add table {t}", *r.set_declarations(fam)]
        for chain, hook in r.BASE_CHAINS:
            lines.append(f"add chain {t} {chain}" + (f" {{ {hook} }}" if hook else ""))
        return lines

    def _ensure_skeleton(self, fam: int) -> None:
        """Create the table, sets and fixed chains if missing; adopt what a previous run left."""
        try:
            nft.apply("\n".join(self._skeleton(fam)) + "\n")
        except SyncError as e:
            # an incompatible table (e.g. from another kproxy version): replace it
            log.warning("nftables: recreating table %s %s: %s", r.nft_family(fam), r.TABLE, e)
            f = r.nft_family(fam)
            nft.apply(f"add table {f} {r.TABLE}\ndelete table {f} {r.TABLE}\n" + "\n".join(self._skeleton(fam)) + "\n")

    # ---- sync -----------------------------------------------------------------------------------
    def _context(self, snapshot: ProxySnapshot, fam: int) -> r.Context:
        c = self.config
        node = snapshot.node
        local, not_local = r.local_matches(c.detect_local_mode, fam, c.cluster_cidrs,
                                           node.pod_cidrs if node else (), c.pod_bridge_interface,
                                           c.pod_interface_name_prefix)
        return r.Context(fam, 1 << c.masquerade_bit, c.masquerade_all, local, not_local,
                         node.zone if node else "", c.nodeport_addresses, c.localhost_nodeports)

    def sync(self, snapshot: ProxySnapshot, changes: Changes, full: bool) -> SyncResult:
        if not self.families:
            self.setup()
        full = full or self._need_full
        result = SyncResult(full=full)
        elements = 0
        for fam in self.families:
            ctx = self._context(snapshot, fam)
            fam_full = full or ctx != self.ctx[fam]
            t0 = time.perf_counter()
            try:
                if fam_full:
                    script, index, live, n = self._render_full(snapshot, ctx)
                else:
                    script, index, live, n = self._render_partial(snapshot, changes, ctx)
            except SyncError:
                self._need_full = True
                raise
            t1 = time.perf_counter()
            if script:
                try:
                    nft.apply(script)
                except SyncError:
                    self._need_full = True
                    raise
            t2 = time.perf_counter()
            self.index[fam] = index
            self.kernel_chains[fam], self.kernel_sets[fam] = live
            self.ctx[fam] = ctx
            self.last_script_bytes = len(script)
            elements += n
            result.render_seconds += t1 - t0
            result.apply_seconds += t2 - t1
            result.extra[f"nft_ipv{fam}_seconds"] = t2 - t1
        self._need_full = False
        self.last_elements = elements
        result.rules = elements
        result.services = len(snapshot.services) if full else len(changes.changed) + len(changes.removed)
        return result

    def _render_full(self, snapshot: ProxySnapshot, ctx: r.Context
                     ) -> tuple[str, ElementIndex, tuple[set[str], set[str]], int]:
        fam = ctx.family
        t = f"{ctx.f} {r.TABLE}"
        index = ElementIndex()
        eps = snapshot.endpoints
        for spn, sp in snapshot.services.items():
            index.load(spn, r.render_service(sp, eps.get(spn, ()), ctx))
        chains, sets = index.live_chains(), index.live_sets()
        lines = self._skeleton(fam)
        lines.extend(r.dynamic_set_declaration(s, fam) for s in sorted(sets))
        for s in (*r.DATA_SETS, *sorted(sets)):
            if s.startswith("aff-"):
                continue  # affinity memory of the packet path survives a resync
            lines.append(f"flush {'set' if s in _SETS else 'map'} {t} {s}")
        for chain, rules in r.static_rules(ctx).items():
            lines.append(f"flush chain {t} {chain}")
            lines.extend(f"add rule {t} {chain} {rule}" for rule in rules)
        for chain in sorted(chains, key=_slot_first):
            lines.append(f"add chain {t} {chain}")
            lines.append(f"flush chain {t} {chain}")
            lines.extend(f"add rule {t} {chain} {rule}" for rule in r.chain_rules(chain, ctx))
        n = 0
        for s, elems in index.current.items():
            n += len(elems)
            _add_elements(lines, t, s, ((k, v[1]) for k, v in elems.items()), len(elems))
        old_chains, old_sets = self._kernel_dynamic(fam)
        stale_chains = old_chains - chains
        for chain in sorted(stale_chains):
            lines.append(f"flush chain {t} {chain}")
        for chain in sorted(stale_chains):
            lines.append(f"delete chain {t} {chain}")
        for s in sorted(old_sets - sets):
            lines.append(f"delete {'set' if s.startswith('aff-') else 'map'} {t} {s}")
        return "\n".join(lines) + "\n", index, (chains, sets), n

    def _render_partial(self, snapshot: ProxySnapshot, changes: Changes, ctx: r.Context
                        ) -> tuple[str, ElementIndex, tuple[set[str], set[str]], int]:
        fam = ctx.family
        t = f"{ctx.f} {r.TABLE}"
        index = self.index[fam]
        delta = Delta()
        for spn in sorted(changes.changed | changes.removed):
            sp = snapshot.services.get(spn)
            new = r.render_service(sp, snapshot.endpoints.get(spn, ()), ctx) if sp is not None else None
            index.replace(spn, new if new is not None and (new.elements or new.chains) else None, delta)
        chains, sets = index.live_chains(), index.live_sets()
        old_chains, old_sets = self.kernel_chains[fam], self.kernel_sets[fam]
        lines: list[str] = [r.dynamic_set_declaration(s, fam) for s in sorted(sets - old_sets)]
        for chain in sorted(chains - old_chains, key=_slot_first):
            lines.append(f"add chain {t} {chain}")
            lines.extend(f"add rule {t} {chain} {rule}" for rule in r.chain_rules(chain, ctx))
        n = 0
        for s, keys in delta.deletes.items():
            if s in old_sets - sets:
                continue  # the whole map goes
            n += len(keys)
            items = list(keys)
            for i in range(0, len(items), CHUNK):
                lines.append(f"delete element {t} {s} {{ {', '.join(items[i:i + CHUNK])} }}")
        for s, adds in delta.adds.items():
            n += len(adds)
            _add_elements(lines, t, s, adds.items(), len(adds))
        stale_chains = old_chains - chains
        for chain in sorted(stale_chains):
            lines.append(f"flush chain {t} {chain}")
        for chain in sorted(stale_chains):
            lines.append(f"delete chain {t} {chain}")
        for s in sorted(old_sets - sets):
            lines.append(f"delete {'set' if s.startswith('aff-') else 'map'} {t} {s}")
        return ("\n".join(lines) + "\n") if lines else "", index, (chains, sets), n

    def _kernel_dynamic(self, fam: int) -> tuple[set[str], set[str]]:
        """Selection/slot chains and per-slot sets in the kernel table (lists names only, no elements)."""
        f = r.nft_family(fam)
        chains, sets = set(), set()
        for obj in nft.list_json("chains", f, terse=True):
            ch = obj.get("chain")
            if ch and ch.get("table") == r.TABLE and r.is_dynamic_chain(ch.get("name", "")):
                chains.add(ch["name"])
        for what in ("sets", "maps"):
            for obj in nft.list_json(what, f, terse=True):
                st = obj.get("set") or obj.get("map")
                if st and st.get("table") == r.TABLE and r.is_dynamic_set(st.get("name", "")):
                    sets.add(st["name"])
        return chains, sets

    # ---- cleanup and status ---------------------------------------------------------------------
    def cleanup(self) -> bool:
        found = False
        for fam in (4, 6):
            f = r.nft_family(fam)
            try:
                if not nft.list_json("table", f, r.TABLE):
                    continue
                nft.apply(f"delete table {f} {r.TABLE}\n")
                found = True
            except SyncError as e:
                log.warning("nftables cleanup of %s %s failed: %s", f, r.TABLE, e)
                raise
            except SetupError:
                return found
        self.index = {4: ElementIndex(), 6: ElementIndex()}
        self.kernel_chains = {4: set(), 6: set()}
        self.kernel_sets = {4: set(), 6: set()}
        self.ctx = {4: None, 6: None}
        self._need_full = True
        return found

    def status(self) -> list[ServiceStatus]:
        nft.available()
        out: list[ServiceStatus] = []
        for fam in (4, 6):
            out.extend(read_status(nft.list_json("table", r.nft_family(fam), r.TABLE), fam))
        return out


_SETS = (r.FW_IPS, r.FW_ALLOW, r.HAIRPIN)


def _slot_first(chain: str) -> tuple[int, str]:
    """Slot chains before the selection chains that jump to them."""
    return (0 if r.parse_slot_chain(chain) is not None else 1, chain)


def _add_elements(lines: list[str], t: str, s: str, items: Iterable[tuple[str, str]], count: int) -> None:
    if not count:
        return
    chunk: list[str] = []
    for k, v in items:
        chunk.append(k + v)
        if len(chunk) >= CHUNK:
            lines.append(f"add element {t} {s} {{ " + ",\n".join(chunk) + " }")
            chunk = []
    if chunk:
        lines.append(f"add element {t} {s} {{ " + ",\n".join(chunk) + " }")
