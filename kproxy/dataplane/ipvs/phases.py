"""Per-phase timing of a sync: wall time plus the process's user and system CPU time.

The split matters for a netlink data plane: the kernel processes a netlink request synchronously in the
sender's ``send()``, so kernel work shows up as *system* time of this process and kproxy's own Python
(rendering, encoding) as *user* time. A phase whose system time grows faster than its input points at the
kernel; one whose user time does points at kproxy.
"""

from __future__ import annotations

import os
import time


class PhaseTimer:
    """Accumulates ``(wall, user, sys)`` seconds per named phase; ``mark(name)`` closes the running phase."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.user: dict[str, float] = {}
        self.sys: dict[str, float] = {}
        self._t = time.perf_counter()
        self._cpu = os.times()

    def mark(self, name: str) -> None:
        """Charge the time since the previous mark (or creation) to ``name``."""
        t, cpu = time.perf_counter(), os.times()
        self.wall[name] = self.wall.get(name, 0.0) + t - self._t
        self.user[name] = self.user.get(name, 0.0) + cpu.user - self._cpu.user
        self.sys[name] = self.sys.get(name, 0.0) + cpu.system - self._cpu.system
        self._t, self._cpu = t, cpu

    def as_extra(self) -> dict[str, float]:
        """Flat keys for ``SyncResult.extra``: ``phase.<name>``, ``phase_user.<name>``, ``phase_sys.<name>``."""
        out: dict[str, float] = {}
        for name, v in self.wall.items():
            out[f"phase.{name}"] = v
            out[f"phase_user.{name}"] = self.user[name]
            out[f"phase_sys.{name}"] = self.sys[name]
        return out
