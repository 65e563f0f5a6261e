"""The simulator against the real vLLM 0.26 transcripts: same keys in the same order, same
value types, same framing; error bodies byte for byte."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest

CHAT_ID = re.compile(r"^chatcmpl-[0-9a-f]{16}$")
CMPL_ID = re.compile(r"^cmpl-[0-9a-f]{16}$")
HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


def chat_kind(event: dict[str, Any]) -> str:
    choices = event["choices"]
    if not choices:
        return "usage"
    if "role" in choices[0].get("delta", {}):
        return "role"
    return "final" if choices[0]["finish_reason"] is not None else "content"


def by_kind(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The first event of each kind."""
    found: dict[str, dict[str, Any]] = {}
    for event in events:
        found.setdefault(chat_kind(event), event)
    return found


def assert_same_shapes(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], shape_of: Any):
    mine, real = by_kind(ours), by_kind(theirs)
    assert sorted(mine) == sorted(real)
    for kind in real:
        assert shape_of(mine[kind]) == shape_of(real[kind]), kind


def test_chat_stream_with_usage_matches_01a(sim, transcripts, shape_of):
    resp = sim.chat(max_tokens=12, stream=True, stream_options={"include_usage": True})
    real = transcripts.events("01a")
    events = resp.json_events()
    assert resp.status == 200 and resp.complete
    assert resp.header("content-type") == "text/event-stream; charset=utf-8"
    assert resp.header("transfer-encoding") == "chunked"
    assert resp.header("cache-control") is None
    assert [chat_kind(e) for e in events] == [chat_kind(e) for e in real]
    assert_same_shapes(events, real, shape_of)
    assert CHAT_ID.match(events[0]["id"])
    assert {e["id"] for e in events} == {events[0]["id"]}
    assert len({e["created"] for e in events}) == 1
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert {e["model"] for e in events} == {"tiny-llama"}
    usage = events[-1]["usage"]
    assert list(usage) == ["prompt_tokens", "total_tokens", "completion_tokens"]
    assert usage["completion_tokens"] == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12


def test_each_event_is_its_own_http_chunk(sim, transcripts):
    resp = sim.chat(max_tokens=8, stream=True, stream_options={"include_usage": True})
    real = transcripts.raw_chunks("01f")
    # vLLM: one recv per chunk, each "<hex>\r\ndata: {...}\n\n\r\n", then the terminator.
    assert real[-2:] == [b"e\r\ndata: [DONE]\n\n\r\n", b"0\r\n\r\n"]
    assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") for c in resp.chunks)
    assert all(c.count(b"\n\n") == 1 for c in resp.chunks)
    assert resp.chunks[-1] == b"data: [DONE]\n\n"
    assert resp.raw.endswith(real[-2] + real[-1])
    assert all(r.count(b"data: ") == 1 for r in real[1:-1])  # the same for vLLM
    assert len(resp.chunks) == 1 + 8 + 1 + 1  # role, 8 tokens (one a chunk), usage, [DONE]


def test_chat_stream_without_usage_puts_fingerprint_on_final_01b(sim, transcripts, shape_of):
    resp = sim.chat(max_tokens=12, stream=True)
    real = transcripts.events("01b")
    assert_same_shapes(resp.json_events(), real, shape_of)
    final = resp.json_events()[-1]
    assert final["system_fingerprint"] == "vllm-0.26.0-nohash"
    assert final["choices"][0]["finish_reason"] == "length"


def test_continuous_usage_on_every_chunk_01c(sim, transcripts, shape_of):
    options = {"include_usage": True, "continuous_usage_stats": True}
    resp = sim.chat(max_tokens=5, stream=True, stream_options=options)
    real = transcripts.events("01c")
    events = resp.json_events()
    assert_same_shapes(events, real, shape_of)
    completions = [e["usage"]["completion_tokens"] for e in events]
    assert completions == [0, 1, 2, 3, 4, 5, 5]


def test_empty_stream_options_means_no_usage_01d(sim, transcripts, shape_of):
    resp = sim.chat(max_tokens=4, stream=True, stream_options={})
    real = transcripts.events("01d")
    assert [chat_kind(e) for e in resp.json_events()] == [chat_kind(e) for e in real]
    assert_same_shapes(resp.json_events(), real, shape_of)


def test_request_id_from_header_then_body_01e(sim, transcripts):
    real = transcripts.sections["01e"]
    assert "chatcmpl-sluice-test-123" in real and "chatcmpl-body-rid-456" in real
    body = {"messages": HELLO, "max_tokens": 3, "stream": True}
    by_header = sim.post("/v1/chat/completions", body, headers={"X-Request-Id": "sluice-test-123"})
    assert {e["id"] for e in by_header.json_events()} == {"chatcmpl-sluice-test-123"}
    by_body = sim.post("/v1/chat/completions", {**body, "request_id": "body-rid-456"})
    assert {e["id"] for e in by_body.json_events()} == {"chatcmpl-body-rid-456"}
    both = sim.post(
        "/v1/chat/completions", {**body, "request_id": "b"}, headers={"X-Request-Id": "h"}
    )
    assert both.json_events()[0]["id"] == "chatcmpl-h"
    plain = sim.completion(max_tokens=2, stream=False, request_id="r1").json()
    assert plain["id"] == "cmpl-r1"


def test_n2_stream_interleaves_and_counts_prompt_once_04c(sim, transcripts, shape_of):
    options = {"include_usage": True}
    resp = sim.chat(n=2, max_tokens=6, stream=True, stream_options=options)
    real = transcripts.events("04c")
    events = resp.json_events()
    indexes = [e["choices"][0]["index"] for e in events if e["choices"]]
    assert indexes == [e["choices"][0]["index"] for e in real if e["choices"]]
    assert indexes == [0, 1] * 7
    assert_same_shapes(events, real, shape_of)
    single = sim.chat(max_tokens=6, stream=True, stream_options=options).json_events()
    assert events[-1]["usage"]["prompt_tokens"] == single[-1]["usage"]["prompt_tokens"]
    assert events[-1]["usage"]["completion_tokens"] == 12
    texts = [
        "".join(e["choices"][0]["delta"]["content"] for e in events[2:-1][i::2]) for i in (0, 1)
    ]
    assert texts[0] != texts[1]


def test_completions_stream_03a_03b(sim, transcripts, shape_of):
    with_usage = sim.completion(max_tokens=12, stream=True, stream_options={"include_usage": True})
    real = transcripts.events("03a")
    events = with_usage.json_events()
    assert len(events) == len(real) == 13
    for mine, theirs in ((events[0], real[0]), (events[-2], real[-2]), (events[-1], real[-1])):
        assert shape_of(mine) == shape_of(theirs)
    assert CMPL_ID.match(events[0]["id"]) and events[0]["object"] == "text_completion"
    plain = sim.completion(max_tokens=6, stream=True).json_events()
    real_plain = transcripts.events("03b")
    assert shape_of(plain[0]) == shape_of(real_plain[0])
    assert shape_of(plain[-1]) == shape_of(real_plain[-1])
    assert plain[-1]["system_fingerprint"] == "vllm-0.26.0-nohash"


def test_completions_stream_logprobs_03e(sim, transcripts, shape_of):
    events = sim.completion(max_tokens=4, logprobs=1, stream=True).json_events()
    real = transcripts.events("03e")
    assert [shape_of(e) for e in events] == [shape_of(e) for e in real]
    offsets = [e["choices"][0]["logprobs"]["text_offset"][0] for e in events]
    texts = [e["choices"][0]["text"] for e in events]
    assert offsets == [sum(len(t) for t in texts[:i]) for i in range(4)]


def test_completions_two_prompts_03f(sim, transcripts):
    body = {"prompt": ["Hello", "Simple is"], "max_tokens": 3, "stream": True}
    events = sim.completion(**body, stream_options={"include_usage": True}).json_events()
    real = transcripts.events("03f")
    assert len(events) == len(real)
    assert sorted(e["choices"][0]["index"] for e in events[:-1]) == [0, 0, 0, 1, 1, 1]
    one = sim.completion(prompt="Hello", max_tokens=1).json()["usage"]["prompt_tokens"]
    two = sim.completion(prompt="Simple is", max_tokens=1).json()["usage"]["prompt_tokens"]
    assert events[-1]["usage"] == {
        "prompt_tokens": one + two,
        "total_tokens": one + two + 6,
        "completion_tokens": 6,
    }


@pytest.mark.parametrize(
    ("ident", "path", "body"),
    [
        ("04a", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 12}),
        ("04d", "/v1/chat/completions", {"messages": HELLO, "n": 2, "max_tokens": 6}),
        ("04e", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 3, "foo_bar": 1}),
        ("04g", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 3}),
        ("03c", "/v1/completions", {"prompt": "The quick brown fox", "max_tokens": 12}),
        ("03d", "/v1/completions", {"prompt": "The quick brown fox", "logprobs": 2}),
    ],
)
def test_non_stream_bodies(sim, transcripts, shape_of, ident, path, body):
    resp = sim.post(path, {"model": "tiny-llama", **body} if ident != "04g" else body)
    real = transcripts.bodies(ident)[0]
    assert resp.status == 200 and resp.header("content-type") == "application/json"
    mine = resp.json()
    assert shape_of(mine) == shape_of(real)
    assert mine["model"] == "tiny-llama"  # also without "model" in the request (04g)
    assert [c["index"] for c in mine["choices"]] == [c["index"] for c in real["choices"]]
    assert mine["usage"]["completion_tokens"] == real["usage"]["completion_tokens"]


def test_chat_stop_with_logprobs_02b_02c(sim, transcripts, shape_of):
    # The stop string is completed by a token that also carries text after it, as in 02b.
    script = [" u", "lo", " ru", "ious", "s,", "fuse", "#", " ambiguity,", " re", ".\n0"]
    body = {
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 16,
        "stop": ["re.", "ZZZQ"],
        "logprobs": True,
        "top_logprobs": 2,
        "sim": {"script": script},
    }
    streamed = sim.chat(**body, stream=True, stream_options={"include_usage": True})
    real = transcripts.events("02b")
    events = streamed.json_events()
    assert [e["choices"][0]["delta"]["content"] for e in events[1:-1]] == [
        e["choices"][0]["delta"]["content"] for e in real[1:-1]
    ]
    assert [shape_of(e) for e in events] == [shape_of(e) for e in real]
    whole = sim.chat(**body).json()
    real_whole = transcripts.bodies("02c")[0]
    assert shape_of(whole) == shape_of(real_whole)
    assert (
        whole["choices"][0]["message"]["content"] == real_whole["choices"][0]["message"]["content"]
    )
    assert [e["token"] for e in whole["choices"][0]["logprobs"]["content"]] == script
    assert (whole["choices"][0]["finish_reason"], whole["choices"][0]["stop_reason"]) == (
        "stop",
        "re.",
    )
    assert whole["usage"]["completion_tokens"] == 10


def test_include_stop_str_in_output_02d(sim, transcripts):
    script = [" u", "lo", " ru", "ious", "s,", "fuse", "#", " ambiguity,", " re", ".\n0"]
    body = {
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "stop": ["re."],
        "include_stop_str_in_output": True,
        "stream": True,
        "sim": {"script": script},
    }
    events = sim.chat(**body).json_events()
    real = transcripts.events("02d")
    assert [e["choices"][0]["delta"] for e in events] == [e["choices"][0]["delta"] for e in real]
    assert events[-1]["choices"][0]["stop_reason"] == "re."


def test_unmatched_stop_holds_back_then_flushes_02e(sim, transcripts):
    script = [" u", "lo", " ru", "ious", "s,", "fuse"]
    events = sim.chat(max_tokens=6, stop="stop", stream=True, sim={"script": script}).json_events()
    real = transcripts.events("02e")
    assert [e["choices"][0]["delta"] for e in events] == [e["choices"][0]["delta"] for e in real]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


ERROR_SECTIONS = [
    "05a",
    "05b",
    "05c",
    "05d",
    "05e",
    "05f",
    "05g",
    "05h",
    "05i",
    "05k",
    "05l",
    "05m",
    "05n",
    "05o",
    "05p",
]


@pytest.mark.parametrize("ident", ERROR_SECTIONS)
def test_errors_byte_for_byte(make_sim, transcripts, ident):
    sim = make_sim(max_model_len=512)
    requests = transcripts.curl_requests(ident)
    bodies = transcripts.bodies(ident)
    assert len(requests) == len(bodies) >= 1
    for request, real in zip(requests, bodies, strict=True):
        resp = sim.request(request.method, request.path, request.body, request.headers)
        assert resp.json() == real
        assert resp.body == _compact(real)
        assert resp.status == (real["error"]["code"] if "error" in real else resp.status)
        if "detail" in real:
            assert resp.status == {"Not Found": 404, "Method Not Allowed": 405}[real["detail"]]
        assert resp.header("content-type") == "application/json"


def _compact(value: Any) -> bytes:
    return orjson.dumps(value)


def test_method_not_allowed_lists_allowed_methods(sim):
    assert sim.request("GET", "/v1/chat/completions").header("allow") == "POST"
    head = sim.request("HEAD", "/health")
    assert head.status == 405 and head.header("allow") == "GET"


def test_context_length_error_05j(make_sim, transcripts, shape_of):
    sim = make_sim(max_model_len=512)
    real = transcripts.bodies("05j")[0]
    resp = sim.completion(prompt="Simple is better than complex. " * 70, max_tokens=3)
    assert resp.status == 400
    assert shape_of(resp.json()) == shape_of(real)
    assert resp.json()["error"]["param"] == "input_tokens"
    assert "maximum context length is 512 tokens" in resp.json()["error"]["message"]


def test_models_health_version(sim, transcripts, shape_of):
    models = sim.request("GET", "/v1/models")
    assert shape_of(models.json()) == shape_of(transcripts.bodies("06a")[0])
    assert models.json()["data"][0]["id"] == "tiny-llama"
    health = sim.request("GET", "/health")
    assert (health.status, health.body, health.header("content-length")) == (200, b"", "0")
    assert health.header("content-type") is None
    assert sim.request("GET", "/ping").status == 200
    assert sim.request("GET", "/version").json() == {"version": "0.26.0"}


def test_metrics_names_and_labels(sim, transcripts):
    sim.chat(max_tokens=3)
    sim.chat(max_tokens=30, stop=["x"], sim={"script": ["a", "x"]})
    resp = sim.request("GET", "/metrics")
    assert resp.header("content-type") == "text/plain; version=1.0.0; charset=utf-8"
    text = resp.body.decode()
    real = transcripts.files["08_server.txt"]
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "generation_tokens_total",
        "prompt_tokens_total",
    ):
        prefix = f'vllm:{name}{{engine="0",model_name="tiny-llama"}} '
        assert prefix in real and prefix in text, name
    labels = 'engine="0",model_name="tiny-llama"'
    assert f"vllm:num_requests_running{{{labels}}} 0.0" in text
    assert f"vllm:generation_tokens_total{{{labels}}} 5.0" in text
    for reason, count in (("stop", 1), ("length", 1), ("abort", 0), ("error", 0)):
        line = (
            f'vllm:request_success_total{{engine="0",finished_reason="{reason}",'
            'model_name="tiny-llama"}'
        )
        assert line in real
        assert f"{line} {count}.0" in text


# SamplingParams checks no transcript holds, with vLLM's messages (vllm/sampling_params.py,
# `_verify_args`): raised without a parameter name, so `param` is null as in n's (05n).
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5."),
        ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2], got -3.0."),
        ({"repetition_penalty": -1}, "repetition_penalty must be greater than zero, got -1.0."),
        ({"repetition_penalty": 0}, "repetition_penalty must be greater than zero, got 0.0."),
        ({"top_k": -2}, "top_k must be 0 (disable), or at least 1, got -2."),
        ({"min_p": 1.5}, "min_p must be in [0, 1], got 1.5."),
        ({"min_tokens": -1}, "min_tokens must be greater than or equal to 0, got -1."),
        ({"min_tokens": 9}, "min_tokens must be less than or equal to max_tokens=4, got 9."),
        # the order of the checks: n first, then the penalties, then temperature
        ({"n": 0, "presence_penalty": 9}, "n must be at least 1, got 0."),
        # the simulator's own bound (it builds every choice in memory), not vLLM's
        ({"n": 1e20}, "n must be at most 1024 in the simulator, got 100000000000000000000."),
        (
            {"presence_penalty": 9, "temperature": -1},
            "presence_penalty must be in [-2, 2], got 9.0.",
        ),
    ],
)
def test_sampling_checks_without_a_transcript(sim, fields, message):
    resp = sim.chat(messages=HELLO, max_tokens=4, **fields)
    assert resp.status == 400
    assert resp.json() == {
        "error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}
    }


def test_sampling_values_vllm_takes(sim):
    ok = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.2, "min_tokens": 4}
    assert sim.chat(messages=HELLO, max_tokens=4, presence_penalty=-2, **ok).status == 200
    top_k = sim.chat(messages=HELLO, max_tokens=4, top_k=1.5)  # an int field
    assert top_k.status == 400 and "int_from_float" in top_k.json()["error"]["message"]


def test_more_logprobs_than_max_logprobs_is_a_400(sim):
    """vLLM's engine check (--max-logprobs, 20 by default). The simulator built every
    alternative asked for: 100,000 held its event loop, and every other request, for
    minutes."""
    chat = sim.chat(messages=HELLO, max_tokens=2, logprobs=True, top_logprobs=21)
    text = sim.completion(prompt="Hello", max_tokens=2, logprobs=100_000)
    for resp, n in ((chat, 21), (text, 100_000)):
        assert resp.status == 400
        assert resp.json() == {
            "error": {
                "message": f"Requested sample logprobs of {n}, which is greater than max "
                f"allowed: 20 (parameter=logprobs, value={n})",
                "type": "BadRequestError",
                "param": "logprobs",
                "code": 400,
            }
        }
    assert sim.chat(messages=HELLO, max_tokens=2, logprobs=True, top_logprobs=20).status == 200
