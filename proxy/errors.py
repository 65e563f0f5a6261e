"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`.

Every error a client sees from the proxy has this shape and a precise status; the terminal
event of a broken stream carries the same object inside an SSE `data:` line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import orjson

from .response import JSON_HEADERS, Header, Response
from .sse import DONE_EVENT, SEPARATOR


class ApiError(Exception):
    """An error answered to the client as OpenAI-shaped JSON with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: list[Header] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or []

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str, code: str | int | None, param: str | None = None) -> bytes:
    """The one error body of the API (vLLM's own errors carry the status as `code`)."""
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def error_event(message: str, type: str, code: str) -> bytes:
    """The terminal SSE event of a stream that cannot finish normally, with `[DONE]` after."""
    return b"data: " + error_body(message, type, code) + SEPARATOR + DONE_EVENT


def refusal_event(exc: ApiError, relayed: dict[str, object] | None = None) -> bytes:
    """A refusal after the SSE head went out early (a keep-alive): the stream's terminal
    error event, with the retry delay inside the error object, since headers are gone.
    `relayed`: the backend's own error object, passed on as it came."""
    error: dict[str, object] = (
        dict(relayed)
        if relayed is not None
        else {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
    )
    delay = retry_after_of(exc)
    if delay is not None and "retry_after" not in error:
        error["retry_after"] = delay
    return b"data: " + orjson.dumps({"error": error}) + SEPARATOR + DONE_EVENT


RETRY_STATUSES: Final = (429, 503)


def retry_headers(
    status: int, given: bytes | None, estimate: Callable[[], int] | None
) -> list[Header]:
    """The Retry-After of a backend's refusal (429, 503; none for another status): the
    backend's own delay in seconds, else `estimate()` (sluice's, from the backend's
    service time), else 1, so that SDKs do not retry at once. An HTTP date is not passed
    on: the backend's clock is not the client's, and a stream's error event carries
    seconds."""
    if status not in RETRY_STATUSES:
        return []
    if given is None or not given.isdigit():
        given = str(estimate() if estimate is not None else 1).encode()
    return [(b"retry-after", given)]


def retry_after_of(exc: ApiError) -> int | None:
    """The error's Retry-After header in seconds, when it has one."""
    retry = next((v for k, v in exc.headers if k == b"retry-after"), None)
    return int(retry) if retry is not None and retry.isdigit() else None


def server_error_body(status: int, message: str, code: str) -> bytes:
    """Errors written by the HTTP layer itself (bad framing, 413, 408...)."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return error_body(message, kind, code)


def send_error(response: Response, exc: ApiError, extra: list[Header] | None = None) -> None:
    headers = JSON_HEADERS + exc.headers
    if extra:
        headers = headers + extra
    response.send(exc.status, headers, exc.body())


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def json_type(value: object) -> str:
    """How OpenAI's errors name a JSON value's type ("a string", "an integer")."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null" if value is None else "a value"


def not_found(message: str, code: str = "not_found", param: str | None = None) -> ApiError:
    return ApiError(404, message, code=code, param=param)


def method_not_allowed(method: str, path: str, allowed: str) -> ApiError:
    return ApiError(
        405,
        f"method {method} is not allowed on {path}; use {allowed}",
        code="method_not_allowed",
        headers=[(b"allow", allowed.encode())],
    )


def bad_gateway(message: str, code: str = "upstream_unavailable") -> ApiError:
    return ApiError(502, message, type="upstream_error", code=code)
