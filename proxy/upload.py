"""Request bodies streamed through instead of buffered whole (multipart audio uploads).

The HTTP server hands such a request to its handler as soon as the headers are in, with a
`BodyStream` that the connection feeds from `on_body`; reading from the client pauses
while more than HIGH_WATER bytes wait, so an upload costs sluice a bounded buffer
whatever its size. `open_streamed_exchange` sends the head, then the bytes as they
arrive, to the backend (with the client's Content-Length, else chunked), waiting when the
backend's socket stops taking writes. A streamed body can be sent once: no retry on
another replica.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol

from .upstream import UpstreamConnection, UpstreamError
from .upstream_pool import UpstreamPool

HIGH_WATER: Final = 256 * 1024
# A client that sends nothing for this long mid-body is gone (the buffered-body path has
# the request-read timeout for the same purpose).
IDLE_TIMEOUT: Final = 30.0


class BodyTooLarge(Exception):
    pass


class BodyUnreadable(Exception):
    """What the client sent after the head cannot be parsed (a malformed chunk): the
    handler, which reads the body, answers 400 and the connection ends."""


class ReadingControl(Protocol):
    def pause_body(self) -> None: ...

    def resume_body(self) -> None: ...


class BodyStream:
    """The body of one request, as it arrives."""

    __slots__ = (
        "_chunks",
        "_control",
        "_done",
        "_exc",
        "_paused",
        "_waiter",
        "buffered",
        "inspect",
        "limit",
        "received",
    )

    def __init__(self, control: ReadingControl, limit: int) -> None:
        self._control = control
        self.limit = limit
        self.received = 0
        self.buffered = 0
        self._chunks: deque[bytes] = deque()
        self._done = False
        self._exc: BaseException | None = None
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        # Sees each piece before it goes upstream; raising refuses the request.
        self.inspect: Callable[[bytes], None] | None = None

    # -- fed by the connection -------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self._exc is not None:
            return  # failed (too large): the rest is dropped, the handler answers 413
        self.received += len(data)
        if self.received > self.limit:
            raise BodyTooLarge(f"request body exceeds the limit of {self.limit} bytes")
        self._chunks.append(data)
        self.buffered += len(data)
        if self.buffered > HIGH_WATER and not self._paused:
            self._paused = True
            self._control.pause_body()
        self._wake()

    def finish(self) -> None:
        self._done = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if not self._done:
            self._exc = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- read by the handler -----------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self._done and not self._chunks

    async def read(self) -> bytes:
        """The next bytes; b"" once the body is complete."""
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._done:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(IDLE_TIMEOUT):
                    await self._waiter
            finally:
                self._waiter = None
        data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks.clear()
        self.buffered = 0
        if self._paused:
            self._paused = False
            self._control.resume_body()
        return data

    async def read_prefix(self, size: int) -> bytes:
        """At least `size` bytes (fewer only when the body is shorter)."""
        parts: list[bytes] = []
        have = 0
        while have < size:
            data = await self.read()
            if not data:
                break
            parts.append(data)
            have += len(data)
        return b"".join(parts)


async def open_streamed_exchange(
    pool: UpstreamPool,
    method: bytes,
    path: bytes,
    headers: list[tuple[bytes, bytes]],
    prefix: bytes,
    body: BodyStream,
    length: int | None,
) -> UpstreamConnection:
    """Sends the request, its body as it arrives, and waits for the response head."""
    conn = pool.take_idle() or await pool.connect()
    try:
        if length is None:
            head = pool.build_head(method, path, [*headers, (b"transfer-encoding", b"chunked")], -1)
        else:
            head = pool.build_head(method, path, headers, length)
        conn.send(head, b"")
        await _write(conn, prefix, chunked=length is None)
        while True:
            data = await body.read()
            if not data:
                break
            if body.inspect is not None:
                body.inspect(data)
            await _write(conn, data, chunked=length is None)
        if length is None:
            await _write(conn, b"", chunked=True, last=True)
        await conn.read_head()
    except BaseException:
        conn.abort()
        raise
    return conn


async def _write(
    conn: UpstreamConnection, data: bytes, *, chunked: bool, last: bool = False
) -> None:
    transport = conn.transport
    if transport is None or conn.closed:
        raise UpstreamError("reset", "backend closed the connection during the upload", True)
    if chunked:
        if data:
            transport.write(b"%x\r\n" % len(data) + data + b"\r\n")
        if last:
            transport.write(b"0\r\n\r\n")
    elif data:
        transport.write(data)
    await conn.drain()
