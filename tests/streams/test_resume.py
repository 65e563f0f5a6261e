"""Resumable SSE: a client dropped mid-stream reconnects with Last-Event-ID and receives
exactly what it missed, then the live rest of the same generation."""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from sluice.proxy.resume import StreamRegistry
from sluice.proxy.snapshot import App, StreamPolicy

from tests.fixtures import (
    ProcessServer,
    ProxyHarness,
    SimClient,
    passthrough_snapshot,
    routed_snapshot,
    start_sim,
)
from tests.streams.fixtures import RawStream, raw_stream, text_of

KEY = "sk-resume-test"
KEY2 = "sk-resume-test-2"  # the same app's second key: not the stream's key
AUTH = {"authorization": f"Bearer {KEY}"}
RESUMABLE = StreamPolicy(name="resumable", resume_window=3.0, keepalive_interval=None)


def chat(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": "chat",
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "stream": True,
        "max_tokens": max_tokens,
        "seed": 16,
        **extra,
    }


def harness(sim_url: str, policy: StreamPolicy = RESUMABLE) -> ProxyHarness:
    digests = [hashlib.sha256(k.encode()).digest() for k in (KEY, KEY2)]
    app = App(name="a", key_hashes=frozenset(digests), routes=None)
    snap = routed_snapshot(
        sim_url, {"chat": {"policy": policy}}, apps=(app,), apps_by_key=dict.fromkeys(digests, app)
    )
    return ProxyHarness(snap)


@pytest.fixture
def proxy(sim: ProcessServer) -> Iterator[ProxyHarness]:
    h = harness(sim.url)
    yield h
    h.close()


def wait_until(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def post(proxy: ProxyHarness, body: dict[str, Any], **kw: Any) -> RawStream:
    return raw_stream(proxy.url, "POST", "/v1/chat/completions", body, AUTH, **kw)


def resume(proxy: ProxyHarness, rid: str, last_id: str | None, **kw: Any) -> RawStream:
    headers = dict(AUTH)
    if last_id is not None:
        headers["last-event-id"] = last_id
    return raw_stream(proxy.url, "GET", f"/v1/streams/{rid}", None, headers, **kw)


def test_random_drops_and_resumes_equal_an_uninterrupted_run(proxy: ProxyHarness) -> None:
    body = chat(60)
    full = post(proxy, body)
    assert full.status == 200 and full.complete
    ids = [e.id for e in full.data_events()]
    assert ids == [f"{full.headers['x-request-id']}:{n}" for n in range(len(ids))]
    rng = random.Random(16)
    for _ in range(5):
        first = post(proxy, body, stop_after=rng.randint(1, 30))
        rid = first.headers["x-request-id"]
        events = first.data_events()
        last_id = first.last_id
        for _drop in range(3):  # up to three more drops in the same stream
            time.sleep(rng.uniform(0.0, 0.3))
            part = resume(proxy, rid, last_id, stop_after=rng.randint(1, 25))
            assert part.status == 200
            events += part.data_events()
            last_id = part.last_id or last_id
            if part.complete:
                break
        if not (events and events[-1].data == "[DONE]"):
            rest = resume(proxy, rid, last_id)
            assert rest.status == 200 and rest.complete
            events += rest.data_events()
        assert text_of(events) == full.text()  # byte for byte
        numbers = [int(e.id.rsplit(":", 1)[1]) for e in events if e.id]
        assert numbers == list(range(len(numbers))), "a missed or repeated event"
        assert events[-1].data == "[DONE]"
    wait_until(lambda: proxy.permits_in_use() == 0, 2.0)


def test_resume_without_last_event_id_replays_from_the_start(proxy: ProxyHarness) -> None:
    first = post(proxy, chat(20), stop_after=3)
    rest = resume(proxy, first.headers["x-request-id"], None)
    assert rest.status == 200 and rest.complete
    assert rest.data_events()[0].id == first.data_events()[0].id
    assert rest.data_events()[:3] == first.data_events()[:3]


def test_a_newer_connection_takes_the_stream_over(proxy: ProxyHarness) -> None:
    body = chat(40, sim={"itl_ms": 20})
    first = post(proxy, body, stop_after=2)
    rid = first.headers["x-request-id"]
    second = resume(proxy, rid, first.last_id, stop_after=2)  # leaves a half-read socket
    third = resume(proxy, rid, second.last_id)
    assert third.status == 200 and third.complete
    got = first.data_events() + second.data_events() + third.data_events()
    assert text_of(got) == post(proxy, body).text()


@pytest.fixture(scope="module")
def own_sim() -> Iterator[ProcessServer]:
    """A simulator only these tests use: its `aborted` count is theirs alone, not raised by
    a generation another test left behind (the session's `sim` serves every test)."""
    server = start_sim("--ttft-ms", "20", "--itl-ms", "10")
    yield server
    server.stop()


@pytest.fixture
def own_sim_client(own_sim: ProcessServer) -> SimClient:
    client = SimClient(own_sim.url)
    client.reset()
    return client


def test_generation_is_aborted_after_the_window(
    own_sim: ProcessServer, own_sim_client: SimClient
) -> None:
    sim_client = own_sim_client
    h = harness(own_sim.url, StreamPolicy(name="short", resume_window=1.0, keepalive_interval=None))
    try:
        first = post(h, chat(3000, sim={"itl_ms": 10}), stop_after=3)
        rid = first.headers["x-request-id"]
        time.sleep(0.3)
        assert sim_client.stats()["aborted"] == 0, "aborted before the window passed"
        elapsed = sim_client.wait_for(lambda s: s["aborted"] >= 1, timeout=3.0)
        assert elapsed < 2.5
        wait_until(lambda: h.permits_in_use() == 0 and h.busy_upstream_connections() == 0, 2.0)
        late = resume(h, rid, first.last_id)
        assert late.status == 410
        assert b'"stream_gone"' in late.body
    finally:
        h.close()


def test_buffer_overflow_while_away_aborts_and_answers_410(
    own_sim: ProcessServer, own_sim_client: SimClient
) -> None:
    sim_client = own_sim_client
    policy = StreamPolicy(name="tiny", resume_window=5.0, resume_buffer=2048)
    h = harness(own_sim.url, policy)
    try:
        first = post(h, chat(400, sim={"itl_ms": 2}), stop_after=1)
        sim_client.wait_for(lambda s: s["aborted"] >= 1, timeout=3.0)
        late = resume(h, first.headers["x-request-id"], first.last_id)
        assert late.status == 410
        assert h.permits_in_use() == 0
    finally:
        h.close()


def test_a_late_resume_leaves_the_connections_next_request_alone(sim: ProcessServer) -> None:
    """The task that ran a resumable stream goes on to its connection's next request. A
    resume that comes after the stream ended and finds its buffer trimmed (410 aborts the
    generation) must not cancel that next request."""
    policy = StreamPolicy(name="tiny", resume_window=5.0, resume_buffer=2048)
    h = harness(sim.url, policy)
    parts = urlsplit(h.url)
    assert parts.hostname is not None and parts.port is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    try:
        headers = {**AUTH, "content-type": "application/json"}
        conn.request("POST", "/v1/chat/completions", json.dumps(chat(200)), headers)
        first = conn.getresponse()
        rid = first.getheader("x-request-id")
        assert first.status == 200 and first.read().endswith(b"data: [DONE]\n\n")
        slow = chat(60, sim={"itl_ms": 10})
        conn.request("POST", "/v1/chat/completions", json.dumps(slow), headers)
        second = conn.getresponse()
        assert second.status == 200
        began = second.read(64)
        assert resume(h, rid, None).status == 410  # the first stream's events were trimmed
        body = began + second.read()
        assert body.endswith(b"data: [DONE]\n\n") and b'"error"' not in body
    finally:
        conn.close()
        h.close()


def test_resume_is_refused_clearly(proxy: ProxyHarness) -> None:
    first = post(proxy, chat(200, sim={"itl_ms": 10}), stop_after=2)
    rid = first.headers["x-request-id"]
    other_key = raw_stream(
        proxy.url, "GET", f"/v1/streams/{rid}", None, {"authorization": "Bearer sk-other"}
    )
    assert other_key.status == 401
    same_app_other_key = raw_stream(
        proxy.url, "GET", f"/v1/streams/{rid}", None, {"authorization": f"Bearer {KEY2}"}
    )
    assert same_app_other_key.status == 404
    no_key = raw_stream(proxy.url, "GET", f"/v1/streams/{rid}")
    assert no_key.status == 401
    assert resume(proxy, "no-such-stream", None).status == 404
    bad = resume(proxy, rid, "someone-else:3")
    assert bad.status == 400 and b"invalid_last_event_id" in bad.body
    # '²' (byte 0xb2 in latin-1) is a digit to str.isdigit, not to int(): a 400, not a 500.
    superscript = resume(proxy, rid, f"{rid}:\u00b2")
    assert superscript.status == 400 and b"invalid_last_event_id" in superscript.body
    post_to_it = raw_stream(proxy.url, "POST", f"/v1/streams/{rid}", {}, AUTH)
    assert post_to_it.status == 405
    taken = raw_stream(
        proxy.url, "POST", "/v1/chat/completions", chat(5), {**AUTH, "x-request-id": rid}
    )
    assert taken.status == 409
    # The stream itself is unharmed by all of that.
    rest = resume(proxy, rid, first.last_id)
    assert rest.status == 200 and rest.complete


def test_streams_without_resume_window_carry_no_ids(sim: ProcessServer) -> None:
    h = ProxyHarness(passthrough_snapshot(sim.url))
    try:
        body = {**chat(5), "model": "sim-model"}
        result = raw_stream(h.url, "POST", "/v1/chat/completions", body)
        assert result.complete and result.data_events()
        assert all(e.id is None for e in result.events)
        assert raw_stream(h.url, "GET", "/v1/streams/x").status == 404
    finally:
        h.close()


def test_memory_is_bounded_with_1000_abandoned_streams(sim: ProcessServer) -> None:
    policy = StreamPolicy(
        name="many", resume_window=1.0, resume_buffer=4096, keepalive_interval=None
    )
    h = harness(sim.url, policy)
    try:
        registry = h.app.streams
        assert isinstance(registry, StreamRegistry)
        peak = peak_count = 0
        for _ in range(1000):
            post(h, chat(10, sim={"itl_ms": 1, "ttft_ms": 0}), stop_after=1)
            peak = max(peak, h.lt.call(lambda: registry.total_bytes))
            peak_count = max(peak_count, h.lt.call(lambda: len(registry.streams)))
        # 10 tokens fit the 4096-byte buffer, so each stream is kept for its window (with
        # 30 they overflowed it within ~30 ms and the count hovered around 10: flaky).
        assert 10 < peak_count <= 1000  # kept for their window, then dropped
        assert peak <= peak_count * 4096  # no stream holds more than its buffer
        wait_until(lambda: h.lt.call(lambda: len(registry.streams)) == 0, 5.0)
        assert h.lt.call(lambda: registry.total_bytes) == 0
        assert h.permits_in_use() == 0
        assert h.busy_upstream_connections() == 0
    finally:
        h.close()
