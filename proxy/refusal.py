"""A refused request's answer: the error in the endpoint's own shape with its precise
status (429 for an app's limit, 503 for a saturated backend or a shutdown), or, once the
SSE head went out early (a keep-alive), the stream's terminal error event."""

from __future__ import annotations

from .adapters import Adapter
from .errors import ApiError
from .exchange import Exchange
from .http import Header, Response
from .keepalive import error_as_event
from .limits import LimitExceeded


def answer_refusal(
    response: Response,
    ex: Exchange,
    exc: ApiError | LimitExceeded,
    headers: list[Header],
    adapter: Adapter,
) -> None:
    """Answers a refused request: its error (in the endpoint's shape) with the precise
    status."""
    if isinstance(exc, ApiError):
        ex.status = exc.status
        ex.error_code = exc.code
        refuse(response, exc, headers, adapter)
        return
    if exc.reason == "shutdown":
        ex.status = 503
        ex.error_code = "shutdown"
        error = ApiError(
            503,
            "the proxy is shutting down; retry the request",
            type="server_error",
            code="shutdown",
            headers=[(b"retry-after", b"1")],
        )
        refuse(response, error, headers, adapter)
        return
    app_limit = exc.limiter.startswith("app:")
    status = 429 if app_limit else 503
    ex.status = status
    ex.error_code = exc.reason
    what = "this app's concurrency limit" if app_limit else "the backend"
    why = "its queue is full" if exc.reason == "queue_full" else "the queue wait expired"
    error = ApiError(
        status,
        f"{what} is saturated: {why}; retry after {exc.retry_after}s",
        type="rate_limit_error" if app_limit else "server_error",
        code="app_concurrency_limit" if app_limit else "backend_saturated",
        headers=[(b"retry-after", str(exc.retry_after).encode())],
    )
    refuse(response, error, headers, adapter)


def refuse(response: Response, exc: ApiError, headers: list[Header], adapter: Adapter) -> None:
    """The error answer, or, after the SSE head went out early, the terminal error event."""
    if not response.started:
        error_headers, body = adapter.error_response(exc)
        response.send(exc.status, error_headers + headers, body)
    else:
        error_as_event(response, exc, adapter.stream_refusal)
