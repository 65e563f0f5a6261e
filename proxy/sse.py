"""Splitting an upstream byte stream into SSE events.

vLLM writes each event as its own HTTP chunk, so in the common case one read holds exactly
one event and `feed` returns it without copying. Events split across reads, or several in
one read (a slow consumer, merged TCP segments), are reassembled here.
"""

from __future__ import annotations

from typing import Final

SEPARATOR: Final = b"\n\n"
# The last event of every OpenAI stream.
DONE_EVENT: Final = b"data: [DONE]\n\n"


class SseSplitter:
    """Incremental event splitter: bytes in, complete events (without separator) out."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        if self._pending:
            data = self._pending + data
            self._pending = b""
        if data.find(b"\r") >= 0:  # (`find`, not `in`: see ChunkFilter.observe)
            # SSE allows CRLF line ends; normalise once, off the common path.
            data = data.replace(b"\r\n", b"\n")
        first = data.find(SEPARATOR)
        if first < 0:  # (before the next test: a 1-byte read has first == len - 2 == -1)
            self._pending = data
            return []
        end = len(data) - 2
        if first == end:
            return [data[:end]]
        events = data.split(SEPARATOR)
        self._pending = events.pop()
        return [event for event in events if event]

    @property
    def pending(self) -> bytes:
        return self._pending
