"""Relaying a backend's response to the client: SSE event by event, never buffered.

`ChunkFilter` is the per-event logic (token detection for the timers, the stream guard per
choice index, rewriting a chunk only when the guard changed it) with no I/O, so property
tests drive the exact code the server runs. `StreamRelay` pushes each upstream chunk
through it to the client from the connection's data callback; `relay_stream` is the
coroutine that waits for the stream's outcome.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from time import monotonic
from typing import Any

import orjson

from .errors import error_event
from .exchange import Exchange
from .http import Response
from .snapshot import StreamPolicy
from .sse import SEPARATOR, SseSplitter
from .stopwords import GuardSpec, StreamGuard
from .timeouts import StreamWatchdog
from .upstream import UpstreamConnection, UpstreamError

DONE_EVENT = b"data: [DONE]\n\n"
_CONTENT_KEY = b'"content":"'
_TEXT_KEY = b'"text":"'
_QUOTE = ord('"')
_ERROR_PREFIX = b'data: {"error"'
MAX_NONSTREAM_BODY = 64 * 1024 * 1024
# How long a backend may take to send its chunked terminator after [DONE] before its
# connection is closed instead of pooled.
MESSAGE_END_TIMEOUT = 1.0
# vLLM's token chunks, one choice with non-empty text and nothing else that needs a parse.
_CHAT_TEXT = re.compile(
    rb'"choices":\[\{"index":(\d+),"delta":\{"content":"([^"\\]+(?:\\.[^"\\]*)*|(?:\\.[^"\\]*)+)"\},'
    rb'"logprobs":null,"finish_reason":null(?:,"token_ids":null)?\}\]'
)
_COMPLETION_TEXT = re.compile(
    rb'"choices":\[\{"index":(\d+),"text":"([^"\\]+(?:\\.[^"\\]*)*|(?:\\.[^"\\]*)+)","logprobs":null,'
    rb'"finish_reason":null(?:,"stop_reason":null)?(?:,"prompt_token_ids":null)?'
    rb'(?:,"token_ids":null)?\}\]'
)


class ChunkFilter:
    """Per-stream state: which choices finished, their guards, token timing."""

    __slots__ = (
        "_last_event",
        "_template",
        "chat",
        "done",
        "ex",
        "finished",
        "guard_spec",
        "guards",
        "n_choices",
        "upstream_error",
        "watchdog",
    )

    def __init__(
        self,
        ex: Exchange,
        chat: bool,
        guard_spec: GuardSpec | None,
        n_choices: int,
        watchdog: StreamWatchdog | None = None,
    ) -> None:
        self.ex = ex
        self.chat = chat
        self.guard_spec = guard_spec
        self.n_choices = max(1, n_choices)
        self.watchdog = watchdog
        self.guards: dict[int, StreamGuard] = {}
        self.finished: set[int] = set()  # choices the guard ended
        self.done = False  # the client has its [DONE]: stop reading the backend
        self.upstream_error = False
        self._template: dict[str, Any] | None = None
        self._last_event = b""  # an event whose id/model a synthesized chunk can copy

    def on_event(self, event: bytes) -> bytes | None:
        """One SSE event (with its trailing blank line) in; the bytes to send out, or None."""
        if self.guard_spec is None:
            return self._observe(event)
        return self._guarded(event)

    def _parse_event(self, event: bytes) -> bytes | None:
        """The full path: parse the chunk, guard each choice, rewrite when changed."""
        if not event.startswith(b"data:"):
            return event  # comments (keep-alives) and other fields pass through untouched
        payload = event[6:-2] if event.startswith(b"data: ") else event[5:-2]
        if payload == b"[DONE]":
            self.done = True
            return self.flush_held() + DONE_EVENT
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event
        if not isinstance(obj, dict):
            return event
        choices = obj.get("choices")
        usage = obj.get("usage")
        if usage:
            self.ex.record_usage(usage)
        if not choices:
            if "error" in obj:
                self.upstream_error = True
                self.ex.upstream_error = "stream_error"
            return event
        if self._template is None:
            self._template = {k: obj[k] for k in ("id", "object", "created", "model") if k in obj}
        guard_spec = self.guard_spec
        modified = False
        kept: list[Any] = []
        for choice in choices:
            index = choice.get("index", 0)
            if index in self.finished:
                modified = True  # the guard already ended this choice: drop its late chunks
                continue
            kept.append(choice)
            if self.chat:
                delta = choice.get("delta") or {}
                text = delta.get("content")
                if not text and (
                    delta.get("reasoning")
                    or delta.get("reasoning_content")
                    or delta.get("tool_calls")
                ):
                    self._token()
            else:
                delta = choice
                text = choice.get("text")
            if text:
                self._token()
            finish = choice.get("finish_reason")
            if finish is not None and index not in self.finished:
                self.ex.finish_reason = finish
            if guard_spec is None:
                continue
            guard = self.guards.get(index)
            if guard is None:
                guard = self.guards[index] = guard_spec.start()
            out = guard.feed(text) if text else ""
            if guard.finish_reason is None and finish is not None:
                out += guard.finish()
            if guard.finish_reason is not None:
                self._end_choice(choice, guard)
                modified = True
            if text is not None and out is not text:
                if self.chat:
                    delta["content"] = out
                else:
                    choice["text"] = out
                modified = True
            elif text is None and out:
                delta["content" if self.chat else "text"] = out
                modified = True
        if not modified:
            return event
        if not kept:
            return None
        obj["choices"] = kept
        out_event = b"data: " + orjson.dumps(obj) + SEPARATOR
        if len(self.finished) >= self.n_choices:
            self.done = True
            return out_event + DONE_EVENT
        return out_event

    def _guarded(self, event: bytes) -> bytes | None:
        """A guarded stream's event. The common one (vLLM's layout: one choice, one text
        delta, no finish and no logprobs) is matched by one regular expression over the
        bytes: the text is decoded without parsing the chunk, and the event goes out
        unchanged when the guard passes the text through. Anything else is parsed."""
        match = (_CHAT_TEXT if self.chat else _COMPLETION_TEXT).search(event)
        if match is None:
            return self._parse_event(event)
        index = int(match[1])
        if index in self.finished:
            return self._parse_event(event)
        raw = match[2]
        text: str = orjson.loads(b'"' + raw + b'"') if b"\\" in raw else raw.decode()
        self._token()
        guard = self.guards.get(index)
        if guard is None:
            assert self.guard_spec is not None
            guard = self.guards[index] = self.guard_spec.start()
        out = guard.feed(text)
        if guard.finish_reason is None:
            if out is text:
                return event
            # Held back (part of) the text: splice the released part into the bytes.
            self._last_event = event
            return event[: match.start(2)] + orjson.dumps(out)[1:-1] + event[match.end(2) :]
        return self._rewrite(event, index, out, guard)

    def _rewrite(self, event: bytes, index: int, out: str, guard: StreamGuard) -> bytes:
        """The event with its text replaced by what the guard released (and the choice
        finished when the guard matched)."""
        obj = orjson.loads(event[6:] if event.startswith(b"data: ") else event[5:])
        if self._template is None:
            self._template = {k: obj[k] for k in ("id", "object", "created", "model") if k in obj}
        for choice in obj["choices"]:
            if choice.get("index", 0) != index:
                continue
            if self.chat:
                choice["delta"]["content"] = out
            else:
                choice["text"] = out
            if guard.finish_reason is not None:
                self._end_choice(choice, guard)
        out_event = b"data: " + orjson.dumps(obj) + SEPARATOR
        if len(self.finished) >= self.n_choices:
            self.done = True
            return out_event + DONE_EVENT
        return out_event

    def _observe(self, event: bytes) -> bytes:
        """No guard: the event goes out unchanged, and a few byte searches find what the
        timers and metrics need, without parsing the JSON of every token."""
        if event.startswith(DONE_EVENT):
            self.done = True
            return event
        key = _CONTENT_KEY if self.chat else _TEXT_KEY
        at = event.find(key)
        if (at >= 0 and event[at + len(key)] != _QUOTE) or (
            self.chat and (b'"reasoning' in event or b'"tool_calls":[' in event)
        ):
            self._token()  # reasoning and tool-call deltas count for the timers too
        if (
            b'"finish_reason":"' in event
            or b'"usage":{' in event
            or event.startswith(_ERROR_PREFIX)
        ):
            self._bookkeep(event)
        return event

    def _bookkeep(self, event: bytes) -> None:
        try:
            obj = orjson.loads(event[6:] if event.startswith(b"data: ") else event[5:])
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict):
            return
        usage = obj.get("usage")
        if usage:
            self.ex.record_usage(usage)
        if "error" in obj and not obj.get("choices"):
            self.upstream_error = True
            self.ex.upstream_error = "stream_error"
        for choice in obj.get("choices") or ():
            if isinstance(choice, dict) and choice.get("finish_reason") is not None:
                self.ex.finish_reason = choice["finish_reason"]

    def _token(self) -> None:
        now = monotonic()
        ex = self.ex
        if ex.first_token_at is None:
            ex.first_token_at = now
        else:
            ex.add_gap(now - ex.last_token_at)
        ex.last_token_at = now
        ex.content_chunks += 1
        if self.watchdog is not None:
            self.watchdog.last_token = now

    def _end_choice(self, choice: dict[str, Any], guard: StreamGuard) -> None:
        index = choice.get("index", 0)
        self.finished.add(index)
        choice["finish_reason"] = guard.finish_reason
        choice["stop_reason"] = guard.matched
        if "logprobs" in choice:
            choice["logprobs"] = None  # they may describe tokens of the removed text
        self.ex.finish_reason = guard.finish_reason
        self.ex.cut = guard.matched

    def _chunk_template(self) -> dict[str, Any]:
        if self._template is None and self._last_event:
            try:
                last = orjson.loads(self._last_event[6:])
            except orjson.JSONDecodeError:
                last = {}
            self._template = {k: last[k] for k in ("id", "object", "created", "model") if k in last}
        return self._template or {}

    def flush_held(self) -> bytes:
        """Text still held back when the backend ended without a finish chunk."""
        out = b""
        for index, guard in self.guards.items():
            if index in self.finished:
                continue
            tail = guard.finish()
            if not tail and guard.finish_reason is None:
                continue
            choice: dict[str, Any] = {"index": index}
            if self.chat:
                choice["delta"] = {"content": tail}
            else:
                choice["text"] = tail
            choice["logprobs"] = None
            choice["finish_reason"] = guard.finish_reason
            if guard.finish_reason is not None:
                self.finished.add(index)
                choice["stop_reason"] = guard.matched
            obj = dict(self._chunk_template())
            obj["choices"] = [choice]
            out += b"data: " + orjson.dumps(obj) + SEPARATOR
        return out


class StreamRelay:
    """Push-mode relay of one SSE response: the upstream connection calls `feed` from its
    data callback, so an event goes backend socket -> filter -> client socket without a
    future or a task switch. The handler awaits `outcome` once per stream:
    "done" (backend's [DONE] relayed, the client's response ended), "cut" (the guard ended
    every choice) or "eof" (the backend ended the message without [DONE]); an
    UpstreamError or ClientGone is set as its exception.

    Backpressure: the client connection calls `pause`/`resume` (a FlowListener) when its
    socket stops and starts taking writes; reading from the backend follows.
    """

    __slots__ = ("_on_event", "filter", "outcome", "response", "splitter", "upstream")

    def __init__(
        self, chunk_filter: ChunkFilter, upstream: UpstreamConnection, response: Response
    ) -> None:
        self.filter = chunk_filter
        self.upstream = upstream
        self.response = response
        self.splitter = SseSplitter()
        self.outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        # Without a guard the per-event work is _observe's byte searches only.
        self._on_event: Callable[[bytes], bytes | None] = (
            chunk_filter._observe if chunk_filter.guard_spec is None else chunk_filter._guarded
        )

    def feed(self, data: bytes) -> None:
        outcome = self.outcome
        if outcome.done():
            return
        chunk_filter = self.filter
        ex = chunk_filter.ex
        # Until the stream's first token: when these bytes reached sluice (for
        # sluice_proxy_overhead_seconds; one clock read per chunk before it, none after).
        arrived = monotonic() if ex.first_token_at is None else 0.0
        try:
            # vLLM sends one event per chunk: the common case needs no split and no copy.
            out: bytes | None
            if self.splitter.pending or data.find(SEPARATOR) != len(data) - 2:
                out = self._feed_split(data)
            else:
                out = self._on_event(data)
            if chunk_filter.done:
                # The last event and the end of the body go out in one send.
                self.response.write_last(out or b"")
            elif out:
                self.response.write(out)
        except BaseException as exc:  # a broken client or a bug: end this stream only
            outcome.set_exception(exc)
            return
        if arrived and ex.first_token_at is not None:
            ex.first_token_overhead = monotonic() - arrived
        if chunk_filter.done:
            outcome.set_result("cut" if chunk_filter.finished else "done")

    def _feed_split(self, data: bytes) -> bytes:
        """Several events in one read, or one split across reads."""
        chunk_filter = self.filter
        parts = []
        for event in self.splitter.feed(data):
            out = self._on_event(event + SEPARATOR)
            if out is not None:
                parts.append(out)
            if chunk_filter.done:
                break
        return b"".join(parts)

    def complete(self) -> None:
        if not self.outcome.done():
            self.outcome.set_result("eof")

    def error(self, exc: BaseException) -> None:
        if not self.outcome.done():
            self.outcome.set_exception(exc)

    # FlowListener: the client's socket stopped / started taking writes.
    def pause(self) -> None:
        self.upstream.pause_reading()

    def resume(self) -> None:
        self.upstream.resume_reading()


async def relay_stream(
    ex: Exchange,
    upstream: UpstreamConnection,
    response: Response,
    policy: StreamPolicy,
    watchdog: StreamWatchdog | None,
    n_choices: int,
) -> bool:
    """Relays an SSE response whose head `response.start(..., with_first_write=True)`
    prepared; True when the backend's message ended cleanly, so its connection may be
    reused (possibly after its last bytes: see release_when_complete). Cancellation
    (client gone, timeout) propagates to the caller, which aborts the upstream."""
    chunk_filter = ChunkFilter(ex, ex.chat, policy.guard, n_choices, watchdog)
    relay = StreamRelay(chunk_filter, upstream, response)
    response.set_flow_listener(relay)
    upstream.set_consumer(relay)  # events already buffered go out with the head
    response.flush()  # the head never waits for the backend's first event
    try:
        outcome = await relay.outcome
    except UpstreamError as exc:
        ex.upstream_error = exc.kind
        response.write(
            error_event(f"backend stream broke: {exc}", "upstream_error", "upstream_" + exc.kind)
        )
        return False
    finally:
        upstream.set_consumer(None)
        response.set_flow_listener(None)
        upstream.resume_reading()
    if outcome == "done":
        return True
    if outcome == "cut":
        return False  # closing the connection aborts the generation
    # The backend ended without [DONE]: never leave the client with a silently cut stream.
    response.write_last(chunk_filter.flush_held() + DONE_EVENT)
    return True


def guard_completion(body: dict[str, Any], spec: GuardSpec, chat: bool, ex: Exchange) -> bool:
    """Applies the guard to a non-stream response body in place; True when changed."""
    changed = False
    for choice in body.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        holder = choice.get("message") if chat else choice
        if not isinstance(holder, dict):
            continue
        key = "content" if chat else "text"
        text = holder.get(key)
        if not isinstance(text, str) or not text:
            continue
        result = spec.apply(text)
        if result.finish_reason is None:
            continue
        holder[key] = result.text
        choice["finish_reason"] = result.finish_reason
        choice["stop_reason"] = result.matched
        if "logprobs" in choice:
            choice["logprobs"] = None
        ex.finish_reason = result.finish_reason
        ex.cut = result.matched
        changed = True
    return changed
