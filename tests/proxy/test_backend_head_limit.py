"""A backend's response head is read whole before sluice decides anything about it, so it
is bounded: past MAX_RESPONSE_HEADER_BYTES of headers (name + value + 4 each) the response
is a 502 with an OpenAI-shaped error, like nginx's "upstream sent too big header", and the
proxy goes on serving; one header line that never ends is cut once the head's bytes pass
MAX_RESPONSE_HEAD_BYTES (the parsers check their limit only when a line ends). A chunked
body's trailers count with its head: a whole answer's are a 502 (a stream's come after its
200 and its events, and break it as any broken stream). Before, the compiled build's
parser collected any number of header bytes, and httptools' path any number of headers
of the lengths sluice reads. Each 1xx head, and each response on a reused connection, is
counted on its own. Both builds run these (the C parser counts in C, httptools' path in
`UpstreamConnection.on_header`)."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from sluice.proxy.upstream import MAX_RESPONSE_HEAD_BYTES, MAX_RESPONSE_HEADER_BYTES

from tests.fixtures import ProxyHarness, passthrough_snapshot
from tests.proxy.raw_backends import CHAT_RESPONSE
from tests.proxy.test_backend_framing import OneAnswerBackend, _chunk_event, _chunked

MSG = [{"role": "user", "content": "x"}]
STREAM = [_chunk_event(None) + b"\n\n", _chunk_event("hi") + b"\n\n", b"data: [DONE]\n\n"]


def _headers(total: int) -> bytes:
    """Header lines whose bytes, counted as the limit counts them, add up to `total`."""
    lines = []
    left = total
    index = 0
    while left > 0:
        name = b"x-filler-%d" % index
        value_len = min(1000, left - len(name) - 4)
        if value_len < 1:  # too little left for another header: widen the last one
            name, value = lines.pop()
            value_len = len(value) + left
            lines.append((name, b"v" * value_len))
            break
        lines.append((name, b"v" * value_len))
        left -= len(name) + value_len + 4
        index += 1
    assert sum(len(n) + len(v) + 4 for n, v in lines) == total
    return b"".join(n + b": " + v + b"\r\n" for n, v in lines)


def _stream_answer(filler: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    head += b"transfer-encoding: chunked\r\n" + filler + b"\r\n"
    return head + _chunked(STREAM)


# What the head holds besides the filler: content-type and transfer-encoding.
STREAM_HEAD_BYTES = len(b"content-type") + len(b"text/event-stream") + 4
STREAM_HEAD_BYTES += len(b"transfer-encoding") + len(b"chunked") + 4


def _post(harness: ProxyHarness, stream: bool) -> httpx.Response:
    body = {"model": "m", "messages": MSG, "stream": stream}
    return httpx.post(harness.url + "/v1/chat/completions", json=body, timeout=30)


def _assert_refused(response: httpx.Response, limit: str = "headers") -> None:
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_protocol"
    if limit == "headers":
        assert f"response headers over {MAX_RESPONSE_HEADER_BYTES} bytes" in error["message"]
    else:
        assert f"response head over {MAX_RESPONSE_HEAD_BYTES} bytes" in error["message"]


def _assert_relayed(response: httpx.Response) -> None:
    assert response.status_code == 200
    assert response.content == b"".join(STREAM)


def _serve(answer: bytes) -> tuple[OneAnswerBackend, ProxyHarness]:
    backend = OneAnswerBackend(answer, close=True)
    return backend, ProxyHarness(passthrough_snapshot(backend.url))


def test_a_head_at_the_limit_is_relayed() -> None:
    filler = _headers(MAX_RESPONSE_HEADER_BYTES - STREAM_HEAD_BYTES)
    backend, harness = _serve(_stream_answer(filler))
    try:
        _assert_relayed(_post(harness, stream=True))
    finally:
        harness.close()
        backend.close()


@pytest.mark.parametrize("one_value", [False, True], ids=["many headers", "one long value"])
def test_a_head_one_byte_past_the_limit_is_a_502_and_the_proxy_serves_on(one_value: bool) -> None:
    over = MAX_RESPONSE_HEADER_BYTES - STREAM_HEAD_BYTES + 1
    name = b"x-long"
    filler = name + b": " + b"v" * (over - len(name) - 4) + b"\r\n" if one_value else _headers(over)
    backend, harness = _serve(_stream_answer(filler))
    good = OneAnswerBackend(_stream_answer(b""), close=True)
    try:
        _assert_refused(_post(harness, stream=True))
        _assert_refused(_post(harness, stream=False))
        harness.swap(passthrough_snapshot(good.url))
        _assert_relayed(_post(harness, stream=True))
    finally:
        harness.close()
        backend.close()
        good.close()


def test_a_whole_answers_trailers_count_with_its_head() -> None:
    body = _chunked([CHAT_RESPONSE])[: -len(b"\r\n")]  # the last chunk, its trailers next
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n"
    head_bytes = len(b"content-type") + len(b"application/json") + 4
    head_bytes += len(b"transfer-encoding") + len(b"chunked") + 4
    trailers = _headers(MAX_RESPONSE_HEADER_BYTES - head_bytes + 1)
    backend, harness = _serve(head + b"\r\n" + body + trailers + b"\r\n")
    try:
        _assert_refused(_post(harness, stream=False))
    finally:
        harness.close()
        backend.close()


def test_each_interim_head_is_counted_on_its_own() -> None:
    """Three 103 Early Hints of 3/4 of the limit each, then the answer: no head is over."""
    hint = _headers(MAX_RESPONSE_HEADER_BYTES * 3 // 4)
    interim = b"HTTP/1.1 103 Early Hints\r\n" + hint + b"\r\n"
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    answer += b"content-length: %d\r\n\r\n%s" % (len(CHAT_RESPONSE), CHAT_RESPONSE)
    backend, harness = _serve(interim * 3 + answer)
    try:
        response = _post(harness, stream=False)
        assert response.status_code == 200
        assert json.loads(response.content) == json.loads(CHAT_RESPONSE)
    finally:
        harness.close()
        backend.close()


class CutOffBackend(OneAnswerBackend):
    """OneAnswerBackend whose answer the proxy cuts off (it closes the connection midway):
    its send ends there; the connection stays open otherwise."""

    def __init__(self, answer: bytes) -> None:
        super().__init__(answer, close=False)

    def _serve(self, conn: socket.socket) -> None:
        try:
            super()._serve(conn)
        except OSError:  # the proxy closed the connection under the answer
            pass


def test_a_header_line_that_never_ends_is_cut_at_the_heads_limit() -> None:
    """Status line, then one header 4 MiB long, never ended (the backend then waits): a
    502 at once, not at the response-head deadline (60 s), with at most one read past
    the limit held."""
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-long: " + b"v" * (4 << 20)
    backend = CutOffBackend(answer)
    harness = ProxyHarness(passthrough_snapshot(backend.url))
    try:
        for stream in (False, True):
            started = time.monotonic()
            _assert_refused(_post(harness, stream=stream), limit="head")
            assert time.monotonic() - started < 20
    finally:
        harness.close()
        backend.close()


class CountingBackend(OneAnswerBackend):
    """OneAnswerBackend that keeps each connection for the next request, and counts its
    connections."""

    def __init__(self, answer: bytes) -> None:
        self.connections = 0
        super().__init__(answer, close=False)

    def _serve(self, conn: socket.socket) -> None:
        self.connections += 1
        super()._serve(conn)


def test_each_response_on_a_reused_connection_is_counted_on_its_own() -> None:
    """Five answers of 3/4 of the limit each on one keep-alive connection: each is 200."""
    filler = _headers(MAX_RESPONSE_HEADER_BYTES * 3 // 4)
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + filler
    answer += b"content-length: %d\r\n\r\n%s" % (len(CHAT_RESPONSE), CHAT_RESPONSE)
    backend = CountingBackend(answer)
    harness = ProxyHarness(passthrough_snapshot(backend.url))
    try:
        for _ in range(5):
            response = _post(harness, stream=False)
            assert response.status_code == 200
            assert json.loads(response.content) == json.loads(CHAT_RESPONSE)
        assert backend.connections == 1  # the five went over one reused connection
    finally:
        harness.close()
        backend.close()
