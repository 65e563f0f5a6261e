"""Permits shared by every replica and worker, in Redis (`limits.store: redis://...`).

Per limiter, two sorted sets under `{prefix}{<name>}` (one hash slot):
- `:held`  lease id -> lease expiry (ms, Redis clock). A holder renews its leases every
  lease/3; a holder that dies stops renewing and its permits expire within `lease`.
- `:queue` ticket -> the ticket's deadline (enqueue time + what is left of max_wait,
  Redis clock; a request back from the local queue keeps its deadline). With one max_wait
  per limiter, deadline order is arrival order: the queue is FIFO across replicas (ties
  within a millisecond are broken by id). Expired tickets drop out.

Beside them `{prefix}epoch`, a random value that the first renewal after Redis lost its
data (FLUSHALL, a restart without persistence) sets anew. A take names the epoch its
process knows, and Redis refuses it when that is not the one it holds: the leases of the
requests in flight are gone, so granting from what is left could admit twice the limit.
The process then does as when Redis is down: the local share, every lease registered
again, and global limits only once the other processes have done the same (their
renewals come every lease/3).

Every change runs as one Lua script (atomic; limit_redis_lua.py). Taking a permit is one
round trip when one is free. Giving one back is one round trip and hands it straight to
the head of the queue: the script moves the ticket into `:held` and publishes its id on
the owner's channel, so the waiter learns of it with no further round trip. A waiter also
polls every POLL_INTERVAL, which covers a lost message and permits freed by an expired
lease. All times come from Redis (`TIME`), so the replicas' clocks do not matter.

Kept permits (`keep_idle`): a permit whose request ended stays this process's for up to
`keep_idle`, and its next request takes it with no round trip; it stays leased in Redis,
so it counts against the limit like one in use. A steady load then costs Redis nothing per
request but the renewals. It is kept only while nobody waits: the first request to queue
(and every queued request, each time it polls) publishes on `{prefix}want`; every process
then gives back what it keeps for that limit and gives back at once for BUSY_HOLD, so the
queue is served in order as without keeping. Limits with `queue.max: 0` never keep (a
request elsewhere would be refused while a permit idles here), and a changed limit gives
back what was kept under the old one.

Approximate: a process that dies while queued keeps its place until its ticket's
deadline, so the queue may look fuller than it is for up to max_wait; permits of a dead
holder come back after at most `lease`.

What a process could not give back while Redis was unreachable (leases of requests that
ended, tickets of requests that moved to the local queue, calls that timed out and that
Redis may still run once it resumes) it remembers, and every renewal removes those ids
from `:held` and `:queue`, the first one after an outage included, before global limits
apply again; an id is forgotten once a renewal removed it lease + max_wait after it was
remembered. Otherwise Redis would count leases that nobody uses, for up to `lease`.

The `redis` package is imported only when a store is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Final

import structlog

from .limit_redis_lua import GIVE, RENEW, TAKE
from .limit_store import StoreDown, StoreLimiter
from .limits import LimitExceeded

DEFAULT_PREFIX: Final = "sluice:limit:"
DEFAULT_LEASE: Final = 10.0
DEFAULT_TIMEOUT: Final = 1.0  # one Redis call slower than this counts as "Redis is down"
POLL_INTERVAL: Final = 1.0
POOL_SIZE: Final = 32  # connections per process (one more for the grant subscription)
PROBE_INTERVAL: Final = 1.0
SETTLE_MARGIN: Final = 0.5
DEFAULT_KEEP_IDLE: Final = 0.1
# How long a process gives every permit back at once after hearing that somebody waits;
# longer than two POLL_INTERVALs, the longest gap between two reminders from the queue.
BUSY_HOLD: Final = 3.0
# Ids remembered per limiter for removal (module docstring): bounds the renewal after a long
# outage under load; past it the oldest go unremoved, and their leases run out on their own.
GONE_MAX: Final = 4096

_log = structlog.get_logger("sluice.limits")


def _pool(url: str, timeout: float) -> Any:
    """The store's connection pool; it connects at the first call. Raises what redis-py
    raises for a URL it cannot use (ValueError, TypeError, RedisError)."""
    import redis  # noqa: PLC0415 (only when a store is configured)
    import redis.asyncio as aioredis  # noqa: PLC0415
    from redis.asyncio.retry import Retry  # noqa: PLC0415
    from redis.backoff import NoBackoff  # noqa: PLC0415

    # One retry on a fresh connection: after Redis restarts, the pooled connections fail
    # once each; that is not an outage. Every script is idempotent (ids). Not on a timeout:
    # Redis may still run the call, and a second wait would double the time before the
    # local share takes over (`timeout` bounds one call).
    # A bounded pool that makes callers wait for a free connection (up to `timeout`):
    # hundreds of concurrent requests share a few connections instead of opening one each
    # (and hitting the client's connection limit, which would read as an outage).
    return aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=POOL_SIZE,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
    )


def check_url(url: str) -> None:
    """Raises ValueError saying why the store cannot use `url` (without quoting it: it
    may hold a password); connects to nothing. `limits.store` is checked with it."""
    import redis  # noqa: PLC0415 (only when a store is configured)

    try:
        urllib.parse.urlsplit(url).port  # noqa: B018 (reading the port parses it)
    except ValueError as exc:
        # Not urllib's message: it may quote a piece of the password (one with a "/").
        bad = "invalid IPv6 address" if "IPv6" in str(exc) else "expected a port, 0 to 65535"
        raise ValueError(bad) from None
    try:
        connection = _pool(url, DEFAULT_TIMEOUT).make_connection()
    except TypeError as exc:  # an option that no connection of this scheme takes
        option = str(exc).rpartition(" ")[2]
        raise ValueError(f"unknown option {option} for {url.partition(':')[0]}://") from None
    except (ValueError, redis.exceptions.RedisError) as exc:
        raise ValueError(str(exc).rstrip(".")) from None
    if getattr(connection, "path", None) == "":
        raise ValueError("expected the socket's path: unix:///path/to/redis.sock")


class RedisPermitStore:
    """Shared permits in Redis; see the module docstring. `expected_processes` sizes the
    local share until Redis has told how many processes are live."""

    def __init__(
        self,
        url: str,
        *,
        lease: float = DEFAULT_LEASE,
        timeout: float = DEFAULT_TIMEOUT,
        prefix: str = DEFAULT_PREFIX,
        expected_processes: int = 1,
        keep_idle: float = DEFAULT_KEEP_IDLE,
    ) -> None:
        import redis  # noqa: PLC0415 (only when a store is configured)
        import redis.asyncio as aioredis  # noqa: PLC0415

        self.url = url
        self.lease = lease
        self.prefix = prefix
        self.keep_idle = keep_idle
        self.process_id = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self.expected_processes = max(1, expected_processes)
        self.known_processes = self.expected_processes
        pool = _pool(url, timeout)
        self._client: Any = aioredis.Redis(connection_pool=pool)
        self._take = self._client.register_script(TAKE)
        self._give = self._client.register_script(GIVE)
        self._renew = self._client.register_script(RENEW)
        self._errors: tuple[type[BaseException], ...] = (
            redis.exceptions.RedisError,
            OSError,
            TimeoutError,
        )
        self._up = False
        self._was_up: bool | None = None
        self._ids = itertools.count()
        self._held: dict[str, set[str]] = {}  # limiter name -> lease ids this process holds
        self._grants: dict[str, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._main: asyncio.Task[None] | None = None
        self.on_change: list[Callable[[bool], None]] = []
        self.round_trips = 0
        self._renewing = False
        self._reachable = False
        self._batch: list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]] = []
        self._no_script: type[Exception] = redis.exceptions.NoScriptError
        self._late: list[tuple[StoreLimiter, str]] = []
        # Kept permits (module docstring), per limiter name: (lease id, kept since), oldest
        # first; the limit they were kept under; until when to keep none.
        self._kept: dict[str, list[tuple[str, float]]] = {}
        self._kept_limit: dict[str, int] = {}
        self._busy_until: dict[str, float] = {}
        self._over: set[str] = set()  # limits Redis counted over (lowered, or an outage)
        self._reaping: set[str] = set()
        self._limiters: dict[str, StoreLimiter] = {}
        self._names: dict[str, str] = {}  # held key -> limiter name (the `want` messages)
        self.kept_taken = 0  # requests served from a kept permit (no round trip)
        self._epoch_key = prefix + "epoch"
        self._epoch: str | None = None  # the epoch Redis had at this process's last renewal
        self._lost = False  # Redis lost its data since this process last went back to it
        # Ids to remove from Redis (module docstring), per limiter name: id -> forget after
        # (monotonic).
        self._gone: dict[str, dict[str, float]] = {}

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self._up

    @property
    def client(self) -> Any:
        """The `redis.asyncio.Redis` client (resumable streams share its pool)."""
        return self._client

    def share(self, max_concurrency: int) -> int:
        return max(1, max_concurrency // self.known_processes)

    async def start(self) -> None:
        """Checks Redis once (a failure only means starting on the local share) and starts
        the background work: renewals, heartbeat, grant messages, probing while down."""
        if await self._renew_all():
            self._state(True)
        self._main = asyncio.get_running_loop().create_task(self._maintain())

    async def aclose(self) -> None:
        self.keep_idle = 0.0  # a request ending from now on gives its permit back
        for name in list(self._kept):
            self._give_back_kept(name)
        if self._main is not None:
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
        for task in list(self._tasks):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 1.0)
        with contextlib.suppress(*self._errors):
            await self._client.aclose(close_connection_pool=True)

    def _state(self, up: bool, error: str = "") -> None:
        self._up = up
        if not up:
            self._drop_kept()
        if up == self._was_up:
            return
        first = self._was_up is None
        self._was_up = up
        if up and not first:
            _log.info("limit_store_up", store="redis", processes=self.known_processes)
        elif not up:
            _log.warning(
                "limit_store_down",
                store="redis",
                error=error,
                fallback="share",
                processes=self.known_processes,
            )
        for callback in self.on_change:
            callback(up)

    # -- permits ---------------------------------------------------------------------------

    def _keys(self, name: str) -> list[str]:
        base = f"{self.prefix}{{{name}}}"
        self._names[base + ":held"] = name
        return [base + ":held", base + ":queue"]

    def _args(self, limiter: StoreLimiter, rid: str) -> list[Any]:
        return [limiter.max_concurrency, int(self.lease * 1000), self.prefix, rid]

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Runs one script. Calls made in the same event-loop iteration go out together in
        one pipeline (one round trip, one parse): under hundreds of concurrent requests a
        call each would queue on the connections and cost TTFT."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._batch.append((script, keys, args, future))
        if len(self._batch) == 1:
            asyncio.get_running_loop().call_soon(self._flush)
        try:
            result = await future
        except Exception as exc:  # whatever the client raises, Redis did not answer
            self._reachable = False
            self._state(False, f"{type(exc).__name__}: {exc}")
            raise StoreDown(str(exc)) from None
        self._reachable = True
        return result

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        self.round_trips += 1
        self._spawn(self._send(batch))

    async def _send(
        self, batch: list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]]
    ) -> None:
        try:
            results = await self._pipeline(batch)
            if any(isinstance(r, self._no_script) for r in results):
                # Redis restarted and forgot the scripts: load them and send again.
                for script in (self._take, self._give, self._renew):
                    await self._client.script_load(script.script)
                results = await self._pipeline(batch)
        except Exception as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (*_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # the request went away; its own cleanup gives the permit back
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _pipeline(
        self, batch: list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]]
    ) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for script, keys, args, _ in batch:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))

    async def take(self, limiter: StoreLimiter) -> tuple[Hashable, float]:
        kept = self._kept.get(limiter.name)
        if kept and self._may_keep(limiter):
            self.kept_taken += 1
            return kept.pop()[0], 0.0  # still leased and renewed: no round trip
        self._limiters[limiter.name] = limiter
        rid = f"{self.process_id}/{next(self._ids)}"
        queue = limiter.queue
        started = time.monotonic()
        left = limiter.wait_left()
        deadline = started + left
        grant = asyncio.get_running_loop().create_future()
        self._grants[rid] = grant
        try:
            result, queued = await self._take_call(limiter, rid, "new", queue.max_len, left)
            if result != 1:
                self._somebody_waits(limiter.name)
            while result == 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(grant), min(left, POLL_INTERVAL))
                if grant.done():
                    result = 1
                    break
                if not self._up:
                    # Redis went away meanwhile: the local share decides from now on, even
                    # if Redis answers again before it is trusted again (see _maintain).
                    raise StoreDown("the store went down while this request waited")
                result, queued = await self._take_call(limiter, rid, "check", 0, 0.0)
                if result == -2:
                    # The ticket expired in Redis as this request's deadline came (whole
                    # milliseconds, the round trips): queue again for what is left. Lost
                    # data shows as another epoch instead (-3).
                    left = max(0.0, deadline - time.monotonic())
                    result, queued = await self._take_call(limiter, rid, "new", queue.max_len, left)
        except BaseException:
            self._grants.pop(rid, None)
            self._give_back_soon(limiter, rid)  # leaves the queue, or frees a late grant
            raise
        self._grants.pop(rid, None)
        if result == 1:
            self._held.setdefault(limiter.name, set()).add(rid)
            return rid, time.monotonic() - started
        retry_after = limiter.retry_after_with(queued)
        if result in (0, -2):
            self._give_back_soon(limiter, rid)
            raise LimitExceeded(limiter.name, "queue_timeout", retry_after)
        raise LimitExceeded(limiter.name, "queue_full", retry_after)

    async def _take_call(
        self, limiter: StoreLimiter, rid: str, mode: str, max_len: int, wait: float
    ) -> tuple[int, int]:
        """One TAKE (limit_redis_lua.py); StoreDown when Redis lost its data."""
        keys = [*self._keys(limiter.name), self._epoch_key]
        args = [*self._args(limiter, rid), mode, max_len, int(wait * 1000), self._epoch or ""]
        result, queued = await self._call(self._take, keys, args)
        if result == -3:
            self._lose_data()
            raise StoreDown("Redis lost its data (another epoch)")
        return int(result), int(queued)

    def _lose_data(self) -> None:
        """Redis lost the leases in flight: do as when it is down (module docstring)."""
        self._lost = True
        self._state(False, "Redis lost its data (flushed, or restarted empty)")

    def adopt(self, limiter: StoreLimiter) -> Hashable:
        """An id for a permit from the local share: the renewals register it in Redis once
        Redis is back, so requests that started during the outage count until they end."""
        rid = f"{self.process_id}/{next(self._ids)}"
        self._held.setdefault(limiter.name, set()).add(rid)
        if self._reachable:
            # Redis answers but is not trusted yet (the other processes may not have
            # registered theirs): register this permit now, not at the next renewal, for
            # the processes that already went back to global limits.
            self._spawn(self._renew_all())
        return rid

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def give_back(self, limiter: StoreLimiter, handle: Hashable) -> None:
        rid = str(handle)
        if self.keep_idle > 0 and self._keep(limiter, rid):
            return
        self._return(limiter, rid)

    def _return(self, limiter: StoreLimiter, rid: str) -> None:
        """Gives the lease `rid` back to Redis (or lets it expire while Redis is down)."""
        held = self._held.get(limiter.name)
        if held is not None:
            held.discard(rid)
        if self._renewing:
            self._late.append((limiter, rid))
        elif self._reachable:
            self._give_back_soon(limiter, rid)
        else:
            self._remember_gone(limiter, rid)

    # -- kept permits (module docstring) ----------------------------------------------------

    def _may_keep(self, limiter: StoreLimiter) -> bool:
        name = limiter.name
        return (
            self._up
            and self._reachable
            and limiter.queue.max_len > 0
            and self._kept_limit.get(name) == limiter.max_concurrency
            and name not in self._over
            and time.monotonic() >= self._busy_until.get(name, 0.0)
        )

    def _keep(self, limiter: StoreLimiter, rid: str) -> bool:
        """Keeps the permit `rid` for this process's next request; False: give it back."""
        name = limiter.name
        if self._kept_limit.get(name) != limiter.max_concurrency:
            # First use, or the limit changed (reload): what was kept under the old limit
            # goes back, and for a while Redis decides alone whether the new one holds.
            if name in self._kept_limit:
                self._somebody_waits(name)
            self._kept_limit[name] = limiter.max_concurrency
            self._limiters[name] = limiter
        if not self._may_keep(limiter):
            return False
        self._kept.setdefault(name, []).append((rid, time.monotonic()))
        if name not in self._reaping:
            self._reaping.add(name)
            asyncio.get_running_loop().call_later(self.keep_idle, self._reap, name)
        return True

    def _reap(self, name: str) -> None:
        """Gives back the permits kept longer than keep_idle (one timer per limiter)."""
        self._reaping.discard(name)
        kept = self._kept.get(name)
        limiter = self._limiters.get(name)
        if not kept or limiter is None:
            return
        now = time.monotonic()
        stale = sum(1 for _, since in kept if now - since >= self.keep_idle)
        for rid, _ in kept[:stale]:
            self._return(limiter, rid)
        del kept[:stale]
        if kept:
            self._reaping.add(name)
            delay = max(0.0, kept[0][1] + self.keep_idle - now)
            asyncio.get_running_loop().call_later(delay, self._reap, name)

    def _somebody_waits(self, name: str) -> None:
        """A request waits for this limit somewhere: give back what is kept, keep nothing
        for BUSY_HOLD."""
        self._busy_until[name] = time.monotonic() + BUSY_HOLD
        self._give_back_kept(name)

    def _give_back_kept(self, name: str) -> None:
        kept = self._kept.pop(name, None)
        limiter = self._limiters.get(name)
        if kept and limiter is not None:
            for rid, _ in kept:
                self._return(limiter, rid)

    def _drop_kept(self) -> None:
        """The store is not trusted: give the kept leases back if Redis still answers (a
        lost subscription), else once it answers again."""
        for name in list(self._kept):
            if self._reachable:
                self._give_back_kept(name)
                continue
            limiter = self._limiters[name]  # set by _keep
            for rid, _ in self._kept[name]:
                self._held.get(name, set()).discard(rid)
                self._remember_gone(limiter, rid)
        self._kept.clear()

    def _give_back_soon(self, limiter: StoreLimiter, rid: str) -> None:
        keys, args = self._keys(limiter.name), self._args(limiter, rid)

        async def give() -> None:
            try:
                await self._call(self._give, keys, args)
            except StoreDown:
                self._remember_gone(limiter, rid)

        self._spawn(give())

    def _remember_gone(self, limiter: StoreLimiter, rid: str) -> None:
        """`rid` may stay in Redis (a lease, a ticket, a call Redis has yet to run): the
        renewals remove it (module docstring)."""
        gone = self._gone.setdefault(limiter.name, {})
        gone[rid] = time.monotonic() + self.lease + limiter.queue.max_wait
        if len(gone) > GONE_MAX:
            del gone[next(iter(gone))]  # the oldest (insertion order)

    # -- background ------------------------------------------------------------------------

    async def _renew_all(self) -> bool:
        """Renews every lease this process holds and its heartbeat (one round trip), drops
        expired leases of every limiter it has used and removes the ids it could not give
        back. After an outage this registers again the permits still in use, those taken
        from the local share included, so Redis counts every request in flight."""
        names = list(self._held.keys() | self._gone.keys())
        keys = [self.prefix + "processes", self._epoch_key]
        lease_ms = int(self.lease * 1000)
        args: list[Any] = [lease_ms, self.process_id, lease_ms, os.urandom(8).hex()]
        for name in names:
            keys += self._keys(name)
            args += [" ".join(self._held.get(name, ())), " ".join(self._gone.get(name, ()))]
        sent_at = time.monotonic()
        self._renewing = True
        try:
            result = await self._call(self._renew, keys, args)
        except StoreDown:
            return False
        finally:
            # Permits given back while the renewal was on its way go back after it, or
            # the renewal would register them again.
            self._renewing = False
            late, self._late = self._late, []
            for limiter, rid in late:
                self._give_back_soon(limiter, rid)
        for name in list(self._gone):
            gone = self._gone[name]
            for rid in [rid for rid, until in gone.items() if until <= sent_at]:
                del gone[rid]  # removed by this renewal, and Redis runs no older call now
            if not gone:
                del self._gone[name]
        epoch = result[0].decode() if isinstance(result[0], bytes) else str(result[0])
        known, self._epoch = self._epoch, epoch
        if known is not None and epoch != known:
            self._lose_data()
        # The larger of what the config says and what Redis has seen: a smaller share is
        # the safe side while Redis is away. Right after an outage Redis has seen only the
        # processes that came back so far, so the count only grows until limits are global.
        live = max(self.expected_processes, int(result[1]))
        for name, count in zip(names, result[2:], strict=False):
            user = self._limiters.get(name)
            if user is not None and int(count) > user.max_concurrency:
                # Over the limit (lowered, or permits re-registered after an outage):
                # nothing is kept until a renewal counts it back under.
                self._over.add(name)
                self._somebody_waits(name)
            else:
                self._over.discard(name)
        self.known_processes = live if self._up else max(live, self.known_processes)
        return True

    async def _maintain(self) -> None:
        while True:
            if self._up:
                listener = asyncio.get_running_loop().create_task(self._listen())
                try:
                    while self._up and not listener.done():
                        await asyncio.sleep(self.lease / 3)
                        await self._renew_all()
                finally:
                    listener.cancel()
                    with contextlib.suppress(asyncio.CancelledError, *self._errors):
                        await listener
                if self._up:  # the subscription broke but calls work: resubscribe
                    self._state(False, "grant channel lost")
                continue
            await asyncio.sleep(PROBE_INTERVAL)
            if not await self._renew_all():
                continue
            # Redis answers again and holds this process's permits. The other processes
            # register theirs at their next probe (every PROBE_INTERVAL while they count
            # Redis as down) or, if Redis lost its data, at their next renewal (every
            # lease/3 while up): keep to the local share until then, so Redis does not
            # hand out permits that are in use elsewhere.
            settle = max(PROBE_INTERVAL, self.lease / 3) if self._lost else PROBE_INTERVAL
            self._lost = False
            await asyncio.sleep(settle + SETTLE_MARGIN)
            if await self._renew_all() and not self._lost:  # and the permits taken meanwhile
                self._state(True)

    async def _listen(self) -> None:
        pubsub = self._client.pubsub()
        try:
            want = f"{self.prefix}want"
            await pubsub.subscribe(f"{self.prefix}grant:{self.process_id}", want)
            while True:
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=self.lease
                )
                if message is None:
                    continue
                data = message.get("data")
                rid = data.decode() if isinstance(data, bytes) else str(data)
                channel = message.get("channel")
                if (channel.decode() if isinstance(channel, bytes) else channel) == want:
                    name = self._names.get(rid)  # here the message is a held key
                    if name is not None:
                        self._somebody_waits(name)
                    continue
                future = self._grants.get(rid)
                if future is not None and not future.done():
                    future.set_result(None)
        except self._errors as exc:
            self._state(False, f"{type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(*self._errors):
                await pubsub.aclose()


__all__ = ["DEFAULT_KEEP_IDLE", "DEFAULT_LEASE", "DEFAULT_TIMEOUT", "RedisPermitStore", "check_url"]
