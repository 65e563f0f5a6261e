"""A limiter whose permits live in a store shared by several processes, with a local
fallback.

`StoreLimiter` is what the registry hands the handler when a shared store is configured:
the supervisor's permit server (`--workers N` on one host, permit_socket.py) or Redis
(several replicas, limit_redis.py). Each request costs one round trip to take a permit and
one to give it back, never one per token.

When the store cannot answer (down, or slower than its timeout), the request is not
refused for it: it takes a permit from a local `Limiter` sized to this process's share of
the limit (`store.share(limit)`: the limit divided by the processes the store last knew
of, at least 1), and so do the requests after it until the store is back. The store logs
the change once each way and reports it (`sluice_limit_store_up`).

A request has one deadline, `queue.max_wait` after it asked, however often it moves
between the store's queue and the local one: each wait gets what is left of it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Hashable
from typing import Final, Protocol

from .clock import monotonic
from .limits import (
    DEFAULT_SERVICE_TIME,
    SERVICE_TIME_EWMA_ALPHA,
    Limiter,
    LimitExceeded,
    Permit,
)
from .snapshot import QueueLimits

# How long past the queue's max_wait a store may take to answer before it counts as down.
STORE_GRACE: Final = 2.0


class StoreDown(Exception):
    """The store did not answer in time or the connection is gone: use the local share."""


class StoreBack(Exception):
    """The store answers again: a request waiting for the local share queues there."""


class PermitStore(Protocol):
    """Where shared permits live. `take` raises LimitExceeded (queue full, wait expired) or
    StoreDown; on cancellation it leaves the queue or gives a just-granted permit back. It
    queues for `limiter.wait_left()`, what is left of the request's max_wait (it may have
    waited for the local share already)."""

    on_change: list[Callable[[bool], None]]  # called on each change of `up`

    @property
    def up(self) -> bool: ...

    def share(self, max_concurrency: int) -> int: ...

    async def take(self, limiter: StoreLimiter) -> tuple[Hashable, float]: ...

    def give_back(self, limiter: StoreLimiter, handle: Hashable) -> None: ...

    def adopt(self, limiter: StoreLimiter) -> Hashable:
        """A handle for a permit taken from the local share, so that the store can count it
        once it is back (None: the store does not); give it back with `give_back`."""
        ...


class StoreLimiter:
    """A ConcurrencyLimiter whose permits come from `store`, or from the local share while
    the store is down. `in_use` and `queued` count this process's requests."""

    def __init__(
        self, store: PermitStore, name: str, max_concurrency: int, queue: QueueLimits
    ) -> None:
        self.store = store
        self.name = name
        self.max_concurrency = max_concurrency
        self.queue = queue
        # When these numbers were set (this process's snapshot), on the host's monotonic
        # clock: a shared store keeps the numbers set last, not those of whichever process
        # asked last (one not yet reloaded would set the old ones back).
        self.configured_at = monotonic()
        self.fallback = Limiter(name, store.share(max_concurrency), queue)
        self._remote_in_use = 0
        self._remote_queued = 0
        self._remote_rejected = 0
        self._service_time = DEFAULT_SERVICE_TIME
        self._waiting: set[asyncio.Task[object]] = set()
        # Waits this limiter cancels, and the refusal each ends in: "shutdown" (drain
        # deadline) or "queue_timeout" (the request's deadline, in the local queue).
        self._ending: dict[asyncio.Task[object], str] = {}
        self._deadlines: dict[asyncio.Task[object], float] = {}  # monotonic, per request

    @property
    def in_use(self) -> int:
        return self._remote_in_use + self.fallback.in_use

    @property
    def queued(self) -> int:
        return self._remote_queued + self.fallback.queued

    @property
    def rejected(self) -> int:
        return self._remote_rejected + self.fallback.rejected

    def configure(self, max_concurrency: int, queue: QueueLimits) -> None:
        self.max_concurrency = max_concurrency
        self.queue = queue
        self.configured_at = monotonic()
        self.fallback.queue = queue
        self.refresh_share()

    def refresh_share(self) -> None:
        """Sizes the local share: this process's part of the limit, less the store's permits
        it still holds (requests that started before the store went away)."""
        share = max(0, self.store.share(self.max_concurrency) - self._remote_in_use)
        if share != self.fallback.max_concurrency:
            self.fallback.configure(share, self.queue)

    def retry_after(self) -> int:
        """Seconds until a permit is likely free, from this process's own queue."""
        return self.retry_after_with(self.queued)

    def retry_after_with(self, ahead: int) -> int:
        """Seconds until a permit is likely free with `ahead` requests queued, at least 1."""
        estimate = (ahead + 1) * self._service_time / max(self.max_concurrency, 1)
        return max(1, math.ceil(estimate))

    def observe_service_time(self, seconds: float) -> None:
        self._service_time += SERVICE_TIME_EWMA_ALPHA * (seconds - self._service_time)
        self.fallback.observe_service_time(seconds)

    async def acquire(self, deadline: float | None = None) -> Permit:
        """A permit from the store (or the local share); the wait ends after the queue's
        max_wait, or at `deadline` (the request's own) when that comes first."""
        task = asyncio.current_task()
        assert task is not None
        self._deadlines[task] = self.queue.wait_ends(monotonic(), deadline)
        try:
            while True:
                try:
                    return await self._acquire(task)
                except StoreBack:
                    continue  # it waited for the local share; the store decides now
        finally:
            del self._deadlines[task]

    def wait_left(self) -> float:
        """Seconds left of the running request's max_wait (all of it outside `acquire`)."""
        task = asyncio.current_task()
        deadline = self._deadlines.get(task) if task is not None else None
        if deadline is None:
            return self.queue.max_wait
        return max(0.0, deadline - monotonic())

    def store_changed(self, up: bool) -> None:
        """Back to global limits: the requests queued for the local share move to the
        store's queue, or they would be admitted beside the store's count."""
        if up:
            self.fallback.fail_waiters(StoreBack)

    async def _acquire(self, task: asyncio.Task[object]) -> Permit:
        if self.store.up:
            self._remote_queued += 1
            self._waiting.add(task)
            try:
                handle, waited = await self.store.take(self)
            except StoreDown:
                # The store just went away: this request takes the local share, unless
                # the drain sent it away meanwhile (its cancellation swallowed by the wait).
                if self._kept_cancelled(task) == "shutdown":
                    raise LimitExceeded(self.name, "shutdown", 1) from None
            except LimitExceeded:
                self._kept_cancelled(task)  # refused anyway: forget a swallowed cancellation
                self._remote_rejected += 1
                raise
            except asyncio.CancelledError:
                self._end_wait(task)
                raise
            else:
                self._kept_cancelled(task)
                self._remote_in_use += 1
                return Permit(lambda: self._give_back(handle), waited)
            finally:
                self._remote_queued -= 1
                self._waiting.discard(task)
        self.refresh_share()
        # The local queue waits for queue.max_wait; this request has only what is left.
        timer = asyncio.get_running_loop().call_later(self.wait_left(), self._expire, task)
        try:
            waited = await self.fallback.take()
        except asyncio.CancelledError:
            self._end_wait(task)
            raise
        finally:
            timer.cancel()
        self._kept_cancelled(task)
        handle = self.store.adopt(self)

        def release() -> None:
            self.fallback.release()
            if handle is not None:
                self.store.give_back(self, handle)

        return Permit(release, waited)

    def _expire(self, task: asyncio.Task[object]) -> None:
        self._ending.setdefault(task, "queue_timeout")
        task.cancel()

    def _end_wait(self, task: asyncio.Task[object]) -> None:
        """A wait cancelled by this limiter ends in its refusal (raised here); any other
        cancellation (the client went away) goes on."""
        reason = self._ending.pop(task, None)
        if reason is None or task.uncancel() > 0:  # the client went away as well
            return
        if reason == "shutdown":
            raise LimitExceeded(self.name, "shutdown", 1) from None
        self.fallback.rejected += 1
        raise LimitExceeded(self.name, reason, self.retry_after()) from None

    def _kept_cancelled(self, task: asyncio.Task[object]) -> str | None:
        """The wait ended otherwise in the same tick as this limiter's cancellation, which
        it swallowed (a permit came: the request keeps it): withdraws the cancellation;
        returns why it was sent, if it was."""
        reason = self._ending.pop(task, None)
        if reason is not None:
            task.uncancel()
        return reason

    def _give_back(self, handle: Hashable) -> None:
        self._remote_in_use -= 1
        self.store.give_back(self, handle)
        if self.fallback.queued:
            self.refresh_share()  # a request waiting for the local share may go now

    def reject_waiters(self) -> int:
        """Sends every queued request away (drain deadline passed); returns how many."""
        count = self.fallback.reject_waiters()
        for task in list(self._waiting):
            if not task.done():
                self._ending.setdefault(task, "shutdown")
                task.cancel()
                count += 1
        return count


def store_factory(store: PermitStore) -> Callable[[str, int, QueueLimits], StoreLimiter]:
    """A LimiterRegistry factory making StoreLimiters on `store`."""

    def make(name: str, max_concurrency: int, queue: QueueLimits) -> StoreLimiter:
        limiter = StoreLimiter(store, name, max_concurrency, queue)
        store.on_change.append(limiter.store_changed)
        return limiter

    return make


__all__ = ["STORE_GRACE", "PermitStore", "StoreBack", "StoreDown", "StoreLimiter", "store_factory"]
