"""Writing one HTTP/1.1 response: a complete body, or a chunked stream written as it
is produced (every `write` goes to the socket at once; nothing here buffers)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from email.utils import formatdate
from http import HTTPStatus
from typing import Final, Protocol

from mypy_extensions import mypyc_attr

from .clock import wall
from .headjoin import join_head

Header = tuple[bytes, bytes]

JSON_HEADERS: Final[list[Header]] = [(b"content-type", b"application/json")]


class FlowListener(Protocol):
    def pause(self) -> None: ...

    def resume(self) -> None: ...


class Connection(Protocol):
    """What a response needs of its connection (`http.HttpConnection` is the one)."""

    transport: asyncio.Transport | None
    closing: bool
    write_paused: bool
    flow_listener: FlowListener | None

    def wait_writable(self) -> Awaitable[None]: ...

    def close(self) -> None: ...


# RFC 9110's names where Python 3.11's `HTTPStatus` still has RFC 7231's.
_RFC9110_PHRASES: Final = {413: b"Payload Too Large", 414: b"URI Too Long"}


class ClientGone(Exception):
    """The client connection closed while a response was being written."""


# Each status line built once: %-formatting parses its format on every call (~1 us of a
# response head's ~3). Every registered code: a backend's status (a 304, a 418) is relayed.
_STATUS_LINES: Final[dict[int, bytes]] = {
    status: b"HTTP/1.1 %d %s\r\n" % (status, reason)
    for status, reason in (
        {s.value: s.phrase.encode() for s in HTTPStatus} | _RFC9110_PHRASES
    ).items()
}


class _DateHeader:
    """The Date header's line, formatted at most once a second."""

    __slots__ = ("_line", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        now = int(wall())
        if now != self._second:
            self._second = now
            self._line = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._line


_date: Final = _DateHeader()


def head_bytes(status: int, headers: list[Header], extra: bytes) -> bytes:
    status_line = _STATUS_LINES.get(status)
    if status_line is None:
        status_line = b"HTTP/1.1 %d Unknown\r\n" % status
    return join_head((status_line, _date.line()), headers, -1, extra)


# Interpreted subclasses (resume.ResumableStream, websocket.WebSocketResponse) override
# methods the compiled relay calls: mypyc dispatches to their overrides only when told so.
@mypyc_attr(allow_interpreted_subclasses=True)
class Response:
    """Writes one response. `start` + `write`* + `end` for a streamed (chunked) body,
    or `send` for a complete one. `write` never blocks; call `drain` when `must_drain`."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_head",
        "_head_only",
        "_transport",
        "ended",
        "keep_alive",
        "started",
        "status",
    )

    def __init__(
        self, conn: Connection, keep_alive: bool, head_only: bool, http11: bool = True
    ) -> None:
        self._conn = conn
        self._transport = conn.transport
        self._head_only = head_only
        # HTTP/1.0 clients get no chunked framing: the body ends when the connection does.
        self._chunked = http11
        self._head = b""  # a started response's head not yet written (see start)
        self.keep_alive = keep_alive
        self.started = False
        self.ended = False
        self.status = 0

    def _connection_header(self) -> bytes:
        if self._conn.closing:
            self.keep_alive = False
        return b"" if self.keep_alive else b"connection: close\r\n"

    @property
    def head_only(self) -> bool:
        """The answer to a HEAD request: its head is sent, never a body."""
        return self._head_only

    def send(self, status: int, headers: list[Header], body: bytes) -> None:
        """A complete response with a Content-Length."""
        self._send(status, headers, body, b"content-length: %d\r\n" % len(body))

    def send_head(self, status: int, headers: list[Header], length: bytes | None) -> None:
        """A HEAD request's answer relayed from the backend: the Content-Length it stated
        (the length of the body a GET would get; RFC 9110 8.6), none when it stated none."""
        self._send(status, headers, b"", b"content-length: " + length + b"\r\n" if length else b"")

    def _send(self, status: int, headers: list[Header], body: bytes, length_line: bytes) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self.ended = True
        self.status = status
        if status == 204 or status == 304:  # noqa: PLR1714 - two int compares, compiled
            # No body, and (RFC 9110 8.6) a 204 has no Content-Length; a 304's would
            # describe the resource, which sluice does not know.
            extra = self._connection_header()
            body = b""
        else:
            extra = self._connection_header() + length_line
        head = head_bytes(status, headers, extra)
        if self._transport is None or self._transport.is_closing():
            return
        self._transport.write(head if self._head_only else head + body)

    def start(self, status: int, headers: list[Header], *, with_first_write: bool = False) -> None:
        """Starts a chunked response. The head is written at once, or, with
        `with_first_write`, together with the first chunk in one send; the caller then
        calls `flush` as soon as it knows no chunk is ready (so the head never waits)."""
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self.status = status
        if self._chunked:
            extra = self._connection_header() + b"transfer-encoding: chunked\r\n"
        else:
            self.keep_alive = False
            extra = b"connection: close\r\n"
        self._head = head_bytes(status, headers, extra)
        if not with_first_write:
            self.flush()

    def flush(self) -> None:
        """Writes a head still held by `start(with_first_write=True)`."""
        head = self._head
        if head:
            self._head = b""
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.write(head)

    def write(self, data: bytes) -> None:
        """Writes one chunk; the bytes go to the socket now (no buffering here)."""
        if not data or self._head_only:
            self.flush()
            return
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ClientGone()
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if self._head:
            data = self._head + data
            self._head = b""
        transport.write(data)

    def takes_frames(self) -> bool:
        """Whether `write_frames` may be used: a chunked body written as is (an interpreted
        subclass, such as a resumable stream or a WebSocket, sees every event instead)."""
        return type(self) is Response and self._chunked and not self._head_only

    def write_frames(self, frames: bytes, last: bool) -> None:
        """Writes bytes that are already HTTP chunks (the backend's own, relayed as they
        came); `last` adds the end of the body in the same send."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ClientGone()
        if self._head:
            frames = self._head + frames
            self._head = b""
        if last:
            self.ended = True
            frames += b"0\r\n\r\n"
        transport.write(frames)

    def write_last(self, data: bytes) -> None:
        """The last chunk and the end of the body in one send."""
        if self.ended:
            return
        if not self._chunked or self._head_only or not data:
            self.write(data)
            self.end()
            return
        self.ended = True
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ClientGone()
        transport.write(self._head + b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data))
        self._head = b""

    @property
    def must_drain(self) -> bool:
        return self._conn.write_paused

    def drain(self) -> Awaitable[None]:
        """Waits while the client reads slower than we write (transport backpressure)."""
        return self._conn.wait_writable()

    def set_flow_listener(self, listener: FlowListener | None) -> None:
        """Push mode's backpressure: `listener.pause()` when the client's socket stops
        taking writes, `listener.resume()` when it drains (no check per chunk)."""
        self._conn.flow_listener = listener
        if listener is not None and self._conn.write_paused:
            listener.pause()

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        self.flush()
        transport = self._transport
        if (
            self._chunked
            and transport is not None
            and not transport.is_closing()
            and not self._head_only
        ):
            transport.write(b"0\r\n\r\n")

    def abort(self) -> None:
        """Ends a started response that cannot be completed: the connection is closed."""
        self.ended = True
        self.keep_alive = False
        self._conn.close()
