"""A `kind: Policy` document -> the snapshot's `StreamPolicy`, matchers compiled.

`GuardSpec` compiles the stop strings, cut patterns and repetition guard; a pattern it
rejects is a config error at that pattern's line, so a bad regular expression never
reaches a stream.
"""

from __future__ import annotations

from sluice.proxy.snapshot import StreamPolicy, StreamTimeouts
from sluice.proxy.stopwords import CutPattern, GuardSpec, RepetitionGuard
from sluice.proxy.structured import StructuredOutputs

from .issues import ConfigIssue
from .loader import Document
from .schema import PolicyFile, StructuredOutputsSection, policy_issues


def build_policy(doc: Document) -> tuple[StreamPolicy | None, list[ConfigIssue]]:
    """(policy, []) or (None, issues)."""
    model = doc.model
    assert isinstance(model, PolicyFile)
    cuts = tuple(CutPattern(c.pattern, c.max_len) for c in model.cut_patterns)
    section = model.repetition_guard
    repetition = None if section is None else RepetitionGuard(section.ngram, section.repeats)
    issues: list[ConfigIssue] = []
    guard: GuardSpec | None = None
    if model.stop or cuts or repetition is not None:
        try:
            guard = GuardSpec(model.stop, cuts, repetition)
        except ValueError as exc:
            issues += _locate_guard_error(doc, cuts, exc)
    t = model.timeouts
    try:
        timeouts = StreamTimeouts(t.first_token, t.inter_token, t.total)
    except ValueError as exc:
        if not policy_issues(model):  # else the loader has reported it, with its path
            issues.append(doc.issue(("timeouts",), str(exc)))
        return None, issues
    if issues:
        return None, issues
    return (
        StreamPolicy(
            name=model.name,
            stop=model.stop,
            cut_patterns=cuts,
            repetition_guard=repetition,
            timeouts=timeouts,
            guard=guard,
            keepalive_interval=model.keepalive_interval,
            resume_window=model.resume_window,
            resume_buffer=model.resume_buffer,
            structured=structured_rule(model.structured_outputs),
        ),
        [],
    )


def _locate_guard_error(
    doc: Document, cuts: tuple[CutPattern, ...], exc: ValueError
) -> list[ConfigIssue]:
    """Compile each cut pattern alone to point at the ones that fail."""
    issues = []
    for index, cut in enumerate(cuts):
        try:
            GuardSpec((), (cut,), None)
        except ValueError as each:
            issues.append(doc.issue(("cut_patterns", index, "pattern"), str(each)))
    return issues or [doc.issue((), str(exc))]


def structured_rule(section: StructuredOutputsSection | None) -> StructuredOutputs | None:
    if section is None:
        return None
    return StructuredOutputs(mode=section.mode, max_schema_bytes=section.max_schema_bytes)
