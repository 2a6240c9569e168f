"""The IPVS mode's ipsets, applied with one ``ipset restore`` per sync.

pyroute2's ``IPSet`` would avoid the exec, but it costs one netlink round trip (and asyncio turn) per
member: ~19 ms per call in the test VM, i.e. minutes for the tens of thousands of members of a large
cluster. ``ipset restore -exist`` applies any number of creates/adds/deletes in one process (a few ms),
which is what kube-proxy does too. Reading back uses ``ipset save`` once.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess

from .. import SetupError, SyncError
from .desired import SET_TYPES, all_set_names, base_name


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


def read_members() -> dict[str, set[str]]:
    """Members of our sets as the kernel has them (sets that do not exist are absent)."""
    ours = {name for name, _ in all_set_names()}
    p = subprocess.run(["ipset", "save"], capture_output=True, text=True)
    if p.returncode != 0:
        raise SyncError(f"ipset save failed: {p.stderr.strip()}")
    out: dict[str, set[str]] = {}
    for line in p.stdout.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "create" and words[1] in ours:
            out.setdefault(words[1], set())
        elif len(words) >= 3 and words[0] == "add" and words[1] in ours:
            out.setdefault(words[1], set()).add(words[2])
    return out


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
