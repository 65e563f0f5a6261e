"""An event's data as a client reads it: `sse.event_data`'s slice for one `data:` line
reads what `sse.data_of` reads for any event, with or without its blank line."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from sluice.proxy.sse import SEPARATOR, data_of, event_data

LINE = st.one_of(
    st.builds(lambda v: b"data: " + v, st.binary(max_size=8).filter(lambda b: b"\n" not in b)),
    st.builds(lambda v: b"data:" + v, st.binary(max_size=8).filter(lambda b: b"\n" not in b)),
    st.sampled_from([b"id: 7", b"event: x", b": comment", b"retry: 10", b"data", b""]),
)


@settings(max_examples=500, deadline=None)
@given(lines=st.lists(LINE, min_size=1, max_size=4), blank=st.booleans())
def test_event_data_reads_what_data_of_reads(lines: list[bytes], blank: bool) -> None:
    event = b"\n".join(lines) + (SEPARATOR if blank else b"")
    assert event_data(event) == data_of(event)[1]


def test_one_data_line_with_or_without_its_blank_line() -> None:
    assert event_data(b'data: {"a":1}\n\n') == b'{"a":1}'
    assert event_data(b'data:{"a":1}') == b'{"a":1}'
    assert event_data(b"id: 1\ndata: x\ndata: y\n\n") == b"x\ny"
    assert event_data(b": keep-alive\n\n") is None
