"""The HTTP/1.1 server under the data plane, tested on a real socket for what a server
written on asyncio protocols must get right: keep-alive, chunked request bodies, header
limits, slow clients, HTTP/1.0, Expect: 100-continue, and backpressure."""

from __future__ import annotations

import asyncio
import gc
import re
import socket
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import unquote

import httptools
import pytest
from sluice.proxy import headernames, reader
from sluice.proxy.http import Request, Response
from sluice.proxy.response import head_bytes

from tests.fixtures import HandlerServer, send_until_answered

STREAM_CHUNK = b"x" * 65536


class EchoServer(HandlerServer):
    """Echoes the body; /stream writes 64 KiB chunks while the client keeps up."""

    def __init__(self, **state_kw: float) -> None:
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
            if request.path == "/version":
                answer = f"version:{request.http_version}|{request.keep_alive}".encode()
                response.send(200, [(b"content-type", b"text/plain")], answer)
                return
            if request.path == "/headers":  # the headers as the handler sees them
                seen = b"|".join(k + b"=" + v for k, v in sorted(request.headers.items()))
                response.send(200, [(b"content-type", b"text/plain")], b"headers:" + seen + b";")
                return
            if request.method == "GET":  # the target as the handler sees it
                target = f"{request.path}|{request.query}".encode("latin-1")
                response.send(200, [(b"content-type", b"text/plain")], b"target:" + target)
                return
            response.send(200, [(b"content-type", b"text/plain")], b"echo:" + request.body)

        super().__init__(handler, **state_kw)


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


@pytest.mark.parametrize(
    "target",
    [b"/", b"/v1/models", b"/a?b", b"/a?", b"/a?b?c", b"//x/y", b"/a%41b?x=%41&y=\"<>", b"/a?b#c",
     b"/a#f", b"http://h:1/p?q", b"/?"],
)  # fmt: skip
def test_path_and_query_are_split_as_httptools_parses_them(echo: EchoServer, target: bytes) -> None:
    """The origin form is split without httptools' URL parser (one object less per
    request); every form must come out as that parser gives it, the path's %XX escapes
    decoded (as vLLM's server decodes them: tests/proxy/test_field_policy.py)."""
    parsed = httptools.parse_url(target)
    path = unquote(parsed.path.decode("latin-1")) if parsed.path else "/"
    query = parsed.query.decode("latin-1") if parsed.query else ""
    with socket.create_connection(("127.0.0.1", echo.port)) as s:
        s.sendall(b"GET %b HTTP/1.1\r\nHost: t\r\n\r\n" % target)
        expected = b"target:" + f"{path}|{query}".encode("latin-1")
        data = _read_until(s, expected)
        assert data.endswith(b"\r\n\r\n" + expected), data


def test_split_request_targets_are_remembered_only_without_a_query_and_boundedly() -> None:
    """A path asked for again is split once (`reader._known_paths`); a target with a
    query is never remembered (each may be new), and no more than MAX_KNOWN_PATHS are."""
    targets = [b"/bound/%d" % i for i in range(reader.MAX_KNOWN_PATHS + 50)]
    for target in targets * 2:
        assert reader._path_and_query(target) == (target.decode(), "")
    assert len(reader._known_paths) <= reader.MAX_KNOWN_PATHS
    assert reader._path_and_query(b"/with?q=%d" % 7) == ("/with", "q=7")
    assert b"/with?q=7" not in reader._known_paths


def test_header_names_are_lowered_and_remembered_boundedly() -> None:
    """`lower_name` is `bytes.lower()`, each name lowered once, and it remembers no more
    than MAX_KNOWN_NAMES names (any later ones are lowered each time they come)."""
    names = [b"X-Name-%d" % i for i in range(headernames.MAX_KNOWN_NAMES + 40)]
    for name in [*names, *names, b"Content-TYPE", b"host"]:
        assert headernames.lower_name(name) == name.lower()
    assert len(headernames._lowered) <= headernames.MAX_KNOWN_NAMES


def test_a_response_head_is_its_status_line_date_headers_and_extra() -> None:
    """`head_bytes` with its status lines built once: a known status with its reason, an
    unknown one as "Unknown", the Date header of now, then the headers and `extra`."""
    head = head_bytes(299, [(b"a", b"b")], b"x: y\r\n")
    assert head.startswith(b"HTTP/1.1 299 Unknown\r\ndate: ")
    assert head.endswith(b"\r\na: b\r\nx: y\r\n\r\n")
    known = head_bytes(404, [], b"")
    lines = known.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 404 Not Found" and lines[2:] == [b"", b""]
    date = parsedate_to_datetime(lines[1].removeprefix(b"date: ").decode())
    assert abs(date.timestamp() - time.time()) < 5


@pytest.mark.parametrize("version", ["1.0", "1.1"])
@pytest.mark.parametrize(
    "connection",
    [None, b"close", b"keep-alive", b"Keep-Alive", b"close, x-a", b"keep-alive, x-a", b"x-a", b""],
)
def test_the_http_version_and_keep_alive_are_the_request_lines(
    echo: EchoServer, version: str, connection: bytes | None
) -> None:
    """The version is known without asking httptools for it when the request may be kept
    alive with no Connection header (only HTTP/1.1 is); in every other case it asks."""
    header = b"" if connection is None else b"Connection: %b\r\n" % connection
    tokens = [] if connection is None else [t.strip().lower() for t in connection.split(b",")]
    alive = b"close" not in tokens if version == "1.1" else b"keep-alive" in tokens
    expected = b"\r\n\r\nversion:%b|%b" % (version.encode(), str(alive).encode())
    with socket.create_connection(("127.0.0.1", echo.port)) as s:
        s.sendall(b"GET /version HTTP/%b\r\nHost: t\r\n%b\r\n" % (version.encode(), header))
        data = _read_until(s, expected)
    assert data.endswith(expected), data


def _version_request(version: bytes) -> bytes:
    return b"GET /version HTTP/%b\r\nHost: t\r\nConnection: keep-alive\r\n\r\n" % version


@pytest.mark.parametrize(
    "sends",
    [
        [_version_request(b"1.0") + _version_request(b"1.1")],  # pipelined in one read
        [_version_request(b"1.1") + _version_request(b"1.0")],  # the same line lengths
        [b"\r\n" + _version_request(b"1.0") + _version_request(b"1.1")],  # a blank line first
        [b"GET /version HT", b"TP/1.0\r\nConnection: keep-alive\r\n\r\n" + _version_request(b"1.1")],
        [b"GET /vers", b"ion HTTP/1.1\r\nHost: t\r\n\r\n" + _version_request(b"1.0")],
    ],
)  # fmt: skip
def test_the_version_of_each_request_in_a_read_is_its_own(
    echo: EchoServer, sends: list[bytes]
) -> None:
    """A read's first request has its version read from the read; the others (a pipelined
    one, one after a blank line, one whose line came in two reads) from httptools."""
    versions = re.findall(rb"HTTP/(1\.[01])\r\n", b"".join(sends))
    with socket.create_connection(("127.0.0.1", echo.port)) as s:
        for data in sends:
            s.sendall(data)
            time.sleep(0.05)
        answer = _read_until(s, b"version:", count=2)
        answer += _read_until(s, b"|True", count=2 - answer.count(b"|True"), timeout=1.0)
    assert re.findall(rb"version:(1\.[01])\|True", answer) == versions, answer


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


def test_a_chunked_bodys_trailers_never_reach_the_requests_headers(echo: EchoServer) -> None:
    """Trailers come after the head was checked and routed: a trailing Host, Expect or
    Content-Type must not change what the handler reads (both builds' parsers)."""
    with socket.create_connection(("127.0.0.1", echo.port)) as s:
        s.sendall(
            b"POST /headers HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
            b"Host: evil\r\nExpect: x\r\nContent-Type: text/plain\r\nX-T: v\r\n\r\n"
        )
        data = _read_until(s, b";")
    assert data.startswith(b"HTTP/1.1 200")
    assert b"headers:content-type=application/json|host=t|transfer-encoding=chunked;" in data, data


def test_a_trailer_that_never_ends_gets_431(echo: EchoServer) -> None:
    """The parser holds a trailer's value until its line ends: refused once ~73 KiB came
    with no end, not when the client stops."""
    with socket.create_connection(("127.0.0.1", echo.port)) as s:
        s.sendall(
            b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-T: "
        )
        data, sent = send_until_answered(s, b"a" * 16384, 8 * 1024 * 1024)
        data += _read_until(s, b"}", timeout=3)
    assert data.startswith(b"HTTP/1.1 431"), data[:200]
    assert b"request trailers too large" in data
    assert sent < 1024 * 1024


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


# -- hardening (issue 12): each reproducer of the issue, on a raw socket ------------------


class HardServer(HandlerServer):
    """A server whose handler shows what arrived: /slow sleeps, /stream streams slowly,
    /claim takes an upgrade over and echoes raw bytes; anything else echoes the body."""

    def __init__(self, **state_kw: object) -> None:
        self.handled: list[tuple[str, str, bytes, bytes | None]] = []

        async def handler(request: Request, response: Response) -> None:
            self.handled.append((request.method, request.path, request.body, request.upgrade))
            if request.path == "/slow":
                await asyncio.sleep(0.6)
            if request.path == "/stream":
                response.start(200, [(b"content-type", b"text/event-stream")])
                for i in range(4):
                    response.write(b"data: %d\n\n" % i)
                    await asyncio.sleep(0.1)
                response.end()
                return
            response.send(200, [(b"content-type", b"text/plain")], b"echo:" + request.body)

        kw: dict[str, object] = {"request_timeout": 0.5, "keepalive_timeout": 5.0, **state_kw}
        super().__init__(handler, **kw)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port))


@pytest.fixture
def hard() -> Iterator[HardServer]:
    server = HardServer()
    yield server
    server.close()


def _read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything until the server closes (EOF), failing on a reset."""
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def _statuses(data: bytes) -> list[int]:
    """The status of each response head in `data` (bodies here never hold one)."""
    return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


def test_a_stray_byte_after_a_complete_request_gets_its_response_then_400(
    hard: HardServer,
) -> None:
    # A client whose Content-Length is one byte short: `}` is left over.
    with hard.connect() as s:
        s.sendall(_post(b'{"a":1') + b"}")
        data = _read_all(s)
    assert _statuses(data) == [200, 400]
    assert b'echo:{"a":1' in data and b'"code":"bad_http"' in data
    assert [h[2] for h in hard.handled] == [b'{"a":1']


def test_http10_post_with_a_body_and_no_content_length_gets_411(hard: HardServer) -> None:
    with hard.connect() as s:
        s.sendall(b'POST /x HTTP/1.0\r\nHost: t\r\n\r\n{"model": "m"}')
        data = _read_all(s)
    assert _statuses(data) == [411]
    assert b'"code":"length_required"' in data
    assert hard.handled == []  # refused whole: the handler never ran


@pytest.mark.parametrize(
    "upgrade",
    [
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n",
        b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n",
    ],
    ids=["h2c", "websocket"],
)
def test_an_upgrade_request_is_answered_normally_with_its_body(
    hard: HardServer, upgrade: bytes
) -> None:
    with hard.connect() as s:
        # As `curl --http2 -d ...` sends it: a POST with a body and an Upgrade.
        s.sendall(_post(b"hello", upgrade))
        first = _read_until(s, b"echo:hello")
        assert first.startswith(b"HTTP/1.1 200") and b"echo:hello" in first
        s.sendall(_post(b"again"))  # the connection is still HTTP/1.1, kept alive
        assert b"echo:again" in _read_until(s, b"echo:again")
    assert hard.handled[0][3] in (b"h2c", b"websocket")  # the intent stays visible
    assert hard.handled[1][3] is None


class EchoUpgrade:
    """An upgrade hook (as proxy/websocket.py is one) that claims `Upgrade: echo` on
    /claim: writes its 101, then echoes raw bytes."""

    def claims(self, request: Request) -> bool:
        return request.path == "/claim" and request.headers.get(b"upgrade") == b"echo"

    async def run(self, conn: Any, request: Request, rest: bytes) -> None:
        transport = conn.transport
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        class Echo(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                transport.write(b"echo:" + data)

            def connection_lost(self, exc: Exception | None) -> None:
                if not done.done():
                    done.set_result(None)

        transport.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: echo\r\n\r\n")
        transport.set_protocol(Echo())
        if rest:
            transport.write(b"echo:" + rest)
        await done


def test_an_upgrade_hook_takes_the_requests_it_claims(hard: HardServer) -> None:
    hard.state.upgrade = EchoUpgrade()
    with hard.connect() as s:
        s.sendall(b"GET /claim HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
        assert _read_until(s, b"\r\n\r\n").startswith(b"HTTP/1.1 101")
        s.sendall(b"raw bytes")
        assert _read_until(s, b"raw bytes") == b"echo:raw bytes"
    with hard.connect() as s:  # one it does not claim is answered over HTTP/1.1
        s.sendall(_post(b"hi", b"Connection: upgrade\r\nUpgrade: echo\r\n"))
        assert b"echo:hi" in _read_until(s, b"echo:hi")


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /x HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /x HTTP/2.0\r\nHost: t\r\n\r\n", 505),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),  # h2 prior knowledge
        (b"GET /x\r\n\r\n", 400),  # no version
        (
            b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
            501,
        ),
        (b"POST /x HTTP/1.1\r\nHost: t\r\nExpect: bananas\r\nContent-Length: 2\r\n\r\nab", 417),
        # llhttp reads any CONNECT as a tunnel: an origin-form one left the server with
        # an upgrade it could not decline (no answer, a traceback in the log)
        (b"CONNECT /x HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n", 405),
        (b"CONNECT t:443 HTTP/1.1\r\nHost: t\r\n\r\n", 405),
    ],
    ids=[
        "no-host",
        "two-hosts",
        "http2-line",
        "h2-preface",
        "no-version",
        "gzip-chunked",
        "expect",
        "connect-origin-form",
        "connect-authority-form",
    ],
)
def test_heads_the_server_refuses(hard: HardServer, raw: bytes, status: int) -> None:
    with hard.connect() as s:
        s.sendall(raw)
        data = _read_all(s)
    assert _statuses(data) == [status]
    assert b'{"error":' in data
    assert hard.handled == []


def test_http10_expect_gets_no_100_continue(hard: HardServer) -> None:
    with hard.connect() as s:
        s.sendall(
            b"POST /x HTTP/1.0\r\nHost: t\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        )
        time.sleep(0.2)
        s.sendall(b"ok")
        data = _read_all(s)
    assert _statuses(data) == [200] and b"echo:ok" in data


def test_100_continue_is_never_written_inside_another_response(hard: HardServer) -> None:
    with hard.connect() as s:
        s.sendall(
            b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n"
            b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        )
        data = _read_until(s, b"100 Continue\r\n\r\n", timeout=3)
        stream, end, rest = data.partition(b"\r\n0\r\n\r\n")
        assert end and b"100 Continue" not in stream  # the stream's body is intact
        assert rest == b"HTTP/1.1 100 Continue\r\n\r\n"  # owed, and sent after it
        s.sendall(b"ok")
        assert b"echo:ok" in _read_until(s, b"echo:ok")


def test_a_huge_header_is_refused_before_it_is_all_sent(hard: HardServer) -> None:
    with hard.connect() as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\nX-Big: ")
        data, sent = send_until_answered(s, b"a" * 16384, 8 * 1024 * 1024)
        data += _read_until(s, b"}", timeout=3)
    assert data.startswith(b"HTTP/1.1 431")
    assert sent < 1024 * 1024  # refused after ~74 KiB, not when the header ended


def test_a_413_is_read_by_a_client_still_sending_its_body(hard: HardServer) -> None:
    # Lingering close: without it, closing with unread input resets the connection and
    # the client's recv fails instead of returning the 413.
    with hard.connect() as s:
        s.sendall(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 300000\r\n\r\n")
        time.sleep(0.2)
        try:
            s.sendall(b"x" * 300000)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = _read_all(s)
    assert _statuses(data) == [413]


def test_connections_beyond_the_cap_get_503() -> None:
    server = HardServer(max_connections=3)
    try:
        held = [server.connect() for _ in range(3)]
        time.sleep(0.1)
        with server.connect() as s:
            s.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
            data = _read_all(s)
        assert _statuses(data) == [503]
        assert b"retry-after: 1" in data and b"too_many_connections" in data
        for h in held:
            h.close()
        time.sleep(0.2)
        with server.connect() as s:  # room again
            s.sendall(_post(b"a"))
            assert b"echo:a" in _read_until(s, b"echo:a")
    finally:
        server.close()


def test_request_bodies_held_at_once_are_capped() -> None:
    from sluice.proxy.budget import BodyBudget

    server = HardServer(body_budget=BodyBudget(2000))
    try:
        a, b = server.connect(), server.connect()
        for s in (a, b):  # two bodies of 1000 declared, still arriving
            s.sendall(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\nab")
        time.sleep(0.1)
        with server.connect() as c:
            c.sendall(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
            data = _read_all(c)
        assert _statuses(data) == [503] and b"server_busy" in data
        for s in (a, b):
            s.sendall(b"x" * 998)
            assert b"echo:ab" in _read_until(s, b"echo:ab")
            s.close()
        time.sleep(0.1)
        assert server.lt.call(lambda: server.state.body_budget.used) == 0
    finally:
        server.close()


def test_a_partly_received_pipelined_request_is_under_the_read_deadline(
    hard: HardServer,
) -> None:
    with hard.connect() as s:
        start = time.monotonic()
        # The first request takes 0.6 s; the second's head never ends (0.5 s deadline).
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\nGET /x HTTP/1.1\r\nHost: t\r\nX-A: b")
        data = _read_all(s)
        elapsed = time.monotonic() - start
    assert _statuses(data) == [200, 408]
    assert elapsed < 3.0


def test_a_handler_that_raises_gets_500_and_the_connection_closes(
    hard: HardServer,
) -> None:
    async def broken(request: Request, response: Response) -> None:
        raise RuntimeError("bug")

    hard.state.handler = broken
    with hard.connect() as s:
        s.sendall(_post(b"a"))
        data = _read_all(s)
    assert _statuses(data) == [500]


def test_a_closed_connection_frees_its_parser_without_the_cycle_collector(
    echo: EchoServer,
) -> None:
    """The parser and the reader hold each other (its callbacks are the reader's
    methods), and the C parser keeps its buffers' capacity: a connection that closed
    frees its parser at once, not at the next collection (which a raised young-generation
    threshold makes rarer)."""
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", echo.port)) as s:
                s.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 30000 + b"\r\n\r\n")
                assert b"target:/x" in _read_until(s, b"target:/x")
        deadline = time.monotonic() + 5
        while echo.lt.call(lambda: len(echo.state.connections)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert echo.lt.call(lambda: len(echo.state.connections)) == 0
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if "Parser" in type(o).__name__]
        readers = [o for o in gc.garbage if type(o).__name__ == "RequestReader"]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert readers, "the connections' readers were expected among the collected cycles"
    assert left == [], left
