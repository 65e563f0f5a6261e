"""StoreLimiter when the drain's cancellation is swallowed by the store's wait (Python
3.11's asyncio.wait_for returns or raises what its inner wait ended with, in the same tick
as a cancellation): the request is still sent away, and nothing of it stays behind."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable

import pytest
from sluice.proxy.limit_store import StoreDown, StoreLimiter
from sluice.proxy.limits import LimitExceeded
from sluice.proxy.snapshot import QueueLimits


class _SwallowingStore:
    """A store whose wait turns a cancellation into `outcome` (as wait_for can)."""

    def __init__(self, outcome: Callable[[], BaseException]) -> None:
        self.outcome = outcome
        self.on_change: list[Callable[[bool], None]] = []
        self.up = True

    def share(self, max_concurrency: int) -> int:
        return max_concurrency

    async def take(self, limiter: StoreLimiter) -> tuple[Hashable, float]:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise self.outcome() from None
        raise AssertionError("not cancelled")

    def give_back(self, limiter: StoreLimiter, handle: Hashable) -> None:
        pass

    def adopt(self, limiter: StoreLimiter) -> Hashable:
        return None


async def _drained(outcome: Callable[[], BaseException]) -> tuple[str, StoreLimiter, int]:
    limiter = StoreLimiter(_SwallowingStore(outcome), "app:a", 1, QueueLimits(4, 5.0))

    async def request() -> int:
        try:
            await limiter.acquire()
        except LimitExceeded as exc:
            task = asyncio.current_task()
            assert task is not None
            return task.cancelling() if exc.reason else -1
        return -2

    task = asyncio.get_running_loop().create_task(request())
    await asyncio.sleep(0.01)
    assert limiter.reject_waiters() == 1
    cancelling = await task
    return "done", limiter, cancelling


@pytest.mark.parametrize(
    "outcome",
    [lambda: LimitExceeded("app:a", "queue_full", 1), lambda: StoreDown("gone")],
    ids=["refused", "store-down"],
)
def test_a_swallowed_drain_cancellation_leaves_nothing_behind(
    outcome: Callable[[], BaseException],
) -> None:
    _, limiter, cancelling = asyncio.run(_drained(outcome))
    assert cancelling == 0  # the limiter's cancellation was withdrawn
    assert limiter._ending == {}  # no task kept
    assert limiter.in_use == 0 and limiter.queued == 0


def test_a_requests_own_deadline_bounds_its_wait_in_the_store() -> None:
    """`acquire(max_wait)`: the store is asked with what is left of the shorter of the
    queue's max_wait and the request's own deadline (the permit server and Redis wait
    that long, then answer queue_timeout)."""
    seen: list[float] = []

    class _Recording(_SwallowingStore):
        async def take(self, limiter: StoreLimiter) -> tuple[Hashable, float]:
            seen.append(limiter.wait_left())
            raise LimitExceeded(limiter.name, "queue_timeout", 1)

    async def run() -> None:
        limiter = StoreLimiter(_Recording(StoreDown), "app:a", 1, QueueLimits(4, 5.0))
        for max_wait in (0.2, None, 30.0):
            with pytest.raises(LimitExceeded):
                await limiter.acquire(max_wait)

    asyncio.run(run())
    assert seen[0] <= 0.2 and 4.5 < seen[1] <= 5.0 and 4.5 < seen[2] <= 5.0, seen
