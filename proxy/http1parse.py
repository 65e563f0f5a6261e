"""The HTTP/1.1 parsers the data plane reads messages with.

Both run llhttp. The compiled build has `_http1` (proxy/_http1.c), which collects a
head's headers in C and hands them over as one dict; the pure build has httptools, which
calls the protocol's `on_header` once per header (~1,900 instructions a header, compiled:
the call, two bytes objects and the name's lowering). A protocol serves both: it keeps
`on_header` for httptools and takes `on_headers_complete(headers)` from `_http1`, which
also calls `on_headers_too_large()` where `on_header` would have refused. Errors are
httptools' exception classes either way.
"""

from __future__ import annotations

from typing import Any, Final, Protocol

import httptools

from .native import c_function

_request_parser_in_c: Final[Any] = c_function("_http1", "RequestParser")
_response_parser_in_c: Final[Any] = c_function("_http1", "ResponseParser")
# Whether heads are collected in C (`sluice serve` reports the build; tests check this).
HEADS_IN_C: Final = _request_parser_in_c is not None


class RequestParser(Protocol):
    def feed_data(self, data: bytes) -> None: ...

    def get_method(self) -> bytes: ...

    def get_http_version(self) -> str: ...

    def should_keep_alive(self) -> bool: ...


class ResponseParser(Protocol):
    def feed_data(self, data: bytes) -> None: ...

    def get_status_code(self) -> int: ...

    def should_keep_alive(self) -> bool: ...


def request_parser(
    protocol: object, max_url: int, max_header_bytes: int, max_header_count: int
) -> RequestParser:
    """A request parser calling `protocol` back. `_http1` enforces the limits itself (the
    URL's bytes; the header bytes, name + value + 4 each, and distinct names of a head);
    with httptools the protocol's `on_url` and `on_header` do."""
    if _request_parser_in_c is not None:
        parser: RequestParser = _request_parser_in_c(
            protocol, max_url, max_header_bytes, max_header_count
        )
        return parser
    return httptools.HttpRequestParser(protocol)


def response_parser(protocol: object, max_header_bytes: int) -> ResponseParser:
    """A response parser calling `protocol` back; a repeated header's last value wins.
    `_http1` enforces the limit on the head's header bytes (name + value + 4 each, a
    chunked body's trailers counted with them) itself; with httptools the protocol's
    `on_header` does."""
    if _response_parser_in_c is not None:
        parser: ResponseParser = _response_parser_in_c(protocol, max_header_bytes=max_header_bytes)
        return parser
    return httptools.HttpResponseParser(protocol)
