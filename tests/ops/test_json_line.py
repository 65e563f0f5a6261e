"""The compiled build's access line (proxy/_jsonline.c) against orjson, byte for byte.

The pure build writes the line as orjson.dumps of a dict; the compiled one writes it in C
from the fields. Log shippers parse either, and the two builds must not differ: the
same values give the same bytes, and a value orjson refuses is refused the same way.
"""

from __future__ import annotations

import io
import os
import time
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sluice.proxy import observe
from sluice.proxy.exchange import Exchange
from sluice.proxy.observe import JsonAccessLog, access_fields

pytestmark = pytest.mark.skipif(
    not observe.LINES_IN_C, reason="the pure build writes its access lines with orjson"
)

SETTINGS = settings(
    max_examples=int(os.environ.get("SLUICE_PARSER_EXAMPLES", "400")), deadline=None
)

# Wall-clock times of this century and the next.
NOW = st.floats(min_value=1e9, max_value=4e9)
# What the access line's milliseconds are: tenths and hundredths, as observe computes them.
TENTHS = st.integers(0, 10**13).map(lambda k: k / 10.0)
HUNDREDTHS = st.integers(0, 10**13).map(lambda k: k / 100.0)
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**66), max_value=2**66),
    st.floats(),  # any: NaN and infinities are null, the rest orjson's shortest form
    TENTHS,
    HUNDREDTHS,
    st.text(),
    st.text(alphabet=st.characters(max_codepoint=0x7F)),  # control characters, quotes
    st.lists(st.integers(), max_size=3),  # anything else: written by orjson itself
)


def stamp(now: float) -> str:
    """The timestamp as JsonAccessLog documents it, written here independently."""
    second = int(now)
    micros = int((now - second) * 1e6)
    clock = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{clock}.{str(1_000_000 + micros)[1:]}Z"


def expected(fields: dict[str, Any], now: float) -> bytes | type[Exception]:
    try:
        return orjson.dumps({**fields, "timestamp": stamp(now)}, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:
        return orjson.JSONEncodeError


def written(pairs: list[object], now: float) -> bytes | type[Exception]:
    try:
        line: bytes = observe._line(now, *pairs)
    except orjson.JSONEncodeError:
        return orjson.JSONEncodeError
    return line


@SETTINGS
@given(
    fields=st.dictionaries(
        st.text(max_size=12).filter(lambda n: n != "timestamp"),
        st.one_of(VALUES, st.just(...)),
        max_size=24,
    ),
    now=NOW,
)
def test_a_line_is_orjsons_line(fields: dict[str, Any], now: float) -> None:
    """Any keys, any values (Ellipsis: left out with its key), any time."""
    pairs: list[object] = []
    for name, value in fields.items():
        pairs += [orjson.dumps(name) + b":", value]
    kept = {name: value for name, value in fields.items() if value is not ...}
    assert written(pairs, now) == expected(kept, now)


def test_what_orjson_refuses_is_refused() -> None:
    for value in ("\ud800", "a\udfffb", 2**64, -(2**63) - 1, object()):
        with pytest.raises(orjson.JSONEncodeError):
            observe._line(1.7e9, b'"x":', value)
        with pytest.raises(orjson.JSONEncodeError):
            orjson.dumps({"x": value})


def test_edges_of_numbers_and_strings() -> None:
    """The fast paths' edges: -0.0, integral floats, 2**63, a long escaped string."""
    values: list[object] = [-0.0, 0.0, 12.0, 0.1, 0.01, 0.3, 2.0**40, 2.0**40 - 0.1, 1e16]
    values += [2**63 - 1, 2**63, -(2**63), True, False, None, '\x00\x1f\x7f"\\é\u2028' * 500]
    for value in values:
        assert written([b'"v":', value], 1.7e9) == expected({"v": value}, 1.7e9), value


EXCHANGES = st.fixed_dictionaries(
    {
        "request_id": st.text(max_size=40),
        "endpoint": st.sampled_from(["/v1/chat/completions", "/v1/completions", '/v1/emb"x']),
        "app": st.text(max_size=10),
        "route": st.text(max_size=10),
        "backend": st.text(max_size=10),
        "preset": st.text(max_size=10),
        "variant": st.text(max_size=10),
        "experiment": st.text(max_size=10),
        "config_version": st.text(max_size=16),
        "status": st.integers(0, 599),
        "stream": st.booleans(),
        "prompt_tokens": st.none() | st.integers(0, 10**9),
        "completion_tokens": st.none() | st.integers(0, 10**9),
        "content_chunks": st.integers(0, 10**6),
        "finish_reason": st.none() | st.sampled_from(["stop", "length", "tool_calls"]),
        "cut": st.none() | st.text(max_size=8),
        "timeout": st.none() | st.sampled_from(["first_token", "inter_token", "total"]),
        "upstream_error": st.none() | st.text(max_size=8),
        "error_code": st.none() | st.text(max_size=8),
        "client_disconnected": st.booleans(),
        "queue_wait": st.just(0.0) | st.floats(0, 1e5),
        "gap_count": st.integers(0, 10**6),
        "gap_sum": st.floats(0, 1e6),
        "gap_max": st.floats(0, 1e5),
        "started_at": st.floats(0, 1e7),
        "first": st.none() | st.floats(0, 1e5),
        "duration": st.floats(0, 1e6),
    }
)


@SETTINGS
@given(values=EXCHANGES, now=NOW)
def test_an_exchanges_line_in_c_is_the_pure_builds(values: dict[str, Any], now: float) -> None:
    """observe.exchange_line (C) against JsonAccessLog.write's line (the dict, orjson),
    for every field the access line has, each present or not."""
    ex = Exchange("r", values.pop("started_at"))
    for name in ("request_id", "app", "route", "backend", "preset", "variant", "experiment"):
        setattr(ex, name, values.pop(name))
    first, duration = values.pop("first"), values.pop("duration")
    ex.first_token_at = None if first is None else ex.started_at + first
    ex.ended_at = ex.started_at + duration
    for name, value in values.items():
        setattr(ex, name, value)
    pure = JsonAccessLog(io.BytesIO()).fields_line(access_fields(ex), now)
    assert observe.exchange_line(ex, now) == pure
