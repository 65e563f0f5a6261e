"""The guard for streams of named SSE events (`event: <type>` + `data: {...}`), the layout
of the Anthropic Messages API and the OpenAI Responses API.

Subclasses say where the text deltas are and how to end a stream the guard cut; this base
keeps the ChunkFilter interface the relay drives (`observe`, `guarded`, `done`,
`finished`, `flush_held`). These endpoints are parsed per event when a Policy guards them;
without one, events pass through with a byte search for the timers.
"""

from __future__ import annotations

from typing import Any

from . import lenientjson
from .chunks import ChunkFilter
from .exchange import Exchange
from .sse import is_done
from .stopwords import GuardSpec, StreamGuard
from .timeouts import StreamWatchdog


def named_event(name: str, obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + lenientjson.write(obj) + b"\n\n"


def parse_named(event: bytes) -> tuple[str, Any] | None:
    """(event name, parsed data) of one SSE event; None for comments, [DONE], non-JSON."""
    name = ""
    data = b""
    for line in event.split(b"\n"):
        if line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
        elif line.startswith(b"data:"):
            data += line[5:].strip()
    if not data or data == b"[DONE]":
        return None
    obj = lenientjson.read(data)  # a lone surrogate escape is read, so guarded
    if obj is None:
        return None
    if not name and isinstance(obj, dict) and isinstance(obj.get("type"), str):
        name = obj["type"]
    return name, obj


class NamedEventFilter(ChunkFilter):
    """Common state: one guard per text block, the text released so far per block."""

    __slots__ = ("released",)
    delta_marker = b".delta"  # a byte string every text/reasoning delta event contains

    def __init__(
        self, ex: Exchange, guard_spec: GuardSpec | None, watchdog: StreamWatchdog | None
    ) -> None:
        super().__init__(ex, True, guard_spec, 1, watchdog)
        self.released: dict[int, list[str]] = {}

    def observe(self, event: bytes, text: str = "") -> bytes:
        if is_done(event):
            self.done = True
            return event
        # `find`, not `in`: see ChunkFilter.observe.
        if event.find(self.delta_marker) >= 0:
            self._token()
        elif event.find(b'"usage"') >= 0 or event.find(b'"error"') >= 0 or self.is_terminal(event):
            parsed = parse_named(event)
            if parsed is not None:
                self.bookkeep(*parsed)
        return event

    def guarded(self, event: bytes, text: str = "") -> bytes | None:
        if is_done(event):
            self.done = True
            return event
        parsed = parse_named(event)
        if parsed is None:
            return event
        name, obj = parsed
        self.bookkeep(name, obj)
        return self.on_named(event, name, obj)

    def guard_for(self, key: int) -> StreamGuard:
        guard = self.guards.get(key)
        if guard is None:
            assert self.guard_spec is not None
            guard = self.guards[key] = self.guard_spec.start()
            self.released[key] = []
        return guard

    def feed_text(self, key: int, text: str) -> tuple[str, StreamGuard]:
        self._token()
        guard = self.guard_for(key)
        out = guard.feed(text)
        if out:
            self.released[key].append(out)
        return out, guard

    def finish_text(self, key: int) -> tuple[str, StreamGuard] | None:
        guard = self.guards.get(key)
        if guard is None or guard.finish_reason is not None:
            return None
        out = guard.finish()
        if out:
            self.released[key].append(out)
        return out, guard

    def text_of(self, key: int) -> str:
        return "".join(self.released.get(key, ()))

    def cut(self, key: int, guard: StreamGuard) -> None:
        self.finished.add(key)
        self.done = True
        self.ex.finish_reason = guard.finish_reason
        self.ex.cut = guard.matched

    def flush_held(self) -> bytes:
        return b""  # the backend ended early: nothing can be said in this event vocabulary

    def eof_tail(self) -> bytes:
        return b""

    # -- for subclasses --------------------------------------------------------------

    def is_terminal(self, event: bytes) -> bool:
        return False

    def bookkeep(self, name: str, obj: Any) -> None:
        """Usage, finish reason and errors for the records."""

    def on_named(self, event: bytes, name: str, obj: Any) -> bytes | None:
        return event
