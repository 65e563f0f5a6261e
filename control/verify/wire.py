"""The wire shapes sluice's chunk filter relies on, checked on a live backend's answers.

Two levels: what the filter *needs* (a role chunk first, a finish chunk, the usage chunk last
before `[DONE]`, OpenAI-shaped error bodies) fails the check; everything else about a chunk
(its keys, their order, value types) is compared field by field with what vLLM 0.26 sends
and reported as drift, since sluice passes unknown fields through but its token fast path
matches vLLM's exact key order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

# The chunk filter's own fast-path patterns: a backend whose token chunks miss them is served
# correctly but parsed (more CPU), which verify reports.
from sluice.proxy.chunks import _CHAT_TEXT, _COMPLETION_TEXT

DONE = "[DONE]"

# vLLM 0.26.0's chunks and bodies as (key, type) trees, read off the recorded transcripts
# (01a, 01b, 03a, 05a). A list stands for "list of this"; [] for an empty list.
_S, _I, _N = "str", "int", "null"
CHAT_ROLE = {
    "id": _S, "object": _S, "created": _I, "model": _S,
    "choices": [{"index": _I, "delta": {"role": _S, "content": _S}, "logprobs": _N,
                 "finish_reason": _N}],
    "prompt_token_ids": _N, "prompt_text": _N,
}  # fmt: skip
CHAT_CONTENT = {
    "id": _S, "object": _S, "created": _I, "model": _S,
    "choices": [{"index": _I, "delta": {"content": _S}, "logprobs": _N, "finish_reason": _N,
                 "token_ids": _N}],
}  # fmt: skip
CHAT_FINAL = {
    "id": _S, "object": _S, "created": _I, "model": _S,
    "choices": [{"index": _I, "delta": {"content": _S}, "logprobs": _N, "finish_reason": _S,
                 "stop_reason": _N, "token_ids": _N}],
}  # fmt: skip
USAGE = {
    "id": _S, "object": _S, "created": _I, "model": _S, "choices": [],
    "usage": {"prompt_tokens": _I, "total_tokens": _I, "completion_tokens": _I},
    "system_fingerprint": _S,
}  # fmt: skip
_CMPL_CHOICE = {"index": _I, "text": _S, "logprobs": _N, "finish_reason": _N, "stop_reason": _N,
                "prompt_token_ids": _N, "token_ids": _N}  # fmt: skip
CMPL_CONTENT = {"id": _S, "object": _S, "created": _I, "model": _S, "choices": [_CMPL_CHOICE]}
CMPL_FINAL = {
    "id": _S, "object": _S, "created": _I, "model": _S,
    "choices": [{**_CMPL_CHOICE, "finish_reason": _S}],
}  # fmt: skip
ERROR = {"error": {"message": _S, "type": _S, "param": _S, "code": _I}}


def type_name(value: Any) -> str:
    if value is None:
        return _N
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return _I
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return _S
    return type(value).__name__


def diff(reference: Any, actual: Any, path: str = "") -> list[str]:
    """Field-by-field differences of `actual` from `reference`: missing and extra keys,
    key order, value types (a null where a string was, or back, is no drift: finish and
    stop reasons are either)."""
    where = path or "(top)"
    if isinstance(reference, dict):
        if not isinstance(actual, dict):
            return [f"{where}: expected an object, got {type_name(actual)}"]
        out = [f"{where}: missing key {key!r}" for key in reference if key not in actual]
        out += [f"{where}: extra key {key!r}" for key in actual if key not in reference]
        common_ref = [k for k in reference if k in actual]
        common_act = [k for k in actual if k in reference]
        if common_ref != common_act:
            out.append(f"{where}: key order {common_act} (vLLM 0.26: {common_ref})")
        for key in common_ref:
            out += diff(reference[key], actual[key], f"{path}.{key}" if path else key)
        return out
    if isinstance(reference, list):
        if not isinstance(actual, list):
            return [f"{where}: expected a list, got {type_name(actual)}"]
        if not reference or not actual:
            if bool(reference) == bool(actual):
                return []
            return [f"{where}: {'an empty' if not actual else 'a non-empty'} list"]
        return diff(reference[0], actual[0], f"{path}[0]")
    got = type_name(actual)
    if got != reference and {got, reference} not in ({_S, _N}, {_I, _N}):
        return [f"{where}: type {got} (vLLM 0.26: {reference})"]
    return []


@dataclass
class StreamFindings:
    """What one stream's events show: `problems` break sluice, `drift` is informational."""

    problems: list[str] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)
    fast_path_misses: int = 0
    content_chunks: int = 0


def parse_events(raw: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, in order (comments and other fields dropped)."""
    out = []
    for event in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                out.append(line[5:].strip().decode("utf-8", "replace"))
    return out


def check_stream(raw: bytes, *, chat: bool, usage: bool) -> StreamFindings:
    """The shapes of one single-choice stream requested with `include_usage` = `usage`."""
    found = StreamFindings()
    payloads = parse_events(raw)
    if not payloads or payloads[-1] != DONE:
        found.problems.append("the stream does not end with `data: [DONE]`")
    events: list[dict[str, Any]] = []
    for text in payloads:
        if text == DONE:
            continue
        try:
            event = orjson.loads(text)
        except orjson.JSONDecodeError:
            found.problems.append(f"an event is not JSON: {text[:80]!r}")
            continue
        if isinstance(event, dict):
            events.append(event)
    if not events:
        found.problems.append("no JSON events before [DONE]")
        return found
    kind_ref = _chat_reference if chat else _completion_reference
    seen: set[str] = set()
    for position, event in enumerate(events):
        kind, reference = kind_ref(event, first=position == 0)
        if kind == "error":
            found.problems.append(f"mid-stream error event: {str(event)[:200]}")
            continue
        if kind not in seen:  # the first of each kind carries the comparison
            seen.add(kind)
            found.drift += [f"{kind} chunk: {line}" for line in diff(reference, event)]
        if kind == "content":
            found.content_chunks += 1
            pattern = _CHAT_TEXT if chat else _COMPLETION_TEXT
            body = orjson.dumps(event)
            if _has_text(event, chat) and not pattern.search(body):
                found.fast_path_misses += 1
    if chat and _chat_reference(events[0], first=True)[0] != "role":
        found.problems.append("the first chunk is not the role chunk (delta.role 'assistant')")
    if "final" not in seen:
        found.problems.append("no chunk carries a finish_reason")
    if usage:
        last = events[-1]
        if last.get("choices") != [] or not _usage_ok(last.get("usage")):
            found.problems.append(
                "no usage chunk (`choices: []` with integer prompt/completion/total tokens) "
                "last before [DONE] although stream_options.include_usage was set"
            )
    return found


def _has_text(event: dict[str, Any], chat: bool) -> bool:
    choice = event["choices"][0]
    value = choice.get("delta", {}).get("content") if chat else choice.get("text")
    return isinstance(value, str) and value != ""


def _usage_ok(usage: Any) -> bool:
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return isinstance(usage, dict) and all(isinstance(usage.get(k), int) for k in keys)


def _chat_reference(event: dict[str, Any], *, first: bool) -> tuple[str, Any]:
    if "error" in event:
        return "error", None
    choices = event.get("choices")
    if choices == []:
        return "usage", USAGE
    choice = choices[0] if isinstance(choices, list) and choices else {}
    if first and isinstance(choice, dict) and choice.get("delta", {}).get("role") == "assistant":
        return "role", CHAT_ROLE
    if isinstance(choice, dict) and choice.get("finish_reason") is not None:
        return "final", CHAT_FINAL
    return "content", CHAT_CONTENT


def _completion_reference(event: dict[str, Any], *, first: bool) -> tuple[str, Any]:
    del first
    if "error" in event:
        return "error", None
    choices = event.get("choices")
    if choices == []:
        return "usage", USAGE
    choice = choices[0] if isinstance(choices, list) and choices else {}
    if isinstance(choice, dict) and choice.get("finish_reason") is not None:
        return "final", CMPL_FINAL
    return "content", CMPL_CONTENT


def check_error_body(
    status: int, body: bytes, *, code_is_status: bool = True
) -> tuple[list[str], list[str]]:
    """(problems, drift) of an error answer: sluice relays `{"error": {...}}` bodies and
    reads their `code`; it needs the object, a message and (vLLM's, `code_is_status`) a
    code equal to the status. sluice's own errors carry OpenAI's string codes."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return [f"HTTP {status} with a body that is not JSON: {body[:120]!r}"], []
    error = value.get("error") if isinstance(value, dict) else None
    if not isinstance(error, dict):
        return [f"HTTP {status} body is not {{'error': {{...}}}}: {body[:160]!r}"], []
    problems = []
    if not isinstance(error.get("message"), str):
        problems.append("error.message is not a string")
    if code_is_status and error.get("code") != status:
        problems.append(f"error.code {error.get('code')!r} differs from the HTTP status {status}")
    return problems, [f"error body: {line}" for line in diff(ERROR, value)]
