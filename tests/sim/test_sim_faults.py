"""Faults (`sim` extension), aborts, timing, backpressure and the /sim/* endpoints."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time

import orjson
from sluice.sim.chunks import KEEPALIVE_COMMENT

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


def chat_body(**extra: object) -> dict[str, object]:
    return {"messages": HELLO, "stream": True, **extra}


def test_stall_keeps_the_connection_open_until_the_client_leaves(sim):
    stream = sim.open_stream(CHAT, chat_body(max_tokens=50, sim={"stall_after": 3}))
    assert stream.head().status == 200
    events = [stream.chunk() for _ in range(4)]  # role + 3 tokens
    assert all(e is not None and e.startswith(b"data: {") for e in events)
    assert stream.quiet_for(0.3)
    stats = sim.stats()
    assert (stats["active"], stats["stalled"], stats["tokens"]) == (1, 1, 3)
    stream.close()
    assert sim.wait_stats(lambda s: s["aborted"] == 1 and s["active"] == 0, within=1.0) < 1.0
    assert sim.stats()["completed"] == 0


def test_stall_at_zero_sends_headers_only_with_keepalive_comments(sim):
    body = chat_body(sim={"stall_after": 0, "keepalive_comments_ms": 40})
    stream = sim.open_stream(CHAT, body)
    assert stream.head().status == 200
    comments = [stream.chunk(1.0) for _ in range(4)]
    assert comments == [KEEPALIVE_COMMENT] * 4
    assert KEEPALIVE_COMMENT == b": keep-alive\n\n"
    stream.close()
    sim.wait_stats(lambda s: s["aborted"] == 1, within=1.0)


def test_close_after_drops_the_connection_without_done(sim):
    resp = sim.chat(stream=True, max_tokens=10, sim={"close_after": 2})
    assert resp.status == 200 and not resp.complete
    assert len(resp.json_events()) == 3  # role + 2 tokens
    assert b"[DONE]" not in resp.raw and not resp.raw.endswith(b"0\r\n\r\n")
    stats = sim.stats()
    assert (stats["closed"], stats["aborted"], stats["completed"]) == (1, 0, 0)
    nonstream = sim.chat(max_tokens=10, sim={"close_after": 2})
    assert nonstream.status == 0 and nonstream.raw == b""


def test_close_after_with_tokens_per_chunk_flushes_first(sim):
    body = {"close_after": 3, "tokens_per_chunk": 5, "script": list("abcdefghij")}
    resp = sim.completion(stream=True, sim=body)
    # The first token alone, then the 2 pending ones flushed before the close.
    assert [e["choices"][0]["text"] for e in resp.json_events()] == ["a", "bc"]
    assert sim.stats()["tokens"] == 3


def test_error_after_sends_an_error_event_then_done(sim):
    resp = sim.chat(stream=True, max_tokens=10, sim={"error_after": 2})
    assert resp.status == 200 and resp.complete
    events = resp.events()
    assert events[-1] == b"[DONE]"
    error = orjson.loads(events[-2])
    assert list(error) == ["error"]
    assert list(error["error"]) == ["message", "type", "param", "code"]
    assert error["error"]["code"] == 500
    assert len(events) == 1 + 2 + 2
    whole = sim.chat(max_tokens=10, sim={"error_after": 2})
    assert whole.status == 500 and whole.json()["error"]["type"] == "InternalServerError"


def test_status_answers_a_vllm_shaped_error_after_the_delay(sim):
    start = time.monotonic()
    resp = sim.chat(stream=True, sim={"status": 503, "slow_first_byte_ms": 150})
    assert time.monotonic() - start >= 0.15
    assert resp.status == 503
    assert resp.json() == {
        "error": {
            "message": "simulated error (sim.status=503)",
            "type": "ServiceUnavailableError",
            "param": None,
            "code": 503,
        }
    }
    assert sim.stats()["errors"] == 1


def test_slow_first_byte_delays_the_headers(sim):
    resp = sim.chat(stream=True, max_tokens=2, sim={"slow_first_byte_ms": 300})
    assert resp.head_time >= 0.3 and resp.complete


def test_waiting_while_slow_and_abort_during_the_wait(sim):
    stream = sim.open_stream(CHAT, chat_body(sim={"slow_first_byte_ms": 5000}))
    sim.wait_stats(lambda s: s["waiting"] == 1, within=1.0)
    metrics = sim.request("GET", "/metrics").body.decode()
    assert 'vllm:num_requests_waiting{engine="0",model_name="tiny-llama"} 1.0' in metrics
    assert 'vllm:num_requests_running{engine="0",model_name="tiny-llama"} 0.0' in metrics
    stream.close()
    sim.wait_stats(lambda s: s["aborted"] == 1 and s["waiting"] == 0, within=1.0)


def test_empty_deltas_between_tokens(sim):
    resp = sim.chat(stream=True, sim={"script": ["a", "b", "c"], "empty_deltas": True})
    contents = [e["choices"][0]["delta"]["content"] for e in resp.json_events()[1:]]
    assert contents == ["a", "", "b", "", "c"]
    two = sim.completion(stream=True, sim={"script": ["a", "b"], "empty_deltas": 2})
    assert [e["choices"][0]["text"] for e in two.json_events()] == ["a", "", "", "b"]


def test_client_abort_is_counted_within_a_second_and_generation_stops(make_sim):
    sim = make_sim(itl_ms=20)
    resp = sim.post(CHAT, chat_body(max_tokens=200), close_after_chunks=3)
    assert len(resp.chunks) == 3 and not resp.complete
    took = sim.wait_stats(lambda s: s["aborted"] == 1 and s["active"] == 0, within=1.0)
    assert took < 1.0
    tokens = sim.stats()["tokens"]
    time.sleep(0.1)
    assert sim.stats()["tokens"] == tokens < 200
    metrics = sim.request("GET", "/metrics").body.decode()
    assert 'finished_reason="abort",model_name="tiny-llama"} 0.0' in metrics  # as vLLM 0.26


def test_non_stream_abort_is_counted(make_sim):
    sim = make_sim(itl_ms=20)
    stream = sim.open_stream(CHAT, {"messages": HELLO, "max_tokens": 200})
    sim.wait_stats(lambda s: s["active"] == 1, within=1.0)
    stream.close()
    sim.wait_stats(lambda s: s["aborted"] == 1 and s["active"] == 0, within=1.0)


def test_tokens_are_spread_by_the_inter_token_latency(make_sim):
    sim = make_sim(ttft_ms=100, itl_ms=50)
    resp = sim.chat(stream=True, max_tokens=20)
    assert resp.head_time < 0.08  # headers at once, as vLLM
    token_times = resp.times[1:21]  # after the role chunk, before [DONE]
    assert resp.times[0] >= 0.09  # role + first token at TTFT
    assert token_times[-1] - token_times[0] >= 0.6
    gaps = [b - a for a, b in itertools.pairwise(token_times)]
    assert 0.04 <= statistics.median(gaps) <= 0.065
    assert min(gaps) >= 0.02  # no bursts


def test_itl_zero_sends_everything_at_once(make_sim):
    sim = make_sim(ttft_ms=0, itl_ms=0)
    resp = sim.chat(stream=True, max_tokens=50)
    assert resp.complete and len(resp.json_events()) == 51


def test_slow_reader_gets_merged_chunks_and_every_token(make_sim):
    sim = make_sim(ttft_ms=0, itl_ms=1)
    script = [f"{i:04d}" + "x" * 100_000 for i in range(100)]  # 10 MB: beyond socket buffers
    stream = sim.open_stream(CHAT, chat_body(max_tokens=100, sim={"script": script}))
    stream.head()
    time.sleep(0.4)  # let the transport's buffer fill and pause
    resp = stream.read_all()
    events = resp.json_events()
    text = "".join(e["choices"][0]["delta"]["content"] for e in events[1:])
    assert text == "".join(script)
    assert len(events) - 1 < len(script)  # merged while the client did not read
    assert sim.stats()["completed"] == 1


def test_request_log_keeps_the_exact_json_and_headers(sim):
    body = {"z": 1, "messages": HELLO, "a": {"y": 2, "b": [1, 2]}, "max_tokens": 1}
    raw = orjson.dumps(body)
    sim.request("POST", CHAT, raw, {"X-Request-Id": "rid-1", "Authorization": "Bearer s3cret"})
    sim.request("POST", "/v1/completions", b'{"prompt": ', {})
    log = sim.request("GET", "/sim/requests").json()
    assert [entry["path"] for entry in log] == [CHAT, "/v1/completions"]
    first = log[0]
    assert list(first["body"]) == ["z", "messages", "a", "max_tokens"]
    assert first["body"] == body
    assert first["x_request_id"] == "rid-1" and first["authorization"] is True
    assert "authorization" not in first["headers"] and "s3cret" not in str(log)
    assert log[1]["body"] is None and log[1]["body_text"] == '{"prompt": '
    assert sim.stats()["requests"] == 2
    sim.request("POST", "/sim/reset")
    assert sim.request("GET", "/sim/requests").json() == []
    assert sim.stats()["requests"] == 0


def test_request_log_is_bounded(make_sim):
    sim = make_sim(request_log_size=3)
    for index in range(5):
        sim.chat(max_tokens=1, user=f"u{index}")
    log = sim.request("GET", "/sim/requests").json()
    assert [entry["body"]["user"] for entry in log] == ["u2", "u3", "u4"]


def test_health_can_be_made_to_fail(sim):
    assert sim.request("POST", "/sim/health", {"status": 503}).status == 200
    assert sim.request("GET", "/health").status == 503
    assert sim.request("POST", "/sim/health", {"status": "x"}).status == 400
    sim.request("POST", "/sim/reset")
    assert sim.request("GET", "/health").status == 200


def test_api_key_as_vllm(make_sim):
    sim = make_sim(api_key="k1")
    denied = sim.chat(max_tokens=1)
    assert (denied.status, denied.body) == (401, b'{"error":"Unauthorized"}')
    allowed = sim.post(
        CHAT, {"messages": HELLO, "max_tokens": 1}, headers={"Authorization": "Bearer k1"}
    )
    assert allowed.status == 200
    assert sim.request("GET", "/health").status == 200  # only /v1 is protected


def test_bad_sim_extension_is_a_400(sim):
    for bad in ({"stall_afterr": 1}, {"itl_ms": "fast"}, {"script": "abc"}, {"status": 9999}, 3):
        resp = sim.chat(sim=bad)
        assert resp.status == 400, bad
        assert resp.json()["error"]["param"] == "sim"


def test_close_with_open_streams_counts_them_aborted(loops, make_sim):
    sim = make_sim()
    stream = sim.open_stream(CHAT, chat_body(sim={"stall_after": 1}))
    stream.head()
    sim.wait_stats(lambda s: s["stalled"] == 1, within=1.0)
    loops.run(sim.server.close())
    assert sim.server.stats.aborted == 1 and sim.server.stats.active == 0


def test_one_ticker_per_distinct_itl(make_sim):
    sim = make_sim(ttft_ms=0, itl_ms=20)
    streams = [sim.open_stream(CHAT, chat_body(max_tokens=30)) for _ in range(8)]
    streams += [sim.open_stream(CHAT, chat_body(max_tokens=30, sim={"itl_ms": 30}))]
    for stream in streams:
        stream.head()
        stream.chunk()
    assert sim.server.app.scheduler.tickers == 2

    async def read_all_at_once():  # chunk times are taken when read
        return await asyncio.gather(*(stream.stream.read_all() for stream in streams))

    responses = sim.loops.run(read_all_at_once())
    assert all(r.complete and len(r.json_events()) == 31 for r in responses)
    for response, itl in ((responses[0], 0.02), (responses[-1], 0.03)):
        gaps = [b - a for a, b in itertools.pairwise(response.times[1:31])]
        assert itl * 0.75 <= statistics.median(gaps) <= itl * 1.3
    assert sim.server.app.scheduler.tickers == 0
