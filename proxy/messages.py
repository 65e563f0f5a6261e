"""`POST /v1/messages` (the Anthropic Messages API vLLM serves): the adapter.

The preset goes out in the Messages vocabulary (`max_tokens`, `temperature`, `top_p`,
`top_k`, `stop_sequences`: all vLLM reads from this endpoint); the guard reads
`content_block_delta` text deltas and the text blocks of a complete message. A cut stream
ends as vLLM ends one: `content_block_stop`, `message_delta` (stop_reason
`stop_sequence` with the matched string, or `refusal` for a cut pattern), `message_stop`
and `data: [DONE]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final

import orjson

from .adapters import Adapter
from .chunks import ChunkFilter
from .errors import ApiError
from .eventfilter import NamedEventFilter, named_event
from .exchange import Exchange
from .http import Header
from .response import JSON_HEADERS
from .snapshot import StreamPolicy
from .sse import DONE_EVENT
from .stopwords import GuardSpec, StreamGuard
from .timeouts import StreamWatchdog

_STOP_REASONS: Final = {"end_turn": "stop", "max_tokens": "length", "stop_sequence": "stop"}
# The deltas the guard reads, and their text's field: the answer's text, a reasoning
# model's thinking and a tool call's input as generated (vLLM is sent the policy's stop
# strings, never its cut patterns).
_TEXT_DELTAS: Final = {
    "text_delta": "text",
    "thinking_delta": "thinking",
    "input_json_delta": "partial_json",
}
_TEXT_BLOCKS: Final = {"text": "text", "thinking": "thinking"}


def _stop_reason(guard: StreamGuard) -> str:
    return "refusal" if guard.finish_reason == "content_filter" else "stop_sequence"


class MessagesFilter(NamedEventFilter):
    __slots__ = ("kinds",)
    delta_marker = b'"content_block_delta"'

    def __init__(
        self, ex: Exchange, guard_spec: GuardSpec | None, watchdog: StreamWatchdog | None
    ) -> None:
        super().__init__(ex, guard_spec, watchdog)
        self.kinds: dict[int, str] = {}  # block index -> its delta's type (_TEXT_DELTAS)

    def is_terminal(self, event: bytes) -> bool:
        return event.find(b"message_delta") >= 0

    def bookkeep(self, name: str, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.ex.record_usage(
                {
                    "prompt_tokens": usage.get("input_tokens"),
                    "completion_tokens": usage.get("output_tokens"),
                }
            )
        if name == "message_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
                reason = delta["stop_reason"]
                self.ex.finish_reason = _STOP_REASONS.get(reason, reason)
        elif name == "error":
            self.upstream_error = True
            self.ex.upstream_error = "stream_error"

    def on_named(self, event: bytes, name: str, obj: Any) -> bytes | None:
        if not isinstance(obj, dict):
            return event
        if name == "content_block_delta":
            delta = obj.get("delta")
            index = obj.get("index", 0)
            kind = delta.get("type") if isinstance(delta, dict) else None
            field = _TEXT_DELTAS.get(kind) if isinstance(kind, str) else None
            if field is None or not isinstance(delta, dict) or not isinstance(kind, str):
                return event
            text = delta.get(field)
            if not isinstance(text, str) or not isinstance(index, int):
                return event
            self.kinds[index] = kind
            out, guard = self.feed_text(index, text)
            if guard.finish_reason is not None:
                return self._end(index, out, guard)
            if out is text:
                return event
            delta[field] = out
            return named_event(name, obj)
        if name == "content_block_stop":
            index = obj.get("index", 0)
            if not isinstance(index, int):
                return event
            tail = self.finish_text(index)
            if tail is None:
                return event
            out, guard = tail
            if guard.finish_reason is not None:
                return self._end(index, out, guard)
            if out:
                return self._delta(index, out) + event
        return event

    def _delta(self, index: int, text: str) -> bytes:
        kind = self.kinds.get(index, "text_delta")
        return named_event(
            "content_block_delta",
            {"type": "content_block_delta", "index": index,
             "delta": {"type": kind, _TEXT_DELTAS[kind]: text}},
        )  # fmt: skip

    def _end(self, index: int, out: str, guard: StreamGuard) -> bytes:
        self.cut(index, guard)
        parts = [self._delta(index, out)] if out else []
        parts.append(
            named_event("content_block_stop", {"type": "content_block_stop", "index": index})
        )
        parts.append(
            named_event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": _stop_reason(guard), "stop_sequence": guard.matched},
                    "usage": {"input_tokens": self.ex.prompt_tokens or 0,
                              "output_tokens": self.ex.content_chunks},
                },
            )
        )  # fmt: skip
        parts.append(named_event("message_stop", {"type": "message_stop"}))
        parts.append(DONE_EVENT)
        return b"".join(parts)


def _error_kind(exc: ApiError) -> str:
    """Anthropic's error type for the status."""
    return {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
            413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}.get(
        exc.status, "invalid_request_error" if exc.status < 500 else "api_error"
    )  # fmt: skip


class MessagesAdapter(Adapter):
    name = "/v1/messages"
    upstream_path = b"/v1/messages"
    resumable = False
    vocabulary: ClassVar[Mapping[str, str]] = {
        "max_tokens": "max_tokens",
        "temperature": "temperature",
        "top_p": "top_p",
        "top_k": "top_k",
        "stop": "stop_sequences",
    }

    def n_choices(self, body: dict[str, Any]) -> int:
        return 1

    def chunk_filter(
        self, ex: Exchange, policy: StreamPolicy, n_choices: int, watchdog: StreamWatchdog | None
    ) -> ChunkFilter:
        return MessagesFilter(ex, policy.guard, watchdog)

    def rewrite_body(self, obj: Any, policy: StreamPolicy, ex: Exchange) -> Any | None:
        if not isinstance(obj, dict):
            return None
        usage = obj.get("usage")
        if isinstance(usage, dict):
            ex.record_usage(
                {
                    "prompt_tokens": usage.get("input_tokens"),
                    "completion_tokens": usage.get("output_tokens"),
                }
            )
        reason = obj.get("stop_reason")
        if isinstance(reason, str):
            ex.finish_reason = _STOP_REASONS.get(reason, reason)
        spec = policy.guard
        content = obj.get("content")
        if spec is None or not isinstance(content, list):
            return None
        for position, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "tool_use" and isinstance(block, dict):
                # Its input is an object here: read as JSON text; a match drops the call
                # (half an object is no input).
                result = spec.apply(orjson.dumps(block.get("input")).decode())
                if result.finish_reason is None:
                    continue
                del content[position:]
            else:
                field = _TEXT_BLOCKS.get(kind) if isinstance(kind, str) else None
                if field is None or not isinstance(block, dict):
                    continue
                text = block.get(field)
                if not isinstance(text, str):
                    continue
                result = spec.apply(text)
                if result.finish_reason is None:
                    continue
                block[field] = result.text
                del content[position + 1 :]
            obj["stop_reason"] = (
                "refusal" if result.finish_reason == "content_filter" else "stop_sequence"
            )
            obj["stop_sequence"] = result.matched
            ex.finish_reason = result.finish_reason
            ex.cut = result.matched
            return obj
        return None

    def error_response(self, exc: ApiError) -> tuple[list[Header], bytes]:
        """Anthropic's error shape, which its SDK reads."""
        body = {"type": "error", "error": {"type": _error_kind(exc), "message": exc.message}}
        return [*JSON_HEADERS, *exc.headers], orjson.dumps(body)

    def stream_error(
        self, message: str, type: str, code: str, chunk_filter: ChunkFilter | None = None
    ) -> bytes:
        body = {"type": "error", "error": {"type": "api_error", "message": message}}
        return named_event("error", body) + DONE_EVENT

    def stream_refusal(self, exc: ApiError, relayed: dict[str, object] | None = None) -> bytes:
        """Anthropic's error event, its type by status as in `error_response`
        (`overloaded_error` for 503, `rate_limit_error` for 429): the SDKs read it."""
        body = {"type": "error", "error": {"type": _error_kind(exc), "message": exc.message}}
        return named_event("error", body) + DONE_EVENT
