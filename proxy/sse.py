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
# The same event without the space: SSE's field value starts after the colon, with one
# space dropped if there is one, so both are `[DONE]` to a client.
DONE_EVENT_UNSPACED: Final = b"data:[DONE]\n\n"
_BRACKET: Final = ord("[")
_CR: Final = ord("\r")


def is_done(event: bytes) -> bool:
    """Whether `event` (with its blank line) is the stream's `[DONE]`, in either form. A
    byte looked at first: a token's event has `{` where [DONE] has `[`."""
    if len(event) < 13:
        return False
    if event[6] == _BRACKET:
        return event.startswith(DONE_EVENT)
    return event[5] == _BRACKET and event.startswith(DONE_EVENT_UNSPACED)


class SseSplitter:
    """Incremental event splitter: bytes in, complete events (without separator) out.

    SSE ends a line with CRLF, LF or CR alone; all three become LF here. A read that ends
    in CR has ended its line at once (a CR-only stream is not held back a read), and a LF
    that starts the next read is the rest of that CRLF.

    An event that spans many reads is kept as its reads and joined once, when it is
    complete (not copied again with each read); `pending_size` lets the caller bound it."""

    __slots__ = ("_after_cr", "_held", "pending_size")

    def __init__(self) -> None:
        # An event not yet complete, as the reads it came in (their line ends already LF;
        # none after the first holds a separator): joined once, when the event completes.
        self._held: list[bytes] = []
        self.pending_size = 0
        self._after_cr = False

    def feed(self, data: bytes) -> list[bytes]:
        if self._after_cr:
            self._after_cr = False
            if data.startswith(b"\n"):
                data = data[1:]
        if data.find(b"\r") >= 0:  # (`find`, not `in`: see ChunkFilter.observe)
            # Normalised once, off the common path (vLLM ends its lines with LF).
            self._after_cr = data[-1] == _CR
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        held = self._held
        if held:
            # Still no whole event (no separator in the read, none across the boundary):
            # the read is kept as it is.
            if data.find(SEPARATOR) < 0 and not (
                data.startswith(b"\n") and held[-1].endswith(b"\n")
            ):
                if data:
                    held.append(data)
                    self.pending_size += len(data)
                return []
            held.append(data)
            data = b"".join(held)
            self._held = []
            self.pending_size = 0
        first = data.find(SEPARATOR)
        if first < 0:  # (before the next test: a 1-byte read has first == len - 2 == -1)
            self._hold(data)
            return []
        end = len(data) - 2
        if first == end:
            return [data[:end]]
        events = data.split(SEPARATOR)
        self._hold(events.pop())
        return [event for event in events if event]

    def _hold(self, rest: bytes) -> None:
        self._held = [rest] if rest else []
        self.pending_size = len(rest)

    @property
    def pending(self) -> bytes:
        return b"".join(self._held)

    @property
    def partial(self) -> bool:
        """Whether the next read continues what this one held: part of an event, or the
        LF of a CRLF whose CR ended the read (either way, the next read is split here)."""
        return bool(self._held) or self._after_cr


def data_of(event: bytes) -> tuple[bytes, bytes | None]:
    """An event (LF line ends, its blank line included) as a client reads it: its other
    lines as they came (`event:`, `id:`, `retry:`, comments), and its data, the values of
    its `data` lines joined by LF (one space after the colon dropped); None without a
    `data` line. For events other than one `data:` line, which vLLM never sends."""
    other: list[bytes] = []
    data: list[bytes] = []
    for line in event[:-2].split(b"\n") if event.endswith(SEPARATOR) else event.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[6:] if line.startswith(b"data: ") else line[5:])
        elif line:
            other.append(line + b"\n")
    return b"".join(other), b"\n".join(data) if data else None


def event_data(event: bytes) -> bytes | None:
    """The data of one event (its blank line included or not) as a client reads it; None
    without a `data` line. One `data:` line, vLLM's every event, is a slice; anything else
    goes through `data_of`."""
    end = len(event) - 2 if event.endswith(SEPARATOR) else len(event)
    if event.startswith(b"data:") and event.find(b"\n", 0, end) < 0:
        return event[6:end] if event.startswith(b"data: ") else event[5:end]
    return data_of(event)[1]
