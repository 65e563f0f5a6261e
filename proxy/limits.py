"""Concurrency limits: a semaphore with a FIFO wait queue bounded in length and in time.

Limiters are long-lived state, kept in a `LimiterRegistry` keyed by name that survives
reloads; a snapshot only carries the numbers. A reload that changes a limit updates the
limiter in place: raising it admits queued requests at once; lowering it lets in-flight
requests finish and admits no one until the in-use count is under the new limit. Queued
requests keep their place; a shorter max_wait applies to requests that queue after it.

Where the permits live is the registry's choice (its `factory`): `Limiter` here, in this
process (one process); a permit server in the supervisor (`--workers N`, permit_socket.py);
Redis (several replicas, limit_redis.py). The handler sees one interface, `acquire()` ->
`Permit`, `permit.release()`; what is shared across processes is described in
docs/OPERATIONS.md ("Scaling out").
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable, Mapping
from typing import Final, Protocol

from .snapshot import QueueLimits

# Weight of the newest sample in the service-time average behind Retry-After.
SERVICE_TIME_EWMA_ALPHA: Final = 0.2
DEFAULT_SERVICE_TIME: Final = 1.0


class LimitExceeded(Exception):
    """No permit: the queue is full or the wait expired. `retry_after` is in whole seconds."""

    def __init__(self, limiter: str, reason: str, retry_after: int) -> None:
        super().__init__(f"{limiter}: {reason}")
        self.limiter = limiter
        self.reason = reason  # "queue_full" | "queue_timeout"
        self.retry_after = retry_after


class Permit:
    """One permit taken from a limiter; `release()` gives it back (once; later calls do
    nothing). `waited` is the seconds spent in the queue."""

    __slots__ = ("_release", "waited")

    def __init__(self, release: Callable[[], None] | None, waited: float) -> None:
        self._release = release
        self.waited = waited

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class ConcurrencyLimiter(Protocol):
    """What the handler, the admin API and the metrics read from a limiter, wherever its
    permits live. `in_use` and `queued` count this process's requests."""

    name: str
    max_concurrency: int
    queue: QueueLimits

    @property
    def rejected(self) -> int: ...

    @property
    def in_use(self) -> int: ...

    @property
    def queued(self) -> int: ...

    def configure(self, max_concurrency: int, queue: QueueLimits) -> None: ...

    async def acquire(self, deadline: float | None = None) -> Permit: ...

    def observe_service_time(self, seconds: float) -> None: ...

    def retry_after(self) -> int: ...

    def reject_waiters(self) -> int: ...


class Limiter:
    """max_concurrency permits; waiters queue FIFO up to queue.max_len for queue.max_wait."""

    def __init__(self, name: str, max_concurrency: int, queue: QueueLimits) -> None:
        self.name = name
        self.max_concurrency = max_concurrency
        self.queue = queue
        self.in_use = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._service_time = DEFAULT_SERVICE_TIME
        self.rejected = 0

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def configure(self, max_concurrency: int, queue: QueueLimits) -> None:
        self.max_concurrency = max_concurrency
        self.queue = queue
        self._admit()

    def retry_after(self) -> int:
        """Seconds until a permit is likely free: queue ahead / throughput, at least 1."""
        ahead = len(self._waiters) + 1
        estimate = ahead * self._service_time / max(self.max_concurrency, 1)
        return max(1, math.ceil(estimate))

    def observe_service_time(self, seconds: float) -> None:
        self._service_time += SERVICE_TIME_EWMA_ALPHA * (seconds - self._service_time)

    async def acquire(self, deadline: float | None = None) -> Permit:
        """Takes a permit, waiting in the queue if needed: for the queue's max_wait, or
        until `deadline` (monotonic clock: the request's own) when that comes first."""
        return Permit(self.release, await self.take(deadline))

    async def take(self, deadline: float | None = None) -> float:
        """Takes a permit (give it back with `release()`); returns the seconds waited.
        `deadline`: when this request stops waiting, if before the queue's max_wait (its
        own limits, or what it has left after waiting elsewhere: the supervisor's permit
        server, limit_store.py)."""
        if self.in_use < self.max_concurrency and not self._waiters:
            self.in_use += 1
            return 0.0
        if len(self._waiters) >= self.queue.max_len:
            self.rejected += 1
            raise LimitExceeded(self.name, "queue_full", self.retry_after())
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        started = time.monotonic()
        timer = loop.call_later(self.queue.wait_ends(started, deadline) - started, _expire, waiter)
        try:
            await waiter
        except _Expired:
            self._forget(waiter)
            self.rejected += 1
            raise LimitExceeded(self.name, "queue_timeout", self.retry_after()) from None
        except _ShuttingDown:
            raise LimitExceeded(self.name, "shutdown", 1) from None
        except BaseException:
            # Cancelled (client gone): leave the queue at once. A permit handed over in the
            # same tick as the cancellation is passed on, not lost.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()
            else:
                self._forget(waiter)
            raise
        finally:
            timer.cancel()
        return time.monotonic() - started

    def release(self) -> None:
        """Frees a permit, handing it straight to the first live waiter (FIFO)."""
        self.in_use -= 1
        self._admit()

    def reject_waiters(self) -> int:
        """Sends every queued request away (drain deadline passed); returns how many."""
        return self.fail_waiters(_ShuttingDown)

    def fail_waiters(self, error: Callable[[], BaseException]) -> int:
        """Ends every queued request's wait with `error()` raised from `take()`; returns
        how many."""
        waiters, self._waiters = self._waiters, collections.deque()
        count = 0
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error())
                count += 1
        return count

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass

    def _admit(self) -> None:
        while self._waiters and self.in_use < self.max_concurrency:
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            self.in_use += 1
            waiter.set_result(None)


class _Expired(Exception):
    pass


class _ShuttingDown(Exception):
    pass


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(_Expired())


LimiterFactory = Callable[[str, int, QueueLimits], ConcurrencyLimiter]


class LimiterRegistry:
    """Limiters by name; they outlive snapshots so in-flight counts survive a reload.

    `factory` makes a limiter for a name the first time it is needed: `Limiter` (this
    process) unless a shared store is configured (control/runtime injects it)."""

    def __init__(
        self,
        factory: LimiterFactory | None = None,
        *,
        store: str = "local",
        store_up: Callable[[], bool] | None = None,
        store_processes: Callable[[], int] | None = None,
    ) -> None:
        self._limiters: dict[str, ConcurrencyLimiter] = {}
        self.factory: LimiterFactory = factory or Limiter
        self.store = store  # "local" | "supervisor" | "redis"
        self._store_up = store_up
        self._store_processes = store_processes

    def store_state(self) -> dict[str, object]:
        """Where the permits live and whether that store answers (else: the local share)."""
        state: dict[str, object] = {
            "store": self.store,
            "up": self._store_up() if self._store_up else True,
        }
        if self._store_processes is not None:
            state["processes"] = self._store_processes()  # the share is limit / this
        return state

    def get(self, name: str, max_concurrency: int, queue: QueueLimits) -> ConcurrencyLimiter:
        """The limiter `name`; the numbers only serve to create one that `reconcile` has not
        (a request never reconfigures: one holding an older snapshot would set old limits
        back)."""
        limiter = self._limiters.get(name)
        if limiter is None:
            limiter = self._limiters[name] = self.factory(name, max_concurrency, queue)
        return limiter

    def reconcile(self, wanted: Mapping[str, tuple[int, QueueLimits]]) -> list[str]:
        """At a snapshot swap: set every wanted limiter's numbers now (an idle limiter shows
        the new limits at once) and drop those no longer wanted once nothing holds or waits
        for them (a busy one is dropped by a later reconcile). Returns the names dropped."""
        for name, (max_concurrency, queue) in wanted.items():
            limiter = self._limiters.get(name)
            if limiter is None:
                self._limiters[name] = self.factory(name, max_concurrency, queue)
            elif limiter.max_concurrency != max_concurrency or limiter.queue != queue:
                limiter.configure(max_concurrency, queue)
        dropped = [
            name
            for name, limiter in self._limiters.items()
            if name not in wanted and limiter.in_use == 0 and limiter.queued == 0
        ]
        for name in dropped:
            self._limiters.pop(name).reject_waiters()  # none wait; a shared store's may
        return dropped

    def all(self) -> list[ConcurrencyLimiter]:
        return list(self._limiters.values())
