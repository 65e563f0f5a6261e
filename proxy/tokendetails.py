"""A choice's token details (its `logprobs`, vLLM's `token_ids`) while the guard holds
back its text.

Each chunk's details name the tokens of that chunk's text. Sent with a chunk whose text
the guard holds back, they would show that text before the guard has decided on it, and
a cut removes it: so a chunk's details wait until all of its text has gone out. The text
the guard releases goes out up to the start of the first chunk whose details still wait,
so that every chunk the client gets carries the details of exactly its own text (the
console's playground shows a chunk's tokens by them). A cut drops what still waits.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final

# The keys of a choice whose values name its tokens (chat and completions alike).
DETAIL_KEYS: Final = ("logprobs", "token_ids")


def drop_token_details(choice: dict[str, Any]) -> None:
    """A choice the guard ended: its logprobs and token ids may name tokens of the text
    it removed."""
    take_token_details(choice)


def has_token_details(choice: dict[str, Any]) -> bool:
    return any(choice.get(key) is not None for key in DETAIL_KEYS)


def take_token_details(choice: dict[str, Any]) -> dict[str, Any]:
    """The choice's details that are set, removed from it (set to null)."""
    taken: dict[str, Any] = {}
    for key in DETAIL_KEYS:
        value = choice.get(key)
        if value is not None:
            taken[key] = value
            choice[key] = None
    return taken


def merge_token_details(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Several chunks' details as one chunk's, in order: lists joined (chat's
    `logprobs.content`, completions' `tokens`, `token_logprobs`, `top_logprobs` and
    `text_offset`, `token_ids`), anything else as the first chunk had it."""
    merged: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            have = merged.get(key)
            if have is None:
                merged[key] = dict(value) if isinstance(value, dict) else value
            elif isinstance(have, list) and isinstance(value, list):
                merged[key] = have + value
            elif isinstance(have, dict) and isinstance(value, dict):
                for name, item in value.items():
                    if isinstance(have.get(name), list) and isinstance(item, list):
                        have[name] = have[name] + item
                    elif have.get(name) is None:
                        have[name] = item
    return merged


class DetailHold:
    """One choice's details that wait, and the released text that waits with them.

    Offsets count characters of the choice's text as fed to its guard, from the first
    character the guard has not yet released when the hold begins (`fed`: how many
    characters an earlier chunk left held, which come before the first chunk's own)."""

    __slots__ = ("fed", "sent", "unsent", "waiting")

    def __init__(self, fed: int) -> None:
        self.fed = fed  # characters fed to the guard
        self.sent = 0  # characters sent to the client
        self.unsent = ""  # released by the guard, not yet sent: its chunk's details wait
        # (start, end, details) of each chunk whose details have not gone out
        self.waiting: deque[tuple[int, int, dict[str, Any]]] = deque()

    def add(self, text: str, details: dict[str, Any]) -> None:
        """A chunk's text (as fed to the guard) and its details."""
        start = self.fed
        self.fed += len(text)
        if details:
            self.waiting.append((start, self.fed, details))

    def release(self, out: str, blocked: bool) -> tuple[str, dict[str, Any]]:
        """What goes out with this chunk: the text, of what the guard released (`out`),
        that ends before the first chunk whose details must still wait, and the details
        of the chunks it completes. `blocked`: another guard of the choice (its reasoning,
        a tool call) holds text back, so no details go yet."""
        pending = self.unsent + out
        released = self.sent + len(pending)
        waiting = self.waiting
        parts = []
        while waiting and not blocked and waiting[0][1] <= released:
            parts.append(waiting.popleft()[2])
        upto = min(released, waiting[0][0]) if waiting else released
        text, self.unsent = pending[: upto - self.sent], pending[upto - self.sent :]
        self.sent = upto
        return text, merge_token_details(parts) if parts else {}

    def drain(self, tail: str, cut: bool) -> tuple[str, dict[str, Any]]:
        """At the choice's end: the released text that waited, with `tail` (the guard's
        last release), and the details that waited, unless a cut ended the choice (they
        may name the text it removed)."""
        parts = [] if cut else [details for _, _, details in self.waiting]
        self.waiting.clear()
        text, self.unsent = self.unsent + tail, ""
        return text, merge_token_details(parts) if parts else {}

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.unsent
