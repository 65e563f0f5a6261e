"""SSE keep-alives: a comment line while a stream waits, so idle timeouts of intermediaries
(Cloudflare's 100 s, corporate proxies' 30-60 s, nginx's proxy_read_timeout) do not cut it.

One `Deadlines` entry per stream, never a timer per token: it fires `interval` after the last
write it knows of (its own keep-alive, or the last content token the relay stamped on the
Exchange), so a stream that flows never writes a comment, and one whose backend is silent
gets `: keep-alive` every `interval`.

A streaming request still waiting when the first keep-alive is due (in the limiter's
queue, or for the backend's response head) is answered 200 with the SSE head at that
moment; a refusal after that (queue wait expired, backend error) becomes the stream's
terminal error event. A request refused sooner keeps its plain 429/503 with Retry-After.

The timer checks `response.ended` before every write and is stopped in the handler's
`finally`: there is never a write after the response ended (the bug of sse-starlette's
ping task, which raced the end of the response).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import orjson

from .clock import monotonic
from .deadlines import Deadlines
from .errors import RETRY_STATUSES, ApiError, bad_gateway, retry_headers
from .exchange import Exchange
from .http import Header, Response
from .response import ClientGone
from .upstream import UpstreamConnection, UpstreamError

# A backend's refusal is a short JSON error; read at most this much of it.
MAX_ERROR_BODY: Final = 64 * 1024

KEEPALIVE_EVENT: Final = b": keep-alive\n\n"


class KeepAlive:
    """Writes `: keep-alive` on `response` whenever nothing was written for `interval`."""

    __slots__ = (
        "_deadlines",
        "_ex",
        "_head",
        "_last",
        "_slot",
        "interval",
        "may_start",
        "response",
    )

    def __init__(
        self,
        response: Response,
        interval: float,
        ex: Exchange,
        head: list[Header],
        deadlines: Deadlines,
    ) -> None:
        self.response = response
        self.interval = interval
        self._ex = ex
        self._head = head
        self._last = monotonic()
        # The SSE head may go out early only before the backend answered: once its status
        # is known the exchange answers (a non-stream error keeps its own status).
        self.may_start = True
        self._deadlines = deadlines
        self._slot: int | None = self._deadlines.add(self._last + interval, self)

    def on_deadline(self) -> None:
        self._slot = None
        response = self.response
        if response.ended:
            return
        now = monotonic()
        due = max(self._last, self._ex.last_token_at) + self.interval
        if now < due:
            self._slot = self._deadlines.add(due, self)
            return
        if not response.started:
            if not self.may_start:
                self._slot = self._deadlines.add(now + self.interval, self)
                return
            self._ex.status = 200
            response.start(200, self._head)
        try:
            response.write(KEEPALIVE_EVENT)
        except ClientGone:
            return  # the handler learns it from the connection; nothing more to write
        self._last = now
        self._slot = self._deadlines.add(now + self.interval, self)

    def stop(self) -> None:
        self.may_start = False
        slot = self._slot
        if slot is not None:
            self._slot = None
            self._deadlines.remove(slot, self)


# An endpoint's terminal error event for a refusal (`Adapter.stream_refusal`).
RefusalEvent = Callable[[ApiError, dict[str, object] | None], bytes]


def error_as_event(
    response: Response,
    exc: ApiError,
    refusal_event: RefusalEvent,
    relayed: dict[str, object] | None = None,
) -> None:
    """A refusal after the SSE head went out: the endpoint's terminal error event
    (OpenAI's carries the retry delay in the error object, since headers are gone)."""
    if response.ended:
        return
    try:
        response.write_last(refusal_event(exc, relayed))
    except ClientGone:
        pass


async def relay_refusal(
    ex: Exchange,
    conn: UpstreamConnection,
    response: Response,
    refusal_event: RefusalEvent,
    retry_after: Callable[[], int] | None,
) -> bool:
    """The backend refused a stream whose SSE head already went out: its error becomes the
    endpoint's terminal error event, with the backend's Retry-After (else `retry_after()`,
    sluice's estimate) for a 429 or 503, as the answer before a head would carry. True
    when its connection may be reused."""
    try:
        body = await conn.read_all(MAX_ERROR_BODY)
    except UpstreamError as exc:
        ex.upstream_error = exc.kind
        error_as_event(
            response,
            bad_gateway(f"backend response broke: {exc}", "upstream_" + exc.kind),
            refusal_event,
        )
        return False
    status = conn.status
    ex.upstream_error = f"http_{status}"
    retry = retry_headers(status, conn.headers.get(b"retry-after"), retry_after)
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    error = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(error, dict):  # vLLM's OpenAI-shaped error: passed on where the shape is
        message = error.get("message")
        refusal = ApiError(
            status,
            message if isinstance(message, str) else f"backend answered {status}",
            type="upstream_error",
            code=f"upstream_http_{status}",
            headers=retry,
        )
        error_as_event(response, refusal, refusal_event, error)
        return conn.complete
    if isinstance(error, str) and error:  # {"error": "Too many requests"}
        message = error[:200]
    else:
        message = body[:200].decode("utf-8", "replace").strip() or f"HTTP {status}"
    refusal = ApiError(
        status if status in RETRY_STATUSES else 502,
        f"backend answered {status}: {message}",
        type="upstream_error",
        code=f"upstream_http_{status}",
        headers=retry,
    )
    error_as_event(response, refusal, refusal_event)
    return conn.complete


__all__ = ["KEEPALIVE_EVENT", "KeepAlive", "error_as_event", "relay_refusal"]
