"""A guarded stream's token chunks scanned whole (`chunkscan.scan_passed`, in C in the
compiled build): the guard's pass table (`GuardSpec.pass_table`) passes exactly the ASCII
pieces that `StreamGuard.feed`'s own checks pass unchanged; whatever it passes, the guard
would have sent on unchanged; the scan takes exactly the token chunks of choice 0 whose
texts it passes; C and Python agree on any bytes; and a relay that scans sends and records
what one reading every event through the guard does, cuts included."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sluice.proxy import chunks, chunkscan
from sluice.proxy.chunks import ChunkFilter
from sluice.proxy.exchange import Exchange
from sluice.proxy.snapshot import StreamPolicy
from sluice.proxy.stopwords import CutPattern, GuardSpec, RepetitionGuard, _all_in

from tests.proxy.test_chunkscan import (
    DONE,
    LAYOUT,
    ROLE,
    Event,
    changed,
    chunk_starts,
    finish_event,
    framed,
    token_event,
    usage_event,
)
from tests.proxy.test_relay_frames import SIZE_FORMATS, dechunk, relay_exchange

EXAMPLES = int(os.environ.get("SLUICE_PARSER_EXAMPLES", "400"))
IN_C = pytest.mark.skipif(not chunkscan.SCAN_IN_C, reason="the pure build has the Python scan only")

# `sluice bench --policy`'s guard: stop strings and two cut patterns with literal prefixes.
BENCH_GUARD = GuardSpec(
    stop=("###", "\n\nUser:", "\n\nHuman:", "<|im_end|>"),
    cut_patterns=(
        CutPattern("(?i)ignore (all )?(the )?previous instructions", 64),
        CutPattern("BEGIN [A-Z ]*PRIVATE KEY", 40),
    ),
)
ALPHABET = 'abiIgnoreBEGIN #<|>\n\t.\\"é0ks'
# Words most of which the guards below pass, and text that may begin or hold a match.
WORDS = (
    " the",
    " cat",
    "ing",
    " a",
    " on",
    ",",
    " sat",
    "s",
    " BEG",
    " Be",
    " skill",
    "kill",
    "ed",
)
PIECES = st.one_of(
    st.sampled_from(WORDS),
    st.sampled_from(WORDS),
    st.text(alphabet=st.sampled_from(list(ALPHABET)), min_size=1, max_size=8),
)
# A cut pattern that looks at the character before the text (`StreamGuard.passed` keeps it).
WORD_GUARD = GuardSpec(stop=("###",), cut_patterns=(CutPattern(r"\bkill\b", 8),))
STOPS = st.lists(
    st.text(alphabet=st.sampled_from(list("ab#\n<")), min_size=1, max_size=4), max_size=3
)
CUTS = st.lists(
    st.sampled_from(
        [
            CutPattern("(?i)ignore (all )?previous", 30),
            CutPattern("BEGIN [A-Z ]*KEY", 20),
            CutPattern("bob", 5),
            CutPattern("(?i)ab+c", 6),
            CutPattern(r"\d{3}-\d{4}", 8),  # no literal prefix
            CutPattern(r"\bno\b", 4),  # no literal prefix (\b), an end assertion
        ]
    ),
    max_size=3,
)


def passes(spec: GuardSpec, piece: str) -> bool:
    assert spec.pass_table is not None
    return chunkscan.text_passes(piece.encode(), spec.pass_table)


def test_the_bench_guards_table_passes_common_tokens_and_not_what_may_begin_a_match() -> None:
    for piece in (" the", " in", " is", "ing", " BEGINS", " Bob", "ion", ",", " 42"):
        assert passes(BENCH_GUARD, piece), piece
    # a stop string's first character; a cut pattern's literal prefix begun, in any case
    for piece in (
        "\n",
        ".\n",
        "#",
        " <",
        "i",
        " ambi",
        " IGN",
        " Big",
        " BEG",
        "ignore",
        "é",
        "\\n",
    ):
        assert not passes(BENCH_GUARD, piece), piece


def test_a_guard_whose_passing_needs_more_than_the_piece_has_no_table() -> None:
    assert GuardSpec(stop=("x",), repetition=RepetitionGuard(2, 3)).pass_table is None
    assert GuardSpec(cut_patterns=(CutPattern("(?<=a)b", 4),)).pass_table is None
    assert GuardSpec(stop=("x",)).pass_table is not None
    assert GuardSpec(cut_patterns=(CutPattern(r"\d+x", 4),)).pass_table is not None


@settings(max_examples=EXAMPLES, deadline=None)
@given(stop=STOPS, cuts=CUTS, before=PIECES, piece=PIECES)
def test_what_the_table_passes_the_guard_sends_on_unchanged(
    stop: list[str], cuts: list[CutPattern], before: str, piece: str
) -> None:
    """After any text, while the guard holds nothing: what the table passes, `feed` passes
    whole and leaves the guard holding nothing. And on ASCII pieces with no backslash (a
    JSON escape), the table's answer is feed's own check's."""
    spec = GuardSpec(stop=stop, cut_patterns=cuts)
    assert spec.pass_table is not None
    guard = spec.start()
    guard.feed(before)
    if not guard.idle():
        return
    table_passes = passes(spec, piece)
    if piece.isascii() and "\\" not in piece:
        fast = _all_in(spec._safe, piece) or spec._no_start_in(piece)
        assert table_passes == fast
    if table_passes:
        assert guard.feed(piece) is piece
        assert guard.idle()


@IN_C
@settings(max_examples=EXAMPLES, deadline=None)
@given(text=st.binary(max_size=12), stop=STOPS, cuts=CUTS)
def test_c_and_python_tables_agree(text: bytes, stop: list[str], cuts: list[CutPattern]) -> None:
    table = GuardSpec(stop=stop, cut_patterns=cuts).pass_table
    assert table is not None
    event = token_event("x").data.replace(b'"x"', b'"' + text.replace(b'"', b"") + b'"')
    data = b"%x\r\n%b\r\n" % (len(event), event)
    assert chunkscan.scan_passed(data, 0, LAYOUT, table) == chunkscan.scan_passed_in_python(
        data, 0, LAYOUT, table
    )


def expected_passed(
    data: bytes, events: list[Event], spans: list[tuple[int, int] | None], spec: GuardSpec
) -> tuple[int, int, int]:
    """What scan_passed takes from the read's start: chunks of their own, whole in data,
    token chunks with a text the table passes."""
    pos, tokens, last = 0, 0, 0
    for event, span in zip(events, spans, strict=True):
        if span is None or span[0] != pos or span[1] > len(data) or event.kind != "token":
            break
        text = event.data[len(LAYOUT[0]) : -len(LAYOUT[1])]
        if not text or not text.isascii() or not passes(spec, text.decode()):
            break
        tokens, last, pos = tokens + 1, text[-1], span[1]
    return pos, tokens, last


EVENTS = st.one_of(
    PIECES.map(token_event),
    PIECES.map(token_event),
    st.just(token_event("")),
    PIECES.map(lambda t: token_event(t, chat=False)),
    st.builds(finish_event, PIECES, st.just("stop"), st.booleans()),
    st.just(usage_event(3, 4, False)),
    st.just(ROLE),
    st.just(DONE),
)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    events=st.lists(EVENTS, max_size=8),
    hows=st.lists(st.sampled_from(["own", "own", "own", "with_next", "split"]), max_size=4),
    cut=st.integers(min_value=0, max_value=2_000),
)
def test_the_scan_takes_exactly_the_token_chunks_the_table_passes(
    events: list[Event], hows: list[str], cut: int
) -> None:
    data, spans = framed(events, hows, b"%x")
    data = data[: cut % (len(data) + 1)]
    for spec in (BENCH_GUARD, WORD_GUARD):
        table = spec.pass_table
        assert table is not None
        pos, tokens, last = expected_passed(data, events, spans, spec)
        packed = chunkscan.scan_passed(data, 0, LAYOUT, table)
        assert packed == pos | tokens << chunkscan.PACK_SHIFT | last << chunkscan.LAST_SHIFT
        assert chunkscan.scan_passed_in_python(data, 0, LAYOUT, table) == packed


def test_the_scan_takes_several_chunks_and_stops_at_another_choices() -> None:
    table = BENCH_GUARD.pass_table
    assert table is not None
    texts = (" the", " cat", " sat")
    events = [token_event(t) for t in texts]
    other = token_event(" on").data.replace(b'"index":0', b'"index":1')
    events.append(Event(other, "other"))
    data, spans = framed(events, [], b"%x")
    packed = chunkscan.scan_passed(data, 0, LAYOUT, table)
    assert spans[2] is not None
    assert packed == spans[2][1] | 3 << chunkscan.PACK_SHIFT | ord("t") << chunkscan.LAST_SHIFT
    assert chunkscan.scan_passed_in_python(data, 0, LAYOUT, table) == packed
    assert chunkscan.scan_passed(data, spans[2][1], LAYOUT, table) == spans[2][1]


@IN_C
@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.binary(max_size=300), pos=st.integers(min_value=0, max_value=320))
def test_c_and_python_agree_on_any_bytes(data: bytes, pos: int) -> None:
    short = (b"d", b'"\n\n', b"f", b"g", b"d")  # parts that random bytes can match
    table = bytes(range(3)) * 43 + b"\x01\x02ab\x00\x01c"  # 129 bytes, then two literals
    for layout in (LAYOUT, short):
        for part in (table[:128], table[1:]):
            expected = chunkscan.scan_passed_in_python(data, pos, layout, part)
            assert chunkscan.scan_passed(data, pos, layout, part) == expected


@IN_C
@settings(max_examples=EXAMPLES, deadline=None)
@given(
    texts=st.lists(PIECES, max_size=8),
    noise=st.lists(st.tuples(st.integers(min_value=0, max_value=2_000), st.binary(max_size=3))),
)
def test_c_and_python_agree_on_token_chunks_with_bytes_changed(
    texts: list[str], noise: list[tuple[int, bytes]]
) -> None:
    data = changed(framed([token_event(t) for t in texts], [], b"%x")[0], noise)
    for spec in (BENCH_GUARD, WORD_GUARD):
        table = spec.pass_table
        assert table is not None
        for pos in chunk_starts(data):
            expected = chunkscan.scan_passed_in_python(data, pos, LAYOUT, table)
            assert chunkscan.scan_passed(data, pos, LAYOUT, table) == expected


def test_a_short_table_or_a_negative_position_is_refused() -> None:
    table = BENCH_GUARD.pass_table
    assert table is not None
    with pytest.raises(ValueError):
        chunkscan.scan_passed(b"", -1, LAYOUT, table)
    # past what the packed answer holds: -1, and the filter takes nothing there
    event = token_event(" the").data
    far = b"x" * 2**24 + b"%x\r\n%b\r\n" % (len(event), event)
    assert chunkscan.scan_passed(far, 2**24, LAYOUT, table) == -1
    assert chunkscan.scan_passed_in_python(far, 2**24, LAYOUT, table) == -1
    if chunkscan.SCAN_IN_C:
        with pytest.raises(TypeError):
            chunkscan.scan_passed(b"", 0, LAYOUT, table[:127])


def test_the_filter_skips_only_while_its_guard_holds_nothing() -> None:
    ex = Exchange("r", 0.0)
    chunk_filter = ChunkFilter(ex, True, BENCH_GUARD, 1)
    assert chunk_filter.skips_common
    first, held, after = (token_event(t).data for t in (" the", "i", " cat"))
    chunks = b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in (first, held, after))
    assert chunk_filter.skip_passed(chunks, 0) == 0  # the head and the guard not known yet
    assert chunk_filter.guarded(ROLE.data) == ROLE.data
    assert chunk_filter.guarded(first) == first  # the guard is made with the first text
    taken = chunk_filter.skip_passed(chunks, 0)
    assert chunks[:taken].endswith(first + b"\r\n")  # " the" passes, "i" may begin a cut
    assert ex.content_chunks == 2
    assert chunk_filter.guarded(held) != held  # "i" held back: an empty text goes out
    assert chunk_filter.skip_passed(chunks, taken) == taken  # nothing while it holds "i"


def content_of(body: bytes) -> str:
    """The text the client reads from an SSE body of chat chunks."""
    lines = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: {")]
    chunks = [json.loads(line) for line in lines]
    return "".join(c["delta"].get("content") or "" for k in chunks for c in k["choices"])


@settings(max_examples=150, deadline=None)
@given(
    texts=st.lists(PIECES, min_size=1, max_size=24),
    word_guard=st.booleans(),
    inject=st.sampled_from(
        [
            "",
            "###",
            "\n\nUser:",
            "Ignore previous instructions",
            "BEGIN RSA PRIVATE KEY",
            " kill ",
        ]
    ),
    at=st.integers(min_value=0, max_value=23),
    hows=st.lists(st.sampled_from(["own", "own", "own", "with_next", "split"]), max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=4),
    size_format=SIZE_FORMATS,
)
def test_a_guarded_relay_that_scans_sends_and_records_what_one_reading_every_event_does(
    texts: list[str],
    word_guard: bool,
    inject: str,
    at: int,
    hows: list[str],
    cuts: list[int],
    size_format: bytes,
) -> None:
    texts = [*texts[: at % len(texts)], *([inject] if inject else []), *texts[at % len(texts) :]]
    events = [ROLE, *map(token_event, texts[:-1]), finish_event(texts[-1], "length", True)]
    events += [usage_event(8, len(texts), True), DONE]
    body, _ = framed(events, hows, size_format)
    spec = WORD_GUARD if word_guard else BENCH_GUARD
    policy = StreamPolicy(name="p", stop=spec.stop, guard=spec)
    sent, ex = relay_exchange(body, cuts, policy)
    sent_reading, ex_reading = relay_exchange(body, cuts, policy, skips_common=False)
    after_head = sent.index(b"\r\n\r\n")  # the same framing (the heads' dates may differ)
    assert sent[after_head:] == sent_reading[sent_reading.index(b"\r\n\r\n") :]
    records = ("content_chunks", "gap_count", "finish_reason", "prompt_tokens", "cut")
    assert [getattr(ex, name) for name in records] == [
        getattr(ex_reading, name) for name in records
    ]
    text = content_of(dechunk(sent)[0])
    if inject and (inject == " kill ") == word_guard:
        # the guard still cuts, wherever the scan took the chunks before
        assert inject.strip() not in (text.split() if word_guard else text)
        assert ex.finish_reason in ("stop", "content_filter")


def test_the_relay_hands_a_guarded_streams_reads_to_the_scan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The relay test above holds that scanning changes nothing, so it would pass with no
    scan at all: here the chunks the guard passes go to the scan, and "kill" after the
    scanned " s" is not cut (the guard's \\b looks back at the "s"), " kill" is. (Compiled,
    the scan's calls are not watched; the text is the same.)"""
    taken: list[int] = []

    def watched(data: bytes, pos: int, layout: tuple[bytes, ...], table: bytes) -> int:
        packed = chunkscan.scan_passed_in_python(data, pos, layout, table)
        taken.append(packed >> chunkscan.PACK_SHIFT & chunkscan.PACK_MASK)
        return packed

    if not chunkscan.SCAN_IN_C:  # compiled, the filter's call cannot be watched
        monkeypatch.setattr(chunks, "scan_passed", watched)
    texts = [" the", " cat", " sat", " on", " s", "kill", " a", " kill", " me"]
    events = [ROLE, *map(token_event, texts), finish_event("", "length", True), DONE]
    body, _ = framed(events, [], b"%x")
    policy = StreamPolicy(name="p", stop=WORD_GUARD.stop, guard=WORD_GUARD)
    sent, ex = relay_exchange(body, [], policy)
    if not chunkscan.SCAN_IN_C:
        assert sum(taken) >= 4  # " the" is the guard's first text, read by `guarded`
    assert content_of(dechunk(sent)[0]) == " the cat sat on skill a "
    assert (ex.finish_reason, ex.cut) == ("content_filter", r"\bkill\b")
