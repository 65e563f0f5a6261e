"""`Deadlines`: stream deadlines share one loop timer per 10 ms slot, fire never early and
at most a slot late, and a stream that ends leaves nothing behind (issue 19: three loop
timers per short request were ~10% of its CPU)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from time import monotonic
from typing import Any

import pytest
import uvloop
from sluice.proxy.deadlines import RESOLUTION, Deadlines
from sluice.proxy.snapshot import StreamTimeouts
from sluice.proxy.timeouts import FIRST_TOKEN, INTER_TOKEN, StreamWatchdog, current_task


def in_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


class Recorder:
    def __init__(self, fired: list[tuple[Recorder, float]]) -> None:
        self.fired = fired

    def on_deadline(self) -> None:
        self.fired.append((self, monotonic()))


class CountingLoop:
    """Counts the loop timers a Deadlines starts, and keeps their handles."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.timers = 0
        self.handles: list[asyncio.TimerHandle] = []

    def call_later(self, delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        self.timers += 1
        handle = self.loop.call_later(delay, callback, *args)
        self.handles.append(handle)
        return handle

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loop, name)


@in_loop
async def test_entries_fire_at_or_after_their_deadline_and_at_most_a_slot_late() -> None:
    deadlines = Deadlines(asyncio.get_running_loop())
    fired: list[tuple[Recorder, float]] = []
    start = monotonic()
    asked = {}
    for delay in (0.02, 0.05, 0.08, 0.13):
        entry = Recorder(fired)
        asked[entry] = start + delay
        deadlines.add(start + delay, entry)
    await asyncio.sleep(0.3)
    assert len(fired) == 4
    for entry, at in fired:
        assert at >= asked[entry]
        assert at - asked[entry] < RESOLUTION + 0.1  # a slot, plus a generous loop latency
    assert [asked[e] for e, _ in fired] == sorted(asked.values())
    assert len(deadlines) == 0


@in_loop
async def test_a_thousand_deadlines_in_one_slot_start_one_loop_timer() -> None:
    counting = CountingLoop(asyncio.get_running_loop())
    deadlines = Deadlines(counting)  # type: ignore[arg-type]
    fired: list[tuple[Recorder, float]] = []
    when = (int((monotonic() + 0.05) / RESOLUTION) + 0.5) * RESOLUTION  # mid-slot
    for _ in range(1000):
        deadlines.add(when, Recorder(fired))
    assert counting.timers == 1
    await asyncio.sleep(0.2)
    assert len(fired) == 1000


@in_loop
async def test_a_removed_entry_never_fires() -> None:
    deadlines = Deadlines(asyncio.get_running_loop())
    fired: list[tuple[Recorder, float]] = []
    kept, removed = Recorder(fired), Recorder(fired)
    when = monotonic() + 0.03
    deadlines.add(when, kept)
    slot = deadlines.add(when, removed)
    deadlines.remove(slot, removed)
    await asyncio.sleep(0.15)
    assert [e for e, _ in fired] == [kept]


@in_loop
async def test_a_slot_whose_entries_all_left_stops_its_timer_at_once() -> None:
    counting = CountingLoop(asyncio.get_running_loop())
    deadlines = Deadlines(counting)  # type: ignore[arg-type]
    fired: list[tuple[Recorder, float]] = []
    first, second = Recorder(fired), Recorder(fired)
    when = monotonic() + 60.0
    slot = deadlines.add(when, first)
    deadlines.add(when, second)
    deadlines.remove(slot, first)
    assert deadlines.slots == 1 and not counting.handles[0].cancelled()  # one still waits
    deadlines.remove(slot, second)
    assert deadlines.slots == 0 and counting.handles[0].cancelled()
    deadlines.remove(slot, second)  # removed twice: nothing happens
    again = deadlines.add(monotonic() + 0.02, first)  # the slot of a new deadline
    assert counting.timers == 2 and deadlines.slots == 1
    await asyncio.sleep(0.15)
    assert [e for e, _ in fired] == [first] and deadlines.slots == 0
    deadlines.remove(again, first)  # after it fired: nothing happens


@in_loop
async def test_streams_that_end_before_their_deadlines_hold_no_timer() -> None:
    """Under steady load, every 10 ms slot up to the longest deadline ahead got a timer
    that waited, empty, until its time: 6,000 for a 60 s timeout (the soak's RSS rise)."""
    deadlines = Deadlines(asyncio.get_running_loop())
    start = monotonic()
    for i in range(6000):  # a stream per 10 ms for 60 s, each over before its deadline
        entry = Recorder([])
        deadlines.remove(deadlines.add(start + 60.0 + i * RESOLUTION, entry), entry)
    assert deadlines.slots == 0 and len(deadlines) == 0


@in_loop
async def test_one_failing_entry_does_not_stop_the_others_of_its_slot() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    deadlines = Deadlines(loop)
    fired: list[tuple[Recorder, float]] = []

    class Broken:
        def on_deadline(self) -> None:
            raise RuntimeError("boom")

    when = monotonic() + 0.02
    deadlines.add(when, Broken())
    deadlines.add(when, Recorder(fired))
    await asyncio.sleep(0.15)
    assert len(fired) == 1
    assert [type(c["exception"]) for c in errors] == [RuntimeError]


@in_loop
async def test_short_exchange_moves_no_watchdog_and_leaves_no_entry() -> None:
    counting = CountingLoop(asyncio.get_running_loop())
    deadlines = Deadlines(counting)  # type: ignore[arg-type]
    timeouts = StreamTimeouts(first_token=30.0, inter_token=5.0, total=600.0, response_head=20.0)
    watchdog = StreamWatchdog(timeouts, deadlines)
    assert len(deadlines) == 1
    slot = watchdog._slot
    # It waits for the inter-token limit after the start (5 s), before the response head's
    # 20 s: a check, since no deadline passes then.
    assert slot == int((watchdog.started + 5.0) / RESOLUTION) + 1
    watchdog.head()
    watchdog.first_token(monotonic())  # its 5 s deadline is no sooner: nothing moves
    assert (len(deadlines), counting.timers, watchdog._slot) == (1, 1, slot)
    watchdog.last_token = monotonic()
    watchdog.stop()
    assert len(deadlines) == 0
    assert watchdog.expired is None


@in_loop
async def test_a_first_token_after_a_long_wait_brings_the_watchdog_forward() -> None:
    deadlines = Deadlines(asyncio.get_running_loop())
    timeouts = StreamTimeouts(first_token=5.0, inter_token=0.05)
    watchdog = StreamWatchdog(timeouts, deadlines)
    watchdog.head()
    await asyncio.sleep(0.12)  # the 50 ms check fired: it waits for the 5 s first token now
    assert watchdog.expired is None
    assert watchdog._slot == int((watchdog.started + 5.0) / RESOLUTION) + 1
    now = monotonic()
    watchdog.first_token(now)
    assert watchdog._slot == int((now + 0.05) / RESOLUTION) + 1
    watchdog.stop()


@in_loop
async def test_a_stream_without_a_first_token_limit_waits_for_its_first_token() -> None:
    """Only an inter-token limit: its clock starts at the first token, however late."""
    deadlines = Deadlines(asyncio.get_running_loop())

    async def guarded() -> tuple[StreamWatchdog, float]:
        watchdog = StreamWatchdog(StreamTimeouts(inter_token=0.05), deadlines)
        watchdog.head()
        await asyncio.sleep(0.2)  # four checks, no token: nothing expires
        assert watchdog.expired is None
        first = monotonic()
        watchdog.first_token(first)
        try:
            await asyncio.sleep(2)
        except asyncio.CancelledError:
            assert watchdog.claim_cancellation()
        return watchdog, monotonic() - first

    watchdog, after_token = await asyncio.wait_for(guarded(), 1.5)
    assert watchdog.expired == INTER_TOKEN
    assert 0.05 <= after_token < 0.05 + RESOLUTION + 0.5
    assert len(deadlines) == 0


@pytest.mark.parametrize(
    ("timeouts", "tokens", "expected"),
    [
        (StreamTimeouts(first_token=0.05), 0, FIRST_TOKEN),
        (StreamTimeouts(first_token=5.0, inter_token=0.05), 1, INTER_TOKEN),
    ],
)
@in_loop
async def test_watchdog_expires_on_its_slot_and_cancels_its_task(
    timeouts: StreamTimeouts, tokens: int, expected: str
) -> None:
    deadlines = Deadlines(asyncio.get_running_loop())

    async def guarded() -> StreamWatchdog:
        watchdog = StreamWatchdog(timeouts, deadlines)
        watchdog.head()
        if tokens:
            watchdog.first_token(monotonic())
        try:
            await asyncio.sleep(2)
        except asyncio.CancelledError:
            assert watchdog.claim_cancellation()
        return watchdog

    start = monotonic()
    watchdog = await asyncio.wait_for(guarded(), 1.5)
    assert watchdog.expired == expected
    assert 0.05 <= monotonic() - start < 0.05 + RESOLUTION + 0.5
    assert len(deadlines) == 0


def test_the_watchdogs_current_task_is_asyncios_on_either_event_loop() -> None:
    """`timeouts.current_task` reads the table of running tasks directly on Python 3.11
    (asyncio's own function is interpreted there): the same answer as asyncio's, inside a
    task and in a plain callback, on asyncio's loop and on uvloop's."""

    async def check() -> None:
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        assert me is not None and current_task(loop) is me
        other = loop.create_task(asyncio.sleep(0))
        seen: list[object] = []

        async def inner() -> None:
            seen.append(current_task(loop))

        task = loop.create_task(inner())
        await task
        await other
        assert seen == [task]
        in_callback: list[object] = []
        done = loop.create_future()
        loop.call_soon(lambda: (in_callback.append(current_task(loop)), done.set_result(None)))
        await done
        assert in_callback == [None]
        assert current_task(loop) is me

    asyncio.run(check())
    uvloop.run(check())
