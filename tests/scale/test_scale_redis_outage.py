"""Limits on Redis (proxy/limit_redis.py) around a Redis that pauses or loses its data,
with the stores of two "processes" in one event loop against a real redis-server:

- a pause leaves no lease nobody uses: what could not be given back while Redis was
  unreachable (leases of requests that ended, tickets of requests that moved to the local
  queue, calls Redis ran once it resumed) is removed before global limits apply again;
- a queued request has one deadline, however often it moves between Redis and the local
  queue;
- falling back to the local share takes one store_timeout, not two;
- a flushed Redis (or one restarted empty) does not grant from what is left: the limit
  holds to the limit plus one process's share, as in any outage, not twice the limit.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import pytest
from sluice.proxy.limit_redis import RedisPermitStore
from sluice.proxy.limit_store import StoreLimiter, store_factory
from sluice.proxy.limits import LimitExceeded, Permit
from sluice.proxy.snapshot import QueueLimits

from tests.scale.fixtures import RedisServer, held_key

NAME = "app:a"
HELD = held_key(NAME)
QUEUE = HELD.removesuffix(":held") + ":queue"


async def _store(redis: RedisServer, *, lease: float, timeout: float) -> RedisPermitStore:
    store = RedisPermitStore(redis.url, lease=lease, timeout=timeout, keep_idle=0)
    await store.start()
    assert store.up
    return store


def _limiter(store: RedisPermitStore, limit: int, queue: QueueLimits) -> StoreLimiter:
    return store_factory(store)(NAME, limit, queue)


async def _until(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def _run(redis: RedisServer, scenario: Callable[[], object]) -> None:
    async def main() -> None:
        try:
            await scenario()  # type: ignore[misc]
        finally:
            redis.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_a_pause_leaves_no_lease_that_nobody_uses(redis: RedisServer) -> None:
    async def scenario() -> None:
        # Lease 9 s: the leases left over would outlive the recovery (about 6 s here, the
        # stores' first renewal coming lease/3 after their start).
        a, b = [await _store(redis, lease=9, timeout=0.3) for _ in range(2)]
        queue = QueueLimits(max_len=8, max_wait=20.0)
        on_a, on_b = _limiter(a, 2, queue), _limiter(b, 2, queue)
        try:
            first, second = await on_a.acquire(), await on_a.acquire()
            queued = asyncio.create_task(on_b.acquire())
            await _until("a ticket in Redis", lambda: redis.zcard(QUEUE) == 1)
            redis.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
            # Its take times out; Redis runs it once it resumes.
            late = asyncio.create_task(on_b.acquire())
            first.release()  # its give-back times out
            await _until("both on the local share", lambda: not a.up and not b.up)
            second.release()  # Redis is unreachable: nothing is sent
            # Both of b's requests moved to its local queue: one took b's share (2 / 2).
            done, waiting = await asyncio.wait(
                [queued, late], timeout=5, return_when="FIRST_COMPLETED"
            )
            assert len(done) == len(waiting) == 1
            redis.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
            await _until("global limits again", lambda: a.up and b.up)
            # Back in Redis's queue, the other one finds a free permit at once: Redis
            # counts the two requests in flight, nothing else.
            taken = await asyncio.wait_for(waiting.pop(), 2)
            assert (redis.zcard(HELD), redis.zcard(QUEUE)) == (2, 0)
            done.pop().result().release()
            taken.release()
            await _until("every lease given back", lambda: redis.zcard(HELD) == 0, 2)
        finally:
            await a.aclose()
            await b.aclose()

    _run(redis, scenario)


@pytest.mark.timeout(60)
def test_a_queued_request_has_one_deadline_across_store_changes(redis: RedisServer) -> None:
    async def scenario() -> None:
        store = await _store(redis, lease=3, timeout=0.3)
        limiter = _limiter(store, 1, QueueLimits(max_len=4, max_wait=6.0))
        try:
            holder = await limiter.acquire()
            started = time.monotonic()
            waiter = asyncio.create_task(limiter.acquire())
            await _until("a ticket in Redis", lambda: redis.zcard(QUEUE) == 1)
            redis.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
            # Redis -> the local queue (its share: none, the holder has it) ...
            await _until("queued locally", lambda: limiter.fallback.queued == 1, 5)
            redis.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
            # ... -> Redis again once it is trusted (about 4 s in), each with what is left.
            with pytest.raises(LimitExceeded) as refused:
                await asyncio.wait_for(waiter, 15)
            waited = time.monotonic() - started
            assert refused.value.reason == "queue_timeout"
            assert 6.0 - 0.1 < waited < 7.0, waited  # was 7.3 or 10.7 s (a loaded machine: +1 s)
            holder.release()
        finally:
            await store.aclose()

    _run(redis, scenario)


@pytest.mark.timeout(60)
def test_falling_back_takes_one_store_timeout(redis: RedisServer) -> None:
    async def scenario() -> None:
        store = await _store(redis, lease=10, timeout=2.0)
        limiter = _limiter(store, 2, QueueLimits(max_len=4, max_wait=5.0))
        try:
            (await limiter.acquire()).release()  # a connection in the pool
            await _until("the permit back", lambda: redis.zcard(HELD) == 0)
            redis.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
            started = time.monotonic()
            permit = await limiter.acquire()  # from the local share
            waited = time.monotonic() - started
            assert not store.up
            assert waited < 2.0 + 1.3, waited  # was 4.0 s: the timed-out call sent again
            permit.release()
        finally:
            await store.aclose()

    _run(redis, scenario)


@pytest.mark.timeout(60)
def test_a_flushed_redis_does_not_admit_twice_the_limit(redis: RedisServer) -> None:
    async def scenario() -> None:
        # Lease 4.5 s: a renews every 1.5 s, so after the flush a's permits are missing from
        # Redis for 1.5 s (the queued request checks its ticket after 1 s).
        a, b = [await _store(redis, lease=4.5, timeout=0.5) for _ in range(2)]
        queue = QueueLimits(max_len=4, max_wait=20.0)
        on_a, on_b = _limiter(a, 2, queue), _limiter(b, 2, queue)
        try:
            await _until("2 processes", lambda: a.known_processes == b.known_processes == 2)
            held = [await on_a.acquire(), await on_a.acquire()]
            queued = asyncio.create_task(on_b.acquire())
            await _until("a ticket in Redis", lambda: redis.zcard(QUEUE) == 1)
            assert redis.command("FLUSHALL") == "+OK"
            # Its ticket is gone: it takes b's share (2 / 2), not a permit from the empty set.
            first = await asyncio.wait_for(queued, 3)
            second = asyncio.create_task(on_b.acquire())
            await asyncio.sleep(0.5)
            assert on_b.in_use == 1 and not second.done()  # was 2: 4 in all for a limit of 2
            await _until("global limits again", lambda: a.up and b.up)
            # The requests in flight are registered again; the second one waits for them.
            assert redis.zcard(HELD) == 3
            await asyncio.sleep(0.3)
            assert not second.done()
            for permit in held:
                permit.release()
            last: Permit = await asyncio.wait_for(second, 3)
            first.release()
            last.release()
            await _until("every lease given back", lambda: redis.zcard(HELD) == 0, 2)
        finally:
            await a.aclose()
            await b.aclose()

    _run(redis, scenario)
