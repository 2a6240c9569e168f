import asyncio
import time

from kproxy.runner import SyncRunner


def test_bursts_coalesce_and_failures_retry_with_backoff() -> None:
    calls: list[float] = []
    fail = {"n": 2}

    def fn(periodic: bool) -> None:
        calls.append(time.monotonic())
        if len(calls) > 1 and fail["n"] > 0:
            fail["n"] -= 1
            raise RuntimeError("restore failed")

    async def scenario() -> SyncRunner:
        r = SyncRunner(fn, min_interval=0.2, max_interval=60, retry_min=0.1, retry_max=0.4)
        task = asyncio.create_task(r.run())
        await asyncio.sleep(0.05)  # the initial sync
        for _ in range(50):  # a burst of events
            r.request()
            await asyncio.sleep(0.001)
        await asyncio.sleep(1.2)
        task.cancel()
        return r

    r = asyncio.run(scenario())
    # 1 initial + 1 coalesced burst (failing) + 1 retry (failing) + 1 retry (ok)
    assert len(calls) == 4, calls
    # min interval honoured (timestamps are taken inside the worker thread, hence the scheduling slack)
    assert calls[1] - calls[0] >= 0.15
    assert r.failures == 0 and r.syncs == 2
    assert calls[3] - calls[2] >= calls[2] - calls[1] - 0.01  # backoff grows


def test_periodic_sync() -> None:
    seen: list[bool] = []

    async def scenario() -> None:
        r = SyncRunner(seen.append, min_interval=0, max_interval=0.15)
        task = asyncio.create_task(r.run())
        await asyncio.sleep(0.5)
        task.cancel()

    asyncio.run(scenario())
    assert seen[0] is False and seen.count(True) >= 2
