"""The finish reason and usage of a stream without a guard: read from vLLM's compact JSON
by byte searches (`ChunkFilter._bookkeep_compact`), from anything else by parsing. Both
must record what parsing records, for every event."""

from __future__ import annotations

import json
import time
import tracemalloc
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sluice.proxy.chunks import _CHAT_TEXT, _COMPLETION_TEXT, ChunkFilter
from sluice.proxy.exchange import Exchange
from sluice.proxy.jsonbody import nesting_exceeds
from sluice.proxy.stopwords import GuardSpec
from sluice.proxy.vllmshape import read_choice

# From ../shared/vllm-transcripts (vLLM 0.26): a finish chunk, the usage chunk, a chunk
# with continuous usage stats.
VLLM_EVENTS = [
    b'data: {"id":"chatcmpl-9bb62c914f867344","object":"chat.completion.chunk","created":'
    b'1795635313,"model":"tiny-llama","choices":[{"index":0,"delta":{"content":" ambi"},'
    b'"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}]}',
    b'data: {"id":"chatcmpl-9bb62c914f867344","object":"chat.completion.chunk","created":'
    b'1795635313,"model":"tiny-llama","choices":[],"usage":{"prompt_tokens":20,'
    b'"total_tokens":32,"completion_tokens":12},"system_fingerprint":"vllm-0.26.0-nohash"}',
    b'data: {"id":"chatcmpl-96f2105f056821c2","object":"chat.completion.chunk","created":'
    b'1795635313,"model":"tiny-llama","choices":[{"index":0,"delta":{"content":" {"},'
    b'"logprobs":null,"finish_reason":null,"token_ids":null}],"usage":{"prompt_tokens":20,'
    b'"total_tokens":21,"completion_tokens":1}}',
]
# Forms the byte searches must not misread: spaces, nulls, an escaped reason, nested
# details before the counts, an error key, key names inside text, several choices.
ODD_EVENTS = [
    b'data: {"choices": [{"index": 0, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3,'
    b' "completion_tokens": 4}}',
    b'data: {"choices":[],"usage":{"prompt_tokens":null,"completion_tokens":7}}',
    b'data: {"choices":[{"index":0,"finish_reason":"st\\"op"}]}',
    b'data: {"choices":[],"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens"'
    b':8},"total_tokens":19,"completion_tokens":10}}',
    b'data: {"error":{"message":"boom"},"choices":[],"usage":{"prompt_tokens":1,'
    b'"completion_tokens":2}}',
    b'data: {"choices":[{"index":0,"delta":{"content":"\\"finish_reason\\":\\"x\\" '
    b'\\"prompt_tokens\\":5"},"finish_reason":"length"}]}',
    b'data: {"choices":[{"index":0,"finish_reason":"stop"},{"index":1,"finish_reason":"length"}]}',
    b'data: {"choices":[{"index":0,"finish_reason":"stop"}],"usage":{}}',
    b'data: {"choices":[],"usage":{"prompt_tokens":1.5,"completion_tokens":2}}',
    b'data: {"choices":[],"usage":{"prompt_tokens":-1,"completion_tokens":2}}',
    b'data: {"choices":[{"index":0,"finish_reason":"caf\xc3\xa9"}]}',
    b"data: not json at all",
    b'data: {"choices":[],"usage":{"prompt_tokens":12345678901234567890,"completion_tokens":1}}',
    b'data: {"choices":[],"usage":{"prompt_tokens":9223372036854775808,"completion_tokens":1}}',
    b'data: {"choices":[],"usage":{"prompt_tokens":9223372036854775807,"completion_tokens":1}}',
]


def _recorded(event: bytes, parsed_only: bool) -> tuple[Any, ...]:
    ex = Exchange("r", 0.0)
    chunk_filter = ChunkFilter(ex, True, None, 1)
    if parsed_only:
        chunk_filter._bookkeep_parsed(event)
    else:
        chunk_filter._bookkeep(event)
    return ex.prompt_tokens, ex.completion_tokens, ex.finish_reason, chunk_filter.upstream_error


@pytest.mark.parametrize("event", VLLM_EVENTS + ODD_EVENTS)
def test_byte_searches_record_what_parsing_records(event: bytes) -> None:
    assert _recorded(event, False) == _recorded(event, True)


def test_vllm_events_are_read_without_parsing() -> None:
    for event in VLLM_EVENTS:
        ex = Exchange("r", 0.0)
        assert ChunkFilter(ex, True, None, 1)._bookkeep_compact(event)
    ex = Exchange("r", 0.0)
    chunk_filter = ChunkFilter(ex, True, None, 1)
    chunk_filter.observe(VLLM_EVENTS[0])
    chunk_filter.observe(VLLM_EVENTS[1])
    assert (ex.finish_reason, ex.prompt_tokens, ex.completion_tokens) == ("length", 20, 12)


TEXT = st.text(alphabet=st.sampled_from(list('ab "\\:{},_\né')), max_size=12)
COUNT = st.one_of(st.integers(0, 10**6), st.none(), st.just(-3), st.just(1.5))


@st.composite
def events(draw: st.DrawFn) -> bytes:
    obj: dict[str, Any] = {"id": draw(TEXT), "object": "chat.completion.chunk"}
    choices = []
    for index in range(draw(st.integers(0, 2))):
        choice: dict[str, Any] = {"index": index, "delta": {"content": draw(TEXT)}}
        choice["finish_reason"] = draw(
            st.one_of(st.none(), st.sampled_from(["stop", "length"]), TEXT)
        )
        choices.append(choice)
    obj["choices"] = choices
    if draw(st.booleans()):
        usage: dict[str, Any] = {}
        for key in draw(st.permutations(["prompt_tokens", "total_tokens", "completion_tokens"])):
            if draw(st.booleans()) or key != "total_tokens":
                usage[key] = draw(COUNT)
        if draw(st.booleans()):
            usage["prompt_tokens_details"] = {"cached_tokens": draw(COUNT)}
        obj["usage"] = usage
    if draw(st.booleans()):
        obj["error"] = {"message": draw(TEXT)}
    spaced = draw(st.booleans())
    body = json.dumps(obj).encode() if spaced else orjson.dumps(obj)
    return b"data: " + body


@settings(max_examples=400, deadline=None)
@given(events())
def test_byte_searches_agree_with_parsing_on_any_event(event: bytes) -> None:
    assert _recorded(event, False) == _recorded(event, True)


CONTENT = st.text(alphabet=st.sampled_from(list('ab "\\:{}é\n\t,')), max_size=10)


@settings(max_examples=400, deadline=None)
@given(
    chat=st.booleans(),
    content=CONTENT,
    index=st.integers(min_value=0, max_value=10**20),
    optionals=st.lists(st.booleans(), min_size=3, max_size=3),
    finish=st.sampled_from(["null", '"stop"']),
    tail=st.sampled_from(["}]}", '}],"usage":null}', '}, {"index":1}]}', "]}"]),
    spaced=st.booleans(),
)
def test_a_token_chunk_is_read_as_the_expression_reads_it(
    chat: bool,
    content: str,
    index: int,
    optionals: list[bool],
    finish: str,
    tail: str,
    spaced: bool,
) -> None:
    """`read_choice` (the guarded path's reader of vLLM's layout) reads what the
    regular expression matches (index, start and end of the raw text) whenever it reads
    a token, and reads every match but those whose text holds an escaped quote: the
    expression is only asked for the rest."""
    raw = orjson.dumps(content)[1:-1]
    sep = b", " if spaced else b","
    if chat:
        choice = b'{"index":%d%b"delta":{"content":"%b"},"logprobs":null,"finish_reason":%b' % (
            index,
            sep,
            raw,
            finish.encode(),
        )
        extras = [b',"token_ids":null']
    else:
        choice = b'{"index":%d%b"text":"%b","logprobs":null,"finish_reason":%b' % (
            index,
            sep,
            raw,
            finish.encode(),
        )
        extras = [b',"stop_reason":null', b',"prompt_token_ids":null', b',"token_ids":null']
    for extra, present in zip(extras, optionals, strict=False):
        if present:
            choice += extra
    event = (
        b'data: {"id":"x","object":"o","created":1,"model":"m","choices":['
        + choice
        + tail.encode()
        + b"\n\n"
    )
    expression = _CHAT_TEXT if chat else _COMPLETION_TEXT
    match = expression.search(event)
    text = event.decode("latin-1")
    index, start, end, reason, _, _ = read_choice(event, text, chat, text.find("[") + 1)
    if index >= 0 and reason < 0 and end > start:  # a token, read by the layout
        assert match is not None
        assert (index, start, end) == (int(match[1]), match.start(2), match.end(2))
    elif match is not None:
        assert b'\\"' in match[2] or len(match[1]) > 18


def _depth(obj: Any) -> int:
    if isinstance(obj, dict):
        return 1 + max((_depth(v) for v in obj.values()), default=0)
    if isinstance(obj, list):
        return 1 + max((_depth(v) for v in obj), default=0)
    return 0


JSON_VALUES = st.recursive(
    st.none()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.text(alphabet=st.sampled_from(list('ab[]{}"\\é')), max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(
    value=JSON_VALUES, limit=st.integers(min_value=0, max_value=12), pad=st.sampled_from([0, 5000])
)
def test_the_nesting_check_counts_as_parsing_does(value: Any, limit: int, pad: int) -> None:
    """`nesting_exceeds` (brackets counted as text below 4 KB, as bytes above) says what
    the parsed body's depth says; brackets inside strings never count."""
    body = orjson.dumps({"pad": "[" * pad, "v": value})
    assert nesting_exceeds(body, limit) == (_depth(orjson.loads(body)) > limit)


def _reference_depth(raw: bytes) -> int:
    """The deepest running count of brackets outside strings, byte by byte; a string left
    open runs to the end (what nesting_exceeds removes as strings)."""
    depth = deepest = 0
    in_string = escaped = False
    for c in raw:
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:
                escaped = True
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in b"]}":
            depth -= 1
    return deepest


@settings(max_examples=500, deadline=None)
@given(raw=st.binary(max_size=60).map(lambda b: bytes(b'[]{}\\"a'[x % 7] for x in b)))
def test_the_nesting_check_of_any_bytes_is_a_scan_of_them(raw: bytes) -> None:
    """Invalid bodies too (unterminated strings, a lone backslash last, stray closers):
    the check says what a byte-by-byte scan says."""
    for limit in (-1, 0, 1, 3, 2**64):
        assert nesting_exceeds(raw, limit) == (_reference_depth(raw) > limit), limit


@pytest.mark.parametrize("tail", [b"", b"\\", b"]", b'"'])
def test_a_string_left_open_costs_one_pass(tail: bytes) -> None:
    """An opening quote followed by 200,000 escaped ones: each was a new start of the
    string search, which ran to the end and failed (quadratic: 13 s for 64 KB, before
    any key was checked). One pass now, well under a second for 400 KB."""
    body = b"[" * 130 + b'"' + b'\\"' * 200_000 + tail
    started = time.perf_counter()
    assert nesting_exceeds(body)  # 130 brackets before the string: deeper than 128
    assert time.perf_counter() - started < 2.0


def test_a_string_of_escapes_costs_no_memory_per_escape() -> None:
    """The string search keeps no backtracking state per escape (possessive): 4 MiB of
    escaped quotes took ~285 MB of the regular expression engine's memory, before any
    key was checked."""
    body = b"[[" + b'"' + b'\\"' * (2 * 1024 * 1024)
    tracemalloc.start()
    try:
        assert nesting_exceeds(body, 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 1024 * 1024, peak


ROLE_CHUNK = (
    b'data: {"id":"chatcmpl-9bb62c914f867344","object":"chat.completion.chunk","created":'
    b'1795635313,"model":"tiny-llama","choices":[{"index":0,"delta":{"role":"assistant",'
    b'"content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,'
    b'"prompt_text":null}\n\n'
)
TOKEN_CHUNK = (
    b'data: {"id":"chatcmpl-9bb62c914f867344","object":"chat.completion.chunk","created":'
    b'1795635313,"model":"tiny-llama","choices":[{"index":0,"delta":{"content":" ST"},'
    b'"logprobs":null,"finish_reason":null,"token_ids":null}]}\n\n'
)
UNGUARDED_FORMS = [
    ROLE_CHUNK,
    VLLM_EVENTS[1] + b"\n\n",  # the usage chunk
    ROLE_CHUNK.replace(b'"index":0', b'"index":3'),
    ROLE_CHUNK.replace(
        b'"prompt_token_ids":null', b'"usage":{"prompt_tokens":4,"completion_tokens":0}'
    ),
    ROLE_CHUNK.replace(b'"content":""', b'"content":"x"'),
    ROLE_CHUNK.replace(b'"finish_reason":null', b'"finish_reason":"stop"'),
    ROLE_CHUNK.replace(b'"prompt_text":null', b'"error":{"message":"boom"}'),
    *[event + b"\n\n" for event in ODD_EVENTS],
]


@pytest.mark.parametrize("event", UNGUARDED_FORMS)
def test_role_and_usage_chunks_read_without_parsing_leave_what_parsing_leaves(
    event: bytes,
) -> None:
    """A guarded stream's role and usage chunks (`_nothing_to_guard`, read by their literal
    form) leave what `_parse_event` leaves: the same bytes out, the same records, and the
    same answer to the stream's next token and to its end without [DONE]."""
    spec = GuardSpec(stop=("STOP",))

    def run(parse_only: bool) -> tuple[Any, ...]:
        ex = Exchange("r", 0.0)
        chunk_filter = ChunkFilter(ex, True, spec, 1)
        first = chunk_filter._parse_event(event) if parse_only else chunk_filter.guarded(event)
        then = chunk_filter.guarded(TOKEN_CHUNK)
        tail = chunk_filter.eof_tail()
        return (
            first,
            then,
            tail,
            ex.prompt_tokens,
            ex.completion_tokens,
            ex.finish_reason,
            ex.content_chunks,
            chunk_filter.upstream_error,
            chunk_filter.finished,
        )

    assert run(False) == run(True)


def test_vllms_role_and_usage_chunks_are_not_parsed_on_a_guarded_stream() -> None:
    """The forms above that `_nothing_to_guard` takes (vLLM's role chunk, at any index, and
    its usage chunk), and some it leaves to the parser."""
    spec = GuardSpec(stop=("STOP",))

    def taken(event: bytes) -> bool:
        chunk_filter = ChunkFilter(Exchange("r", 0.0), True, spec, 1)
        text = event.decode("latin-1")
        return chunk_filter._nothing_to_guard(event, text, chunk_filter._choices(text))

    got = [taken(e) for e in UNGUARDED_FORMS]
    # The role chunk with usage after it, a text, a finish: parsed. An error key after the
    # choices is no error to the parser (a chunk with choices): taken, as parsing leaves it.
    assert got[:7] == [True, True, True, False, False, False, True]


@pytest.mark.parametrize(
    "fields",
    [b"id: 7\n", b"event: message\n", b": a comment\nid: 7\n", b"retry: 10\nevent: x\n"],
)
@pytest.mark.parametrize("event", VLLM_EVENTS + ODD_EVENTS)
def test_an_event_with_other_fields_records_what_its_data_alone_records(
    fields: bytes, event: bytes
) -> None:
    # The data is what a client reads; an `id:` or `event:` line before it (never from
    # vLLM) must not hide the finish reason or the counts from the access log and metrics.
    ex = Exchange("r", 0.0)
    ChunkFilter(ex, True, None, 1).observe(fields + event + b"\n\n")
    alone = Exchange("r", 0.0)
    ChunkFilter(alone, True, None, 1).observe(event + b"\n\n")
    recorded = (ex.prompt_tokens, ex.completion_tokens, ex.finish_reason)
    assert recorded == (alone.prompt_tokens, alone.completion_tokens, alone.finish_reason)


def test_data_over_several_lines_is_read_joined() -> None:
    event = b'data: {"choices":[{"index":0,"finish_reason":"st\\"op"}],\ndata: "usage":{}}\n\n'
    ex = Exchange("r", 0.0)
    ChunkFilter(ex, True, None, 1).observe(b"id: 1\n" + event)
    assert ex.finish_reason == 'st"op'


@pytest.mark.parametrize(
    ("count", "recorded"), [(2**63 - 1, 2**63 - 1), (2**63, None), (2**64, None), (10**30, None)]
)
def test_a_count_beyond_64_bits_is_not_recorded(count: int, recorded: int | None) -> None:
    # Python's json reads any integer (the lenient parse); the access line's encoder, the
    # metrics and the records store take int64 only.
    event = b'data: {"choices":[],\ndata: "usage":{"prompt_tokens":%d}}\n\n' % count
    ex = Exchange("r", 0.0)
    ChunkFilter(ex, True, None, 1).observe(event)
    assert ex.prompt_tokens == recorded
