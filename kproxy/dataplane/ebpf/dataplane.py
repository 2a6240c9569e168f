"""The ebpf proxy mode: socket-level LB (cgroup v2) plus tc NodePort DNAT, driven by pinned BPF maps.

The daemon's only job after :meth:`EbpfDataPlane.setup` is keeping the maps equal to the snapshot. A
service port's backends live in a *set* (``kp_be``: set id, slot -> backend); frontends (``kp_svc``: VIP,
port, protocol, kind -> set id, count, ...) point at sets. A changed set is written under a fresh set id
first, then every frontend is switched with one atomic element update each, then the old slots are
deleted (two-phase swap): the programs never see a half-written service.

The in-memory state mirrors the kernel and is re-read from the maps at every full sync, so a restarted
daemon adopts what the previous run left (and traffic keeps flowing in between: the programs stay
attached and the maps pinned).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import time
from dataclasses import dataclass, field

from ...config import ProxyConfig
from ...snapshot import Changes, ProxySnapshot, ServicePortName
from .. import BackendStatus, FrontendStatus, ServiceStatus, SetupError, SyncError, SyncResult
from . import bpfsys, loader, snat
from . import maps as m
from .render import Backend, Desired, group_of, render

log = logging.getLogger(__name__)


def _family_of_set(name: str) -> int:
    parts = name.rsplit("|", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1] in ("4", "6") else 0


def fe_flags(svc_value: bytes) -> int:
    return m.parse_svc_val(svc_value)[4]


class Staged:
    """Map writes collected per map and flushed with batch syscalls (deletes first, then updates)."""

    def __init__(self, maps: m.LBMaps) -> None:
        self.maps = maps
        self.puts: dict[str, dict[bytes, bytes]] = {}
        self.dels: dict[str, list[bytes]] = {}

    def put(self, name: str, key: bytes, value: bytes) -> None:
        self.puts.setdefault(name, {})[key] = value

    def delete(self, name: str, key: bytes) -> None:
        self.dels.setdefault(name, []).append(key)

    def flush(self) -> None:
        dels, puts = self.dels, self.puts
        self.dels, self.puts = {}, {}
        for name, keys in dels.items():
            getattr(self.maps, name).delete_many(keys)
        for name, items in puts.items():
            getattr(self.maps, name).put_many(items)


@dataclass(slots=True)
class _Plan:
    """One group's (service port's) change in flight through the three phases."""

    group: str
    d: Desired
    old_names: set[str]
    sets: list[tuple[str, SetState, SetState | None]] = field(default_factory=list)
    new_affs: set[int] = field(default_factory=set)
    new_members: list[bytes] = field(default_factory=list)
    want: dict[bytes, bytes] = field(default_factory=dict)
    ranges: dict[int, set[str]] = field(default_factory=dict)  # aff id -> loadBalancerSourceRanges
    new_ranges: list[bytes] = field(default_factory=list)
    svc_done: list[tuple[bytes, bytes | None]] = field(default_factory=list)
    writes: int = 0


@dataclass(slots=True)
class SetState:
    aff_id: int
    set_id: int
    backends: tuple[Backend, ...] | None  # None: slots incomplete in the kernel, rewrite


class EbpfDataPlane:
    mode = "ebpf"

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.pin_dir = config.bpf_pin_path.rstrip("/") or "/sys/fs/bpf/kproxy"
        self.cgroup_path = config.bpf_cgroup_path
        self.interfaces: list[str] = list(config.bpf_interfaces)
        self.maps: m.LBMaps | None = None
        self.sets: dict[str, SetState] = {}
        self.frontends: dict[bytes, bytes] = {}  # svc key -> svc value
        self.fe_group: dict[bytes, str] = {}
        self.groups: dict[str, set[bytes]] = {}  # group (service port name) -> frontend keys
        self.group_sets: dict[str, set[str]] = {}
        self.next_set_id = 1
        self._aff_hint = 1
        self.used_aff: set[int] = set()
        self.ranges: dict[int, set[str]] = {}
        self.node_addrs: set[str] | None = None
        self.masq_mark = 1 << config.masquerade_bit
        self.need_snat = False
        self.snat_installed = False

    # ---- setup ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        try:
            self._check_bpffs()
            self.cgroup_path = self.cgroup_path or loader.default_cgroup_path()
            loader.check_cgroup(self.cgroup_path)
            self._check_pinned_layout()
            progs = loader.compile_and_load(self.pin_dir, masq_mark=self.masq_mark)
        except (loader.LoadError, bpfsys.BpfError) as e:
            raise SetupError(f"ebpf mode: {e}") from None
        try:
            self.maps = m.LBMaps(self.pin_dir)
            if not self.interfaces:
                self.interfaces = loader.default_interfaces()
            prev = self._attachments()
            self._record_attachments({"cgroups": sorted({*prev.get("cgroups", []), self.cgroup_path}),
                                      "interfaces": sorted({*prev.get("interfaces", []), *self.interfaces})})
            loader.attach_cgroup(self.cgroup_path, progs)
            loader.attach_tc(self.interfaces, progs)
            # A previous run attached elsewhere: move, do not leave stale programs behind.
            for cg in prev.get("cgroups", []):
                if cg != self.cgroup_path:
                    loader.detach_cgroup(cg)
            stale_ifaces = [i for i in prev.get("interfaces", []) if i not in self.interfaces]
            if stale_ifaces:
                loader.detach_tc(stale_ifaces)
            self._record_attachments({"cgroups": [self.cgroup_path], "interfaces": self.interfaces})
        except (loader.LoadError, bpfsys.BpfError) as e:
            raise SetupError(f"ebpf mode: {e}") from None
        finally:
            progs.close()
        self._adopt()
        log.info("ebpf: socket LB attached to cgroup %s, tc on %s, maps pinned in %s (%d frontends adopted)",
                 self.cgroup_path, ",".join(self.interfaces) or "(none)", self.pin_dir, len(self.frontends))

    def _check_bpffs(self) -> None:
        existing = self.pin_dir
        while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
            existing = os.path.dirname(existing)
        if bpfsys.fs_magic(existing) != bpfsys.BPF_FS_MAGIC:
            where = os.path.dirname(self.pin_dir)
            raise loader.LoadError(f"{where} is not a BPF filesystem: pinned maps need bpffs "
                                   f"(mount -t bpf bpf /sys/fs/bpf, or pass --bpf-pin-path on a bpffs)")
        os.makedirs(self.pin_dir, exist_ok=True)

    def _check_pinned_layout(self) -> None:
        for name, (ks, vs) in m.MAPS.items():
            path = os.path.join(self.pin_dir, name)
            if os.path.exists(path):
                try:
                    bpfsys.Map(path, ks, vs).close()
                except bpfsys.BpfError as e:
                    raise loader.LoadError(f"{e}; run kproxy --cleanup --proxy-mode ebpf first") from None

    def _attachments(self) -> dict[str, list[str]]:
        assert self.maps is not None
        raw = self.maps.meta.get(m.meta_key(m.META_ATTACHMENTS))
        if not raw:
            return {}
        try:
            rec = json.loads(m.parse_meta_val(raw))
            return rec if isinstance(rec, dict) else {}
        except ValueError:
            return {}

    def _record_attachments(self, rec: dict[str, list[str]]) -> None:
        assert self.maps is not None
        self.maps.meta.put(m.meta_key(m.META_ATTACHMENTS), m.meta_val(json.dumps(rec, separators=(",", ":"))))

    # ---- adopting kernel state -------------------------------------------------------------------------
    def _adopt(self) -> None:
        """Rebuild the in-memory mirror from the maps (restart, or the start of a full sync)."""
        assert self.maps is not None
        names = {}
        for k, v in self.maps.meta.items():
            aff_id = int.from_bytes(k, "little")
            if aff_id != m.META_ATTACHMENTS:
                names[aff_id] = m.parse_meta_val(v)
        slots: dict[tuple[int, int], Backend] = {}
        max_set = 0
        for k, v in self.maps.be.items():
            set_id, slot = m.parse_be_key(k)
            ip, port, local = m.parse_be_val(v)
            slots[(set_id, slot)] = Backend(ip, port, local)
            max_set = max(max_set, set_id)
        self.sets, self.frontends, self.fe_group, self.groups, self.group_sets = {}, {}, {}, {}, {}
        for k, v in self.maps.svc.items():
            set_id, count, aff_id, _, _ = m.parse_svc_val(v)
            max_set = max(max_set, set_id)
            name = names.get(aff_id)
            group = group_of(name) if name else ""  # "" = orphan, removed by the next full sync
            self.frontends[k] = v
            self.fe_group[k] = group
            self.need_snat |= bool(m.parse_svc_val(v)[4] & m.F_SNAT)
            self.groups.setdefault(group, set()).add(k)
            if not name or name in self.sets:
                continue
            bes = [slots.get((set_id, s)) for s in range(count)]
            self.sets[name] = SetState(aff_id, set_id, None if None in bes else tuple(bes))  # type: ignore[arg-type]
            self.group_sets.setdefault(group, set()).add(name)
        self.next_set_id = max(self.next_set_id, max_set + 1)
        self.used_aff = {st.aff_id for st in self.sets.values()}
        self.ranges = {}
        for k in self.maps.srcrange:
            aff_id = int.from_bytes(k[4:8], "little")
            fam = _family_of_set(names.get(aff_id, ""))
            if aff_id in self.used_aff and fam:
                self.ranges.setdefault(aff_id, set()).add(m.parse_src_key(k, fam)[1])

    # ---- sync ------------------------------------------------------------------------------------------
    def sync(self, snapshot: ProxySnapshot, changes: Changes, full: bool) -> SyncResult:
        if self.maps is None:
            raise SyncError("ebpf mode: sync before setup")
        t0 = time.monotonic()
        res = SyncResult(full=full)
        try:
            if full:
                self._adopt()
                spns: set[ServicePortName] = set(snapshot.services)
                todo = {str(s): s for s in spns}
                for g in self.groups:
                    todo.setdefault(g, None)  # type: ignore[arg-type]
            else:
                todo = {str(s): s for s in (changes.changed | changes.removed)}
            zone = snapshot.node.zone if snapshot.node is not None else ""
            desired: dict[str, Desired] = {}
            for group, spn in todo.items():
                sp = snapshot.services.get(spn) if spn is not None else None
                if sp is None:
                    desired[group] = Desired({}, [], 0)
                else:
                    desired[group] = render(sp, snapshot.endpoints.get(spn, ()), zone)
            t1 = time.monotonic()
            res.render_seconds = t1 - t0
            self._apply(desired, res)
            if full:
                res.rules += self._gc()
            self._sync_node_addrs()
            if self.need_snat and not self.snat_installed:
                snat.install(self.masq_mark)
                self.snat_installed = True
            res.apply_seconds = time.monotonic() - t1
        except bpfsys.BpfError as e:
            raise SyncError(f"ebpf mode: map update failed: {e}") from None
        except snat.SnatError as e:
            raise SyncError(f"ebpf mode: {e}") from None
        return res

    def _alloc_aff(self, name: str, st: Staged) -> int:
        # ids are small and dense; a linear probe from the last allocation is cheap enough
        aff_id = self._aff_hint
        while aff_id in self.used_aff or aff_id == m.META_ATTACHMENTS:
            aff_id = aff_id + 1 if aff_id < 0xFFFFFFFF else 1
        self._aff_hint = aff_id + 1
        self.used_aff.add(aff_id)
        st.put("meta", m.meta_key(aff_id), m.meta_val(name))
        return aff_id

    def _alloc_set_id(self) -> int:
        sid = self.next_set_id
        self.next_set_id = sid + 1 if sid < 0xFFFFFFFF else 1
        return sid

    def _apply(self, desired: dict[str, Desired], res: SyncResult) -> None:
        """Apply every group's change in three batched phases (see the module docstring)."""
        assert self.maps is not None
        st = Staged(self.maps)
        plans = [self._stage_sets(group, d, st) for group, d in desired.items()]
        try:
            st.flush()  # phase 1: new slots, members and names (nothing points at them yet)
        except bpfsys.BpfError:
            self._rollback_sets(plans)
            raise
        for p in plans:
            self._stage_frontends(p, st)
        try:
            st.flush()  # phase 2: switch frontends (each element update is atomic)
        except bpfsys.BpfError:
            restore = Staged(self.maps)
            for p in plans:
                for key, old_val in p.svc_done:
                    if old_val is None:
                        restore.delete("svc", key)
                    else:
                        restore.put("svc", key, old_val)
            with contextlib.suppress(bpfsys.BpfError):
                restore.flush()
            self._rollback_sets(plans)
            raise
        for p in plans:
            self._commit(p, st)
            if p.writes:
                res.services += 1
                res.rules += p.writes
        try:
            st.flush()  # phase 3: garbage; a failure only leaves unreferenced entries for the next full sync
        except bpfsys.BpfError as e:
            log.warning("ebpf: removing old entries failed (the next full sync retries): %s", e)

    def _stage_sets(self, group: str, d: Desired, st: Staged) -> _Plan:
        p = _Plan(group, d, set(self.group_sets.get(group, set())))
        for name, backends in d.sets.items():
            cur = self.sets.get(name)
            if cur is not None and cur.backends == backends:
                continue
            if cur is not None:
                aff_id = cur.aff_id
            else:
                aff_id = self._alloc_aff(name, st)
                p.new_affs.add(aff_id)
            new = SetState(aff_id, self._alloc_set_id(), backends)
            p.sets.append((name, new, cur))
            for slot, b in enumerate(backends):
                st.put("be", m.be_key(new.set_id, slot), m.be_val(b.ip, b.port, b.local))
                p.writes += 1
            old = set(cur.backends or ()) if cur is not None else set()
            for b in backends:
                if b not in old:
                    k = m.member_key(aff_id, b.ip, b.port)
                    st.put("member", k, m.be_val(b.ip, b.port, b.local))
                    p.new_members.append(k)
                    p.writes += 1
        planned = {n: new.aff_id for n, new, _ in p.sets}
        for name, ranges in p.d.src_ranges.items():
            aff = planned.get(name) or self.sets[name].aff_id
            cur = self.ranges.get(aff, set())
            for cidr in set(ranges) - cur:
                k = m.src_key(aff, cidr)
                st.put("srcrange", k, m.ONE)
                p.new_ranges.append(k)
                p.writes += 1
            p.ranges[aff] = set(ranges)
        return p

    def _stage_frontends(self, p: _Plan, st: Staged) -> None:
        sets_after = {n: self.sets[n] for n in p.old_names if n in p.d.sets and n in self.sets}
        sets_after.update({n: s for n, s, _ in p.sets})
        for fe in p.d.frontends:
            s = sets_after[fe.set_name]
            p.want[fe.key] = m.svc_val(s.set_id, len(s.backends or ()), s.aff_id, p.d.affinity_timeout, fe.flags)
        for key, val in p.want.items():
            old_val = self.frontends.get(key)
            if old_val == val:
                continue
            owner = self.fe_group.get(key)
            if owner and owner != p.group:
                log.warning("ebpf: %s takes over frontend %s from %s", p.group, m.parse_svc_key(key), owner)
            st.put("svc", key, val)
            self.need_snat |= bool(fe_flags(val) & m.F_SNAT)
            p.svc_done.append((key, old_val))
            p.writes += 1
        for key in self.groups.get(p.group, set()) - p.want.keys():
            if self.fe_group.get(key) != p.group:
                continue
            st.delete("svc", key)
            p.svc_done.append((key, self.frontends.get(key)))
            p.writes += 1

    def _commit(self, p: _Plan, st: Staged) -> None:
        """Update the mirror after phase 2 and stage phase 3 (old slots, members, names)."""
        group, want = p.group, p.want
        for key in self.groups.get(group, set()) - want.keys():
            if self.fe_group.get(key) == group:
                self.frontends.pop(key, None)
                self.fe_group.pop(key, None)
        for key, val in want.items():
            prev_owner = self.fe_group.get(key)
            if prev_owner is not None and prev_owner != group:
                self.groups.get(prev_owner, set()).discard(key)
            self.frontends[key] = val
            self.fe_group[key] = group
        if want:
            self.groups[group] = set(want)
        else:
            self.groups.pop(group, None)
        for name, new, _ in p.sets:
            self.sets[name] = new
        if p.d.sets:
            self.group_sets[group] = set(p.d.sets)
        else:
            self.group_sets.pop(group, None)
        for aff in {self.sets[n].aff_id for n in p.d.sets if n in self.sets}:
            old_r, new_r = self.ranges.get(aff, set()), p.ranges.get(aff, set())
            for cidr in old_r - new_r:
                st.delete("srcrange", m.src_key(aff, cidr))
            if new_r:
                self.ranges[aff] = new_r
            else:
                self.ranges.pop(aff, None)
        for _, new, cur in p.sets:
            if cur is None:
                continue
            for slot in range(len(cur.backends or ())):
                st.delete("be", m.be_key(cur.set_id, slot))
            kept = {(b.ip, b.port) for b in new.backends or ()}
            for b in cur.backends or ():
                if (b.ip, b.port) not in kept:
                    st.delete("member", m.member_key(cur.aff_id, b.ip, b.port))
        for name in p.old_names - p.d.sets.keys():
            gone = self.sets.pop(name, None)
            if gone is None:
                continue
            for slot in range(len(gone.backends or ())):
                st.delete("be", m.be_key(gone.set_id, slot))
            for b in gone.backends or ():
                st.delete("member", m.member_key(gone.aff_id, b.ip, b.port))
            st.delete("meta", m.meta_key(gone.aff_id))
            for cidr in self.ranges.pop(gone.aff_id, set()):
                st.delete("srcrange", m.src_key(gone.aff_id, cidr))
            self.used_aff.discard(gone.aff_id)

    def _rollback_sets(self, plans: list[_Plan]) -> None:
        assert self.maps is not None
        st = Staged(self.maps)
        for p in plans:
            for _, new, _ in p.sets:
                for slot in range(len(new.backends or ())):
                    st.delete("be", m.be_key(new.set_id, slot))
            for k in p.new_members:
                st.delete("member", k)
            for k in p.new_ranges:
                st.delete("srcrange", k)
            for a in p.new_affs:
                st.delete("meta", m.meta_key(a))
            self.used_aff -= p.new_affs
        with contextlib.suppress(bpfsys.BpfError):
            st.flush()

    def _gc(self) -> int:
        """Delete map entries nothing references; re-add missing membership entries. Returns writes."""
        assert self.maps is not None
        mp = self.maps
        st = Staged(mp)
        for k in mp.svc:
            if k not in self.frontends:
                st.delete("svc", k)
        live_slots = {m.be_key(s.set_id, i) for s in self.sets.values() for i in range(len(s.backends or ()))}
        for k in mp.be:
            if k not in live_slots:
                st.delete("be", k)
        want_members = {m.member_key(s.aff_id, b.ip, b.port): m.be_val(b.ip, b.port, b.local)
                        for s in self.sets.values() for b in s.backends or ()}
        have = set()
        for k in mp.member:
            if k in want_members:
                have.add(k)
            else:
                st.delete("member", k)
        for k, v in want_members.items():
            if k not in have:
                st.put("member", k, v)
        want_ranges = {m.src_key(a, c) for a, cidrs in self.ranges.items() for c in cidrs}
        for k in mp.srcrange:
            if k not in want_ranges:
                st.delete("srcrange", k)
        live_aff = {s.aff_id for s in self.sets.values()} | {m.META_ATTACHMENTS}
        for k in mp.meta:
            if int.from_bytes(k, "little") not in live_aff:
                st.delete("meta", k)
        n = sum(map(len, st.dels.values())) + sum(map(len, st.puts.values()))
        st.flush()
        return n

    # ---- node addresses (NodePort destinations) -----------------------------------------------------------
    @loader.off_loop
    def _wanted_node_addrs(self) -> set[str]:
        from pyroute2 import IPRoute

        nets = [ipaddress.ip_network(c) for c in self.config.nodeport_addresses if c != "primary"]
        out = set()
        with IPRoute() as ipr:
            for a in ipr.get_addr():
                ip = ipaddress.ip_address(a.get_attr("IFA_ADDRESS") or "0.0.0.0")
                if ip.is_loopback or ip.is_link_local or ip.is_unspecified:
                    continue
                if nets and not any(ip in n for n in nets if n.version == ip.version):
                    continue
                out.add(str(ip))
        return out

    def _sync_node_addrs(self) -> None:
        assert self.maps is not None
        want = self._wanted_node_addrs()
        if want == self.node_addrs:
            return
        have = {m.parse_addr_key(k): k for k in self.maps.nodeaddr}
        for ip, k in have.items():
            if ip not in want:
                self.maps.nodeaddr.delete(k)
        for ip in want - have.keys():
            self.maps.nodeaddr.put(m.addr_key(ip), (1).to_bytes(4, "little"))
        self.node_addrs = want

    # ---- cleanup -------------------------------------------------------------------------------------
    def cleanup(self) -> bool:
        found = False
        cgroups = {self.config.bpf_cgroup_path or loader.default_cgroup_path()}
        ifaces = set(self.config.bpf_interfaces)
        maps = None
        if all(os.path.exists(os.path.join(self.pin_dir, n)) for n in m.MAPS):
            try:
                maps = m.LBMaps(self.pin_dir)
            except bpfsys.BpfError:
                maps = None
        if maps is not None:
            raw = maps.meta.get(m.meta_key(m.META_ATTACHMENTS))
            if raw:
                with contextlib.suppress(ValueError):
                    rec = json.loads(m.parse_meta_val(raw))
                    cgroups.update(rec.get("cgroups", []))
                    ifaces.update(rec.get("interfaces", []))
            maps.close()
        for cg in sorted(c for c in cgroups if c):
            found |= loader.detach_cgroup(cg) > 0
        with contextlib.suppress(Exception):
            ifaces.update(loader.all_interfaces())
        found |= loader.detach_tc(sorted(i for i in ifaces if i and loader.tc_attached(i))) > 0
        found |= snat.remove()
        self.snat_installed = False
        for name in m.MAPS:
            path = os.path.join(self.pin_dir, name)
            if os.path.exists(path):
                os.unlink(path)
                found = True
        with contextlib.suppress(OSError):
            os.rmdir(self.pin_dir)
        if self.maps is not None:
            self.maps.close()
            self.maps = None
        return found

    # ---- status (from the kernel) ----------------------------------------------------------------------
    def status(self) -> list[ServiceStatus]:
        if not all(os.path.exists(os.path.join(self.pin_dir, n)) for n in m.MAPS):
            return []
        mp = self.maps or m.LBMaps(self.pin_dir)
        try:
            names = {int.from_bytes(k, "little"): m.parse_meta_val(v) for k, v in mp.meta.items()}
            slots = {m.parse_be_key(k): m.parse_be_val(v) for k, v in mp.be.items()}
            out: dict[tuple[str, int], ServiceStatus] = {}
            seen: set[tuple[str, int, str, str]] = set()
            for k, v in sorted(mp.svc.items()):
                key = m.parse_svc_key(k)
                set_id, count, aff_id, tmo, flags = m.parse_svc_val(v)
                name = names.get(aff_id, f"<unknown set {aff_id}>")
                group, _, role = name.rpartition("|")
                group = group_of(name) if "|" in name else name
                st = out.setdefault((group, key.family), ServiceStatus(group, key.family, affinity_seconds=tmo))
                kind = ("ClusterIP" if flags & m.FE_CLUSTER_IP else "NodePort" if flags & m.FE_NODE_PORT
                        else "LoadBalancer" if flags & m.FE_LB_IP else "ExternalIP")
                addr = (f"*:{key.port}" if not key.addr else
                        f"[{key.addr}]:{key.port}" if key.family == 6 else f"{key.addr}:{key.port}")
                if (group, key.family, kind, addr) not in seen:
                    seen.add((group, key.family, kind, addr))
                    st.frontends.append(FrontendStatus(kind, addr, key.proto))
                if (role == "i" or not st.backends) and count:
                    bes = [slots.get((set_id, s)) for s in range(count)]
                    st.backends = [BackendStatus(f"[{b[0]}]:{b[1]}" if ":" in b[0] else f"{b[0]}:{b[1]}",
                                                 1.0 / count, b[2]) for b in bes if b is not None]
            return sorted(out.values(), key=lambda s: (s.name, s.family))
        finally:
            if mp is not self.maps:
                mp.close()
