"""Applying a preset's `SamplingPlan` and a policy's stop strings to a request body.

Order: denied fields are rejected, then defaults fill what the request left out, forced
values replace the request's, and clamps bound the result. Field names are vLLM's: the
GenerationConfig mapping ran when the snapshot was built.
"""

from __future__ import annotations

from typing import Any

from .errors import ApiError, bad_request
from .snapshot import SamplingPlan

# Chat requests may say max_completion_tokens instead of max_tokens; vLLM prefers the
# former when both are set, so a rule on max_tokens governs whichever the request uses.
_ALIASES: dict[str, tuple[str, ...]] = {"max_tokens": ("max_completion_tokens", "max_tokens")}


def _keys(field: str) -> tuple[str, ...]:
    return _ALIASES.get(field, (field,))


def apply_plan(body: dict[str, Any], plan: SamplingPlan) -> None:
    """Merges the plan into `body` in place; raises ApiError(400) for a denied field."""
    for field in plan.denied:
        for key in _keys(field):
            if key in body:
                raise ApiError(
                    400,
                    f"'{key}' may not be set by the client: preset '{plan.name}' denies it",
                    param=key,
                    code="field_denied",
                )
    for field, value in plan.defaults.items():
        if not any(key in body and body[key] is not None for key in _keys(field)):
            body[field] = value
    for field, value in plan.forced.items():
        for key in _keys(field):
            body.pop(key, None)
        body[field] = value
    for field, (low, high) in plan.clamps.items():
        for key in _keys(field):
            value = body.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise bad_request(f"'{key}' must be a number", param=key, code="invalid_type")
            if low is not None and value < low:
                body[key] = type(value)(low) if isinstance(value, int) else low
            elif high is not None and value > high:
                body[key] = type(value)(high) if isinstance(value, int) else high


def merge_stop(body: dict[str, Any], stop: tuple[str, ...]) -> None:
    """Adds the policy's stop strings to the request's own (order kept, no duplicates)."""
    if not stop:
        return
    requested = body.get("stop")
    if requested is None:
        body["stop"] = list(stop)
        return
    if isinstance(requested, str):
        requested = [requested]
    if not isinstance(requested, list) or not all(isinstance(s, str) for s in requested):
        raise bad_request("'stop' must be a string or a list of strings", param="stop")
    body["stop"] = list(dict.fromkeys([*requested, *stop]))
