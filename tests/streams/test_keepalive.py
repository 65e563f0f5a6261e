"""Keep-alives: `: keep-alive` comments while a stream waits (queue, first token, silent
backend), none while tokens flow, and never a byte after the response ended."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import anthropic
import openai
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import OverloadedError
from sluice.proxy.snapshot import Backend, QueueLimits, StreamPolicy, StreamTimeouts

from tests.fixtures import ProcessServer, ProxyHarness, SimClient, routed_snapshot
from tests.streams.fixtures import raw_stream

FAST = StreamPolicy(name="ka", keepalive_interval=0.3)


def chat(**extra: Any) -> dict[str, Any]:
    return {
        "model": "chat",
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "max_tokens": 10,
        **extra,
    }


def proxy_for(
    sim_url: str, policy: StreamPolicy, *, concurrency: int = 8, max_wait: float = 10.0
) -> ProxyHarness:
    backend = Backend(
        name="sim",
        urls=(sim_url,),
        max_concurrency=concurrency,
        queue=QueueLimits(max_len=16, max_wait=max_wait),
    )
    return ProxyHarness(routed_snapshot(sim_url, {"chat": {"policy": policy}}, backend=backend))


def comments_before_first_data(result: Any) -> int:
    count = 0
    for event in result.events:
        if event.data is not None:
            return count
        count += event.comment
    return count


def test_keepalives_while_waiting_for_the_first_token(sim: ProcessServer) -> None:
    h = proxy_for(sim.url, FAST)
    try:
        result = raw_stream(h.url, "POST", "/v1/chat/completions", chat(sim={"ttft_ms": 1400}))
        assert result.status == 200 and result.complete
        assert 3 <= comments_before_first_data(result) <= 5
        # Tokens every 10 ms: no comment once they flow.
        assert not any(e.comment for e in result.events[comments_before_first_data(result) :])
        assert result.data_events()[-1].data == "[DONE]"
    finally:
        h.close()


def test_keepalives_between_tokens_when_the_backend_is_silent(sim: ProcessServer) -> None:
    policy = StreamPolicy(
        name="ka", keepalive_interval=0.3, timeouts=StreamTimeouts(inter_token=1.5)
    )
    h = proxy_for(sim.url, policy)
    try:
        result = raw_stream(h.url, "POST", "/v1/chat/completions", chat(sim={"stall_after": 3}))
        assert result.complete
        kinds = ["c" if e.comment else "d" for e in result.events]
        # Three tokens (after the role chunk), comments during the stall (keep-alives do
        # not reset the inter-token timeout), then the terminal error event and [DONE].
        first_comment = kinds.index("c")
        assert result.data_events()[-2].data is not None
        assert "inter_token_timeout" in (result.data_events()[-2].data or "")
        assert 3 <= kinds.count("c") <= 6, kinds
        assert "c" not in kinds[kinds.index("d", first_comment) :]
    finally:
        h.close()


def test_no_write_after_the_response_ended(sim: ProcessServer) -> None:
    """On a kept-alive connection, nothing follows the end of the chunked body: the
    keep-alive timer stopped with the response."""
    h = proxy_for(sim.url, FAST)
    try:
        with socket.create_connection(("127.0.0.1", h.port), timeout=5) as sock:
            body = json.dumps(chat(sim={"ttft_ms": 500})).encode()
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                b"\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)
            )
            received = b""
            while not received.endswith(b"\r\n0\r\n\r\n"):
                chunk = sock.recv(65536)
                assert chunk, "connection closed before the end of the body"
                received += chunk
            assert b": keep-alive" in received
            sock.settimeout(1.2)  # four keep-alive intervals
            try:
                late = sock.recv(65536)
            except TimeoutError:
                late = b""
            assert late == b"", f"bytes after the response ended: {late!r}"
    finally:
        h.close()


def _occupy(url: str, seconds: float) -> threading.Thread:
    body = chat(max_tokens=int(seconds * 50), sim={"itl_ms": 20})
    thread = threading.Thread(
        target=raw_stream, args=(url, "POST", "/v1/chat/completions", body), daemon=True
    )
    thread.start()
    time.sleep(0.3)
    return thread


def test_a_long_queue_wait_is_answered_200_with_keepalives(sim: ProcessServer) -> None:
    h = proxy_for(sim.url, FAST, concurrency=1, max_wait=10.0)
    try:
        busy = _occupy(h.url, 1.5)
        start = time.monotonic()
        result = raw_stream(h.url, "POST", "/v1/chat/completions", chat())
        assert result.status == 200 and result.complete
        assert comments_before_first_data(result) >= 2
        assert result.data_events()[-1].data == "[DONE]"
        assert time.monotonic() - start > 0.8
        busy.join(10)
    finally:
        h.close()


def test_a_refusal_after_the_head_is_the_terminal_error_event(sim: ProcessServer) -> None:
    h = proxy_for(sim.url, FAST, concurrency=1, max_wait=0.8)
    try:
        busy = _occupy(h.url, 2.5)
        result = raw_stream(h.url, "POST", "/v1/chat/completions", chat())
        assert result.status == 200 and result.complete
        data = [e.data for e in result.data_events()]
        assert data[-1] == "[DONE]"
        error = json.loads(data[-2] or "")["error"]
        assert error["code"] == "backend_saturated"
        assert isinstance(error["retry_after"], int) and error["retry_after"] >= 1
        busy.join(10)
    finally:
        h.close()


def test_a_short_queue_wait_keeps_the_plain_503(sim: ProcessServer) -> None:
    policy = StreamPolicy(name="ka", keepalive_interval=2.0)
    h = proxy_for(sim.url, policy, concurrency=1, max_wait=0.3)
    try:
        busy = _occupy(h.url, 1.5)
        result = raw_stream(h.url, "POST", "/v1/chat/completions", chat())
        assert result.status == 503
        assert int(result.headers["retry-after"]) >= 1
        assert b"backend_saturated" in result.body
        busy.join(10)
    finally:
        h.close()


def test_backend_refusal_after_an_early_head_keeps_its_error(sim: ProcessServer) -> None:
    """The SSE head went out while queued; the backend then answers 400: its OpenAI error
    object is the terminal event."""
    h = proxy_for(sim.url, FAST, concurrency=1, max_wait=10.0)
    try:
        busy = _occupy(h.url, 1.0)
        result = raw_stream(h.url, "POST", "/v1/chat/completions", chat(sim={"status": 400}))
        assert result.status == 200 and result.complete
        data = [e.data for e in result.data_events()]
        assert data[-1] == "[DONE]"
        assert "error" in json.loads(data[-2] or "")
        busy.join(10)
    finally:
        h.close()


MESSAGES = {"model": "chat", "max_tokens": 10, "stream": True}
MESSAGES["messages"] = [{"role": "user", "content": "Hi"}]


def test_a_refusal_after_the_head_is_anthropics_error_event(sim: ProcessServer) -> None:
    """/v1/messages answers in Anthropic's shape (the OpenAI event made its SDK fail on an
    assertion)."""
    h = proxy_for(sim.url, FAST, concurrency=1, max_wait=0.8)
    try:
        busy = _occupy(h.url, 2.5)
        result = raw_stream(h.url, "POST", "/v1/messages", MESSAGES)
        assert result.status == 200 and result.complete
        data = [e.data for e in result.data_events() if e.data != "[DONE]"]
        last = json.loads(data[-1] or "")
        assert last["type"] == "error" and last["error"]["type"] == "overloaded_error", last
        assert "saturated" in last["error"]["message"]
        busy.join(10)
    finally:
        h.close()


def test_huggingface_hub_reads_a_refusal_after_the_head_as_overloaded(sim: ProcessServer) -> None:
    """TGI's stream answers TGI's error event, `error_type: overloaded` (the OpenAI event
    made huggingface_hub raise an UnknownError)."""
    h = proxy_for(sim.url, FAST, concurrency=1, max_wait=0.8)
    try:
        busy = _occupy(h.url, 2.5)
        client = InferenceClient(base_url=h.url)
        with pytest.raises(OverloadedError) as raised:
            for _ in client.text_generation("Hi", stream=True, max_new_tokens=10):
                pass
        assert "saturated" in str(raised.value)
        busy.join(10)
    finally:
        h.close()


def test_the_anthropic_sdk_reads_a_refusal_after_the_head(sim: ProcessServer) -> None:
    h = proxy_for(sim.url, FAST, concurrency=1, max_wait=0.8)
    try:
        busy = _occupy(h.url, 2.5)
        client = anthropic.Anthropic(base_url=h.url, api_key="unused", max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as raised:
            for _ in client.messages.create(
                model="chat", max_tokens=10, stream=True, messages=MESSAGES["messages"]
            ):
                pass
        assert "overloaded_error" in str(raised.value)
        busy.join(10)
    finally:
        h.close()


def test_the_openai_sdk_reads_a_responses_refusal_after_the_head(sim: ProcessServer) -> None:
    """/v1/responses answers the Responses API's `error` event (first, so numbered 0; no
    `[DONE]`), with the retry delay the headers could no longer carry."""
    h = proxy_for(sim.url, FAST, concurrency=1, max_wait=0.8)
    try:
        busy = _occupy(h.url, 2.5)
        with (
            openai.OpenAI(base_url=h.url + "/v1", api_key="unused", max_retries=0) as client,
            client.responses.create(model="chat", input="Hi", stream=True) as stream,
        ):
            events = list(stream)
        busy.join(10)
    finally:
        h.close()
    assert len(events) == 1, events
    error = events[0]
    assert isinstance(error, openai.types.responses.ResponseErrorEvent)
    assert error.code == "backend_saturated" and "saturated" in error.message
    assert error.sequence_number == 0
    assert isinstance(getattr(error, "retry_after", None), int) and error.retry_after >= 1


@pytest.mark.parametrize(
    ("fault", "expected"), [({"status": 503, "retry_after": 7}, 7), ({"status": 429}, None)]
)
def test_a_backends_retry_after_reaches_the_error_event_after_an_early_head(
    sim: ProcessServer, fault: dict[str, int], expected: int | None
) -> None:
    """Headers are gone once the head went out: the backend's Retry-After goes inside the
    error object, as sluice's own refusals carry it (sluice's estimate when it sent none)."""
    h = proxy_for(sim.url, FAST, concurrency=1, max_wait=10.0)
    try:
        busy = _occupy(h.url, 1.0)
        body = chat(sim=fault)
        result = raw_stream(h.url, "POST", "/v1/chat/completions", body)
        assert result.status == 200 and result.complete
        data = [e.data for e in result.data_events()]
        assert data[-1] == "[DONE]"
        error = json.loads(data[-2] or "")["error"]
        if expected is None:
            assert isinstance(error["retry_after"], int) and error["retry_after"] >= 1, error
        else:
            assert error["retry_after"] == expected, error
        busy.join(10)
    finally:
        h.close()


def test_first_token_and_total_count_the_time_queued(sim: ProcessServer) -> None:
    """`first_token` runs from the request's start (queueing + prefill): a request that
    waits for a permit no longer than its first-token budget, then is refused as the
    queue's timeout (Retry-After inside the error), and the backend is never asked."""
    policy = StreamPolicy(
        name="ka", keepalive_interval=0.3, timeouts=StreamTimeouts(first_token=1.0)
    )
    h = proxy_for(sim.url, policy, concurrency=1, max_wait=10.0)
    try:
        busy = _occupy(h.url, 3.0)  # the permit comes back ~2.7 s after the request
        backend = SimClient(sim.url)
        asked = len(backend.requests())
        start = time.monotonic()
        result = raw_stream(h.url, "POST", "/v1/chat/completions", chat(max_tokens=7))
        assert result.status == 200 and result.complete
        data = [e.data for e in result.data_events()]
        assert data[-1] == "[DONE]"
        error = json.loads(data[-2] or "")["error"]
        assert error["code"] == "backend_saturated" and error["retry_after"] >= 1, error
        assert "queue wait expired" in error["message"], error
        assert 0.9 < time.monotonic() - start < 2.2  # at its 1 s deadline, not at the permit
        busy.join(10)
        # Only the request that held the permit reached the backend.
        assert all(r["body"].get("max_tokens") != 7 for r in backend.requests()[asked:])
    finally:
        h.close()
