"""WebSocket on /v1/chat/completions and /v1/completions, for clients that cannot read SSE.

The handshake is claimed by `WebSocketUpgrade` (the server's upgrade hook, nothing else in
the HTTP layer knows about WebSocket); wsproto does the protocol. The first text message is
the request body (`"stream": true` is implied when absent). It then runs through the same
`ProxyApp.completions` as an SSE request (auth from the upgrade request's headers, presets,
policies, limits, deadlines, metrics) with a `WebSocketResponse`: each SSE event's data
becomes one text message, the last one `[DONE]`; keep-alive comments become pings.

Close codes: 1000 after a complete answer; an error answered before the stream began
(401, 429, 503...) is sent as its OpenAI-shaped JSON message, then closed with 4000 +
the HTTP status (4429, 4503...). A client that closes (or loses) the connection aborts the
generation at once, as a gone SSE client does.
"""

from __future__ import annotations

import asyncio
from typing import Final

import orjson
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    TextMessage,
)
from wsproto.events import Request as WsRequest
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from .app import ProxyApp
from .errors import error_body
from .http import Header, HttpConnection, Request, Response
from .ids import request_id
from .response import JSON_HEADERS, ClientGone, head_bytes
from .sse import event_data

WEBSOCKET_PATHS: Final = ("/v1/chat/completions", "/v1/completions")
PING_PAYLOAD: Final = b"keep-alive"
CLOSE_NORMAL: Final = 1000
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_UNSUPPORTED: Final = 1003
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_TRY_AGAIN: Final = 1013


class WebSocketUpgrade:
    """The HTTP server's upgrade hook: claims `Upgrade: websocket` on the two completion
    paths only (every other upgrade request is answered by the HTTP layer as before)."""

    def __init__(self, app: ProxyApp) -> None:
        self.app = app

    def claims(self, request: Request) -> bool:
        return (
            request.path in WEBSOCKET_PATHS
            and request.method == "GET"
            and request.headers.get(b"upgrade", b"").lower() == b"websocket"
        )

    async def run(self, conn: HttpConnection, request: Request, rest: bytes) -> None:
        transport = conn.transport
        if transport is None or transport.is_closing():
            return
        session = WebSocketSession(conn, conn.state.max_body_bytes())
        # The id is known before the stream: the client reads it from the 101 response.
        request.headers[b"x-request-id"] = request_id(request).encode()
        if not session.handshake(request, transport):
            return
        transport.set_protocol(session)
        try:
            await self._serve(conn, request, rest, session)
        finally:
            # The request message counted against the server's body budget until now.
            conn.state.body_budget.release(session.reserved)
            session.reserved = 0

    async def _serve(
        self, conn: HttpConnection, request: Request, rest: bytes, session: WebSocketSession
    ) -> None:
        if rest:
            session.data_received(rest)
        try:
            body = await asyncio.wait_for(session.first_message, conn.state.request_timeout)
        except TimeoutError:
            session.close(4408, "no request message in time")
            return
        if body is None:
            return  # closed by the client, or a protocol error already answered
        if session.closed or conn.closing:
            # The message and the client's close came in one read: wait_for returned the
            # message and swallowed the cancellation the loss sent (Python 3.11). Nothing
            # goes to the backend for a client that is gone.
            return
        request.method = "POST"
        request.body = _streaming(body)
        response = WebSocketResponse(conn, session)
        try:
            await self.app.completions(request, response, chat=request.path == WEBSOCKET_PATHS[0])
        except ClientGone:
            return  # the client went away mid-stream: the exchange was aborted
        except Exception:
            # A fault of sluice's own: the client gets 1011 (where an HTTP client gets a
            # 500), and the connection's done-callback logs the error.
            session.close(CLOSE_INTERNAL_ERROR, "internal error")
            raise
        session.close(response.close_code)


def _streaming(body: bytes) -> bytes:
    """`"stream": true` unless the message says otherwise (a non-JSON body is left for the
    pipeline's own 400)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if isinstance(obj, dict) and "stream" not in obj:
        obj["stream"] = True
        return orjson.dumps(obj)
    return body


class WebSocketSession(asyncio.Protocol):
    """The connection's protocol after the handshake: frames in through wsproto; flow
    control and connection loss forwarded to the HttpConnection, whose task (the handler)
    is cancelled on loss as for any request."""

    def __init__(self, conn: HttpConnection, max_message: int) -> None:
        self.conn = conn
        self.ws = WSConnection(ConnectionType.SERVER)
        self.max_message = max_message
        self.first_message: asyncio.Future[bytes | None] = conn.loop.create_future()
        self._parts: list[bytes] = []
        self._size = 0
        self._pending_pong: bytes | None = None
        self.reserved = 0  # bytes of the body budget the request message holds
        self.closed = False

    def handshake(self, request: Request, transport: asyncio.Transport) -> bool:
        # wsproto checks the handshake itself (key, version, upgrade headers): it gets the
        # request back as the client sent it (as uvicorn does).
        target = request.path + ("?" + request.query if request.query else "")
        parts = [b"GET " + target.encode("latin-1") + b" HTTP/1.1\r\n"]
        for name, value in request.headers.items():
            parts.append(name + b": " + value + b"\r\n")
        parts.append(b"\r\n")
        try:
            self.ws.receive_data(b"".join(parts))
            event = next(self.ws.events(), None)
        except RemoteProtocolError as exc:
            _reject(transport, 400, f"bad WebSocket handshake: {exc}")
            return False
        except ValueError:  # wsproto decodes Host, Connection, ... as ASCII
            _reject(transport, 400, "bad WebSocket handshake: a header is not ASCII")
            return False
        if not isinstance(event, WsRequest):
            _reject(transport, 400, "bad WebSocket handshake")
            return False
        extra: list[Header] = [(b"x-request-id", request.headers[b"x-request-id"])]
        transport.write(self.ws.send(AcceptConnection(extra_headers=extra)))
        return True

    # -- asyncio.Protocol ----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            self.ws.receive_data(data)
            for event in self.ws.events():
                if self.closed:
                    return  # closed by an earlier event of this read: nothing to answer
                if isinstance(event, TextMessage):
                    self._text(event)
                elif isinstance(event, Ping):
                    self._pong(event)
                elif isinstance(event, CloseConnection):
                    self._client_closed(event)
                    return
                elif isinstance(event, BytesMessage):
                    self.close(CLOSE_UNSUPPORTED, "send the request body as a text message")
                    self._client_gone()
                    return
        except (RemoteProtocolError, LocalProtocolError):
            self.close(CLOSE_PROTOCOL_ERROR, "protocol error")
            self._client_gone()

    def _text(self, event: TextMessage) -> None:
        if self.first_message.done():
            return  # one request per connection: later messages are ignored
        data = event.data.encode()  # the limit is in bytes, as for a body over HTTP
        self._size += len(data)
        if self._size > self.max_message:
            self.close(CLOSE_TOO_BIG, f"request message exceeds {self.max_message} bytes")
            self.first_message.set_result(None)
            return
        # Held, as an HTTP body is, within the bytes all connections may hold at once.
        if not self.conn.state.body_budget.reserve(len(data)):
            self.close(CLOSE_TRY_AGAIN, "the server holds too many request bodies; retry")
            self.first_message.set_result(None)
            return
        self.reserved += len(data)
        self._parts.append(data)
        if event.message_finished:
            self.first_message.set_result(b"".join(self._parts))
            self._parts = []

    def _client_closed(self, event: CloseConnection) -> None:
        if not self.closed:
            self.closed = True
            try:
                self._send(self.ws.send(event.response()))
            except LocalProtocolError:  # the peer's close is final whatever we answer
                pass
        self._client_gone()
        if self.conn.transport is not None:
            self.conn.transport.close()

    def _client_gone(self) -> None:
        if not self.first_message.done():
            self.first_message.set_result(None)

    def _pong(self, ping: Ping) -> None:
        """Answered at once, unless the client is not reading what it is sent: then only
        the latest ping is answered, once writing resumes (RFC 6455, 5.5.3 allows it), so
        a client that pings and never reads cannot grow the write buffer."""
        pong = self.ws.send(ping.response())
        if self.conn.write_paused:
            self._pending_pong = pong
        else:
            self._send(pong)

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        pong = self._pending_pong
        if pong is not None:
            self._pending_pong = None
            transport = self.conn.transport
            if transport is not None and not transport.is_closing():
                transport.write(pong)
        self.conn.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._client_gone()
        self.conn.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return None

    # -- sending -------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        transport = self.conn.transport
        if transport is None or transport.is_closing():
            raise ClientGone()
        transport.write(data)

    def _frame(self, event: TextMessage | Ping) -> bytes:
        """The event's frame; a connection that is closing or closed sends none (wsproto
        refuses to frame one then: the client has gone, as far as the stream goes)."""
        if self.closed:
            raise ClientGone()
        try:
            return self.ws.send(event)
        except LocalProtocolError:
            raise ClientGone() from None

    def send_text(self, text: str) -> None:
        self._send(self._frame(TextMessage(data=text)))

    def ping(self) -> None:
        self._send(self._frame(Ping(payload=PING_PAYLOAD)))

    def close(self, code: int, reason: str | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        transport = self.conn.transport
        if transport is None or transport.is_closing():
            return
        try:
            transport.write(self.ws.send(CloseConnection(code=code, reason=reason)))
        except LocalProtocolError:  # wsproto refuses a close in a closing state
            pass
        transport.close()


class WebSocketResponse(Response):
    """What the completion pipeline writes to: SSE events in, WebSocket messages out."""

    __slots__ = ("close_code", "session")

    def __init__(self, conn: HttpConnection, session: WebSocketSession) -> None:
        Response.__init__(self, conn, keep_alive=False, head_only=False)
        self.session = session
        self.close_code = CLOSE_NORMAL

    def send(self, status: int, headers: list[Header], body: bytes) -> None:
        self.started = self.ended = True
        self.status = status
        if status >= 300:
            self.close_code = 4000 + status if status < 1000 else 4000
        try:
            self.session.send_text(body.decode("utf-8", "replace"))
        except ClientGone:
            pass

    def start(self, status: int, headers: list[Header], *, with_first_write: bool = False) -> None:
        self.started = True
        self.status = status

    def flush(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        session = self.session
        for event in data.split(b"\n\n"):
            if not event:
                continue
            if event[0] == 58:  # ":" a comment: SSE's keep-alive is a ping here
                session.ping()
                continue
            payload = event_data(event)
            if payload is not None:
                session.send_text(payload.decode("utf-8", "replace"))

    def write_last(self, data: bytes) -> None:
        if self.ended:
            return
        self.write(data)
        self.ended = True

    def end(self) -> None:
        self.ended = True

    def abort(self) -> None:
        self.ended = True
        self.close_code = 1011
        self.session.close(1011, "internal error")


def _reject(transport: asyncio.Transport, status: int, message: str) -> None:
    body = error_body(message, "invalid_request_error", "bad_websocket_handshake")
    head = head_bytes(
        status,
        JSON_HEADERS,
        b"connection: close\r\ncontent-length: %d\r\n" % len(body),
    )
    transport.write(head + body)
    transport.close()


__all__ = ["WEBSOCKET_PATHS", "WebSocketResponse", "WebSocketUpgrade"]
