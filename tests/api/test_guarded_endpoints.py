"""A route's Policy holds on every endpoint that generates text: /v1/responses,
/v1/messages and TGI, streamed and not, against a simulator that ignores stop strings
(so only sluice's guard can cut). Presets go out in each endpoint's vocabulary."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sluice.proxy.snapshot import SamplingPlan, StreamPolicy
from sluice.proxy.stopwords import CutPattern, GuardSpec

from tests.fixtures import ProcessServer, ProxyHarness, SimClient, routed_snapshot, stream_request

SCRIPT = ["Hello", " there", ",", " friend", "###", " secret", " tail"]
STOP = StreamPolicy(name="no-hash", stop=("###",), guard=GuardSpec(stop=("###",)))
CUT = CutPattern(pattern="secret", max_len=16)
CUT_POLICY = StreamPolicy(
    name="no-secret", cut_patterns=(CUT,), guard=GuardSpec(cut_patterns=(CUT,))
)
PRESET = SamplingPlan(name="precise", defaults={"temperature": 0.3, "max_tokens": 40})


@pytest.fixture
def proxy(sim_ignore_stop: ProcessServer) -> Iterator[ProxyHarness]:
    snap = routed_snapshot(
        sim_ignore_stop.url,
        {
            "chat": {"policy": STOP, "preset": PRESET},
            "cut": {"policy": CUT_POLICY},
            "wide": {"preset": SamplingPlan(name="wide", defaults={"min_p": 0.1})},
        },
    )
    harness = ProxyHarness(snap)
    SimClient(sim_ignore_stop.url).reset()
    yield harness
    harness.close()


def _sim(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"itl_ms": 1, "ttft_ms": 1, "script": SCRIPT, **(extra or {})}


def _named(result: Any) -> list[tuple[str, Any]]:
    out = []
    for _, raw in result.events:
        name, data = "", None
        for line in raw.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
        if data is not None:
            out.append((name, "[DONE]" if data == b"[DONE]" else json.loads(data)))
    return out


def test_responses_stream_is_cut_at_the_policy_stop(
    proxy: ProxyHarness, sim_ignore_stop: ProcessServer
) -> None:
    result = stream_request(
        proxy.url,
        {"model": "chat", "input": "hi", "stream": True, "sim": _sim()},
        path="/v1/responses",
    )
    assert result.status == 200
    events = _named(result)
    deltas = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    assert deltas == "Hello there, friend"
    names = [n for n, _ in events]
    assert names[-1] == "response.completed"
    done = next(d for n, d in events if n == "response.output_text.done")
    assert done["text"] == "Hello there, friend"
    final = events[-1][1]["response"]
    assert final["output"][0]["content"][0]["text"] == "Hello there, friend"
    assert final["status"] == "completed"
    # The preset went upstream in the Responses vocabulary, and the stop string as `stop`.
    sent = SimClient(sim_ignore_stop.url).requests()[-1]["body"]
    assert sent["max_output_tokens"] == 40 and sent["temperature"] == 0.3
    assert "max_tokens" not in sent and sent["stop"] == ["###"]


@pytest.mark.parametrize(
    ("script", "text"),
    [
        (["Hello", " there", " #"], "Hello there #"),  # " #" held back, then released
        (["Hello", " #", "##", " tail"], "Hello "),  # cut: sluice's events replace the rest
        (["Hello", " there"], "Hello there"),  # nothing held: the backend's numbers
    ],
)
def test_responses_stream_numbers_run_on_when_the_guard_adds_events(
    proxy: ProxyHarness, script: list[str], text: str
) -> None:
    """A tail the guard held back goes out as a delta of sluice's before the backend's
    `output_text.done`; every event after it moves up one (the openai SDK's stream helper
    orders nothing, but clients that resume or dedupe by sequence_number do)."""
    result = stream_request(
        proxy.url,
        {"model": "chat", "input": "hi", "stream": True, "sim": _sim({"script": script})},
        path="/v1/responses",
    )
    assert result.status == 200
    events = _named(result)
    deltas = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    assert deltas == text
    numbers = [d["sequence_number"] for _, d in events]
    assert numbers == list(range(len(events))), numbers
    assert events[-1][0] == "response.completed"


def test_responses_nonstream_and_cut_pattern(proxy: ProxyHarness) -> None:
    resp = httpx.post(
        proxy.url + "/v1/responses",
        json={"model": "chat", "input": "hi", "sim": _sim()},
        timeout=10,
    )
    assert resp.status_code == 200
    assert resp.json()["output"][0]["content"][0]["text"] == "Hello there, friend"
    result = stream_request(
        proxy.url,
        {"model": "cut", "input": "hi", "stream": True, "sim": _sim()},
        path="/v1/responses",
    )
    events = _named(result)
    assert events[-1][0] == "response.incomplete"
    final = events[-1][1]["response"]
    assert final["incomplete_details"] == {"reason": "content_filter"}
    assert "secret" not in json.dumps(events)


def test_messages_stream_and_body_are_cut(
    proxy: ProxyHarness, sim_ignore_stop: ProcessServer
) -> None:
    body = {"model": "chat", "max_tokens": 30, "messages": [{"role": "user", "content": "hi"}]}
    result = stream_request(proxy.url, {**body, "stream": True, "sim": _sim()}, path="/v1/messages")
    events = _named(result)
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == "Hello there, friend"
    names = [n for n, _ in events]
    assert names[-4:] == ["content_block_stop", "message_delta", "message_stop", ""]
    delta = next(d for n, d in events if n == "message_delta")
    assert delta["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "###"}
    sent = SimClient(sim_ignore_stop.url).requests()[-1]["body"]
    assert sent["stop_sequences"] == ["###"] and sent["max_tokens"] == 30
    resp = httpx.post(proxy.url + "/v1/messages", json={**body, "sim": _sim()}, timeout=10)
    out = resp.json()
    assert out["content"] == [{"type": "text", "text": "Hello there, friend"}]
    assert out["stop_reason"] == "stop_sequence" and out["stop_sequence"] == "###"


def test_preset_field_an_endpoint_cannot_carry_is_refused(proxy: ProxyHarness) -> None:
    body = {"model": "wide", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    resp = httpx.post(proxy.url + "/v1/messages", json=body, timeout=10)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert "preset 'wide' sets min_p" in error["message"]
    resp = httpx.post(proxy.url + "/v1/responses", json={"model": "wide", "input": "x"}, timeout=10)
    assert resp.status_code == 400 and "min_p" in resp.json()["error"]["message"]


def test_tgi_generate_stream_is_guarded_and_shaped(proxy: ProxyHarness) -> None:
    body = {"model": "chat", "inputs": "hi", "parameters": {"max_new_tokens": 20}, "sim": _sim()}
    with httpx.stream("POST", proxy.url + "/generate_stream", json=body, timeout=10) as resp:
        raw = resp.read()
    assert resp.status_code == 200
    events = [json.loads(e[5:]) for e in raw.split(b"\n\n") if e.startswith(b"data:")]
    assert b"[DONE]" not in raw
    assert all(e["token"]["id"] == 0 for e in events)
    last = events[-1]
    assert last["generated_text"] == "Hello there, friend"
    assert last["details"]["finish_reason"] == "stop_sequence"
    assert all(e["generated_text"] is None for e in events[:-1])


def test_unguardable_generating_route_is_refused_under_a_policy(proxy: ProxyHarness) -> None:
    resp = httpx.post(
        proxy.url + "/invocations", json={"model": "chat", "prompt": "hi"}, timeout=10
    )
    assert resp.status_code == 400
    assert "policy 'no-hash'" in resp.json()["error"]["message"]


def test_a_prompt_batch_streams_every_choice_to_its_own_end(proxy: ProxyHarness) -> None:
    """Three prompts: three choices, each cut at the policy's stop on its own. The stream
    ended with the first choices cut when it counted `n` choices, not `n` per prompt."""
    body = {"model": "chat", "prompt": ["a", "b", "c"], "max_tokens": 20, "stream": True}
    result = stream_request(proxy.url, {**body, "sim": _sim()}, path="/v1/completions")
    assert result.status == 200
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for _, data in _named(result):
        if data == "[DONE]":
            continue
        for choice in data["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            if choice.get("finish_reason"):
                finishes[choice["index"]] = choice["finish_reason"]
    assert texts == {i: "Hello there, friend" for i in range(3)}
    assert finishes == {i: "stop" for i in range(3)}


def test_a_presets_stop_strings_join_the_policys(sim_ignore_stop: ProcessServer) -> None:
    """A preset's stop strings (a tuple in the plan) and a policy's stop: both go upstream.
    Every request without its own `stop` was a 400 ('stop' must be a list)."""
    preset = SamplingPlan(name="stops", defaults={"stop": ("zzz",), "max_tokens": 5})
    harness = ProxyHarness(
        routed_snapshot(sim_ignore_stop.url, {"chat": {"policy": STOP, "preset": preset}})
    )
    try:
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        resp = httpx.post(harness.url + "/v1/chat/completions", json=body, timeout=10)
    finally:
        harness.close()
    assert resp.status_code == 200, resp.text
    sent = SimClient(sim_ignore_stop.url).requests()[-1]["body"]
    assert sent["stop"] == ["zzz", "###"]
