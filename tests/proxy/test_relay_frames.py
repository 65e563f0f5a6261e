"""The relay's chunk pass-through (`StreamRelay.feed_chunks`), through the real upstream
connection (httptools) and the real `Response`: whatever the backend's chunk framing and
however its bytes are cut into reads, the client's de-chunked body is what the filter lets
through, the client's chunked framing is valid and ends once, and the backend connection's
parser stays in step (the message completes and the next response on the connection
parses). Upper-case chunk sizes tell the backend's own chunks from chunks sluice framed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st
from sluice.proxy.chunks import ChunkFilter
from sluice.proxy.deadlines import Deadlines
from sluice.proxy.exchange import Exchange
from sluice.proxy.relay_stream import relay_stream
from sluice.proxy.response import Response
from sluice.proxy.snapshot import StreamPolicy
from sluice.proxy.stopwords import GuardSpec
from sluice.proxy.upstream import READ_HIGH_WATER, UpstreamConnection
from sluice.proxy.upstream_pool import Origin, UpstreamPool, open_exchange

from tests.proxy.test_relay_properties import ALPHABET, STOPS, chat_events, reference_stop

# Chunk sizes as backends write them: lower case (h11, vLLM), upper case, leading zeros.
SIZE_FORMATS = st.sampled_from([b"%x", b"%X", b"%04x"])
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
NEXT_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"


class BackendSocket:
    """The upstream connection's transport: records its protocol (`set_protocol`, as
    uvloop's transport does), which the test delivers reads to."""

    def __init__(self) -> None:
        self.protocol: Any = None

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    def get_extra_info(self, name: str) -> Any:
        return None

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        raise AssertionError("no backpressure in this test")

    def resume_reading(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass  # the request

    def abort(self) -> None:
        raise AssertionError("the connection should stay usable")


class ClientSocket:
    def __init__(self) -> None:
        self.sent = bytearray()
        self.sends = 0

    def write(self, data: bytes) -> None:
        self.sent += data
        self.sends += 1

    def is_closing(self) -> bool:
        return False


def frame(events: list[bytes], layout: list[int], size_format: bytes = b"%x") -> bytes:
    """The events as HTTP chunks: layout[i] says how event i is framed (0: a chunk of its
    own, as vLLM does; 1: in one chunk with the next event; 2: split over two chunks)."""
    out = []
    carry = b""
    for i, event in enumerate(events):
        how = layout[i % len(layout)] if layout else 0
        data = carry + event
        carry = b""
        if how == 1 and i + 1 < len(events):
            carry = data
            continue
        if how == 2 and len(data) > 2:
            middle = len(data) // 2
            out.append(size_format % middle + b"\r\n" + data[:middle] + b"\r\n")
            data = data[middle:]
        out.append(size_format % len(data) + b"\r\n" + data + b"\r\n")
    return b"".join(out) + b"0\r\n\r\n"


def dechunk(sent: bytes) -> tuple[bytes, int]:
    """The body of sluice's chunked response and how many chunks framed it."""
    head_end = sent.index(b"\r\n\r\n") + 4
    rest = sent[head_end:]
    body = bytearray()
    chunks = 0
    while True:
        line_end = rest.index(b"\r\n")
        size = int(rest[:line_end], 16)
        if size == 0:
            assert rest[line_end:] == b"\r\n\r\n", rest  # the end, once, and nothing after
            return bytes(body), chunks
        body += rest[line_end + 2 : line_end + 2 + size]
        assert rest[line_end + 2 + size : line_end + 4 + size] == b"\r\n"
        rest = rest[line_end + 4 + size :]
        chunks += 1


def relay_through_connection(
    body: bytes, cuts: list[int], policy: StreamPolicy, *, wait_for_relay: bool = False
) -> bytes:
    """Relays one response through a real UpstreamConnection whose reads are `body` cut at
    `cuts` (one read per loop turn; with `wait_for_relay`, the reads after the first wait
    until the relay takes them); returns what the client got and checks the connection
    after it."""
    return relay_exchange(body, cuts, policy, wait_for_relay=wait_for_relay)[0]


def relay_exchange(
    body: bytes,
    cuts: list[int],
    policy: StreamPolicy,
    *,
    wait_for_relay: bool = False,
    skips_common: bool = True,
) -> tuple[bytes, Exchange]:
    """`relay_through_connection`, with the exchange's records; `skips_common` False: the
    filter reads every chunk itself (`ChunkFilter.skip_common` not used)."""

    async def main() -> tuple[bytes, Exchange]:
        pool = UpstreamPool(Origin("http://127.0.0.1:9"), 1.0)
        conn = UpstreamConnection(pool)
        backend = BackendSocket()
        backend.set_protocol(conn)
        conn.connection_made(backend)  # type: ignore[arg-type]
        conn.send(b"POST / HTTP/1.1\r\n\r\n", b"")
        data = HEAD + body
        points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
        reads = [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]
        loop = asyncio.get_running_loop()

        def deliver() -> None:
            if not reads:
                return
            if not wait_for_relay or conn.reads_taken or len(reads) == first:
                backend.protocol.data_received(reads.pop(0))
            loop.call_soon(deliver)

        first = len(reads)

        loop.call_soon(deliver)
        await conn.read_head()
        client = ClientSocket()
        connection = SimpleNamespace(
            transport=client, closing=False, write_paused=False, flow_listener=None
        )
        response = Response(connection, keep_alive=True, head_only=False)  # type: ignore[arg-type]
        response.start(200, [(b"content-type", b"text/event-stream")], with_first_write=True)
        ex = Exchange("r", loop.time())
        chunk_filter = ChunkFilter(ex, ex.chat, policy.guard, 1)
        chunk_filter.skips_common = chunk_filter.skips_common and skips_common
        clean = await relay_stream(ex, conn, response, policy, None, 1, chunk_filter)
        while reads:  # what the backend sent after [DONE]: the chunked terminator
            backend.protocol.data_received(reads.pop(0))
        assert not conn.reads_taken  # the relay handed the reads back
        assert backend.protocol is conn  # the socket's protocol never changed
        if clean and ex.cut is None:
            assert conn.complete, "the parser lost its place in the chunked body"
            # The parser is in step: the next response on this connection parses.
            conn.send(b"GET / HTTP/1.1\r\n\r\n", b"")
            conn.data_received(NEXT_RESPONSE)
            await conn.read_head()
            assert conn.status == 200
            assert await conn.read_all(100) == b"{}"
        return bytes(client.sent), ex

    return asyncio.run(main())


def _tokens_with_stop(tokens: list[str], inject: str, at: int) -> tuple[list[str], str]:
    full = "".join(tokens)
    at = at % (len(full) + 1)
    full = full[:at] + inject + full[at:]
    step = max(1, len(full) // max(1, len(tokens)))
    return [full[i : i + step] for i in range(0, len(full), step)], full


def _events(data: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in data.split(b"\n\n") if e]


def _first_chunk_end(body: bytes) -> int:
    size_end = body.index(b"\r\n")
    return size_end + 2 + int(body[:size_end], 16) + 2


def test_a_vllm_framed_stream_goes_out_as_the_backend_framed_it() -> None:
    """Upper-case chunk sizes (valid HTTP; sluice itself writes lower case) show that the
    client got the backend's own chunks, not chunks framed anew: the first one, read with
    the response head (the connection holds it for the relay), and the later ones."""
    events = _events(chat_events(["Hello", ",", " world", "!"] * 8))
    body = frame(events, [0], size_format=b"%X")
    first_end = _first_chunk_end(body)
    # Three reads: the head with the first event, the tokens, then [DONE] and the end.
    cuts = [len(HEAD) + first_end, len(HEAD) + body.index(b"E\r\ndata: [DONE]")]
    sent = relay_through_connection(body, cuts, StreamPolicy(name=""), wait_for_relay=True)
    after_head = sent[sent.index(b"\r\n\r\n") + 4 :]
    assert after_head == body
    assert body[:first_end] != body[:first_end].lower()


def test_a_changed_event_is_framed_anew_between_the_backends_chunks() -> None:
    events = _events(chat_events(["one ", "two ", "### three", " four"]))
    body = frame(events, [0], size_format=b"%X")
    first_end = _first_chunk_end(body)
    policy = StreamPolicy(name="p", stop=STOPS, guard=GuardSpec(stop=STOPS))
    sent = relay_through_connection(body, [len(HEAD) + first_end], policy, wait_for_relay=True)
    after_head = sent[sent.index(b"\r\n\r\n") + 4 :]
    # "one " and "two " pass unchanged in the backend's framing; the cut one is rewritten.
    unchanged = b"".join(b"%X\r\n%b\r\n" % (len(e), e) for e in events[1:3])
    assert after_head[_first_chunk_end(after_head) :].startswith(unchanged)
    assert b"%X\r\n" % len(events[3]) not in after_head
    client_body, _ = dechunk(sent)
    assert b"three" not in client_body
    assert client_body.endswith(b"data: [DONE]\n\n")


@settings(max_examples=120, deadline=None)
@given(
    tokens=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), min_size=1, max_size=25),
    layout=st.lists(st.sampled_from([0, 0, 0, 1, 2]), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=30),
    size_format=SIZE_FORMATS,
)
def test_pass_through_whatever_the_framing_and_reads(
    tokens: list[str], layout: list[int], cuts: list[int], size_format: bytes
) -> None:
    data = chat_events(tokens)
    body = frame(_events(data), layout, size_format)
    sent = relay_through_connection(body, cuts, StreamPolicy(name=""))
    client_body, _ = dechunk(sent)
    assert client_body == data


@settings(max_examples=120, deadline=None)
@given(
    tokens=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), min_size=1, max_size=25),
    layout=st.lists(st.sampled_from([0, 0, 0, 1, 2]), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=30),
    inject=st.sampled_from(STOPS),
    at=st.integers(min_value=0, max_value=200),
    size_format=SIZE_FORMATS,
)
def test_stop_strings_whatever_the_framing_and_reads(
    tokens: list[str],
    layout: list[int],
    cuts: list[int],
    inject: str,
    at: int,
    size_format: bytes,
) -> None:
    tokens, full = _tokens_with_stop(tokens, inject, at)
    policy = StreamPolicy(name="p", stop=STOPS, guard=GuardSpec(stop=STOPS))
    body = frame(_events(chat_events(tokens)), layout, size_format)
    sent = relay_through_connection(body, cuts, policy)
    client_body, _ = dechunk(sent)
    text = ""
    finals = []
    events = _events(client_body)
    for raw in events:
        payload = raw[6:-2]
        if payload == b"[DONE]":
            continue
        for choice in json.loads(payload)["choices"]:
            text += (choice.get("delta") or {}).get("content") or ""
            if choice.get("finish_reason"):
                finals.append(choice["finish_reason"])
    assert text == reference_stop(full)
    assert finals == ["stop"]
    assert events[-1] == b"data: [DONE]\n\n"


def test_the_parser_stands_at_a_chunk_start_only_after_a_whole_chunk() -> None:
    async def main() -> list[bool]:
        conn = UpstreamConnection(UpstreamPool(Origin("http://127.0.0.1:9"), 1.0))
        conn.connection_made(BackendSocket())  # type: ignore[arg-type]
        conn.send(b"GET / HTTP/1.1\r\n\r\n", b"")
        seen = []
        # The head in two reads: not held for a relay (only a head whole in the first read
        # is), so every piece goes through the parser.
        pieces = (HEAD[:10], HEAD[10:], b"3\r\nabc\r\n", b"3", b"\r\n", b"xyz", b"\r\n")
        for piece in (*pieces, b"2\r\n", b"ab\r\n"):
            conn.data_received(piece)
            seen.append(conn.at_chunk_start)
        return seen

    assert asyncio.run(main()) == [False, False, True, False, False, False, True, False, True]


def _held_connection(reads: list[bytes]) -> UpstreamConnection:
    """A connection after `reads` of a response (in a running loop); the head is parsed."""
    conn = UpstreamConnection(UpstreamPool(Origin("http://127.0.0.1:9"), 1.0))
    backend = BackendSocket()
    backend.set_protocol(conn)
    conn.connection_made(backend)  # type: ignore[arg-type]
    conn.send(b"POST / HTTP/1.1\r\n\r\n", b"")
    for data in reads:
        conn.data_received(data)
    return conn


async def _relay_to_client(conn: UpstreamConnection) -> tuple[bool, ClientSocket]:
    client = ClientSocket()
    connection = SimpleNamespace(
        transport=client, closing=False, write_paused=False, flow_listener=None
    )
    response = Response(connection, keep_alive=True, head_only=False)  # type: ignore[arg-type]
    response.start(200, [(b"content-type", b"text/event-stream")], with_first_write=True)
    ex = Exchange("r", 0.0)
    return await relay_stream(ex, conn, response, StreamPolicy(name=""), None, 1), client


def _body(tokens: list[str], size_format: bytes = b"%x") -> tuple[bytes, bytes]:
    """A chat stream's events and their chunked body, terminator included."""
    events = _events(chat_events(tokens))
    return b"".join(events), frame(events, [0], size_format)


def test_a_whole_response_in_one_read_goes_out_in_one_send_as_framed() -> None:
    """The short request's case: head, every event and the terminator in one read. The
    connection holds the body for the relay (no parser callback per chunk), the client
    gets the backend's chunks in one send with its own head, and the connection is
    complete (poolable) after it."""
    _, body = _body(["Hi", "!"], size_format=b"%X")

    async def main() -> None:
        conn = _held_connection([HEAD + body])
        assert conn.status == 200
        assert not conn.complete  # held, not parsed yet
        clean, client = await _relay_to_client(conn)
        assert clean
        assert client.sends == 1
        sent = bytes(client.sent)
        assert sent[sent.index(b"\r\n\r\n") + 4 :] == body
        assert conn.complete

    asyncio.run(main())


@pytest.mark.parametrize("after_head", [0, 3, 20])
def test_reads_that_come_while_the_body_is_held_follow_it_in_order(after_head: int) -> None:
    """The head alone in the first read, or with part of the body: what comes before the
    relay takes the reads is held behind it, in order."""
    events, body = _body(["one ", "two ", "three"])
    cut = len(HEAD) + after_head
    data = HEAD + body

    async def main() -> None:
        conn = _held_connection([data[:cut], data[cut:]])
        clean, client = await _relay_to_client(conn)
        assert clean
        assert dechunk(bytes(client.sent))[0] == events
        assert conn.complete

    asyncio.run(main())


def test_a_held_body_read_whole_is_parsed_first() -> None:
    """An event stream read with `read_all` (a caller that is not the relay) gets the
    de-chunked body as before, and the connection completes."""
    events, body = _body(["a", "b"])

    async def main() -> None:
        conn = _held_connection([HEAD + body])
        assert await conn.read_all(10_000) == events
        assert conn.complete

    asyncio.run(main())


def test_a_held_body_is_parsed_when_the_backend_closes_before_the_relay_comes() -> None:
    """A backend that sends the whole response and closes (connection: close): the held
    events are the response's, not lost to the closed connection."""
    events, body = _body(["x", "y"])

    async def main() -> None:
        conn = _held_connection([HEAD + body])
        conn.connection_lost(None)
        assert conn.complete
        clean, client = await _relay_to_client(conn)
        assert clean
        assert dechunk(bytes(client.sent))[0] == events

    asyncio.run(main())


def test_a_held_terminator_settles_before_the_pool_decides() -> None:
    """`release_when_complete` parses what is held: a connection whose terminator came
    with the head goes back to the pool at once, with no tail watcher."""
    _, body = _body(["z"])

    async def main() -> None:
        conn = _held_connection([HEAD + body])
        conn.pool.release_when_complete(conn, 1.0, Deadlines(asyncio.get_running_loop()))
        assert conn.pool.idle == [conn]

    asyncio.run(main())


def test_only_an_event_stream_in_chunks_is_held() -> None:
    """A JSON body (content-length) and an error status are parsed with their head."""
    json_head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"
    error_head = HEAD.replace(b"200 OK", b"400 Bad Request")

    async def main() -> None:
        conn = _held_connection([json_head + b"{}"])
        assert conn.complete
        conn = _held_connection([error_head + b"2\r\n{}\r\n0\r\n\r\n"])
        assert conn.status == 400
        assert conn.complete

    asyncio.run(main())


def _self_signed(directory: Path) -> ssl.SSLContext:
    """A server context with a fresh certificate for 127.0.0.1 (openssl, as the edge tests)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        if os.environ.get("CI"):
            pytest.fail("openssl is missing (apt-get install openssl)")
        pytest.skip("openssl is missing (apt-get install openssl)")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return server


def test_a_tls_backend_stream_through_the_relay_on_uvloop(tmp_path: Path) -> None:
    """The relay takes a TLS connection's reads as it takes a TCP one's (uvloop's SSL
    transport is a protocol of its own over the socket), and the connection is pooled in
    step after it."""
    server_context = _self_signed(tmp_path)
    events = _events(chat_events(["Hello", ",", " TLS", " world"] * 4))
    body = frame(events, [0], size_format=b"%X")
    chunks = [b"%X\r\n%b\r\n" % (len(e), e) for e in events] + [b"0\r\n\r\n"]

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):  # two requests on one keep-alive connection
            await reader.readuntil(b"\r\n\r\n")
            writer.write(HEAD)
            for chunk in chunks:  # one TLS record per event, as vLLM sends one per event
                writer.write(chunk)
                await writer.drain()
                await asyncio.sleep(0.002)
        await reader.read()  # open until sluice closes it (pool.close)
        writer.close()

    async def main() -> tuple[bytes, bytes]:
        server = await asyncio.start_server(backend, "127.0.0.1", 0, ssl=server_context)
        port = server.sockets[0].getsockname()[1]
        pool = UpstreamPool(Origin(f"https://127.0.0.1:{port}"), 5.0)
        client_context = ssl.create_default_context(cafile=tmp_path / "cert.pem")
        pool._ssl = client_context  # the test's own CA
        deadlines = Deadlines(asyncio.get_running_loop())
        sent = []
        try:
            for _ in range(2):
                conn = await open_exchange(pool, b"POST", b"/v1/chat/completions", [], b"{}")
                client = ClientSocket()
                connection = SimpleNamespace(
                    transport=client, closing=False, write_paused=False, flow_listener=None
                )
                response = Response(connection, keep_alive=True, head_only=False)  # type: ignore[arg-type]
                response.start(200, [], with_first_write=True)
                ex = Exchange("r", asyncio.get_running_loop().time())
                assert await relay_stream(ex, conn, response, StreamPolicy(name=""), None, 1)
                assert conn.transport is not None
                assert conn.transport.get_protocol() is conn
                assert not conn.reads_taken
                pool.release_when_complete(conn, 2.0, deadlines)
                for _ in range(200):
                    if pool.idle:
                        break
                    await asyncio.sleep(0.005)
                assert pool.idle == [conn], "the connection was not pooled in step"
                sent.append(bytes(client.sent))
        finally:  # a failure fails now, not at the loop's shutdown
            pool.close()
            server.close()
        return sent[0], sent[1]

    first, second = uvloop.run(main())
    for sent in (first, second):
        client_body, _ = dechunk(sent)
        assert client_body == b"".join(events)
        # After the first event (read with the head), the backend's own upper-case chunks.
        assert sent.endswith(body[_first_chunk_end(body) :])


class PausableBackendSocket(BackendSocket):
    """A backend socket that honours pause_reading: the test delivers reads only while it
    is not paused, as the event loop would."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def test_a_held_body_past_the_high_water_mark_is_read_on_once_the_relay_takes_it() -> None:
    """More than READ_HIGH_WATER of the stream arrives before the relay comes (a fast
    backend on a reused connection): holding it pauses the socket, and the relay taking it
    resumes reading. Before, nothing resumed it: the client got what was held, then
    nothing until its inter-token deadline (or forever without one)."""
    events, body = _body([f"{i:04d}" + "y" * 1000 for i in range(600)])
    data = HEAD + body
    first = len(HEAD) + 100
    held_end = first + READ_HIGH_WATER + 10_000

    async def main() -> None:
        conn = UpstreamConnection(UpstreamPool(Origin("http://127.0.0.1:9"), 1.0))
        backend = PausableBackendSocket()
        backend.set_protocol(conn)
        conn.connection_made(backend)  # type: ignore[arg-type]
        conn.send(b"POST / HTTP/1.1\r\n\r\n", b"")
        conn.data_received(data[:first])
        conn.data_received(data[first:held_end])
        assert backend.paused  # held past the mark
        rest = [data[i : i + 65536] for i in range(held_end, len(data), 65536)]
        loop = asyncio.get_running_loop()

        def deliver() -> None:
            if rest and not backend.paused:
                conn.data_received(rest.pop(0))
            if rest:
                loop.call_soon(deliver)

        loop.call_soon(deliver)
        clean, client = await asyncio.wait_for(_relay_to_client(conn), 10)
        assert clean
        assert dechunk(bytes(client.sent))[0] == events
        assert conn.complete and not backend.paused

    asyncio.run(main())
