"""Stop strings, cut patterns and the repetition guard, enforced on the stream.

`GuardSpec` compiles a policy once; `GuardSpec.start()` gives one `StreamGuard` per stream
and choice index. `feed(piece)` returns the text that is safe to send now and holds back
only characters that could still begin a match (never more than `max_holdback`).

The result never depends on how the text is chunked, and `apply(text)` equals one `feed`
plus `finish`:

* The text ends right before the earliest-starting match of any matcher. At one start,
  stop strings win (the shortest), then cut patterns in order, then the repetition guard.
* Stop strings are literal, compared by code point: finish_reason "stop", matched = it.
* Cut patterns use `regex` syntax: finish_reason "content_filter", matched = the source.
  A match, and whatever its assertions must see after it, has to fit in `max_len`
  characters from its start: a partial match that grows to `max_len` characters is
  released (a longer match may go unfound). A complete match is decided at once; if the
  pattern contains ``$ \\b \\B \\Z \\M``, once two more characters have arrived; if it
  contains ``(?!``, once `max_len` characters from its start have arrived; or when the text
  ends. Lookbehind sees the last `max_len` characters of released text, ``\\b`` and ``^``
  the last one. ``\\G``, ``\\K`` and scoped ``(?w:...)`` are not supported.
* Repetition: a word is a maximal run of non-whitespace and counts once the whitespace after
  it (or the end of the text) arrives. When the last `repeats * p` words are one sequence of
  p words (1 <= p <= ngram) repeated, the text ends right after that word: the client gets
  the text before the loop and `repeats` copies of it, nothing after. finish_reason "stop",
  matched "repetition:<p>". Nothing is held back for it.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import regex

# Stand for every class of preceding character that \b, \B, \m, \M and (?m)^ can tell
# apart (start of text, word, non-word, line break) when probing where a match can start.
_PROBE_CONTEXTS: Final = ("", "a", " ", "\n")
_END_ASSERTIONS: Final = ("$", "\\b", "\\B", "\\Z", "\\M")
_EMPTY_PROBES: Final = ("", "a", " ", "\n", "a b\n0.")
_MEMO_LIMIT: Final = 1 << 16
_WORD: Final = re.compile(r"\S+")  # \S and str.split() share one definition of whitespace
# GuardSpec.pass_table's values for an ASCII character: no match can start at it; a
# stop string starts with it (or a cut pattern without a literal prefix may); a cut
# pattern may, which its literal prefix decides.
PASS_SAFE: Final = 0
PASS_NEVER: Final = 1
PASS_CHECK: Final = 2
_LITERAL_WHOLE: Final = -2  # literal_start: the literal prefix is whole in the text


@dataclass(frozen=True, slots=True)
class CutPattern:
    """A regular expression that ends the stream with finish_reason content_filter.

    max_len bounds the text a match can span, and so the text the guard may hold back.
    """

    pattern: str
    max_len: int


@dataclass(frozen=True, slots=True)
class RepetitionGuard:
    """Ends a stream whose last words repeat a sequence of at most `ngram` words `repeats`
    times in a row."""

    ngram: int
    repeats: int


@dataclass(frozen=True, slots=True)
class GuardResult:
    text: str
    finish_reason: str | None
    matched: str | None


def _literal_prefix(src: str) -> tuple[str, bool] | None:
    """The literal text every match of `src` starts with (lower-cased under a leading
    `(?i)`), when it is at least two characters and nothing can change its meaning;
    None otherwise."""
    icase = src.startswith("(?i)")
    rest = src[4:] if icase else src
    if re.search(r"\(\?[a-zA-Z^-]", rest) or "|" in rest:
        return None  # inline flags may apply to the whole pattern; | adds other starts
    literal = []
    for i, ch in enumerate(rest):
        if ch in "\\.^$*+?{}[]|()":
            break
        if rest[i + 1 : i + 2] in ("*", "+", "?", "{"):
            break  # this character is optional or repeated
        literal.append(ch)
    text = "".join(literal)
    if len(text) < 2 or not text.isascii():
        return None  # (non-ASCII case folding may match text lower() does not produce)
    return (text.lower() if icase else text), icase


class _Cut:
    __slots__ = ("behind", "icase", "lag", "literal", "max_len", "rx", "safe", "source")

    def __init__(self, cut: CutPattern) -> None:
        src, max_len = cut.pattern, cut.max_len
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
            raise ValueError(f"cut pattern {src!r}: max_len must be an integer >= 1")
        try:
            self.rx: Any = regex.compile(src)
        except (regex.error, TypeError) as exc:
            raise ValueError(f"cut pattern {src!r}: invalid regular expression: {exc}") from None
        if self.rx.flags & regex.REVERSE:
            raise ValueError(f"cut pattern {src!r}: reverse matching (?r) is not supported")
        if any(m.end() == m.start() for t in _EMPTY_PROBES for m in self.rx.finditer(t)):
            raise ValueError(f"cut pattern {src!r}: matches the empty string")
        self.source, self.max_len = src, max_len
        # Lookbehind and Unicode word boundaries look further back than one character.
        self.behind = "(?<" in src or bool(self.rx.flags & regex.WORD)
        self.lag = max_len if "(?!" in src else 2 if any(a in src for a in _END_ASSERTIONS) else 0
        self.safe: set[str] = set()  # memo: characters no match can start at
        prefix = None if self.behind else _literal_prefix(src)
        self.literal, self.icase = prefix if prefix is not None else ("", False)

    def may_start(self, ch: str) -> bool:
        return self.behind or any(
            self.rx.match(ctx + ch, len(ctx), partial=True) is not None for ctx in _PROBE_CONTEXTS
        )

    def scan(self, text: str, pos: int, final: bool) -> tuple[int, int]:
        """(start of a decided match, start of a possible one) in text[pos:], -1 for none."""
        n, rx = len(text), self.rx
        while pos < n:
            m = rx.search(text, pos, partial=not final)
            if m is None:
                return -1, -1
            s = m.start()
            if m.end() == s:  # an empty partial match at the end, or an empty match
                pos = s + 1
            elif m.partial:
                if n - s < self.max_len:
                    return -1, s
                pos = s + 1  # longer than max_len allows: not a match
            elif final:
                return s, -1
            else:
                # search() prefers a complete match to an earlier partial one
                for q in range(max(pos, n - self.max_len + 1), s):
                    if text[q] not in self.safe and rx.match(text, q, partial=True) is not None:
                        return -1, q
                if n - m.end() >= self.lag or n - s >= self.max_len:
                    return s, -1
                return -1, s
        return -1, -1


class GuardSpec:
    """Compiled matchers of one policy; immutable, shared by all streams of a snapshot.

    The one mutable part is a memo of characters known to start (or not) any match, which
    only grows (up to a bound) and whose entries never change, so sharing it is safe.
    """

    __slots__ = (
        "_ctx_len",
        "_cuts",
        "_first_re",
        "_firsts",
        "_literals",
        "_prefixes",
        "_ranks",
        "_rep_need",
        "_safe",
        "_stop_max",
        "_stop_re",
        "_unsafe",
        "cut_patterns",
        "max_holdback",
        "pass_table",
        "repetition",
        "stop",
    )

    def __init__(
        self,
        stop: Sequence[str] = (),
        cut_patterns: Sequence[CutPattern] = (),
        repetition: RepetitionGuard | None = None,
    ) -> None:
        if isinstance(stop, str):
            raise ValueError("stop must be a list of strings, not a string")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self.stop: tuple[str, ...] = tuple(dict.fromkeys(stop))
        self.cut_patterns = tuple(cut_patterns)
        self._cuts = tuple(_Cut(c) for c in self.cut_patterns)
        if repetition is not None:
            if repetition.ngram < 1:
                raise ValueError(f"repetition guard: ngram must be >= 1, got {repetition.ngram}")
            if repetition.repeats < 2:
                raise ValueError(
                    f"repetition guard: repeats must be >= 2, got {repetition.repeats}"
                )
            # a period p is a loop once this many words equal the word p before them
            self._rep_need = [p * (repetition.repeats - 1) for p in range(repetition.ngram + 1)]
        else:
            self._rep_need = []
        self.repetition = repetition
        self._firsts = frozenset(s[0] for s in self.stop)
        self._prefixes = frozenset(s[:i] for s in self.stop for i in range(1, len(s)))
        self._stop_max = max(map(len, self.stop), default=0)
        # shortest first: at one start the shortest stop string is the one reported
        alternation = "|".join(map(re.escape, sorted(self.stop, key=len)))
        self._stop_re = re.compile(alternation) if self.stop else None
        self._first_re = re.compile("|".join(map(re.escape, sorted(self._firsts))) or "$^")
        behind = any(c.behind for c in self._cuts)
        self._ranks = len(self._cuts) + 2  # stop strings, each cut pattern, repetition
        self._ctx_len = max(c.max_len for c in self._cuts) if behind else 1
        self.max_holdback = max(self._stop_max - 1, *(c.max_len - 1 for c in self._cuts), 0)
        self._safe: set[str] = set()
        self._unsafe: set[str] = set()
        self._all_safe("".join(map(chr, range(128))))
        # (literal, ignore case) of every cut pattern, when each has a literal prefix
        self._literals: tuple[tuple[str, bool], ...] | None = (
            tuple((c.literal, c.icase) for c in self._cuts)
            if self._cuts and all(c.literal for c in self._cuts)
            else None
        )
        self.pass_table = self._pass_table()

    def __repr__(self) -> str:
        return (
            f"GuardSpec(stop={self.stop!r}, cut_patterns={self.cut_patterns!r}, "
            f"repetition={self.repetition!r})"
        )

    def start(self) -> StreamGuard:
        return StreamGuard(self)

    def apply(self, text: str) -> GuardResult:
        guard = StreamGuard(self)
        out = guard.feed(text)
        out += guard.finish()
        return GuardResult(out, guard.finish_reason, guard.matched)

    def _no_start_in(self, piece: str) -> bool:
        """True when no stop string and no cut pattern can begin anywhere in `piece`,
        proven from the cut patterns' literal prefixes (ASCII text only, where lower() is
        exactly the regex's case folding). Cheaper than a partial-match scan for the
        common token that holds a cut pattern's first letter in some other word."""
        literals = self._literals
        if literals is None or not piece.isascii() or not self._firsts.isdisjoint(piece):
            return False
        lower = ""
        for literal, icase in literals:
            if icase:
                lower = lower or piece.lower()
            if literal_start(lower if icase else piece, literal) != -1:
                return False
        return True

    def _pass_table(self) -> bytes | None:
        """What `StreamGuard.feed` passes unchanged, for a guard that holds nothing
        (`StreamGuard.idle`), as data for the relay's scan of whole reads (`chunkscan.
        scan_passed`): an ASCII piece passes when no character is PASS_NEVER's and either
        none is PASS_CHECK's or no cut pattern's literal prefix can begin in it (as
        `_no_start_in`). 128 bytes, one per ASCII character, then each literal prefix as
        (ignore case 0/1, length, the literal lower-cased under ignore case). None where
        passing needs more than the piece: a repetition guard counts words, a lookbehind
        keeps the released text."""
        if self.repetition is not None or (self._cuts and self._ctx_len > 1):
            return None
        literals = self._literals or ()
        if any(len(literal) > 255 for literal, _ in literals):
            return None
        table = bytearray(128)
        for code in range(128):
            ch = chr(code)
            if ch in self._firsts or (ch in self._unsafe and not literals):
                table[code] = PASS_NEVER
            elif ch in self._unsafe:
                table[code] = PASS_CHECK
            elif ch not in self._safe:
                return None  # not memoized: never at construction, which memoizes ASCII
        for literal, icase in literals:
            table += bytes((int(icase), len(literal))) + literal.encode("ascii")
        return bytes(table)

    def _all_safe(self, piece: str) -> bool:
        """True when no match can start at any character of `piece`; fills the memos."""
        safe, unsafe = self._safe, self._unsafe
        ok = True
        for ch in piece:
            if ch in safe:
                continue
            if ch in unsafe:
                ok = False
                continue
            room = len(safe) + len(unsafe) < _MEMO_LIMIT
            starts = ch in self._firsts
            for cut in self._cuts:
                if cut.may_start(ch):
                    starts = True
                elif room:
                    cut.safe.add(ch)
            if room:
                (unsafe if starts else safe).add(ch)
            ok = ok and not starts
        return ok


class StreamGuard:
    """The guard of one stream (one choice): feed it each text delta in order."""

    __slots__ = (
        "_ctx",
        "_cur",
        "_done",
        "_held",
        "_last",
        "_rep_at",
        "_rep_p",
        "_runs",
        "_spec",
        "_words",
        "finish_reason",
        "matched",
    )

    def __init__(self, spec: GuardSpec) -> None:
        self._spec = spec
        self._held = ""
        self._done = False
        self.finish_reason: str | None = None
        self.matched: str | None = None
        # released pieces, for lookbehind and \b at the start of the window
        # Released text a cut pattern may look back into: the last max_len characters for
        # lookbehind (a deque of pieces); without lookbehind one character, so the last
        # piece alone (an attribute stored per token is cheaper than a deque append).
        self._ctx: deque[str] | None = (
            deque(maxlen=spec._ctx_len) if spec._cuts and spec._ctx_len > 1 else None
        )
        self._last = ""
        self._rep_at = -1  # where a detected loop ends, as an index into _held
        self._rep_p = 0
        ngram = spec.repetition.ngram if spec.repetition is not None else 0
        self._words: deque[str] = deque(maxlen=ngram)
        self._runs = [0] * (ngram + 1)
        self._cur: list[str] = []  # pieces of the word not yet ended by whitespace

    def feed(self, piece: str) -> str:
        if self._done or not piece:
            return ""
        spec = self._spec
        rep = -1
        if spec.repetition is not None and self._rep_at < 0:
            rep = self._track(piece)
        held = self._held
        if (
            not held
            and rep < 0
            and (
                _all_in(spec._safe, piece)
                or (spec._unsafe.isdisjoint(piece) and spec._all_safe(piece))
                or spec._no_start_in(piece)
            )
        ):
            if self._ctx is not None:
                self._ctx.append(piece)
            else:
                self._last = piece
            return piece
        if self._rep_at >= 0:
            rep = self._rep_at
        elif rep >= 0:
            rep += len(held)
        return self._scan(held + piece, rep, final=False)

    def idle(self) -> bool:
        """Nothing held back, no loop pending, and nothing a piece must be added to but the
        last character released: a piece the spec's `pass_table` passes, `feed` would pass
        unchanged, and `passed` records it."""
        return not self._done and not self._held and self._rep_at < 0 and self._ctx is None

    def passed(self, last: str) -> None:
        """Pieces the spec's `pass_table` passed went out, the last ending in `last` (the
        one character of released text a cut pattern's ``\\b`` or ``^`` looks back at)."""
        self._last = last

    @property
    def held_length(self) -> int:
        """How much text it holds back (that may begin a stop string or cut pattern)."""
        return 0 if self._done else len(self._held)

    def finish(self) -> str:
        if self._done:
            return ""
        rep = self._rep_at
        if rep < 0 and self._cur and self._count("".join(self._cur)):
            rep = len(self._held)
        if not self._held and rep < 0:
            self._done = True
            return ""
        return self._scan(self._held, rep, final=True)

    def _scan(self, buf: str, rep: int, final: bool) -> str:
        spec = self._spec
        n, k = len(buf), spec._ranks
        # Keys pos * k + rank order matches by start, then stop strings, cut patterns in
        # order, repetition. win: the earliest decided match; pend: the earliest possible one.
        win = pend = (n + 1) * k
        name = reason = ""
        if spec._stop_re is not None and not spec._firsts.isdisjoint(buf):
            m = spec._stop_re.search(buf)
            if m is not None:
                win, name, reason = m.start() * k, m.group(), "stop"
            if not final:
                pend = self._stop_pending(buf) * k
        text, base = "", -1
        lower = ""
        for rank, cut in enumerate(spec._cuts, 1):
            if _all_in(cut.safe, buf):
                continue
            if cut.literal and buf.isascii():
                # Without its literal prefix whole in the text, no match of it can be, and
                # the start of one only where the text ends in the start of the literal:
                # decided here, where the regular expression's partial search costs ~8,000
                # instructions (a held "\n" or "i" brings most events here).
                if cut.icase:
                    lower = lower or buf.lower()
                at = literal_start(lower if cut.icase else buf, cut.literal)
                if at != _LITERAL_WHOLE and (at < 0 or final or n - at < cut.max_len):
                    if at >= 0 and not final and at * k + rank < pend:
                        pend = at * k + rank
                    continue
            if base < 0:
                ctx = self._context()
                text, base = ctx + buf, len(ctx)
            s, q = cut.scan(text, base, final)
            if s >= 0 and (s - base) * k + rank < win:
                win, name, reason = (s - base) * k + rank, cut.source, "content_filter"
            if q >= 0 and (q - base) * k + rank < pend:
                pend = (q - base) * k + rank
        if rep >= 0 and rep * k + k - 1 < win:
            win, name, reason = rep * k + k - 1, f"repetition:{self._rep_p}", "stop"
        if reason and win <= pend:
            self._done, self._held = True, ""
            self.finish_reason, self.matched = reason, name
            return buf[: win // k]
        if final:
            self._done, self._held = True, ""
            return buf
        h = min(pend // k, n)
        out, self._held = buf[:h], buf[h:]
        self._rep_at = rep - h if rep >= 0 else -1
        if out:
            if self._ctx is not None:
                self._ctx.append(out)
            else:
                self._last = out
        return out

    def _stop_pending(self, buf: str) -> int:
        """Start of the longest suffix of `buf` that is a proper prefix of a stop string."""
        spec, n = self._spec, len(buf)
        find = spec._first_re.search
        m = find(buf, max(0, n - spec._stop_max + 1))
        while m is not None:
            i = m.start()
            if buf[i:] in spec._prefixes:
                return i
            m = find(buf, i + 1)
        return n + 1

    def _context(self) -> str:
        ctx = self._ctx
        if ctx is None:  # no lookbehind: one character of context
            return self._last[-1:]
        if not ctx:
            return ""
        text = ctx[0] if len(ctx) == 1 else "".join(ctx)
        return text[-self._spec._ctx_len :]

    def _track(self, piece: str) -> int:
        """Counts the words `piece` ends; where in `piece` a loop ends, or -1."""
        parts = piece.split()
        cur = self._cur
        open_tail = not piece[-1].isspace()
        if piece[0].isspace():
            if cur and self._count("".join(cur)):
                return 0
            k0 = 0
        else:
            cur.append(parts[0])
            if open_tail and len(parts) == 1:
                return -1  # the common case: the piece only extends a word
            if self._count("".join(cur)):
                return _word_end(piece, 0)
            k0 = 1
        cur.clear()
        for k in range(k0, len(parts) - 1 if open_tail else len(parts)):
            if self._count(parts[k]):
                return _word_end(piece, k)
        if open_tail:
            cur.append(parts[-1])
        return -1

    def _count(self, word: str) -> bool:
        """Adds one ended word; O(ngram). True when it ends a loop."""
        words, runs, need = self._words, self._runs, self._spec._rep_need
        for p in range(1, len(words) + 1):
            if words[-p] == word:
                runs[p] += 1
                if runs[p] >= need[p]:
                    self._rep_p = p
                    return True
            else:
                runs[p] = 0
        words.append(word)
        return False


def _all_in(chars: set[str], piece: str) -> bool:
    """`chars.issuperset(piece)`, compiled to a loop of set lookups (mypyc turns all()
    over a generator into one): set.issuperset is a method call that builds an iterator
    over the string (~3x for a token's few characters)."""
    return all(ch in chars for ch in piece)


def literal_start(text: str, literal: str) -> int:
    """Where in `text` (lower-cased where the cut pattern ignores case) its literal prefix
    `literal` first begins: _LITERAL_WHOLE where it is whole there (a match may begin: the
    regular expression decides); else the first position from which the rest of `text` is
    the start of it (where only the start of a match can begin); -1 where it begins
    nowhere, and no match of the pattern does. (Once the rest of the text is shorter than
    the literal, it cannot be whole at any later position.)"""
    first = literal[0]
    size = len(literal)
    at = text.find(first)
    while at >= 0:
        if literal.startswith(text[at : at + size]):
            return _LITERAL_WHOLE if len(text) - at >= size else at
        at = text.find(first, at + 1)
    return -1


def _word_end(piece: str, k: int) -> int:
    for i, m in enumerate(_WORD.finditer(piece)):
        if i == k:
            return m.end()
    raise AssertionError("unreachable: piece.split() and \\S+ disagree")


__all__ = [
    "PASS_CHECK",
    "PASS_NEVER",
    "PASS_SAFE",
    "CutPattern",
    "GuardResult",
    "GuardSpec",
    "RepetitionGuard",
    "StreamGuard",
    "literal_start",
]
