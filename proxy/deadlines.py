"""Deadlines of many streams on one loop timer per 10 ms slot, not one timer per stream.

A short request used to create three loop timers (the watchdog's, its re-arm at the
response head or first token, the keep-alive's) and cancel them again: a `TimerHandle`,
a libuv timer start and stop each, about 10% of the proxy's CPU per 2-token request.
Here a deadline is a set insertion into its slot (the deadline rounded up to the next
`RESOLUTION`); moving or removing it is a set removal. The first entry of a slot starts
the slot's one loop timer; the last one to leave stops it. (A slot left to fire empty
kept its timer, set and handle until its time: under steady load one per 10 ms up to
the longest deadline ahead, ~6,000 for a 60 s timeout, 3 KiB each in RSS.)

An entry fires at most `RESOLUTION` (plus the loop's own latency) after its deadline,
never before it: the entry's `on_deadline` sees a time at or past what it asked for.
"""

from __future__ import annotations

import asyncio
from typing import Final, Protocol

from .clock import monotonic

RESOLUTION: Final = 0.01  # seconds: how late a deadline may fire
SLOTS_PER_SECOND: Final = 1 / RESOLUTION


class Timed(Protocol):
    def on_deadline(self) -> None: ...


class Deadlines:
    """The slots of one event loop. `add` returns the slot to pass to `remove`."""

    __slots__ = ("_slots", "_timers", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._slots: dict[int, set[Timed]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}

    def add(self, when: float, entry: Timed) -> int:
        """Calls `entry.on_deadline()` once, at or soon after monotonic time `when`."""
        slot = _slot_of(when)
        entries = self._slots.get(slot)
        if entries is None:
            self._slots[slot] = {entry}
            delay = slot * RESOLUTION - monotonic()
            self._timers[slot] = self.loop.call_later(
                delay if delay > 0.0 else 0.0, self._fire, slot
            )
        else:
            entries.add(entry)
        return slot

    def remove(self, slot: int, entry: Timed) -> None:
        entries = self._slots.get(slot)
        if entries is not None:
            entries.discard(entry)
            if not entries:  # the last one left: the slot and its timer go
                del self._slots[slot]
                self._timers.pop(slot).cancel()

    def bring_forward(self, slot: int, when: float, entry: Timed) -> int:
        """`entry`, waiting in `slot`, waits for `when` instead if that comes sooner; the
        slot it waits in now."""
        if _slot_of(when) >= slot:
            return slot
        self.remove(slot, entry)
        return self.add(when, entry)

    def _fire(self, slot: int) -> None:
        self._timers.pop(slot, None)
        entries = self._slots.pop(slot, None)
        if not entries:
            return
        if slot * RESOLUTION > monotonic():
            # The loop's clock ran ahead of monotonic(): never fire before the deadline.
            for entry in entries:
                self.add(slot * RESOLUTION - RESOLUTION / 2, entry)
            return
        for entry in entries:
            try:
                entry.on_deadline()
            except Exception as exc:  # one stream's bug must not stop the others' timers
                self.loop.call_exception_handler(
                    {"message": "deadline callback failed", "exception": exc}
                )

    @property
    def slots(self) -> int:
        """Slots waiting, each with its loop timer (for tests)."""
        return len(self._slots)

    def __len__(self) -> int:
        """Entries waiting (for tests and the shutdown drain)."""
        return sum(len(entries) for entries in self._slots.values())


def _slot_of(when: float) -> int:
    """The slot of monotonic time `when`: the first slot boundary after it."""
    return int(when * SLOTS_PER_SECOND) + 1
