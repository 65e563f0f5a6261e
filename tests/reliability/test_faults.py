"""The fault matrix: each backend or client failure with the one outcome the client gets,
and afterwards no leaked permit, upstream or client connection, task or file descriptor.

Backend faults come from the simulator's knobs (`sim` in the request body); malformed SSE
and idle-closing keep-alive connections from a scripted raw backend."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sluice.proxy.snapshot import StreamPolicy, StreamTimeouts
from sluice.proxy.stopwords import GuardSpec

from tests.fixtures import (
    LoopThread,
    ProcessServer,
    SimClient,
    free_port,
    routed_snapshot,
    stream_request,
)
from tests.reliability.fixtures import (
    RawBackend,
    TunedHarness,
    assert_no_leaks,
    census,
    exchange,
    statuses,
)

MSG = [{"role": "user", "content": "hi"}]
# Short deadlines so stalls end within the test; a stop string so the guarded path runs.
POLICY = StreamPolicy(
    name="faults",
    stop=("###",),
    guard=GuardSpec(stop=("###",)),
    timeouts=StreamTimeouts(first_token=1.0, inter_token=0.5, total=8.0),
)


def _harness(url: str) -> TunedHarness:
    return TunedHarness(
        # "open": a route without deadlines, where only the client's pace holds a stream.
        routed_snapshot(url, {"chat": {"policy": POLICY}, "open": {}}),
        request_timeout=1.0,
        keepalive_timeout=3.0,
    )


@pytest.fixture
def proxy(sim: ProcessServer) -> Iterator[TunedHarness]:
    h = _harness(sim.url)
    yield h
    h.close()


def _body(knobs: dict[str, Any], *, stream: bool = True, max_tokens: int = 8) -> dict[str, Any]:
    return {
        "model": "chat",
        "messages": MSG,
        "max_tokens": max_tokens,
        "stream": stream,
        "sim": knobs,
    }


def _error_code(result: Any) -> str | None:
    """The code of the stream's terminal error event (other events may be malformed)."""
    for _, event in result.events:
        if event.startswith(b'data: {"error"'):
            return str(json.loads(event[6:])["error"]["code"])
    return None


def _last_event(result: Any) -> bytes:
    return bytes(result.events[-1][1]) if result.events else b""


# (name, sim knobs, stream, status, terminal error code in the stream or the body)
BACKEND_FAULTS = [
    ("dies-before-response", {"close_after": 0}, False, 502, "upstream_reset"),
    ("dies-after-headers", {"close_after": 0}, True, 200, "upstream_reset"),
    ("dies-after-first-token", {"close_after": 3}, True, 200, "upstream_reset"),
    ("stalls", {"stall_after": 2}, True, 200, "inter_token_timeout"),
    ("stalls-before-first-token", {"stall_after": 0}, True, 200, "first_token_timeout"),
    ("drips-keepalives-no-tokens", {"stall_after": 2, "keepalive_comments_ms": 100}, True, 200,
     "inter_token_timeout"),
    ("mid-stream-error", {"error_after": 2}, True, 200, "500"),
    ("answers-429", {"status": 429}, False, 429, "429"),
    ("answers-503", {"status": 503}, True, 503, "503"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "knobs", "stream", "status", "code"),
    BACKEND_FAULTS,
    ids=[f[0] for f in BACKEND_FAULTS],
)
def test_backend_fault(
    proxy: TunedHarness,
    sim_client: SimClient,
    name: str,
    knobs: dict[str, Any],
    stream: bool,
    status: int,
    code: str,
) -> None:
    before = census(proxy)
    result = stream_request(proxy.url, _body(knobs, stream=stream), timeout=15)
    assert result.status == status
    if result.events:
        assert _last_event(result) == b"data: [DONE]"  # every broken stream ends cleanly
        assert _error_code(result) == code
    else:
        assert code in result.body.decode()
    assert_no_leaks(proxy, before)
    sim_client.wait_for(lambda s: s["active"] == 0, timeout=5)  # the backend was released


def test_backend_unreachable_is_502() -> None:
    h = _harness(f"http://127.0.0.1:{free_port()}")
    try:
        before = census(h)
        result = stream_request(h.url, _body({}), timeout=10)
        assert result.status == 502 and b"upstream_connect" in result.body
        assert_no_leaks(h, before)
    finally:
        h.close()


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


# Events sluice cannot parse are relayed as they came (the client's SDK judges them, as it
# would without a proxy); a body whose framing breaks ends in the terminal error event. A
# body with no framing at all ends at the connection's close (RFC 9112 6.3), cleanly: the
# client gets sluice's [DONE] and no error (it was an upstream_reset before 2026-12-05).
@pytest.mark.parametrize(
    ("name", "answer", "error"),
    [
        ("not-json", SSE_HEAD + _chunk(b"data: {not json}\n\n") + b"0\r\n\r\n", False),
        (
            "garbage-lines",
            SSE_HEAD
            + _chunk(b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n')
            + _chunk(b"data: garbage\n\nnot-a-field\n\n: comment\n\n")
            + b"0\r\n\r\n",
            False,
        ),
        ("bad-chunking", SSE_HEAD + b"zz\r\ndata: x\n\n\r\n", True),
        (
            "close-delimited",
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: {}\n\n",
            False,
        ),
    ],
)
def test_malformed_sse(name: str, answer: bytes, error: bool) -> None:
    lt = LoopThread()
    backend = RawBackend(lt, answer)
    h = _harness(backend.url)
    try:
        before = census(h)
        result = stream_request(h.url, _body({}), timeout=10)
        assert result.status == 200
        assert _last_event(result) == b"data: [DONE]"
        if error:
            assert (_error_code(result) or "").startswith("upstream_")
        else:
            assert _error_code(result) is None
        assert_no_leaks(h, before)
    finally:
        h.close()
        backend.stop()
        lt.stop()


JSON_OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: x\r\n\r\nzz"


# A backend's interim (1xx) responses come before its answer, in the same read or not;
# 101 answers an upgrade sluice never asks for. Before: an interim response read alone
# was taken for the answer, and a 101 reached the client (whose HTTP client failed on it)
# after an exception out of the upstream protocol closed the backend connection.
@pytest.mark.parametrize(
    ("name", "answer", "status"),
    [
        ("100-same-read", b"HTTP/1.1 100 Continue\r\n\r\n" + JSON_OK, 200),
        ("100-own-read", (b"HTTP/1.1 100 Continue\r\n\r\n", JSON_OK), 200),
        ("103-own-read", (b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n", JSON_OK), 200),
        ("101", SWITCH, 502),
        ("101-after-100", (b"HTTP/1.1 100 Continue\r\n\r\n", SWITCH), 502),
    ],
    ids=["100-same-read", "100-own-read", "103-own-read", "101", "101-after-100"],
)
def test_interim_and_switching_answers(
    name: str, answer: bytes | tuple[bytes, ...], status: int
) -> None:
    lt = LoopThread()
    backend = RawBackend(lt, answer)
    h = _harness(backend.url)
    errors = h.lt.record_errors()
    try:
        before = census(h)
        for stream in (False, True):
            result = stream_request(h.url, _body({}, stream=stream), timeout=10)
            assert result.status == status, (stream, result.body)
            if status == 200:
                assert result.body == b"{}"
            else:
                assert json.loads(result.body)["error"]["code"] == "upstream_protocol"
        assert errors == []
        assert_no_leaks(h, before)
    finally:
        h.close()
        backend.stop()
        lt.stop()


def test_backend_closing_idle_connections_costs_no_request() -> None:
    # Each answer says keep-alive, then the backend closes the connection 0.2 s later:
    # the pooled connection is gone before the next request (0.4 s apart) picks it.
    lt = LoopThread()
    body = b'{"choices":[{"index":0,"message":{"role":"assistant","content":"a"}}]}'
    answer = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
        % (
            len(body),
            body,
        )
    )
    backend = RawBackend(lt, answer, close=False, idle_close=0.2)
    h = _harness(backend.url)
    try:
        before = census(h)
        for _ in range(5):
            result = stream_request(h.url, _body({}, stream=False), timeout=10)
            assert result.status == 200
            time.sleep(0.4)
        assert backend.requests == 5
        assert_no_leaks(h, before)
    finally:
        h.close()
        backend.stop()
        lt.stop()


# -- client faults --------------------------------------------------------------------------


def test_slowloris_gets_408_at_the_read_deadline(proxy: TunedHarness) -> None:
    before = census(proxy)
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        start = time.monotonic()
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 40
        s.settimeout(0.2)
        data = b""
        for byte in head:  # one byte every 0.1 s: the deadline runs from the first
            try:
                s.sendall(bytes([byte]))
                data += s.recv(4096)
                break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        s.settimeout(5)
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        elapsed = time.monotonic() - start
    assert statuses(data) == [408]
    assert 0.9 < elapsed < 4.0
    assert_no_leaks(proxy, before)


def test_a_client_that_never_reads_holds_nothing_after_it_leaves(
    proxy: TunedHarness, sim_client: SimClient
) -> None:
    before = census(proxy)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", proxy.port))
    # ~10 MB of output (8 choices): more than every socket buffer on the way holds; on
    # the route without deadlines, where only the client's pace holds the stream.
    big = _body({"script": ["x" * 200] * 4000, "itl_ms": 0}, max_tokens=4000)
    body = json.dumps({**big, "n": 8, "model": "open"}).encode()
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    sim_client.wait_for(lambda st: st["requests"] == 1, timeout=5)
    time.sleep(1.0)
    # Still in flight: parked on the client's backpressure, not buffering the output.
    assert len(proxy.finished) == 0
    assert proxy.lt.call(lambda: proxy.app.active_streams) == 1
    s.close()
    # The backend may have finished into the socket buffers already; either way it is
    # released and so is everything the proxy held.
    sim_client.wait_for(lambda st: st["active"] == 0, timeout=5)
    assert_no_leaks(proxy, before)


def test_mass_disconnects_release_everything(proxy: TunedHarness, sim_client: SimClient) -> None:
    n = 40
    before = census(proxy)
    body = _body({"itl_ms": 20}, max_tokens=200)

    def client() -> None:
        stream_request(proxy.url, body, stop_after_events=2, timeout=15)

    threads = [threading.Thread(target=client) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    sim_client.wait_for(lambda st: st["aborted"] == n and st["active"] == 0, timeout=10)
    assert_no_leaks(proxy, before)
    finished = proxy.finished[-n:]
    assert all(ex.client_disconnected for ex in finished)
    # A raw client gets a normal answer afterwards: nothing is wedged.
    data, _ = exchange(proxy.port, b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert statuses(data) == [200]


def _named_event(name: str, sequence: int) -> bytes:
    data = json.dumps({"type": name, "sequence_number": sequence, "response": {"id": "r"}})
    return f"event: {name}\ndata: {data}\n\n".encode()


@pytest.mark.parametrize("model", ["chat", "open"])  # guarded: events parsed; open: counted
def test_a_responses_stream_the_backend_cuts_ends_in_its_error_event(model: str) -> None:
    """The Responses API's `error` event, numbered after the backend's last, and no
    `[DONE]` (its streams have none), not a chat completion's error chunk."""
    events = (_named_event("response.created", 0), _named_event("response.in_progress", 1))
    lt = LoopThread()
    backend = RawBackend(lt, SSE_HEAD + b"".join(_chunk(e) for e in events))  # then closes
    h = _harness(backend.url)
    try:
        before = census(h)
        body = {"model": model, "input": "hi", "stream": True}
        result = stream_request(h.url, body, path="/v1/responses", timeout=10)
        assert result.status == 200
        raw = [event for _, event in result.events]
        assert raw[:2] == [e.rstrip(b"\n") for e in events]
        assert len(raw) == 3 and raw[2].startswith(b"event: error\ndata: "), raw
        error = json.loads(raw[2].split(b"data: ", 1)[1])
        assert error["type"] == "error" and error["code"] == "upstream_reset"
        assert error["sequence_number"] == 2
        assert_no_leaks(h, before)
    finally:
        h.close()
        backend.stop()
        lt.stop()
