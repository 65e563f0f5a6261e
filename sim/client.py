"""A lean raw-socket HTTP/1.1 client that keeps what higher-level clients hide: each
HTTP chunk as it arrived, its arrival time, and whether the body ended properly.

For tests and benchmarks of streaming (an httpx or aiohttp client would re-buffer):
`fetch()` reads a whole response; `RawStream` reads it chunk by chunk, so a test can
stop reading, wait, or close the socket mid-stream.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import orjson

_READ_SIZE = 65536


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


def request_bytes(
    method: str, host: str, port: int, path: str, body: bytes, headers: dict[str, str]
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}:{port}"]
    merged = {"connection": "close", **{k.lower(): v for k, v in headers.items()}}
    if body or method in ("POST", "PUT", "PATCH"):
        merged.setdefault("content-type", "application/json")
        merged["content-length"] = str(len(body))
    lines += [f"{name}: {value}" for name, value in merged.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class RawStream:
    """One request on its own connection, read incrementally. `response` fills as
    `read_head()` and `read_chunk()` are awaited."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head_only: bool = False
    ) -> None:
        self._reader = reader
        self._head_only = head_only
        self._writer = writer
        self._buf = bytearray()
        self._start = time.monotonic()
        self._chunked = False
        self._remaining: int | None = None  # content-length left; None: until EOF
        self._ended = False
        self.response = RawResponse()

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
        reader, writer = await asyncio.open_connection(host, port)
        stream = cls(reader, writer, head_only=method == "HEAD")
        writer.write(request_bytes(method, host, port, path, payload, headers or {}))
        return stream

    async def _more(self) -> bool:
        data = await self._reader.read(_READ_SIZE)
        self.response.received += data
        self._buf += data
        return bool(data)

    async def read_head(self) -> RawResponse:
        result = self.response
        while b"\r\n\r\n" not in self._buf:
            if not await self._more():
                raise ConnectionError("connection closed before the response head")
        end = self._buf.index(b"\r\n\r\n")
        head = bytes(self._buf[:end])
        del self._buf[: end + 4]
        result.head_time = time.monotonic() - self._start
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        result.status = int(status_line.split(" ", 2)[1])
        for line in header_lines:
            name, _, value = line.partition(":")
            result.headers.append((name.strip().lower(), value.strip()))
        no_body = result.status in (204, 304) or 100 <= result.status < 200
        if self._head_only or no_body:
            self._end()
        elif (result.header("transfer-encoding") or "").lower() == "chunked":
            self._chunked = True
        else:
            length = result.header("content-length")
            self._remaining = None if length is None else int(length)
        return result

    def _end(self) -> None:
        self._ended = True
        self.response.complete = True

    def _take(self, payload: bytes) -> bytes:
        self.response.chunks.append(payload)
        self.response.times.append(time.monotonic() - self._start)
        return payload

    async def read_chunk(self) -> bytes | None:
        """The next HTTP chunk (or body piece); None once the body has ended or the
        connection closed (then `response.complete` says which)."""
        if self._ended:
            return None
        if self._chunked:
            while b"\r\n" not in self._buf:
                if not await self._more():
                    return None
            line_end = self._buf.index(b"\r\n")
            size = int(bytes(self._buf[:line_end]).split(b";")[0], 16)
            while len(self._buf) < line_end + 2 + size + 2:
                if not await self._more():
                    return None
            payload = bytes(self._buf[line_end + 2 : line_end + 2 + size])
            del self._buf[: line_end + 2 + size + 2]
            if size == 0:
                self._end()
                return None
            return self._take(payload)
        if self._remaining == 0:
            self._end()
            return None
        if not self._buf and not await self._more():
            if self._remaining is None:
                self._end()
            return None
        take = len(self._buf) if self._remaining is None else min(len(self._buf), self._remaining)
        payload = bytes(self._buf[:take])
        del self._buf[:take]
        if self._remaining is not None:
            self._remaining -= take
        return self._take(payload)

    async def read_all(self) -> RawResponse:
        while await self.read_chunk() is not None:
            pass
        return self.response

    def close(self) -> None:
        """Closes the socket, also mid-response (an aborting client)."""
        self._writer.close()


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
