"""Source NAT for NodePort / external traffic the tc program DNATs (externalTrafficPolicy Cluster).

The tc program only marks such packets (the masquerade bit, 0x4000 by default); one nftables rule
masquerades marked packets on the way out. Conntrack then allocates the source port and un-SNATs the
replies before the tc egress program reverses the DNAT. The table is created only when some frontend
needs SNAT, so nodes without such Services keep conntrack off their pod traffic.
"""

from __future__ import annotations

import shutil
import subprocess

TABLE = "kproxy_ebpf"


class SnatError(RuntimeError):
    pass


def _nft(script: str) -> subprocess.CompletedProcess[str]:
    nft = shutil.which("nft")
    if nft is None:
        raise SnatError("nft (nftables) is needed to masquerade NodePort traffic (externalTrafficPolicy Cluster)")
    return subprocess.run([nft, "-f", "-"], input=script, capture_output=True, text=True, timeout=30)


def ruleset(mark: int) -> str:
    return (f"table inet {TABLE}\n"
            f"flush table inet {TABLE}\n"
            f"table inet {TABLE} {{\n"
            f"  chain postrouting {{\n"
            f"    type nat hook postrouting priority srcnat; policy accept;\n"
            f"    meta mark & {mark:#x} == {mark:#x} masquerade fully-random\n"
            f"  }}\n"
            f"}}\n")


def install(mark: int) -> None:
    p = _nft(ruleset(mark))
    if p.returncode != 0:
        raise SnatError(f"installing the masquerade rule failed: {p.stderr.strip()}")


def remove() -> bool:
    if shutil.which("nft") is None:
        return False
    p = subprocess.run(["nft", "delete", "table", "inet", TABLE], capture_output=True, text=True, timeout=30)
    return p.returncode == 0
