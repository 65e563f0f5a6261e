"""Backends that frame their answers in ways vLLM does not, but HTTP and SSE allow: event
lines ended by CR alone or CRLF, `data:[DONE]` without its space, and bodies that end
with the connection (neither Content-Length nor chunked). Each is relayed whole, with one
`[DONE]`, in pass-through and with a stop-string guard; a body cut short is still a 502."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from sluice.proxy.relay import MAX_EVENT_BYTES
from sluice.proxy.snapshot import Snapshot, StreamPolicy
from sluice.proxy.sse import SseSplitter, is_done
from sluice.proxy.stopwords import GuardSpec

from tests.fixtures import ProxyHarness, passthrough_snapshot, routed_snapshot, stream_request
from tests.proxy.raw_backends import CHAT_RESPONSE, OneConnectionBackend, _read_request

MSG = [{"role": "user", "content": "x"}]
TOKENS = ["Hel", "lo", ", wor", "ld"]


def _chunk_event(content: str | None, finish: str | None = None) -> bytes:
    delta = {"content": content} if content is not None else {"role": "assistant"}
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    obj = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [choice],
    }
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode()


def _events(line_end: bytes, done: bytes = b"data: [DONE]") -> list[bytes]:
    """A whole stream's events, each with its blank line, lines ended by `line_end`
    (`done` b"": no [DONE])."""
    lines = [_chunk_event(None), *(_chunk_event(t) for t in TOKENS), _chunk_event("", "stop")]
    lines += [done] if done else []
    return [line + line_end + line_end for line in lines]


def _chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


class OneAnswerBackend:
    """Answers every request on a connection of its own with the same bytes; closes the
    connection after them when `close` (the end of a close-delimited body)."""

    def __init__(self, answer: bytes, close: bool) -> None:
        self.answer = answer
        self.close_after = close
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buffer = bytearray()
            while _read_request(conn, buffer) is not None:
                conn.sendall(self.answer)
                if self.close_after:
                    return

    def close(self) -> None:
        self.listener.close()


def _stream_head(chunked: bool) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n" + (
        b"transfer-encoding: chunked\r\n\r\n" if chunked else b"connection: close\r\n\r\n"
    )


def _guarded(url: str) -> Snapshot:
    guard = GuardSpec(stop=("never in the text",))
    policy = StreamPolicy(name="p", stop=("never in the text",), guard=guard)
    return routed_snapshot(url, {"m": {"policy": policy}})


@pytest.fixture(params=["pass-through", "guarded"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _harness(url: str, mode: str) -> ProxyHarness:
    return ProxyHarness(passthrough_snapshot(url) if mode == "pass-through" else _guarded(url))


@pytest.fixture
def served(mode: str, request: pytest.FixtureRequest) -> Iterator[tuple[ProxyHarness, str]]:
    backend = OneAnswerBackend(request.param, close=True)
    harness = _harness(backend.url, mode)
    yield harness, mode
    harness.close()
    backend.close()


def _stream(harness: ProxyHarness) -> list[bytes]:
    result = stream_request(harness.url, {"model": "m", "messages": MSG, "stream": True})
    assert result.status == 200, result.body
    return [event for _, event in result.events]


def _text(events: list[bytes]) -> str:
    text = ""
    for event in events:
        if event.startswith(b"data: {"):
            for choice in json.loads(event[6:]).get("choices", []):
                text += choice["delta"].get("content") or ""
    return text


def _dones(events: list[bytes]) -> int:
    return sum(1 for event in events if event.replace(b" ", b"") == b"data:[DONE]")


CR_ONLY = _stream_head(True) + _chunked(_events(b"\r"))
# The same CR-only stream with each event's two CRs in different HTTP chunks: the second
# read starts with the CR that ends the event (no LF of a CRLF to drop).
CR_SPLIT = _stream_head(True) + _chunked(
    [part for event in _events(b"\r") for part in (event[:-1], event[-1:])]
)
CRLF_SPLIT = _stream_head(True) + _chunked(
    [part for event in _events(b"\r\n") for part in (event[:-1], event[-1:])]
)
UNSPACED_DONE = _stream_head(True) + _chunked(_events(b"\n", done=b"data:[DONE]"))
CLOSE_DELIMITED_STREAM = _stream_head(False) + b"".join(_events(b"\n"))
# Without [DONE]: the close ends the body cleanly, so the client gets sluice's [DONE] and
# no error event.
CLOSE_DELIMITED_NO_DONE = _stream_head(False) + b"".join(_events(b"\n", done=b""))


@pytest.mark.parametrize(
    "served",
    [CR_ONLY, CR_SPLIT, CRLF_SPLIT, UNSPACED_DONE, CLOSE_DELIMITED_STREAM, CLOSE_DELIMITED_NO_DONE],
    ids=["cr-only", "cr-split", "crlf-split", "unspaced-done", "close-delimited", "close-no-done"],
    indirect=True,
)
def test_every_event_reaches_the_client_with_one_done(served: tuple[ProxyHarness, str]) -> None:
    harness, _ = served
    events = _stream(harness)
    assert _text(events) == "".join(TOKENS), events
    assert b"error" not in b"".join(events), events
    assert _dones(events) == 1, events
    assert is_done(events[-1] + b"\n\n"), events
    (exchange,) = harness.wait_finished(1)
    assert exchange.finish_reason == "stop"
    assert exchange.upstream_error is None


def test_the_openai_sdk_reads_a_cr_only_stream_whole() -> None:
    backend = OneAnswerBackend(CR_ONLY, close=True)
    harness = ProxyHarness(passthrough_snapshot(backend.url))
    try:
        client = openai.OpenAI(base_url=harness.url + "/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(model="m", messages=MSG, stream=True)  # type: ignore[arg-type]
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
        assert text == "".join(TOKENS)
    finally:
        harness.close()
        backend.close()


def _json_answer(body: bytes, *, length: int | None, version: bytes = b"HTTP/1.1") -> bytes:
    head = version + b" 200 OK\r\ncontent-type: application/json\r\n"
    if length is not None:
        head += b"content-length: %d\r\n" % length
    else:
        head += b"connection: close\r\n"
    return head + b"\r\n" + body


@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/1.0"])
def test_a_body_that_ends_with_the_connection_is_relayed_whole(version: bytes, mode: str) -> None:
    backend = OneAnswerBackend(_json_answer(CHAT_RESPONSE, length=None, version=version), True)
    harness = _harness(backend.url, mode)
    try:
        client = openai.OpenAI(base_url=harness.url + "/v1", api_key="unused", max_retries=0)
        completion = client.chat.completions.create(model="m", messages=MSG)  # type: ignore[arg-type]
        assert completion.choices[0].message.content == "ok"
        assert completion.usage is not None and completion.usage.total_tokens == 2
        (exchange,) = harness.wait_finished(1)
        assert exchange.status == 200 and exchange.upstream_error is None
        assert harness.open_upstream_connections() == 0  # closed by the backend, not pooled
    finally:
        harness.close()
        backend.close()


class ResetAfterBackend(OneConnectionBackend):
    """Sends `answer`, then resets the connection (RST, SO_LINGER 0) instead of closing it."""

    def __init__(self, answer: bytes) -> None:
        self.answer_bytes = answer
        super().__init__()

    def answer(self, conn: socket.socket) -> None:
        conn.sendall(self.answer_bytes)
        time.sleep(0.2)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_a_body_without_framing_cut_by_a_reset_is_a_502() -> None:
    """Only a clean close ends a close-delimited body: a reset leaves it cut short."""
    backend = ResetAfterBackend(_json_answer(CHAT_RESPONSE[:40], length=None))
    harness = ProxyHarness(passthrough_snapshot(backend.url))
    try:
        client = openai.OpenAI(base_url=harness.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="m", messages=MSG)  # type: ignore[arg-type]
        assert caught.value.status_code == 502
        assert "upstream_reset" in str(caught.value.body)
    finally:
        harness.close()
        backend.close()


def test_a_body_cut_short_of_its_content_length_is_still_a_502(mode: str) -> None:
    cut = _json_answer(CHAT_RESPONSE[:40], length=len(CHAT_RESPONSE))
    backend = OneAnswerBackend(cut, close=True)
    harness = _harness(backend.url, mode)
    try:
        client = openai.OpenAI(base_url=harness.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="m", messages=MSG)  # type: ignore[arg-type]
        assert caught.value.status_code == 502
        assert "closed the connection mid-response" in caught.value.message
    finally:
        harness.close()
        backend.close()


def test_a_chunked_stream_cut_before_its_terminator_is_still_an_error_event() -> None:
    events = _events(b"\n")
    cut = _stream_head(True) + b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in events[:3])
    backend = OneAnswerBackend(cut, close=True)
    harness = ProxyHarness(passthrough_snapshot(backend.url))
    try:
        events_out = _stream(harness)
        assert b"upstream_reset" in b"".join(events_out), events_out
        assert _dones(events_out) == 1
    finally:
        harness.close()
        backend.close()


@pytest.mark.parametrize(
    ("reads", "events", "partial"),
    [
        ([b"data: x\r\r"], [b"data: x"], True),  # the next read may begin with a LF
        ([b"data: x\r\r", b"\ndata: y\n\n"], [b"data: x", b"data: y"], False),
        ([b"data: x\r", b"\r"], [b"data: x"], True),
        ([b"data: x\r", b"\n\r", b"\n"], [b"data: x"], False),
        ([b"data: x\r", b"\ndata: y\r\r"], [b"data: x\ndata: y"], True),  # one event, 2 lines
        ([b"a: 1\rdata: x\r\r", b"data: y\r\n\r\n"], [b"a: 1\ndata: x", b"data: y"], False),
    ],
)
def test_sse_splitter_ends_lines_at_cr_lf_or_crlf(
    reads: list[bytes], events: list[bytes], partial: bool
) -> None:
    splitter = SseSplitter()
    assert [event for data in reads for event in splitter.feed(data)] == events
    assert splitter.partial is partial


@pytest.mark.parametrize(
    ("event", "done"),
    [
        (b"data: [DONE]\n\n", True),
        (b"data:[DONE]\n\n", True),
        (b"data: [DONE]x\n\n", False),
        (b'data: {"x":1}\n\n', False),
        (b"data: [1,2,3]\n\n", False),
        (b"data:", False),
    ],
)
def test_is_done_knows_both_forms(event: bytes, done: bool) -> None:
    assert is_done(event) is done


def test_an_event_over_many_reads_is_joined_once() -> None:
    """16 MiB in 4 KiB reads: copied again with each read, as before, this held the
    splitter for minutes (32 GiB of copies); kept as its reads, it takes milliseconds."""
    splitter = SseSplitter()
    read = b"x" * 4096
    started = time.monotonic()
    assert splitter.feed(b"data: ") == []
    for _ in range(4096):
        assert splitter.feed(read) == []
    assert splitter.pending_size == 6 + 4096 * 4096
    (event,) = splitter.feed(b"\n\ndata: next")
    assert time.monotonic() - started < 5.0
    assert event == b"data: " + read * 4096
    assert splitter.pending == b"data: next" and splitter.pending_size == 10


class EndlessEventBackend(OneConnectionBackend):
    """A stream's first event, then one that never ends: 64 KiB chunks of text without a
    blank line, until sluice closes the connection (recorded in `closed`)."""

    def __init__(self) -> None:
        self.sent = 0
        self.closed = threading.Event()
        super().__init__()

    def answer(self, conn: socket.socket) -> None:
        first = _events(b"\n")[1]
        conn.sendall(_stream_head(True) + b"%x\r\n%b\r\n" % (len(first), first))
        piece = b"data: " + b"x" * (64 * 1024 - 6)
        try:
            while self.sent < 64 * 1024 * 1024:  # bounded: 4x the limit
                conn.sendall(b"%x\r\n%b\r\n" % (len(piece), piece))
                self.sent += len(piece)
                piece = b"x" * len(piece)
        except OSError:
            self.closed.set()


def test_an_event_that_never_ends_breaks_its_stream_at_the_limit() -> None:
    backend = EndlessEventBackend()
    harness = ProxyHarness(passthrough_snapshot(backend.url))
    try:
        events = _stream(harness)
        assert _text(events) == TOKENS[0], events[:1]
        error = json.loads(events[-2][6:])["error"]
        assert error["code"] == "upstream_protocol"
        assert f"over {MAX_EVENT_BYTES} bytes" in error["message"]
        assert _dones(events) == 1
        assert backend.closed.wait(10)  # sluice closed the backend's connection
        # It stopped reading (kernel buffers on loopback hold several MiB more).
        assert backend.sent < 2 * MAX_EVENT_BYTES
        (exchange,) = harness.wait_finished(1)
        assert exchange.upstream_error == "protocol"
    finally:
        harness.close()
        backend.close()


JUNK = [
    b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{"evil":1}',
    b"HTTP/1.1 200 OK\r\n",
    b"garbage",
]


@pytest.mark.parametrize("junk", JUNK, ids=["a second response", "a status line", "garbage"])
def test_bytes_after_a_whole_answer_are_not_relayed_nor_read_as_the_next(junk: bytes) -> None:
    """A backend that sends more than its answer, in the same write: the client gets the
    answer alone, and the connection is not pooled (the next request read the rest as its
    own answer: a 502 for a request the backend had answered)."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    backend = OneAnswerBackend(head % len(CHAT_RESPONSE) + CHAT_RESPONSE + junk, close=False)
    harness = ProxyHarness(passthrough_snapshot(backend.url))
    try:
        for _ in range(3):
            r = httpx.post(
                harness.url + "/v1/chat/completions",
                json={"model": "m", "messages": MSG},
                timeout=10,
            )
            assert r.status_code == 200, r.text
            assert r.content == CHAT_RESPONSE
    finally:
        harness.close()
        backend.close()


@pytest.mark.parametrize("guarded", [False, True], ids=["pass-through", "guarded"])
def test_bytes_after_a_streams_last_chunk_do_not_poison_the_next_request(guarded: bool) -> None:
    answer = _stream_head(True) + _chunked(_events(b"\n")) + b"HTTP/1.1 200 OK\r\n"
    backend = OneAnswerBackend(answer, close=False)
    harness = ProxyHarness(_guarded(backend.url) if guarded else passthrough_snapshot(backend.url))
    try:
        for _ in range(3):
            result = stream_request(harness.url, {"model": "m", "messages": MSG, "stream": True})
            assert result.status == 200, result.body
            assert result.data()[-1] == "[DONE]"
            assert "".join(
                c["delta"].get("content") or ""
                for obj in result.data()[:-1]
                for c in obj["choices"]
            ) == "".join(TOKENS)
    finally:
        harness.close()
        backend.close()
