"""The relay writes what one read from the backend held in one send, as nginx does: events
that arrived together go to the client together (one system call, not one per event), and
an event that arrived alone goes out at once, never held for the next read. Chunks that
each hold one event go out as the backend framed them; events the relay had to split out
of other framing go out as one HTTP chunk per read."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from sluice.proxy.sse import SseSplitter

from tests.fixtures import ProxyHarness, passthrough_snapshot
from tests.proxy.raw_backends import OneConnectionBackend

PAUSE = 0.3  # between the backend's sends


def _event(content: str) -> bytes:
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _one_chunk_per_event(events: list[bytes]) -> bytes:
    return b"".join(_http_chunk(event) for event in events)


def _events_across_chunks(events: list[bytes]) -> bytes:
    """The same events, framed in two chunks whose boundary falls inside an event."""
    data = b"".join(events)
    middle = len(data) // 2
    return _http_chunk(data[:middle]) + _http_chunk(data[middle:])


class TwoReadBackend(OneConnectionBackend):
    """Answers one streamed request: one event alone, a pause, three events in a single
    send (one read on sluice's side), framed by `frame`, a pause, then [DONE]."""

    def __init__(self, frame: Callable[[list[bytes]], bytes]) -> None:
        self.frame = frame
        super().__init__()

    def answer(self, conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + _http_chunk(_event("a"))
        )
        time.sleep(PAUSE)
        conn.sendall(self.frame([_event(t) for t in ("b", "c", "d")]))
        time.sleep(PAUSE)
        conn.sendall(_http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        time.sleep(0.5)


@pytest.fixture(params=[_one_chunk_per_event, _events_across_chunks])
def relayed(request: pytest.FixtureRequest) -> Iterator[tuple[ProxyHarness, bool]]:
    """The proxy in front of the backend, and whether the backend frames one event per
    chunk (those chunks go to the client as they came)."""
    backend = TwoReadBackend(request.param)
    proxy = ProxyHarness(passthrough_snapshot(backend.url))
    yield proxy, request.param is _one_chunk_per_event
    proxy.close()
    backend.close()


def _client_chunks(port: int) -> list[tuple[float, bytes]]:
    """(seconds since the request, payload) of each HTTP chunk of sluice's response."""
    body = json.dumps(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    )
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n{body}"
    ).encode()
    chunks: list[tuple[float, bytes]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        started = time.monotonic()
        conn.sendall(request)
        reader = conn.makefile("rb")
        while reader.readline() not in (b"\r\n", b""):
            pass  # the head
        while True:
            size = int(reader.readline().strip(), 16)
            payload = reader.read(size)
            reader.readline()
            if size == 0:
                return chunks
            chunks.append((time.monotonic() - started, payload))


def test_events_of_one_read_go_out_together_and_a_lone_event_at_once(
    relayed: tuple[ProxyHarness, bool],
) -> None:
    harness, backend_frames_kept = relayed
    chunks = _client_chunks(harness.port)
    payloads = [payload for _, payload in chunks]
    at = [seconds for seconds, _ in chunks]
    middle = [_event("b"), _event("c"), _event("d")]
    if backend_frames_kept:  # one chunk per event: the backend's chunks, as they came
        assert payloads == [_event("a"), *middle, b"data: [DONE]\n\n"], payloads
        first_at, batch_at, batch_end, done_at = at[0], at[1], at[3], at[4]
        assert batch_end - batch_at < PAUSE * 0.3, chunks  # the three in one send
    else:  # split out of other framing: one chunk for what the read held
        assert payloads == [_event("a"), b"".join(middle), b"data: [DONE]\n\n"], payloads
        first_at, batch_at, done_at = at
        batch_end = batch_at
    # Each went out when it arrived, not with the next read.
    assert batch_at - first_at > PAUSE * 0.6, chunks
    assert done_at - batch_end > PAUSE * 0.6, chunks


@pytest.mark.parametrize(
    ("reads", "events"),
    [
        ([b"d", b"ata: x\n\n"], [b"data: x"]),  # one byte: once gave b"" (first == end == -1)
        ([b"data: x\n", b"\n"], [b"data: x"]),
        ([b"data: x\n\nd", b"ata: y\n\n"], [b"data: x", b"data: y"]),
        ([b"data: x\r\n\r\n"], [b"data: x"]),
    ],
)
def test_sse_splitter_returns_whole_events_whatever_the_reads(
    reads: list[bytes], events: list[bytes]
) -> None:
    splitter = SseSplitter()
    assert [event for data in reads for event in splitter.feed(data)] == events
    assert splitter.pending == b""
