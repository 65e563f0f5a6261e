"""Relaying a complete (non-stream) response, or a backend's error answer to a stream
request: read it whole (bounded), record usage and finish reason, apply the guard to each
choice's text, and answer with the backend's status."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import orjson

from . import lenientjson
from .errors import ApiError, bad_gateway, retry_headers
from .exchange import Exchange
from .http import Header, Response
from .snapshot import StreamPolicy
from .stopwords import GuardSpec
from .tokendetails import drop_token_details
from .upstream import UpstreamConnection, UpstreamError

MAX_NONSTREAM_BODY: Final = 64 * 1024 * 1024
# Backend answers that tell the client to come back later: relayed with a Retry-After.


async def relay_whole(
    ex: Exchange,
    conn: UpstreamConnection,
    response: Response,
    policy: StreamPolicy,
    extra_headers: list[Header],
    rewrite: Callable[[Any, StreamPolicy, Exchange], Any] | None = None,
    reshape_errors: bool = False,
    retry_after: Callable[[], int] | None = None,
) -> bool:
    """A non-stream response, or a backend error answered to a stream request. A 429 or
    503 carries a Retry-After: the backend's own, else `retry_after()` (sluice's estimate
    from the backend's observed service time), so SDKs do not retry at once."""
    try:
        body = await conn.read_all(MAX_NONSTREAM_BODY)
    except UpstreamError as exc:
        ex.upstream_error = exc.kind
        raise bad_gateway(f"backend response broke: {exc}", code="upstream_" + exc.kind) from None
    status = conn.status
    ex.status = status
    retry = retry_headers(status, conn.headers.get(b"retry-after"), retry_after)
    if response.head_only:
        # A HEAD's answer has no body to read, judge or rewrite: its status, type and
        # length go out as the backend gave them (the length a GET's body would have).
        typed = conn.headers.get(b"content-type")
        headers = [(b"content-type", typed)] if typed is not None else []
        response.send_head(
            status, [*headers, *retry, *extra_headers], conn.headers.get(b"content-length")
        )
        return conn.complete
    content_type = conn.headers.get(b"content-type", b"application/json")
    is_json = content_type.lower().startswith(b"application/json")  # a media type's case
    if status == 200 and (is_json or rewrite is not None):
        # An adapter that translates the answer (TGI) sees a body of another type as
        # None: it cannot pass on what it cannot read. The others leave it as it came.
        obj = lenientjson.read(body) if is_json else None  # a lone surrogate too: guarded
        if rewrite is not None:  # an endpoint adapter: its own guard and reply shape
            rewritten = rewrite(obj, policy, ex)
            if rewritten is not None:
                body = lenientjson.write(rewritten)
        elif isinstance(obj, dict):
            ex.record_usage(obj.get("usage"))
            record_finish(ex, obj)
            if policy.guard is not None and guard_completion(obj, policy.guard, ex.chat, ex):
                body = lenientjson.write(obj)
    elif status >= 400 and not _is_openai_error(body):
        ex.upstream_error = f"http_{status}"
        message = body[:200].decode("utf-8", "replace").strip() or f"HTTP {status}"
        if status >= 500:
            raise ApiError(
                502 if status != 503 else 503,
                f"backend answered {status}: {message}",
                type="upstream_error",
                code=f"upstream_http_{status}",
                headers=retry,
            )
        raise ApiError(
            status,
            f"backend answered {status}: {message}",
            code="upstream_error",
            headers=retry,
        )
    if status >= 400 and reshape_errors:
        # The backend's OpenAI-shaped error, for an endpoint that answers errors in its
        # own protocol's shape (TGI): the caller's adapter writes it.
        ex.upstream_error = f"http_{status}"
        error = orjson.loads(body)["error"]
        message = str(error.get("message") or f"backend answered {status}")
        raise ApiError(status, message, code=f"upstream_http_{status}", headers=retry)
    response.send(status, [(b"content-type", content_type), *retry, *extra_headers], body)
    return conn.complete


def guard_completion(body: dict[str, Any], spec: GuardSpec, chat: bool, ex: Exchange) -> bool:
    """Applies the guard to a non-stream response body in place; True when changed. A chat
    message's texts are read in the order they were generated: its reasoning, its content,
    then each tool call's arguments; the first match cuts there and drops what follows."""
    changed = False
    choices = body.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        holder = choice.get("message") if chat else choice
        if not isinstance(holder, dict):
            continue
        for container, key in _texts(holder, chat):
            result = spec.apply(container[key])
            if result.finish_reason is None:
                continue
            container[key] = result.text
            if chat:
                _drop_after(holder, container, key)
            choice["finish_reason"] = result.finish_reason
            choice["stop_reason"] = result.matched
            drop_token_details(choice)
            ex.finish_reason = result.finish_reason
            ex.cut = result.matched
            changed = True
            break
    return changed


def _texts(holder: dict[str, Any], chat: bool) -> list[tuple[dict[str, Any], str]]:
    """Where a message's (or completion choice's) non-empty texts are, in generation order."""
    if not chat:
        keys = ["text"]
    else:
        keys = ["reasoning" if "reasoning" in holder else "reasoning_content", "content"]
    found = [(holder, key) for key in keys if isinstance(holder.get(key), str) and holder[key]]
    calls = holder.get("tool_calls") if chat else None
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            arguments = function.get("arguments")
            if isinstance(arguments, str) and arguments:
                found.append((function, "arguments"))
    return found


def _drop_after(holder: dict[str, Any], cut: dict[str, Any], key: str) -> None:
    """Takes out of a chat message the texts generated after the one the guard cut
    (`cut[key]`): nothing after a match was sent."""
    if cut is holder and key != "content" and holder.get("content"):
        holder["content"] = None  # cut in the reasoning
    calls = holder.get("tool_calls")
    if not isinstance(calls, list):
        return
    if cut is holder:
        holder["tool_calls"] = []
        return
    for at, call in enumerate(calls):
        if isinstance(call, dict) and call.get("function") is cut:
            del calls[at + 1 :]
            return


def _is_openai_error(body: bytes) -> bool:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("error"), dict)


def record_finish(ex: Exchange, obj: dict[str, Any]) -> None:
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        finish = choices[0].get("finish_reason")
        if isinstance(finish, str):
            ex.finish_reason = finish
