"""The stream guard: the client's text must not depend on how the upstream chunks it."""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Sequence

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from sluice.proxy.exchange import Exchange
from sluice.proxy.nonstream import guard_completion
from sluice.proxy.stopwords import CutPattern, GuardResult, GuardSpec, RepetitionGuard, _all_in

STOP_POOL = ("###", "。\n\n用户:", "ab", "b", "abc", "🙂🙃", "\n\nUser:", "a#")
CUT_POOL = (
    CutPattern(r"(?i)ignore (all )?previous", 21),
    CutPattern(r"\bkill\b", 8),
    CutPattern(r"a[bc]{1,3}d", 5),
    CutPattern(r"x.y", 3),
    CutPattern(r"foo$", 6),
    CutPattern(r"(?<=qq)zz", 2),
    CutPattern(r"用户:\d", 4),
    CutPattern(r"bc(?!de)", 4),
    CutPattern(r"ab#c|b#", 4),  # a complete match inside an earlier partial one
)
ALPHABET = "ab#c 。\n用户:🙂🙃xyé1dfoqzkil"
WORDS = (
    "ignore previous",
    "IGNORE all previous",
    " kill ",
    "skill",
    " foo",
    "qqzz",
    "abcd",
    "x y",
    "ab#c",
)
LOOPS = ("a b ", "I am. ", "la ", "x y z ")


def run(spec: GuardSpec, pieces: Sequence[str]) -> tuple[list[str], GuardResult]:
    """Feeds `pieces`, checking at every step that the guard holds back at most
    max_holdback characters and emits nothing once a match ended the text."""
    guard, outs, fed = spec.start(), [], ""
    for piece in pieces:
        was_done = guard.finish_reason is not None
        out = guard.feed(piece)
        fed += piece
        outs.append(out)
        if was_done:
            assert out == ""
        if guard.finish_reason is None:
            assert fed.startswith("".join(outs))
            assert len(fed) - len("".join(outs)) <= spec.max_holdback
    outs.append(guard.finish())
    assert guard.finish() == ""
    return outs, GuardResult("".join(outs), guard.finish_reason, guard.matched)


def chunk(text: str, cuts: Sequence[int]) -> list[str]:
    bounds = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def reference(
    text: str,
    stops: Sequence[str] = (),
    cuts: Sequence[CutPattern] = (),
    rep: RepetitionGuard | None = None,
) -> GuardResult:
    """The earliest match in the whole text, ranked as the module docstring says."""
    found: list[tuple[int, int, str, str]] = []
    for s in stops:
        if (i := text.find(s)) >= 0:
            found.append((i, len(s) - 100, s, "stop"))  # shortest stop string first
    for rank, cut in enumerate(cuts, 1):
        if (m := regex.search(cut.pattern, text)) is not None:
            found.append((m.start(), rank, cut.pattern, "content_filter"))
    if rep is not None and (r := reference_loop(text, rep)) is not None:
        found.append((r[0], 999, f"repetition:{r[1]}", "stop"))
    if not found:
        return GuardResult(text, None, None)
    pos, _, name, reason = min(found)
    return GuardResult(text[:pos], reason, name)


def reference_loop(text: str, rep: RepetitionGuard) -> tuple[int, int] | None:
    """(end of the word that completes the first loop, its period), by brute force."""
    spans = list(re.finditer(r"\S+", text))
    words = [m.group() for m in spans]
    for i in range(len(words)):
        for p in range(1, rep.ngram + 1):
            n = p * rep.repeats
            if i + 1 >= n and words[i + 1 - n : i + 1] == words[i + 1 - p : i + 1] * rep.repeats:
                return spans[i].end(), p
    return None


@st.composite
def texts(draw: st.DrawFn, fragments: Sequence[str]) -> str:
    pieces = st.one_of(
        st.text(alphabet=ALPHABET, max_size=4),
        st.sampled_from(fragments),
        st.sampled_from([f[:i] for f in fragments for i in range(1, len(f))] or [""]),
    )
    return "".join(draw(st.lists(pieces, max_size=14)))


@st.composite
def stop_cases(draw: st.DrawFn) -> tuple[list[str], str, list[int]]:
    stops = draw(st.lists(st.sampled_from(STOP_POOL), min_size=1, max_size=4, unique=True))
    text = draw(texts(stops))
    return stops, text, draw(st.lists(st.integers(0, 10_000), max_size=10))


@st.composite
def cut_cases(draw: st.DrawFn) -> tuple[list[CutPattern], str, list[int]]:
    cuts = draw(st.lists(st.sampled_from(CUT_POOL), min_size=1, max_size=3, unique=True))
    text = draw(texts(WORDS))
    return cuts, text, draw(st.lists(st.integers(0, 10_000), max_size=10))


def longest_stop_prefix_suffix(text: str, stops: Sequence[str]) -> str:
    for i in range(len(text)):
        if any(s.startswith(text[i:]) and s != text[i:] for s in stops):
            return text[i:]
    return ""


# -- stop strings ----------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(stop_cases())
def test_stop_strings_any_chunking_equals_reference(case: tuple[list[str], str, list[int]]) -> None:
    stops, text, cuts = case
    spec = GuardSpec(stops)
    expected = reference(text, stops)
    assert run(spec, chunk(text, cuts))[1] == expected
    assert run(spec, list(text))[1] == expected
    assert run(spec, [text])[1] == expected
    assert spec.apply(text) == expected


@settings(max_examples=300, deadline=None)
@given(stop_cases())
def test_holds_back_only_a_possible_stop_prefix(case: tuple[list[str], str, list[int]]) -> None:
    stops, text, cuts = case
    guard, fed, sent = GuardSpec(stops).start(), "", ""
    for piece in chunk(text, cuts):
        sent += guard.feed(piece)
        fed += piece
        if guard.finish_reason is not None:
            break
        assert fed == sent + longest_stop_prefix_suffix(fed, stops)


def test_the_documented_example() -> None:
    guard = GuardSpec(["###"]).start()
    assert [guard.feed(p) for p in ("Hello", " #", "#", "x")] == ["Hello", " ", "", "##x"]
    assert guard.feed("##") == ""
    assert guard.finish() == "##"
    assert guard.finish_reason is None


@pytest.mark.parametrize(
    ("stops", "pieces", "text", "matched"),
    [
        (["\n\nUser:"], ["Hi.\n", "\nUs", "er", ":", " more"], "Hi.", "\n\nUser:"),
        (["。\n\n用户:"], ["好的", "。", "\n", "\n用", "户", ":问"], "好的", "。\n\n用户:"),
        (["🙂🙃"], ["ok 🙂", "🙃 no"], "ok ", "🙂🙃"),
        (["ab", "b"], ["c", "a", "b"], "c", "ab"),
        (["ab", "b"], ["cb"], "c", "b"),
        (["ab", "abc"], ["x", "ab", "c"], "x", "ab"),
        (["abcd", "bc"], ["zab", "c", "d"], "z", "abcd"),  # "bc" is complete first
        (["abcd", "bc"], ["zab", "c", "x"], "za", "bc"),
    ],
)
def test_stop_examples(stops: list[str], pieces: list[str], text: str, matched: str) -> None:
    _outs, result = run(GuardSpec(stops), pieces)
    assert result == GuardResult(text, "stop", matched)
    assert GuardSpec(stops).apply("".join(pieces)) == result


def test_feeds_after_a_match_return_nothing() -> None:
    guard = GuardSpec(["###"]).start()
    assert guard.feed("a###b") == "a"
    assert (guard.feed("more"), guard.finish(), guard.finish_reason) == ("", "", "stop")


def test_fast_path_returns_the_piece_itself() -> None:
    piece = "".join(["wo", "rd"])  # not interned
    for spec in (GuardSpec(), GuardSpec(["###"], [CutPattern("(?i)ignore", 6)])):
        assert spec.start().feed(piece) is piece
    assert GuardSpec(["###"]).start().feed("日本語") == "日本語"


def test_streams_sharing_a_spec_are_independent() -> None:
    spec = GuardSpec(["###"])
    a, b = spec.start(), spec.start()
    assert (a.feed("x#"), b.feed("y"), a.feed("##"), b.feed("##z")) == ("x", "y", "", "##z")
    assert (a.finish_reason, b.finish_reason) == ("stop", None)


# -- cut patterns ----------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(cut_cases())
def test_cut_patterns_any_chunking_equals_reference(
    case: tuple[list[CutPattern], str, list[int]],
) -> None:
    cuts, text, bounds = case
    spec = GuardSpec(cut_patterns=cuts)
    expected = reference(text, cuts=cuts)
    assert run(spec, chunk(text, bounds))[1] == expected
    assert run(spec, list(text))[1] == expected
    assert spec.apply(text) == expected


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(STOP_POOL), max_size=3, unique=True),
    st.lists(st.sampled_from(CUT_POOL), max_size=2, unique=True),
    st.integers(1, 3),
    st.integers(2, 3),
    texts((*WORDS, *STOP_POOL, *LOOPS, *LOOPS)),
    st.lists(st.integers(0, 10_000), max_size=10),
)
def test_all_matchers_together_equal_reference(
    stops: list[str], cuts: list[CutPattern], ngram: int, repeats: int, text: str, b: list[int]
) -> None:
    rep = RepetitionGuard(ngram, repeats)
    spec = GuardSpec(stops, cuts, rep)
    expected = reference(text, stops, cuts, rep)
    assert run(spec, chunk(text, b))[1] == expected
    assert run(spec, list(text))[1] == expected
    assert spec.apply(text) == expected


def test_cut_releases_text_before_the_match() -> None:
    spec = GuardSpec(cut_patterns=[CutPattern(r"(?i)ignore (all )?previous instructions", 64)])
    outs, result = run(spec, ["Sure. ", "Ign", "ore all prev", "ious instructions", " now"])
    assert outs[:2] == ["Sure. ", ""]
    assert result == GuardResult("Sure. ", "content_filter", spec.cut_patterns[0].pattern)


@pytest.mark.parametrize(
    ("pieces", "result"),
    [
        (["xab", "c"], GuardResult("x", "stop", "abc")),
        (["xab", "d"], GuardResult("x", "content_filter", "ab")),
        (["xa", "b#", "c"], GuardResult("x", "content_filter", "ab")),
    ],
)
def test_at_one_start_stop_strings_win(pieces: list[str], result: GuardResult) -> None:
    spec = GuardSpec(["abc"], [CutPattern("ab", 2), CutPattern("b#", 2)])
    assert run(spec, pieces)[1] == result
    assert spec.apply("".join(pieces)) == result


def test_a_complete_match_waits_for_an_earlier_partial_one() -> None:
    spec = GuardSpec(cut_patterns=[CutPattern("ab#c|b#", 4)])
    assert run(spec, ["zab#", "c"])[1].text == "z"
    assert run(spec, ["zab#", "d"])[1].text == "za"


def test_cut_holdback_is_bounded_by_max_len() -> None:
    spec = GuardSpec(cut_patterns=[CutPattern(r"a.*z", 10)])
    guard, sent = spec.start(), ""
    for i, ch in enumerate("a" + "b" * 20 + "z"):
        sent += guard.feed(ch)
        assert i + 1 - len(sent) <= 9
    assert sent + guard.finish() == "a" + "b" * 20 + "z"  # the match would be 22 > 10 chars


def test_cut_assertions_wait_for_what_follows() -> None:
    kill = GuardSpec(cut_patterns=[CutPattern(r"\bkill\b", 8)])
    assert kill.apply("skill, kills").finish_reason is None
    assert run(kill, ["no ", "kill", "s"])[1].text == "no kills"
    assert run(kill, ["no ", "kill", "!"])[1] == GuardResult("no ", "content_filter", r"\bkill\b")
    # a match found only when the text ends still cuts what finish() would release
    guard = kill.start()
    assert (guard.feed("we kill"), guard.finish(), guard.finish_reason) == (
        "we ",
        "",
        "content_filter",
    )
    foo = GuardSpec(cut_patterns=[CutPattern(r"foo$", 4)])
    assert run(foo, ["a foo", "d"])[1].text == "a food"
    assert run(foo, ["a foo"])[1] == GuardResult("a ", "content_filter", "foo$")


def test_cut_lookbehind_sees_released_text() -> None:
    spec = GuardSpec(cut_patterns=[CutPattern(r"(?<=secret: )\w+", 16)])
    assert run(spec, list("the secret: hunter2 ok"))[1].text == "the secret: "
    assert run(spec, list("no secret here"))[1].text == "no secret here"


# -- repetition --------------------------------------------------------------------------


def test_repetition_cuts_the_loop_and_keeps_what_came_before() -> None:
    spec = GuardSpec(repetition=RepetitionGuard(ngram=3, repeats=4))
    text = "Intro: x y. I am. I am. I am. I am. I am. I am. tail"
    _outs, result = run(spec, list(text))
    assert result == GuardResult("Intro: x y. I am. I am. I am. I am.", "stop", "repetition:2")
    assert spec.apply(text) == result
    assert spec.apply("x y y y y") == GuardResult("x y y y y", "stop", "repetition:1")
    assert spec.apply("x y y y").finish_reason is None


def test_repetition_is_incremental() -> None:
    spec = GuardSpec(repetition=RepetitionGuard(ngram=8, repeats=4))
    guard, start = spec.start(), time.perf_counter()
    for i in range(20_000):
        guard.feed(f" w{i}")
    for _ in range(20_000):
        guard.feed("x")  # one long word: no quadratic re-joining
    assert guard.finish_reason is None
    assert time.perf_counter() - start < 2.0


# -- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stop": [""]}, "non-empty"),
        ({"stop": "###"}, "not a string"),
        ({"cut_patterns": [CutPattern("a(b", 8)]}, "invalid regular expression"),
        ({"cut_patterns": [CutPattern("a*", 8)]}, "empty string"),
        ({"cut_patterns": [CutPattern(r"\b", 8)]}, "empty string"),
        ({"cut_patterns": [CutPattern("abc", 0)]}, "max_len"),
        ({"cut_patterns": [CutPattern("(?r)abc", 8)]}, "reverse"),
        ({"repetition": RepetitionGuard(0, 3)}, "ngram"),
        ({"repetition": RepetitionGuard(2, 1)}, "repeats"),
    ],
)
def test_invalid_specs_are_rejected(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GuardSpec(**kwargs)  # type: ignore[arg-type]


def test_max_holdback() -> None:
    assert GuardSpec().max_holdback == 0
    assert GuardSpec(["###", "\n\nUser:"], [CutPattern("x", 4)]).max_holdback == 6


# -- the literal-prefix fast path -------------------------------------------------------

LITERAL_POOL = (
    CutPattern(r"(?i)ignore (all )?previous", 21),
    CutPattern(r"BEGIN [A-Z ]*KEY", 16),
    CutPattern(r"ab#c|b#", 4),  # alternation: more than one way to start
    CutPattern(r"bc(?!de)", 4),
    CutPattern(r"foo$", 6),
)


@settings(max_examples=400, deadline=None)
@given(
    cuts=st.lists(st.sampled_from(LITERAL_POOL), min_size=1, max_size=3, unique=True),
    text=st.lists(
        st.one_of(
            st.text(alphabet="abcdefgiIlnorspBEGINKY# ", max_size=5),
            st.sampled_from(
                ["ignore previous", "IGNORE all previous", "BEGIN RSA KEY", "b#", "bcd", "foo"]
            ),
        ),
        max_size=12,
    ).map("".join),
    cuts_at=st.lists(st.integers(0, 10_000), max_size=10),
)
def test_literal_prefix_fast_path_equals_reference(
    cuts: list[CutPattern], text: str, cuts_at: list[int]
) -> None:
    spec = GuardSpec(cut_patterns=cuts)
    _, result = run(spec, chunk(text, cuts_at))
    assert result == reference(text, cuts=cuts)


def test_literal_prefix_fast_path_skips_words_that_only_share_a_first_letter() -> None:
    spec = GuardSpec(cut_patterns=[CutPattern(r"(?i)ignore (all )?previous", 32)])
    assert spec._no_start_in(" thinking it is fine")
    assert not spec._no_start_in(" and ign")  # a match may start: held back
    assert not spec._no_start_in("ignore ")
    alternation = GuardSpec(cut_patterns=[CutPattern(r"ab#c|b#", 4)])
    assert not alternation._no_start_in("xb#")  # no literal-prefix proof with `|`


@given(st.sets(st.characters(max_codepoint=300), max_size=20), st.text(max_size=30))
def test_the_all_safe_check_is_issuperset(chars: set[str], piece: str) -> None:
    """`_all_in` (the compiled loop the guard asks before scanning) is set.issuperset."""
    assert _all_in(chars, piece) == chars.issuperset(piece)
    assert _all_in(chars | set(piece), piece)


@pytest.mark.parametrize("chat", [True, False])
def test_a_cut_whole_answer_keeps_no_token_details(chat: bool) -> None:
    """vLLM's logprobs and token ids (return_token_ids) cover the whole generated text: on
    a choice the guard cut they would give the client what was cut."""
    text = "keep this ### drop that"
    holder = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
    choice = {"index": 0, **holder, "logprobs": {"content": []}, "token_ids": [1, 2, 3]}
    untouched = {"index": 1, **holder, "logprobs": {"content": []}, "token_ids": [4]}
    untouched = {**untouched, **({"message": {"content": "fine"}} if chat else {"text": "fine"})}
    body = {"choices": [choice, untouched]}
    ex = Exchange("r", time.monotonic())
    assert guard_completion(body, GuardSpec(stop=("###",)), chat, ex)
    assert choice["logprobs"] is None and choice["token_ids"] is None
    assert choice["finish_reason"] == "stop"
    assert untouched["logprobs"] == {"content": []} and untouched["token_ids"] == [4]


LITERAL_POOL = (  # patterns with a literal prefix (`_literal_prefix`)
    CutPattern(r"(?i)ignore (all )?previous", 21),
    CutPattern(r"(?i)begin [a-z ]*key", 12),
    CutPattern(r"ignore all", 4),  # longer than max_len: found only in a piece that holds it
    CutPattern(r"foo\b", 6),
    CutPattern(r"foo$", 6),
    CutPattern(r"bc(?!de)", 4),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(STOP_POOL), max_size=2, unique=True),
    st.lists(st.sampled_from(LITERAL_POOL), min_size=1, max_size=2, unique=True),
    st.lists(st.sampled_from(CUT_POOL), max_size=1),
    texts((*WORDS, "BEGIN RSA KEY", "begin  key", "ignore all", "foo bar", "FOO")),
    st.lists(st.integers(0, 10_000), max_size=10),
)
def test_a_cut_patterns_literal_prefix_decides_as_its_regular_expression_does(
    stops: list[str],
    literal_cuts: list[CutPattern],
    other_cuts: list[CutPattern],
    text: str,
    bounds: list[int],
) -> None:
    """The guard skips the partial search of a cut pattern with a literal prefix where the
    prefix is not whole in the text; with the prefix forgotten (so every such search
    runs), every chunking of the text is released and cut the same way."""
    cuts = list(dict.fromkeys([*literal_cuts, *other_cuts]))
    spec, searching = GuardSpec(stops, cuts), GuardSpec(stops, cuts)
    assert all(cut.literal for cut in spec._cuts[: len(literal_cuts)])
    for cut in searching._cuts:
        cut.literal = ""
    for pieces in (chunk(text, bounds), list(text), [text]):
        assert run(spec, pieces) == run(searching, pieces)
