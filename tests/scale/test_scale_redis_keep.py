"""Kept permits (`limits.keep_idle`, proxy/limit_redis.py): a process keeps a permit its
request gave back for its next request, so a steady load costs Redis no call per request;
a kept permit still counts in Redis, goes to a request waiting on another replica at once,
goes back after keep_idle, and is never used past a lowered limit or with no queue."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from sluice.proxy.limit_redis import RedisPermitStore
from sluice.proxy.limit_store import StoreLimiter
from sluice.proxy.snapshot import QueueLimits

from tests.scale.fixtures import RedisServer, held_key, stream, wait_until, write_gateway

HELD = held_key("backend:sim")
REQUESTS = 20


def test_a_steady_load_costs_redis_no_call_per_request(
    start, slow_sim, sim_stats, redis, tmp_path: Path
) -> None:
    config = write_gateway(
        tmp_path / "cfg", slow_sim.url, limit=4, queue_max=8, queue_wait="5s",
        store=redis.url, lease="10s", keep_idle="3s",
    )  # fmt: skip
    server = start(config)
    first = stream(server.url, 2)
    assert first is not None and first.status == 200
    # The permit is kept, and kept leased: Redis counts it against the limit.
    assert redis.zcard(HELD) == 1
    before = redis.script_calls()
    for _ in range(REQUESTS):
        result = stream(server.url, 2)
        assert result is not None and result.status == 200
    calls = redis.script_calls() - before
    # Without keeping: 2 calls per request (take, give back), 40 here. With it: none per
    # request, only the renewals (every lease/3) while the requests run.
    assert calls <= 4, calls
    assert redis.zcard(HELD) == 1
    waited = wait_until("the kept permit goes back", lambda: redis.zcard(HELD) == 0, timeout=15)
    assert waited < 3 + 3, waited


def test_a_kept_permit_goes_at_once_to_a_request_waiting_on_another_replica(
    start, slow_sim, sim_stats, redis, tmp_path: Path
) -> None:
    config = write_gateway(
        tmp_path / "cfg", slow_sim.url, limit=1, queue_max=4, queue_wait="8s",
        store=redis.url, lease="10s", keep_idle="10s",
    )  # fmt: skip
    keeper, other = start(config), start(config)
    result = stream(keeper.url, 2)
    assert result is not None and result.status == 200
    assert redis.zcard(HELD) == 1  # kept by `keeper` for up to 10 s
    started = time.monotonic()
    result = stream(other.url, 2)
    waited = time.monotonic() - started
    assert result is not None and result.status == 200
    # Only `keeper` hearing that a request waits frees the permit this soon (keep_idle 10 s).
    assert waited < 3.0, waited
    assert sim_stats.stats()["max_active"] == 1


def test_no_permit_is_kept_for_a_limit_without_a_queue(
    start, slow_sim, sim_stats, redis, tmp_path: Path
) -> None:
    """With `queue.max: 0` a request elsewhere is refused while the limit is full, so an idle
    permit kept here would refuse it: such a limit gives every permit back at once."""
    config = write_gateway(
        tmp_path / "cfg", slow_sim.url, limit=1, queue_max=0, store=redis.url, keep_idle="10s"
    )
    first, second = start(config), start(config)
    result = stream(first.url, 2)
    assert result is not None and result.status == 200
    wait_until("the permit is back", lambda: redis.zcard(HELD) == 0, timeout=3)
    result = stream(second.url, 2)
    assert result is not None and result.status == 200


def test_a_lowered_limit_is_not_served_from_permits_kept_under_the_old_one(
    redis: RedisServer,
) -> None:
    key = held_key("lowered")

    async def scenario() -> tuple[int, int, int, float, int]:
        store = RedisPermitStore(redis.url, lease=5, keep_idle=10)
        await store.start()
        try:
            queue = QueueLimits(max_len=4, max_wait=3.0)
            limiter = StoreLimiter(store, "lowered", 2, queue)
            first, second = await limiter.acquire(), await limiter.acquire()
            first.release()
            second.release()
            kept = redis.zcard(key)
            again = await limiter.acquire()
            taken_kept = store.kept_taken
            again.release()
            limiter.configure(1, queue)  # a reload lowers the limit
            started = time.monotonic()
            third = await limiter.acquire()
            waited = time.monotonic() - started
            held = redis.zcard(key)
            third.release()
            return kept, taken_kept, store.kept_taken, waited, held
        finally:
            await store.aclose()

    kept, taken_kept, taken_after, waited, held = asyncio.run(scenario())
    assert kept == 2  # both kept, both still leased
    assert taken_kept == 1  # the next request took one of them, no round trip
    assert taken_after == 1  # under the lowered limit Redis decided
    assert held == 1  # the kept permits went back: only the new request's lease is left
    assert waited < 2.0, waited
