"""Bounded-frequency sync runner (kube-proxy's BoundedFrequencyRunner, on asyncio).

``request()`` asks for a sync as soon as allowed: never sooner than ``min_interval`` after the previous
one starts, so a burst of watch events is coalesced into one sync. Without requests a periodic sync
runs every ``max_interval``. A failing sync is retried after an exponential backoff (starting at
``retry_min``, capped at ``retry_max``). The sync function itself runs in a worker thread so the event
loop (watch streams, health checks) stays responsive while iptables-restore runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class SyncRunner:
    def __init__(self, fn: Callable[[bool], None], min_interval: float, max_interval: float,
                 retry_min: float = 1.0, retry_max: float = 30.0) -> None:
        """``fn(periodic)`` performs one sync; it raises to signal failure."""
        self.fn = fn
        self.min_interval = min_interval
        self.max_interval = max_interval if max_interval > 0 else 3600.0
        self.retry_min = retry_min
        self.retry_max = retry_max
        self._wake = asyncio.Event()
        self._requested = True  # the first sync runs as soon as the runner starts
        self._last_start = float("-inf")
        self.failures = 0
        self.syncs = 0

    def request(self) -> None:
        """Ask for a sync (thread-safe only via loop.call_soon_threadsafe)."""
        self._requested = True
        self._wake.set()

    async def run(self) -> None:
        next_periodic = time.monotonic() + self.max_interval
        retry_at: float | None = None
        while True:
            now = time.monotonic()
            due = [next_periodic]
            if self._requested:
                due.append(max(self._last_start + self.min_interval, now))
            if retry_at is not None:
                due.append(retry_at)
            wait = min(due) - now
            if wait > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=wait)
                except TimeoutError:
                    pass
                continue
            periodic = now >= next_periodic and not self._requested and retry_at is None
            self._requested = False
            retry_at = None
            self._last_start = time.monotonic()
            try:
                await asyncio.to_thread(self.fn, periodic)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.failures += 1
                backoff = min(self.retry_max, self.retry_min * 2 ** min(self.failures - 1, 10))
                # a SyncError is an expected, explained failure; anything else is a bug: show where it happened
                from .dataplane import SyncError

                log.error("sync failed (attempt %d), retrying in %.1fs: %s", self.failures, backoff, e,
                          exc_info=not isinstance(e, SyncError))
                retry_at = time.monotonic() + backoff
            else:
                self.failures = 0
                self.syncs += 1
            next_periodic = time.monotonic() + self.max_interval
