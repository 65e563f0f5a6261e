"""`POST /v1/responses` (the OpenAI Responses API vLLM serves): the adapter.

The preset goes out in the Responses vocabulary (`max_output_tokens` for `max_tokens`;
vLLM's extra fields `top_k`, `repetition_penalty`, `seed`, `stop` by their own names).
The guard reads `response.output_text.delta` events; because the closing events repeat
the whole text (`response.output_text.done`, `response.content_part.done`,
`response.output_item.done`, `response.completed`), each is rewritten to the text the
client was actually sent. A cut stream is closed with those events, synthesized from the
`response.created` object: status `completed` for a stop string, `incomplete` with
`incomplete_details.reason: content_filter` for a cut pattern.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, ClassVar, Final

from .adapters import Adapter
from .chunks import ChunkFilter
from .errors import ApiError, retry_after_of
from .eventfilter import NamedEventFilter, named_event
from .exchange import Exchange
from .snapshot import StreamPolicy
from .stopwords import GuardResult, GuardSpec, StreamGuard
from .timeouts import StreamWatchdog

_TERMINAL: Final = (b"response.completed", b"response.incomplete", b"response.failed")
# The text parts the guard reads: the answer's and a reasoning model's reasoning (vLLM is
# sent the policy's stop strings, never its cut patterns: only sluice keeps those out).
_TEXT_PARTS: Final = ("output_text", "reasoning_text")
_DELTAS: Final = {"response.output_text.delta": "output_text",
                  "response.reasoning_text.delta": "reasoning_text",
                  "response.function_call_arguments.delta": "function_call_arguments"}  # fmt: skip
_DONES: Final = (
    "response.output_text.done",
    "response.reasoning_text.done",
    "response.function_call_arguments.done",
)
_CALL: Final = "function_call_arguments"  # a function call's arguments: text of the item


def _key(obj: dict[str, Any]) -> int | None:
    output_index = obj.get("output_index", 0)
    content_index = obj.get("content_index", 0)
    if not isinstance(output_index, int) or not isinstance(content_index, int):
        return None
    return output_index * 1024 + content_index


def _record(ex: Exchange, response: Any) -> None:
    if not isinstance(response, dict):
        return
    usage = response.get("usage")
    if isinstance(usage, dict):
        ex.record_usage(
            {
                "prompt_tokens": usage.get("input_tokens"),
                "completion_tokens": usage.get("output_tokens"),
            }
        )
    status = response.get("status")
    if status == "completed":
        ex.finish_reason = "stop"
    elif status == "incomplete":
        details = response.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        ex.finish_reason = "length" if reason == "max_output_tokens" else str(reason)


def _set_texts(response: dict[str, Any], texts: dict[int, str]) -> None:
    """Puts the released text into every output_text part of a response object."""
    output = response.get("output")
    if not isinstance(output, list):
        return
    for output_index, item in enumerate(output):
        if isinstance(item, dict) and item.get("type") == "function_call":
            key = output_index * 1024
            if key in texts and "arguments" in item:
                item["arguments"] = texts[key]
            continue
        if not isinstance(item, dict) or not isinstance(item.get("content"), list):
            continue
        for content_index, part in enumerate(item["content"]):
            key = output_index * 1024 + content_index
            if isinstance(part, dict) and part.get("type") in _TEXT_PARTS and key in texts:
                part["text"] = texts[key]
                if part.get("logprobs"):
                    part["logprobs"] = []


def _cut_whole(
    obj: dict[str, Any], output: list[Any], output_index: int, result: GuardResult, ex: Exchange
) -> dict[str, Any]:
    """A whole response cut in its item `output_index`: the items after it go."""
    del output[output_index + 1 :]
    if result.finish_reason == "content_filter":
        obj["status"] = "incomplete"
        obj["incomplete_details"] = {"reason": "content_filter"}
    ex.finish_reason = result.finish_reason
    ex.cut = result.matched
    return obj


def _error_event(
    code: str | None,
    message: str,
    param: str | None,
    sequence: int,
    retry_after: int | None = None,
) -> bytes:
    """A Responses API stream's `error` event (OpenAI's ResponseErrorEvent); a refusal's
    retry delay, when it has one, as `retry_after` (its headers are gone)."""
    error: dict[str, object] = {"code": code, "message": message, "param": param}
    if retry_after is not None:
        error["retry_after"] = retry_after
    error["sequence_number"] = sequence
    error["type"] = "error"
    return named_event("error", error)


class ResponsesFilter(NamedEventFilter):
    __slots__ = ("base", "calls", "items", "kinds", "sequence")
    delta_marker = b'.delta"'

    def __init__(
        self, ex: Exchange, guard_spec: GuardSpec | None, watchdog: StreamWatchdog | None
    ) -> None:
        super().__init__(ex, guard_spec, watchdog)
        self.base: dict[str, Any] = {}  # the response object of response.created
        self.items: dict[int, str] = {}  # guard key -> item id
        self.kinds: dict[int, str] = {}  # guard key -> its part's type (_TEXT_PARTS, _CALL)
        self.calls: dict[int, dict[str, Any]] = {}  # output index -> its function_call item
        # The last sequence_number sent (the first event's is 0). Unguarded, events go out
        # as they came and are counted; guarded, each one sent is numbered here (`_pass`),
        # so the events sluice adds shift the backend's after them.
        self.sequence = -1

    def is_terminal(self, event: bytes) -> bool:
        return any(event.find(marker) >= 0 for marker in _TERMINAL)

    def observe(self, event: bytes, text: str = "") -> bytes:
        # Unguarded, most events are not parsed: their sequence numbers run on from 0, one
        # an event, so counting them numbers an error sluice adds after them.
        if not event.startswith(b":"):  # a comment (a keep-alive) has none
            self.sequence += 1
        return super().observe(event, text)

    def bookkeep(self, name: str, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        if name == "response.created" and isinstance(obj.get("response"), dict):
            self.base = obj["response"]
        elif name == "response.output_item.added":
            item, output_index = obj.get("item"), obj.get("output_index")
            called = isinstance(item, dict) and item.get("type") == "function_call"
            if called and isinstance(item, dict) and isinstance(output_index, int):
                self.calls[output_index] = item
        elif name in ("response.completed", "response.incomplete", "response.failed"):
            _record(self.ex, obj.get("response"))
            self.done = True
        elif name == "error":
            self.upstream_error = True
            self.ex.upstream_error = "stream_error"

    def on_named(self, event: bytes, name: str, obj: Any) -> bytes | None:
        if not isinstance(obj, dict):
            return event  # not an event of this vocabulary: no number
        kind = _DELTAS.get(name)
        if kind is not None:
            key = _key(obj)
            text = obj.get("delta")
            if key is None or not isinstance(text, str):
                return self._pass(event, name, obj)
            self.kinds[key] = kind
            if isinstance(obj.get("item_id"), str):
                self.items[key] = obj["item_id"]
            out, guard = self.feed_text(key, text)
            if guard.finish_reason is not None:
                return self._end(key, obj, out, guard)
            if out is text:
                return self._pass(event, name, obj)
            obj["delta"] = out
            if obj.get("logprobs"):
                obj["logprobs"] = []
            return self._renumbered(name, obj)
        if name in _DONES:
            key = _key(obj)
            if key is None or key not in self.guards:
                return self._pass(event, name, obj)
            tail = self.finish_text(key)
            prefix = b""
            if tail is not None:
                out, guard = tail
                if guard.finish_reason is not None:
                    return self._end(key, obj, out, guard)
                if out:
                    prefix = self._delta(key, obj, out)
            obj["arguments" if name == "response.function_call_arguments.done" else "text"] = (
                self.text_of(key)
            )
            return prefix + self._renumbered(name, obj)
        if name == "response.content_part.done":
            key = _key(obj)
            part = obj.get("part")
            if key in self.guards and isinstance(part, dict) and "text" in part:
                part["text"] = self.text_of(key)
                return self._renumbered(name, obj)
            return self._pass(event, name, obj)
        if name == "response.output_item.done":
            item = obj.get("item")
            output_index = obj.get("output_index", 0)
            if isinstance(item, dict) and isinstance(output_index, int):
                holder = {"output": [None] * output_index + [item]}
                _set_texts(holder, self._texts())
                return self._renumbered(name, obj)
            return self._pass(event, name, obj)
        terminal = name in ("response.completed", "response.incomplete")
        if terminal and self.guards and isinstance(obj.get("response"), dict):
            _set_texts(obj["response"], self._texts())
            return self._renumbered(name, obj)
        return self._pass(event, name, obj)

    def _pass(self, event: bytes, name: str, obj: dict[str, Any]) -> bytes:
        """A backend event sent as it came, unless events sluice added before it shifted
        its number."""
        number = self._next()
        if obj.get("sequence_number", number) == number:
            return event
        obj["sequence_number"] = number
        return named_event(name, obj)

    def _renumbered(self, name: str, obj: dict[str, Any]) -> bytes:
        """A backend event sluice changed, numbered after what went out before it."""
        number = self._next()
        if "sequence_number" in obj:
            obj["sequence_number"] = number
        return named_event(name, obj)

    def _texts(self) -> dict[int, str]:
        return {key: self.text_of(key) for key in self.guards}

    def _next(self) -> int:
        self.sequence += 1
        return self.sequence

    def _delta(self, key: int, like: dict[str, Any], text: str) -> bytes:
        kind = self.kinds.get(key, "output_text")
        name = f"response.{kind}.delta"
        obj: dict[str, Any] = {} if kind == _CALL else {"content_index": key % 1024}
        obj["delta"] = text
        obj["item_id"] = self.items.get(key, like.get("item_id", ""))
        if kind == "output_text":
            obj["logprobs"] = []
        obj.update(output_index=key // 1024, sequence_number=self._next(), type=name)
        return named_event(name, obj)

    def _end(self, key: int, like: dict[str, Any], out: str, guard: StreamGuard) -> bytes:
        """Closes the cut text part, its item (the message, the reasoning, or the function
        call) and the response."""
        self.cut(key, guard)
        text = self.text_of(key)
        item_id = self.items.get(key, like.get("item_id", ""))
        output_index, content_index = key // 1024, key % 1024
        kind = self.kinds.get(key, "output_text")
        events = [self._delta(key, like, out)] if out else []  # numbered before the done
        if kind == _CALL:
            item = {**self.calls.get(output_index, {}), "arguments": text, "status": "completed"}
            item.setdefault("id", item_id)
            item.setdefault("type", "function_call")
            done: dict[str, Any] = {"arguments": text, "item_id": item_id,
                                    "output_index": output_index}  # fmt: skip
            done.update(sequence_number=self._next(), type=f"response.{kind}.done")
            events.append(named_event(done["type"], done))
        else:
            part: dict[str, Any]
            if kind == "output_text":
                part = {"annotations": [], "text": text, "type": kind, "logprobs": None}
                item = {"id": item_id, "content": [part], "role": "assistant",
                        "status": "completed", "type": "message"}  # fmt: skip
            else:
                part = {"text": text, "type": kind}
                item = {"id": item_id, "content": [part], "summary": [], "type": "reasoning",
                        "status": "completed"}  # fmt: skip
            done = {"content_index": content_index, "item_id": item_id}
            if kind == "output_text":
                done["logprobs"] = []
            done.update(output_index=output_index, sequence_number=self._next(), text=text)
            done["type"] = f"response.{kind}.done"
            events.append(named_event(done["type"], done))
            events.append(
                named_event(
                    "response.content_part.done",
                    {"content_index": content_index, "item_id": item_id,
                     "output_index": output_index, "part": part,
                     "sequence_number": self._next(), "type": "response.content_part.done"},
                )
            )  # fmt: skip
        events.append(
            named_event(
                "response.output_item.done",
                {"item": item, "output_index": output_index, "sequence_number": self._next(),
                 "type": "response.output_item.done"},
            )
        )  # fmt: skip
        response = dict(self.base)
        filtered = guard.finish_reason == "content_filter"
        response["status"] = "incomplete" if filtered else "completed"
        response["incomplete_details"] = {"reason": "content_filter"} if filtered else None
        response["output"] = [item]
        response.setdefault("created_at", int(time.time()))
        kind = "response.incomplete" if filtered else "response.completed"
        events.append(
            named_event(kind, {"response": response, "sequence_number": self._next(), "type": kind})
        )
        return b"".join(events)


class ResponsesAdapter(Adapter):
    name = "/v1/responses"
    upstream_path = b"/v1/responses"
    resumable = False
    vocabulary: ClassVar[Mapping[str, str]] = {
        "max_tokens": "max_output_tokens",
        "temperature": "temperature",
        "top_p": "top_p",
        "top_k": "top_k",
        "repetition_penalty": "repetition_penalty",
        "seed": "seed",
        "stop": "stop",
    }

    def n_choices(self, body: dict[str, Any]) -> int:
        return 1

    def names_stored_response(self, body: dict[str, Any]) -> bool:
        return isinstance(body.get("previous_response_id"), str)

    def stream_error(
        self, message: str, type: str, code: str, chunk_filter: ChunkFilter | None = None
    ) -> bytes:
        """The Responses API's `error` event, numbered after the events relayed; no
        `[DONE]` (its streams have none)."""
        sequence = chunk_filter._next() if isinstance(chunk_filter, ResponsesFilter) else 0
        return _error_event(code, message, None, sequence)

    def stream_refusal(self, exc: ApiError, relayed: dict[str, object] | None = None) -> bytes:
        """A refusal after the SSE head went out early (only keep-alive comments before
        it): the `error` event, the backend's own code and message when it gave them, and
        the retry delay (headers are gone) as `retry_after`."""
        code, message, param = exc.code, exc.message, exc.param
        if relayed is not None:
            code = str(relayed.get("code") or code)
            message = str(relayed.get("message") or message)
            relayed_param = relayed.get("param")
            param = relayed_param if isinstance(relayed_param, str) else None
        return _error_event(code, message, param, 0, retry_after_of(exc))

    def chunk_filter(
        self, ex: Exchange, policy: StreamPolicy, n_choices: int, watchdog: StreamWatchdog | None
    ) -> ChunkFilter:
        return ResponsesFilter(ex, policy.guard, watchdog)

    def rewrite_body(self, obj: Any, policy: StreamPolicy, ex: Exchange) -> Any | None:
        if not isinstance(obj, dict):
            return None
        _record(ex, obj)
        spec = policy.guard
        output = obj.get("output")
        if spec is None or not isinstance(output, list):
            return None
        for output_index, item in enumerate(output):
            if isinstance(item, dict) and item.get("type") == "function_call":
                arguments = item.get("arguments")
                result = spec.apply(arguments) if isinstance(arguments, str) else None
                if result is not None and result.finish_reason is not None:
                    item["arguments"] = result.text
                    return _cut_whole(obj, output, output_index, result, ex)
                continue
            if not isinstance(item, dict) or not isinstance(item.get("content"), list):
                continue
            for content_index, part in enumerate(item["content"]):
                if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
                    continue
                text = part.get("text")
                if not isinstance(text, str):
                    continue
                result = spec.apply(text)
                if result.finish_reason is None:
                    continue
                part["text"] = result.text
                if part.get("logprobs"):
                    part["logprobs"] = []
                del item["content"][content_index + 1 :]
                return _cut_whole(obj, output, output_index, result, ex)
        return None
