"""vLLM's common stream chunks read whole (proxy/chunkscan.py; in C in the compiled build,
proxy/_chunkscan.c): the scan takes exactly the chunks that hold a token chunk, a choice's
last chunk or the usage chunk in vLLM's literal form, one event each, and stops at the
first other; what it reports is what `ChunkFilter.observe` records of the same events
(which it leaves unchanged); C and Python agree on any bytes; and a relay that scans sends
and records what one reading every event does."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sluice.proxy import chunks, chunkscan
from sluice.proxy.build import build_kind
from sluice.proxy.chunks import ChunkFilter
from sluice.proxy.eventfilter import NamedEventFilter
from sluice.proxy.exchange import Exchange
from sluice.proxy.snapshot import StreamPolicy
from sluice.proxy.stopwords import GuardSpec, RepetitionGuard
from sluice.proxy.tgi import TgiStreamFilter

from tests.proxy.test_relay_frames import SIZE_FORMATS, dechunk, relay_exchange

EXAMPLES = int(os.environ.get("SLUICE_PARSER_EXAMPLES", "400"))
OBJECT = '{"id":"cmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":['
HEAD = "data: " + OBJECT
OTHER_HEAD = HEAD.replace('"m"', '"n"')
FINGERPRINT = ',"system_fingerprint":"vllm-0.26.0-nohash"'
TEXTS = st.text(alphabet=st.sampled_from(list('ab "\\\n\té:}')), max_size=5)
REASONS = st.sampled_from(["length", "stop", "", "a\\b", 'x"y'])
COUNTS = st.sampled_from([0, 7, 12345, 10**17, 10**18])  # 10**18: 19 digits


def quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


@dataclass(frozen=True)
class Event:
    """An event and what the scan should make of it in a chunk of its own."""

    data: bytes
    kind: str  # "token", "finish", "usage": forms the scan reads; "other"
    tokens: int = 0  # 1 for a token or last chunk with a text
    reason: str | None = None
    counts: tuple[int, int] | None = None


def token_event(text: str, chat: bool = True, head: str = HEAD) -> Event:
    if chat:
        body = '{"index":0,"delta":{"content":"' + quoted(text) + '"},"logprobs":null,'
        body += '"finish_reason":null,"token_ids":null}]}'
    else:
        body = '{"index":0,"text":"' + quoted(text) + '","logprobs":null,"finish_reason":null,'
        body += '"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}'
    data = (head + body + "\n\n").encode()
    readable = head == HEAD and chat and '"' not in quoted(text)
    return Event(data, "token" if readable else "other", int(bool(text)) if readable else 0)


def finish_event(text: str, reason: str, fingerprint: bool) -> Event:
    data = (
        HEAD + '{"index":0,"delta":{"content":"' + quoted(text) + '"},"logprobs":null,'
        '"finish_reason":"'
        + quoted(reason)
        + '","stop_reason":null,"token_ids":null}]'
        + (FINGERPRINT if fingerprint else "")
        + "}\n\n"
    ).encode()
    if '"' in quoted(text) or "\\" in quoted(reason):
        return Event(data, "other")
    return Event(data, "finish", int(bool(text)), reason=reason)


def usage_event(prompt: int, completion: int, fingerprint: bool) -> Event:
    usage = f'"usage":{{"prompt_tokens":{prompt},"total_tokens":{prompt + completion},'
    usage += f'"completion_tokens":{completion}}}'
    data = (HEAD + "]," + usage + (FINGERPRINT if fingerprint else "") + "}\n\n").encode()
    if max(prompt, completion, prompt + completion) >= 10**18:
        return Event(data, "other")
    return Event(data, "usage", counts=(prompt, completion))


ROLE = Event(
    (
        HEAD + '{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
        '"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}\n\n'
    ).encode(),
    "other",
)
DONE = Event(b"data: [DONE]\n\n", "other")

EVENTS = st.one_of(
    TEXTS.map(token_event),
    TEXTS.map(token_event),
    TEXTS.map(lambda t: token_event(t, chat=False)),  # the other layout
    TEXTS.map(lambda t: token_event(t, head=OTHER_HEAD)),  # another stream's head
    st.builds(finish_event, TEXTS, REASONS, st.booleans()),
    st.builds(usage_event, COUNTS, COUNTS, st.booleans()),
    st.just(ROLE),
    st.just(DONE),
    TEXTS.map(lambda t: Event(b"event: x\n" + token_event(t).data, "other")),  # two lines
)
# How an event is framed: a chunk of its own (3 in 7), with the next event, split over
# two chunks, with a chunk extension, with a size of 9 digits.
HOWS = st.sampled_from(["own", "own", "own", "with_next", "split", "extension", "nine_digits"])
LAYOUT = chunkscan.layout_of(HEAD, True)


def framed(
    events: list[Event], hows: list[str], size_format: bytes
) -> tuple[bytes, list[tuple[int, int] | None]]:
    """The events as HTTP chunks, then the last chunk; and by event, the start and end of
    its chunk where it has one of its own that the scan may read (None: not)."""
    out = b""
    spans: list[tuple[int, int] | None] = []
    carry = b""
    for i, event in enumerate(events):
        how = hows[i % len(hows)] if hows else "own"
        data = carry + event.data
        carried = bool(carry)
        carry = b""
        if how == "with_next":
            if i + 1 < len(events):
                carry = data
                spans.append(None)
                continue
            how = "own"  # the last event: nothing to share its chunk with
        if how == "split" and len(data) > 3:
            middle = 3  # inside the first event, wherever the events end
            out += size_format % middle + b"\r\n" + data[:middle] + b"\r\n"
            data = data[middle:]
        size = b"%09x" % len(data) if how == "nine_digits" else size_format % len(data)
        if how == "extension":
            size += b";a=b"
        chunk = size + b"\r\n" + data + b"\r\n"
        spans.append((len(out), len(out) + len(chunk)) if how == "own" and not carried else None)
        out += chunk
    return out + b"0\r\n\r\n", spans


def expected_scan(
    data: bytes, events: list[Event], spans: list[tuple[int, int] | None]
) -> tuple[int, int, str | None, tuple[int, int] | None]:
    """What the scan takes from the read's start: the events in chunks of their own, each
    whole in `data`, of the forms it reads, and one finish and one usage at most."""
    pos, tokens, reason, counts = 0, 0, None, None
    for event, span in zip(events, spans, strict=True):
        if span is None or span[0] != pos or span[1] > len(data) or event.kind == "other":
            break
        if event.kind == "finish":
            if reason is not None:
                break
            reason = event.reason
        if event.kind == "usage":
            if counts is not None:
                break
            counts = event.counts
        tokens += event.tokens
        pos = span[1]
    return pos, tokens, reason, counts


def observed(events: list[Event]) -> tuple[int, str | None, tuple[int, int] | None, bool]:
    """What `observe` records of the events after this stream's role chunk: tokens, the
    finish reason, the usage counts; and whether it left each event unchanged."""
    ex = Exchange("r", 0.0)
    chunk_filter = ChunkFilter(ex, True, None, 1)
    chunk_filter.observe(ROLE.data)
    unchanged = all(chunk_filter.observe(e.data) == e.data for e in events)
    usage = None if ex.prompt_tokens is None else (ex.prompt_tokens, ex.completion_tokens or 0)
    return ex.content_chunks, ex.finish_reason, usage, unchanged


def packed(found: tuple[int, int, int, int, int, int]) -> int:
    """What scan_tokens answers for what scan found: its position and tokens in one int
    when it found no finish reason and no usage, else -1."""
    end, tokens, reason_start, _, prompt, _ = found
    if reason_start >= 0 or prompt >= 0:
        return -1
    return end + tokens * 2**24


def test_scan_tokens_leaves_finish_and_usage_chunks_and_overlong_reads_to_scan() -> None:
    token, finish = (
        b"%x\r\n%b\r\n" % (len(e.data), e.data)
        for e in (token_event("hi"), finish_event("", "stop", fingerprint=False))
    )
    assert chunkscan.scan_tokens(token * 3, 0, LAYOUT) == 3 * len(token) + (3 << 24)
    assert chunkscan.scan_tokens(token * 3 + finish, 0, LAYOUT) == -1
    assert chunkscan.scan_tokens(token * 3 + finish, len(token), LAYOUT) == -1
    # Past 2**24 - 1 bytes the position does not fit: scan reads it.
    long_read = b"x" * 2**24 + token
    assert chunkscan.scan_tokens(long_read, 2**24, LAYOUT) == -1
    assert chunkscan.scan(long_read, 2**24, LAYOUT)[:2] == (len(long_read), 1)


def test_the_scan_runs_in_c_in_the_compiled_build_only() -> None:
    assert chunkscan.SCAN_IN_C is (build_kind() == "compiled")


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    events=st.lists(EVENTS, max_size=10),
    hows=st.lists(HOWS, max_size=6),
    size_format=SIZE_FORMATS,
    cut=st.none() | st.integers(min_value=0, max_value=5_000),
)
def test_the_scan_takes_vllms_common_chunks_and_records_what_observe_does(
    events: list[Event], hows: list[str], size_format: bytes, cut: int | None
) -> None:
    data, spans = framed(events, hows, size_format)
    if cut is not None:
        data = data[: cut % (len(data) + 1)]  # a read may end anywhere
    pos, tokens, reason, counts = expected_scan(data, events, spans)
    found = chunkscan.scan(data, 0, LAYOUT)
    assert found == chunkscan.scan_in_python(data, 0, LAYOUT)
    assert chunkscan.scan_tokens(data, 0, LAYOUT) == packed(found)
    end, scanned_tokens, reason_start, reason_end, prompt, completion = found
    assert (end, scanned_tokens) == (pos, tokens)
    assert (data[reason_start:reason_end].decode() if reason_start >= 0 else None) == reason
    assert ((prompt, completion) if prompt >= 0 else None) == counts
    # What observe records of the same events, each read on its own, and leaves unchanged.
    taken = [e for e, span in zip(events, spans, strict=True) if span and span[1] <= end]
    assert observed(taken) == (tokens, reason, counts, True)


IN_C = pytest.mark.skipif(not chunkscan.SCAN_IN_C, reason="the pure build has the Python scan only")


@IN_C
@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.binary(max_size=300), pos=st.integers(min_value=0, max_value=320))
def test_c_and_python_agree_on_any_bytes(data: bytes, pos: int) -> None:
    assert chunkscan.scan(data, pos, LAYOUT) == chunkscan.scan_in_python(data, pos, LAYOUT)
    short = (b"d", b"\n\n", b"f", b"g", b"d")  # parts that random bytes can match
    expected = chunkscan.scan_in_python(data, pos, short)
    assert chunkscan.scan(data, pos, short) == expected
    assert chunkscan.scan_tokens(data, pos, short) == packed(expected)


@IN_C
@settings(max_examples=EXAMPLES, deadline=None)
@given(
    events=st.lists(EVENTS, max_size=8),
    noise=st.lists(st.tuples(st.integers(min_value=0, max_value=4_000), st.binary(max_size=3))),
)
def test_c_and_python_agree_on_framed_events_with_bytes_changed(
    events: list[Event], noise: list[tuple[int, bytes]]
) -> None:
    data = changed(framed(events, [], b"%x")[0], noise)
    for pos in chunk_starts(data):
        found = chunkscan.scan(data, pos, LAYOUT)
        assert found == chunkscan.scan_in_python(data, pos, LAYOUT)


def changed(data: bytes, noise: list[tuple[int, bytes]]) -> bytes:
    """`data` with each (offset, replacement) of `noise` written over it, in turn."""
    out = bytearray(data)
    for offset, replacement in noise:
        at = offset % (len(out) + 1)
        out[at : at + len(replacement)] = replacement
    return bytes(out)


def chunk_starts(data: bytes) -> set[int]:
    """0 and every position after a CRLF where a hex digit follows: where a size line may be."""
    return {0} | {m.end() for m in re.finditer(rb"\r\n(?=[0-9a-fA-F])", data)}


def _size_line(length: int, zeros: int, upper: list[bool]) -> bytes:
    """`length` in hex after `zeros` leading zeros, each letter upper case where `upper`
    says so."""
    digits = "0" * zeros + format(length, "x")
    flags = upper + [False] * (len(digits) - len(upper))
    return "".join(c.upper() if up else c for c, up in zip(digits, flags, strict=False)).encode()


@dataclass(frozen=True)
class ChunkParts:
    """A chunk as vLLM frames it, drawn: bytes before it in the read, its data's length
    and ending, its size line's leading zeros and letter cases, bytes after it."""

    prefix: bytes
    length: int
    ending: bytes
    zeros: int
    upper: list[bool]
    after: bytes

    def payload(self) -> bytes:
        return b"a" * max(0, self.length - len(self.ending)) + self.ending


CHUNKS = st.builds(
    ChunkParts,
    prefix=st.binary(max_size=4),
    length=st.one_of(st.just(0), st.integers(min_value=0, max_value=70000)),
    ending=st.sampled_from([b"\n\n", b"\n"]),
    zeros=st.integers(min_value=0, max_value=4),
    upper=st.lists(st.booleans(), min_size=8, max_size=8),
    after=st.binary(max_size=8),
)


@settings(max_examples=EXAMPLES, deadline=None)
@given(parts=CHUNKS, cut=st.integers(min_value=1, max_value=80000))
def test_a_whole_chunk_framed_as_vllm_frames_it_is_an_events(parts: ChunkParts, cut: int) -> None:
    """event_chunk, the framing the relay and the scan share: a chunk whose size line is
    1-8 hex digits (either case, leading zeros) and CRLF, whose data (2 bytes at least)
    ends in a newline, and whose CRLF follows it, gives its data's span; the same chunk
    cut short anywhere gives (-1, -1) (the parser's, until the rest arrives)."""
    payload = parts.payload()
    prefix = parts.prefix
    size = _size_line(len(payload), parts.zeros, parts.upper)
    if len(payload) < 2 or len(size) > 8:
        return
    chunk = size + b"\r\n" + payload + b"\r\n"
    start = len(prefix) + len(size) + 2
    assert chunkscan.event_chunk(prefix + chunk + parts.after, len(prefix)) == (
        start,
        start + len(payload),
    )
    short = prefix + chunk[: len(chunk) - 1 - cut % len(chunk)]
    assert chunkscan.event_chunk(short, len(prefix)) == (-1, -1)


DEFECTS = [
    "nine digits",
    "not hex",
    "extension",
    "one byte",
    "no newline",
    "size line not CRLF",
    "data not followed by CRLF",
]


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    parts=CHUNKS,
    defect=st.sampled_from(DEFECTS),
    odd=st.sampled_from([b"g", b"G", b"/", b":", b"@", b"`", b" ", b"-", b"x", b"\n"]),
)
def test_a_chunk_framed_otherwise_is_the_parsers(
    parts: ChunkParts, defect: str, odd: bytes
) -> None:
    """One thing unlike vLLM's framing, with the rest as vLLM frames it: (-1, -1). A byte
    that is no hex digit replaces one, so read as a digit it would give a size that fits."""
    payload = parts.payload()
    if defect == "one byte":
        payload = b"\n"
    if defect == "no newline":
        payload = payload[:-1] + b"a"
    size = _size_line(len(payload), parts.zeros, parts.upper)
    if len(size) > 8:
        return
    line_end, trailer = b"\r\n", b"\r\n"
    other = odd if odd not in (b"\r", b"\n") else b"x"  # neither CR nor LF
    if defect == "nine digits":
        size = b"0" * (9 - len(size)) + size
    if defect == "not hex":
        # Its last digit, and the data as long as reading that byte as the digit next to
        # its range would make it ('g' as 16, '/' as -1, ':' as 10, '@' and '`' as 9).
        misread = {b"g": 16, b"G": 16, b"/": -1, b":": 10, b"@": 9, b"`": 9}.get(odd, 0)
        sixteens = max(1, len(payload) // 16)
        payload = b"a" * (16 * sixteens + misread - 2) + b"\n\n"
        size = format(sixteens, "x").encode() + odd
    if defect == "extension":
        size += b";a=b"
    if defect == "size line not CRLF":
        line_end = b"\r" + other if parts.upper[0] else other + b"\n"
    if defect == "data not followed by CRLF":
        trailer = b"\r" + other if parts.upper[1] else other + b"\n"
    read = parts.prefix + size + line_end + payload + trailer + parts.after
    assert chunkscan.event_chunk(read, len(parts.prefix)) == (-1, -1)


@pytest.mark.skipif(
    chunkscan.SCAN_IN_C, reason="compiled, the filter's call to the scan cannot be watched"
)
def test_the_relay_hands_whole_chunks_to_the_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay's reads go to the scan: here all of a stream's chunks after its head's
    but [DONE] (the relay test below holds that scanning changes nothing, so it would
    pass with no scan at all)."""
    advanced: list[int] = []

    def watched(data: bytes, pos: int, layout: tuple[bytes, ...]) -> tuple[int, ...]:
        found = chunkscan.scan_in_python(data, pos, layout)
        advanced.append(found[0] - pos)
        return found

    def watched_tokens(data: bytes, pos: int, layout: tuple[bytes, ...]) -> int:
        packed = chunkscan.scan_tokens(data, pos, layout)
        if packed >= 0:
            advanced.append((packed & chunkscan.PACK_MASK) - pos)
        return packed

    monkeypatch.setattr(chunks, "scan", watched)
    monkeypatch.setattr(chunks, "scan_tokens", watched_tokens)
    middle = [token_event("a"), token_event("b"), finish_event("c", "stop", True)]
    middle.append(usage_event(3, 3, True))
    body, spans = framed([ROLE, *middle, DONE], [], b"%x")
    _, ex = relay_exchange(body, [], StreamPolicy(name=""))
    assert spans[1] is not None and spans[4] is not None
    assert sum(advanced) == spans[4][1] - spans[1][0]
    assert (ex.content_chunks, ex.finish_reason, ex.prompt_tokens) == (3, "stop", 3)


def test_a_negative_position_or_a_wrong_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="pos"):
        chunkscan.scan(b"", -1, LAYOUT)
    with pytest.raises((TypeError, ValueError)):
        chunkscan.scan(b"1\r\nab\r\n", 0, LAYOUT[:3])
    with pytest.raises(ValueError, match="pos"):
        chunkscan.scan_tokens(b"", -1, LAYOUT)
    with pytest.raises((TypeError, ValueError)):
        chunkscan.scan_tokens(b"1\r\nab\r\n", 0, LAYOUT[:3])


def test_the_filter_records_what_it_skips_once_it_knows_the_streams_head() -> None:
    ex = Exchange("r", 0.0)
    chunk_filter = ChunkFilter(ex, True, None, 1)
    events = [token_event("a"), token_event(""), finish_event("b", "stop", True)]
    events.append(usage_event(8, 2, True))
    chunks = b"".join(b"%x\r\n%b\r\n" % (len(e.data), e.data) for e in events)
    assert chunk_filter.skips_common
    assert chunk_filter.skip_common(chunks, 0) == 0  # no chunk of this stream seen yet
    assert chunk_filter.observe(ROLE.data) == ROLE.data
    assert chunk_filter.skip_common(chunks + b"0\r\n\r\n", 0) == len(chunks)
    assert (ex.content_chunks, ex.gap_count, ex.finish_reason) == (2, 1, "stop")
    assert (ex.prompt_tokens, ex.completion_tokens) == (8, 2)


def test_a_guard_that_needs_more_than_a_text_or_an_endpoints_filter_skips_nothing() -> None:
    """A repetition guard counts every word (a guard without one skips what it passes:
    tests/proxy/test_guard_passes.py); an endpoint's filter (TGI's, Anthropic's) rewrites
    or reads every event in its own `observe`."""
    ex = Exchange("r", 0.0)
    repetition = GuardSpec(stop=("x",), repetition=RepetitionGuard(2, 3))
    assert not ChunkFilter(ex, True, repetition, 1).skips_common
    assert not TgiStreamFilter(ex, None, None, "", None).skips_common
    assert not NamedEventFilter(ex, None, None).skips_common


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(TEXTS, min_size=1, max_size=20),
    reason=REASONS,
    fingerprint=st.booleans(),
    hows=st.lists(st.sampled_from(["own", "own", "with_next", "split"]), max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=12),
    size_format=SIZE_FORMATS,
)
def test_a_relay_that_scans_sends_and_records_what_one_reading_every_event_does(
    texts: list[str],
    reason: str,
    fingerprint: bool,
    hows: list[str],
    cuts: list[int],
    size_format: bytes,
) -> None:
    events = [ROLE, *map(token_event, texts[:-1]), finish_event(texts[-1], reason, fingerprint)]
    events += [usage_event(8, len(texts), fingerprint), DONE]
    body, _ = framed(events, hows, size_format)
    policy = StreamPolicy(name="")
    sent, ex = relay_exchange(body, cuts, policy)
    sent_reading, ex_reading = relay_exchange(body, cuts, policy, skips_common=False)
    after_head = sent.index(b"\r\n\r\n")  # the same framing (the heads' dates may differ)
    assert sent[after_head:] == sent_reading[sent_reading.index(b"\r\n\r\n") :]
    assert dechunk(sent)[0] == b"".join(e.data for e in events)
    records = ("content_chunks", "gap_count", "finish_reason", "prompt_tokens", "completion_tokens")
    assert [getattr(ex, name) for name in records] == [
        getattr(ex_reading, name) for name in records
    ]
    assert ex.content_chunks == sum(1 for text in texts if text)
    assert (ex.finish_reason, ex.prompt_tokens) == (reason, 8)


TRANSCRIPTS = Path("/work/shared/vllm-transcripts")


def transcript_streams() -> list[tuple[str, list[bytes]]]:
    """Every SSE stream of vLLM 0.26's transcripts: its section and its events."""
    streams = []
    for path in sorted(TRANSCRIPTS.glob("*.txt")):
        section, events = path.name, []
        for line in path.read_text().splitlines():
            if line.startswith("### "):
                section = f"{path.name} {line[4:]}"
            if line.startswith("data: "):
                events.append(line.encode() + b"\n\n")
            elif events and line.startswith("---"):
                streams.append((section, events))
                events = []
    return streams


@pytest.mark.skipif(not TRANSCRIPTS.is_dir(), reason="no vLLM transcripts here")
def test_vllms_own_streams_are_scanned_as_observe_reads_them() -> None:
    """Each of the real streams, a chunk an event, fed as `feed_chunks` feeds it: the scan
    where it may, `observe` for the rest. The records equal those of `observe` reading
    every event, and in the plain streams the scan takes everything from the first token
    chunk after the head is known to [DONE]."""
    streams = transcript_streams()
    assert len(streams) >= 5
    scanned_whole = 0
    for section, events in streams:
        chat = b'"chat.completion.chunk"' in events[0]
        chunks = [b"%x\r\n%b\r\n" % (len(e), e) for e in events]
        data = b"".join(chunks) + b"0\r\n\r\n"
        starts = [sum(map(len, chunks[:i])) for i in range(len(chunks) + 1)]
        scanning, reading = Exchange("a", 0.0), Exchange("b", 0.0)
        scanning.chat = reading.chat = chat
        scan_filter = ChunkFilter(scanning, chat, None, 2)
        read_filter = ChunkFilter(reading, chat, None, 2)
        i = 0
        taken = 0
        while i < len(events):
            if scanning.finish_reason is None:
                end = scan_filter.skip_common(data, starts[i])
                while starts[i] < end:
                    i += 1
                    taken += 1
                if i == len(events):
                    break
            assert scan_filter.observe(events[i]) == events[i]
            i += 1
        for event in events:
            read_filter.observe(event)
        records = ("content_chunks", "finish_reason", "prompt_tokens", "completion_tokens")
        assert [getattr(scanning, r) for r in records] == [getattr(reading, r) for r in records], (
            section
        )
        # Only the head's chunk (the role chunk in chat) and [DONE] were read one by one.
        scanned_whole += taken == len(events) - 2
    assert scanned_whole >= 3
