"""A `kind: Policy` document -> the snapshot's `StreamPolicy`, matchers compiled.

`GuardSpec` compiles the stop strings, cut patterns and repetition guard; a pattern it
rejects is a config error at that pattern's line, so a bad regular expression never
reaches a stream.
"""

from __future__ import annotations

from sluice.proxy.snapshot import DEFAULT_TIMEOUTS, StreamPolicy, StreamTimeouts
from sluice.proxy.stopwords import CutPattern, GuardSpec, RepetitionGuard
from sluice.proxy.structured import StructuredOutputs

from .issues import ConfigIssue
from .loader import Document
from .schema import PolicyFile, StructuredOutputsSection, TimeoutsSection, policy_issues

TIMEOUT_FIELDS = ("first_token", "inter_token", "total", "response_head")


def merge_timeouts(section: TimeoutsSection, defaults: StreamTimeouts) -> StreamTimeouts:
    """A Policy's deadlines: what it sets (a value or null), the defaults for the rest. A
    default gives way to a value the policy set: a default first_token or response_head
    above the policy's total is lowered to it, a default total below the policy's
    first_token is raised to it (only the policy's own values can contradict each other,
    and policy_issues reports that)."""
    given = section.model_fields_set
    values: dict[str, float | None] = {
        name: getattr(section, name) if name in given else getattr(defaults, name)
        for name in TIMEOUT_FIELDS
    }
    total = values["total"]
    first = values["first_token"]
    if total is not None and first is not None and first > total:
        if "first_token" in given:
            values["total"] = first
        else:
            values["first_token"] = total
    head = values["response_head"]
    if total is not None and head is not None and head > total and "response_head" not in given:
        values["response_head"] = total
    return StreamTimeouts(**values)


def build_policy(
    doc: Document, defaults: StreamTimeouts = DEFAULT_TIMEOUTS
) -> tuple[StreamPolicy | None, list[ConfigIssue]]:
    """(policy, []) or (None, issues); `defaults` are the Gateway's `timeouts`."""
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
    try:
        timeouts = merge_timeouts(model.timeouts, defaults)
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
