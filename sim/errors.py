"""Error responses shaped as vLLM 0.26 sends them (transcripts 05_errors.txt).

Three families: the OpenAI shape `{"error":{"message","type","param","code"}}` with the
exception class as `type` (BadRequestError, NotFoundError); FastAPI's request-validation
errors re-shaped by vLLM into the same envelope with type "Bad Request" and a message that
is the Python repr of pydantic's error dict; and FastAPI's own `{"detail": ...}` for wrong
routes and methods, which vLLM leaves unwrapped.
"""

from __future__ import annotations

from http import HTTPStatus

import orjson
from sluice.proxy.errors import error_body
from sluice.proxy.response import JSON_HEADERS, Header

# vLLM names `type` after the exception it raised.
_TYPES = {
    400: "BadRequestError",
    401: "UnauthorizedError",
    403: "ForbiddenError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    413: "RequestEntityTooLargeError",
    429: "TooManyRequestsError",
    500: "InternalServerError",
    501: "NotImplementedError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


class ApiError(Exception):
    """A complete error response; raised by validation, sent by the server."""

    def __init__(self, status: int, body: bytes, headers: list[Header] | None = None) -> None:
        super().__init__(body.decode("utf-8", "replace"))
        self.status = status
        self.body = body
        self.headers = JSON_HEADERS if headers is None else headers


class VLLMValidationError:
    """Stands in for vLLM's exception inside a repr'd pydantic error (`ctx.error`)."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"VLLMValidationError({self.message!r})"


def error_type(status: int) -> str:
    known = _TYPES.get(status)
    if known is not None:
        return known
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "Error"
    return phrase.replace(" ", "").replace("-", "") + "Error"


def error_json(status: int, message: str, type_: str, param: str | None) -> bytes:
    return error_body(message, type_, status, param)


def api_error(status: int, message: str, param: str | None = None) -> ApiError:
    return ApiError(status, error_json(status, message, error_type(status), param))


def simulated_status(status: int, retry_after: int | None) -> ApiError:
    """The error `sim.status` asks for, with `sim.retry_after` as its Retry-After."""
    error = api_error(status, f"simulated error (sim.status={status})")
    if retry_after is not None:
        error.headers = [*error.headers, (b"retry-after", b"%d" % retry_after)]
    return error


def bad_request(message: str, param: str | None = None) -> ApiError:
    return api_error(400, message, param)


def param_error(message: str, param: str, value: object) -> ApiError:
    """vLLM's sampling-parameter errors end with `(parameter=..., value=...)`."""
    return bad_request(f"{message} (parameter={param}, value={value})", param)


def model_not_found(model: str) -> ApiError:
    return api_error(404, f"The model `{model}` does not exist.", "model")


def validation_error(error: dict[str, object], param: str | None) -> ApiError:
    """A FastAPI RequestValidationError as vLLM renders it: status 400, type "Bad Request"."""
    message = "1 validation error:\n  " + repr(error)
    return ApiError(400, error_json(400, message, "Bad Request", param))


def field_error(kind: str, loc: tuple[str | int, ...], msg: str, value: object) -> ApiError:
    """One pydantic field error; `param` is the dotted location, as vLLM reports it."""
    error: dict[str, object] = {"type": kind, "loc": loc, "msg": msg, "input": value}
    return validation_error(error, ".".join(str(part) for part in loc))


def model_value_error(message: str, param: str, body: object) -> ApiError:
    """A `mode="before"` model validator of vLLM's request classes raised."""
    error: dict[str, object] = {
        "type": "value_error",
        "loc": ("body",),
        "msg": f"Value error, {message} (parameter={param})",
        "input": body,
        "ctx": {"error": VLLMValidationError(message)},
    }
    return validation_error(error, param)


def json_invalid(position: int, reason: str) -> ApiError:
    error: dict[str, object] = {
        "type": "json_invalid",
        "loc": ("body", position),
        "msg": "JSON decode error",
        "input": {},
        "ctx": {"error": reason},
    }
    return validation_error(error, f"body.{position}")


def unsupported_media_type() -> ApiError:
    message = "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed"
    return ApiError(400, error_json(400, message, "Bad Request", None))


def detail_error(status: int, detail: str, allow: str | None = None) -> ApiError:
    """FastAPI's own answer for a wrong route or method (vLLM does not wrap these)."""
    headers = list(JSON_HEADERS)
    if allow is not None:
        headers.insert(0, (b"allow", allow.encode("latin-1")))
    return ApiError(status, orjson.dumps({"detail": detail}), headers)


def unauthorized() -> ApiError:
    """`vllm serve --api-key` answers a bad key with this, not the OpenAI shape."""
    return ApiError(401, b'{"error":"Unauthorized"}')


def http_error_body(status: int, message: str, code: str) -> bytes:
    """For errors the HTTP layer answers itself (malformed request, body too large)."""
    del code  # vLLM has no string codes; `code` is the status
    return error_json(status, message, error_type(status), None)
