"""``kproxy-bridge``: bridge + veth CNI plugin, drop-in for the reference ``bridge`` plugin.

Accepted options (same meaning as the reference): ``bridge`` (default ``cni0``), ``isGateway``,
``isDefaultGateway`` (implies ``isGateway``), ``forceAddress``, ``ipMasq``, ``mtu``, ``hairpinMode``,
``promiscMode``, ``vlan`` (untagged PVID on the pod's port, bridge gets VLAN filtering), ``macspoofchk``
(nftables, bridge family: frames from the pod's port with another source MAC are dropped; one base chain
per attachment in table ``bridge kproxy-cni``, so DEL is a single atomic ``nft -f``).

IPAM is delegated exactly as libcni's ``invoke.DelegateAdd`` does: the binary named by ``ipam.type`` is
looked up in ``CNI_PATH`` and executed with our environment and stdin, so any IPAM plugin works
(kproxy-host-local, or the reference host-local/static/dhcp). DEL, CHECK, STATUS and GC are passed on.

Ordering differs from the reference on purpose: IPAM runs *before* any link is created and a failed
ADD rolls back everything it did (veth, IPAM allocation), so a failing ADD leaves nothing behind.

ipMasq uses the reference's chain naming (``CNI-`` + sha512(name+containerID)[:24]) and comment, so a
node can switch between the two plugins and DEL/GC still find the rules.
"""

from __future__ import annotations

import os
import sys

from cni._skel import (
    ERR_INTERNAL,
    ERR_INVALID_CONFIG,
    ERR_UNKNOWN_CONTAINER,
    VALID_ATTACHMENTS_KEY,
    Args,
    Child,
    CNIError,
    Delegation,
    delegate,
    exec_plugin,
    normalize_result,
    run,
)

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~8 ms of import time per plugin call
    from typing import Any


DEFAULT_BRIDGE = "cni0"
AF_INET, AF_INET6 = 2, 10  # not importing socket just for these


class BridgeConf:
    def __init__(self, conf: dict[str, Any]) -> None:
        self.name: str = conf["name"]
        self.bridge = str(conf.get("bridge") or DEFAULT_BRIDGE)
        if len(self.bridge) > 15:
            raise CNIError(ERR_INVALID_CONFIG, f"bridge name {self.bridge!r} is too long")
        self.is_default_gw = bool(conf.get("isDefaultGateway"))
        self.is_gw = bool(conf.get("isGateway")) or self.is_default_gw
        self.force_address = bool(conf.get("forceAddress"))
        self.ip_masq = bool(conf.get("ipMasq"))
        self.hairpin = bool(conf.get("hairpinMode"))
        self.promisc = bool(conf.get("promiscMode"))
        try:
            self.mtu = int(conf.get("mtu") or 0)
            self.vlan = int(conf.get("vlan") or 0)
        except (TypeError, ValueError):
            raise CNIError(ERR_INVALID_CONFIG, "mtu and vlan must be integers") from None
        if self.mtu < 0 or self.mtu > 65535:
            raise CNIError(ERR_INVALID_CONFIG, f"invalid mtu {self.mtu}")
        if not 0 <= self.vlan <= 4094:
            raise CNIError(ERR_INVALID_CONFIG, f"invalid VLAN ID {self.vlan} (must be between 0 and 4094)")
        self.macspoofchk = bool(conf.get("macspoofchk"))
        ipam = conf.get("ipam") or {}
        if not isinstance(ipam, dict):
            raise CNIError(ERR_INVALID_CONFIG, "ipam must be an object")
        self.ipam_type = str(ipam.get("type") or "")


def _open_netns(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CNIError(ERR_UNKNOWN_CONTAINER, f"failed to open netns {path!r}: no such file") from None
    except OSError as e:
        raise CNIError(ERR_UNKNOWN_CONTAINER, f"failed to open netns {path!r}: {e.strerror}") from None


def _family(addr: str) -> int:
    return AF_INET6 if ":" in addr else AF_INET


def _split(cidr: str) -> tuple[str, int]:
    ip, _, plen = cidr.partition("/")
    return ip, int(plen) if plen else (128 if ":" in ip else 32)


def _write_sysctl(path: str, value: str) -> None:
    try:
        with open(path, "r+b", buffering=0) as f:
            if f.read().strip() != value.encode():
                f.seek(0)
                f.write(value.encode())
    except FileNotFoundError:
        pass


class _NS:
    """Enter a netns for a block and come back to the namespace we started in."""

    def __init__(self, target_fd: int) -> None:
        self.target = target_fd
        self.home = -1

    def __enter__(self) -> _NS:
        from cni._nl import setns

        self.home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(self.target)
        except BaseException:
            os.close(self.home)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        from cni._nl import setns

        try:
            setns(self.home)
        finally:
            os.close(self.home)


# ---------------------------------------------------------------------------------------------
# iptables (ipMasq)


def chain_name(name: str, container_id: str) -> str:
    """Same chain name as the reference plugins' ``utils.FormatChainName``."""
    try:
        from _sha512 import sha512  # the C module directly: hashlib's import costs a few ms
    except ImportError:
        from hashlib import sha512

    return "CNI-" + sha512((name + container_id).encode()).hexdigest()[:24]


def _comment(name: str, container_id: str) -> str:
    return f'name: "{name}" id: "{container_id}"'


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _find_exe(name: str) -> str:
    for d in [*(os.environ.get("PATH") or "").split(os.pathsep), "/usr/sbin", "/sbin", "/usr/bin", "/bin"]:
        if d and os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    raise CNIError(ERR_INTERNAL, f"{name} not found in PATH")


def _ipt(family: int, args: list[str], stdin: bytes = b"", restore: bool = False) -> tuple[int, str]:
    base = "ip6tables" if family == AF_INET6 else "iptables"
    exe = _find_exe(base + ("-restore" if restore else ""))
    rc, out = exec_plugin(exe, dict(os.environ), stdin, argv=[exe, *args], quiet=True)
    return rc, out.decode(errors="replace")


class Listing:
    """``iptables -t nat -S POSTROUTING``, started in the background as soon as we know we need it."""

    def __init__(self, family: int) -> None:
        exe = _find_exe("ip6tables" if family == AF_INET6 else "iptables")
        self.child = Child(exe, dict(os.environ), b"", argv=[exe, "-w", "-t", "nat", "-S", "POSTROUTING"], quiet=True)

    def jumps(self, chain: str) -> list[str]:
        rc, out = self.child.wait()
        if rc != 0:
            raise CNIError(ERR_INTERNAL, f"listing nat POSTROUTING failed (status {rc})")
        text = out.decode(errors="replace")
        return [ln for ln in text.splitlines() if ln.startswith("-A POSTROUTING ") and ln.endswith(f"-j {chain}")]


def _postrouting_jumps(family: int, chain: str, listing: Listing | None = None) -> list[str]:
    return (listing or Listing(family)).jumps(chain)


def setup_masq(family: int, name: str, cid: str, ips: list[tuple[str, int]], listing: Listing | None = None) -> None:
    """Install the masquerade chain for one pod; idempotent (re-running yields the same rules)."""
    from cni._ip import Net

    chain = chain_name(name, cid)
    comment = _quote(_comment(name, cid))
    host_len = 128 if family == AF_INET6 else 32
    mcast = "ff00::/8" if family == AF_INET6 else "224.0.0.0/4"
    existing = set(_postrouting_jumps(family, chain, listing))
    lines = ["*nat", f":{chain} - [0:0]"]  # with --noflush this creates the chain, or flushes it if present
    for ip, plen in ips:
        net = Net.parse(f"{ip}/{plen}")
        lines.append(f"-A {chain} -d {net} -m comment --comment {comment} -j ACCEPT")
    lines.append(f"-A {chain} ! -d {mcast} -m comment --comment {comment} -j MASQUERADE")
    for ip, _ in ips:
        rule = f"-A POSTROUTING -s {ip}/{host_len} -m comment --comment {comment} -j {chain}"
        if rule not in existing:
            lines.append(rule)
    lines.append("COMMIT\n")
    rc, out = _ipt(family, ["-w", "--noflush"], "\n".join(lines).encode(), restore=True)
    if rc != 0:
        raise CNIError(ERR_INTERNAL, f"failed to set up IP masquerading (status {rc})", out)


def teardown_masq(family: int, name: str, cid: str, listing: Listing | None = None) -> None:
    """Remove the pod's masquerade chain and its POSTROUTING jumps; silently succeeds if already gone."""
    chain = chain_name(name, cid)
    dels = ["-D" + ln[2:] for ln in _postrouting_jumps(family, chain, listing)]
    body = ["*nat", *dels, f"-F {chain}", f"-X {chain}", "COMMIT\n"]
    rc, _ = _ipt(family, ["-w", "--noflush"], "\n".join(body).encode(), restore=True)
    if rc != 0 and dels:  # the chain was already gone: drop the dangling jumps alone
        _ipt(family, ["-w", "--noflush"], "\n".join(["*nat", *dels, "COMMIT\n"]).encode(), restore=True)


def gc_masq(family: int, name: str, keep_ids: set[str]) -> None:
    """Remove masquerade chains of this network whose container is not a valid attachment."""
    import re

    rc, out = _ipt(family, ["-w", "-t", "nat", "-S"])
    if rc != 0:
        return
    pat = re.compile(r'--comment "name: \\"(?P<n>[^"\\]*)\\" id: \\"(?P<id>[^"\\]*)\\""')
    stale: dict[str, str] = {}
    for ln in out.splitlines():
        m = pat.search(ln)
        if m and m["n"] == name and m["id"] not in keep_ids:
            stale[chain_name(name, m["id"])] = m["id"]
    for cid in stale.values():
        teardown_masq(family, name, cid)


# ---------------------------------------------------------------------------------------------
# nftables (macspoofchk)

NFT_TABLE = "kproxy-cni"


def _spoof_chain(name: str, cid: str, ifname: str) -> str:
    return "mac-" + chain_name(name, f"{cid}/{ifname}")[4:]


def _nft(script: str) -> None:
    exe = _find_exe("nft")
    rc, _ = Child(exe, dict(os.environ), script.encode(), argv=[exe, "-f", "-"], quiet=True).wait()
    if rc != 0:
        raise CNIError(ERR_INTERNAL, f"nft failed (status {rc}) applying macspoofchk rules")


def _spoof_chain_reset(chain: str) -> list[str]:
    # "add" is idempotent and "flush" empties it: together they make the chain exist and be empty,
    # whatever state a previous (possibly interrupted) call left behind.
    return [
        f"add table bridge {NFT_TABLE}",
        f"add chain bridge {NFT_TABLE} {chain} {{ type filter hook prerouting priority -300 ; policy accept ; }}",
        f"flush chain bridge {NFT_TABLE} {chain}",
    ]


def setup_macspoofchk(name: str, cid: str, ifname: str, host_veth: str, mac: str) -> None:
    chain = _spoof_chain(name, cid, ifname)
    rule = f'add rule bridge {NFT_TABLE} {chain} iifname "{host_veth}" ether saddr != {mac} drop'
    _nft("\n".join([*_spoof_chain_reset(chain), rule, ""]))


def teardown_macspoofchk(name: str, cid: str, ifname: str) -> None:
    chain = _spoof_chain(name, cid, ifname)
    _nft("\n".join([*_spoof_chain_reset(chain), f"delete chain bridge {NFT_TABLE} {chain}", ""]))


# ---------------------------------------------------------------------------------------------
# ADD


def _ensure_bridge(nl: Any, bc: BridgeConf) -> Any:
    br = nl.link(bc.bridge)
    if br is None:
        try:
            nl.add_bridge(bc.bridge, bc.mtu, vlan_filtering=bool(bc.vlan))
        except FileExistsError:
            pass  # a concurrent ADD created it
        except OSError as e:
            what = " with VLAN filtering" if bc.vlan else ""
            raise CNIError(ERR_INTERNAL, f"failed to create bridge {bc.bridge!r}{what}: {e.strerror}") from None
        br = nl.link(bc.bridge)
        if br is None:
            raise CNIError(ERR_INTERNAL, f"could not create bridge {bc.bridge!r}")
    elif br.kind != "bridge":
        raise CNIError(ERR_INTERNAL, f"{bc.bridge!r} already exists but is not a bridge")
    from cni._nl import IFF_PROMISC, IFF_UP

    want_promisc = True if bc.promisc and not br.flags & IFF_PROMISC else None
    if not br.flags & IFF_UP or want_promisc:
        nl.set_link(br.index, up=True, promisc=want_promisc)
    if bc.vlan:
        _write_sysctl(f"/sys/class/net/{bc.bridge}/bridge/vlan_filtering", "1")
    return br


def _ensure_gateway_addr(nl: Any, br: Any, gw: str, plen: int, force: bool) -> None:
    """Put the gateway address on the bridge (reference ``ensureAddr`` semantics, incl. ``forceAddress``)."""
    from cni._ip import IP, Net

    fam = _family(gw)
    want_ip, want_net = IP.parse(gw), Net.parse(f"{gw}/{plen}")
    for _, addr, alen in nl.addrs(br.index, fam):
        have_ip, have_net = IP.parse(addr), Net.parse(f"{addr}/{alen}")
        if have_ip == want_ip and alen == plen:
            return
        if fam == AF_INET6 and (have_ip.is_link_local or not have_net.overlaps(want_net)):
            continue  # several IPv6 gateways (one per subnet) may share the bridge
        if not force:
            raise CNIError(ERR_INTERNAL, f"{br.name!r} already has an IP address different from {gw}/{plen}")
        nl.add_addr(br.index, fam, addr, alen, delete=True)
    try:
        nl.add_addr(br.index, fam, gw, plen)
    except FileExistsError:
        pass


def _configure_pod(bc: BridgeConf, ifname: str, res: dict[str, Any]) -> tuple[str, int]:
    """Inside the pod netns: bring ``ifname`` up with the IPAM addresses and routes. Returns (mac, index)."""
    from cni._nl import NL

    with NL() as nl:
        link = nl.link(ifname)
        if link is None:
            raise CNIError(ERR_INTERNAL, f"{ifname} did not appear in the container netns")
        gws: dict[int, str] = {}
        for ipc in res["ips"]:
            ip, plen = _split(ipc["address"])
            fam = _family(ip)
            if fam == AF_INET6:
                _write_sysctl(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "0")
            nl.add_addr(link.index, fam, ip, plen)
            if ipc.get("gateway"):
                gws.setdefault(fam, ipc["gateway"])
        nl.set_link(link.index, up=True)
        for r in res.get("routes") or []:
            dst, dlen = _split(r["dst"])
            fam = _family(dst)
            gw = r.get("gw") or gws.get(fam)
            try:
                nl.add_route(
                    fam,
                    dst,
                    dlen,
                    gateway=gw,
                    oif=link.index,
                    table=int(r.get("table") or 0),
                    priority=int(r.get("priority") or 0),
                    mtu=int(r.get("mtu") or 0),
                    advmss=int(r.get("advmss") or 0),
                    scope=r.get("scope"),
                )
            except FileExistsError:
                pass
            except OSError as e:
                raise CNIError(ERR_INTERNAL, f"failed to add route {r}: {e.strerror}") from None
        return link.mac, link.index


def _add_default_routes(bc: BridgeConf, res: dict[str, Any]) -> None:
    routes = res.setdefault("routes", [])
    for ipc in res["ips"]:
        gw = ipc.get("gateway")
        if not gw:
            continue
        dst = "::/0" if ":" in gw else "0.0.0.0/0"
        same = [r for r in routes if r.get("dst") == dst]
        if any(r.get("gw") and r["gw"] != gw for r in same):
            raise CNIError(
                ERR_INVALID_CONFIG, f"isDefaultGateway ineffective because IPAM sets default route via {same[0]['gw']}"
            )
        if not same:
            routes.append({"dst": dst, "gw": gw})


def _ifindex(ns_fd: int, ifname: str) -> int:
    """Index of ``ifname`` in the netns, 0 if absent (if_nametoindex on a socket made inside it)."""
    import _socket  # the C module: the socket wrapper pulls in enum & selectors (~8 ms)

    with _NS(ns_fd):
        try:
            return _socket.if_nametoindex(ifname)
        except OSError:
            return 0


def cmd_add(args: Args) -> dict[str, Any]:
    bc = BridgeConf(args.conf)
    ns_fd = _open_netns(args.netns)
    nl: Any = None
    ipam: Delegation | None = None
    masq_done = spoof_done = False
    host_veth = ""
    try:
        if _ifindex(ns_fd, args.ifname):
            raise CNIError(ERR_INTERNAL, f"container veth name provided ({args.ifname}) already exists")
        # Start IPAM first and let it run while we load netlink support and build the links: the two
        # interpreter start-ups overlap. Nothing is left behind if either side fails (see _rollback).
        if bc.ipam_type:
            ipam = Delegation(bc.ipam_type, "ADD", args)
        listings = {f: Listing(f) for f in _masq_families(args)} if bc.ip_masq else {}
        from cni._nl import NL

        nl = NL()
        br = _ensure_bridge(nl, bc)
        for _ in range(5):
            host_veth = "veth" + os.urandom(4).hex()
            try:
                nl.add_veth(host_veth, args.ifname, ns_fd, bc.mtu)
                break
            except FileExistsError:
                if nl.link(host_veth) is None:
                    host_veth = ""
                    raise CNIError(
                        ERR_INTERNAL, f"container veth name provided ({args.ifname}) already exists"
                    ) from None
        else:
            host_veth = ""
            raise CNIError(ERR_INTERNAL, "could not find a free host veth name")
        hv = nl.link(host_veth)
        if hv is None:
            raise CNIError(ERR_INTERNAL, f"host veth {host_veth} vanished")
        nl.set_link(hv.index, master=br.index, up=True)
        if bc.hairpin or bc.vlan:
            nl.set_brport(hv.index, hairpin=True if bc.hairpin else None, vlan=bc.vlan)
        res: dict[str, Any] = {"ips": [], "routes": [], "dns": {}}
        if ipam is not None:
            res = ipam.result() or res
            if bc.is_gw:
                from cni._ip import Net

                for ipc in res["ips"]:
                    if not ipc.get("gateway"):
                        ipc["gateway"] = str(Net.parse(ipc["address"]).network_address + 1)
            if bc.is_default_gw:
                _add_default_routes(bc, res)
        with _NS(ns_fd):
            cmac, _ = _configure_pod(bc, args.ifname, res)
        if bc.is_gw:
            for ipc in res["ips"]:
                if ipc.get("gateway"):
                    _ensure_gateway_addr(nl, br, ipc["gateway"], _split(ipc["address"])[1], bc.force_address)
            fams = {_family(ipc["address"]) for ipc in res["ips"]}
            if AF_INET in fams:
                _write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")
            if AF_INET6 in fams:
                _write_sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1")
        if bc.ip_masq:
            by_fam: dict[int, list[tuple[str, int]]] = {}
            for ipc in res["ips"]:
                ip, plen = _split(ipc["address"])
                by_fam.setdefault(_family(ip), []).append((ip, plen))
            for fam, ips in by_fam.items():
                masq_done = True
                setup_masq(fam, bc.name, args.container_id, ips, listings.get(fam))
        if bc.macspoofchk:
            spoof_done = True
            setup_macspoofchk(bc.name, args.container_id, args.ifname, host_veth, cmac)
        br = nl.link(bc.bridge) or br  # the bridge's MAC may change when its first port is enslaved
    except BaseException:
        _rollback(args, bc, nl, host_veth, ipam, masq_done, spoof_done)
        raise
    finally:
        if nl is not None:
            nl.close()
        os.close(ns_fd)
    for ipc in res["ips"]:
        ipc["interface"] = 2
    res["interfaces"] = [
        {"name": br.name, "mac": br.mac},
        {"name": host_veth, "mac": hv.mac},
        {"name": args.ifname, "mac": cmac, "sandbox": args.netns},
    ]
    if bc.mtu:
        for itf in res["interfaces"]:
            itf["mtu"] = bc.mtu
    return res


def _rollback(
    args: Args, bc: BridgeConf, nl: Any, host_veth: str, ipam: Delegation | None, masq: bool, spoof: bool
) -> None:
    """Undo a failed ADD: veth, masquerade rules and -- unless IPAM itself failed -- the IPAM allocation."""
    try:
        if host_veth and nl is not None:
            nl.del_link(name=host_veth)
        if spoof:
            teardown_macspoofchk(bc.name, args.container_id, args.ifname)
        if masq:
            for fam in (AF_INET, AF_INET6):
                teardown_masq(fam, bc.name, args.container_id)
    except Exception:
        pass
    if ipam is not None:
        try:
            ipam.result()
        except Exception:
            pass
        if not ipam.failed_cleanly:
            try:
                delegate(bc.ipam_type, "DEL", args)
            except Exception:
                pass


# ---------------------------------------------------------------------------------------------
# DEL / CHECK / STATUS / GC


def _masq_families(args: Args) -> set[int]:
    """Address families a pod's masquerade rules can exist for, without looking at its (gone) interface."""
    prev = normalize_result(args.conf.get("prevResult") or {})
    fams = {_family(ipc["address"]) for ipc in prev["ips"]}
    if fams:
        return fams
    ipam = args.conf.get("ipam") or {}
    if ipam.get("type") in ("host-local", "kproxy-host-local"):
        from cni import _json

        text = _json.dumps([ipam.get("ranges"), ipam.get("subnet")])
        return {AF_INET6 if ":" in text else AF_INET} | ({AF_INET} if "." in text else set())
    return {AF_INET, AF_INET6}


def cmd_del(args: Args) -> None:
    bc = BridgeConf(args.conf)
    # IPAM and the iptables listing run in the background while we tear down the link.
    ipam = Delegation(bc.ipam_type, "DEL", args) if bc.ipam_type else None
    listings = {f: Listing(f) for f in sorted(_masq_families(args))} if bc.ip_masq else {}
    if args.netns:
        try:
            ns_fd = os.open(args.netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            ns_fd = -1  # netns already gone: the veth went with it
        if ns_fd >= 0:
            try:
                index = _ifindex(ns_fd, args.ifname)
            except OSError:
                index = 0  # not a network namespace (any more), e.g. a leftover empty mount point
            try:
                if index:
                    from cni._nl import delete_link_by_index

                    with _NS(ns_fd):
                        delete_link_by_index(index)  # takes the host end of the veth pair with it
            finally:
                os.close(ns_fd)
    for fam, listing in listings.items():
        teardown_masq(fam, bc.name, args.container_id, listing)
    if bc.macspoofchk:
        teardown_macspoofchk(bc.name, args.container_id, args.ifname)
    if ipam is not None:
        ipam.result()


def cmd_check(args: Args) -> None:
    from cni._nl import IFF_UP, NL

    bc = BridgeConf(args.conf)
    prev = args.conf.get("prevResult")
    if not isinstance(prev, dict):
        raise CNIError(ERR_INVALID_CONFIG, "Required prevResult missing")
    prev = normalize_result(prev)
    if bc.ipam_type:
        delegate(bc.ipam_type, "CHECK", args)
    ns_fd = _open_netns(args.netns)
    try:
        with NL() as nl:
            br = nl.link(bc.bridge)
            if br is None or br.kind != "bridge":
                raise CNIError(ERR_INTERNAL, f"bridge {bc.bridge} not found")
            host_ifs = [i for i in prev.get("interfaces") or [] if not i.get("sandbox") and i.get("name") != bc.bridge]
            hv = nl.link(host_ifs[0]["name"]) if host_ifs else None
            if hv is None:
                raise CNIError(ERR_INTERNAL, "host veth of the container not found")
            if hv.master != br.index:
                raise CNIError(ERR_INTERNAL, f"{hv.name} is not attached to {bc.bridge}")
        with _NS(ns_fd), NL() as nl:
            link = nl.link(args.ifname)
            if link is None:
                raise CNIError(ERR_INTERNAL, f"interface {args.ifname} not found in {args.netns}")
            if link.peer_index and link.peer_index != hv.index:
                raise CNIError(ERR_INTERNAL, f"{args.ifname} is not the peer of {hv.name}")
            if not link.flags & IFF_UP:
                raise CNIError(ERR_INTERNAL, f"interface {args.ifname} is down")
            for itf in prev.get("interfaces") or []:
                mac = str(itf.get("mac") or "")
                if itf.get("sandbox") and itf.get("name") == args.ifname and mac and mac.lower() != link.mac.lower():
                    raise CNIError(ERR_INTERNAL, f"{args.ifname} MAC {link.mac} does not match {itf['mac']}")
            have = {(a, p) for _, a, p in nl.addrs(link.index)}
            for ipc in prev["ips"]:
                ip, plen = _split(ipc["address"])
                if (ip, plen) not in have:
                    raise CNIError(ERR_INTERNAL, f"address {ipc['address']} not found on {args.ifname}")
            for r in prev.get("routes") or []:
                dst, dlen = _split(r["dst"])
                fam = _family(dst)
                gw = r.get("gw")
                ok = any(
                    kr["dst_len"] == dlen and (dlen == 0 or kr["dst"] == dst) and (not gw or kr["gateway"] == gw)
                    for kr in nl.routes(fam)
                )
                if not ok:
                    raise CNIError(ERR_INTERNAL, f"route {r} not found in {args.netns}")
    finally:
        os.close(ns_fd)


def cmd_status(args: Args) -> None:
    bc = BridgeConf(args.conf)
    if bc.ipam_type:
        delegate(bc.ipam_type, "STATUS", args)


def cmd_gc(args: Args) -> None:
    bc = BridgeConf(args.conf)
    if bc.ipam_type:
        delegate(bc.ipam_type, "GC", args)
    if bc.ip_masq:
        valid = args.conf.get(VALID_ATTACHMENTS_KEY) or []
        keep = {str(a.get("containerID", "")) for a in valid if isinstance(a, dict)}
        for fam in (AF_INET, AF_INET6):
            gc_masq(fam, bc.name, keep)


HANDLERS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status, "GC": cmd_gc}


def main() -> int:
    return run(HANDLERS)


if __name__ == "__main__":
    sys.exit(main())
