"""The one raw HTTP/1.1 client: for the load generator, the tests and benchmarks of
streaming, where an httpx or aiohttp client would re-buffer what arrived.

`ResponseProtocol` is an asyncio protocol reading responses with httptools; each
`data_received` is timed once (`now`), when the bytes reached the process, not when a task
got round to them. `sluice bench`'s load generator builds its `StreamConnection` on it.
On top of it, `RawStream` keeps what higher-level clients hide: each HTTP chunk as it
arrived, its arrival time, every byte with its framing, and whether the body ended
properly; a test can stop reading (the socket then pushes back), wait, or close it
mid-stream. `fetch()` reads a whole response.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import cast

import httptools
import orjson

# Unread body bytes above which a RawStream stops reading the socket (as asyncio's
# StreamReader does at twice its 64 KiB limit), and below which it reads again.
_PAUSE_ABOVE = 128 * 1024
_RESUME_BELOW = 64 * 1024


def request_bytes(
    method: str, host: str, port: int, path: str, body: bytes, headers: dict[str, str]
) -> bytes:
    """One request's bytes; `connection: close` unless `headers` say otherwise."""
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}:{port}"]
    merged = {"connection": "close", **{k.lower(): v for k, v in headers.items()}}
    if body or method in ("POST", "PUT", "PATCH"):
        merged.setdefault("content-type", "application/json")
        merged["content-length"] = str(len(body))
    lines += [f"{name}: {value}" for name, value in merged.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ResponseProtocol(asyncio.Protocol):
    """One client connection; httptools parses the responses and calls the `on_*` methods
    of the subclass (`on_header`, `on_body`, `on_chunk_complete`, `on_message_complete`)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.keep_alive = True
        self.status = 0
        self.now = 0.0  # time.perf_counter() of the data being parsed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.now = time.perf_counter()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.on_parse_error("unexpected upgrade", fatal=False)
        except httptools.HttpParserError as exc:
            self.on_parse_error(f"malformed response: {exc}", fatal=True)

    def on_parse_error(self, detail: str, *, fatal: bool) -> None:
        """The response cannot be read further; a fatal error also closes the connection."""
        if fatal:
            self.abort()

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self.transport.write(request)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


@dataclass
class RawResponse:
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)  # chunk payloads, or the whole body
    times: list[float] = field(default_factory=list)  # arrival of each chunk, s after send
    head_time: float = 0.0  # arrival of the status line and headers
    complete: bool = False  # chunked terminator or the whole content-length seen
    received: bytearray = field(default_factory=bytearray)  # every byte, framing included

    @property
    def raw(self) -> bytes:
        return bytes(self.received)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> object:
        return orjson.loads(self.body)

    def events(self) -> list[bytes]:
        """The `data:` payloads of the SSE events, in order (comments skipped)."""
        out = []
        for block in self.body.split(b"\n\n"):
            for line in block.split(b"\n"):
                if line.startswith(b"data: "):
                    out.append(line[6:])
        return out

    def json_events(self) -> list[dict[str, object]]:
        """The JSON data events, without `[DONE]`."""
        return [orjson.loads(data) for data in self.events() if data != b"[DONE]"]


class RawStream(ResponseProtocol):
    """One request on its own connection, read incrementally. `response` fills as the
    bytes arrive; `read_head()` and `read_chunk()` wait for them."""

    def __init__(self, head_only: bool = False) -> None:
        super().__init__()
        self.response = RawResponse()
        self._head_only = head_only
        self._start = time.perf_counter()
        self._head_seen = False
        self._chunked = False
        self._close_delimited = False
        self._ended = False
        self._chunk = bytearray()  # the HTTP chunk being read
        self._unread: deque[bytes] = deque()
        self._unread_bytes = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        method: str,
        path: str,
        body: object = None,
        headers: dict[str, str] | None = None,
    ) -> RawStream:
        payload = body if isinstance(body, bytes) else b"" if body is None else orjson.dumps(body)
        loop = asyncio.get_running_loop()
        _, stream = await loop.create_connection(lambda: cls(method == "HEAD"), host, port)
        stream._start = time.perf_counter()
        stream.send(request_bytes(method, host, port, path, payload, headers or {}))
        return stream

    # -- protocol and parser callbacks ---------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.response.received += data
        if not self._ended:  # after a HEAD response's head, the rest is not parsed
            super().data_received(data)
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._close_delimited and not self._ended:
            self._end()  # the body of a response without length ends with the connection
        self._wake()

    def on_parse_error(self, detail: str, *, fatal: bool) -> None:
        self.abort()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.response.headers.append(
            (name.decode("latin-1").lower(), value.decode("latin-1").strip())
        )

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        result = self.response
        result.status = self.status
        result.head_time = self.now - self._start
        self._head_seen = True
        no_body = result.status in (204, 304) or 100 <= result.status < 200
        if self._head_only or no_body:
            self._end()
        elif (result.header("transfer-encoding") or "").lower() == "chunked":
            self._chunked = True
        else:
            self._close_delimited = result.header("content-length") is None

    def on_body(self, body: bytes) -> None:
        if self._chunked:
            self._chunk += body
        else:
            self._take(body)

    def on_chunk_complete(self) -> None:
        if self._chunk:  # the terminating zero-size chunk has no payload
            self._take(bytes(self._chunk))
            self._chunk.clear()

    def on_message_complete(self) -> None:
        self._end()

    def _take(self, payload: bytes) -> None:
        self.response.chunks.append(payload)
        self.response.times.append(self.now - self._start)
        self._unread.append(payload)
        self._unread_bytes += len(payload)
        if self._unread_bytes > _PAUSE_ABOVE and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def _end(self) -> None:
        self._ended = True
        self.response.complete = True

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # -- reading -------------------------------------------------------------------------

    async def read_head(self) -> RawResponse:
        """Waits for the status line and headers; ConnectionError if the connection closed
        before them."""
        while not self._head_seen:
            if self.closed:
                raise ConnectionError("connection closed before the response head")
            await self._wait()
        return self.response

    async def read_chunk(self) -> bytes | None:
        """The next HTTP chunk (or body piece); None once the body has ended or the
        connection closed (then `response.complete` says which)."""
        while not self._unread:
            if self._ended or self.closed:
                return None
            await self._wait()
        payload = self._unread.popleft()
        self._unread_bytes -= len(payload)
        if self._paused and self._unread_bytes < _RESUME_BELOW and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return payload

    async def read_all(self) -> RawResponse:
        while await self.read_chunk() is not None:
            pass
        return self.response

    def close(self) -> None:
        """Closes the socket, also mid-response (an aborting client)."""
        if self.transport is not None:
            self.transport.close()


async def fetch(
    host: str,
    port: int,
    method: str,
    path: str,
    body: object = None,
    headers: dict[str, str] | None = None,
    *,
    close_after_chunks: int | None = None,
    timeout: float = 30.0,
) -> RawResponse:
    """One request on a fresh connection. `body` is bytes or a JSON-able object.
    `close_after_chunks`: close the socket after that many body chunks (an aborting
    client); the response then has `complete=False`. A connection closed before the
    response head gives `status=0`."""
    stream = await RawStream.open(host, port, method, path, body, headers)
    try:
        async with asyncio.timeout(timeout):
            try:
                await stream.read_head()
            except ConnectionError:
                return stream.response
            limit = close_after_chunks
            while await stream.read_chunk() is not None:
                if limit is not None and len(stream.response.chunks) >= limit:
                    break
    finally:
        stream.close()
    return stream.response
