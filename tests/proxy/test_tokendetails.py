"""Token details (logprobs, token ids) that wait while the guard holds their text."""

from __future__ import annotations

import json

from sluice.proxy.tokendetails import DetailHold, merge_token_details, take_token_details

from tests.fixtures import stream_request
from tests.proxy.test_backend_framing import _chunked
from tests.proxy.test_reasoning_guard import _REQUESTS, BASE, HEAD, _served
from tests.proxy.test_stream_safety import _chunk_tokens


def test_details_are_taken_from_a_choice_and_joined_in_order() -> None:
    chat = [
        {"logprobs": {"content": [{"token": t}], "refusal": None}, "token_ids": [i]}
        for i, t in enumerate("ab")
    ]
    taken = [take_token_details(choice) for choice in chat]
    assert all(c["logprobs"] is None and c["token_ids"] is None for c in chat)
    assert merge_token_details(taken) == {
        "logprobs": {"content": [{"token": "a"}, {"token": "b"}], "refusal": None},
        "token_ids": [0, 1],
    }
    completions = [
        {"tokens": ["x"], "token_logprobs": [-1.0], "top_logprobs": [{}], "text_offset": [0]},
        {"tokens": ["y"], "token_logprobs": [-2.0], "top_logprobs": [{}], "text_offset": [1]},
    ]
    merged = merge_token_details([{"logprobs": c} for c in completions])["logprobs"]
    assert merged["tokens"] == ["x", "y"] and merged["text_offset"] == [0, 1]
    assert completions[0]["tokens"] == ["x"]  # the chunks' own objects are not changed
    assert take_token_details({"logprobs": None}) == {}


def test_released_text_waits_for_the_chunk_whose_details_wait() -> None:
    hold = DetailHold(0)
    hold.add("ab", {"token_ids": [1]})
    assert hold.release("a", blocked=False) == ("", {})  # "b" held: the chunk's text waits
    hold.add("cd", {"token_ids": [2]})
    assert hold.release("bcd", blocked=True) == ("", {})  # another guard holds text back
    assert hold.release("", blocked=False) == ("abcd", {"token_ids": [1, 2]})
    assert hold.idle
    hold.add("ef", {"token_ids": [3]})
    hold.add("g", {"token_ids": [4]})
    assert hold.release("ef", blocked=False) == ("ef", {"token_ids": [3]})
    assert hold.drain("g", cut=False) == ("g", {"token_ids": [4]})


def test_a_chunk_after_text_held_without_details_waits_for_its_own_text() -> None:
    """Text an earlier chunk left held (that chunk had no logprobs) comes first in what the
    guard releases: the next chunk's logprobs wait until its own text is all out."""
    deltas = [({"content": "x#"}, None), ({"content": "ab#"}, ["ab#"]), ({"content": "c"}, ["c"])]
    events = []
    for delta, tokens in deltas:
        logprobs = None if tokens is None else {"content": [{"token": t} for t in tokens]}
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None}
        events.append(b"data: " + json.dumps(BASE | {"choices": [choice]}).encode() + b"\n\n")
    last = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    events += [b"data: " + json.dumps(BASE | {"choices": [last]}).encode() + b"\n\n"]
    with _served(HEAD + _chunked([*events, b"data: [DONE]\n\n"])) as harness:
        body = {**_REQUESTS["/v1/chat/completions"], "stream": True}
        result = stream_request(harness.url, body)
    sent = [
        _chunk_tokens(obj["choices"][0], chat=True)
        for obj in result.data()
        if isinstance(obj, dict) and obj["choices"]
    ]
    assert [pair for pair in sent if pair != ("", [])] == [
        ("x", []),
        ("#", []),  # the first chunk's held "#": released before "ab#", with no logprobs
        ("ab#c", ["ab#", "c"]),
    ], sent
