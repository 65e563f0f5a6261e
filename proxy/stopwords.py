"""Stop strings, cut patterns and the repetition guard, enforced on the stream.

(Interface stub: the implementation is being written; see the docstrings for the contract.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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


class GuardSpec:
    """Compiled matchers of one policy; immutable, shared by all streams of a snapshot."""

    def __init__(
        self,
        stop: Sequence[str] = (),
        cut_patterns: Sequence[CutPattern] = (),
        repetition: RepetitionGuard | None = None,
    ) -> None:
        raise NotImplementedError
