"""Foundation acceptance: streams relayed unbuffered, disconnects reach the backend, bad
input gets OpenAI-shaped errors, a broken backend gives a terminal error event."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.fixtures import (
    ProcessServer,
    ProxyHarness,
    SimClient,
    free_port,
    passthrough_snapshot,
    routed_snapshot,
    stream_request,
)

CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "Hello"}]}


@pytest.fixture
def proxy(sim: ProcessServer) -> Iterator[ProxyHarness]:
    harness = ProxyHarness(passthrough_snapshot(sim.url))
    yield harness
    harness.close()


def test_stream_arrives_spread_over_time_not_in_one_burst(proxy: ProxyHarness) -> None:
    body = {**CHAT, "stream": True, "max_tokens": 20, "sim": {"ttft_ms": 30, "itl_ms": 50}}
    result = stream_request(proxy.url, body)
    assert result.status == 200
    assert result.headers["content-type"].startswith("text/event-stream")
    assert result.headers["cache-control"] == "no-cache"
    assert result.headers["x-accel-buffering"] == "no"
    times = result.content_times()
    assert len(times) == 20
    # First content chunk within TTFT + a generous margin, the rest ~50 ms apart.
    assert times[0] < 0.03 + 0.5
    assert times[-1] - times[0] > 19 * 0.05 * 0.6
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert sum(1 for g in gaps if g > 0.02) >= 15, gaps
    assert result.data()[-1] == "[DONE]"


def test_client_disconnect_aborts_upstream_within_a_second(
    proxy: ProxyHarness, sim_client: SimClient
) -> None:
    body = {**CHAT, "stream": True, "max_tokens": 400, "sim": {"itl_ms": 20}}
    result = stream_request(proxy.url, body, stop_after_events=4)
    assert len(result.events) >= 4
    elapsed = sim_client.wait_for(lambda s: s["aborted"] >= 1, timeout=1.0)
    assert elapsed < 1.0
    deadline = time.monotonic() + 1.0
    while proxy.open_upstream_connections() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proxy.open_upstream_connections() == 0
    assert proxy.permits_in_use() == 0


def test_completed_stream_returns_connection_to_pool(proxy: ProxyHarness) -> None:
    for _ in range(3):
        result = stream_request(proxy.url, {**CHAT, "stream": True, "max_tokens": 3})
        assert result.data()[-1] == "[DONE]"
    proxy.wait_upstream_idle()
    # Keep-alive: sequential streams reused one upstream connection, which sits idle now.
    assert proxy.open_upstream_connections() == 1


def test_openai_sdk_chat_and_completions(proxy: ProxyHarness) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(
        model="sim-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=5
    )
    assert chat.choices[0].message.content
    assert chat.usage is not None and chat.usage.completion_tokens == 5

    chunks = list(
        client.chat.completions.create(
            model="sim-model",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6

    completion = client.completions.create(model="sim-model", prompt="Once", max_tokens=4)
    assert completion.choices[0].text
    assert completion.usage is not None and completion.usage.completion_tokens == 4

    stream = list(
        client.completions.create(
            model="sim-model",
            prompt="Once",
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in stream if c.choices)
    assert stream[-1].usage is not None and stream[-1].usage.completion_tokens == 4


def _assert_openai_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert set(body) == {"error"}
    assert {"message", "type", "code"} <= set(body["error"])
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


def test_bad_inputs_get_openai_shaped_errors(sim: ProcessServer) -> None:
    snapshot = routed_snapshot(sim.url, {"chat": {}, "code": {}}, max_body_bytes=2048)
    harness = ProxyHarness(snapshot)
    try:
        url = harness.url
        with httpx.Client(timeout=10) as c:
            r = c.post(
                url + "/v1/chat/completions",
                content=b'{"model": "chat", "messages": [',
                headers={"content-type": "application/json"},
            )
            _assert_openai_error(r, 400, "invalid_json")
            r = c.post(url + "/v1/chat/completions", content=b"[1, 2]")
            _assert_openai_error(r, 400, "invalid_json")
            r = c.post(
                url + "/v1/chat/completions", json={**CHAT, "model": "chat", "pad": "x" * 4096}
            )
            _assert_openai_error(r, 413, "request_too_large")
            r = c.post(url + "/v1/chat/completions", json={**CHAT, "model": "nope"})
            err = _assert_openai_error(r, 404, "model_not_found")
            assert "chat" in err["message"] and "code" in err["message"]
            r = c.get(url + "/v1/chat/completions")
            _assert_openai_error(r, 405, "method_not_allowed")
            assert r.headers["allow"] == "POST"
            r = c.get(url + "/v2/whatever")
            _assert_openai_error(r, 404, "unknown_url")
            # The proxy still serves after all of that.
            r = c.post(
                url + "/v1/chat/completions", json={**CHAT, "model": "chat", "max_tokens": 2}
            )
            assert r.status_code == 200
            assert r.headers["x-sluice-config"] == "test-1"
    finally:
        harness.close()


def test_chunked_request_body_over_limit_is_413(sim: ProcessServer) -> None:
    harness = ProxyHarness(routed_snapshot(sim.url, {"chat": {}}, max_body_bytes=1024))
    try:

        def chunks() -> Iterator[bytes]:
            for _ in range(10):
                yield b"x" * 500

        r = httpx.post(harness.url + "/v1/chat/completions", content=chunks(), timeout=10)
        _assert_openai_error(r, 413, "request_too_large")
    finally:
        harness.close()


def test_backend_down_is_502() -> None:
    harness = ProxyHarness(passthrough_snapshot(f"http://127.0.0.1:{free_port()}"))
    try:
        r = httpx.post(
            harness.url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=10
        )
        err = _assert_openai_error(r, 502, "upstream_connect")
        assert "cannot connect" in err["message"]
    finally:
        harness.close()


def test_backend_dying_mid_stream_gives_terminal_error_event(proxy: ProxyHarness) -> None:
    body = {**CHAT, "stream": True, "max_tokens": 50, "sim": {"close_after": 3}}
    result = stream_request(proxy.url, body)
    data = result.data()
    assert result.status == 200
    assert data[-1] == "[DONE]"
    assert "error" in data[-2], data[-3:]
    assert data[-2]["error"]["code"] == "upstream_reset"
    # Content before the break arrived.
    assert len(result.content_times()) == 3


def test_upstream_error_status_passes_through_openai_shaped(proxy: ProxyHarness) -> None:
    r = httpx.post(proxy.url + "/v1/chat/completions", json={**CHAT, "temperature": -1}, timeout=10)
    err = _assert_openai_error(r, 400)
    assert err["param"] == "temperature"


def test_keep_alive_and_pipelining_on_the_client_side(proxy: ProxyHarness) -> None:
    body = json.dumps({**CHAT, "max_tokens": 2}).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(request + request)  # two pipelined requests on one connection
        data = b""
        deadline = time.monotonic() + 10
        while data.count(b"HTTP/1.1 200 OK") < 2 and time.monotonic() < deadline:
            data += s.recv(65536)
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert data.count(b'"object":"chat.completion"') == 2


def test_a_pipelining_client_that_leaves_aborts_its_running_request(
    proxy: ProxyHarness, sim_client: SimClient
) -> None:
    """A whole (non-stream) answer writes nothing until it is done, so only the socket's
    close tells that its client left. With a second request queued behind it, reading
    used to pause, the close went unseen and the generation ran to its end."""
    body = json.dumps({**CHAT, "max_tokens": 400, "sim": {"itl_ms": 20}}).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(request + health)
        sim_client.wait_for(lambda stats: stats["active"] == 1, timeout=3.0)
    # The generation would take 8 s; the close is seen at once.
    elapsed = sim_client.wait_for(lambda stats: stats["aborted"] == 1, timeout=3.0)
    assert elapsed < 2.0
    # Queued past the bound (3 answered, then the slow one with 7 behind it): reading
    # paused at 10 queued and goes on once the queue is below 8 again.
    sim_client.reset()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(health * 3 + request + health * 7)
        sim_client.wait_for(lambda stats: stats["active"] == 1, timeout=3.0)
    # The generation would take 8 s; the close is seen at once.
    elapsed = sim_client.wait_for(lambda stats: stats["aborted"] == 1, timeout=3.0)
    assert elapsed < 2.0
    deadline = time.monotonic() + 2.0
    while proxy.permits_in_use() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proxy.permits_in_use() == 0 and proxy.busy_upstream_connections() == 0


def test_a_client_that_stops_reading_pauses_the_backend(
    proxy: ProxyHarness, sim_client: SimClient
) -> None:
    """Backpressure end to end: the proxy stops reading the backend instead of buffering."""
    # 6 choices x 1500 tokens of 1 KiB: ~9 MiB of events, more than the socket buffers hold.
    script = ["y" * 1024] * 1500
    body = json.dumps(
        {
            **CHAT,
            "stream": True,
            "n": 6,
            "max_tokens": 1500,
            "sim": {"itl_ms": 0, "ttft_ms": 0, "script": script},
        }
    ).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    s.connect(("127.0.0.1", proxy.port))
    try:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )

        def paused() -> bool:
            return any(c._reading_paused for r in proxy.app.pools.all() for c in r.pool.open)

        deadline = time.monotonic() + 5
        while not proxy.lt.call(paused) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proxy.lt.call(paused)

        def buffered() -> int:
            return max(
                c.transport.get_write_buffer_size()
                for c in proxy.server.state.connections
                if c.transport
            )

        # What waits for the client in sluice's memory stays bounded (no 3 MiB buffer).
        time.sleep(0.3)
        assert proxy.lt.call(buffered) < 1024 * 1024
    finally:
        s.close()
    # The client left: the paused exchange is torn down, nothing stays busy.
    deadline = time.monotonic() + 2
    while proxy.busy_upstream_connections() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.busy_upstream_connections() == 0
