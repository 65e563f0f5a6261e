"""vLLM's chunks read by their layout (`sluice.proxy.vllmshape`) record and guard what
parsing records and guards: whole streams in vLLM 0.26's layout and in layouts one field
away from it, through `observe` (no guard) and `guarded` (a stop string), each against
the same stream through `_parse_event`, which parses every chunk."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from sluice.proxy.chunks import ChunkFilter
from sluice.proxy.exchange import Exchange
from sluice.proxy.stopwords import GuardSpec
from sluice.proxy.vllmshape import (
    CHAT_TEXT_OPEN,
    CHAT_TOKEN_END,
    NOT_READ,
    TEXT_TEXT_OPEN,
    TEXT_TOKEN_END,
    read_choice,
    role_end,
    token_span,
    usage_counts,
)

HEAD = b'data: {"id":"chatcmpl-9bb62c914f867344","object":"chat.completion.chunk","created":1795635313,"model":"tiny-llama","choices":['
TEXT_HEAD = HEAD.replace(b"chatcmpl-", b"cmpl-").replace(
    b"chat.completion.chunk", b"text_completion"
)
# What follows the choices array in vLLM 0.26's chunks, and forms the readers must leave
# to the general path (usage after the choices, a finish reason after them, an error).
RESTS = [
    b"}",
    b',"system_fingerprint":"vllm-0.26.0-nohash"}',
    b',"prompt_token_ids":null,"prompt_text":null}',
    b',"usage":{"prompt_tokens":20,"total_tokens":21,"completion_tokens":1}}',
    b',"usage":null}',
    b',"finish_reason":"odd"}',
    b',"error":{"message":"boom"}}',
]
TEXTS = st.text(alphabet=st.sampled_from(list('ab "\\\\:{},\\né\tS TOP')), max_size=8)
REASONS = st.sampled_from(['"stop"', '"length"', '"caf\\u00e9"', '"st\\"op"'])
STOP_REASONS = st.sampled_from(["null", '"re."', "7", '"a\\"b"', "-1", "false"])


def _choice(
    chat: bool,
    text: str,
    reason: str | None,
    stop_reason: str | None,
    extras: list[bool],
    index: int,
) -> bytes:
    raw = orjson.dumps(text)
    out = b'{"index":%d' % index
    out += b',"delta":{"content":%b}' % raw if chat else b',"text":%b' % raw
    out += b',"logprobs":null,"finish_reason":' + (reason or "null").encode()
    if stop_reason is not None:
        out += b',"stop_reason":' + stop_reason.encode()
    if not chat and extras[0]:
        out += b',"prompt_token_ids":null'
    if extras[1]:
        out += b',"token_ids":null'
    return out + b"}"


@st.composite
def streams(draw: st.DrawFn) -> tuple[bool, list[bytes]]:
    """A stream in vLLM's layout, each chunk possibly one field away from it."""
    chat = draw(st.booleans())
    head = HEAD if chat else TEXT_HEAD
    events = []
    if chat and draw(st.booleans()):
        role = b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}'
        events.append(head + role + b"]" + draw(st.sampled_from(RESTS)) + b"\n\n")
    for _ in range(draw(st.integers(0, 6))):
        finish = draw(st.one_of(st.none(), REASONS))
        vllm_stop = finish is not None or not chat  # vLLM writes stop_reason then
        stop_reason = draw(STOP_REASONS) if vllm_stop else draw(st.one_of(st.none(), STOP_REASONS))
        choice = _choice(
            chat,
            draw(TEXTS),
            finish,
            stop_reason,
            draw(st.lists(st.booleans(), min_size=2, max_size=2)),
            draw(st.sampled_from([0, 0, 0, 1])),
        )
        if draw(st.integers(0, 9)) == 0:
            choice += b',{"index":1,"text":"x","finish_reason":null}'
        events.append(head + choice + b"]" + draw(st.sampled_from(RESTS[:5])) + b"\n\n")
    if draw(st.booleans()):
        usage = b'],"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}' % (
            draw(st.integers(0, 99)),
            draw(st.integers(0, 99)),
            draw(st.integers(0, 99)),
        )
        # (not a second usage key: parsing reads its last, the searches their first)
        rest = draw(st.sampled_from(RESTS[:3] + RESTS[5:]))
        events.append(head + usage + rest + b"\n\n")
    if events and draw(st.integers(0, 4)) == 0:  # another head: the array found again
        events.append(head.replace(b"tiny-llama", b"other-model") + events[-1][len(head) :])
    return chat, events


def _records(chunk_filter: ChunkFilter) -> tuple[Any, ...]:
    ex = chunk_filter.ex
    return (
        ex.prompt_tokens,
        ex.completion_tokens,
        ex.finish_reason,
        ex.content_chunks,
        ex.cut,
        chunk_filter.upstream_error,
        chunk_filter.done,
        sorted(chunk_filter.finished),
    )


def _sent(chat: bool, out: list[bytes]) -> list[Any]:
    """What a client reads from the events sent: each chunk's choices, parsed."""
    key = "delta" if chat else "text"
    seen = []
    for event in b"".join(out).split(b"\n\n"):
        if not event.startswith(b"data: {"):
            seen.append(event)
            continue
        obj = orjson.loads(event[6:])
        for choice in obj.get("choices") or ():
            seen.append(
                (
                    choice.get("index"),
                    choice.get(key),
                    choice.get("finish_reason"),
                    choice.get("stop_reason"),
                )
            )
    return seen


@settings(max_examples=500, deadline=None)
@given(streams())
def test_observe_records_what_parsing_records(stream: tuple[bool, list[bytes]]) -> None:
    """Without a guard: the same token count, finish reason and usage as parsing each
    chunk, and every event out unchanged."""
    chat, events = stream
    # A finish reason outside the choices is no finish to the parser; the general path's
    # searches (where the readers hand such a chunk) take the last one they find.
    assume(not any(b'"finish_reason":"odd"' in event for event in events))
    read = ChunkFilter(Exchange("r", 0.0), chat, None, 1)
    parsed = ChunkFilter(Exchange("r", 0.0), chat, None, 1)
    for event in events:
        assert read.observe(event) is event
        parsed._parse_event(event)
    if any(b'"index":1' in e for e in events):
        # parsing counts a token per choice with text, observe one per chunk
        read.ex.content_chunks = parsed.ex.content_chunks
    assert _records(read) == _records(parsed)


# Two choices that both end held back (an "S" may begin "STOP"). The parse starts a guard
# for every choice it sees, choice 0's with the role chunk; the read path reads that chunk
# by its layout and starts none, so choice 1's guard comes first there. What is held goes
# out by index either way.
_TWO_HELD = [
    HEAD
    + b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n',
    HEAD
    + b'{"index":1,"delta":{"content":"S"},"logprobs":null,"finish_reason":null},{"index":1,"text":"x","finish_reason":null}]}\n\n',
    HEAD
    + b'{"index":0,"delta":{"content":"S"},"logprobs":null,"finish_reason":null},{"index":1,"text":"x","finish_reason":null}]}\n\n',
]


@settings(max_examples=500, deadline=None)
@given(streams())
@example((True, _TWO_HELD))
def test_guarded_sends_what_parsing_sends(stream: tuple[bool, list[bytes]]) -> None:
    """With a guard: the client reads the same texts, finish and stop reasons as when
    every chunk is parsed and guarded, and the same is recorded."""
    chat, events = stream
    spec = GuardSpec(stop=("STOP",))
    read = ChunkFilter(Exchange("r", 0.0), chat, spec, 2)
    parsed = ChunkFilter(Exchange("r", 0.0), chat, spec, 2)
    read_out: list[bytes] = []
    parsed_out: list[bytes] = []
    for event in events:
        read_out.append(read.guarded(event) or b"")
        parsed_out.append(parsed._parse_event(event) or b"")
    read_out.append(read.eof_tail())
    parsed_out.append(parsed.eof_tail())
    assert _sent(chat, read_out) == _sent(chat, parsed_out)
    assert _records(read) == _records(parsed)


def test_vllms_chunks_are_read_by_their_layout() -> None:
    """The chunks of vLLM 0.26's transcripts are read, not left to the general path."""
    token = (
        HEAD
        + b'{"index":0,"delta":{"content":" comp"},"logprobs":null,"finish_reason":null,"token_ids":null}]}\n\n'
    )
    last = (
        HEAD
        + b'{"index":0,"delta":{"content":" ambi"},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}],"system_fingerprint":"vllm-0.26.0-nohash"}\n\n'
    )
    text = (
        TEXT_HEAD
        + b'{"index":0,"text":"er\\nass","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}\n\n'
    )
    role = (
        HEAD
        + b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}\n\n'
    )
    usage = (
        HEAD
        + b'],"usage":{"prompt_tokens":20,"total_tokens":32,"completion_tokens":12},"system_fingerprint":"vllm-0.26.0-nohash"}\n\n'
    )
    pos = len(HEAD)

    def read(event: bytes, chat: bool) -> tuple[int, ...]:
        head = len(HEAD if chat else TEXT_HEAD)
        return read_choice(event, event.decode("latin-1"), chat, head)

    index, start, end, reason_start, reason_end, after = read(token, True)
    assert (index, token[start:end], reason_start, after) == (0, b" comp", -1, len(token) - 3)
    index, start, end, reason_start, reason_end, _ = read(last, True)
    assert (last[start:end], last[reason_start:reason_end]) == (b" ambi", b"length")
    index, start, end, reason_start, _, _ = read(text, False)
    assert (text[start:end], reason_start) == (b"er\\nass", -1)
    assert read(role, True) == NOT_READ
    # The commonest form, whole: two comparisons and a search inside the text.
    opening = (HEAD + CHAT_TEXT_OPEN.encode()).decode("latin-1")
    start, end = token_span(token.decode("latin-1"), opening, CHAT_TOKEN_END)
    assert token[start:end] == b" comp"
    assert token_span(last.decode("latin-1"), opening, CHAT_TOKEN_END) == (-1, 0)
    text_opening = (TEXT_HEAD + TEXT_TEXT_OPEN.encode()).decode("latin-1")
    start, end = token_span(text.decode("latin-1"), text_opening, TEXT_TOKEN_END)
    assert text[start:end] == b"er\\nass"
    assert role_end(role, role.decode("latin-1"), pos) == role.index(b"}],") + 2
    assert usage_counts(usage, usage.decode("latin-1"), pos)[:2] == (20, 12)
    # Observed without the searches of the general path, which would find the same.
    ex = Exchange("r", 0.0)
    chunk_filter = ChunkFilter(ex, True, None, 1)
    for event in (role, token, last, usage):
        chunk_filter.observe(event)
    assert (ex.content_chunks, ex.finish_reason, ex.prompt_tokens, ex.completion_tokens) == (
        2,
        "length",
        20,
        12,
    )
