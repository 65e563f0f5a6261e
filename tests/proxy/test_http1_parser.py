"""The compiled build's C parser (proxy/_http1.c) against httptools, on the same bytes.

Both run llhttp; `_http1` collects a head's headers in C where httptools calls
`on_header` per header. What sluice's reader and upstream connection see must not
change with the build: the callbacks in order, each head's headers (lower-cased names; a
request's repeated header joined with ", ", a response's last one kept), the version,
keep-alive, the body, chunk boundaries, trailers, and the error or upgrade that stops a
feed. Random messages, pipelined, mutated and split at random points, go through both.
The pure build has no `_http1`: these run in the compiled half of `make test`.
"""

from __future__ import annotations

import os
from typing import Any

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sluice.proxy import http1parse
from sluice.proxy.build import build_kind

_http1: Any = pytest.importorskip(
    "sluice.proxy._http1", reason="the pure build has no C parser (httptools is its parser)"
)
NO_LIMIT = 1 << 40


class Recorder:
    """Every callback as an event; `limits` does what proxy/reader.py's on_url and
    on_header do with httptools (and `_http1` does itself)."""

    def __init__(self, join: bool, limits: tuple[int, int, int] | None = None) -> None:
        self.join = join
        self.limits = limits
        self.events: list[tuple[Any, ...]] = []
        self.headers: dict[bytes, bytes] = {}
        self.url = b""
        self.header_bytes = 0
        self.in_head = True
        self.parser: Any = None

    def on_message_begin(self) -> None:
        self.events.append(("begin",))
        self.in_head = True
        self.headers = {}
        self.url = b""
        self.header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        if self.limits is not None and len(self.url) > self.limits[0]:
            self.events.append(("refused", "url"))
            raise httptools.HttpParserError("url too long")

    def on_header(self, name: bytes, value: bytes) -> None:  # httptools only
        self.header_bytes += len(name) + len(value) + 4
        if self.limits is not None and (
            self.header_bytes > self.limits[1] or len(self.headers) >= self.limits[2]
        ):
            self.on_headers_too_large()
        if not self.in_head:
            return  # a trailer: counted, not kept (as proxy/reader.py and upstream.py do)
        key = name.lower()
        if self.join and key in self.headers:
            self.headers[key] += b", " + value
        else:
            self.headers[key] = value

    def on_headers_too_large(self) -> None:
        self.events.append(("refused", "headers"))
        raise httptools.HttpParserError("headers too large")

    def on_headers_complete(self, headers: dict[bytes, bytes] | None = None) -> None:
        self.in_head = False
        if headers is not None:
            self.headers = headers
        parser = self.parser
        first = parser.get_method() if self.join else parser.get_status_code()
        version = parser.get_http_version()
        self.events.append(("url", self.url))
        self.events.append(("head", first, version, parser.should_keep_alive(), dict(self.headers)))

    def on_body(self, body: bytes) -> None:
        if self.events and self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + body)
        else:
            self.events.append(("body", body))

    def on_chunk_header(self) -> None:
        self.events.append(("chunk",))

    def on_chunk_complete(self) -> None:
        self.events.append(("chunk end",))

    def on_message_complete(self) -> None:
        self.events.append(("complete", dict(self.headers)))  # never with trailers


def run(parser: Any, recorder: Recorder, pieces: list[bytes]) -> list[Any]:
    recorder.parser = parser
    for piece in pieces:
        try:
            parser.feed_data(piece)
        except httptools.HttpParserUpgrade as upgrade:
            recorder.events.append(("upgrade", upgrade.args))
            break
        except httptools.HttpParserError as exc:
            refused = recorder.events and recorder.events[-1][0] == "refused"
            # A refusal's text names the llhttp callback it came from, which differs.
            recorder.events.append(("error", "refused" if refused else (type(exc), str(exc))))
            break
    return recorder.events


def read_both(
    request: bool, pieces: list[bytes], limits: tuple[int, int, int] | None = None
) -> tuple[list[Any], list[Any]]:
    """The events of httptools' parser and of `_http1`'s (given the limits, which the
    recorder enforces for httptools as proxy/reader.py does)."""
    if request:
        expected = Recorder(True, limits)
        got = Recorder(True, limits)
        native = _http1.RequestParser(got, *(limits or (NO_LIMIT,) * 3))
        pure = httptools.HttpRequestParser(expected)
    else:
        expected, got = Recorder(join=False), Recorder(join=False)
        native = _http1.ResponseParser(got)
        pure = httptools.HttpResponseParser(expected)
    return run(native, got, pieces), run(pure, expected, pieces)


METHODS = [b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"CONNECT", b"PATCH"]
METHODS += [b"PRI", b"get", b"XYZ"]
TARGETS = [b"/", b"/v1/chat/completions", b"/a?b=c&d", b"*", b"http://h:1/x?y", b"/%41#f"]
VERSIONS = [b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"http/1.1"]
NAMES = [b"Host", b"Content-Type", b"Connection", b"Upgrade", b"Expect", b"X-A", b"x-a"]
NAMES += [b"Authorization", b"Accept", b"Keep-Alive", b"TE", b"Trailer"]
VALUES = [b"", b"a", b"close", b"keep-alive", b"websocket", b"100-continue", b"text/x; q=1"]
VALUES += [b"Upgrade", b"  spaced  ", b"tab\tinside", b"\xe9t\xe9", b"chunked"]
JUNK = [b"\r", b"\n", b" ", b":", b"\x00", b"\t", b"a", b"0", b"\x7f", b";"]

names = st.sampled_from(NAMES) | st.binary(min_size=1, max_size=6)
values = st.sampled_from(VALUES) | st.binary(max_size=10)
header_lists = st.lists(st.tuples(names, values), max_size=8)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The framing headers and the body they frame."""
    kind = draw(st.sampled_from(["none", "length", "chunked", "both"]))
    data = draw(st.binary(max_size=20))
    if kind == "none":
        return [], b""
    if kind == "length":
        return [(b"Content-Length", b"%d" % len(data))], data
    chunks = draw(st.lists(st.binary(min_size=1, max_size=8), max_size=3))
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n"
    trailers = draw(st.lists(st.tuples(names, values), max_size=2))
    body += b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n"
    framing = [(b"Transfer-Encoding", b"chunked")]
    if kind == "both":
        framing.append((b"Content-Length", b"%d" % len(body)))
    return framing, body


@st.composite
def messages(draw: st.DrawFn, request: bool) -> bytes:
    if request:
        line = b" ".join(
            [
                draw(st.sampled_from(METHODS)),
                draw(st.sampled_from(TARGETS)),
                draw(st.sampled_from(VERSIONS)),
            ]
        )
    else:
        status = draw(
            st.sampled_from([b"200 OK", b"204 No Content", b"101 Switching", b"100 Continue"])
        )
        line = draw(st.sampled_from(VERSIONS)) + b" " + status
    framing, body = draw(bodies())
    headers = draw(header_lists) + framing
    headers = draw(st.permutations(headers))
    head = line + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n"
    return head + body


@st.composite
def streams(draw: st.DrawFn, request: bool) -> list[bytes]:
    """One to three messages, perhaps mutated, cut into reads."""
    data = b"".join(draw(st.lists(messages(request), min_size=1, max_size=3)))
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(data)))
        junk = draw(st.sampled_from(JUNK))
        how = draw(st.sampled_from(["insert", "replace", "delete"]))
        if how == "insert":
            data = data[:at] + junk + data[at:]
        elif how == "replace":
            data = data[:at] + junk + data[at + 1 :]
        else:
            data = data[:at] + data[at + 1 :]
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a] or [data]


SETTINGS = settings(
    max_examples=int(os.environ.get("SLUICE_PARSER_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@SETTINGS
@given(streams(request=True))
def test_requests_read_the_same_through_both_parsers(pieces: list[bytes]) -> None:
    got, expected = read_both(True, pieces)
    assert got == expected


@SETTINGS
@given(streams(request=False))
def test_responses_read_the_same_through_both_parsers(pieces: list[bytes]) -> None:
    got, expected = read_both(False, pieces)
    assert got == expected


@SETTINGS
@given(
    streams(request=True),
    st.tuples(st.integers(1, 40), st.integers(10, 120), st.integers(1, 6)),
)
def test_limits_refuse_at_the_same_point(pieces: list[bytes], limits: tuple[int, int, int]) -> None:
    """The URL's bytes, the head's header bytes (name + value + 4 each) and its distinct
    names, where the reader's `on_url` and `on_header` refuse with httptools."""
    got, expected = read_both(True, pieces, limits)
    assert got == expected


def test_a_callbacks_exception_is_the_context_of_the_parsers_error() -> None:
    class Failing(Recorder):
        def on_message_complete(self) -> None:
            raise KeyError("boom")

    for parser_type in (httptools.HttpRequestParser, _http1.RequestParser):
        recorder = Failing(join=True)
        recorder.parser = parser = parser_type(recorder)
        with pytest.raises(httptools.HttpParserCallbackError) as raised:
            parser.feed_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert isinstance(raised.value.__context__, KeyError)


def test_an_upgrade_stops_the_feed_at_its_body() -> None:
    data = b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nFRAME"
    for parser_type in (httptools.HttpRequestParser, _http1.RequestParser):
        recorder = Recorder(join=True)
        recorder.parser = parser = parser_type(recorder)
        with pytest.raises(httptools.HttpParserUpgrade) as raised:
            parser.feed_data(data)
        assert raised.value.args == (len(data) - len(b"FRAME"),)


def test_the_compiled_build_reads_heads_in_c() -> None:
    assert build_kind() == "compiled"
    assert http1parse.HEADS_IN_C


def test_repeated_headers_of_empty_and_one_byte_values() -> None:
    """b"" and one-byte values are shared objects in CPython: a repeat must still join."""
    data = b"GET / HTTP/1.1\r\nX-A:\r\nx-a:\r\nX-B: b\r\nX-B: b\r\nX-C: c\r\n\r\n"
    for parser_type in (httptools.HttpRequestParser, _http1.RequestParser):
        recorder = Recorder(join=True)
        recorder.parser = parser = parser_type(recorder)
        parser.feed_data(data)
        assert recorder.events[2][4] == {b"x-a": b", ", b"x-b": b"b, b", b"x-c": b"c"}


def test_feeding_the_parser_from_its_own_callback_is_refused() -> None:
    """llhttp cannot be entered again while it runs (a review found the first version
    spinning forever on a span length that wrapped around)."""

    class Reentrant(Recorder):
        def on_headers_complete(self, headers: dict[bytes, bytes] | None = None) -> None:
            self.parser.feed_data(b"GET / HTTP/1.1\r\nX-Lo")

    recorder = Reentrant(join=True)
    recorder.parser = parser = _http1.RequestParser(recorder)
    with pytest.raises(httptools.HttpParserCallbackError) as raised:
        parser.feed_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(raised.value.__context__, RuntimeError)
