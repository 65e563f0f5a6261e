"""Relaying a backend's SSE response to the client, event by event, never buffered.

`StreamRelay` is fed from the upstream connection's data callback (push mode) and passes
each event through the stream's `ChunkFilter` to the client socket; `relay_stream.py` holds
the coroutine that sets it up and waits for the stream's outcome. This module defines no
coroutine, so setup.py compiles it (see `tests/test_compiled_build.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from time import monotonic
from typing import Protocol

from .chunks import ChunkFilter
from .response import Response
from .sse import SEPARATOR, SseSplitter


class ReadSide(Protocol):
    """What the relay needs of the backend's connection (`upstream.UpstreamConnection`)."""

    loop: asyncio.AbstractEventLoop

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class StreamRelay:
    """Push-mode relay of one SSE response: the upstream connection calls `feed` from its
    data callback, so an event goes backend socket -> filter -> client socket without a
    future or a task switch. What one read from the backend holds (one event, or several
    under load) goes to the client in one send when the read is done (`read_done`), as
    nginx writes what it read: never held past the callback, one system call per read
    rather than per event. The handler awaits `outcome` once per stream:
    "done" (backend's [DONE] relayed, the client's response ended), "cut" (the guard ended
    every choice) or "eof" (the backend ended the message without [DONE]); an
    UpstreamError or ClientGone is set as its exception.

    Backpressure: the client connection calls `pause`/`resume` (a FlowListener) when its
    socket stops and starts taking writes; reading from the backend follows.
    """

    __slots__ = ("_on_event", "_out", "filter", "outcome", "response", "splitter", "upstream")

    def __init__(self, chunk_filter: ChunkFilter, upstream: ReadSide, response: Response) -> None:
        self.filter = chunk_filter
        self.upstream = upstream
        self.response = response
        self.splitter = SseSplitter()
        self.outcome: asyncio.Future[str] = upstream.loop.create_future()
        self._out: list[bytes] = []  # this read's filtered events, written by read_done
        # Without a guard the per-event work is observe's byte searches only.
        self._on_event: Callable[[bytes], bytes | None] = (
            chunk_filter.observe if chunk_filter.guard_spec is None else chunk_filter.guarded
        )

    def feed(self, data: bytes) -> None:
        outcome = self.outcome
        if outcome.done():
            return
        chunk_filter = self.filter
        ex = chunk_filter.ex
        # Until the stream's first token: when these bytes reached sluice (for
        # sluice_proxy_overhead_seconds; one clock read per chunk before it, none after).
        arrived = monotonic() if ex.first_token_at is None else 0.0
        try:
            # vLLM sends one event per chunk: the common case needs no split and no copy.
            # One event is one line and its blank line: the first newline is the last but
            # one byte (a one-byte search, memchr, ~3x cheaper than looking for "\n\n").
            out: bytes | None
            if self.splitter.pending or data.find(b"\n") != len(data) - 2 or data[-1] != 10:
                out = self._feed_split(data)
            else:
                out = self._on_event(data)
            if chunk_filter.done:
                # The last event and the end of the body go out in one send.
                if self._out:
                    out = b"".join([*self._out, out or b""])
                    self._out.clear()
                self.response.write_last(out or b"")
            elif out:
                self._out.append(out)
        except BaseException as exc:  # a broken client or a bug: end this stream only
            outcome.set_exception(exc)
            return
        if arrived and ex.first_token_at is not None:
            ex.first_token_overhead = monotonic() - arrived
        if chunk_filter.done:
            outcome.set_result("cut" if chunk_filter.finished else "done")

    def _feed_split(self, data: bytes) -> bytes:
        """Several events in one read, or one split across reads."""
        chunk_filter = self.filter
        parts = []
        for event in self.splitter.feed(data):
            out = self._on_event(event + SEPARATOR)
            if out is not None:
                parts.append(out)
            if chunk_filter.done:
                break
        return b"".join(parts)

    def read_done(self) -> None:
        """The backend's read is fed: its events go to the client now, in one send."""
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if self.outcome.done():
            return
        try:
            self.response.write(data)
        except BaseException as exc:  # a broken client: end this stream only
            self.outcome.set_exception(exc)

    def complete(self) -> None:
        self.read_done()
        if not self.outcome.done():
            self.outcome.set_result("eof")

    def error(self, exc: BaseException) -> None:
        self.read_done()  # the events before the failure, then the error event
        if not self.outcome.done():
            self.outcome.set_exception(exc)

    # FlowListener: the client's socket stopped / started taking writes.
    def pause(self) -> None:
        self.upstream.pause_reading()

    def resume(self) -> None:
        self.upstream.resume_reading()
