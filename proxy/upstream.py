"""One keep-alive HTTP/1.1 connection to a backend, parsed with httptools (its pool:
upstream_pool.py).

The foundation issue measured the upstream client as the largest cost of a Python relay
(aiohttp added ~50 ms TTFT p50 at 256 streams, httpx collapsed), so this client does only
what a relay needs: write one request, hand body bytes to one reader as they arrive, and
return the connection to its pool when the response ended cleanly. A response that did not
end cleanly (client gone, timeout, cut) closes its connection: vLLM aborts the generation
when its socket closes, which frees the GPU slot.
"""

from __future__ import annotations

import asyncio
from typing import Final, Protocol

import httptools

from .headernames import lower_name
from .http1parse import response_parser
from .tcp import stream_transport

# Bytes buffered from a backend before reading pauses (the client is slower than the GPU).
READ_HIGH_WATER: Final = 256 * 1024
# The headers of a backend's response that sluice reads (here, app.py, nonstream.py);
# `headers` keeps these (and any other name of one of their lengths), no others.
# content-length: whether a body with neither it nor chunked framing ends with the
# connection (`_ends_at_close`).
READ_HEADERS: Final = (b"content-type", b"content-length", b"transfer-encoding", b"retry-after")
_READ_HEADER_LENGTHS: Final = frozenset(len(name) for name in READ_HEADERS)
# A response head's header bytes (name + value + 4 each, as a request's are counted) past
# which the response is a 502, like nginx's "upstream sent too big header" (its limit is
# proxy_buffer_size, 4 or 8 KiB); vLLM's heads hold ~150. A backend's head is otherwise
# read whole before anything is decided, so without a limit it could grow without end.
MAX_RESPONSE_HEADER_BYTES: Final = 64 * 1024
# The bytes of a head fed to the parser before it ends (its status line, header lines and
# line ends): both parsers check the header limit only once a header line ends, and buffer
# an unfinished one whole, so one endless line is cut here. Checked after each read fed,
# so a head holds at most one read (256 KiB, uvloop's buffer) past it.
MAX_RESPONSE_HEAD_BYTES: Final = MAX_RESPONSE_HEADER_BYTES + 8 * 1024


class UpstreamError(Exception):
    """The backend could not be reached or broke the protocol.

    `kind` is one of connect, reset, protocol; `before_response` is True when no byte of a
    response had arrived, so the request may be retried on another connection or replica.
    """

    def __init__(self, kind: str, message: str, before_response: bool) -> None:
        super().__init__(message)
        self.kind = kind
        self.before_response = before_response


class BodyConsumer(Protocol):
    """Receives a response body as it arrives, inside the transport's callbacks (push
    mode: no future and no task switch per chunk)."""

    def feed(self, data: bytes) -> None: ...

    def read_done(self) -> None:
        """Everything one read from the socket held has been fed."""

    def complete(self) -> None: ...

    def error(self, exc: BaseException) -> None: ...


class ReadTaker:
    """Takes the socket's reads before they are parsed (`UpstreamConnection.take_reads`):
    the relay of a stream (relay.StreamRelay), which hands what it does not take to
    `parse_read`. A base class, not a Protocol: compiled, the connection then calls
    `take_read` directly, where a Protocol's method is looked up by name on every read
    (~150 instructions a read)."""

    __slots__ = ()

    def take_read(self, data: bytes) -> None:
        raise NotImplementedError


class ConnectionOwner(Protocol):
    """What a connection reports back to: its pool (upstream_pool.UpstreamPool), told
    when the connection is gone."""

    def forget(self, conn: UpstreamConnection) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection; serves one response at a time.

    The body is either pulled (`read`, `read_all`) or pushed to a `BodyConsumer`
    (`set_consumer`); the relay of a stream uses push mode.
    """

    def __init__(self, pool: ConnectionOwner) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = response_parser(self, MAX_RESPONSE_HEADER_BYTES)
        self.closed = False
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.keep_alive = True
        self.idle_since = 0.0  # monotonic time it went back to the pool
        self.retried = False  # this exchange was resent once after a keep-alive race
        self._head_request = False  # the request is a HEAD: its response has no body
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._headers_done = False
        self._header_bytes = 0  # counted here with httptools; in C by the compiled parser
        self._head_fed = 0  # the bytes fed to the parser since this head began
        self._interim = False  # the message being read is a 1xx response
        self._complete = False
        self._got_bytes = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._consumer: BodyConsumer | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        # The parser stands at a chunk's start: the last chunk it read is complete and
        # nothing after it was fed. Only then may a reader (take_reads) skip whole chunks.
        self._chunk_ended = False
        self.at_chunk_start = False
        # An event stream's body from its head on, held unparsed until a reader takes the
        # socket's reads (`take_reads`: the relay gets it as a read of its own) or the body
        # is read otherwise (`read`, `settle`, a lost connection: parsed then, in order).
        self._holding = False
        self._held = b""
        # Who takes the socket's reads before the parser (the relay, while it relays): a
        # field read per read, not uvloop's set_protocol twice per stream (~1.2 us each:
        # it looks up the protocol's callbacks and restarts reading).
        self._reader: ReadTaker | None = None

    # -- transport callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = stream_transport(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        aborted = self.closed  # by sluice: what came is cut short, not ended
        self._feed_held()  # what came before the close is the response's
        self.closed = True
        self.pool.forget(self)
        # Only the backend's own clean close (EOF, not a reset) ends a close-delimited body.
        if exc is None and not aborted and self._ends_at_close():
            self.on_message_complete()  # what llhttp_finish would do (httptools has none)
        if not self._complete and self._exc is None:
            before = not self._got_bytes
            self._exc = UpstreamError(
                "reset",
                "backend closed the connection"
                + (" before responding" if before else " mid-response"),
                before_response=before,
            )
        consumer = self._consumer
        if consumer is not None and not self._complete:
            self._consumer = None
            consumer.error(self._exc or UpstreamError("reset", "connection lost", False))
        self.resume_writing()
        self._wake()

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        if reader is not None:
            reader.take_read(data)
            return
        self.parse_read(data)

    def parse_read(self, data: bytes) -> None:
        """One read from the socket, through the parser (or held: see `_holding`)."""
        if self._holding:
            self._held += data
            self._pause_over(len(self._held))
            return
        if not self._got_bytes:
            self._got_bytes = True
            # The response's first read: its first blank line ends the head.
            end = data.find(b"\r\n\r\n") + 4
            if end >= 4:
                self._feed(data[:end])
                if self._exc is not None:
                    return
                if self._holds_body():
                    # The stream's relay takes the chunks as the backend framed them
                    # (StreamRelay.feed_chunks) instead of a parser callback per chunk.
                    self._holding = True
                    self._held = data[end:]
                    self.at_chunk_start = True
                    return
                data = data[end:]
                if not data:
                    return
        self._feed(data)
        # A chunk's CRLF ends the read: a size line cut short cannot end in CRLF (the
        # parser calls on_chunk_header once its CRLF is read).
        self.at_chunk_start = self._chunk_ended and data.endswith(b"\r\n")
        consumer = self._consumer
        if consumer is not None:
            consumer.read_done()
        self._pause_over(self._buffered)

    def _feed(self, data: bytes) -> None:
        in_head = not self._headers_done
        if in_head:
            self._head_fed += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:  # on_headers_too_large may have set it
            self._fail(
                self._exc or UpstreamError("protocol", f"malformed backend response: {exc}", False)
            )
            return
        except httptools.HttpParserUpgrade:  # on_headers_complete has set the error
            self._fail(self._exc or UpstreamError("protocol", "backend upgraded", False))
            return
        if (
            in_head
            and not self._headers_done
            and self._head_fed > MAX_RESPONSE_HEAD_BYTES
            and self._exc is None
        ):
            self._fail(
                UpstreamError(
                    "protocol", f"backend response head over {MAX_RESPONSE_HEAD_BYTES} bytes", False
                )
            )

    def _holds_body(self) -> bool:
        """After a head parsed alone: whether its body is an event stream in chunks, which
        `_held` may keep for the relay (anything else is parsed at once, as before)."""
        return (
            self._headers_done
            and not self._complete
            and self._exc is None
            and self.status == 200
            and self.headers.get(b"transfer-encoding", b"").lower() == b"chunked"
            and self.is_event_stream()
        )

    def is_event_stream(self) -> bool:
        """Whether the answer's Content-Type is an event stream (a media type's case does
        not matter: `Text/Event-Stream` is one too, though vLLM writes lower case)."""
        content_type = self.headers.get(b"content-type", b"")
        return (
            content_type.startswith(b"text/event-stream")
            or content_type[:17].lower() == b"text/event-stream"
        )

    def _ends_at_close(self) -> bool:
        """A response not yet complete whose body the connection's close delimits (HTTP/1.0
        style: neither Content-Length nor chunked framing)."""
        if self._complete or self._exc is not None or not self._headers_done:
            return False
        if self._interim or self.status in (204, 304):
            return False
        headers = self.headers
        return b"content-length" not in headers and not headers.get(
            b"transfer-encoding", b""
        ).lower().endswith(b"chunked")

    def _pause_over(self, buffered: int) -> None:
        if buffered > READ_HIGH_WATER and not self._reading_paused and self.transport:
            self.transport.pause_reading()
            self._reading_paused = True

    def _feed_held(self) -> None:
        self._holding = False
        held = self._held
        if held:
            self._held = b""
            self.parse_read(held)

    def settle(self) -> None:
        """Parses what is held, so `complete` tells whether the response has ended."""
        self._feed_held()

    # -- parser callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            # Bytes after the whole response (a second response, or junk) in the same read
            # or later: what was asked for has been read; the rest must neither replace its
            # status and body nor be read as the next request's answer.
            self.keep_alive = False
            self._exc = UpstreamError("protocol", "backend sent bytes after its response", False)
            raise httptools.HttpParserError("bytes after the response")

    def on_header(self, name: bytes, value: bytes) -> None:
        """httptools' call per header (the compiled build's parser collects them in C)."""
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_RESPONSE_HEADER_BYTES:
            self.on_headers_too_large()
        # A name of none of READ_HEADERS' lengths is passed over without being lowered
        # and kept (~700 instructions a header, compiled); a chunked body's trailer too.
        if len(name) in _READ_HEADER_LENGTHS and not self._headers_done:
            self.headers[lower_name(name)] = value

    def on_headers_too_large(self) -> None:
        """The head's (or its trailer's) headers passed MAX_RESPONSE_HEADER_BYTES: the
        response fails as a protocol error (a head's before anything reached the client;
        a stream's trailers after its events, which end it as any broken stream)."""
        self._exc = UpstreamError(
            "protocol",
            f"backend response headers over {MAX_RESPONSE_HEADER_BYTES} bytes",
            False,
        )
        raise httptools.HttpParserError("headers too large")

    def on_headers_complete(self, headers: dict[bytes, bytes] | None = None) -> None:
        """The head is read; `headers` from the compiled build's parser, else `on_header`
        has collected them."""
        if headers is not None:
            self.headers = headers
        status = self.parser.get_status_code()
        if status < 200:
            # An interim response (100 Continue, 103 Early Hints): the final one follows;
            # llhttp reads it as a message of its own. 101 Switching Protocols answers an
            # upgrade sluice never asks for: the connection is no longer HTTP.
            self.headers = {}
            self._header_bytes = 0  # the final response's head is counted on its own
            self._head_fed = 0
            self._interim = True
            if status == 101:
                self._exc = UpstreamError(
                    "protocol", "backend switched protocols (101) unasked", False
                )
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self._headers_done = True
        if self._head_request:
            # A HEAD's answer ends with its head whatever its Content-Length says; httptools
            # is not told the method and would wait for that body. The parser is then out
            # of step with the connection, which is closed rather than reused.
            self.keep_alive = False
            self.on_message_complete()
            return
        self._wake()

    def on_body(self, body: bytes) -> None:
        consumer = self._consumer
        if consumer is not None:
            consumer.feed(body)
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._waiter is not None:
            self._wake()

    def on_chunk_header(self) -> None:
        self._chunk_ended = False

    def on_chunk_complete(self) -> None:
        self._chunk_ended = True

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._complete = True
        consumer = self._consumer
        if consumer is not None:
            self._consumer = None
            consumer.complete()
        self._wake()

    # -- the one reader ------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._exc = exc
        self.abort()
        self._wake()

    async def _wait(self) -> None:
        waiter = self.loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def set_consumer(self, consumer: BodyConsumer | None) -> None:
        """Switches to push mode: what was buffered is fed at once, the rest as it comes."""
        self._consumer = consumer
        if consumer is None:
            return
        if self._chunks:
            data = b"".join(self._chunks)
            self._chunks = []
            self._buffered = 0
            consumer.feed(data)
            consumer.read_done()
        if self._consumer is not consumer:
            return
        if self._complete:
            self._consumer = None
            consumer.complete()
        elif self._exc is not None:
            self._consumer = None
            consumer.error(self._exc)

    def take_reads(self, reader: ReadTaker | None) -> None:
        """Hands the socket's reads to `reader` (a relay, which passes what it does not take
        itself to `parse_read`), or back to the parser with None. What is held goes to
        `reader` first, as a read of its own."""
        if self.closed:
            return  # no read comes any more; what was held has been parsed
        self._reader = reader
        if reader is not None and self._holding:
            self._holding = False
            # What was held past READ_HIGH_WATER paused the socket (parse_read): the reader
            # takes it now, so reads resume. Before the handing: a reader that must wait
            # for its client pauses them again itself.
            self.resume_reading()
            held = self._held
            if held:
                self._held = b""
                reader.take_read(held)

    @property
    def reads_taken(self) -> bool:
        """Whether a reader takes the socket's reads (for tests)."""
        return self._reader is not None

    # Write backpressure, for request bodies streamed to the backend (proxy/upload.py).
    def pause_writing(self) -> None:
        self._write_waiter = self.loop.create_future()

    def resume_writing(self) -> None:
        waiter, self._write_waiter = self._write_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> None:
        waiter = self._write_waiter
        if waiter is not None:
            await waiter
        if self._exc is not None:
            raise self._exc

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()
            self._reading_paused = False

    def send(self, head: bytes, body: bytes) -> None:
        self._head_request = head.startswith(b"HEAD ")
        self.status = 0
        self.headers = {}
        self._chunks = []
        self._buffered = 0
        self._headers_done = False
        self._header_bytes = 0
        self._head_fed = 0
        self._interim = False
        self._complete = False
        self._got_bytes = False
        self._exc = None
        self._consumer = None
        self._chunk_ended = False
        self.at_chunk_start = False
        self.retried = False
        self._holding = False
        self._held = b""
        self._reader = None
        assert self.transport is not None
        self.transport.write(head + body)

    async def read_head(self) -> None:
        while not self._headers_done:
            if self._exc is not None:
                raise self._exc
            await self._wait()

    async def read(self) -> bytes:
        """The next body bytes as they arrived; b"" once the response is complete."""
        self._feed_held()
        while not self._chunks:
            if self._complete:
                return b""
            if self._exc is not None:
                raise self._exc
            await self._wait()
        chunks = self._chunks
        if len(chunks) == 1:
            data = chunks[0]
            chunks.clear()
        else:
            data = b"".join(chunks)
            self._chunks = []
        self._buffered = 0
        if self._reading_paused and self.transport is not None:
            self.transport.resume_reading()
            self._reading_paused = False
        return data

    async def read_all(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            data = await self.read()
            if not data:
                return b"".join(parts)
            size += len(data)
            if size > limit:
                raise UpstreamError("protocol", f"backend response over {limit} bytes", False)
            parts.append(data)

    @property
    def complete(self) -> bool:
        return self._complete

    def abort(self) -> None:
        """Closes at once (RST): the backend sees the disconnect and stops generating."""
        self.closed = True
        self.pool.forget(self)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
