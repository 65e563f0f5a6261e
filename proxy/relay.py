"""Relaying a backend's SSE response to the client, event by event, never buffered.

`StreamRelay` is fed from the upstream connection's data callback (push mode) and passes
each event through the stream's `ChunkFilter` to the client socket; `relay_stream.py` holds
the coroutine that sets it up and waits for the stream's outcome. Both are compiled by
setup.py (see `tests/test_compiled_build.py`).
"""

from __future__ import annotations

import asyncio
from typing import Final, Protocol

from .chunks import ChunkFilter
from .chunkscan import event_chunk
from .clock import monotonic
from .response import Response
from .sse import SEPARATOR, SseSplitter
from .upstream import ReadTaker, UpstreamError

# The most of one SSE event held while it arrives (vLLM's largest, a first chunk with a
# long prompt's token ids, is well under a megabyte). A backend that sends more without
# ending the event breaks its stream rather than the proxy's memory.
MAX_EVENT_BYTES: Final = 16 * 1024 * 1024


class ReadSide(Protocol):
    """What the relay needs of the backend's connection (`upstream.UpstreamConnection`)."""

    loop: asyncio.AbstractEventLoop
    at_chunk_start: bool

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def parse_read(self, data: bytes) -> None: ...  # a read the relay does not take


class StreamRelay(ReadTaker):
    """Push-mode relay of one SSE response. While it relays, it takes the backend socket's
    reads (`UpstreamConnection.take_reads`): a read comes to `take_read`, and an
    event goes backend socket -> filter -> client socket without a future, a task switch
    or an interpreted frame. Whole HTTP chunks that each hold one event are taken as read
    (`feed_chunks`); anything else goes to the upstream connection's parser, which feeds
    the body back (`feed`). What one read from the backend holds (one event, or several
    under load) goes to the client in one send when the read is done (`read_done`), as
    nginx writes what it read: never held past the callback, one system call per read
    rather than per event. The handler reads the stream's outcome once (`result`, or
    `wait()` while there is none yet): "done" (backend's [DONE] relayed, the client's
    response ended), "cut" (the guard ended every choice) or "eof" (the backend ended the
    message without [DONE]); an UpstreamError or ClientGone is raised instead. A stream
    that ends within the read that starts it (a short answer) makes no future at all.

    Backpressure: the client connection calls `pause`/`resume` (a FlowListener) when its
    socket stops and starts taking writes; reading from the backend follows.
    """

    __slots__ = (
        "_at_chunk_start",
        "_error",
        "_frames",
        "_guarded",
        "_out",
        "_over",
        "_partial",
        "_skips",
        "_waiter",
        "filter",
        "response",
        "result",
        "splitter",
        "upstream",
    )

    def __init__(self, chunk_filter: ChunkFilter, upstream: ReadSide, response: Response) -> None:
        self.filter = chunk_filter
        self.upstream = upstream
        self.response = response
        self.splitter = SseSplitter()
        self.result = ""  # the outcome, once the stream is over without an error
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None  # made only if `wait` must wait
        # Per-event state kept on the relay, so an event touches few objects: whether the
        # outcome is set, whether the splitter holds part of an event, whether the
        # backend's parser stands at a chunk's start.
        self._over = False
        self._partial = False
        self._at_chunk_start = False
        self._out: list[bytes] = []  # this read's filtered events, written by read_done
        # The backend's chunks may go to the client as they are (feed_chunks).
        self._frames = response.takes_frames()
        # Without a guard the per-event work is observe's byte searches only.
        self._guarded = chunk_filter.guard_spec is not None
        # vLLM's common chunks go by in one call to the filter (`feed_chunks`).
        self._skips = chunk_filter.skips_common

    def _on_event(self, event: bytes, text: str = "") -> bytes | None:
        # A method called, not a bound method stored: compiled, the call goes straight to
        # the filter's (or a subclass's) method, with no argument parsing or boxing.
        # `text`: the event decoded as latin-1 when the caller has it ("": not yet).
        if self._guarded:
            return self.filter.guarded(event, text)
        return self.filter.observe(event, text)

    def _end(self, result: str) -> None:
        if not self._over:  # the first outcome stands
            self._over = True
            self.result = result
            self._wake()

    def _break(self, exc: BaseException) -> None:
        if not self._over:
            self._over = True
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> str:
        """The stream's outcome, once it is over (raises what broke it)."""
        if not self._over:
            waiter = self._waiter = self.upstream.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        if self._error is not None:
            raise self._error
        return self.result

    # -- the backend socket's reads, while the relay takes them ---------------------------

    def take_read(self, data: bytes) -> None:
        if self._at_chunk_start:
            taken = self.feed_chunks(data)
            if taken == len(data):
                return
            if taken:
                data = data[taken:]
        upstream = self.upstream
        upstream.parse_read(data)
        self._at_chunk_start = upstream.at_chunk_start

    def taking_reads(self) -> None:
        """The upstream connection hands its socket's reads to the relay from now on."""
        self._at_chunk_start = self.upstream.at_chunk_start

    # -- the body -------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self._over:
            return
        chunk_filter = self.filter
        ex = chunk_filter.ex
        # Until the stream's first token: when these bytes reached sluice (for
        # sluice_proxy_overhead_seconds; one clock read per chunk before it, none after).
        arrived = monotonic() if ex.first_token_at is None else 0.0
        try:
            # vLLM sends one event per chunk: the common case needs no split. One event is
            # one line and its blank line: the first newline is the last but one byte (a
            # one-byte search, memchr, ~3x cheaper than looking for "\n\n"; as text, see
            # chunks.py: a copy of the event and a direct call, not bytes.find's).
            out: bytes | None
            text = "" if self._partial else data.decode("latin-1")
            if self._partial or text.find("\n") != len(data) - 2 or data[-1] != 10:
                out = self._feed_split(data)
                if self.splitter.pending_size > MAX_EVENT_BYTES:
                    if out:
                        self._out.append(out)
                    self.read_done()  # the events before it go out first
                    raise UpstreamError(
                        "protocol", f"backend SSE event over {MAX_EVENT_BYTES} bytes", False
                    )
            else:
                out = self._on_event(data, text)
            if chunk_filter.done:
                # The last event and the end of the body go out in one send.
                if self._out:
                    out = b"".join([*self._out, out or b""])
                    self._out.clear()
                self.response.write_last(out or b"")
            elif out:
                self._out.append(out)
        except BaseException as exc:  # a broken client or a bug: end this stream only
            self._break(exc)
            return
        if arrived and ex.first_token_at is not None:
            ex.first_token_overhead = monotonic() - arrived
        if chunk_filter.done:
            self._end("cut" if chunk_filter.finished else "done")

    def feed_chunks(self, data: bytes) -> int:
        """The backend's bytes as read, before HTTP parsing: the whole chunks at their start
        that each hold one whole event are relayed here, and the chunks of events that pass
        the filter unchanged go to the client as the backend framed them (one send, no
        re-framing or copy). Returns how many bytes were taken; the upstream connection
        parses the rest (a partial chunk, the last chunk, anything unusual) and feeds it.

        Only called at a chunk boundary (`at_chunk_start`), so skipping whole chunks
        leaves the parser where it was: at the next chunk's size line."""
        if self._over or self._partial or not self._frames:
            return 0
        chunk_filter = self.filter
        ex = chunk_filter.ex
        arrived = monotonic() if ex.first_token_at is None else 0.0
        n = len(data)
        pos = 0  # the start of the next chunk
        sent = 0  # data[sent:pos] are unchanged chunks not yet written
        parts: list[bytes] | None = None  # only once an event changed
        skips = self._skips
        guarded = self._guarded
        try:
            while pos < n:
                if skips and ex.finish_reason is None:
                    # vLLM's token chunks, last chunk and usage chunk in their literal
                    # form: recorded and left as they are, in one call (chunkscan); the
                    # loop below reads the rest. Not after a finish reason: the scan takes
                    # the chunks after it with it, or they are another choice's.
                    pos = (
                        chunk_filter.skip_passed(data, pos)
                        if guarded
                        else chunk_filter.skip_common(data, pos)
                    )
                    if pos >= n:
                        break
                start, end = event_chunk(data, pos)
                if start < 0:
                    break  # the last chunk, one cut short, anything unusual: the parser's
                event = data[start:end]
                text = event.decode("latin-1")  # searched as text: see chunks.py
                # One event, as vLLM sends it: its only newline is its blank line's first.
                if text.find("\n") != end - start - 2:
                    break
                out = self._on_event(event, text)
                if out is not event:  # changed or held back: framed anew
                    if parts is None:
                        parts = []
                    if sent < pos:
                        parts.append(data[sent:pos])
                    if out:
                        parts.append(b"%x\r\n%b\r\n" % (len(out), out))
                    sent = end + 2
                pos = end + 2
                if chunk_filter.done:
                    break
            if pos:
                frames = data if sent == 0 and pos == n else data[sent:pos]
                if parts is not None:
                    if sent < pos:
                        parts.append(frames)
                    frames = b"".join(parts)
                if frames or chunk_filter.done:
                    self.response.write_frames(frames, chunk_filter.done)
        except BaseException as exc:  # a broken client or a bug: end this stream only
            self._break(exc)
            return n
        if arrived and ex.first_token_at is not None:
            ex.first_token_overhead = monotonic() - arrived
        if chunk_filter.done:
            self._end("cut" if chunk_filter.finished else "done")
        return pos

    def _feed_split(self, data: bytes) -> bytes:
        """Several events in one read, or one split across reads."""
        chunk_filter = self.filter
        parts = []
        splitter = self.splitter
        for event in splitter.feed(data):
            out = self._on_event(event + SEPARATOR)
            if out is not None:
                parts.append(out)
            if chunk_filter.done:
                break
        self._partial = splitter.partial
        return b"".join(parts)

    def read_done(self) -> None:
        """The backend's read is fed: its events go to the client now, in one send."""
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if self._over:
            return
        try:
            self.response.write(data)
        except BaseException as exc:  # a broken client: end this stream only
            self._break(exc)

    def complete(self) -> None:
        self.read_done()
        self._end("eof")

    def error(self, exc: BaseException) -> None:
        self.read_done()  # the events before the failure, then the error event
        self._break(exc)

    # FlowListener: the client's socket stopped / started taking writes.
    def pause(self) -> None:
        self.upstream.pause_reading()

    def resume(self) -> None:
        self.upstream.resume_reading()
