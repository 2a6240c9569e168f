"""Running iptables: choosing the back end (legacy or nft) and invoking save/restore.

Like kube-proxy (and the iptables-wrapper script kubelet images use), kproxy must program the same
back end the node already uses, or rules land in a table nobody evaluates first. ``auto`` picks, in
order: the back end already holding kproxy's chains (a restart adopts them), the one holding kubelet's
``KUBE-IPTABLES-HINT`` chain, the one with more rules, and finally what ``iptables`` on PATH is.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from .. import SetupError, SyncError

log = logging.getLogger(__name__)

WAIT = ["-w", "5"]


@dataclass(frozen=True, slots=True)
class Backend:
    name: str  # legacy | nft
    family: int

    def _tool(self, suffix: str) -> str:
        base = "iptables" if self.family == 4 else "ip6tables"
        return f"{base}-{self.name}{suffix}"

    @property
    def iptables(self) -> str:
        return self._tool("")

    @property
    def save_cmd(self) -> str:
        return self._tool("-save")

    @property
    def restore_cmd(self) -> str:
        return self._tool("-restore")

    def available(self) -> bool:
        return shutil.which(self.iptables) is not None and shutil.which(self.restore_cmd) is not None

    def save(self, table: str | None = None) -> str:
        argv = [self.save_cmd] + (["-t", table] if table else [])
        p = subprocess.run(argv, capture_output=True, text=True)
        if p.returncode != 0:
            raise SyncError(f"{' '.join(argv)} failed: {p.stderr.strip()}")
        return p.stdout

    def restore(self, text: str) -> None:
        """Apply ``text`` atomically with --noflush; raise SyncError (kernel unchanged) on failure."""
        argv = [self.restore_cmd, *WAIT, "--noflush"]
        p = subprocess.run(argv, input=text, capture_output=True, text=True)
        if p.returncode != 0:
            lines = text.splitlines()
            line = failed_line(p.stderr, lambda n: lines[n - 1] if 0 < n <= len(lines) else None)
            raise SyncError(f"{self.restore_cmd} failed ({p.returncode}): {p.stderr.strip()}{line}")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([self.iptables, *WAIT, *args], capture_output=True, text=True)
        if check and p.returncode != 0:
            raise SyncError(f"{self.iptables} {' '.join(args)} failed: {p.stderr.strip()}")
        return p

    def ensure_rule(self, table: str, chain: str, spec: list[str]) -> bool:
        """Insert ``spec`` at the top of ``chain`` unless it is already there; True if inserted."""
        if self.run("-t", table, "-C", chain, *spec, check=False).returncode == 0:
            return False
        self.run("-t", table, "-I", chain, *spec)
        return True

    def delete_rule(self, table: str, chain: str, spec: list[str]) -> bool:
        found = False
        while self.run("-t", table, "-D", chain, *spec, check=False).returncode == 0:
            found = True
        return found


def failed_line(stderr: str, line_at: Callable[[int], str | None]) -> str:
    """iptables-restore names the failing line number; show that line to make errors actionable."""
    m = re.search(r"line:? (\d+)", stderr)
    if not m:
        return ""
    n = int(m.group(1))
    line = line_at(n)
    return f" [line {n}: {line!r}]" if line is not None else ""


def _count_rules(b: Backend) -> tuple[int, bool, bool]:
    """(rule count, has KUBE-IPTABLES-HINT, has kproxy chains) for one back end, best effort."""
    try:
        out = subprocess.run([b.save_cmd], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0, False, False
    rules = sum(1 for line in out.splitlines() if line.startswith("-A "))
    return rules, ":KUBE-IPTABLES-HINT" in out, ":KPROXY-" in out


def detect(requested: str, family: int = 4) -> str:
    """Resolve ``auto`` to ``legacy`` or ``nft`` for this node (see module docstring)."""
    if requested in ("legacy", "nft"):
        if not Backend(requested, family).available():
            raise SetupError(f"iptables back end {requested!r} is not installed "
                             f"(need {Backend(requested, family).restore_cmd})")
        return requested
    candidates = [b for b in (Backend("legacy", family), Backend("nft", family)) if b.available()]
    if not candidates:
        raise SetupError("no iptables found: install the iptables package (iptables-legacy or iptables-nft)")
    if len(candidates) == 1:
        return candidates[0].name
    stats = {b.name: _count_rules(b) for b in candidates}
    for name, (_, _, ours) in stats.items():
        if ours:
            return name
    for name, (_, hint, _) in stats.items():
        if hint:
            return name
    if stats["legacy"][0] > stats["nft"][0]:
        return "legacy"
    if stats["nft"][0] > stats["legacy"][0]:
        return "nft"
    try:
        version = subprocess.run(["iptables", "-V"], capture_output=True, text=True).stdout
    except OSError:
        version = ""
    return "legacy" if "legacy" in version else "nft"
