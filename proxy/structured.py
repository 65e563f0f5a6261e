"""The structured-outputs policy: whether a request may (or must) constrain its output to
a JSON schema, a regex, a choice list or a grammar, and how large that constraint may be.

Every endpoint spells the constraint its own way (`response_format`, vLLM's
`structured_outputs`, the Responses API's `text.format`, the Messages API's
`output_config.format`, TGI's `parameters.grammar`); the adapters hand this module what
they found, so one rule holds on all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from .errors import ApiError

StructuredMode = Literal["allow", "deny", "require"]


@dataclass(frozen=True, slots=True)
class StructuredOutputs:
    """A Policy's `structured_outputs` section."""

    mode: StructuredMode = "allow"
    max_schema_bytes: int | None = None


def find_constraint(body: dict[str, Any]) -> tuple[str, Any] | None:
    """The structured-output constraint of a body (chat, completions, responses,
    messages), as (field name, value); None when the output is free text."""
    outputs = body.get("structured_outputs")
    if outputs is not None:
        return "structured_outputs", outputs
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
        return "response_format", response_format
    text = body.get("text")
    if isinstance(text, dict):
        fmt = text.get("format")
        if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
            return "text.format", fmt
    output_config = body.get("output_config")
    if isinstance(output_config, dict):
        fmt = output_config.get("format")
        # vLLM's /v1/messages constrains the output with `format.schema` and ignores a
        # format without one: counting that would let it pass a `require` rule unconstrained.
        if isinstance(fmt, dict) and fmt.get("schema"):
            return "output_config.format", fmt
    for legacy in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        if body.get(legacy) is not None:
            return legacy, body[legacy]
    return None


def check_structured(
    rule: StructuredOutputs | None, owner: str, found: tuple[str, Any] | None
) -> None:
    """Raises a 400 naming the rule's owner ("policy 'x'", "app 'y'") when the request
    breaks the rule."""
    if rule is None or (rule.mode == "allow" and rule.max_schema_bytes is None):
        return
    if found is None:
        if rule.mode == "require":
            raise ApiError(
                400,
                f"{owner} requires structured output: set response_format "
                "(json_schema or json_object) or structured_outputs",
                param="response_format",
                code="structured_output_required",
            )
        return
    field, value = found
    if rule.mode == "deny":
        raise ApiError(
            400,
            f"{owner} does not allow structured output ('{field}' was set)",
            param=field,
            code="structured_output_denied",
        )
    if rule.max_schema_bytes is not None:
        size = len(orjson.dumps(value))
        if size > rule.max_schema_bytes:
            raise ApiError(
                400,
                f"'{field}' is {size} bytes; {owner} allows at most {rule.max_schema_bytes}",
                param=field,
                code="structured_output_too_large",
            )
