"""A Policy's stop strings and cut patterns hold in a reasoning model's reasoning too
(`delta.reasoning`, vLLM's older `reasoning_content`), split across chunks, as in its
content: before, the guard read `content` alone, and a cut pattern went out whole in the
reasoning (vLLM is never sent cut patterns, so nothing else stops them)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from sluice.proxy.snapshot import StreamPolicy
from sluice.proxy.stopwords import CutPattern, GuardSpec

from tests.fixtures import ProxyHarness, routed_snapshot, stream_request
from tests.proxy.test_backend_framing import OneAnswerBackend, _chunked

MSG = [{"role": "user", "content": "x"}]
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
BASE = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m"}
_REQUESTS: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": "m", "messages": MSG},
    "/v1/responses": {"model": "m", "input": "x"},
    "/v1/messages": {"model": "m", "max_tokens": 5, "messages": MSG},
}
CUT = CutPattern(pattern=r"secret-\d+", max_len=32)
POLICY = StreamPolicy(
    name="p",
    stop=("###",),
    cut_patterns=(CUT,),
    guard=GuardSpec(stop=("###",), cut_patterns=(CUT,)),
)


def _stream(deltas: list[dict[str, Any]]) -> bytes:
    events = [
        b"data: "
        + json.dumps(
            BASE | {"choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}]},
            separators=(",", ":"),
        ).encode()
        + b"\n\n"
        for d in deltas
    ]
    last = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    events.append(b"data: " + json.dumps(BASE | {"choices": [last]}).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return HEAD + _chunked(events)


@contextmanager
def _served(answer: bytes) -> Iterator[ProxyHarness]:
    backend = OneAnswerBackend(answer, close=False)
    harness = ProxyHarness(routed_snapshot(backend.url, {"m": {"policy": POLICY}}))
    try:
        yield harness
    finally:
        harness.close()
        backend.close()


def _whole(body: dict[str, Any], path: str) -> httpx.Response:
    """`body` as the backend's whole answer to a request on `path`, through the proxy."""
    raw = json.dumps(body).encode()
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    with _served(head % len(raw) + raw) as harness:
        return httpx.post(harness.url + path, json=_REQUESTS[path], timeout=10)


def _read(harness: ProxyHarness) -> tuple[dict[str, str], list[str | None]]:
    result = stream_request(harness.url, {"model": "m", "messages": MSG, "stream": True})
    assert result.status == 200, result.body
    texts: dict[str, str] = {}
    finishes: list[str | None] = []
    for obj in result.data():
        if not isinstance(obj, dict):
            continue
        for choice in obj["choices"]:
            for key, value in choice["delta"].items():
                if isinstance(value, str) and value and key != "role":
                    texts[key] = texts.get(key, "") + value
            if choice.get("finish_reason"):
                finishes.append(choice["finish_reason"])
    assert result.data()[-1] == "[DONE]"
    return texts, finishes


@pytest.mark.parametrize("key", ["reasoning", "reasoning_content"])
def test_a_cut_pattern_split_across_reasoning_chunks_ends_the_choice(key: str) -> None:
    deltas = [{"role": "assistant", "content": ""}]
    deltas += [{key: piece} for piece in ["Think: the ", "key is sec", "ret-4", "2 so"]]
    deltas += [{"content": "The answer"}]
    with _served(_stream(deltas)) as harness:
        texts, finishes = _read(harness)
    assert texts == {key: "Think: the key is "}  # no content after the cut
    assert finishes == ["content_filter"]


def test_a_stop_string_in_the_reasoning_stops_there() -> None:
    deltas = [{"reasoning": p} for p in ["first #", "#", "# then"]] + [{"content": "late"}]
    with _served(_stream(deltas)) as harness:
        texts, finishes = _read(harness)
    assert texts == {"reasoning": "first "}
    assert finishes == ["stop"]


def test_held_reasoning_goes_out_before_the_content() -> None:
    """A reasoning tail that might begin a stop string is held, then sent, as reasoning,
    when the content begins: nothing is lost or moved to the content."""
    deltas = [{"reasoning": "maybe #"}, {"reasoning": "#"}, {"content": "Answer ##"}]
    deltas += [{"content": "# more"}]
    with _served(_stream(deltas)) as harness:
        texts, finishes = _read(harness)
    assert texts == {"reasoning": "maybe ##", "content": "Answer "}
    assert finishes == ["stop"]


def test_reasoning_with_nothing_after_it_is_released_at_the_end() -> None:
    with _served(_stream([{"reasoning": "only #"}, {"reasoning": "#"}])) as harness:
        texts, finishes = _read(harness)
    assert texts == {"reasoning": "only ##"}
    assert finishes == ["stop"]  # the backend's own


def test_a_whole_answer_cut_in_its_reasoning_has_no_content() -> None:
    body = {
        "id": "c",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "reasoning": "the key is secret-42, so",
                    "content": "secret answer",
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
    }
    r = _whole(body, "/v1/chat/completions")
    choice = r.json()["choices"][0]
    assert choice["message"]["reasoning"] == "the key is "
    assert choice["message"]["content"] is None
    assert choice["finish_reason"] == "content_filter"


def _named_stream(events: list[dict[str, Any]], numbered: bool = True) -> bytes:
    """Named events as a backend streams them: the Responses API's numbered, Messages'
    not, and then its `[DONE]`."""
    out = []
    for number, event in enumerate(events):
        obj = {**event, "sequence_number": number} if numbered else event
        out.append(b"event: %b\ndata: %b\n\n" % (obj["type"].encode(), json.dumps(obj).encode()))
    return HEAD + _chunked(out if numbered else [*out, b"data: [DONE]\n\n"])


def _streamed(answer: bytes, path: str) -> tuple[list[dict[str, Any]], str]:
    """The events a client reads when the backend streams `answer` on `path`, parsed (no
    [DONE]), and the body as it came."""
    request = {**_REQUESTS[path], "stream": True}
    with _served(answer) as harness:
        result = stream_request(harness.url, request, path=path)
    assert result.status == 200, result.body
    events = [
        json.loads(raw.split(b"data: ", 1)[1]) for _, raw in result.events if b"[DONE]" not in raw
    ]
    return events, result.body.decode()


def _responses_events(reasoning: list[str], answer: list[str]) -> list[dict[str, Any]]:
    base = {"id": "resp_1", "object": "response", "status": "in_progress", "output": []}
    events: list[dict[str, Any]] = [{"type": "response.created", "response": base}]
    item = {"id": "rs_1", "type": "reasoning", "summary": [], "content": []}
    events.append({"type": "response.output_item.added", "output_index": 0, "item": item})
    for piece in reasoning:
        events.append(
            {"type": "response.reasoning_text.delta", "output_index": 0, "content_index": 0,
             "item_id": "rs_1", "delta": piece}
        )  # fmt: skip
    for piece in answer:
        events.append(
            {"type": "response.output_text.delta", "output_index": 1, "content_index": 0,
             "item_id": "msg_1", "delta": piece, "logprobs": []}
        )  # fmt: skip
    events.append({"type": "response.completed", "response": {**base, "status": "completed"}})
    return events


def test_a_responses_stream_cut_in_its_reasoning_closes_the_reasoning_item() -> None:
    answer = _named_stream(_responses_events(["Think: the ", "key is sec", "ret-42"], ["Hi"]))
    events, body = _streamed(answer, "/v1/responses")
    names = [e["type"] for e in events]
    reasoning = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert reasoning == "Think: the key is "
    assert "response.output_text.delta" not in names
    done = next(e for e in events if e["type"] == "response.reasoning_text.done")
    assert done["text"] == "Think: the key is "
    item = next(e for e in events if e["type"] == "response.output_item.done")["item"]
    assert item["type"] == "reasoning" and item["content"][0]["text"] == "Think: the key is "
    assert names[-1] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "content_filter"}
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert "secret" not in body


def test_a_whole_responses_answer_cut_in_its_reasoning() -> None:
    body = {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "output": [
            {"id": "rs_1", "type": "reasoning", "summary": [],
             "content": [{"type": "reasoning_text", "text": "so secret-7 it is"}]},
            {"id": "msg_1", "type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "secret-7", "annotations": []}]},
        ],
    }  # fmt: skip
    r = _whole(body, "/v1/responses")
    got = r.json()
    assert [item["type"] for item in got["output"]] == ["reasoning"]
    assert got["output"][0]["content"][0]["text"] == "so "
    assert got["status"] == "incomplete"


def _messages_events(thinking: list[str], text: list[str]) -> bytes:
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {"id": "msg_1", "type": "message", "content": []}},
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "thinking", "thinking": ""}},
    ]  # fmt: skip
    for piece in thinking:
        events.append(
            {"type": "content_block_delta", "index": 0,
             "delta": {"type": "thinking_delta", "thinking": piece}}
        )  # fmt: skip
    events.append({"type": "content_block_stop", "index": 0})
    events.append(
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}
    )
    for piece in text:
        events.append(
            {"type": "content_block_delta", "index": 1,
             "delta": {"type": "text_delta", "text": piece}}
        )  # fmt: skip
    events.append({"type": "content_block_stop", "index": 1})
    events.append({"type": "message_delta", "delta": {"stop_reason": "end_turn"}})
    events.append({"type": "message_stop"})
    return _named_stream(events, numbered=False)


def test_a_messages_stream_cut_in_its_thinking_ends_the_message() -> None:
    answer = _messages_events(["Think: the ", "key is sec", "ret-42 ok"], ["Hi"])
    events, body = _streamed(answer, "/v1/messages")
    thinking = "".join(e["delta"]["thinking"] for e in events if e["type"] == "content_block_delta")
    assert thinking == "Think: the key is "
    assert all(
        e["delta"]["type"] == "thinking_delta"
        for e in events
        if "delta" in e and "type" in e["delta"]
    )
    final = next(e for e in events if e["type"] == "message_delta")
    assert final["delta"]["stop_reason"] == "refusal"
    assert events[-1]["type"] == "message_stop"
    assert "secret" not in body and "Hi" not in body


def test_a_whole_message_cut_in_its_thinking() -> None:
    body = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "so secret-7 it is", "signature": ""},
            {"type": "text", "text": "secret-7"},
        ],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 1, "output_tokens": 2},
    }
    r = _whole(body, "/v1/messages")
    got = r.json()
    assert got["content"] == [{"type": "thinking", "thinking": "so ", "signature": ""}]
    assert got["stop_reason"] == "refusal"


def _call(tool: int, arguments: str, name: str | None = None) -> dict[str, Any]:
    call: dict[str, Any] = {"index": tool, "function": {"arguments": arguments}}
    if name is not None:
        call["id"] = f"call_{tool}"
        call["type"] = "function"
        call["function"]["name"] = name
    return call


def _tool_stream(calls: list[dict[str, Any]]) -> bytes:
    events = []
    for call in calls:
        choice = {"index": 0, "delta": {"tool_calls": [call]}, "logprobs": None,
                  "finish_reason": None}  # fmt: skip
        events.append(b"data: " + json.dumps(BASE | {"choices": [choice]}).encode() + b"\n\n")
    last = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    events.append(b"data: " + json.dumps(BASE | {"choices": [last]}).encode() + b"\n\n")
    return HEAD + _chunked([*events, b"data: [DONE]\n\n"])


def _arguments(harness: ProxyHarness) -> tuple[dict[int, str], list[str]]:
    result = stream_request(harness.url, {"model": "m", "messages": MSG, "stream": True})
    assert result.status == 200, result.body
    assert result.data()[-1] == "[DONE]"
    arguments: dict[int, str] = {}
    finishes = []
    for obj in result.data()[:-1]:
        for choice in obj["choices"]:
            for call in choice["delta"].get("tool_calls") or ():
                tool = call["index"]
                arguments[tool] = arguments.get(tool, "") + call["function"].get("arguments", "")
            if choice.get("finish_reason"):
                finishes.append(choice["finish_reason"])
    return arguments, finishes


def test_a_cut_pattern_split_across_tool_call_arguments_ends_the_choice() -> None:
    calls = [_call(0, "", "lookup"), _call(0, '{"key": "sec'), _call(0, 'ret-42"}')]
    calls.append(_call(1, '{"more": 1}', "other"))
    with _served(_tool_stream(calls)) as harness:
        arguments, finishes = _arguments(harness)
    assert arguments == {0: '{"key": "'}
    assert finishes == ["content_filter"]


def test_held_tool_call_arguments_go_out_when_the_choice_finishes() -> None:
    calls = [_call(0, "", "lookup"), _call(0, '{"q": "a #'), _call(0, '#"}')]
    with _served(_tool_stream(calls)) as harness:
        arguments, finishes = _arguments(harness)
    assert arguments == {0: '{"q": "a ##"}'}
    assert finishes == ["tool_calls"]


def test_a_whole_answer_cut_in_a_tool_call() -> None:
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
            {"id": "b", "type": "function",
             "function": {"name": "g", "arguments": '{"k": "secret-9"}'}},
            {"id": "c", "type": "function", "function": {"name": "h", "arguments": "{}"}},
        ],
    }  # fmt: skip
    body = {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}  # fmt: skip
    r = _whole(body, "/v1/chat/completions")
    choice = r.json()["choices"][0]
    calls = choice["message"]["tool_calls"]
    assert [c["function"]["arguments"] for c in calls] == ['{"x": 1}', '{"k": "']
    assert choice["finish_reason"] == "content_filter"


def test_a_messages_tool_use_input_is_guarded_streamed_and_whole() -> None:
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {"id": "msg_1", "type": "message", "content": []}},
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}},
    ]  # fmt: skip
    for piece in ['{"key": "sec', 'ret-42"}']:
        events.append(
            {"type": "content_block_delta", "index": 0,
             "delta": {"type": "input_json_delta", "partial_json": piece}}
        )  # fmt: skip
    events += [
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}},
        {"type": "message_stop"},
    ]
    got, _ = _streamed(_named_stream(events, numbered=False), "/v1/messages")
    partial = "".join(e["delta"]["partial_json"] for e in got if e["type"] == "content_block_delta")
    assert partial == '{"key": "'
    assert next(e for e in got if e["type"] == "message_delta")["delta"]["stop_reason"] == "refusal"

    body = {
        "id": "msg_1", "type": "message", "role": "assistant", "stop_reason": "tool_use",
        "content": [{"type": "text", "text": "Calling."},
                    {"type": "tool_use", "id": "t", "name": "f", "input": {"k": "secret-9"}}],
    }  # fmt: skip
    r = _whole(body, "/v1/messages")
    answer = r.json()
    assert answer["content"] == [{"type": "text", "text": "Calling."}]
    assert answer["stop_reason"] == "refusal"


def test_a_responses_function_call_cut_in_its_arguments() -> None:
    base = {"id": "resp_1", "object": "response", "status": "in_progress", "output": []}
    item = {"id": "fc_1", "type": "function_call", "call_id": "call_1", "name": "lookup",
            "arguments": "", "status": "in_progress"}  # fmt: skip
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": base},
        {"type": "response.output_item.added", "output_index": 0, "item": item},
    ]
    for piece in ['{"key": "sec', 'ret-42"}']:
        events.append(
            {"type": "response.function_call_arguments.delta", "output_index": 0,
             "item_id": "fc_1", "delta": piece}
        )  # fmt: skip
    events.append(
        {"type": "response.function_call_arguments.done", "output_index": 0, "item_id": "fc_1",
         "arguments": '{"key": "secret-42"}'}
    )  # fmt: skip
    events.append({"type": "response.completed", "response": {**base, "status": "completed"}})
    got, body = _streamed(_named_stream(events), "/v1/responses")
    deltas = "".join(
        e["delta"] for e in got if e["type"] == "response.function_call_arguments.delta"
    )
    assert deltas == '{"key": "'
    done = next(e for e in got if e["type"] == "response.function_call_arguments.done")
    assert done["arguments"] == '{"key": "'
    final_item = next(e for e in got if e["type"] == "response.output_item.done")["item"]
    assert final_item["name"] == "lookup" and final_item["arguments"] == '{"key": "'
    assert got[-1]["type"] == "response.incomplete"
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    assert "secret" not in body

    body = {"id": "resp_1", "object": "response", "status": "completed",
            "output": [{**item, "arguments": '{"k": "secret-9"}', "status": "completed"}]}  # fmt: skip
    r = _whole(body, "/v1/responses")
    answer = r.json()
    assert answer["output"][0]["arguments"] == '{"k": "'
    assert answer["status"] == "incomplete"
