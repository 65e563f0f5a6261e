"""The HTTP/1.1 server under the data plane, tested on a real socket for what a server
written on asyncio protocols must get right: keep-alive, chunked request bodies, header
limits, slow clients, HTTP/1.0, Expect: 100-continue, and backpressure."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest
from sluice.proxy.errors import server_error_body
from sluice.proxy.http import Request, Response, ServerState
from sluice.proxy.server import HttpServer

from tests.fixtures import LoopThread

STREAM_CHUNK = b"x" * 65536


class EchoServer:
    """Echoes the body; /stream writes 64 KiB chunks while the client keeps up."""

    def __init__(self, **state_kw: float) -> None:
        self.lt = LoopThread()
        self.streamed = 0
        self.drains = 0
        self.handler_done = False

        async def handler(request: Request, response: Response) -> None:
            if request.path == "/stream":
                response.start(200, [(b"content-type", b"application/octet-stream")])
                try:
                    for _ in range(2000):  # up to 128 MiB if nothing pushed back
                        response.write(STREAM_CHUNK)
                        self.streamed += len(STREAM_CHUNK)
                        if response.must_drain:
                            self.drains += 1
                            await response.drain()
                finally:
                    self.handler_done = True
                response.end()
                return
            response.send(200, [(b"content-type", b"text/plain")], b"echo:" + request.body)

        self.server = HttpServer(
            ServerState(handler, lambda: 1024, error_body=server_error_body, **state_kw)
        )
        self.port = self.lt.run(self.server.listen("127.0.0.1", 0))

    def close(self) -> None:
        self.lt.run(self.server.close())
        self.lt.stop()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer(request_timeout=0.5, keepalive_timeout=0.8)
    yield server
    server.close()


def _read_until(sock: socket.socket, marker: bytes, count: int = 1, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while data.count(marker) < count and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _post(body: bytes, extra: bytes = b"") -> bytes:
    return b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%b\r\n%b" % (
        len(body),
        extra,
        body,
    )


def test_keep_alive_serves_several_requests_on_one_connection(echo: EchoServer) -> None:
    with socket.create_connection(("127.0.0.1", echo.port)) as s:
        for i in range(3):
            s.sendall(_post(b"n%d" % i))
            data = _read_until(s, b"echo:n%d" % i)
            assert b"HTTP/1.1 200 OK" in data and b"echo:n%d" % i in data
            assert b"connection: close" not in data


def test_idle_keep_alive_connection_is_closed_after_its_timeout(echo: EchoServer) -> None:
    with socket.create_connection(("127.0.0.1", echo.port)) as s:
        s.sendall(_post(b"a"))
        _read_until(s, b"echo:a")
        start = time.monotonic()
        s.settimeout(5)
        assert s.recv(1) == b""  # closed by the server
        assert 0.5 < time.monotonic() - start < 3.0


def test_chunked_request_body_is_reassembled(echo: EchoServer) -> None:
    with socket.create_connection(("127.0.0.1", echo.port)) as s:
        s.sendall(b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        time.sleep(0.05)
        s.sendall(b"2\r\nde\r\n0\r\n\r\n")
        assert b"echo:abcde" in _read_until(s, b"echo:abcde")


def test_oversized_headers_get_431_and_close(echo: EchoServer) -> None:
    with socket.create_connection(("127.0.0.1", echo.port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n")
        data = _read_until(s, b"}")
        assert data.startswith(b"HTTP/1.1 431")
        assert b'"code":"headers_too_large"' in data
        assert s.recv(1) == b""


def test_malformed_request_gets_400(echo: EchoServer) -> None:
    with socket.create_connection(("127.0.0.1", echo.port)) as s:
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        data = _read_until(s, b"}")
        assert data.startswith(b"HTTP/1.1 400")
        assert b'"error"' in data


def test_slow_client_gets_408_after_the_request_timeout(echo: EchoServer) -> None:
    with socket.create_connection(("127.0.0.1", echo.port)) as s:
        start = time.monotonic()
        s.sendall(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nab")  # then stalls
        data = _read_until(s, b"}")
        assert data.startswith(b"HTTP/1.1 408")
        assert 0.4 < time.monotonic() - start < 3.0


def test_http10_client_gets_an_unchunked_stream_closed_at_the_end(echo: EchoServer) -> None:
    echo_small = EchoServer()
    try:

        async def handler(request: Request, response: Response) -> None:
            response.start(200, [(b"content-type", b"text/event-stream")])
            response.write(b"data: 1\n\n")
            await asyncio.sleep(0.01)
            response.write(b"data: 2\n\n")
            response.end()

        echo_small.server.state.handler = handler
        with socket.create_connection(("127.0.0.1", echo_small.port)) as s:
            s.sendall(b"GET /s HTTP/1.0\r\n\r\n")
            data = _read_until(s, b"never", timeout=3)
        head, _, body = data.partition(b"\r\n\r\n")
        assert b"transfer-encoding" not in head.lower()
        assert b"connection: close" in head.lower()
        assert body == b"data: 1\n\ndata: 2\n\n"
    finally:
        echo_small.close()


def test_expect_100_continue(echo: EchoServer) -> None:
    with socket.create_connection(("127.0.0.1", echo.port)) as s:
        s.sendall(
            b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        assert _read_until(s, b"\r\n\r\n").startswith(b"HTTP/1.1 100 Continue")
        s.sendall(b"hello")
        assert b"echo:hello" in _read_until(s, b"echo:hello")


def test_expect_100_continue_over_limit_gets_413_without_reading_the_body(echo: EchoServer) -> None:
    with socket.create_connection(("127.0.0.1", echo.port)) as s:
        s.sendall(
            b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 999999\r\nExpect: 100-continue\r\n\r\n"
        )
        data = _read_until(s, b"}")
        assert data.startswith(b"HTTP/1.1 413")


def test_a_client_that_does_not_read_pushes_back_on_the_writer(echo: EchoServer) -> None:
    s = socket.create_connection(("127.0.0.1", echo.port))
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.5)
        # The handler is parked in drain(): it wrote only what the socket buffers hold,
        # not 128 MiB into memory.
        assert echo.drains >= 1
        assert echo.streamed < 32 * 1024 * 1024
        assert not echo.handler_done
    finally:
        s.close()
    deadline = time.monotonic() + 2
    while not echo.handler_done and time.monotonic() < deadline:
        time.sleep(0.02)
    assert echo.handler_done  # the client went away: the parked handler was released
