"""Backends whose chunks vLLM would never send, but a JSON stream allows: values of the
wrong type where vLLM puts a string or a count (a finish reason that is a number, an
object, a list or a bool; usage counts that are a bool or negative), choices of another
shape (not a list, not objects, an index that is no integer, a delta or a text that is no
object or string), and Python's default JSON layout (a space after each `:`), which
vLLM's byte layout does not match. Each stream is relayed whole and unchanged, in
pass-through and with a stop-string guard; the exchange records only values of the right
type; a token in the spaced layout is counted (its timers see it). A whole (non-stream)
answer of another shape is relayed too. Before: a guarded stream was cut mid-body on each
odd shape, a guarded whole answer whose choices were no list was a 500, and pass-through
counted no token, finish reason or usage in the spaced layout, so its first-token
deadline cut a healthy stream."""

from __future__ import annotations

import io
import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import orjson
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import IncompleteGenerationError
from sluice.proxy.eventfilter import parse_named
from sluice.proxy.observe import JsonAccessLog, access_fields
from sluice.proxy.snapshot import Snapshot, StreamPolicy, StreamTimeouts
from sluice.proxy.sse import data_of
from sluice.proxy.stopwords import GuardSpec

from tests.fixtures import ProxyHarness, passthrough_snapshot, routed_snapshot, stream_request
from tests.proxy.raw_backends import _read_request
from tests.proxy.test_backend_framing import OneAnswerBackend, _chunked

MSG = [{"role": "user", "content": "x"}]
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def _event(obj: dict[str, object], compact: bool) -> bytes:
    separators = (",", ":") if compact else (", ", ": ")
    return b"data: " + json.dumps(obj, separators=separators).encode() + b"\n\n"


def _stream(finish: object, usage: dict[str, object], compact: bool) -> bytes:
    """A token, a last chunk with `finish`, a usage chunk with `usage`. Laid out as vLLM
    does (compact) or as Python's json does by default (a space after each `:` and `,`),
    which vLLM's byte layout does not match: that takes the parsed paths."""
    base = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    events = [
        _event(base | {"choices": [{"index": 0, "delta": {"content": "ok"}}]}, compact),
        _event(base | {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}, compact),
        _event(base | {"choices": [], "usage": usage}, compact),
        b"data: [DONE]\n\n",
    ]
    return HEAD + _chunked(events)


def _guarded(url: str) -> Snapshot:
    guard = GuardSpec(stop=("never in the text",))
    policy = StreamPolicy(name="p", stop=("never in the text",), guard=guard)
    return routed_snapshot(url, {"m": {"policy": policy}})


ODD_FINISH = [5, {"why": "stop"}, ["stop"], True]


@pytest.fixture(params=["pass-through", "guarded"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["compact", "spaced"])
def compact(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "compact")


@contextmanager
def _served(answer: bytes, mode: str) -> Iterator[ProxyHarness]:
    """A proxy in front of a backend that answers every request with `answer`: in
    pass-through, guarded by a stop string that never comes ("guarded"), or by "###"
    ("stopped")."""
    backend = OneAnswerBackend(answer, close=False)
    if mode == "pass-through":
        snapshot = passthrough_snapshot(backend.url)
    else:
        snapshot = _guarded(backend.url) if mode == "guarded" else _stopped(backend.url)
    harness = ProxyHarness(snapshot)
    try:
        yield harness
    finally:
        harness.close()
        backend.close()


def _relayed(harness: ProxyHarness, answer: bytes) -> list[bytes]:
    """The client's events, checked to be the backend's, unchanged."""
    result = stream_request(harness.url, {"model": "m", "messages": MSG, "stream": True})
    assert result.status == 200, result.body
    sent = [event.rstrip(b"\n") for event in answer.split(b"\r\n") if event.startswith(b"data: ")]
    got = [event for _, event in result.events]
    assert got == sent
    return got


@pytest.mark.parametrize("finish", ODD_FINISH, ids=["number", "object", "list", "bool"])
def test_wrongly_typed_values_are_relayed_and_not_recorded(
    finish: object, mode: str, compact: bool
) -> None:
    answer = _stream(finish, {"prompt_tokens": True, "completion_tokens": -3}, compact)
    with _served(answer, mode) as harness:
        _relayed(harness, answer)
        (ex,) = harness.wait_finished(1)
    assert ex.finish_reason is None
    assert ex.prompt_tokens is None and ex.completion_tokens is None
    assert ex.upstream_error is None and ex.error_code is None
    assert ex.content_chunks == 1 and ex.first_token_at is not None
    sink = io.BytesIO()
    JsonAccessLog(sink).write(access_fields(ex))
    line = orjson.loads(sink.getvalue())
    assert line["finish_reason"] is None and line["tokens_in"] is None
    assert line["tokens_out"] == 1  # the one content chunk: no usable usage


def test_a_spaced_stream_is_read_as_a_compact_one(mode: str) -> None:
    """Python's default JSON layout: the token times the stream (its first-token deadline
    is met by it), the finish reason and the usage are recorded, as for vLLM's layout."""
    answer = _stream("stop", {"prompt_tokens": 4, "completion_tokens": 1}, compact=False)
    with _served(answer, mode) as harness:
        _relayed(harness, answer)
        (ex,) = harness.wait_finished(1)
    assert ex.first_token_at is not None and ex.content_chunks == 1
    assert (ex.finish_reason, ex.prompt_tokens, ex.completion_tokens) == ("stop", 4, 1)


ODD_SHAPES = [
    {"choices": 5},
    {"choices": ["x", 3, None]},
    {"choices": [{"index": [0], "delta": {"content": "x"}}]},
    {"choices": [{"index": 0, "delta": 5}]},
    {"choices": [{"index": 0, "delta": {"content": 5}}]},
    {"choices": [{"index": 0, "text": ["x"]}]},
    {"choices": [], "usage": [1, 2]},
]


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=[json.dumps(s)[:40] for s in ODD_SHAPES])
def test_a_chunk_of_another_shape_is_relayed_as_it_came(
    shape: dict[str, object], mode: str, compact: bool
) -> None:
    base = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    events = [_event(base | shape, compact), b"data: [DONE]\n\n"]
    answer = HEAD + _chunked(events)
    with _served(answer, mode) as harness:
        _relayed(harness, answer)
        (ex,) = harness.wait_finished(1)
    assert ex.status == 200 and ex.error_code is None and ex.upstream_error is None


class PacedBackend(OneAnswerBackend):
    """Answers each request with a spaced-layout stream of tokens `gap` seconds apart."""

    def __init__(self, tokens: list[str], gap: float) -> None:
        self.tokens, self.gap = tokens, gap
        super().__init__(b"", close=True)

    def _serve(self, conn: socket.socket) -> None:
        base = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m"}
        with conn:
            if _read_request(conn, bytearray()) is None:
                return
            conn.sendall(HEAD)
            try:
                for token in self.tokens:
                    time.sleep(self.gap)
                    delta = {"index": 0, "delta": {"content": token}}
                    conn.sendall(_chunked_part(_event(base | {"choices": [delta]}, False)))
                last = {"index": 0, "delta": {}, "finish_reason": "stop"}
                conn.sendall(_chunked_part(_event(base | {"choices": [last]}, False)))
                conn.sendall(_chunked([b"data: [DONE]\n\n"]))
            except OSError:  # the proxy cut the stream
                return


def _chunked_part(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def test_spaced_tokens_meet_the_first_token_deadline() -> None:
    """Six tokens 0.3 s apart under a 1 s first-token and inter-token deadline: the stream
    ends whole. Had its tokens gone unseen, the first-token deadline would cut it at 1 s."""
    tokens = ["a", "b", "c", "d", "e", "f"]
    backend = PacedBackend(tokens, gap=0.3)
    timeouts = StreamTimeouts(first_token=1.0, inter_token=1.0, total=30.0)
    policy = StreamPolicy(name="p", timeouts=timeouts)
    harness = ProxyHarness(routed_snapshot(backend.url, {"m": {"policy": policy}}))
    try:
        result = stream_request(harness.url, {"model": "m", "messages": MSG, "stream": True})
        (ex,) = harness.wait_finished(1)
    finally:
        harness.close()
        backend.close()
    assert result.status == 200, result.body
    text = "".join(
        choice["delta"].get("content") or ""
        for _, event in result.events
        if event.startswith(b"data: {")
        for choice in json.loads(event[6:]).get("choices", [])
    )
    assert text == "".join(tokens), result.events
    assert ex.timeout is None and ex.content_chunks == len(tokens)
    assert ex.finish_reason == "stop"


@pytest.mark.parametrize("choices", [5, "stop", [5, None], [{"message": 5, "finish_reason": 7}]])
def test_a_whole_answer_of_another_shape_is_relayed_as_it_came(choices: object, mode: str) -> None:
    body = json.dumps({"id": "x", "object": "chat.completion", "choices": choices}).encode()
    answer = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
        % (len(body), body)
    )
    with _served(answer, mode) as harness:
        with httpx.Client(timeout=10) as client:
            reply = client.post(
                f"{harness.url}/v1/chat/completions", json={"model": "m", "messages": MSG}
            )
        (ex,) = harness.wait_finished(1)
    assert (reply.status_code, reply.content) == (200, body)
    assert ex.finish_reason is None and ex.error_code is None


def _stopped(url: str) -> Snapshot:
    guard = GuardSpec(stop=("###",))
    return routed_snapshot(
        url, {"m": {"policy": StreamPolicy(name="p", stop=("###",), guard=guard)}}
    )


def _chunk_json(content: str) -> str:
    choice = {"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": None}
    obj = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    return json.dumps(obj | {"choices": [choice]}, separators=(",", ":"))


TOKEN = _chunk_json("hi ### there")
# The same chunk as events a backend may write: SSE fields before or after its data line,
# its JSON over two data lines, the stop string after a lone surrogate escape (which
# orjson refuses and Python's json, the openai SDK's parser, reads).
ODD_EVENTS = {
    "event-line": b"event: message\ndata: " + TOKEN.encode() + b"\n\n",
    "id-line": b"id: 7\ndata: " + TOKEN.encode() + b"\n\n",
    "retry-line": b"retry: 100\ndata: " + TOKEN.encode() + b"\n\n",
    "id-after": b"data: " + TOKEN.encode() + b"\nid: 8\n\n",
    "two-data-lines": b"data: "
    + TOKEN[: TOKEN.index('"choices"')].encode()
    + b"\ndata: "
    + TOKEN[TOKEN.index('"choices"') :].encode()
    + b"\n\n",
    "lone-surrogate": b"data: " + _chunk_json("\ud800 hi ### there").encode() + b"\n\n",
}


@pytest.mark.parametrize("event", ODD_EVENTS.values(), ids=ODD_EVENTS.keys())
def test_a_stop_string_in_an_event_of_another_form_is_cut(event: bytes) -> None:
    answer = HEAD + _chunked([event, b"data: [DONE]\n\n"])
    with _served(answer, "stopped") as harness:
        result = stream_request(harness.url, {"model": "m", "messages": MSG, "stream": True})
        (ex,) = harness.wait_finished(1)
    assert result.status == 200, result.body
    raw = b"".join(e for _, e in result.events)
    assert b"there" not in raw, raw
    datas = [data_of(e + b"\n\n")[1] for _, e in result.events]  # as a client reads them
    text = "".join(
        choice["delta"].get("content") or ""
        for data in datas
        if data and data.startswith(b"{")
        for choice in json.loads(data)["choices"]
    )
    assert text.endswith("hi ") and "###" not in text, text
    assert (ex.cut, ex.finish_reason, ex.error_code) == ("###", "stop", None)
    assert result.events[-1][1] == b"data: [DONE]"
    assert sum(1 for _, e in result.events if e == b"data: [DONE]") == 1


def test_an_event_stream_named_in_another_case_is_guarded_as_a_stream() -> None:
    """`Text/Event-Stream` is an event stream (media types ignore case): it is relayed as
    one and guarded, where it went out whole, unguarded, once it had ended."""
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: Text/Event-Stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    answer = head + _chunked([b"data: " + TOKEN.encode() + b"\n\n", b"data: [DONE]\n\n"])
    with _served(answer, "stopped") as harness:
        result = stream_request(harness.url, {"model": "m", "messages": MSG, "stream": True})
        (ex,) = harness.wait_finished(1)
    assert result.status == 200, result.body
    assert b"there" not in b"".join(e for _, e in result.events)
    assert (ex.cut, ex.finish_reason) == ("###", "stop")


def _json_answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (
        len(body),
        body,
    )


TGI_BODIES = [
    {"choices": [{"index": 0, "text": "ok", "finish_reason": 7}], "usage": [1, 2]},
    {"choices": [{"index": 0, "text": "ok", "stop_reason": {"a": 1}}], "usage": {"x": "y"}},
]


def test_tgi_generate_reads_a_json_type_written_in_capitals(mode: str) -> None:
    body = b'{"choices": [{"index": 0, "text": "ok", "finish_reason": "length"}]}'
    answer = _json_answer(body).replace(b"application/json", b"Application/JSON")
    with _served(answer, mode) as harness:
        reply = httpx.post(harness.url + "/generate", json={"inputs": "hi"}, timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"generated_text": "ok"}


@pytest.mark.parametrize("body", TGI_BODIES, ids=[json.dumps(b)[:30] for b in TGI_BODIES])
def test_tgi_generate_reads_an_odd_answer_without_a_500(body: dict[str, object], mode: str) -> None:
    request = {"inputs": "hi", "parameters": {"max_new_tokens": 5, "details": True}}
    with _served(_json_answer(json.dumps(body).encode()), mode) as harness:
        reply = httpx.post(harness.url + "/generate", json=request, timeout=10)
    assert reply.status_code == 200, reply.text
    out = reply.json()
    assert out["generated_text"] == "ok"
    assert isinstance(out["details"]["generated_tokens"], int)


TGI_UNREADABLE = [
    _json_answer(b"[1,2,3]"),
    _json_answer(b'{"id": "x", "choices": {"a": 1}}'),
    _json_answer(b'{"choices": 5}'),
    _json_answer(b'{"choices": []}'),
    _json_answer(b'{"choices": [1, 2]}'),
    _json_answer(b'{"choices": [{"index": 0, "text": 5, "finish_reason": "stop"}]}'),
    _json_answer(b'{"object": "text_completion"}'),
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
]


@pytest.mark.parametrize(
    "answer",
    TGI_UNREADABLE,
    ids=[
        "array",
        "choices-object",
        "choices-number",
        "choices-empty",
        "choices-not-objects",
        "text-not-string",
        "no-choices",
        "text-plain",
        "empty",
    ],
)
def test_tgi_generate_answers_a_backends_unreadable_answer_with_a_502(
    answer: bytes, mode: str
) -> None:
    # No completion text to translate: a TGI client got `generated_text: ""` (an object
    # without choices) or the backend's body raw under its own type (text/plain).
    with _served(answer, mode) as harness:
        reply = httpx.post(harness.url + "/generate", json={"inputs": "hi"}, timeout=10)
    assert reply.status_code == 502, reply.text
    assert reply.json() == {
        "error": "backend answered an unexpected body",
        "error_type": "generation",
    }


TGI_CHUNKS = [
    {"choices": {"a": 1}},
    {"choices": 7},
    {"choices": [1, "a", None]},
    {"choices": [{"index": 0, "text": 5, "finish_reason": None}]},
    {"choices": [{"index": 0, "text": ["a"], "finish_reason": None}]},
]


@pytest.mark.parametrize("chunk", TGI_CHUNKS, ids=[json.dumps(c)[:30] for c in TGI_CHUNKS])
def test_tgi_generate_stream_reads_odd_chunks_to_its_last_event(
    chunk: dict[str, object], mode: str
) -> None:
    base = {"id": "c", "object": "text_completion", "created": 0, "model": "m"}
    token = {"choices": [{"index": 0, "text": "ok", "finish_reason": None}]}
    last = {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}
    events = [b"id: 1\ndata: " + json.dumps(base | token).encode() + b"\n\n"]
    events += [b"data: " + json.dumps(base | c).encode() + b"\n\n" for c in (chunk, last)]
    answer = HEAD + _chunked([*events, b"data: [DONE]\n\n"])
    with (
        _served(answer, mode) as harness,
        httpx.stream(
            "POST", harness.url + "/generate_stream", json={"inputs": "hi"}, timeout=10
        ) as reply,
    ):
        raw = reply.read()
    assert reply.status_code == 200
    out = [json.loads(e[5:]) for e in raw.split(b"\n\n") if e.startswith(b"data:")]
    assert [e["token"]["text"] for e in out] == ["ok", ""]
    assert out[-1]["generated_text"] == "ok"


def test_a_whole_answer_with_a_lone_surrogate_is_guarded() -> None:
    """orjson refuses a lone surrogate escape and Python's json (the openai SDK's) reads
    it: the answer is read so, and its stop string cut, not relayed unread."""
    message = {"role": "assistant", "content": "\ud800 hi ### there"}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    body = json.dumps({"id": "x", "object": "chat.completion", "choices": [choice]}).encode()
    with _served(_json_answer(body), "stopped") as harness:
        reply = httpx.post(
            harness.url + "/v1/chat/completions", json={"model": "m", "messages": MSG}, timeout=10
        )
    assert reply.status_code == 200, reply.text
    content = json.loads(reply.content)["choices"][0]["message"]["content"]
    assert content == "\ud800 hi "


def test_a_named_event_with_a_lone_surrogate_is_read() -> None:
    """The Anthropic-shaped stream's events (`/v1/messages`) are read the same way."""
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta"}}
    delta["delta"]["text"] = "\ud800 hi ### there"  # type: ignore[index]
    event = b"event: content_block_delta\ndata: " + json.dumps(delta).encode()
    parsed = parse_named(event)
    assert parsed is not None and parsed[0] == "content_block_delta"
    assert parsed[1]["delta"]["text"] == "\ud800 hi ### there"


def test_a_backends_204_goes_out_without_a_content_length() -> None:
    """RFC 9110 (8.6): a 204 carries no Content-Length; sluice wrote `content-length: 0`."""
    with (
        _served(b"HTTP/1.1 204 No Content\r\n\r\n", "pass-through") as harness,
        socket.create_connection(("127.0.0.1", int(harness.url.rsplit(":", 1)[1]))) as sock,
    ):
        sock.sendall(
            b"POST /tokenize HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b'content-length: 14\r\n\r\n{"prompt":"x"}'
        )
        sock.settimeout(5)
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 204 No Content\r\n"), head
    assert b"content-length" not in head.lower() and head.endswith(b"\r\n\r\n")


def test_a_tgi_stream_the_backend_ends_unfinished_ends_with_incomplete_generation(
    mode: str,
) -> None:
    """A backend that ends its stream cleanly with no finish chunk and no [DONE]: the TGI
    stream just stopped, with no last event (`generated_text`) and no error. Now TGI's own
    `incomplete_generation` error, which huggingface_hub raises as IncompleteGenerationError;
    with the finish chunk but no [DONE], the last event as usual."""
    base = {"id": "c", "object": "text_completion", "created": 0, "model": "m"}
    token = {"choices": [{"index": 0, "text": "ok", "finish_reason": None}]}
    finish = {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}

    def stream(*chunks: dict[str, object]) -> list[dict[str, object]]:
        events = [b"data: " + json.dumps(base | c).encode() + b"\n\n" for c in chunks]
        with (
            _served(HEAD + _chunked(events), mode) as harness,
            httpx.stream(
                "POST", harness.url + "/generate_stream", json={"inputs": "hi"}, timeout=10
            ) as reply,
        ):
            raw = reply.read()
        assert reply.status_code == 200
        return [json.loads(e[5:]) for e in raw.split(b"\n\n") if e.startswith(b"data:")]

    cut = stream(token)
    assert cut[0]["token"]["text"] == "ok"
    assert cut[-1] == {
        "error": "the backend ended the stream before the generation finished",
        "error_type": "incomplete_generation",
    }
    finished = stream(token, finish)
    assert finished[-1]["generated_text"] == "ok" and "error" not in finished[-1]

    events = [b"data: " + json.dumps(base | token).encode() + b"\n\n"]
    with _served(HEAD + _chunked(events), mode) as harness:
        client = InferenceClient(harness.url)
        with pytest.raises(IncompleteGenerationError):
            list(client.text_generation("hi", stream=True))


BROKEN = b"ZZ\r\nnot a chunk\r\n"  # a chunk size that is no hex number: the framing breaks


def test_a_broken_tgi_stream_ends_with_tgis_error_event() -> None:
    """The endpoint's own error shape, not OpenAI's `data: {"error": {...}}` + [DONE]."""
    base = {"id": "c", "object": "text_completion", "created": 0, "model": "m"}
    token = {"choices": [{"index": 0, "text": "ok", "finish_reason": None}]}
    first = b"data: " + json.dumps(base | token).encode() + b"\n\n"
    answer = HEAD + b"%x\r\n%b\r\n" % (len(first), first) + BROKEN
    with (
        _served(answer, "pass-through") as harness,
        httpx.stream(
            "POST", harness.url + "/generate_stream", json={"inputs": "hi"}, timeout=10
        ) as reply,
    ):
        raw = reply.read()
    events = [json.loads(e[5:]) for e in raw.split(b"\n\n") if e.startswith(b"data:")]
    assert events[0]["token"]["text"] == "ok"
    assert events[-1]["error_type"] == "generation", events
    assert "backend stream broke" in events[-1]["error"] and b"[DONE]" not in raw


def test_a_broken_messages_stream_ends_with_an_anthropic_error_event() -> None:
    start = {"type": "message_start", "message": {"id": "m", "type": "message", "content": []}}
    first = b"event: message_start\ndata: " + json.dumps(start).encode() + b"\n\n"
    answer = HEAD + b"%x\r\n%b\r\n" % (len(first), first) + BROKEN
    body = {"model": "m", "max_tokens": 5, "messages": MSG, "stream": True}
    with _served(answer, "pass-through") as harness:
        result = stream_request(harness.url, body, path="/v1/messages")
    errors = [e for _, e in result.events if e.startswith(b"event: error")]
    assert len(errors) == 1, result.events
    error = json.loads(data_of(errors[0] + b"\n\n")[1] or b"{}")
    assert error["type"] == "error" and "backend stream broke" in error["error"]["message"]


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (
            b"HTTP/1.1 500 Oops\r\ncontent-type: text/html\r\ncontent-length: 13\r\n\r\n<h1>boom</h1>",
            502,
        ),
        (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nhello", 502),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", 502),
        (_json_answer(b'{"object":"list","data":[{"id":"m","object":"model"}]}'), 200),
        (
            _json_answer(b'{"error":{"message":"no","type":"x"}}').replace(b"200 OK", b"401 No"),
            401,
        ),
    ],
    ids=["html-500", "text-200", "empty-200", "list", "openai-error"],
)
def test_the_model_list_is_relayed_only_as_json(answer: bytes, status: int) -> None:
    """Pass-through `GET /v1/models`: the backend's list or OpenAI-shaped error with its
    status; anything else (an HTML page, text, nothing) a 502 in OpenAI's shape, where it
    went out under `content-type: application/json` as it came."""
    with _served(answer, "pass-through") as harness:
        reply = httpx.get(harness.url + "/v1/models", timeout=10)
    assert reply.status_code == status, reply.text
    assert isinstance(reply.json(), dict)
    if status == 502:
        assert reply.json()["error"]["type"] == "upstream_error"
