"""A lean HTTP/1.1 server on asyncio protocols and httptools' parser.

Why not ASGI under uvicorn: on the 2-core target machine the ASGI message dicts and the
extra task hops per chunk cost ~15-30 ms of TTFT p50 at 256 streams (foundation issue's
table). This server keeps what uvicorn's httptools protocol does for robustness (keep-alive,
chunked request bodies, header and body limits, a read deadline against slow clients,
write backpressure, pipelined requests answered in order) and hands each request to one
coroutine: `handler(request, response)`.

A client that goes away cancels its handler task: every `finally` in the data plane runs
(permits released, upstream aborted) at the next await, with no polling.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from time import monotonic
from typing import Protocol

import httptools

from .errors import server_error_body
from .response import JSON_HEADERS, ClientGone, FlowListener, Header, Response, head_bytes
from .tcp import stream_transport
from .upload import BodyStream, BodyTooLarge

MAX_URL_BYTES = 8 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADER_COUNT = 128
# Longer than nginx's upstream keepalive_timeout default (60 s), so nginx closes an idle
# connection before we do and never writes a request into a socket we are closing.
KEEPALIVE_IDLE_TIMEOUT = 75.0
# From a request's first byte to its last: bounds slow-loris clients.
REQUEST_READ_TIMEOUT = 30.0


class Request:
    """One parsed request. Header names are lower-case bytes; repeated headers are joined."""

    __slots__ = (
        "body",
        "body_stream",
        "client",
        "headers",
        "http_version",
        "keep_alive",
        "method",
        "path",
        "query",
    )

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[bytes, bytes],
        http_version: str,
        keep_alive: bool,
        client: str,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.client = client
        self.body = b""
        # Set when the server streams this request's body to the handler (proxy/upload.py).
        self.body_stream: BodyStream | None = None

    def header(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")


Handler = Callable[[Request, "Response"], Awaitable[None]]


class UpgradeHook(Protocol):
    """Takes over a connection whose request asks for a protocol upgrade (proxy/websocket.py).
    Only requests it `claims` are handed over; the HTTP layer answers the others."""

    def claims(self, request: Request) -> bool: ...

    async def run(self, conn: HttpConnection, request: Request, rest: bytes) -> None: ...


class ServerState:
    """What all connections of one server share: the handler, limits and the open connections."""

    def __init__(
        self,
        handler: Handler,
        max_body_bytes: Callable[[], int],
        on_error: Callable[[BaseException], None] | None = None,
        error_body: Callable[[int, str, str], bytes] | None = None,
        *,
        keepalive_timeout: float = KEEPALIVE_IDLE_TIMEOUT,
        request_timeout: float = REQUEST_READ_TIMEOUT,
        stream_body: Callable[[Request], int] | None = None,
    ) -> None:
        self.handler = handler
        # > 0: start the handler at the headers and stream the body to it, up to that many
        # bytes (uploads); 0: buffer the body whole, as for every other request.
        self.stream_body = stream_body
        self.keepalive_timeout = keepalive_timeout
        self.request_timeout = request_timeout
        self.max_body_bytes = max_body_bytes
        self.on_error = on_error
        self.error_body = error_body or server_error_body
        self.connections: set[HttpConnection] = set()
        self.closing = False
        self.upgrade: UpgradeHook | None = None


class HttpConnection(asyncio.Protocol):
    """One client connection: parses requests and runs the handler for each, in order."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client = ""
        self.closing = False
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # When the idle / request-read timeout ends (monotonic; 0: none). HttpServer's
        # sweeper checks all connections periodically: no timer object per request.
        self._deadline = 0.0
        self._task: asyncio.Task[None] | None = None
        self._pipeline: collections.deque[Request] = collections.deque()
        self._reading_paused = False
        self.flow_listener: FlowListener | None = None  # a push-mode relay, while streaming
        # Set by a resumable stream (proxy/resume.py): a lost client calls it instead of
        # cancelling the handler, whose generation runs on for the stream's window.
        self.keep_task_on_loss: Callable[[], None] | None = None
        # Per-message parse state.
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_len = 0
        self._body_limit = 0
        self._request: Request | None = None
        self._rejected = False
        self._upgrade: Request | None = None  # a request the upgrade hook claimed

    # -- transport callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = stream_transport(transport)
        peer = self.transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client = f"{peer[0]}:{peer[1]}"
        self.state.connections.add(self)
        self._set_timer(self.state.keepalive_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.state.connections.discard(self)
        self._cancel_timer()
        if self._task is not None and not self._task.done():
            if self.keep_task_on_loss is not None:
                self.keep_task_on_loss()
            else:
                self._task.cancel()
        self._pipeline.clear()
        self.flow_listener = None
        request = self._request
        if request is not None and request.body_stream is not None:
            request.body_stream.fail(ClientGone())
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ClientGone())
        self._drain_waiter = None

    def eof_received(self) -> bool | None:
        # The client half-closed: treat as gone (uvicorn does the same). Returning None
        # closes the transport, which cancels the running handler.
        return None

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.flow_listener is not None:
            self.flow_listener.pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.flow_listener is not None:
            self.flow_listener.resume()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._drain_waiter = None

    # ReadingControl of a streamed request body.
    def pause_body(self) -> None:
        if self.transport is not None and not self._reading_paused:
            self.transport.pause_reading()
            self._reading_paused = True

    def resume_body(self) -> None:
        if self.transport is not None and self._reading_paused and not self._pipeline:
            self.transport.resume_reading()
            self._reading_paused = False

    async def wait_writable(self) -> None:
        if not self.write_paused:
            return
        if self.transport is None or self.transport.is_closing():
            raise ClientGone()
        if self._drain_waiter is None:
            self._drain_waiter = self.loop.create_future()
        await self._drain_waiter

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self._upgrade is not None:
                self._hand_over(self._upgrade, data[exc.args[0] :] if exc.args else b"")
                return
            self._reject(400, "protocol upgrades are not supported", "upgrade_not_supported")
        except httptools.HttpParserError as exc:
            if not self._rejected:
                self._reject(400, f"malformed HTTP request: {exc}", "bad_http")

    # -- parser callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._header_bytes = 0
        self._body = []
        self._body_len = 0
        self._request = None
        self._set_timer(self.state.request_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_URL_BYTES:
            self._reject(414, "request URL too long", "url_too_long")
            raise httptools.HttpParserError("url too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEADER_BYTES or len(self._headers) >= MAX_HEADER_COUNT:
            self._reject(431, "request headers too large", "headers_too_large")
            raise httptools.HttpParserError("headers too large")
        key = name.lower()
        previous = self._headers.get(key)
        self._headers[key] = value if previous is None else previous + b", " + value

    def on_headers_complete(self) -> None:
        parsed = httptools.parse_url(self._url)
        path = parsed.path.decode("latin-1") if parsed.path else "/"
        query = parsed.query.decode("latin-1") if parsed.query else ""
        request = Request(
            method=self.parser.get_method().decode("ascii"),
            path=path,
            query=query,
            headers=self._headers,
            http_version=self.parser.get_http_version(),
            keep_alive=self.parser.should_keep_alive(),
            client=self.client,
        )
        self._request = request
        self._body_limit = self.state.max_body_bytes()
        streamed = 0
        if self.state.stream_body is not None and self._task is None and not self._pipeline:
            streamed = self.state.stream_body(request)
            if streamed:
                self._body_limit = streamed
        length = self._headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > self._body_limit:
                self._reject(
                    413,
                    f"request body of {declared} bytes exceeds the limit of {self._body_limit}",
                    "request_too_large",
                )
                raise httptools.HttpParserError("body too large")
        if self._headers.get(b"expect", b"").lower() == b"100-continue" and self.transport:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if streamed:
            request.body_stream = BodyStream(self, streamed)
            self._cancel_timer()  # the handler bounds the wait for the body (upload.py)
            self._start(request, keep_alive=False)  # a body left unread ends the connection

    def on_body(self, body: bytes) -> None:
        request = self._request
        if request is not None and request.body_stream is not None:
            try:
                request.body_stream.feed(body)
            except BodyTooLarge as exc:
                # The handler answers 413 (its response closes the connection); read no more.
                request.body_stream.fail(exc)
                self.pause_body()
            return
        self._body_len += len(body)
        if self._body_len > self._body_limit:
            self._reject(
                413,
                f"request body exceeds the limit of {self._body_limit} bytes",
                "request_too_large",
            )
            raise httptools.HttpParserError("body too large")
        self._body.append(body)

    def on_message_complete(self) -> None:
        request = self._request
        if request is None:
            return
        self._request = None
        if request.body_stream is not None:
            request.body_stream.finish()
            return
        body = self._body
        request.body = body[0] if len(body) == 1 else b"".join(body)
        self._body = []
        self._body_len = 0
        self._cancel_timer()
        hook = self.state.upgrade
        if (
            hook is not None
            and self.parser.should_upgrade()
            and self._task is None
            and not self._pipeline
            and hook.claims(request)
        ):
            self._upgrade = request  # handed over when the parser stops at the upgrade
            return
        if self._task is None and not self._pipeline:
            self._start(request)
        else:
            # A pipelined request: answered after the current one; stop reading meanwhile
            # so a client cannot queue unbounded work on one connection.
            self._pipeline.append(request)
            if self.transport is not None and not self._reading_paused:
                self.transport.pause_reading()
                self._reading_paused = True

    # -- request lifecycle ---------------------------------------------------------------

    def _start(self, request: Request, keep_alive: bool = True) -> None:
        response = Response(
            self,
            keep_alive=keep_alive and request.keep_alive and not self.state.closing,
            head_only=request.method == "HEAD",
            http11=request.http_version != "1.0",
        )
        self._task = self.loop.create_task(self._run(request, response))

    async def _run(self, request: Request, response: Response) -> None:
        try:
            await self.state.handler(request, response)
        except (asyncio.CancelledError, ClientGone):
            # Client gone: the handler's finally blocks have released what it held.
            self._task = None
            response.ended = True
            self.close()
            return
        except Exception as exc:
            if self.state.on_error is not None:
                self.state.on_error(exc)
            if not response.started:
                response.keep_alive = False
                response.send(
                    500,
                    JSON_HEADERS,
                    self.state.error_body(500, "internal error", "internal_error"),
                )
            else:
                response.abort()
        self._task = None
        if not response.ended:
            if response.started:
                response.end()
            else:
                response.keep_alive = False
                response.send(
                    500,
                    JSON_HEADERS,
                    self.state.error_body(500, "handler sent no response", "internal_error"),
                )
        self._next_request(response)

    def _hand_over(self, request: Request, rest: bytes) -> None:
        """The upgrade hook owns the connection from here; it is closed when it returns."""
        hook = self.state.upgrade
        assert hook is not None
        self._rejected = True  # no more HTTP parsing on this connection
        self._cancel_timer()
        self._task = self.loop.create_task(hook.run(self, request, rest))
        self._task.add_done_callback(self._upgrade_done)

    def _upgrade_done(self, task: asyncio.Task[None]) -> None:
        self._task = None
        error = None if task.cancelled() else task.exception()
        if error is not None and self.state.on_error is not None:
            self.state.on_error(error)
        self.close()

    def _next_request(self, response: Response) -> None:
        """After a response: the next pipelined request, an idle wait, or close."""
        if not response.keep_alive or self.closing or self.state.closing:
            self.close()
            return
        if self._pipeline:
            self._start(self._pipeline.popleft())
            return
        if self._reading_paused and self.transport is not None:
            self.transport.resume_reading()
            self._reading_paused = False
        self._set_timer(self.state.keepalive_timeout)

    def _reject(self, status: int, message: str, code: str) -> None:
        """Answers a request we will not parse further, then closes the connection."""
        if self._rejected:
            return
        self._rejected = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._task is None:
            body = self.state.error_body(status, message, code)
            head = head_bytes(
                status,
                JSON_HEADERS,
                b"connection: close\r\ncontent-length: %d\r\n" % len(body),
            )
            transport.write(head + body)
        self.close()

    def close(self) -> None:
        self.closing = True
        self._cancel_timer()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    @property
    def idle(self) -> bool:
        return self._task is None and not self._pipeline and self._request is None

    # -- timers --------------------------------------------------------------------------

    def _set_timer(self, delay: float) -> None:
        self._deadline = monotonic() + delay

    def _cancel_timer(self) -> None:
        self._deadline = 0.0

    def expire_if_due(self, now: float) -> None:
        if self._deadline and now >= self._deadline:
            self._deadline = 0.0
            self._on_timer()

    def _on_timer(self) -> None:
        if self._task is not None:
            return
        if self._request is not None or self._body_len:
            self._reject(408, "request not received in time", "request_timeout")
        else:
            self.close()


__all__ = [
    "ClientGone",
    "Handler",
    "Header",
    "HttpConnection",
    "Request",
    "Response",
    "ServerState",
]
