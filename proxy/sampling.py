"""Applying a preset's `SamplingPlan` and a policy's stop strings to a request body.

Order: values outside vLLM's own domain are refused as vLLM would refuse them, denied
fields are refused unless they carry the value that would be sent anyway, then defaults
fill what the request left out, forced values replace the request's, and clamps bound the
result. Field names are vLLM's: the GenerationConfig mapping ran when the snapshot was built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from .errors import ApiError, bad_request
from .snapshot import SamplingPlan

# Chat requests may say max_completion_tokens instead of max_tokens; vLLM prefers the
# former when both are set, so a rule on max_tokens governs whichever the request uses.
# Only chat's: vLLM's completions and Responses requests ignore max_completion_tokens, so
# there it must not stand in for the limit the preset sends.
_CHAT_ALIASES: Final[dict[str, tuple[str, ...]]] = {
    "max_tokens": ("max_completion_tokens", "max_tokens")
}

# vLLM's beam search (`use_beam_search`, its extension of chat and completions requests)
# builds its parameters from these fields alone: every other sampling field, `stop`
# included, is dropped, so under a preset that sets one it would undo the preset.
BEAM_SEARCH_READS: Final = frozenset(
    ("n", "max_tokens", "temperature", "ignore_eos", "length_penalty")
)

# What vLLM uses when a request leaves a field out and the model's generation_config.json
# does not set it either (vLLM's SamplingParams defaults). Only fields whose default does
# not depend on the model are listed: temperature, top_p, top_k, min_p,
# repetition_penalty and max_tokens may come from the model's own generation config.
VLLM_DEFAULTS: Final[dict[str, Any]] = {
    "n": 1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "min_tokens": 0,
    "stop": [],
    "stop_token_ids": [],
}

# vLLM's own range checks (SamplingParams._verify_args), with its wording: a clamp must not
# turn a request vLLM would refuse into a silently different one.
_Check = tuple[Callable[[float], bool], str]
VLLM_DOMAIN: Final[dict[str, _Check]] = {
    "temperature": (lambda v: v >= 0, "must be non-negative"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "min_p": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "must be greater than zero"),
    "presence_penalty": (lambda v: -2 <= v <= 2, "must be in [-2, 2]"),
    "frequency_penalty": (lambda v: -2 <= v <= 2, "must be in [-2, 2]"),
    "max_tokens": (lambda v: v >= 1, "must be at least 1"),
    "max_completion_tokens": (lambda v: v >= 1, "must be at least 1"),
    "min_tokens": (lambda v: v >= 0, "must be greater than or equal to 0"),
    "n": (lambda v: v >= 1, "must be at least 1"),
}


def _keys(field: str, chat: bool) -> tuple[str, ...]:
    return _CHAT_ALIASES.get(field, (field,)) if chat else (field,)


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values (1 == 1.0, a tuple equals a list), but a bool is no number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def unchanged_value(field: str, value: Any, plan: SamplingPlan) -> bool:
    """True when a request's value for a denied field changes nothing: it is what the
    preset sends anyway, or (the preset sends none) vLLM's fixed default."""
    if field in plan.forced:
        return _same(value, plan.forced[field])
    if field in plan.defaults:
        return _same(value, plan.defaults[field])
    return field in VLLM_DEFAULTS and _same(value, VLLM_DEFAULTS[field])


def _check_domain(key: str, value: Any, shown_key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"'{shown_key}' must be a number", param=shown_key, code="invalid_type")
    check = VLLM_DOMAIN.get(key)
    if check is not None and not check[0](value):
        shown = float(value) if key in ("temperature", "top_p", "min_p") else value
        raise ApiError(
            400,
            f"{shown_key} {check[1]}, got {shown}. (parameter={shown_key}, value={shown})",
            type="BadRequestError",
            param=shown_key,
            code="invalid_value",
        )


_NO_NAMES: Final[Mapping[str, str]] = {}


def apply_plan(
    body: dict[str, Any],
    plan: SamplingPlan,
    chat: bool = True,
    names: Mapping[str, str] | None = None,
) -> None:
    """Merges the plan into `body` in place; raises ApiError(400) for a denied field set to
    another value, a clamped field outside vLLM's domain, or beam search asked for under a
    preset it would undo. `chat`: a chat request (`max_completion_tokens` is its
    `max_tokens` too). `names`: the endpoint's own name for a vLLM field, for the errors
    (the body is in vLLM's names here)."""
    names = names or _NO_NAMES
    _refuse_beam_search(body, plan)
    for field in plan.denied:
        for key in _keys(field, chat):
            value = body.get(key)
            if value is None:
                continue
            if not unchanged_value(field, value, plan):
                shown = names.get(key, key)
                raise ApiError(
                    400,
                    f"'{shown}' may not be set by the client: preset '{plan.name}' denies it",
                    param=shown,
                    code="field_denied",
                )
            del body[key]  # what the preset (or vLLM) applies is the same value
    for field, value in plan.defaults.items():
        if not any(body.get(key) is not None for key in _keys(field, chat)):
            body[field] = value
    for field, value in plan.forced.items():
        for key in _keys(field, chat):
            body.pop(key, None)
        body[field] = value
    for field, (low, high) in plan.clamps.items():
        keys = _keys(field, chat)
        if (
            field == "max_tokens"
            and high is not None
            and not any(body.get(key) is not None for key in keys)
        ):
            # Left out (or null), the limit is all the context holds: past the clamp.
            body[field] = high
            continue
        for key in keys:
            value = body.get(key)
            if value is None:
                continue
            _check_domain(key, value, names.get(key, key))
            # The bound itself, never converted to the request value's type: an integer 0
            # under a clamp [0.5, 1.5] becomes 0.5 (integer fields have integer bounds).
            if low is not None and value < low:
                body[key] = low
            elif high is not None and value > high:
                body[key] = high


def _refuse_beam_search(body: dict[str, Any], plan: SamplingPlan) -> None:
    value = body.get("use_beam_search")
    if value is None or value is False:
        return
    dropped = sorted({*plan.defaults, *plan.forced, *plan.clamps} - BEAM_SEARCH_READS)
    if dropped:
        raise ApiError(
            400,
            f"'use_beam_search' may not be set by the client: vLLM's beam search ignores "
            f"{', '.join(dropped)}, which preset '{plan.name}' sets",
            param="use_beam_search",
            code="field_denied",
        )


def merge_stop(body: dict[str, Any], stop: tuple[str, ...], shown: str = "stop") -> None:
    """Adds the policy's stop strings to the request's own (order kept, no duplicates).
    `shown`: the endpoint's name for `stop`, for the error."""
    if not stop:
        return
    requested = body.get("stop")
    if requested is None:
        body["stop"] = list(stop)
        return
    if isinstance(requested, str):
        requested = [requested]
    # A tuple: a preset's stop_strings, applied to the body before the policy's.
    if not isinstance(requested, (list, tuple)) or not all(isinstance(s, str) for s in requested):
        raise bad_request(f"'{shown}' must be a string or a list of strings", param=shown)
    body["stop"] = list(dict.fromkeys([*requested, *stop]))
