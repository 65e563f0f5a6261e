"""StoreLimiter when the drain's cancellation is swallowed by the store's wait (Python
3.11's asyncio.wait_for returns or raises what its inner wait ended with, in the same tick
as a cancellation): the request is still sent away, and nothing of it stays behind. And a
request's own deadline bounding its wait in every limiter's queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable

import pytest
from sluice.proxy.limit_store import StoreDown, StoreLimiter
from sluice.proxy.limits import Limiter, LimitExceeded
from sluice.proxy.snapshot import QueueLimits, StreamTimeouts
from sluice.proxy.timeouts import request_deadline


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
    """`acquire(deadline)`: the store is asked with what is left of the shorter of the
    queue's max_wait and the request's own deadline (the permit server and Redis wait
    that long, then answer queue_timeout); a deadline already past leaves no wait."""
    seen: list[float] = []

    class _Recording(_SwallowingStore):
        async def take(self, limiter: StoreLimiter) -> tuple[Hashable, float]:
            seen.append(limiter.wait_left())
            raise LimitExceeded(limiter.name, "queue_timeout", 1)

    async def run() -> None:
        limiter = StoreLimiter(_Recording(StoreDown), "app:a", 1, QueueLimits(4, 5.0))
        now = time.monotonic()
        for deadline in (now + 0.2, None, now + 30.0, now - 1.0):
            with pytest.raises(LimitExceeded):
                await limiter.acquire(deadline)

    asyncio.run(run())
    assert seen[0] <= 0.2 and 4.5 < seen[1] <= 5.0 and 4.5 < seen[2] <= 5.0, seen
    assert seen[3] == 0.0, seen


def test_the_local_queue_ends_a_wait_at_the_requests_deadline() -> None:
    """Limiter.acquire(deadline): a queued request leaves with queue_timeout at its own
    deadline when that comes before the queue's max_wait, and at max_wait otherwise."""

    async def waited_until_refused(deadline_in: float | None) -> float:
        limiter = Limiter("backend:b", 1, QueueLimits(4, 0.6))
        held = await limiter.acquire()
        started = time.monotonic()
        deadline = None if deadline_in is None else started + deadline_in
        with pytest.raises(LimitExceeded) as refused:
            await limiter.acquire(deadline)
        assert refused.value.reason == "queue_timeout"
        held.release()
        assert limiter.in_use == 0 and limiter.queued == 0
        return time.monotonic() - started

    assert asyncio.run(waited_until_refused(0.1)) < 0.45
    assert 0.55 < asyncio.run(waited_until_refused(None)) < 2.0
    assert 0.55 < asyncio.run(waited_until_refused(30.0)) < 2.0


def test_the_request_deadline_is_its_first_limit_from_the_start() -> None:
    """total bounds every request; first_token and response_head only streams."""
    limits = StreamTimeouts(first_token=2.0, total=5.0, response_head=3.0, inter_token=0.5)
    assert request_deadline(limits, 100.0, stream=True) == 102.0
    assert request_deadline(limits, 100.0, stream=False) == 105.0
    assert request_deadline(StreamTimeouts(response_head=1.5), 100.0, stream=True) == 101.5
    assert request_deadline(StreamTimeouts(first_token=1.0), 100.0, stream=False) is None
    assert request_deadline(StreamTimeouts(inter_token=1.0), 100.0, stream=True) is None
