"""The smuggling / framing table: requests that desynchronise a proxy and its backend
when two HTTP parsers disagree, each with the one answer sluice gives. A request hidden
after a malformed one (`/smuggled`) must never reach a handler unless the framing before
it is unambiguous (then it is a plain pipelined request)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.reliability.fixtures import RecordingServer, exchange, statuses

# A second request placed where a desynchronised parser would read it.
S = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"

# (name, raw bytes, statuses answered in order, paths the handler saw)
TABLE: list[tuple[str, bytes, list[int], list[str]]] = [
    (
        "cl-te",
        b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        + S,
        [400],
        [],
    ),
    (
        "te-cl",
        b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n"
        + S,
        [400],
        [],
    ),
    (
        "dup-cl-diff",
        b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd" + S,
        [400],
        [],
    ),
    (
        "dup-cl-same",
        b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd" + S,
        [400],
        [],
    ),
    ("cl-list", b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 4, 4\r\n\r\nabcd" + S, [400], []),
    ("cl-plus", b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: +4\r\n\r\nabcd" + S, [400], []),
    ("cl-neg", b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\nabcd" + S, [400], []),
    ("cl-hex", b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 0x4\r\n\r\nabcd" + S, [400], []),
    (
        "cl-huge",
        b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999999999999999\r\n\r\nabcd" + S,
        [400],
        [],
    ),
    (
        "te-space-colon",
        b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + S,
        [400],
        [],
    ),
    (
        "te-xchunked",
        b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + S,
        [501],
        [],
    ),
    (
        "te-chunked-chunked",
        b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n" + S,
        [400],
        [],
    ),
    (
        "te-tab",
        b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n" + S,
        [200, 200],
        ["/a", "/smuggled"],
    ),
    (
        "te-dup",
        b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n"
        + S,
        [400],
        [],
    ),
    (
        "te-http10",
        b"POST /a HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + S,
        [200],
        ["/a"],
    ),
    (
        "chunk-size-bad",
        b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n"
        + S,
        [400],
        [],
    ),
    (
        "chunk-size-neg",
        b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nab\r\n0\r\n\r\n"
        + S,
        [400],
        [],
    ),
    (
        "chunk-size-overflow",
        b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\nab\r\n0\r\n\r\n"
        + S,
        [400],
        [],
    ),
    (
        "chunk-size-0x",
        b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nab\r\n0\r\n\r\n"
        + S,
        [400],
        [],
    ),
    (
        "chunk-size-space",
        b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2 \r\nab\r\n0\r\n\r\n"
        + S,
        [400],
        [],
    ),
    (
        "chunk-data-long",
        b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n"
        + S,
        [400],
        [],
    ),
    (
        "chunk-no-crlf",
        b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab0\r\n\r\n" + S,
        [400],
        [],
    ),
    (
        "chunk-ext-lf",
        b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2;a\nb\r\nab\r\n0\r\n\r\n"
        + S,
        [400],
        [],
    ),
    (
        "chunk-lf-only",
        b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\nab\n0\n\n" + S,
        [400],
        [],
    ),
    ("obs-fold", b"GET /a HTTP/1.1\r\nHost: t\r\nX-A: b\r\n c\r\n\r\n" + S, [400], []),
    (
        "obs-fold-te",
        b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n" + S,
        [400],
        [],
    ),
    ("nul-header", b"GET /a HTTP/1.1\r\nHost: t\r\nX-A: b\x00c\r\n\r\n" + S, [400], []),
    ("nul-url", b"GET /a\x00b HTTP/1.1\r\nHost: t\r\n\r\n" + S, [400], []),
    ("cr-in-header", b"GET /a HTTP/1.1\r\nHost: t\r\nX-A: b\rc\r\n\r\n" + S, [400], []),
    ("lf-only-head", b"GET /a HTTP/1.1\nHost: t\n\n" + S, [400], []),
    ("lf-only-headers", b"GET /a HTTP/1.1\r\nHost: t\nX-A: b\r\n\r\n" + S, [400], []),
    ("space-before-colon", b"GET /a HTTP/1.1\r\nHost : t\r\n\r\n" + S, [400], []),
    ("no-colon", b"GET /a HTTP/1.1\r\nHost: t\r\nXA\r\n\r\n" + S, [400], []),
    ("space-in-url", b"GET /a b HTTP/1.1\r\nHost: t\r\n\r\n" + S, [400], []),
    ("lowercase-version", b"GET /a http/1.1\r\nHost: t\r\n\r\n" + S, [400], []),
    ("leading-space-header", b"GET /a HTTP/1.1\r\n Host: t\r\n\r\n" + S, [400], []),
    ("long-url", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n" + S, [414], []),
    (
        "long-header",
        b"GET /a HTTP/1.1\r\nHost: t\r\nX-A: " + b"b" * 70000 + b"\r\n\r\n" + S,
        [431],
        [],
    ),
    (
        "10k-headers",
        b"GET /a HTTP/1.1\r\nHost: t\r\n"
        + b"".join(b"X-%d: v\r\n" % i for i in range(10000))
        + b"\r\n"
        + S,
        [431],
        [],
    ),
    (
        "pipelined-3",
        b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\nPOST /2 HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabcGET /3 HTTP/1.1\r\nHost: t\r\n\r\n",
        [200, 200, 200],
        ["/1", "/2", "/3"],
    ),
    (
        "get-with-body-cl",
        b"GET /a HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(S) + S,
        [200],
        ["/a"],
    ),
    (
        "absolute-form",
        b"GET http://evil/a HTTP/1.1\r\nHost: t\r\n\r\n" + S,
        [200, 200],
        ["/a", "/smuggled"],
    ),
    ("connect", b"CONNECT evil:443 HTTP/1.1\r\nHost: evil:443\r\n\r\n" + S, [405], []),
    ("unknown-method", b"BREW /a HTTP/1.1\r\nHost: t\r\n\r\n" + S, [400], []),
    (
        "te-trailer-smuggle",
        b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: y\r\n\r\n" + S,
        [200, 200],
        ["/a", "/smuggled"],
    ),
]


@pytest.fixture(scope="module")
def server() -> Iterator[RecordingServer]:
    srv = RecordingServer()
    yield srv
    srv.close()


@pytest.mark.parametrize(("name", "raw", "answers", "handled"), TABLE, ids=[t[0] for t in TABLE])
def test_framing_table(
    server: RecordingServer, name: str, raw: bytes, answers: list[int], handled: list[str]
) -> None:
    before = len(server.handled)
    data, hung = exchange(server.port, raw, timeout=5)
    assert not hung
    assert statuses(data) == answers
    assert [h[1] for h in server.handled[before:]] == handled
    if answers[-1] != 200:
        assert b"connection: close" in data  # every refusal ends the connection
