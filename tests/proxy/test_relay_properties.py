"""Property tests through the real relay code path (`relay_stream` with its SSE splitter
and `ChunkFilter`): whatever the chunking of the backend's bytes, the client's text is the
reference text cut before the first stop string (or cut pattern), and no character after
it is ever written."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from sluice.proxy.exchange import Exchange
from sluice.proxy.relay_stream import relay_stream
from sluice.proxy.response import FlowListener, Response
from sluice.proxy.snapshot import StreamPolicy
from sluice.proxy.stopwords import CutPattern, GuardSpec

STOPS = ("###", "\n\nUser:", "。\n\n用户", "🛑x")
CUT = CutPattern(pattern=r"(?i)ignore (all )?previous instructions", max_len=64)
ALPHABET = st.sampled_from(list('ab #\nUser:。用户🛑xIgnore previous instructions"\\\té'))


class FakeUpstream:
    """Pushes pre-split bytes to the relay as the backend connection would, one piece per
    loop iteration."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)
        self.complete = False
        self.consumer: Any = None
        self.loop = asyncio.get_running_loop()

    def set_consumer(self, consumer: Any) -> None:
        self.consumer = consumer
        if consumer is not None:
            asyncio.get_running_loop().call_soon(self._next)

    def _next(self) -> None:
        if self.consumer is None:
            return
        if self.pieces:
            self.consumer.feed(self.pieces.pop(0))
            self.consumer.read_done()  # one piece is one read from the socket
            asyncio.get_running_loop().call_soon(self._next)
        else:
            self.complete = True
            self.consumer.complete()

    at_chunk_start = False  # never: this test's reads go through feed

    def take_reads(self, reader: Any) -> None:
        pass

    def pause_reading(self) -> None:
        raise AssertionError("no backpressure in this test")

    def resume_reading(self) -> None:
        pass


class CollectingResponse(Response):
    """Keeps what the relay writes, unframed. A `Response` (a subclass), as the compiled
    relay takes nothing else."""

    def __init__(self) -> None:
        no_connection = SimpleNamespace(
            transport=None, closing=False, write_paused=False, flow_listener=None
        )
        super().__init__(no_connection, keep_alive=True, head_only=False)
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        assert not self.ended
        self.writes.append(data)

    def write_last(self, data: bytes) -> None:
        self.write(data)
        self.ended = True

    def end(self) -> None:
        self.ended = True

    def flush(self) -> None:
        pass

    def set_flow_listener(self, listener: FlowListener | None) -> None:
        pass


def chat_events(tokens: list[str]) -> bytes:
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    out = [
        {
            **head,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        }
    ]
    for i, token in enumerate(tokens):
        last = i == len(tokens) - 1
        out.append(
            {
                **head,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": token},
                        "logprobs": None,
                        "finish_reason": "length" if last else None,
                    }
                ],
            }
        )
    data = b"".join(
        b"data: " + json.dumps(o, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
        for o in out
    )
    return data + b"data: [DONE]\n\n"


def split_bytes(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


def run_relay(
    tokens: list[str], cuts: list[int], policy: StreamPolicy
) -> tuple[list[str], list[Any]]:
    """Returns the cumulative client text after each write, and the parsed events."""

    async def main() -> CollectingResponse:
        response = CollectingResponse()
        upstream = FakeUpstream(split_bytes(chat_events(tokens), cuts))
        ex = Exchange("r", asyncio.get_running_loop().time())
        await relay_stream(ex, upstream, response, policy, None, 1)  # type: ignore[arg-type]
        return response

    response = asyncio.run(main())
    texts: list[str] = []
    events: list[Any] = []
    text = ""
    for write in response.writes:
        for raw in write.split(b"\n\n"):
            if not raw.startswith(b"data: "):
                continue
            payload = raw[6:]
            obj = "[DONE]" if payload == b"[DONE]" else json.loads(payload)
            events.append(obj)
            if isinstance(obj, dict):
                for choice in obj.get("choices", []):
                    text += (choice.get("delta") or {}).get("content") or ""
        texts.append(text)
    return texts, events


def reference_stop(full: str) -> str:
    positions = [full.find(s) for s in STOPS if s in full]
    return full[: min(positions)] if positions else full


@settings(max_examples=150, deadline=None)
@given(
    tokens=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), min_size=1, max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40),
    inject=st.sampled_from(STOPS),
    at=st.integers(min_value=0, max_value=200),
)
def test_stop_strings_whatever_the_chunking(
    tokens: list[str], cuts: list[int], inject: str, at: int
) -> None:
    # Make sure most examples contain a stop string, split across tokens.
    full = "".join(tokens)
    at = at % (len(full) + 1)
    full = full[:at] + inject + full[at:]
    step = max(1, len(full) // max(1, len(tokens)))
    tokens = [full[i : i + step] for i in range(0, len(full), step)]
    policy = StreamPolicy(name="p", stop=STOPS, guard=GuardSpec(stop=STOPS))
    texts, events = run_relay(tokens, cuts, policy)
    expected = reference_stop(full)
    assert texts[-1] == expected
    for text in texts:
        assert expected.startswith(text)  # nothing after the stop position ever went out
    assert events[-1] == "[DONE]"
    finals = [
        c for e in events if isinstance(e, dict) for c in e["choices"] if c.get("finish_reason")
    ]
    assert len(finals) == 1
    assert finals[0]["finish_reason"] == "stop"
    if expected != full:
        assert finals[0]["stop_reason"] in STOPS


@settings(max_examples=100, deadline=None)
@given(
    tokens=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=5), min_size=1, max_size=25),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
    at=st.integers(min_value=0, max_value=200),
    phrase=st.sampled_from(["ignore previous instructions", "Ignore ALL previous instructions"]),
)
def test_cut_patterns_whatever_the_chunking(
    tokens: list[str], cuts: list[int], at: int, phrase: str
) -> None:
    full = "".join(tokens)
    at = at % (len(full) + 1)
    full = full[:at] + phrase + full[at:]
    step = max(1, len(full) // max(1, len(tokens)))
    tokens = [full[i : i + step] for i in range(0, len(full), step)]
    policy = StreamPolicy(name="p", cut_patterns=(CUT,), guard=GuardSpec(cut_patterns=(CUT,)))
    texts, events = run_relay(tokens, cuts, policy)
    match = regex.search(CUT.pattern, full)
    assert match is not None
    expected = full[: match.start()]
    assert texts[-1] == expected
    for text in texts:
        assert expected.startswith(text)
    finals = [
        c for e in events if isinstance(e, dict) for c in e["choices"] if c.get("finish_reason")
    ]
    assert [c["finish_reason"] for c in finals] == ["content_filter"]


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.lists(
        st.text(alphabet=st.sampled_from(list("abc #\n")), min_size=1, max_size=4),
        min_size=1,
        max_size=20,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=5_000), max_size=20),
)
def test_without_a_policy_the_stream_is_passed_through_byte_for_byte(
    tokens: list[str], cuts: list[int]
) -> None:
    async def main() -> bytes:
        response = CollectingResponse()
        data = chat_events(tokens)
        upstream = FakeUpstream(split_bytes(data, cuts))
        ex = Exchange("r", asyncio.get_running_loop().time())
        await relay_stream(ex, upstream, response, StreamPolicy(name=""), None, 1)  # type: ignore[arg-type]
        return b"".join(response.writes)

    assert asyncio.run(main()) == chat_events(tokens)
