"""Stop strings, hold-back, --ignore-stop, tokens per chunk and deterministic text."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from sluice.sim import SimConfig, chat_prompt_text, sample_tokens
from sluice.sim.chunks import ChatFormat
from sluice.sim.config import parse_sim_options
from sluice.sim.generation import Generation, Outcome
from sluice.sim.params import parse_generation
from sluice.sim.stats import Stats

HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


def contents(events: list[dict[str, Any]]) -> list[str]:
    return [e["choices"][0]["delta"]["content"] for e in events if e["choices"]][1:]


def test_stop_string_split_across_tokens_is_never_sent_in_part(sim):
    script = ["Hel", "lo", " wor", "ld", "!"]
    resp = sim.chat(stream=True, stop=["o wo"], sim={"script": script})
    events = resp.json_events()
    # Hold-back 3: "Hel" -> "", "Hello" -> "He", "Hello wor" completes "o wo" -> "ll".
    assert contents(events) == ["", "He", "ll"]
    final = events[-1]["choices"][0]
    assert (final["finish_reason"], final["stop_reason"]) == ("stop", "o wo")
    assert "".join(contents(events)) == "Hell"
    whole = sim.chat(stop=["o wo"], sim={"script": script}).json()
    assert whole["choices"][0]["message"]["content"] == "Hell"
    assert whole["usage"]["completion_tokens"] == 3


def test_completions_honour_stop_too(sim):
    body = {"stop": "d!", "sim": {"script": ["a", "b", "cd", "!e", "f"]}}
    streamed = sim.completion(stream=True, **body).json_events()
    assert "".join(e["choices"][0]["text"] for e in streamed) == "abc"
    assert streamed[-1]["choices"][0]["stop_reason"] == "d!"
    assert sim.completion(**body).json()["choices"][0]["text"] == "abc"


def test_ignore_stop_flag_sends_stop_strings_through(make_sim):
    sim = make_sim(ignore_stop=True)
    script = ["Hel", "lo", " wor", "ld"]
    events = sim.chat(stream=True, stop=["o wo"], sim={"script": script}).json_events()
    assert contents(events) == script
    assert events[-1]["choices"][0]["finish_reason"] == "stop"  # the script ran out
    capped = sim.chat(max_tokens=3, stop="o wo", sim={"script": script}).json()["choices"][0]
    assert (capped["message"]["content"], capped["finish_reason"]) == ("Hello wor", "length")
    assert capped["stop_reason"] is None


def test_ignore_stop_per_request_and_back(sim):
    script = ["a", "STOP", "b"]
    ignored = sim.chat(stop="STOP", sim={"script": script, "ignore_stop": True}).json()
    assert ignored["choices"][0]["message"]["content"] == "aSTOPb"
    honoured = sim.chat(stop="STOP", sim={"script": script}).json()
    assert honoured["choices"][0]["message"]["content"] == "a"


def test_script_ends_like_eos_and_is_cut_at_max_tokens(sim):
    ran_out = sim.chat(max_tokens=5, sim={"script": ["x", "y"]}).json()
    assert ran_out["choices"][0]["finish_reason"] == "stop"
    assert ran_out["choices"][0]["stop_reason"] is None
    assert ran_out["usage"]["completion_tokens"] == 2
    cut = sim.chat(max_tokens=1, sim={"script": ["x", "y"]}).json()
    assert (cut["choices"][0]["message"]["content"], cut["choices"][0]["finish_reason"]) == (
        "x",
        "length",
    )
    empty = sim.chat(stream=True, sim={"script": []}).json_events()
    assert contents(empty) == [""]
    assert empty[-1]["choices"][0]["finish_reason"] == "stop"


def test_tokens_per_chunk_merges_like_stream_interval(make_sim):
    script = list("abcdefghij")
    sim = make_sim(tokens_per_chunk=4)
    events = sim.chat(
        stream=True, sim={"script": script}, stream_options={"include_usage": True}
    ).json_events()
    assert contents(events) == ["a", "bcde", "fghi", "j"]
    assert events[-1]["usage"]["completion_tokens"] == 10
    override = sim.completion(stream=True, sim={"script": script, "tokens_per_chunk": 3})
    assert [e["choices"][0]["text"] for e in override.json_events()] == ["a", "bcd", "efg", "hij"]


def test_text_is_deterministic_and_predictable(sim):
    first = sim.chat(max_tokens=20).json()["choices"][0]["message"]["content"]
    again = sim.chat(max_tokens=20).json()["choices"][0]["message"]["content"]
    expected = "".join(sample_tokens(0, chat_prompt_text(HELLO), 0, 20))
    assert first == again == expected
    seeded = sim.chat(max_tokens=20, seed=7).json()["choices"][0]["message"]["content"]
    assert seeded == "".join(sample_tokens(7, chat_prompt_text(HELLO), 0, 20)) != first
    streamed = sim.chat(max_tokens=20, stream=True).json_events()
    assert "".join(contents(streamed)) == first
    completion = sim.completion(prompt="abc", max_tokens=16).json()["choices"][0]["text"]
    assert completion == "".join(sample_tokens(0, "abc", 0, 16))


def test_default_max_tokens(make_sim):
    sim = make_sim(max_tokens=7)
    assert sim.chat().json()["usage"]["completion_tokens"] == 7
    assert sim.completion().json()["usage"]["completion_tokens"] == 16


# -- properties of the generation itself (no server): chunking never changes the text ----


class FakeResponse:
    """Collects writes; `must_drain` follows a script, to exercise merging under load."""

    def __init__(self, paused: list[bool]) -> None:
        self.writes: list[bytes] = []
        self._paused = paused
        self._calls = 0

    @property
    def must_drain(self) -> bool:
        self._calls += 1
        return self._paused[self._calls % len(self._paused)] if self._paused else False

    def write(self, data: bytes) -> None:
        self.writes.append(data)


def run_generation(body: dict[str, Any], response: FakeResponse | None) -> Generation:
    config = SimConfig(model="m")
    params = parse_generation("chat", body, config, parse_sim_options(body.get("sim"), config))
    loop = asyncio.new_event_loop()
    try:
        fmt = ChatFormat("chatcmpl-x", 1, "m", params.n, params.logprobs or 0)
        gen = Generation(params, fmt, response, Stats(10), loop)
        while not gen.step():
            pass
        assert gen.done.result() is Outcome.DONE
        if response is not None:
            response.writes.extend(gen.backlog)
    finally:
        loop.close()
    return gen


pieces = st.text(alphabet="ab.\n", min_size=0, max_size=4)


@settings(max_examples=300, deadline=None)
@given(
    script=st.lists(pieces, min_size=0, max_size=12),
    stops=st.lists(st.text(alphabet="ab.\n", min_size=1, max_size=4), min_size=1, max_size=3),
    include=st.booleans(),
    per_chunk=st.integers(1, 4),
    paused=st.lists(st.booleans(), max_size=5),
)
def test_streamed_text_equals_whole_text_for_any_chunking(
    script, stops, include, per_chunk, paused
):
    body = {
        "messages": HELLO,
        "stream": True,
        "stop": stops,
        "include_stop_str_in_output": include,
        "sim": {"script": script, "tokens_per_chunk": per_chunk},
    }
    response = FakeResponse(paused)
    gen = run_generation(body, response)
    events = [orjson.loads(w[6:]) for w in response.writes if w != b"data: [DONE]\n\n"]
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    whole = run_generation({**body, "stream": False}, None).choices[0]
    assert streamed == whole.final_text() == gen.choices[0].final_text()
    full = "".join(script)
    text = whole.final_text()
    if whole.stop_reason is None:
        assert text == full
    elif include:
        assert text.endswith(whole.stop_reason) and full.startswith(text)
    else:
        assert full.startswith(text + whole.stop_reason)
    # Every chunk is one SSE event; the final choice chunk is last before [DONE].
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert response.writes[-1] == b"data: [DONE]\n\n"


SPLIT_STOP = ["Hello", " wor", "ld ST", "OPX after"]


def _messages(server: Any, stream: bool, options: dict[str, Any]) -> Any:
    body = {"max_tokens": 10, "stream": stream, "messages": HELLO, "stop_sequences": ["STOPX"]}
    return server.post("/v1/messages", {**body, "sim": options})


def _responses(server: Any, stream: bool, options: dict[str, Any]) -> Any:
    body = {"input": "Hello there", "stream": stream, "stop": ["STOPX"]}
    return server.post("/v1/responses", {**body, "sim": options})


def test_messages_and_responses_never_send_part_of_a_stop_string(sim):
    """vLLM holds back what could still become a stop string on every route; the
    simulator's /v1/messages and /v1/responses sent "ST" of "STOPX" before it was cut."""
    script = {"script": SPLIT_STOP}
    deltas = [
        orjson.loads(e)["delta"]["text"]
        for e in _messages(sim, True, script).events()
        if e != b"[DONE]" and orjson.loads(e)["type"] == "content_block_delta"
    ]
    assert "".join(deltas) == "Hello world "
    assert all("ST" not in d for d in deltas), deltas
    whole = _messages(sim, False, script).json()
    assert whole["content"][0]["text"] == "Hello world "
    texts = [
        orjson.loads(e)["delta"]
        for e in _responses(sim, True, script).events()
        if e != b"[DONE]" and orjson.loads(e)["type"] == "response.output_text.delta"
    ]
    assert "".join(texts) == "Hello world " and all("ST" not in t for t in texts), texts


def test_messages_and_responses_simulate_a_status_or_refuse_a_fault_they_cannot(sim):
    for post in (_messages, _responses):
        refused = post(sim, True, {"status": 503, "retry_after": 7})
        assert refused.status == 503 and refused.header("retry-after") == "7"
        for fault in ("stall_after", "close_after", "error_after"):
            answer = post(sim, True, {fault: 1})
            assert answer.status == 400 and fault in answer.body.decode(), answer.body
