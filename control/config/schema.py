"""The config files' documents as ops write them: `kind: Preset` and `kind: Policy` here,
`kind: Gateway` in gateway_schema.py.

File models only: unknown keys and wrong types are errors (`extra="forbid"`, strict
scalars, so `"0.3"` is not a number), every model is frozen, and every field states its
default in `Field(default=...)` with a description that docs/CONFIG.md is generated from.
References between documents (a route's preset, an app's routes) are plain names here;
`build.py` resolves and checks them. Rules that span fields of one document, with the path
to blame, are functions next to the models (`policy_issues`).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from .values import (
    Bool,
    Duration,
    Float,
    Int,
    KeepaliveInterval,
    Name,
    NonEmptyText,
    Text,
    check_int64,
)

Path = tuple[str | int, ...]
DocumentIssue = tuple[Path, str]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- Preset -------------------------------------------------------------------------------


def _one_or_many(value: Any) -> Any:
    # GenerationConfig accepts stop_strings as one string or a list; keep both spellings.
    return [value] if isinstance(value, str) else value


class GenerationSection(Section):
    """Sampling fields in Hugging Face GenerationConfig vocabulary (see the mapping table)."""

    max_new_tokens: Int | None = Field(default=None, ge=1, description="Most tokens to generate.")
    min_new_tokens: Int | None = Field(
        default=None, ge=0, description="Fewest tokens to generate before a stop may end it."
    )
    do_sample: Bool | None = Field(
        default=None,
        description="false: greedy decoding (sent as temperature 0); true: sample.",
    )
    temperature: Float | None = Field(default=None, ge=0, description="Sampling temperature.")
    top_p: Float | None = Field(default=None, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: Int | None = Field(
        default=None, ge=1, description="Sample from the k most likely tokens (omit: all)."
    )
    min_p: Float | None = Field(
        default=None, ge=0, le=1, description="Minimum probability relative to the top token."
    )
    repetition_penalty: Float | None = Field(
        default=None, gt=0, description="Penalty on tokens already in prompt or output (1 = none)."
    )
    presence_penalty: Float | None = Field(
        default=None, ge=-2, le=2, description="OpenAI presence penalty (vLLM extension)."
    )
    frequency_penalty: Float | None = Field(
        default=None, ge=-2, le=2, description="OpenAI frequency penalty (vLLM extension)."
    )
    num_return_sequences: Int | None = Field(
        default=None, ge=1, description="Completions per request."
    )
    seed: Int | None = Field(default=None, description="Random seed for reproducible sampling.")
    stop_strings: Annotated[tuple[NonEmptyText, ...] | None, BeforeValidator(_one_or_many)] = Field(
        default=None, description="Strings that end generation (one string or a list)."
    )
    stop_token_ids: tuple[Annotated[Int, Field(ge=0)], ...] | None = Field(
        default=None, description="Token ids that end generation, besides the model's EOS."
    )


PolicyMode = Literal["default", "force", "deny", "clamp"]
Number = int | float
ClampBounds = tuple[Number | None, Number | None]
MODES_HINT = "default, force, deny or {clamp: [min, max]}"


def _parse_clamp(value: Any) -> Any:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ValueError("clamp takes [min, max] (null for an open bound)")
    for bound in value:
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int | float)):
            raise ValueError(f"clamp bounds are numbers or null, got {bound!r}")
        if isinstance(bound, float) and not math.isfinite(bound):
            raise ValueError(f"clamp bounds are finite numbers or null, got {bound!r}")
        if isinstance(bound, int):
            check_int64(bound)
    if value[0] is None and value[1] is None:
        raise ValueError("clamp needs at least one bound")
    return tuple(value)


class FieldPolicy(Section):
    """What a request may do with one field: written `default`, `force`, `deny` or
    `{clamp: [min, max]}`."""

    mode: PolicyMode = Field(default="default", description="default, force, deny or clamp.")
    clamp: Annotated[ClampBounds | None, BeforeValidator(_parse_clamp)] = Field(
        default=None, description="[min, max] for mode clamp; null is an open bound."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value not in ("default", "force", "deny"):
                hint = " (write {clamp: [min, max]})" if value == "clamp" else ""
                raise ValueError(f"unknown policy mode {value!r}; expected {MODES_HINT}{hint}")
            return {"mode": value}
        if isinstance(value, dict):
            if set(value) != {"clamp"}:
                raise ValueError(f"expected {MODES_HINT}, got a mapping with {sorted(value)}")
            return {"mode": "clamp", "clamp": value["clamp"]}
        raise ValueError(f"expected {MODES_HINT}")

    @field_validator("clamp")
    @classmethod
    def _ordered(cls, value: ClampBounds | None) -> ClampBounds | None:
        low, high = value if value is not None else (None, None)
        if low is not None and high is not None and low > high:
            raise ValueError(f"min {low} > max {high}")
        return value


class PresetFile(Section):
    """`kind: Preset` - a named sampling preset and what requests may change."""

    kind: Literal["Preset"] = Field(description="Preset.")
    name: Name = Field(
        description="Preset name; defaults to the file name when the file holds one Preset.",
        json_schema_extra={"doc_default": "the file name"},
    )
    description: Text = Field(default="", description="Free text shown by `sluice config show`.")
    extends: Name | None = Field(
        default=None, description="Parent preset: its fields and policy apply unless set here."
    )
    generation: GenerationSection = Field(
        default_factory=GenerationSection, description="Sampling fields (GenerationConfig names)."
    )
    policy: dict[str, FieldPolicy] = Field(
        default_factory=dict,
        description="Per generation field: default (request may override; the default mode), "
        "force, deny, or {clamp: [min, max]}.",
    )


# --- Policy -------------------------------------------------------------------------------


class CutPatternSection(Section):
    pattern: NonEmptyText = Field(description="Regular expression; a match ends the stream.")
    max_len: Int = Field(
        default=128, ge=1, description="Longest text a match can span, in characters."
    )


class RepetitionSection(Section):
    ngram: Int = Field(ge=1, le=64, description="Longest repeated word sequence, in words.")
    repeats: Int = Field(ge=2, description="Repeats in a row that end the stream.")


GATEWAY_DEFAULT: dict[str, Any] = {"doc_default": "the Gateway's `timeouts`"}


class TimeoutsSection(Section):
    """A Policy's deadlines: a field left out takes the Gateway's `timeouts` value (itself
    defaulted); `null` turns that deadline off for the policy's routes."""

    first_token: Duration | None = Field(
        default=None,
        description=(
            "Request start (the wait in the queues included) to first content token, for "
            "streams (a non-stream answer's tokens come with its body: `total` bounds it); "
            "null: none."
        ),
        json_schema_extra=GATEWAY_DEFAULT,
    )
    inter_token: Duration | None = Field(
        default=None,
        description="Between content tokens (keep-alives don't count), for streams; null: none.",
        json_schema_extra=GATEWAY_DEFAULT,
    )
    total: Duration | None = Field(
        default=None,
        description=(
            "Whole request, the wait in the queues included, stream or not (504 for a "
            "non-stream request); null: none."
        ),
        json_schema_extra=GATEWAY_DEFAULT,
    )
    response_head: Duration | None = Field(
        default=None,
        description="Request start to the backend's response head, for streams (a non-stream "
        "response's head comes with its body: total bounds it); null: none.",
        json_schema_extra=GATEWAY_DEFAULT,
    )


class StructuredOutputsSection(Section):
    mode: Literal["allow", "deny", "require"] = Field(
        default="allow",
        description="allow: requests may constrain their output (response_format, "
        "structured_outputs, text.format, Messages output_config.format, TGI grammar); deny: 400 "
        "when they do; require: 400 "
        "when they don't.",
    )
    max_schema_bytes: Int | None = Field(
        default=None, ge=1, description="Largest constraint (schema, regex, grammar) as JSON."
    )


class PolicyFile(Section):
    """`kind: Policy` - what the stream guard enforces, and the stream deadlines."""

    kind: Literal["Policy"] = Field(description="Policy.")
    name: Name = Field(
        description="Policy name; defaults to the file name when the file holds one Policy.",
        json_schema_extra={"doc_default": "the file name"},
    )
    description: Text = Field(default="", description="Free text shown by `sluice config show`.")
    stop: tuple[NonEmptyText, ...] = Field(
        default=(), description="Stop strings: sent to vLLM as `stop` and enforced on the stream."
    )
    cut_patterns: tuple[CutPatternSection, ...] = Field(
        default=(), description="Regular expressions that end the stream (content_filter)."
    )
    repetition_guard: RepetitionSection | None = Field(
        default=None, description="End a stream stuck in a loop; null: off."
    )
    timeouts: TimeoutsSection = Field(
        default_factory=TimeoutsSection,
        description="Stream deadlines; a field left out takes the Gateway's `timeouts`.",
    )
    keepalive_interval: KeepaliveInterval | None = Field(
        default=15.0,
        description="SSE comment `: keep-alive` after this long without a write while a "
        "stream waits (queue, first token, silent backend); null: off.",
    )
    resume_window: Duration | None = Field(
        default=None,
        description="Keep a stream's generation running this long after its client went "
        "away, resumable with GET /v1/streams/<request id>; null: abort on disconnect.",
    )
    resume_buffer: Int = Field(
        default=1048576,
        ge=1024,
        description="Replay buffer per resumable stream, in bytes of events; a resume "
        "older than it answers 410.",
    )
    structured_outputs: StructuredOutputsSection | None = Field(
        default=None, description="Structured-output rule on every endpoint; null: allow all."
    )


def policy_issues(doc: PolicyFile) -> list[DocumentIssue]:
    t = doc.timeouts
    if t.first_token is not None and t.total is not None and t.first_token > t.total:
        return [
            (("timeouts", "first_token"), f"first_token {t.first_token:g}s > total {t.total:g}s")
        ]
    return []
