"""Resumable streams: a generation that outlives its client connection for a window.

On a route whose Policy sets `resume_window`, a streaming request's response is a
`ResumableStream`: every event gets an SSE `id: <request id>:<n>` and is kept in a replay
buffer bounded in bytes; the client connection is only the stream's current *target*. When
the client goes away the handler is not cancelled (the HTTP layer calls the stream's
`client_lost` instead): the generation keeps running into the buffer, holding its permits,
for `resume_window` seconds. `GET /v1/streams/<request id>` with `Last-Event-ID` (same API
key) attaches a new connection: the missed events are replayed and the live rest follows.
Nobody back within the window, or a buffer that had to drop events nobody received: the
generation is aborted (upstream closed, permits released) and a later resume answers 410.

Only resumable streams carry `id:` lines. Every other stream is relayed byte for byte as
the backend sent it and pays nothing for this module.

State is per process (`StreamRegistry`). With `limits.store` (Redis) set, every event is
also copied to a Redis Stream (`RedisStreamStore`, resume_redis.py) and a resume that
reaches another worker or replica replays and follows it from there; without a store a
resume must reach the process that runs the generation (404 `stream_not_found` otherwise).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
from collections.abc import Callable
from typing import Final, Protocol

from .auth import api_key, authenticate
from .errors import ApiError, not_found
from .exchange import Exchange
from .http import Header, HttpConnection, Request, Response
from .response import ClientGone, FlowListener
from .snapshot import Snapshot, StreamPolicy

STREAMS_PREFIX: Final = "/v1/streams/"
SEPARATOR: Final = b"\n\n"
# Whole-process bound on replay buffers: over it, the oldest streams are dropped first
# (finished ones, then running ones whose client is away, which are aborted).
DEFAULT_TOTAL_BYTES: Final = 256 * 1024 * 1024
# Request ids of dropped streams, remembered so a late resume answers 410 (not 404).
MAX_TOMBSTONES: Final = 4096


class ResumableStream(Response):
    """The response a resumable exchange writes to; forwards to the attached client."""

    __slots__ = (
        "_done_waiter",
        "_expiry",
        "_head_headers",
        "_listener",
        "_loop",
        "_rid",
        "events",
        "final",
        "first_n",
        "followed_until",
        "gone",
        "key",
        "max_bytes",
        "mirror",
        "next_n",
        "registry",
        "request_id",
        "size",
        "target",
        "task",
        "window",
    )

    def __init__(
        self,
        registry: StreamRegistry,
        target: Response,
        request_id: str,
        key: bytes,
        window: float,
        max_bytes: int,
    ) -> None:
        Response.__init__(self, target._conn, keep_alive=False, head_only=False)
        self.registry = registry
        self.target: Response | None = target
        self.request_id = request_id
        self._rid = request_id.encode()
        self.key = key
        self.window = window
        self.max_bytes = max_bytes
        self.events: collections.deque[tuple[int, bytes]] = collections.deque()
        self.size = 0
        self.next_n = 0
        self.first_n = 0  # the oldest event still in the buffer (after trimming)
        self.final: tuple[int, list[Header], bytes] | None = None
        self.gone: str | None = None  # why it can no longer be resumed
        self.task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        self._head_headers: list[Header] = []
        self._listener: FlowListener | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._done_waiter: asyncio.Future[None] | None = None
        # A copy of the events in a store every process reads (Redis), when configured.
        self.mirror: StreamMirror | None = None
        # Loop time until which a client of another process follows the copy.
        self.followed_until = 0.0

    # -- Response, as the exchange uses it ---------------------------------------------

    def send(self, status: int, headers: list[Header], body: bytes) -> None:
        self.started = self.ended = True
        self.status = status
        self.final = (status, headers, body)
        target = self.target
        if target is not None and not target.started:
            target.send(status, headers, body)
        self._finished()

    def start(self, status: int, headers: list[Header], *, with_first_write: bool = False) -> None:
        self.started = True
        self.status = status
        self._head_headers = headers
        target = self.target
        if target is not None and not target.started:
            target.start(status, headers, with_first_write=with_first_write)

    def flush(self) -> None:
        if self.target is not None:
            self.target.flush()

    def write(self, data: bytes) -> None:
        if not data:
            self.flush()
            return
        if data[0] != 58:  # not a comment (": keep-alive"): number and keep it
            data = self._record(data)
        target = self.target
        if target is not None:
            try:
                target.write(data)
            except ClientGone:
                self.detach(target)

    def write_last(self, data: bytes) -> None:
        if self.ended:
            return
        self.ended = True
        data = self._record(data) if data else b""
        target = self.target
        if target is not None:
            try:
                target.write_last(data)
            except ClientGone:
                self.detach(target)
        self._finished()

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.target is not None:
            self.target.end()
        self._finished()

    def abort(self) -> None:
        self.ended = True
        if self.target is not None:
            self.target.abort()
        self._finished()

    @property
    def must_drain(self) -> bool:
        return self.target is not None and self.target.must_drain

    async def drain(self) -> None:
        if self.target is not None:
            await self.target.drain()

    def set_flow_listener(self, listener: FlowListener | None) -> None:
        self._listener = listener
        if self.target is not None:
            self.target.set_flow_listener(listener)

    # -- the replay buffer ---------------------------------------------------------------

    def _record(self, data: bytes) -> bytes:
        """Numbers each event of `data` and keeps it; returns the framed events."""
        if data.find(SEPARATOR) == len(data) - 2:  # one event per write: vLLM's common case
            n = self.next_n
            framed = b"id: %b:%d\n%b" % (self._rid, n, data)
            self.events.append((n, framed))
            self.next_n = n + 1
            if self.mirror is not None:
                self.mirror.add(self, n, framed)
            self._grown(len(framed))
            return framed
        parts = data.split(SEPARATOR)
        if parts[-1] == b"":
            parts.pop()
        out = []
        rid = self._rid
        added = 0
        for event in parts:
            if not event:
                continue
            if event[0] == 58:  # a comment among events: passes, unnumbered
                out.append(event + SEPARATOR)
                continue
            framed = b"id: %b:%d\n%b\n\n" % (rid, self.next_n, event)
            self.events.append((self.next_n, framed))
            if self.mirror is not None:
                self.mirror.add(self, self.next_n, framed)
            self.next_n += 1
            added += len(framed)
            out.append(framed)
        self._grown(added)
        return b"".join(out)

    def _grown(self, added: int) -> None:
        self.size += added
        registry = self.registry
        registry.total_bytes += added
        if self.size > self.max_bytes:
            self._trim()
        if registry.total_bytes > registry.max_total_bytes:
            registry.shed()

    def _trim(self) -> None:
        dropped = 0
        while self.size > self.max_bytes and len(self.events) > 1:
            _, framed = self.events.popleft()
            self.size -= len(framed)
            dropped += len(framed)
        self.registry.total_bytes -= dropped
        self.first_n = self.events[0][0] if self.events else self.next_n
        if self.target is None and not self.ended and not self.followed():
            # Away, and events nobody received are gone: no resume can be complete.
            self.abort_generation("replay buffer overflow")

    def followed(self) -> bool:
        """A client of another process reads the mirrored copy (as last seen)."""
        return self.followed_until > self._loop.time()

    def replay_from(self, n: int) -> bytes:
        return b"".join(framed for index, framed in self.events if index >= n)

    # -- attaching and detaching clients -------------------------------------------------

    def client_lost(self) -> None:
        """The HTTP layer's notice that the first client's connection closed (instead of
        cancelling the handler, which keeps generating)."""
        target = self.target
        if target is not None and target._conn is self._conn:
            self.detach(target)

    def detach(self, target: Response) -> None:
        if self.target is not target:
            return
        self.target = None
        if self._listener is not None:
            self._listener.resume()  # reading the backend must not stay paused for a gone socket
        waiter = self._done_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._done_waiter = None
        if not self.ended and self.gone is None:
            self._arm(self.window, self._expire)

    def attach(self, response: Response, from_n: int) -> asyncio.Future[None] | None:
        """Replays events from `from_n` on `response` and makes it the live target; the
        future resolves when the stream ended or this target was detached (None: the
        response is already complete)."""
        if self.target is not None:
            previous = self.target
            self.detach(previous)
            previous.abort()  # a newer connection of the same client wins
        self._disarm()
        if self.final is not None:
            response.send(*self.final)
            return None
        if self.started:
            response.start(self.status, self._head_headers)
            replay = self.replay_from(from_n)
            if self.ended:
                response.write_last(replay)
                return None
            if replay:
                response.write(replay)
        self.target = response
        if self._listener is not None:
            response.set_flow_listener(self._listener)
        self._done_waiter = self._loop.create_future()
        return self._done_waiter

    # -- lifetime ------------------------------------------------------------------------

    def _finished(self) -> None:
        self._disarm()
        if self.mirror is not None:
            self.mirror.ended(self)
        waiter = self._done_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._done_waiter = None
        if self.gone is None:
            # Kept for late resumes (a client that lost the last events) for one window.
            self._arm(self.window, self._drop)

    def close(self) -> None:
        """The exchange is over (normally or not); stop claiming its client's loss."""
        # Its task goes on to the connection's next request: nothing here may cancel it.
        self.task = None
        conn = self._conn
        if isinstance(conn, HttpConnection) and conn.keep_task_on_loss == self.client_lost:
            conn.keep_task_on_loss = None
        if not self.ended:
            self.ended = True
            self._finished()

    def _expire(self) -> None:
        self._expiry = None
        if self.target is None and not self.ended:
            if self.mirror is not None:
                self.mirror.expire(self)  # asks whether another process follows it first
            else:
                self.abort_generation("resume window passed")

    def rearm(self, delay: float) -> None:
        """Another process follows the stream: check again after `delay`."""
        if self.target is None and not self.ended and self.gone is None:
            self._arm(delay, self._expire)

    def abort_generation(self, why: str) -> None:
        self.gone = why
        self._disarm()
        task = self.task
        if task is not None and not task.done():
            task.cancel()
        self._drop()

    def _drop(self) -> None:
        self._expiry = None
        self.registry.forget(self)

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._expiry = self._loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None


class StreamMirror(Protocol):
    """Copies a stream's events where other processes can replay them (resume_redis.py).
    Every method is called on the hot path: it must only queue work, never block."""

    def add(self, stream: ResumableStream, n: int, framed: bytes) -> None: ...

    def ended(self, stream: ResumableStream) -> None: ...

    def expire(self, stream: ResumableStream) -> None:
        """The window passed with no client here: abort unless another process follows."""


class StreamStore(Protocol):
    """Where resumable streams live. `StreamRegistry` keeps them in this process; a store
    shared by all processes (Redis Streams, with the scale-out work's `limits.store`) is
    `RedisStreamStore` (resume_redis.py, with the scale-out work's `limits.store`)."""

    def open(
        self, ex: Exchange, response: Response, policy: StreamPolicy, request: Request
    ) -> ResumableStream: ...

    async def resume(self, request: Request, response: Response, snap: Snapshot) -> None: ...


class StreamRegistry:
    """This process's resumable streams by request id, bounded in total bytes."""

    def __init__(self, max_total_bytes: int = DEFAULT_TOTAL_BYTES) -> None:
        self.streams: dict[str, ResumableStream] = {}
        self.max_total_bytes = max_total_bytes
        self.total_bytes = 0
        self._tombstones: collections.OrderedDict[str, str] = collections.OrderedDict()

    def open(
        self, ex: Exchange, response: Response, policy: StreamPolicy, request: Request
    ) -> ResumableStream:
        if ex.request_id in self.streams:
            raise ApiError(
                409,
                f"x-request-id {ex.request_id!r} already names a resumable stream; "
                "send a new id or none",
                code="request_id_in_use",
                param="x-request-id",
            )
        assert policy.resume_window is not None
        stream = ResumableStream(
            self,
            response,
            ex.request_id,
            _key_digest(request),
            policy.resume_window,
            policy.resume_buffer,
        )
        self.streams[ex.request_id] = stream
        self._tombstones.pop(ex.request_id, None)
        if isinstance(response._conn, HttpConnection):  # a client socket (not in-process)
            response._conn.keep_task_on_loss = stream.client_lost
        return stream

    def forget(self, stream: ResumableStream) -> None:
        if self.streams.get(stream.request_id) is stream:
            del self.streams[stream.request_id]
            self.total_bytes -= stream.size
            stream.size = 0
            stream.events.clear()
            self._tombstones[stream.request_id] = stream.gone or "expired"
            while len(self._tombstones) > MAX_TOMBSTONES:
                self._tombstones.popitem(last=False)

    def shed(self) -> None:
        """Over the process-wide bound: drop finished streams, then abort away ones,
        oldest first, until under it."""
        for wanted in ("finished", "away"):
            for stream in list(self.streams.values()):
                if self.total_bytes <= self.max_total_bytes:
                    return
                if wanted == "finished" and stream.ended:
                    stream.gone = "dropped: replay memory full"
                    stream._drop()
                elif wanted == "away" and stream.target is None and not stream.ended:
                    stream.abort_generation("dropped: replay memory full")

    # -- GET /v1/streams/<request id> ----------------------------------------------------

    async def resume(self, request: Request, response: Response, snap: Snapshot) -> None:
        if request.method != "GET":
            raise ApiError(
                405,
                f"method {request.method} is not allowed on {request.path}; use GET",
                code="method_not_allowed",
                headers=[(b"allow", b"GET")],
            )
        authenticate(request, snap)
        request_id = request.path[len(STREAMS_PREFIX) :]
        stream = self.streams.get(request_id)
        if stream is None or not hmac.compare_digest(stream.key, _key_digest(request)):
            if request_id in self._tombstones and stream is None:
                raise _gone(request_id, self._tombstones[request_id])
            raise not_found(
                f"no resumable stream {request_id!r} in this process (unknown, or on a "
                "route without resume_window, or served by another worker/replica)",
                code="stream_not_found",
            )
        from_n = _first_wanted(request, request_id)
        if from_n < stream.first_n:
            stream.abort_generation("replay buffer overflow")
            raise _gone(request_id, "replay buffer overflow")
        waiter = stream.attach(response, from_n)
        if waiter is None:
            return
        try:
            await waiter
        finally:
            stream.detach(response)


def _key_digest(request: Request) -> bytes:
    return hashlib.sha256(api_key(request) or b"").digest()


def _first_wanted(request: Request, request_id: str) -> int:
    """The first event index the client lacks, from `Last-Event-ID` (none: 0)."""
    raw = request.headers.get(b"last-event-id")
    if raw is None or not raw.strip():
        return 0
    rid, sep, n = raw.decode("latin-1").strip().rpartition(":")
    # isascii: the header is read as latin-1, where '²' is a digit to isdigit, not to int.
    if not sep or rid != request_id or not (n.isascii() and n.isdigit()) or len(n) > 12:
        raise ApiError(
            400,
            f"Last-Event-ID must be '{request_id}:<n>' as sent in the stream's id lines",
            code="invalid_last_event_id",
            param="Last-Event-ID",
        )
    return int(n) + 1


def _gone(request_id: str, why: str) -> ApiError:
    return ApiError(
        410,
        f"stream {request_id!r} can no longer be resumed ({why}); start a new request",
        code="stream_gone",
    )


__all__ = [
    "STREAMS_PREFIX",
    "ResumableStream",
    "StreamMirror",
    "StreamRegistry",
    "StreamStore",
]
