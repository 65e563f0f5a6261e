"""WebSocket on the completion paths, driven by a real client library (`websockets`):
same auth, limits, deadlines, abort-on-close and completion records as SSE."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import websockets
from sluice.proxy.build import build_kind
from sluice.proxy.snapshot import App, Backend, QueueLimits, StreamPolicy, StreamTimeouts
from sluice.proxy.websocket import WebSocketUpgrade

from tests.fixtures import ProcessServer, ProxyHarness, SimClient, routed_snapshot, stream_request

KEY = "sk-ws-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


def make(sim_url: str, policy: StreamPolicy | None = None, **backend_kw: Any) -> ProxyHarness:
    digest = hashlib.sha256(KEY.encode()).digest()
    app = App(name="ws-app", key_hashes=frozenset({digest}), routes=None)
    backend = Backend(name="sim", urls=(sim_url,), **backend_kw)
    route: dict[str, Any] = {"policy": policy} if policy else {}
    snap = routed_snapshot(
        sim_url, {"chat": route}, backend=backend, apps=(app,), apps_by_key={digest: app}
    )
    h = ProxyHarness(snap)
    h.server.state.upgrade = WebSocketUpgrade(h.app)
    return h


@pytest.fixture
def proxy(sim: ProcessServer) -> Iterator[ProxyHarness]:
    h = make(sim.url)
    yield h
    h.close()


def body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "chat",
        "messages": [{"role": "user", "content": "Hi there"}],
        "max_tokens": 12,
        "seed": 3,
        **extra,
    }


async def exchange(
    url: str,
    request: dict[str, Any] | str,
    *,
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
    stop_after: int | None = None,
) -> tuple[list[str], int | None, dict[str, str]]:
    """Messages received, the server's close code, and the 101 response's headers."""
    ws_url = url.replace("http://", "ws://") + path
    messages: list[str] = []
    async with websockets.connect(ws_url, additional_headers=headers or AUTH) as ws:
        assert ws.response is not None
        response_headers = dict(ws.response.headers)
        await ws.send(request if isinstance(request, str) else json.dumps(request))
        try:
            while True:
                message = await ws.recv()
                assert isinstance(message, str)
                messages.append(message)
                if stop_after is not None and len(messages) >= stop_after:
                    break
        except websockets.ConnectionClosed:
            pass
    rcvd = ws.protocol.close_rcvd.code if ws.protocol.close_rcvd is not None else None
    return messages, rcvd, response_headers


def text(messages: list[str]) -> str:
    out = []
    for message in messages:
        if message == "[DONE]":
            continue
        for choice in json.loads(message).get("choices") or []:
            out.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
    return "".join(out)


def test_chat_stream_as_messages_equals_the_sse_stream(proxy: ProxyHarness) -> None:
    messages, code, headers = asyncio.run(exchange(proxy.url, body()))
    assert code == 1000
    assert messages[-1] == "[DONE]"
    assert headers.get("x-request-id")
    sse = stream_request(proxy.url, {**body(), "stream": True}, headers=AUTH)
    assert text(messages) == sse.text()
    assert len(messages) == len(sse.data())
    record = proxy.finished[0]
    assert (record.app, record.route, record.status, record.stream) == ("ws-app", "chat", 200, True)


def test_completions_path(proxy: ProxyHarness) -> None:
    request = {"model": "chat", "prompt": "Once", "max_tokens": 5, "seed": 3}
    messages, code, _ = asyncio.run(exchange(proxy.url, request, path="/v1/completions"))
    assert code == 1000 and messages[-1] == "[DONE]"
    assert json.loads(messages[0])["object"] == "text_completion"


def test_same_auth_as_sse(proxy: ProxyHarness) -> None:
    messages, code, _ = asyncio.run(exchange(proxy.url, body(), headers={"x-other": "1"}))
    assert code == 4401
    assert json.loads(messages[0])["error"]["code"] == "missing_api_key"
    messages, code, _ = asyncio.run(exchange(proxy.url, "not json"))
    assert code == 4400
    assert json.loads(messages[0])["error"]["code"] == "invalid_json"


def test_closing_the_socket_aborts_the_generation(
    proxy: ProxyHarness, sim_client: SimClient
) -> None:
    request = body(max_tokens=2000, sim={"itl_ms": 10})
    messages, _, _ = asyncio.run(exchange(proxy.url, request, stop_after=3))
    assert len(messages) == 3
    assert sim_client.wait_for(lambda s: s["aborted"] >= 1, timeout=2.0) < 2.0
    deadline = time.monotonic() + 2.0
    while proxy.permits_in_use() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proxy.permits_in_use() == 0
    assert proxy.finished[-1].client_disconnected


def test_limits_and_deadlines_apply(sim: ProcessServer) -> None:
    policy = StreamPolicy(
        name="p", timeouts=StreamTimeouts(first_token=0.3), keepalive_interval=None
    )
    h = make(sim.url, policy, max_concurrency=1, queue=QueueLimits(max_len=1, max_wait=0.2))
    try:

        async def both() -> tuple[Any, Any]:
            slow = exchange(h.url, body(max_tokens=30, sim={"ttft_ms": 50, "itl_ms": 20}))
            first = asyncio.ensure_future(slow)
            await asyncio.sleep(0.2)
            second = await exchange(h.url, body())
            return await first, second

        (ok, ok_code, _), (refused, refused_code, _) = asyncio.run(both())
        assert ok_code == 1000 and ok[-1] == "[DONE]"
        assert refused_code == 4503
        assert json.loads(refused[0])["error"]["code"] == "backend_saturated"
        late, code, _ = asyncio.run(exchange(h.url, body(sim={"ttft_ms": 3000})))
        assert code == 1000
        assert json.loads(late[-2])["error"]["code"] == "first_token_timeout"
        assert late[-1] == "[DONE]"
    finally:
        h.close()


def test_other_upgrades_are_not_claimed(proxy: ProxyHarness) -> None:
    def raw(path: str, extra: str) -> bytes:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(
                # `close`: an upgrade nobody claims is ignored and the request answered
                # over HTTP/1.1 (issue 12), on a connection that would otherwise stay open.
                f"GET {path} HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n"
                f"connection: upgrade, close\r\n{extra}\r\n".encode()
            )
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data

    assert not raw("/v1/models", "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n").startswith(
        b"HTTP/1.1 101"
    )
    missing_key = raw("/v1/chat/completions", "sec-websocket-version: 13\r\n")
    assert missing_key.startswith(b"HTTP/1.1 400")
    assert b"bad_websocket_handshake" in missing_key


def _frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame."""
    mask = b"\x01\x02\x03\x04"
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload))


HANDSHAKE = (
    b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n"
)


def _read_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def test_a_request_and_a_close_in_one_read_reach_no_backend_and_log_nothing(
    proxy: ProxyHarness, sim_client: SimClient
) -> None:
    """The client's request message and its Close frame in one segment: the client is
    gone before the request runs. It used to run anyway (asyncio.wait_for kept the
    message and dropped the cancellation) and to fail with a traceback at its first
    chunk."""
    errors = proxy.lt.record_errors()
    handler_errors: list[BaseException] = []
    proxy.server.state.on_error = handler_errors.append
    message = json.dumps(body(max_tokens=3)).encode()
    sim_client.reset()
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(HANDSHAKE + _frame(1, message) + _frame(8, (1000).to_bytes(2, "big")))
        reply = _read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 101 ")
    time.sleep(0.5)
    assert sim_client.stats()["requests"] == 0
    assert errors == [] and handler_errors == []


def test_an_oversized_message_then_a_ping_in_one_read_closes_once(
    proxy: ProxyHarness,
) -> None:
    """A ping after the message that closed the connection is not answered (wsproto
    refuses a pong while closing: that escaped the protocol callback)."""
    errors = proxy.lt.record_errors()
    limit = proxy.server.state.max_body_bytes()
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(HANDSHAKE)
        assert sock.recv(4096).startswith(b"HTTP/1.1 101 ")
        sock.sendall(_frame(1, b"x" * (limit + 10)) + _frame(9, b"p"))
        reply = _read_until_closed(sock)
    assert reply[:1] == b"\x88" and reply[2:4] == (1009).to_bytes(2, "big"), reply[:40]
    assert errors == []


def test_the_message_limit_counts_bytes_not_characters(proxy: ProxyHarness) -> None:
    """Four-byte characters: fewer characters than the limit, more bytes (an HTTP body of
    the same bytes gets 413)."""
    limit = proxy.server.state.max_body_bytes()
    text = json.dumps(body(filler="\U0001f600" * (limit // 4 + 100)), ensure_ascii=False)
    assert len(text) < limit < len(text.encode())
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(HANDSHAKE)
        assert sock.recv(4096).startswith(b"HTTP/1.1 101 ")
        sock.sendall(_frame(1, text.encode()))
        reply = _read_until_closed(sock)
    assert reply[:1] == b"\x88" and reply[2:4] == (1009).to_bytes(2, "big"), reply[:40]


def test_a_handshake_header_that_is_not_ascii_is_a_400(proxy: ProxyHarness) -> None:
    """wsproto decodes Host, Connection, ... as ASCII: a byte above 0x7f raised past the
    handshake, and the connection closed without an answer (a traceback in the log)."""
    handler_errors: list[BaseException] = []
    proxy.server.state.on_error = handler_errors.append
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(HANDSHAKE.replace(b"Host: x", b"Host: caf\xe9"))
        reply = _read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:80]
    assert b"bad_websocket_handshake" in reply and b"not ASCII" in reply
    assert handler_errors == []


def test_pings_from_a_client_that_does_not_read_are_answered_once_it_reads(
    proxy: ProxyHarness,
) -> None:
    """A client that pings and never reads: while its connection's writing is paused, only
    the latest ping is answered, when writing resumes (each was answered before, without
    bound, into the write buffer)."""
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(HANDSHAKE)
        assert sock.recv(4096).startswith(b"HTTP/1.1 101 ")
        conn = proxy.lt.call(lambda: next(iter(proxy.server.state.connections)))
        proxy.lt.call(conn.pause_writing)  # as the transport does when its buffer is full
        sock.sendall(b"".join(_frame(9, b"p%d" % i) for i in range(2000)))
        time.sleep(0.5)
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(4096)  # nothing answered while paused
        proxy.lt.call(conn.transport.get_protocol().resume_writing)
        sock.settimeout(5)
        pong = sock.recv(4096)
    assert pong == b"\x8a\x05p1999"  # one pong, for the latest ping


def test_the_request_message_counts_against_the_servers_body_budget(
    proxy: ProxyHarness, sim_client: SimClient
) -> None:
    """Every connection's message was held outside the budget HTTP bodies share: 4,096
    connections each sending a 4 MiB message held 16 GiB."""
    budget = proxy.server.state.body_budget
    held = proxy.lt.call(lambda: budget.limit - budget.used)
    assert proxy.lt.call(lambda: budget.reserve(held))
    sim_client.reset()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(HANDSHAKE)
            assert sock.recv(4096).startswith(b"HTTP/1.1 101 ")
            sock.sendall(_frame(1, json.dumps(body(max_tokens=3)).encode()))
            reply = _read_until_closed(sock)
        assert reply[:1] == b"\x88" and reply[2:4] == (1013).to_bytes(2, "big"), reply[:40]
        assert sim_client.stats()["requests"] == 0
    finally:
        proxy.lt.call(lambda: budget.release(held))
    messages, code, _ = asyncio.run(exchange(proxy.url, body(max_tokens=3)))
    assert code == 1000 and messages[-1] == "[DONE]"
    assert proxy.lt.call(lambda: budget.used) == 0  # the message's bytes went back


@pytest.mark.skipif(
    build_kind() == "compiled", reason="compiled, the app's method cannot be replaced"
)
def test_a_fault_of_sluices_own_closes_with_1011(
    proxy: ProxyHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An HTTP client gets a 500 for a bug in the pipeline; a WebSocket client got a bare
    TCP close, with no close frame. Now: 1011, and the error is still reported."""
    handler_errors: list[BaseException] = []
    proxy.server.state.on_error = handler_errors.append

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(proxy.app, "completions", broken)
    messages, code, _ = asyncio.run(exchange(proxy.url, body(max_tokens=3)))
    assert code == 1011 and messages == []
    assert [str(e) for e in handler_errors] == ["a bug"]
