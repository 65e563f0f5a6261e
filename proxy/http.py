"""A lean HTTP/1.1 server on asyncio protocols and httptools' parser.

Why not ASGI under uvicorn: on the 2-core target machine the ASGI message dicts and the
extra task hops per chunk cost ~15-30 ms of TTFT p50 at 256 streams (foundation issue's
table). This server keeps what uvicorn's httptools protocol does for robustness (keep-alive,
chunked request bodies, header and body limits, a read deadline against slow clients,
write backpressure, pipelined requests answered in order) and hands each request to one
coroutine: `handler(request, response)`.

Owning the server makes it an attack surface, so it holds to RFC 9112 beyond the parser:
head bytes are counted as they arrive (the parser is never fed more than the head limit),
a request that completed is always answered, even when bytes after it do not parse (the
error follows its response), every refusal is a JSON error followed by a lingering close
(the client reads the error instead of a reset), and open connections and buffered body
bytes are capped server-wide.

A client that goes away cancels its handler task: every `finally` in the data plane runs
(permits released, upstream aborted) at the next await, with no polling.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

from .budget import BodyBudget
from .clock import monotonic
from .errors import server_error_body
from .reader import CONTINUE, RequestReader
from .request import Request
from .response import JSON_HEADERS, ClientGone, FlowListener, Header, Response, head_bytes
from .tcp import stream_transport

# Longer than nginx's upstream keepalive_timeout default (60 s), so nginx closes an idle
# connection before we do and never writes a request into a socket we are closing.
KEEPALIVE_IDLE_TIMEOUT: Final = 75.0
# From a request's first byte to its last: bounds slow-loris clients.
REQUEST_READ_TIMEOUT: Final = 30.0
# After an error and a close of our side: how long the rest of what the client sent is
# read and dropped, so its kernel sees no reset before it read the error (nginx's
# lingering close), and how much of it at most.
LINGER_TIMEOUT: Final = 2.0
LINGER_MAX_BYTES: Final = 1024 * 1024
# Open client connections per process; beyond it a new one gets 503 and is closed.
DEFAULT_MAX_CONNECTIONS: Final = 4096
REQUEST_TASK: Final = "sluice-request"
# Complete requests one connection may queue behind the one that runs (pipelining) before
# its reading pauses. Reading goes on below that so a client that leaves is seen, and its
# running request ends (a paused socket reports no close).
MAX_PIPELINED: Final = 8

Handler = Callable[[Request, "Response"], Awaitable[None]]


class UpgradeHook(Protocol):
    """Takes over a connection whose request asks for a protocol upgrade (proxy/websocket.py).
    Only requests it `claims` are handed over; the HTTP layer answers the others normally
    (the upgrade is ignored, as RFC 9110 7.8 allows)."""

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
        linger_timeout: float = LINGER_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        body_budget: BodyBudget | None = None,
        stream_body: Callable[[Request], int] | None = None,
    ) -> None:
        self.handler = handler
        self.keepalive_timeout = keepalive_timeout
        self.request_timeout = request_timeout
        self.linger_timeout = linger_timeout
        self.max_connections = max_connections
        self.body_budget = body_budget or BodyBudget()
        self.max_body_bytes = max_body_bytes
        # > 0: start the handler at the headers and stream the body to it, up to that many
        # bytes (uploads); 0: buffer the body whole, as for every other request.
        self.stream_body = stream_body
        self.on_error = on_error
        self.error_body = error_body or server_error_body
        self.connections: set[HttpConnection] = set()
        self.closing = False
        self.refused_connections = 0
        self.upgrade: UpgradeHook | None = None


class _Refusal:
    """An error to answer once every complete request before it has been answered."""

    __slots__ = ("code", "headers", "message", "status")

    def __init__(self, status: int, message: str, code: str, headers: list[Header]) -> None:
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers


class HttpConnection(asyncio.Protocol):
    """One client connection: parses requests and runs the handler for each, in order."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.client = ""
        self.closing = False
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # Deadlines (monotonic; 0: none), checked by HttpServer's periodic sweep: no timer
        # object per request. The read deadline (the reader's) runs from a request's first
        # byte to its last, whatever else the connection is doing; the idle one between
        # requests.
        self._idle_deadline = 0.0
        self._linger_deadline = 0.0
        self._task: asyncio.Task[None] | None = None  # while a request runs: its task
        # The connection's one task for its requests, one after another (a Task per
        # request cost ~6,300 instructions: its registration in asyncio's WeakSet of all
        # tasks and the removal by weakref callback, both interpreted on 3.11). Between
        # requests it waits on `_next_request`; its `_task` is None then.
        self._worker: asyncio.Task[None] | None = None
        self._next_request: asyncio.Future[tuple[Request, Response]] | None = None
        self._reading_paused = False
        self.flow_listener: FlowListener | None = None  # a push-mode relay, while streaming
        # Set by a resumable stream (proxy/resume.py): a lost client calls it instead of
        # cancelling the handler, whose generation runs on for the stream's window.
        self.keep_task_on_loss: Callable[[], None] | None = None
        self._refusal: _Refusal | None = None  # answered after the requests before it
        self._lingering = False
        self._linger_bytes = 0
        self._feeding = False
        self._claimed = False  # the upgrade hook took the connection over
        self.pipeline: collections.deque[Request] = collections.deque()
        self.reader = RequestReader(
            self, state.body_budget, state.max_body_bytes, state.request_timeout, state.stream_body
        )

    # -- transport callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = stream_transport(transport)
        peer = self.transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client = f"{peer[0]}:{peer[1]}"
        state = self.state
        full = len(state.connections) >= state.max_connections
        state.connections.add(self)
        if full:
            state.refused_connections += 1
            self.refuse(
                503,
                "too many open connections; retry shortly",
                "too_many_connections",
                [(b"retry-after", b"1")],
            )
            return
        self._idle_deadline = monotonic() + state.keepalive_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.state.connections.discard(self)
        self._idle_deadline = self._linger_deadline = 0.0
        if self._task is not None and not self._task.done():
            if self.keep_task_on_loss is not None:
                self.keep_task_on_loss()
            else:
                self._task.cancel()
        waiting = self._next_request
        if waiting is not None:  # the worker waits for a next request: none comes
            self._next_request = None
            waiting.cancel()
        budget = self.state.body_budget
        for request in self.pipeline:
            budget.release(request.reserved)
            request.reserved = 0
        self.pipeline.clear()
        self.reader.close()
        self.flow_listener = None
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

    async def wait_writable(self) -> None:
        if not self.write_paused:
            return
        if self.transport is None or self.transport.is_closing():
            raise ClientGone()
        if self._drain_waiter is None:
            self._drain_waiter = self.loop.create_future()
        await self._drain_waiter

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._linger_bytes += len(data)
            if self._linger_bytes > LINGER_MAX_BYTES:
                self.close()
            return
        if self._refusal is not None or self._claimed:
            return  # reading is paused; these bytes were already on their way
        self._feeding = True
        try:
            self.reader.feed(data)
        finally:
            self._feeding = False
        self._advance()

    # -- request lifecycle ---------------------------------------------------------------

    def _advance(self) -> None:
        """Starts the next complete request when none runs; once none is left, answers a
        pending refusal. Requests complete while another runs wait (pipelining), and
        reading pauses at MAX_PIPELINED so a client cannot queue unbounded work on one
        connection."""
        if self._task is not None or self.closing:
            if len(self.pipeline) >= MAX_PIPELINED:
                self._pause_reading()
            return
        if self.pipeline:
            self._start(self.pipeline.popleft())
            if len(self.pipeline) >= MAX_PIPELINED:
                self._pause_reading()
            elif self._refusal is None and not self._claimed:
                self._resume_reading()  # below the bound again: a close is seen
            return
        if self._refusal is not None:
            self._answer_refusal()
            return
        reader = self.reader
        if reader.continue_pending and reader.request is not None:
            reader.continue_pending = False
            self.write(CONTINUE)
        self._resume_reading()
        if not reader.receiving and not self._claimed:
            self._idle_deadline = monotonic() + self.state.keepalive_timeout

    def start_streamed(self, request: Request) -> None:
        """A request whose body is streamed to its handler starts at its headers; a body
        left unread ends the connection."""
        self._start(request, keep_alive=False)

    # ReadingControl of a streamed request body (proxy/upload.py).
    def pause_body(self) -> None:
        self._pause_reading()

    def resume_body(self) -> None:
        if not self.pipeline:
            self._resume_reading()

    def _start(self, request: Request, keep_alive: bool = True) -> None:
        response = Response(
            self,
            keep_alive=keep_alive and request.keep_alive and not self.state.closing,
            head_only=request.method == "HEAD",
            http11=request.http_version != "1.0",
        )
        self._idle_deadline = 0.0
        waiting = self._next_request
        if waiting is not None:
            self._next_request = None
            self._task = self._worker
            waiting.set_result((request, response))
            return
        # A Task made here, named: `create_task` leaves the name to Task.__init__, which
        # formats "Task-<n>" for every request (~1,400 instructions on 3.11).
        self._task = self._worker = asyncio.Task(
            self._serve(request, response), loop=self.loop, name=REQUEST_TASK
        )

    async def _serve(self, request: Request, response: Response) -> None:
        """The worker: runs a request, then waits for the next one on this connection."""
        worker = self._worker
        try:
            while True:
                try:
                    await self._handle(request, response)
                finally:
                    self.state.body_budget.release(request.reserved)
                    request.reserved = 0
                    self._task = None
                if not response.keep_alive or self.closing or self.state.closing:
                    self.close_gracefully()
                    return
                if worker is not None and worker.cancelling():
                    # A cancellation the handler caught and did not withdraw would make
                    # the next request's watchdog take its own timeout for a disconnect.
                    while worker.uncancel():
                        pass
                waiting: asyncio.Future[tuple[Request, Response]] = self.loop.create_future()
                self._next_request = waiting
                self._advance()  # a pipelined request starts at once: `waiting` is done
                try:
                    request, response = await waiting
                except asyncio.CancelledError:
                    # The connection closed while idle (or a stray cancellation came): a
                    # request handed over in the meantime is not run, and no other will be.
                    if waiting.done() and not waiting.cancelled():
                        dropped = waiting.result()[0]
                        self.state.body_budget.release(dropped.reserved)
                        dropped.reserved = 0
                    self._task = None
                    self.close()
                    return
                finally:
                    if self._next_request is waiting:
                        self._next_request = None
        finally:
            if self._worker is worker:
                self._worker = None

    async def _handle(self, request: Request, response: Response) -> None:
        try:
            await self.state.handler(request, response)
        except (asyncio.CancelledError, ClientGone):
            # Client gone: the handler's finally blocks have released what it held.
            response.ended = True
            response.keep_alive = False
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

    def take_upgrade(self, rest: bytes) -> bool:
        """The reader stopped at a protocol upgrade request it just completed: hands the
        connection to the server's upgrade hook if it claims the request (only when
        nothing else is running or waiting on the connection). `rest`: the bytes after the
        request. False: the upgrade is ignored and the request answered over HTTP/1.1."""
        hook = self.state.upgrade
        if hook is None or self._task is not None or len(self.pipeline) != 1:
            return False
        request = self.pipeline[0]
        if not hook.claims(request):
            return False
        self.pipeline.clear()
        self.state.body_budget.release(request.reserved)
        request.reserved = 0
        self._claimed = True  # no more HTTP on this connection
        self.reader.read_deadline = self._idle_deadline = 0.0
        self._task = self.loop.create_task(hook.run(self, request, rest))
        self._task.add_done_callback(self._upgrade_done)
        return True

    def _upgrade_done(self, task: asyncio.Task[None]) -> None:
        """The upgrade hook owned the connection until now; it is closed."""
        self._task = None
        error = None if task.cancelled() else task.exception()
        if error is not None and self.state.on_error is not None:
            self.state.on_error(error)
        self.close()

    def refuse(
        self, status: int, message: str, code: str, headers: list[Header] | None = None
    ) -> None:
        """Refuses what the client sends from here on: complete requests before it are
        still answered, then this error, then a lingering close. Nothing more is parsed."""
        if self._refusal is not None or self.closing:
            return
        self._refusal = _Refusal(status, message, code, headers or [])
        self.reader.drop()
        self._pause_reading()
        if not self._feeding:
            self._advance()

    def _answer_refusal(self) -> None:
        refusal = self._refusal
        assert refusal is not None
        body = self.state.error_body(refusal.status, refusal.message, refusal.code)
        head = head_bytes(
            refusal.status,
            JSON_HEADERS + refusal.headers,
            b"connection: close\r\ncontent-length: %d\r\n" % len(body),
        )
        self.write(head + body)
        self.close_gracefully()

    def close_gracefully(self) -> None:
        """Closes our side after what we wrote, then reads and drops what the client still
        sends for a moment: closing a socket with unread input sends a reset, which can
        destroy the response before the client read it."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._lingering:
            return
        self.closing = True
        self.reader.read_deadline = self._idle_deadline = 0.0
        if not transport.can_write_eof():
            transport.close()
            return
        self._lingering = True
        self._linger_deadline = monotonic() + self.state.linger_timeout
        try:
            transport.write_eof()
        except OSError:
            transport.close()
            return
        self._resume_reading()

    def close(self) -> None:
        self.closing = True
        self.reader.read_deadline = self._idle_deadline = self._linger_deadline = 0.0
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _pause_reading(self) -> None:
        if self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            try:
                self.transport.pause_reading()
            except RuntimeError:
                pass  # closing already

    def _resume_reading(self) -> None:
        if self.transport is not None and self._reading_paused:
            self._reading_paused = False
            try:
                self.transport.resume_reading()
            except RuntimeError:
                pass

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    @property
    def worker(self) -> asyncio.Task[None] | None:
        """The task that runs this connection's requests (None before the first)."""
        return self._worker

    @property
    def idle(self) -> bool:
        return self._task is None and not self.pipeline and self.reader.request is None

    @property
    def running(self) -> bool:
        return self._task is not None

    @property
    def refused(self) -> bool:
        return self._refusal is not None

    # -- timers --------------------------------------------------------------------------

    def expire_if_due(self, now: float) -> None:
        if self._linger_deadline and now >= self._linger_deadline:
            self.close()
            return
        reader = self.reader
        if reader.read_deadline and now >= reader.read_deadline:
            # Also while an earlier request's response is streaming: the 408 follows it.
            reader.read_deadline = 0.0
            self.refuse(408, "request not received in time", "request_timeout")
            return
        if (
            self._idle_deadline
            and now >= self._idle_deadline
            and self.idle
            and not reader.receiving
        ):
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
