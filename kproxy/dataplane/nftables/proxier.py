"""The nftables data plane: flat verdict maps in ``ip kproxy`` / ``ip6 kproxy`` (layout in render.py).

Rules and chains are few and fixed (one selection chain per distinct endpoint count, not per Service);
Services are map elements. A sync is at most three steps, each leaving a working ruleset:

1. ``nft -f``: new chains and maps (additive; on a full sync also the fixed chains rewritten);
2. ONE nfnetlink transaction (:mod:`.netlink`) with every element change of both families — on a full
   sync: flush every Service-derived map and re-add everything, atomically;
3. ``nft -f``: delete the chains and maps nothing references any more.

A full sync runs on start, after a failure and on the periodic resync. Existing connections are
untouched (NAT is decided once per connection) and the affinity sets the packet path fills are kept.
A partial sync re-renders only the changed service ports, diffs their elements against what was
committed (kept in memory, see :mod:`.state`: the kernel is listed only when its state is unknown) and
sends exactly the changed elements. Nothing outside the ``kproxy`` tables is ever touched.
``KPROXY_NFT_NETLINK=0`` sends everything through one ``nft -f`` instead (same result, ~2.5× the CPU at 10k Services).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from ...config import ProxyConfig
from ...snapshot import Changes, EndpointInfo, ProxySnapshot, ServicePort, ServicePortName
from .. import DataPlane, ServiceStatus, SetupError, SyncError, SyncResult, enable_localhost_nodeports
from . import netlink, nft
from . import render as r
from .state import Delta, ElementIndex
from .status import read_status

log = logging.getLogger(__name__)

CHUNK = 20000  # elements per "add element" statement


class NftablesDataPlane(DataPlane):
    mode = "nftables"

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        # a full resync costs well under a second even at 10k Services here: do one every syncPeriod
        self.full_resync_period = config.sync_period
        self.families: list[int] = []
        self.index: dict[int, ElementIndex] = {4: ElementIndex(), 6: ElementIndex()}
        self.kernel_chains: dict[int, set[str]] = {4: set(), 6: set()}
        self.kernel_sets: dict[int, set[str]] = {4: set(), 6: set()}
        self._known = {4: False, 6: False}  # kernel_chains/kernel_sets reflect the kernel (after a good sync)
        # the (ServicePort, endpoints) objects each service port was last rendered from, per family
        self._rendered_from: dict[int, dict[ServicePortName, tuple[ServicePort, tuple[EndpointInfo, ...]]]] = {
            4: {}, 6: {}}
        self.ctx: dict[int, r.Context | None] = {4: None, 6: None}
        self._need_full = True
        self.last_elements = 0
        # family → (internal, external): service ports with a Local policy and no local endpoints (metrics)
        self.no_local_endpoints: dict[int, tuple[int, int]] = {}
        # element transactions over raw nfnetlink (fast); KPROXY_NFT_NETLINK=0 sends everything through nft -f
        self.use_netlink = os.environ.get("KPROXY_NFT_NETLINK", "1") != "0"
        # benchmarks: keep the last netlink sync's encoded transaction and its nft structure script
        self.keep_transaction = False
        self.last_transaction: tuple[list[netlink.Batch], str, dict[int, Plan]] | None = None

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
        enable_localhost_nodeports(self.config)

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
        t0 = time.perf_counter()
        plans: dict[int, Plan] = {}
        ctxs: dict[int, r.Context] = {}
        # A full sync allocates a few hundred thousand small objects that all stay alive: the cyclic GC
        # would rescan them repeatedly for nothing (~25 % of the CPU time at 10k Services).
        gc_was_enabled = gc.isenabled()
        if full:
            gc.disable()
        try:
            for fam in self.families:
                ctx = ctxs[fam] = self._context(snapshot, fam)
                if full or ctx != self.ctx[fam]:
                    plans[fam] = self._plan_full(snapshot, ctx)
                else:
                    plans[fam] = self._plan_partial(snapshot, changes, ctx)
            t1 = time.perf_counter()
            self._execute(plans, result)
        except SyncError:
            self._need_full = True
            self._known = {4: False, 6: False}
            raise
        finally:
            if gc_was_enabled:
                gc.enable()
        t2 = time.perf_counter()
        elements = 0
        for fam, plan in plans.items():
            self.index[fam] = plan.index
            self.no_local_endpoints[fam] = plan.no_local if plan.no_local is not None else _no_local(plan.index)
            self.kernel_chains[fam], self.kernel_sets[fam] = plan.chains, plan.sets
            self._known[fam] = True
            if plan.rendered_from is not None:
                self._rendered_from[fam] = plan.rendered_from
            self.ctx[fam] = ctxs[fam]
            elements += plan.elements
        result.render_seconds = t1 - t0
        result.apply_seconds = t2 - t1
        self._need_full = False
        self.last_elements = elements
        result.rules = elements
        result.services = len(snapshot.services) if full else len(changes.changed) + len(changes.removed)
        return result

    def _execute(self, plans: dict[int, Plan], result: SyncResult) -> None:
        """Structure first (additive), then every element change in one transaction, then removals.

        Both families go together: one ``nft -f`` for new chains and maps, one nfnetlink transaction for
        all elements, one ``nft -f`` for what is no longer used. Each step leaves a working ruleset: new
        chains and maps are unreferenced until the element transaction points frontends at them, and
        stale ones are unreferenced once it has committed.
        """
        ts = {fam: f"{r.nft_family(fam)} {r.TABLE}" for fam in plans}
        if not self.use_netlink:
            if self.keep_transaction:
                self.last_transaction = ([], "", plans)
            script = [line for fam, p in plans.items() for line in (*p.pre, *_ops_text(ts[fam], p.ops), *p.post)]
            if script:
                t0 = time.perf_counter()
                nft.apply("\n".join(script) + "\n")
                result.extra["nft_seconds"] = time.perf_counter() - t0
            return
        t0 = time.perf_counter()
        pre = [line for p in plans.values() for line in p.pre]
        # nft builds the structure in its own process while this one encodes the elements
        wait_pre = nft.start("\n".join(pre) + "\n") if pre else None
        try:
            batches = _encode(plans)
        except BaseException:
            if wait_pre is not None:
                with contextlib.suppress(SyncError):
                    wait_pre()  # never leave nft running behind the next sync
            raise
        t_enc = time.perf_counter()
        if wait_pre is not None:
            wait_pre()  # the elements may reference chains and maps it creates
        t1 = time.perf_counter()
        netlink.commit_all(batches)
        t2 = time.perf_counter()
        post = [line for p in plans.values() for line in p.post]
        if post:
            nft.apply("\n".join(post) + "\n")
        t3 = time.perf_counter()
        if self.keep_transaction:
            self.last_transaction = (batches, "\n".join(pre) + "\n" if pre else "", plans)
        # nft_seconds: waiting for nft beyond the encoding it overlapped with
        result.extra["nft_seconds"] = (t1 - t_enc) + (t3 - t2)
        result.extra["encode_seconds"] = t_enc - t0
        result.extra["netlink_seconds"] = t2 - t1

    def _plan_full(self, snapshot: ProxySnapshot, ctx: r.Context) -> Plan:
        fam = ctx.family
        t = f"{ctx.f} {r.TABLE}"
        index = ElementIndex()
        eps = snapshot.endpoints
        # A resync re-renders only what changed since the last render (the snapshot replaces a service
        # port's objects when it changes, so identity says "unchanged"); everything keeps its slots.
        prev = self.index[fam].by_owner if ctx == self.ctx[fam] else {}
        rendered_from = self._rendered_from[fam]
        new_from: dict[ServicePortName, tuple[ServicePort, tuple[EndpointInfo, ...]]] = {}
        load = index.load
        for spn, sp in snapshot.services.items():
            if sp.cluster_ip(fam) is None:
                continue  # nothing in this family's table (the partial path keeps no empty owners either)
            e = eps.get(spn, ())
            old = prev.get(spn)
            src = rendered_from.get(spn)
            if old is not None and src is not None and src[0] is sp and src[1] is e:
                se = old
            else:
                se = r.render_service(sp, e, ctx, old)
            new_from[spn] = (sp, e)
            load(spn, se)
        index.end_load()
        chains, sets = index.live_chains(), index.live_sets()
        plan = Plan(index, chains, sets, rendered_from=new_from)
        pre = plan.pre
        pre.extend(self._skeleton(fam))
        pre.extend(r.dynamic_set_declaration(s, fam) for s in sorted(sets))
        for s in TEXT_SETS:
            pre.append(f"flush set {t} {s}")
            _add_elements(pre, t, s, index.current.get(s, {}).items())
        for chain, rules in r.static_rules(ctx).items():
            pre.append(f"flush chain {t} {chain}")
            pre.extend(f"add rule {t} {chain} {rule}" for rule in rules)
        for chain in sorted(chains, key=_slot_first):
            pre.append(f"add chain {t} {chain}")
            pre.append(f"flush chain {t} {chain}")
            pre.extend(f"add rule {t} {chain} {rule}" for rule in r.chain_rules(chain, ctx))
        for s in (*r.DATA_SETS, *sorted(sets)):
            if s in TEXT_SETS or s.startswith("aff-"):
                continue  # the affinity memory of the packet path survives a resync
            plan.ops.append(("flush", s))
        for s, elems in index.current.items():
            plan.elements += len(elems)
            if s not in TEXT_SETS and elems:
                plan.ops.append(("add", s, elems.items()))  # type: ignore[arg-type]
        if self._known[fam]:
            old_chains, old_sets = self.kernel_chains[fam], self.kernel_sets[fam]
        else:
            old_chains, old_sets = self._kernel_dynamic(fam)
        self._removals(plan, t, old_chains, old_sets)
        return plan

    def _plan_partial(self, snapshot: ProxySnapshot, changes: Changes, ctx: r.Context) -> Plan:
        fam = ctx.family
        t = f"{ctx.f} {r.TABLE}"
        index = self.index[fam]
        delta = Delta()
        rendered_from = self._rendered_from[fam]
        internal, external = self.no_local_endpoints.get(fam, (0, 0))
        for spn in sorted(changes.changed | changes.removed):
            sp = snapshot.services.get(spn)
            old = index.by_owner.get(spn)
            e = snapshot.endpoints.get(spn, ())
            new = r.render_service(sp, e, ctx, old) if sp is not None else None
            if sp is not None:
                rendered_from[spn] = (sp, e)
            else:
                rendered_from.pop(spn, None)
            for se, sign in ((old, -1), (new, 1)):
                if se is not None and se.no_local:
                    internal += sign * se.no_local.get("internal", False)
                    external += sign * se.no_local.get("external", False)
            index.replace(spn, new if new is not None and (new.elements or new.chains) else None, delta)
        chains, sets = index.live_chains(), index.live_sets()
        plan = Plan(index, chains, sets, no_local=(internal, external))
        old_chains, old_sets = self.kernel_chains[fam], self.kernel_sets[fam]
        pre = plan.pre
        pre.extend(r.dynamic_set_declaration(s, fam) for s in sorted(sets - old_sets))
        for chain in sorted(chains - old_chains, key=_slot_first):
            pre.append(f"add chain {t} {chain}")
            pre.extend(f"add rule {t} {chain} {rule}" for rule in r.chain_rules(chain, ctx))
        going = old_sets - sets
        for s, keys in delta.deletes.items():
            if s in going:
                continue  # the whole map goes
            plan.elements += len(keys)
            if s in TEXT_SETS:
                pre.append(f"delete element {t} {s} {{ {', '.join(sorted(keys))} }}")
            else:
                plan.ops.append(("delete", s, sorted(keys)))
        for s, adds in delta.adds.items():
            plan.elements += len(adds)
            if s in TEXT_SETS:
                _add_elements(pre, t, s, adds.items())
            else:
                plan.ops.append(("add", s, list(adds.items())))
        self._removals(plan, t, old_chains, old_sets)
        return plan

    @staticmethod
    def _removals(plan: Plan, t: str, old_chains: set[str], old_sets: set[str]) -> None:
        stale = sorted(old_chains - plan.chains)
        plan.post.extend(f"flush chain {t} {c}" for c in stale)
        plan.post.extend(f"delete chain {t} {c}" for c in stale)
        plan.post.extend(f"delete {'set' if s.startswith('aff-') else 'map'} {t} {s}"
                         for s in sorted(old_sets - plan.sets))

    def _kernel_dynamic(self, fam: int) -> tuple[set[str], set[str]]:
        """Selection/slot chains and per-slot sets in the kernel table.

        Listings by object type, not ``list table``: even with ``-t`` that one makes nft fetch every
        element into its cache (0.8 s for a 10k × 10 table, against a few ms for these, in one process).
        """
        f = r.nft_family(fam)
        chains, sets = set(), set()
        for obj in nft.list_json_many(("chains", f), ("sets", f), ("maps", f), terse=True):
            o = obj.get("chain") or obj.get("set") or obj.get("map")
            if not o or o.get("table") != r.TABLE:
                continue
            name = o.get("name", "")
            if "chain" in obj and r.is_dynamic_chain(name):
                chains.add(name)
            elif "chain" not in obj and r.is_dynamic_set(name):
                sets.add(name)
        return chains, sets

    # ---- cleanup and status ---------------------------------------------------------------------
    def cleanup(self) -> bool:
        found = False
        try:
            nft.available()
        except SetupError:
            return False  # no nft tool: nothing of ours can exist (the tables need it to be created)
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
        self.index = {4: ElementIndex(), 6: ElementIndex()}
        self.kernel_chains = {4: set(), 6: set()}
        self.kernel_sets = {4: set(), 6: set()}
        self._known = {4: False, 6: False}
        self._rendered_from = {4: {}, 6: {}}
        self.ctx = {4: None, 6: None}
        self._need_full = True
        return found

    def status(self) -> list[ServiceStatus]:
        nft.available()
        out: list[ServiceStatus] = []
        for fam in (4, 6):
            out.extend(read_status(nft.list_json("table", r.nft_family(fam), r.TABLE), fam))
        return out


# sets written with nft (interval elements the netlink path does not encode; small anyway)
TEXT_SETS = (r.FW_IPS, r.FW_ALLOW)
Op = tuple[str, str] | tuple[str, str, list[str]] | tuple[str, str, list[tuple[str, str]]]


@dataclass(slots=True)
class Plan:
    """One family's sync: nft structure changes, one element transaction, then nft removals."""

    index: ElementIndex
    chains: set[str]
    sets: set[str]
    pre: list[str] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    post: list[str] = field(default_factory=list)
    elements: int = 0
    no_local: tuple[int, int] | None = None  # None: count over the whole index
    rendered_from: dict[ServicePortName, tuple[ServicePort, tuple[EndpointInfo, ...]]] | None = None


def _encode(plans: dict[int, Plan]) -> list[netlink.Batch]:
    batches = []
    for fam, plan in plans.items():
        batch = netlink.Batch(fam, r.TABLE)
        for op in plan.ops:
            if op[0] == "flush":
                batch.flush(op[1])
            elif op[0] == "delete":
                batch.delete(op[1], op[2])
            else:
                batch.add(op[1], op[2])
        batches.append(batch)
    return batches


def _no_local(index: ElementIndex) -> tuple[int, int]:
    internal = external = 0
    for se in index.by_owner.values():
        if se.no_local:
            internal += se.no_local.get("internal", False)
            external += se.no_local.get("external", False)
    return internal, external


def _slot_first(chain: str) -> tuple[int, str]:
    """Slot chains before the selection chains that jump to them."""
    return (0 if r.parse_slot_chain(chain) is not None else 1, chain)


def _is_set(name: str) -> bool:
    return name in (r.FW_IPS, r.FW_ALLOW, r.HAIRPIN) or name.startswith("aff-")


def _ops_text(t: str, ops: list[Op]) -> list[str]:
    out: list[str] = []
    for op in ops:
        if op[0] == "flush":
            out.append(f"flush {'set' if _is_set(op[1]) else 'map'} {t} {op[1]}")
        elif op[0] == "delete":
            keys = op[2]  # type: ignore[misc]
            for i in range(0, len(keys), CHUNK):
                out.append(f"delete element {t} {op[1]} {{ {', '.join(keys[i:i + CHUNK])} }}")  # type: ignore[arg-type]
        else:
            _add_elements(out, t, op[1], op[2])  # type: ignore[misc]
    return out


def _add_elements(lines: list[str], t: str, s: str, items: Iterable[tuple[str, str]]) -> None:
    chunk: list[str] = []
    for k, v in items:
        chunk.append(k + v)
        if len(chunk) >= CHUNK:
            lines.append(f"add element {t} {s} {{ " + ",\n".join(chunk) + " }")
            chunk = []
    if chunk:
        lines.append(f"add element {t} {s} {{ " + ",\n".join(chunk) + " }")
