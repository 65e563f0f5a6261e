"""Reading requests off a connection: httptools' callbacks, the head and body limits
checked as bytes arrive, and the replay that answers an ignored upgrade over HTTP/1.1.

`RequestReader` turns bytes into complete `Request`s appended to its owner's pipeline;
whatever it will not read it hands to `owner.refuse` (an error the owner answers after
the requests before it). The owner (`http.HttpConnection`) runs the requests.
"""

from __future__ import annotations

import collections
import urllib.parse
from collections.abc import Callable
from typing import Any, Final, Protocol

import httptools

from .budget import BodyBudget
from .clock import monotonic
from .headernames import lower_name
from .http1parse import RequestParser, request_parser
from .request import (
    BODY_METHODS,
    HeadError,
    Request,
    check_head,
    declared_length,
    replay_head,
)
from .response import ClientGone, Header
from .upload import BodyStream, BodyTooLarge, BodyUnreadable

MAX_URL_BYTES: Final = 8 * 1024
MAX_HEADER_BYTES: Final = 64 * 1024
MAX_HEADER_COUNT: Final = 128
# The parser is fed at most this much of one request's head: request line + headers.
MAX_HEAD_BYTES: Final = MAX_URL_BYTES + MAX_HEADER_BYTES + 1024
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


class ReaderOwner(Protocol):
    """What the reader needs of its connection."""

    client: str
    pipeline: collections.deque[Request]  # complete requests not yet started

    @property
    def running(self) -> bool: ...  # a request's handler is running

    @property
    def refused(self) -> bool: ...  # a refusal is pending: nothing more is read

    def refuse(
        self, status: int, message: str, code: str, headers: list[Header] | None = None
    ) -> None: ...

    def write(self, data: bytes) -> None: ...

    def take_upgrade(self, rest: bytes) -> bool: ...  # True: a hook took the connection

    def start_streamed(self, request: Request) -> None: ...  # its body follows as it comes

    def pause_body(self) -> None: ...

    def resume_body(self) -> None: ...


class RequestReader:
    """The parse state of one connection; `feed` it what arrives."""

    def __init__(
        self,
        owner: ReaderOwner,
        budget: BodyBudget,
        max_body_bytes: Callable[[], int],
        request_timeout: float,
        stream_body: Callable[[Request], int] | None = None,
    ) -> None:
        self.owner = owner
        self.stream_body = stream_body
        self.budget = budget
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout
        # None once the connection closed (`close`).
        self.parser: RequestParser | None = _parser(self)
        # When the message being received must be complete (monotonic; 0: none).
        self.read_deadline = 0.0
        self.continue_pending = False  # 100 Continue owed once the connection is free
        self.in_head = True  # no message yet, or its head is still arriving
        self.head_seen = 0
        # Body bytes fed in reads the parser has not called back since (see `feed`).
        self.quiet_bytes = 0
        self.receiving = False  # between a message's first byte and its last
        self.url = b""
        self.last_url = b""
        self.headers: dict[bytes, bytes] = {}
        self.header_bytes = 0
        self.body: list[bytes] = []
        self.body_len = 0
        self.body_limit = 0
        self.reserved = 0  # budget bytes held by the message being received
        self.request: Request | None = None  # headers complete, body still arriving
        self.replaying = False  # parsing a replayed head after an ignored upgrade
        # The read being fed when it began with a message (no message in progress): the
        # head's request line is at its start (see `_version`).
        self._first_read: bytes | None = None

    def drop(self) -> None:
        """Forgets the message being received (refused, or the connection is gone)."""
        request = self.request
        if request is not None and request.body_stream is not None:
            request.body_stream.fail(ClientGone())  # its handler stops waiting for it
        self.budget.release(self.reserved)
        self.reserved = 0
        self.request = None
        self.receiving = False
        self.body = []
        self.read_deadline = 0.0
        self.continue_pending = False

    def close(self) -> None:
        """The connection is gone: its parser and last head go at once. The parser and
        the reader hold each other (the parser calls the reader's methods), and the C
        parser keeps its buffers' capacity: left to the cycle collector, they would
        outlive the connection."""
        self.drop()
        self.parser = None
        self.headers = {}  # the last head (up to MAX_HEADER_BYTES) goes with it
        self.url = self.last_url = b""

    def feed(self, data: bytes) -> None:
        """Feeds the parser, never more than the head limit while a head is arriving."""
        parser = self.parser
        if parser is None:
            return  # closed: nothing is read any more
        self._first_read = None if self.receiving else data
        while data and not self.owner.refused:
            if self.in_head:
                budget = MAX_HEAD_BYTES - self.head_seen
                if budget <= 0:
                    self.owner.refuse(431, "request head too large", "headers_too_large")
                    return
                piece, data = data[:budget], data[budget:]
                self.head_seen += len(piece)
            else:
                piece, data = data, b""
                if self.quiet_bytes > MAX_HEAD_BYTES:
                    # Reads fed with no callback since: a chunk extension or trailer that
                    # never ends, which the parser holds (a trailer's value) or skips.
                    self._trailers_too_large()
                    return
                self.quiet_bytes += len(piece)
            try:
                parser.feed_data(piece)
            except httptools.HttpParserUpgrade as upgrade:
                offset = int(upgrade.args[0]) if upgrade.args else len(piece)
                data = piece[offset:] + data
                if self.owner.take_upgrade(data):
                    return  # the connection is not HTTP any more
                parser = self._ignore_upgrade(parser)
            except httptools.HttpParserError as exc:
                self._parse_failed(exc)
                break
        self._first_read = None

    def _trailers_too_large(self) -> None:
        if not self._fail_streamed_body("request trailers too large"):
            self.owner.refuse(431, "request trailers too large", "headers_too_large")

    def _fail_streamed_body(self, message: str) -> bool:
        """Ends a streamed body its handler is reading with BodyUnreadable(message): the
        handler answers (as for one too large); a refusal here would fail the stream as a
        client that has gone, and the client would get no answer at all. False when the
        request has no streamed body."""
        request = self.request
        if request is None or request.body_stream is None:
            return False
        request.body_stream.fail(BodyUnreadable(message))
        self.owner.pause_body()
        return True

    def _version(self, method: str, parser: RequestParser) -> str:
        """The request's HTTP version. When the read began with this message, the request
        line is `method SP url SP version CRLF` from its first byte (what llhttp accepted):
        the version is read there. Otherwise httptools is asked, whose
        `get_http_version` formats a new string each call (~2,200 instructions)."""
        first = self._first_read
        if first is not None:
            self._first_read = None  # a later message of the same read starts elsewhere
            at = len(method) + len(self.url) + 2
            if first[at : at + 10] == b"HTTP/1.1\r\n":
                return "1.1"
        return parser.get_http_version()

    def _parse_failed(self, exc: httptools.HttpParserError) -> None:
        if self.owner.refused or self.parser is None:
            return  # a callback refused the request and stopped the parser
        if self._fail_streamed_body(f"malformed HTTP request: {exc}"):
            return
        last = self.owner.pipeline[-1] if self.owner.pipeline else None
        if (
            last is not None
            and not self.owner.running
            and last.method in BODY_METHODS
            and b"content-length" not in last.headers
            and b"transfer-encoding" not in last.headers
        ):
            # A POST without framing followed by what must be its body: refuse it whole
            # instead of running it with an empty body.
            self.owner.pipeline.pop()
            self.budget.release(last.reserved)
            self.owner.refuse(
                411,
                "a request body needs Content-Length or Transfer-Encoding: chunked",
                "length_required",
            )
            return
        text = str(exc)
        if "PRI" in text:
            self.owner.refuse(505, "HTTP/2 is not supported; use HTTP/1.1", "http_version")
        else:
            self.owner.refuse(400, f"malformed HTTP request: {text}", "bad_http")

    def _ignore_upgrade(self, parser: RequestParser) -> RequestParser:
        """The parser stopped at a protocol upgrade request it completed without reading
        its body. Upgrades are optional (RFC 9110 7.8): read the request again from its
        head, without the upgrade, as plain HTTP/1.1; the request keeps `upgrade` so a
        handler that serves the protocol can claim the connection. Returns the parser that
        reads on: a new one when the head was replayed."""
        if not self.owner.pipeline:
            return parser  # the upgrade request was refused: nothing to replay
        request = self.owner.pipeline.pop()
        self.budget.release(request.reserved)
        upgrade = request.headers.get(b"upgrade", b"")
        self.parser = parser = _parser(self)
        self.replaying = True
        try:
            parser.feed_data(
                replay_head(request.method, self.last_url, request.http_version, request.headers)
            )
        except httptools.HttpParserError as exc:  # the same head passed once: not expected
            self._parse_failed(exc)
            return parser
        except httptools.HttpParserUpgrade:  # nor an upgrade again, without its headers
            self.owner.refuse(400, "the protocol upgrade could not be declined", "bad_http")
            return parser
        finally:
            self.replaying = False
        if self.request is not None:
            self.request.upgrade = upgrade
        elif self.owner.pipeline:
            self.owner.pipeline[-1].upgrade = upgrade
        return parser

    # -- parser callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True
        self.url = b""
        self.headers = {}
        self.header_bytes = 0
        self.body = []
        self.body_len = 0
        self.request = None
        self.receiving = True
        self.read_deadline = monotonic() + self.request_timeout

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_URL_BYTES:
            self.owner.refuse(414, "request URL too long", "url_too_long")
            raise httptools.HttpParserError("url too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        """httptools' call per header (the compiled build's parser collects them in C)."""
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > MAX_HEADER_BYTES or len(self.headers) >= MAX_HEADER_COUNT:
            self.on_headers_too_large()
        if not self.in_head:
            # A chunked body's trailer: counted against the limits, not kept. It comes
            # after the head was checked and the request routed (a trailing `Host` or
            # `Expect` must not change them).
            return
        key = lower_name(name)
        previous = self.headers.get(key)
        self.headers[key] = value if previous is None else previous + b", " + value

    def on_headers_too_large(self) -> None:
        self.owner.refuse(431, "request headers too large", "headers_too_large")
        raise httptools.HttpParserError("headers too large")

    def on_headers_complete(self, headers: dict[bytes, bytes] | None = None) -> None:
        """The head is read; `headers` from the compiled build's parser, else `on_header`
        has collected them."""
        self.in_head = False
        self.quiet_bytes = 0
        parser = self.parser
        if parser is None:  # closed by an earlier callback of the same read
            raise httptools.HttpParserError("connection closed")
        if headers is None:
            headers = self.headers
        else:
            self.headers = headers
        method = parser.get_method().decode("ascii")
        version = self._version(method, parser)
        try:
            check_head(method, version, headers)
            path, query = _path_and_query(self.url)
        except HeadError as exc:
            self.owner.refuse(exc.status, exc.message, exc.code)
            raise httptools.HttpParserError(exc.message) from None
        self.last_url = self.url
        request = Request(
            method=method,
            path=path,
            query=query,
            headers=headers,
            http_version=version,
            keep_alive=parser.should_keep_alive(),
            client=self.owner.client,
        )
        self.request = request
        self.body_limit = self.max_body_bytes()
        streamed = 0
        if self.stream_body is not None and not self.owner.running and not self.owner.pipeline:
            streamed = self.stream_body(request)
            if streamed:
                self.body_limit = streamed
        declared = declared_length(headers)
        if declared > self.body_limit:
            self.owner.refuse(
                413,
                f"request body of {declared} bytes exceeds the limit of {self.body_limit}",
                "request_too_large",
            )
            raise httptools.HttpParserError("body too large")
        # A streamed body is never held whole: it takes nothing from the budget.
        if not streamed and not self._reserve(declared):
            raise httptools.HttpParserError("body budget exhausted")
        chunked = b"transfer-encoding" in headers
        if (
            (declared or chunked)
            and version == "1.1"
            and b"expect" in headers  # check_head let only 100-continue through
            and not self.replaying
        ):
            # Never inside another response still being written: owed until it ends.
            if not self.owner.running and not self.owner.pipeline:
                self.owner.write(CONTINUE)
            else:
                self.continue_pending = True
        if streamed:
            request.body_stream = BodyStream(self.owner, streamed)
            self.read_deadline = 0.0  # the handler bounds the wait for the body (upload.py)
            self.owner.start_streamed(request)

    def on_body(self, body: bytes) -> None:
        self.quiet_bytes = 0
        request = self.request
        if request is not None and request.body_stream is not None:
            try:
                request.body_stream.feed(body)
            except BodyTooLarge as exc:
                # The handler answers 413 (its response closes the connection); read no more.
                request.body_stream.fail(exc)
                self.owner.pause_body()
            return
        self.body_len += len(body)
        if self.body_len > self.body_limit:
            self.owner.refuse(
                413,
                f"request body exceeds the limit of {self.body_limit} bytes",
                "request_too_large",
            )
            raise httptools.HttpParserError("body too large")
        if self.body_len > self.reserved and not self._reserve(self.body_len - self.reserved):
            raise httptools.HttpParserError("body budget exhausted")
        self.body.append(body)

    def on_chunk_header(self) -> None:
        self.quiet_bytes = 0

    def on_chunk_complete(self) -> None:
        self.quiet_bytes = 0

    def on_message_complete(self) -> None:
        self.quiet_bytes = 0
        self.in_head = True
        self.receiving = False
        self.head_seen = 0
        self.read_deadline = 0.0
        self.continue_pending = False
        request = self.request
        if request is None:
            return
        self.request = None
        if request.body_stream is not None:
            request.body_stream.finish()  # its handler is running already
            return
        body = self.body
        request.body = body[0] if len(body) == 1 else b"".join(body)
        request.reserved = self.reserved
        self.reserved = 0
        self.body = []
        self.body_len = 0
        self.owner.pipeline.append(request)

    def _reserve(self, n: int) -> bool:
        if self.budget.reserve(n):
            self.reserved += n
            return True
        self.owner.refuse(
            503,
            "the server holds too many request bodies at once; retry shortly",
            "server_busy",
            [(b"retry-after", b"1")],
        )
        return False


# Request targets without a query, split once: an API's clients ask for a few paths over
# and over. Bounded: the first MAX_KNOWN_PATHS distinct ones (any others are split anew).
MAX_KNOWN_PATHS: Final = 256
_known_paths: Final[dict[bytes, tuple[str, str]]] = {}


def _parser(reader: RequestReader) -> RequestParser:
    return request_parser(reader, MAX_URL_BYTES, MAX_HEADER_BYTES, MAX_HEADER_COUNT)


def _path_and_query(url: bytes) -> tuple[str, str]:
    """The request target's path and query. The usual origin form (`/path?query`) is split
    here; any other form (absolute, with a fragment) goes through httptools' URL parser,
    which costs a parser object per request."""
    known = _known_paths.get(url)
    if known is not None:
        return known
    if url[:1] == b"/" and url.find(b"#") < 0:
        path, mark, query = url.partition(b"?")
        split = (_path_text(path), query.decode("latin-1"))
        if not mark and len(_known_paths) < MAX_KNOWN_PATHS:
            _known_paths[url] = split
        return split
    if url == b"*":  # asterisk form (`OPTIONS *`): no path to forward; nginx answers 400
        raise HeadError(400, "the request target '*' names no path", "invalid_path")
    # Any: httptools' stub types the URL's parts as bytes, but an absent part is None
    # (and a compiled build checks the declared type).
    parsed: Any = httptools.parse_url(url)
    return (
        _path_text(parsed.path) if parsed.path else "/",
        parsed.query.decode("latin-1") if parsed.query else "",
    )


def _path_text(path: bytes) -> str:
    """The path as vLLM will route it. Its server (uvicorn) decodes %XX escapes once, so
    `/v1/chat%2Fcompletions` is its chat endpoint: sluice matches, and forwards, the
    decoded path, or a client could reach an endpoint past the rules sluice keeps for
    it. A decoding that is no plain path is refused: a control, space, `?`, `#` or
    non-ASCII character would change the request line sent upstream, and a `%` left
    would be decoded a second time there."""
    text = path.decode("latin-1")
    if path.find(b"%") < 0:
        return text
    decoded = urllib.parse.unquote(text, encoding="latin-1")
    for char in decoded:
        if not ("!" <= char <= "~") or char in "?#%":
            raise HeadError(
                400,
                f"the request path {text[:200]!r} decodes to characters a path cannot hold",
                "invalid_path",
            )
    return decoded
