"""The prefix index shared by every worker and replica of sluice, in Redis.

With `--workers N` or several sluice replicas, each process's own index (affinity.py) sees
only the requests it routed, so the same tenant's prompt lands on different vLLM replicas
depending on which process took it (docs/ROUTING.md measures the loss). When a Redis store
is configured (`limits.store`) and a backend keeps `routing.shared_index: true`, every
process also records what it sent in Redis and scores with what all of them sent:

- one sorted set per replica URL, `sluice:px:<url>`: member = a block hash (8 bytes),
  score = when it was last sent there (microseconds; a prompt's first blocks get the
  highest scores, like the local LRU's tail-first insertion). Trimmed to `index_blocks`
  members by rank on every write, and it expires `TTL` after the last write.
- write: after the choice, off the request's path: every write of one event-loop iteration
  goes out in one pipeline (ZADD, ZREMRANGEBYRANK, PEXPIRE per replica), fire-and-forget.
- read: one pipeline of ZMSCORE (one per candidate replica), sent as soon as the
  request's blocks are known and awaited right before the choice (so it overlaps taking
  the permits), at most `routing.shared_index_timeout` (default 2 ms) from then on. A
  replica's shared match is its leading blocks present in its set; the score uses the
  larger of that and the local index's match.

Redis slow or down: a read past its deadline leaves that request to the local index;
`SLOW_READS` such reads in a row, or an error, turn the shared index off for
`RETRY_AFTER` s (reads and writes skipped: the local index decides, nothing waits),
logged once per change. A late reply is drained in the background, never cancelled (a
cancelled pipeline would cost the pooled connection). The `redis` package is imported
only when a store is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Final

import structlog

DEFAULT_PREFIX: Final = "sluice:px:"
DEFAULT_TIMEOUT: Final = 0.002
RETRY_AFTER: Final = 1.0  # seconds without Redis after a failure, then the next request tries again
TTL_MS: Final = 600_000  # a replica's set outlives its last write by 10 minutes
POOL_SIZE: Final = 8
CALL_TIMEOUT: Final = 1.0  # connect / socket bound of one call (the read has its own deadline)

SLOW_READS: Final = 3  # late replies in a row that make Redis count as slow (then it is off)

_log = structlog.get_logger("sluice.routing")


class SharedRead:
    """A read on its way: the URLs asked about and the pipeline's task."""

    __slots__ = ("task", "urls")

    def __init__(self, urls: tuple[str, ...], task: asyncio.Task[Any]) -> None:
        self.urls = urls
        self.task = task


class SharedIndex:
    """Block hashes per replica URL in Redis; see the module docstring."""

    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX) -> None:
        import redis.asyncio as aioredis  # noqa: PLC0415 (only when a store is configured)
        from redis.asyncio.retry import Retry  # noqa: PLC0415
        from redis.backoff import NoBackoff  # noqa: PLC0415

        self.prefix = prefix
        # One retry on a fresh connection: after Redis restarts, each pooled connection
        # fails once ("Connection closed by server"); that is not an outage (the limit
        # store does the same).
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_SIZE,
            timeout=CALL_TIMEOUT,
            socket_timeout=CALL_TIMEOUT,
            socket_connect_timeout=CALL_TIMEOUT,
            retry=Retry(NoBackoff(), 1),
        )
        self._pool: Any = pool
        self._client: Any = aioredis.Redis(connection_pool=pool)
        self._errors: tuple[type[BaseException], ...] = (
            __import__("redis").exceptions.RedisError,
            OSError,
            TimeoutError,
        )
        self._late = 0
        self._off_until = 0.0  # time.monotonic(); reads and writes skip Redis before it
        self._up: bool | None = None
        self._writes: list[tuple[str, list[bytes], int]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        # Counters the tests and the bench read.
        self.reads = 0
        self.failures = 0
        self.late_reads = 0
        self.writes = 0

    def start(self) -> None:
        """Opens a connection now (PING), so the first request's read does not pay for it."""
        self._keep(asyncio.get_running_loop().create_task(self._ping()))

    async def _ping(self) -> None:
        try:
            await self._client.ping()
        except Exception as exc:  # whatever the client raises, Redis did not answer
            self._failed(f"{type(exc).__name__}: {exc}")

    @property
    def up(self) -> bool:
        return time.monotonic() >= self._off_until

    def _key(self, url: str) -> str:
        return self.prefix + url

    # -- read ------------------------------------------------------------------------------

    def read(self, urls: tuple[str, ...], blocks: list[bytes]) -> SharedRead | None:
        """Starts the read: per replica URL, how many leading `blocks` some process sent
        there. None when Redis is off (the local index decides alone)."""
        if not blocks or not self.up:
            return None
        pipe = self._client.pipeline(transaction=False)
        for url in urls:
            pipe.zmscore(self._key(url), blocks)
        task = asyncio.get_running_loop().create_task(pipe.execute())
        self._keep(task)
        self.reads += 1
        return SharedRead(urls, task)

    async def settle(self, reading: SharedRead, timeout: float) -> dict[str, int] | None:
        """The read's result, waiting at most `timeout` more; None if it is later or failed.
        A late reply is not cancelled (that would cost the pooled connection); after
        `SLOW_READS` late replies in a row, or any error, Redis is off for `RETRY_AFTER`."""
        task = reading.task
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except TimeoutError:
                self._late += 1
                self.late_reads += 1
                if self._late >= SLOW_READS:
                    self._failed(f"{self._late} reads in a row slower than {timeout * 1000:g} ms")
                return None
            except Exception:
                pass
        if task.cancelled() or task.exception() is not None:
            exc = task.exception() if not task.cancelled() else None
            self._failed(f"{type(exc).__name__}: {exc}" if exc else "cancelled")
            return None
        self._late = 0
        self._state(True)
        out: dict[str, int] = {}
        for url, scores in zip(reading.urls, task.result(), strict=True):
            n = 0
            for score in scores or ():
                if score is None:
                    break
                n += 1
            out[url] = n
        return out

    # -- write -----------------------------------------------------------------------------

    def remember(self, url: str, blocks: list[bytes], capacity: int) -> None:
        """`blocks` went to `url`; written with the other writes of this loop iteration."""
        if not blocks or not self.up:
            return
        self._writes.append((url, blocks, capacity))
        if len(self._writes) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        writes, self._writes = self._writes, []
        if not writes:
            return
        now = int(time.time() * 1_000_000)
        pipe = self._client.pipeline(transaction=False)
        for url, blocks, capacity in writes:
            key = self._key(url)
            n = len(blocks)
            # The first block gets the highest score: trimming drops a prompt's tail first.
            pipe.zadd(key, {block: now + n - i for i, block in enumerate(blocks)})
            pipe.zremrangebyrank(key, 0, -capacity - 1)
            pipe.pexpire(key, TTL_MS)
        self.writes += 1
        self._keep(asyncio.get_running_loop().create_task(self._send(pipe)))

    async def _send(self, pipe: Any) -> None:
        try:
            await pipe.execute()
        except Exception as exc:  # whatever the client raises, Redis did not take it
            self._failed(f"{type(exc).__name__}: {exc}")

    # -- state -----------------------------------------------------------------------------

    def _keep(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # a late read's error was already counted; do not warn again

    def _failed(self, error: str) -> None:
        self.failures += 1
        self._late = 0
        self._off_until = time.monotonic() + RETRY_AFTER
        self._state(False, error)

    def _state(self, up: bool, error: str = "") -> None:
        if up == self._up:
            return
        first = self._up is None
        self._up = up
        if not up:
            _log.warning(
                "shared_index_down",
                error=error,
                fallback="local index",
                retry_after=RETRY_AFTER,
            )
        elif not first:
            _log.info("shared_index_up")

    async def aclose(self) -> None:
        _log.info(
            "shared_index_stats",
            reads=self.reads,
            late_reads=self.late_reads,
            failures=self.failures,
            write_batches=self.writes,
        )
        for task in list(self._tasks):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, CALL_TIMEOUT)
        with contextlib.suppress(*self._errors):
            await self._client.aclose()
            await self._pool.aclose()  # a pool passed in is not the client's to close


__all__ = ["DEFAULT_TIMEOUT", "SharedIndex", "SharedRead"]
