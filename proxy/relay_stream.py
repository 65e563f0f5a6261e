"""The coroutine that relays one SSE response: it sets up the push-mode `StreamRelay`
(relay.py), waits for the stream's outcome and ends the response the way it ended.

It lives apart from `StreamRelay`, which is the per-event code; both are compiled
(setup.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol

from .chunks import ChunkFilter
from .errors import error_event
from .exchange import Exchange
from .http import Response
from .relay import ReadSide, StreamRelay
from .snapshot import StreamPolicy
from .timeouts import StreamWatchdog
from .upstream import BodyConsumer, ReadTaker, UpstreamError

# How long a backend may take to send its chunked terminator after [DONE] before its
# connection is closed instead of pooled.
MESSAGE_END_TIMEOUT: Final = 1.0


class RelayedUpstream(ReadSide, Protocol):
    """The backend connection as the relay uses it (`upstream.UpstreamConnection`; a
    protocol, so tests can push bytes of their own to the compiled relay)."""

    def set_consumer(self, consumer: BodyConsumer | None) -> None: ...

    def take_reads(self, reader: ReadTaker | None) -> None: ...


async def relay_stream(
    ex: Exchange,
    upstream: RelayedUpstream,
    response: Response,
    policy: StreamPolicy,
    watchdog: StreamWatchdog | None,
    n_choices: int,
    chunk_filter: ChunkFilter | None = None,
    stream_error: Callable[[str, str, str, ChunkFilter | None], bytes] | None = None,
) -> bool:
    """Relays an SSE response whose head `response.start(..., with_first_write=True)`
    prepared; True when the backend's message ended cleanly, so its connection may be
    reused (possibly after its last bytes: see release_when_complete). Cancellation
    (client gone, timeout) propagates to the caller, which aborts the upstream.
    `stream_error`: the endpoint's error event (`Adapter.stream_error`: Anthropic's,
    TGI's and the Responses API's differ from OpenAI's, the default), for a backend
    stream that breaks."""
    if chunk_filter is None:  # an endpoint adapter may bring its own (TGI, messages, ...)
        chunk_filter = ChunkFilter(ex, ex.chat, policy.guard, n_choices, watchdog)
    relay = StreamRelay(chunk_filter, upstream, response)
    response.set_flow_listener(relay)
    upstream.set_consumer(relay)  # events already buffered go out with the head
    relay.taking_reads()
    # Bytes the connection held since the head come to it now, as a read.
    upstream.take_reads(relay)
    response.flush()  # the head never waits for the backend's first event
    try:
        outcome = relay.result or await relay.wait()
    except UpstreamError as exc:
        ex.upstream_error = exc.kind
        message, code = f"backend stream broke: {exc}", "upstream_" + exc.kind
        response.write(
            error_event(message, "upstream_error", code)
            if stream_error is None
            else stream_error(message, "upstream_error", code, chunk_filter)
        )
        return False
    finally:
        upstream.take_reads(None)
        upstream.set_consumer(None)
        response.set_flow_listener(None)
        upstream.resume_reading()
    if outcome == "done":
        return True
    if outcome == "cut":
        return False  # closing the connection aborts the generation
    # The backend ended without [DONE]: never leave the client with a silently cut stream.
    response.write_last(chunk_filter.eof_tail())
    return True
