"""Stream deadlines, one `Deadlines` entry per stream whatever the token count.

A token only stores its `time.monotonic()` in an attribute. The watchdog waits in the
slot of its earliest possible deadline; when the slot fires it recomputes the deadline
from the latest token time and waits again if the stream moved on. Its first wait ends no
later than the inter-token limit after the start (a check, when the first-token or
response-head deadline comes later), so the first token finds it waiting no later than
the inter-token deadline that token starts, and moves nothing; only a first token after a
longer wait moves it (`first_token`). So a stream with an inter-token timeout of 5 s and
tokens every 10 ms is looked at once per 5 s, not once per token, and a short request
costs one set insertion and one removal, no loop timer of its own.

On expiry the watchdog cancels the task it guards (like `asyncio.timeout`); the relay
tells its own cancellation from a client disconnect by `expired` and `Task.uncancel()`.

Times are `time.monotonic()` (the relay stamps tokens with it: uvloop's `loop.time()` has
millisecond resolution and is cached per loop pass); a deadline fires at most
`deadlines.RESOLUTION` (10 ms) late.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, Final

from .clock import monotonic
from .deadlines import Deadlines
from .snapshot import StreamTimeouts

FIRST_TOKEN: Final = "first_token_timeout"
INTER_TOKEN: Final = "inter_token_timeout"
TOTAL: Final = "total_timeout"
RESPONSE_HEAD: Final = "response_head_timeout"
SHUTDOWN: Final = "shutdown"
NO_TOKEN: Final = -1.0  # StreamWatchdog.last_token before the stream's first token

# Python 3.11's asyncio.current_task is interpreted: a frame per call (~0.5 us, once per
# request here) to read the C module's table of running tasks, which is read directly
# here. From 3.12 on, current_task is the C function itself.
_RUNNING_TASKS: Final[dict[Any, Any] | None] = (
    getattr(asyncio.tasks, "_current_tasks", None) if sys.version_info < (3, 12) else None
)


def current_task(loop: asyncio.AbstractEventLoop) -> asyncio.Task[Any] | None:
    """The task running on `loop` now (None in a plain callback), as asyncio.current_task."""
    if _RUNNING_TASKS is not None:
        task: asyncio.Task[Any] | None = _RUNNING_TASKS.get(loop)
        return task
    return asyncio.current_task(loop)


class StreamWatchdog:
    __slots__ = (
        "_deadlines",
        "_slot",
        "_task",
        "expired",
        "got_head",
        "last_token",
        "sent_at",
        "sent_to",
        "started",
        "timeouts",
    )

    def __init__(
        self,
        timeouts: StreamTimeouts,
        deadlines: Deadlines,
        task: asyncio.Task[object] | None = None,
        started: float | None = None,
    ) -> None:
        """`started`: when the request began (monotonic), so that the limits count the
        time it queued for a permit too; now when not given."""
        self._deadlines = deadlines
        # The loop given: asyncio.current_task() would look it up (a getpid() per call).
        self._task = task if task is not None else current_task(self._deadlines.loop)
        self.timeouts = timeouts
        self.started = monotonic() if started is None else started
        # Set by the relay on each content token; NO_TOKEN until the first. A float, not
        # Optional: compiled, a float attribute is stored without allocating per token.
        self.last_token = NO_TOKEN
        self.expired: str | None = None
        self.got_head = False
        # The backend replica the request went to last, and when (`sending`): the one to
        # blame when no head comes (`hung_backend`).
        self.sent_to: object | None = None
        self.sent_at = 0.0
        self._slot: int | None = None  # the Deadlines slot it waits in, if any
        self._arm()

    def _deadline(self) -> tuple[float, str | None] | None:
        """The next time to look, and the timeout that expires then (None: only a check)."""
        t = self.timeouts
        best: tuple[float, str | None] | None = None
        if t.total is not None:
            best = (self.started + t.total, TOTAL)
        candidate: tuple[float, str | None] | None = None
        if self.last_token == NO_TOKEN:
            if t.first_token is not None:
                candidate = (self.started + t.first_token, FIRST_TOKEN)
            elif t.inter_token is not None:
                # No first-token limit: look again later, the inter-token clock starts with
                # the first token.
                candidate = (monotonic() + t.inter_token, None)
        elif t.inter_token is not None:
            candidate = (self.last_token + t.inter_token, INTER_TOKEN)
        if candidate is not None and (best is None or candidate[0] < best[0]):
            best = candidate
        if not self.got_head and t.response_head is not None:
            head = self.started + t.response_head
            if best is None or head < best[0]:
                best = (head, RESPONSE_HEAD)
        return best

    def _arm(self) -> None:
        """The first wait: the earliest deadline, or sooner, the inter-token limit after the
        start, so that `first_token` finds the watchdog waiting no later than the
        inter-token deadline it starts (and moves it only after a wait longer than that).
        Before a head or a token that is the shortest of the four limits after the start
        (what `_deadline` would find, without its tuples: ~1,100 instructions a request)."""
        t = self.timeouts
        shortest = _shorter(
            _shorter(t.inter_token, t.total), _shorter(t.first_token, t.response_head)
        )
        if shortest is not None:
            self._slot = self._deadlines.add(self.started + shortest, self)

    def on_deadline(self) -> None:
        self._slot = None
        deadline = self._deadline()
        if deadline is None:
            return
        when, kind = deadline
        if kind is None or when > monotonic():
            self._slot = self._deadlines.add(when, self)
            return
        self.expired = kind
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def sending(self, replica: object) -> None:
        """The request goes to `replica` now (each one a request tries, in turn)."""
        self.sent_to = replica
        self.sent_at = monotonic()

    def hung_backend(self) -> object | None:
        """After an expiry: the replica that held the request without answering its head
        for at least half of the limit that expired (a stream's head comes before its
        first token, in milliseconds from a healthy vLLM), else None. Half, not all:
        the limits run from the request's start, and a request that spent most of its time
        queued for a permit must not blame the replica it reached last."""
        if self.got_head or self.sent_to is None or self.expired == INTER_TOKEN:
            return None
        limit = limit_of(self.expired, self.timeouts)
        if limit is None or monotonic() - self.sent_at < limit / 2:
            return None
        return self.sent_to

    def head(self) -> None:
        """The backend's response head arrived: its deadline no longer applies. The slot
        stays: a later deadline is found when it fires (for most exchanges, never)."""
        self.got_head = True

    def first_token(self, now: float) -> None:
        """The stream's first content token: from now on the inter-token deadline applies.
        The watchdog waits for a deadline no later than that one unless it has already
        waited longer than the inter-token limit for this token (a long prefill): then it
        is brought forward. Called once per stream; later tokens only set last_token."""
        self.last_token = now
        slot = self._slot
        inter = self.timeouts.inter_token
        if slot is not None and inter is not None and self.expired is None:
            self._slot = self._deadlines.bring_forward(slot, now + inter, self)

    def interrupt(self, kind: str) -> None:
        """Ends the guarded exchange now (graceful shutdown past its drain deadline)."""
        self.stop()
        if self.expired is None:
            self.expired = kind
            if self._task is not None and not self._task.done():
                self._task.cancel()

    def stop(self) -> None:
        slot = self._slot
        if slot is not None:
            self._slot = None
            self._deadlines.remove(slot, self)

    def claim_cancellation(self) -> bool:
        """True when the pending CancelledError is this watchdog's own (a timeout), not a
        client disconnect or shutdown; the cancellation is then withdrawn from the task."""
        if self.expired is None or self._task is None:
            return False
        return self._task.uncancel() == 0


def _shorter(a: float | None, b: float | None) -> float | None:
    """The shorter of two limits, None being none."""
    if a is None:
        return b
    return a if b is None or a <= b else b


def request_deadline(timeouts: StreamTimeouts, started: float, stream: bool) -> float | None:
    """When the first limit that runs from the request's start passes (`total`, and for a
    stream `first_token` and `response_head`), on the monotonic clock; None when none is
    set. The longest a request may wait for a permit: after it, it could only time out."""
    bound = timeouts.total
    if stream:
        bound = _shorter(bound, _shorter(timeouts.first_token, timeouts.response_head))
    return None if bound is None else started + bound


def limit_of(kind: str | None, timeouts: StreamTimeouts) -> float | None:
    """The limit of the timeout named `kind`; None for none or another kind (shutdown)."""
    if kind == FIRST_TOKEN:
        return timeouts.first_token
    if kind == INTER_TOKEN:
        return timeouts.inter_token
    if kind == RESPONSE_HEAD:
        return timeouts.response_head
    if kind == TOTAL:
        return timeouts.total
    return None


# What a client reads for each timeout, with its limit.
_TIMEOUT_MESSAGES: Final = {
    FIRST_TOKEN: "no token from the backend within {:g}s",
    INTER_TOKEN: "no token from the backend for {:g}s",
    RESPONSE_HEAD: "no response head from the backend within {:g}s",
    TOTAL: "request exceeded its total time limit of {:g}s",
}


def timeout_message(kind: str, timeouts: StreamTimeouts) -> str:
    if kind == SHUTDOWN:
        return "the proxy is shutting down; retry the request"
    if kind not in _TIMEOUT_MESSAGES:
        kind = TOTAL
    return _TIMEOUT_MESSAGES[kind].format(limit_of(kind, timeouts))
