"""The IPVS mode's ipsets: creation (``ipset restore``), member syntax and read-back.

pyroute2's ``IPSet`` would avoid the exec, but it costs one netlink round trip (and asyncio turn) per
member: ~19 ms per call in the test VM, i.e. minutes for the tens of thousands of members of a large
cluster. Sets are created with ``ipset restore -exist`` (once, at setup); members are added and deleted
in batches over nfnetlink (:class:`.netlink.IPSetClient`) and read back with one netlink dump.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess

from .. import SetupError, SyncError
from .desired import SET_TYPES, all_set_names, base_name
from .netlink import IPSetClient


def available() -> bool:
    return shutil.which("ipset") is not None


def create_line(name: str, family: int) -> str:
    stype, _ = SET_TYPES[base_name(name)]
    if stype.startswith("bitmap"):
        return f"create {name} {stype} range 0-65535"
    return f"create {name} {stype} family {'inet6' if family == 6 else 'inet'} hashsize 1024 maxelem 1048576"


def normalize(member: str) -> str:
    """``ipset save`` prints a full-length net without its prefix; make desired members compare equal."""
    head, sep, last = member.rpartition(",")
    if sep and "/" in last:
        net = ipaddress.ip_network(last, strict=False)
        if net.prefixlen == net.max_prefixlen:
            return f"{head},{net.network_address}"
        return f"{head},{net}"
    return member


def run_restore(lines: list[str]) -> None:
    if not lines:
        return
    p = subprocess.run(["ipset", "restore", "-exist"], input="\n".join(lines) + "\n", capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise SyncError(f"ipset restore failed: {p.stderr.strip()}")


def ensure_sets() -> None:
    """Create every set this mode owns (keeping existing members)."""
    if not available():
        raise SetupError("ipset not found: install the ipset package")
    run_restore([create_line(name, fam) for name, fam in all_set_names()])


def read_members(client: IPSetClient | None = None) -> dict[str, set[str]]:
    """Members of our sets as the kernel has them, in ``ipset save`` syntax (sets that do not exist are
    absent). One netlink dump (``client``'s socket, or a temporary one)."""
    ours = {name for name, _ in all_set_names()}
    c = client or IPSetClient()
    try:
        listed = c.list_members()
    except OSError as e:
        raise SyncError(f"cannot list ipsets: {e}") from None
    finally:
        if client is None:
            c.close()
    return {name: members for name, members in listed.items() if name in ours}


def destroy_all() -> bool:
    """Destroy every set this mode owns; True if any existed. Must run after the iptables rules are gone."""
    existing = read_members()
    if not existing:
        return False
    lines = [f"flush {n}" for n in existing] + [f"destroy {n}" for n in existing]
    p = subprocess.run(["ipset", "restore"], input="\n".join(lines) + "\n", capture_output=True, text=True)
    if p.returncode != 0:
        raise SyncError(f"ipset destroy failed: {p.stderr.strip()}")
    return True
