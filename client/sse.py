"""Reading SSE lines into events, and what a streaming client must remember to resume."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass
class Event:
    """One SSE event: its `id:` (resumable streams only) and its `data:`."""

    id: str | None
    data: str


class EventReader:
    """Feed lines (without line ends); complete events come out. Comments (keep-alives)
    are dropped."""

    __slots__ = ("_data", "_id")

    def __init__(self) -> None:
        self._data: list[str] = []
        self._id: str | None = None

    def line(self, line: str) -> Event | None:
        if not line:
            if not self._data:
                self._id = None
                return None
            event = Event(self._id, "\n".join(self._data))
            self._data = []
            self._id = None
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value
        return None


class StreamError(Exception):
    """The stream ended with an error the client cannot recover from."""

    def __init__(self, message: str, error: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.error = error or {}

    @property
    def code(self) -> str | None:
        code = self.error.get("code")
        return code if isinstance(code, str) else None


@dataclass
class StreamState:
    """Where a stream is: the request id and the last event id seen (for Last-Event-ID),
    whether any content was delivered (no retry from scratch after that), done."""

    request_id: str | None = None
    last_event_id: str | None = None
    delivered: bool = False
    done: bool = False
    retry_after: float | None = None  # a refusal that asks to retry later
    errors: list[str] = field(default_factory=list)

    @property
    def resumable(self) -> bool:
        return self.request_id is not None and self.last_event_id is not None

    def take(self, event: Event) -> list[str] | None:
        """Updates the state with an event; returns the text deltas it carries (None for
        events that carry none)."""
        if event.id is not None:
            self.last_event_id = event.id
        if event.data == "[DONE]":
            self.done = True
            return None
        try:
            obj = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        error = obj.get("error")
        if isinstance(error, dict):
            retry = error.get("retry_after")
            if not self.delivered and isinstance(retry, int | float):
                self.retry_after = float(retry)  # refused after the head: retry, same as 429
                return None
            raise StreamError(str(error.get("message") or "stream error"), error)
        deltas = []
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(text, str) and text:
                deltas.append(text)
        if deltas:
            self.delivered = True
        return deltas
