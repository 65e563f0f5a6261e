"""Resumable streams across workers and replicas: a copy of each stream in Redis.

With `limits.store` (Redis) configured, `RedisStreamStore` wraps this process's
`StreamRegistry`: the generation, its buffer, its window and its abort stay with the
process that runs it, exactly as without Redis; in addition every event is appended to a
Redis Stream so that a `GET /v1/streams/<id>` reaching ANOTHER process replays the missed
events from Redis and then follows the live rest (XREAD BLOCK) until the owner's end marker.

Keys (prefix `sluice:stream:`, both expiring one window after the last write):
- `{rid}:ev`   the Redis Stream: entries `n` + `d` (the framed event, `id:` line included)
  and finally one end entry `end` (+ `gone` when the owner aborted it). XADD MAXLEN ~ the
  number of events the local buffer holds, so Redis keeps what the policy's byte bound
  keeps (approximately: Redis trims whole macro-nodes).
- `{rid}:meta` a hash: `k` the API-key digest, `s`/`h` the head's status and headers, and
  for a response sent whole (`f`) its body `b`.
- `{rid}:follow` set (PX one window) by a process whose client follows the copy, refreshed
  while it follows and once more when that client leaves: the owner neither aborts at the
  window's end nor on buffer overflow while it is set, so the window counts from the last
  client anywhere.

Hot path: `add` only appends to a list; one pipeline per event-loop iteration carries every
stream's new events (one round trip), and only one pipeline is in flight at a time (events
queue meanwhile, bounded by MAX_PENDING). Redis down: the copy is skipped (local resume
works as before), logged once until it is back. Blocking reads use their own small pool
(same URL) so a follower never holds a connection the permit calls need.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
from typing import Any, Final

import structlog

from .errors import ApiError, not_found
from .exchange import Exchange
from .http import Request, Response
from .response import ClientGone, Header
from .resume import (
    STREAMS_PREFIX,
    ResumableStream,
    StreamRegistry,
    _first_wanted,
    _gone,
    _key_digest,
)
from .snapshot import Snapshot, StreamPolicy

DEFAULT_PREFIX: Final = "sluice:stream:"
MAX_PENDING: Final = 100_000  # events queued while a pipeline is in flight; over it, copies drop
BLOCK_MS: Final = 1000
READ_COUNT: Final = 256
FOLLOWERS: Final = 64  # connections for blocking reads, per process

_log = structlog.get_logger("sluice.streams")


class RedisStreamStore:
    """The local `StreamRegistry` plus a Redis copy of each stream; see the module doc."""

    def __init__(
        self,
        client: Any,
        url: str,
        *,
        timeout: float,
        prefix: str = DEFAULT_PREFIX,
        local: StreamRegistry | None = None,
    ) -> None:
        import redis.asyncio as aioredis  # noqa: PLC0415 (only when a store is configured)

        self.local = local or StreamRegistry()
        self.client = client
        self.prefix = prefix
        self.timeout = timeout
        from redis.asyncio.retry import Retry  # noqa: PLC0415
        from redis.backoff import NoBackoff  # noqa: PLC0415

        # One retry on a fresh connection: a Redis restart is not an outage (reads are
        # idempotent).
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=FOLLOWERS,
            timeout=timeout,
            socket_timeout=timeout + BLOCK_MS / 1000,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
        )
        self.blocking: Any = aioredis.Redis(connection_pool=pool)
        self._pending: list[tuple[ResumableStream, int, bytes | None]] = []
        self._scheduled = False
        self._sending = False
        self._up: bool | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.round_trips = 0

    # -- the owner's side ------------------------------------------------------------------

    def open(
        self, ex: Exchange, response: Response, policy: StreamPolicy, request: Request
    ) -> ResumableStream:
        stream = self.local.open(ex, response, policy, request)
        stream.mirror = self
        return stream

    def add(self, stream: ResumableStream, n: int, framed: bytes) -> None:
        if len(self._pending) >= MAX_PENDING:
            return  # Redis too slow: followers see a gap and end; local resume still works
        self._pending.append((stream, n, framed))
        self._schedule()

    def ended(self, stream: ResumableStream) -> None:
        self._pending.append((stream, -1, None))
        self._schedule()

    def expire(self, stream: ResumableStream) -> None:
        self._spawn(self._expire(stream))

    async def _expire(self, stream: ResumableStream) -> None:
        try:
            ttl = await asyncio.wait_for(
                self.client.pttl(self._key(stream.request_id, "follow")), self.timeout
            )
        except Exception as exc:  # Redis gone: the window rules, as without it
            self._state(False, exc)
            ttl = -2
        if ttl > 0:
            stream.followed_until = stream._loop.time() + ttl / 1000
            stream.rearm(ttl / 1000 + 0.05)
        elif stream.target is None and not stream.ended:
            stream.abort_generation("resume window passed")

    def _schedule(self) -> None:
        if not self._scheduled and not self._sending:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._pending or self._sending:
            return
        batch, self._pending = self._pending, []
        self._sending = True
        self._spawn(self._send(batch))

    async def _send(self, batch: list[tuple[ResumableStream, int, bytes | None]]) -> None:
        try:
            streams = await asyncio.wait_for(self._pipeline(batch), self.timeout)
            self._state(True)
            now = asyncio.get_running_loop().time()
            for stream, ttl in streams:
                if ttl > 0:
                    stream.followed_until = now + ttl / 1000
        except Exception as exc:  # whatever the client raises, the copy is skipped
            self._state(False, exc)
        finally:
            self._sending = False
            if self._pending:
                self._schedule()

    async def _pipeline(
        self, batch: list[tuple[ResumableStream, int, bytes | None]]
    ) -> list[tuple[ResumableStream, int]]:
        seen: dict[str, ResumableStream] = {}
        async with self.client.pipeline(transaction=False) as pipe:
            for stream, n, framed in batch:
                rid = stream.request_id
                ev = self._key(rid, "ev")
                if rid not in seen:
                    seen[rid] = stream
                    pipe.hset(self._key(rid, "meta"), mapping=_meta(stream))
                if framed is not None:
                    pipe.xadd(
                        ev,
                        {"n": n, "d": framed},
                        maxlen=max(len(stream.events), 1),
                        approximate=True,
                    )
                else:
                    pipe.xadd(ev, {"end": 1, "gone": stream.gone or ""})
            ttl_ms = []
            for rid, stream in seen.items():
                # Kept one window after the last write, as the owner keeps it.
                window_ms = math.ceil(stream.window * 1000) + 1000
                pipe.pexpire(self._key(rid, "ev"), window_ms)
                pipe.pexpire(self._key(rid, "meta"), window_ms)
            for rid, stream in seen.items():  # last: their answers are the tail
                if stream.target is None:
                    pipe.pttl(self._key(rid, "follow"))
                    ttl_ms.append(stream)
            results = await pipe.execute()
        away = results[len(results) - len(ttl_ms) :] if ttl_ms else []
        return [(s, int(t)) for s, t in zip(ttl_ms, away, strict=True)]

    # -- GET /v1/streams/<request id> ------------------------------------------------------

    async def resume(self, request: Request, response: Response, snap: Snapshot) -> None:
        request_id = request.path[len(STREAMS_PREFIX) :]
        if request.method != "GET" or request_id in self.local.streams or not self._up:
            await self.local.resume(request, response, snap)
            return
        try:  # unknown here (404): maybe another process runs it
            await self.local.resume(request, response, snap)
            return
        except ApiError as exc:
            if exc.status != 404:
                raise
            not_here = exc
        await self._follow(request, response, request_id, not_here)

    async def _follow(
        self, request: Request, response: Response, request_id: str, not_here: ApiError
    ) -> None:
        meta_key = self._key(request_id, "meta")
        try:
            meta = await asyncio.wait_for(self.client.hgetall(meta_key), self.timeout)
        except Exception as exc:
            self._state(False, exc)
            raise not_here from None
        if not meta or not hmac.compare_digest(meta.get(b"k", b""), _key_digest(request)):
            raise not_found(
                f"no resumable stream {request_id!r} (unknown, expired, or on a route "
                "without resume_window)",
                code="stream_not_found",
            )
        from_n = _first_wanted(request, request_id)
        if meta.get(b"f"):
            response.send(int(meta[b"s"]), _headers(meta.get(b"h", b"")), meta.get(b"b", b""))
            return
        ev = self._key(request_id, "ev")
        follow = self._key(request_id, "follow")
        window_ms = int(meta.get(b"w", b"1000"))
        await self._call(self.client.set(follow, 1, px=window_ms))
        entries = await self._call(self.client.xrange(ev, "-", "+"))
        first = _first_n(entries)
        if first is not None and from_n < first:
            raise _gone(request_id, "replay buffer overflow")
        # Marked so operators (and tests) can tell a resume served from the Redis copy.
        head = [*_headers(meta.get(b"h", b"")), (b"x-sluice-resumed-from", b"redis")]
        response.start(int(meta.get(b"s", b"200")), head)
        last_id = b"0-0"
        expected = from_n
        try:
            while True:
                for entry_id, fields in entries:
                    last_id = entry_id
                    if b"end" in fields:
                        if fields.get(b"gone"):  # the owner aborted it
                            response.abort()
                        else:
                            response.write_last(b"")
                        return
                    n = int(fields[b"n"])
                    if n < expected:
                        continue
                    if n > expected:  # a copy was lost: end; the client resumes again
                        response.abort()
                        return
                    response.write(fields[b"d"])
                    expected = n + 1
                if response.must_drain:
                    await response.drain()
                entries = await self._read(ev, follow, window_ms, last_id)
                if entries is None:  # the owner went quiet for a window, or Redis went
                    response.abort()
                    return
        except ClientGone:
            return
        finally:
            # The client may come back: the owner keeps the generation one more window.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.set(follow, 1, px=window_ms), self.timeout)

    async def _read(self, ev: str, follow: str, window_ms: int, last_id: bytes) -> list[Any] | None:
        """The entries after `last_id`, waiting for them; None when nothing came for a
        window-ish while (BLOCK_MS rounds whose key has expired) or Redis is down."""
        while True:
            try:
                pipe = self.client.pipeline(transaction=False)
                pipe.set(follow, 1, px=window_ms)
                pipe.exists(ev)
                _, exists = await asyncio.wait_for(pipe.execute(), self.timeout)
                if not exists:
                    return None
                got = await asyncio.wait_for(
                    self.blocking.xread({ev: last_id}, count=READ_COUNT, block=BLOCK_MS),
                    self.timeout + BLOCK_MS / 1000,
                )
            except Exception as exc:
                self._state(False, exc)
                return None
            if got:
                return list(got[0][1])

    async def _call(self, awaitable: Any) -> Any:
        try:
            return await asyncio.wait_for(awaitable, self.timeout)
        except Exception as exc:
            self._state(False, exc)
            raise ApiError(
                503, "the stream store is unavailable; try again", code="store_unavailable"
            ) from None

    # -- plumbing --------------------------------------------------------------------------

    def _key(self, request_id: str, part: str) -> str:
        return f"{self.prefix}{{{request_id}}}:{part}"

    def _state(self, up: bool, error: BaseException | None = None) -> None:
        if up == self._up:
            return
        first = self._up is None
        self._up = up
        if not up:
            _log.warning(
                "resume_store_down",
                store="redis",
                error=f"{type(error).__name__}: {error}" if error else "",
                fallback="resume reaches only the owning process",
            )
        elif not first:
            _log.info("resume_store_up", store="redis")

    async def start(self) -> None:
        """Checks Redis once; resumes go to Redis only once it answered."""
        try:
            await asyncio.wait_for(self.client.ping(), self.timeout)
            self._state(True)
        except Exception as exc:
            self._state(False, exc)

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 1.0)
        with contextlib.suppress(Exception):
            await self.blocking.aclose()


def _meta(stream: ResumableStream) -> dict[str, bytes | int]:
    meta: dict[str, bytes | int] = {
        "k": stream.key,
        "s": stream.status or 200,
        "w": math.ceil(stream.window * 1000),
    }
    if stream.final is not None:
        status, headers, body = stream.final
        meta.update(s=status, h=_pack(headers), b=body, f=1)
    else:
        meta["h"] = _pack(stream._head_headers)
    return meta


def _pack(headers: list[Header]) -> bytes:
    return b"\n".join(name + b"\0" + value for name, value in headers)


def _headers(packed: bytes) -> list[Header]:
    out: list[Header] = []
    for line in packed.split(b"\n"):
        if line:
            name, _, value = line.partition(b"\0")
            out.append((name, value))
    return out


def _first_n(entries: list[Any]) -> int | None:
    for _, fields in entries:
        if b"n" in fields:
            return int(fields[b"n"])
    return None


__all__ = ["RedisStreamStore"]
