"""HTTP/1.1 heads joined in C (proxy/_headjoin.c, the compiled build) and in Python:
the same bytes for any parts."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sluice.proxy import headjoin
from sluice.proxy.build import build_kind
from sluice.proxy.response import head_bytes

PARTS = st.binary(max_size=40)
HEADERS = st.lists(st.tuples(PARTS, PARTS), max_size=12)


def test_heads_are_joined_in_c_in_the_compiled_build_only() -> None:
    assert headjoin.HEADS_JOINED_IN_C is (build_kind() == "compiled")


@settings(max_examples=int(os.environ.get("SLUICE_PARSER_EXAMPLES", "400")), deadline=None)
@given(
    leading=st.lists(PARTS, max_size=6).map(tuple),
    headers=HEADERS,
    content_length=st.integers(min_value=-3, max_value=2**62),
    trailing=PARTS,
)
def test_the_c_join_is_the_python_join(
    leading: tuple[bytes, ...],
    headers: list[tuple[bytes, bytes]],
    content_length: int,
    trailing: bytes,
) -> None:
    expected = headjoin.join_in_python(leading, headers, content_length, trailing)
    assert headjoin.join_head(leading, headers, content_length, trailing) == expected


def test_a_response_head_is_its_lines() -> None:
    head = head_bytes(200, [(b"content-type", b"text/event-stream"), (b"x-a", b"1")], b"e: f\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK" and lines[1].startswith(b"date: ")
    assert lines[2:] == [b"content-type: text/event-stream", b"x-a: 1", b"e: f", b"", b""]


@pytest.mark.parametrize(
    ("status", "line"),
    [
        (304, b"HTTP/1.1 304 Not Modified"),
        (413, b"HTTP/1.1 413 Payload Too Large"),
        (418, b"HTTP/1.1 418 I'm a Teapot"),
        (599, b"HTTP/1.1 599 Unknown"),
    ],
)
def test_a_relayed_status_keeps_its_reason_phrase(status: int, line: bytes) -> None:
    """A backend's status goes out with its registered reason phrase (a 304 read
    "Unknown"); only a code with none gets that."""
    assert head_bytes(status, [], b"").split(b"\r\n")[0] == line


@pytest.mark.parametrize("header", [(b"a",), (b"a", b"b", b"c")])
def test_a_header_that_is_not_a_pair_is_refused(header: object) -> None:
    with pytest.raises((TypeError, ValueError)):  # compiled: TypeError; interpreted: ValueError
        headjoin.join_head((b"GET / HTTP/1.1\r\n",), [header], -1, b"")  # type: ignore[list-item]
