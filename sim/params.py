"""Request bodies of /v1/chat/completions and /v1/completions, validated in vLLM's order.

vLLM validates in stages and the first failure decides the answer: the content type, the
JSON, pydantic's `mode="before"` model validators (stream_options, top_logprobs), field
types, then the served model (404), the context length, and finally SamplingParams
(n, the penalties, temperature, top_p, top_k, min_p, max_tokens, min_tokens, logprobs).
Unknown fields are accepted and ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

import orjson

from .config import SimConfig, SimOptions
from .errors import (
    bad_request,
    field_error,
    json_invalid,
    model_not_found,
    model_value_error,
    param_error,
    unsupported_media_type,
)
from .text import chat_prompt_text, count_chat_tokens, count_text_tokens

Kind = Literal["chat", "completion"]

_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
MAX_N = 1024  # choices per request the simulator serves
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """A validated generation request: what the simulator needs, nothing more."""

    kind: Kind
    model: str
    prompts: tuple[str, ...]  # hashed for the seed; chat has one
    prompt_tokens: tuple[int, ...]  # per prompt
    n: int
    max_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    stop: tuple[str, ...]
    include_stop_str: bool
    logprobs: int | None  # None: off; chat: top_logprobs count; completions: `logprobs`
    seed: int
    request_id: str | None  # from the body; the X-Request-Id header wins over it
    sim: SimOptions


def check_content_type(content_type: str | None) -> None:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise unsupported_media_type()


def parse_json(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    # FastAPI reports Python's json position and reason; orjson's wording differs.
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise json_invalid(exc.pos, exc.msg) from None
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise json_invalid(0, str(exc)) from None


def _loc(name: str) -> tuple[str, ...]:
    return ("body", name)


def _as_int(body: dict[str, object], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        msg = "Input should be a valid integer, got a number with a fractional part"
        raise field_error("int_from_float", _loc(name), msg, value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            msg = "Input should be a valid integer, unable to parse string as an integer"
            raise field_error("int_parsing", _loc(name), msg, value) from None
    raise field_error("int_type", _loc(name), "Input should be a valid integer", value)


def _as_float(body: dict[str, object], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            msg = "Input should be a valid number, unable to parse string as a number"
            raise field_error("float_parsing", _loc(name), msg, value) from None
    raise field_error("float_type", _loc(name), "Input should be a valid number", value)


def _as_bool(container: dict[str, object], name: str, loc: tuple[str, ...]) -> bool | None:
    value = container.get(name)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, str | int | float):
        msg = "Input should be a valid boolean, unable to interpret input"
        raise field_error("bool_parsing", loc, msg, value)
    raise field_error("bool_type", loc, "Input should be a valid boolean", value)


def _as_stop(body: dict[str, object]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list):
        for position, item in enumerate(value):
            if not isinstance(item, str):
                msg = "Input should be a valid string"
                raise field_error("string_type", ("body", "stop", "list[str]", position), msg, item)
        return tuple(item for item in value if item)
    raise field_error(
        "string_type", ("body", "stop", "str"), "Input should be a valid string", value
    )


def _stream_options(body: dict[str, object], stream: bool) -> tuple[bool, bool]:
    options = body.get("stream_options")
    if options is None:
        return False, False
    if not isinstance(options, dict):
        msg = "Input should be a valid dictionary or instance of StreamOptions"
        raise field_error("model_type", _loc("stream_options"), msg, options)
    loc = ("body", "stream_options")
    include = _as_bool(options, "include_usage", (*loc, "include_usage")) or False
    continuous = _as_bool(options, "continuous_usage_stats", (*loc, "continuous_usage_stats"))
    # vLLM: continuous usage only rides along with include_usage.
    return include and stream, bool(include and continuous and stream)


def _before_validators(kind: Kind, body: dict[str, object]) -> None:
    """vLLM's `mode="before"` model validators, which run ahead of field validation."""
    if body.get("stream_options") and not body.get("stream"):
        message = "Stream options can only be defined when `stream=True`."
        raise model_value_error(message, "stream_options", body)
    if kind == "chat":
        top = body.get("top_logprobs")
        if isinstance(top, int | float) and not isinstance(top, bool):
            if top < 0 and top != -1:
                raise model_value_error(
                    "`top_logprobs` must be a positive value.", "top_logprobs", body
                )
            if top > 0 and not body.get("logprobs"):
                message = "when using `top_logprobs`, `logprobs` must be set to true."
                raise model_value_error(message, "top_logprobs", body)


def _completion_prompts(body: dict[str, object]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if "prompt" not in body:
        raise field_error("missing", _loc("prompt"), "Field required", body)
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return (prompt,), (count_text_tokens(prompt),)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(item, str) for item in prompt):
            texts = tuple(str(item) for item in prompt)
            return texts, tuple(count_text_tokens(text) for text in texts)
        if all(isinstance(item, int) and not isinstance(item, bool) for item in prompt):
            return (repr(prompt),), (len(prompt),)
        if all(isinstance(item, list) and item for item in prompt):
            token_lists = [item for item in prompt if isinstance(item, list)]
            return tuple(repr(ids) for ids in token_lists), tuple(len(ids) for ids in token_lists)
    msg = "Input should be a valid string"
    raise field_error("string_type", ("body", "prompt", "str"), msg, prompt)


def _chat_prompt(body: dict[str, object]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if "messages" not in body:
        raise field_error("missing", _loc("messages"), "Field required", body)
    messages = body["messages"]
    if not isinstance(messages, list):
        raise field_error("list_type", _loc("messages"), "Input should be a valid list", messages)
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            msg = "Input should be a valid dictionary"
            raise field_error("dict_type", ("body", "messages", position), msg, message)
    return (chat_prompt_text(messages),), (count_chat_tokens(messages),)


@dataclass(frozen=True, slots=True)
class _Sampling:
    """The sampling fields the simulator only validates (it does not sample), with
    vLLM's messages (vllm/sampling_params.py, `_verify_args`)."""

    presence_penalty: float | None
    frequency_penalty: float | None
    repetition_penalty: float | None
    top_k: int | None
    min_p: float | None
    min_tokens: int | None

    def check_penalties(self) -> None:
        for name, value in (
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ):
            if value is not None and not -2.0 <= value <= 2.0:
                raise bad_request(f"{name} must be in [-2, 2], got {value}.")
        penalty = self.repetition_penalty
        if penalty is not None:
            if not math.isfinite(penalty):
                raise bad_request(f"repetition_penalty must be a finite number, got {penalty}.")
            if penalty <= 0.0:
                raise bad_request(f"repetition_penalty must be greater than zero, got {penalty}.")

    def check_top_k_and_min_p(self) -> None:
        if self.top_k is not None and self.top_k < -1:  # -1 (disabled) is still taken
            raise bad_request(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise bad_request(f"min_p must be in [0, 1], got {self.min_p}.")

    def check_min_tokens(self, max_tokens: int) -> None:
        min_tokens = self.min_tokens or 0
        if min_tokens < 0:
            raise bad_request(f"min_tokens must be greater than or equal to 0, got {min_tokens}.")
        if min_tokens > max_tokens:
            raise bad_request(
                f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
                f"got {min_tokens}."
            )


def parse_generation(
    kind: Kind, body: object, config: SimConfig, sim: SimOptions
) -> GenerationParams:
    """Validates a parsed body; raises ApiError with vLLM's status, shape and message."""
    if not isinstance(body, dict):
        msg = "Input should be a valid dictionary or object to extract fields from"
        raise field_error("model_attributes_type", ("body",), msg, body)
    _before_validators(kind, body)

    prompts, prompt_tokens = _chat_prompt(body) if kind == "chat" else _completion_prompts(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise field_error("string_type", _loc("model"), "Input should be a valid string", model)
    stream = _as_bool(body, "stream", _loc("stream")) or False
    include_usage, continuous = _stream_options(body, stream)
    n = _as_int(body, "n")
    seed = _as_int(body, "seed")
    temperature = _as_float(body, "temperature")
    top_p = _as_float(body, "top_p")
    max_tokens = _as_int(body, "max_tokens")
    if kind == "chat":
        # vLLM: `max_completion_tokens or max_tokens`.
        max_tokens = _as_int(body, "max_completion_tokens") or max_tokens
        top_logprobs = _as_int(body, "top_logprobs") or 0
        wants_logprobs = _as_bool(body, "logprobs", _loc("logprobs")) or False
        logprobs = top_logprobs if wants_logprobs else None
    else:
        logprobs = _as_int(body, "logprobs")
    sampling = _Sampling(
        presence_penalty=_as_float(body, "presence_penalty"),
        frequency_penalty=_as_float(body, "frequency_penalty"),
        repetition_penalty=_as_float(body, "repetition_penalty"),
        top_k=_as_int(body, "top_k"),
        min_p=_as_float(body, "min_p"),
        min_tokens=_as_int(body, "min_tokens"),
    )
    stop = _as_stop(body)
    include_stop_str = (
        _as_bool(body, "include_stop_str_in_output", _loc("include_stop_str_in_output")) or False
    )
    request_id = body.get("request_id")

    served = model if model else config.model
    if served != config.model:
        raise model_not_found(served)

    prompt_max = max(prompt_tokens)
    if max_tokens is not None and max_tokens > config.max_model_len:
        raise param_error(
            f"max_tokens={max_tokens} cannot be greater than "
            f"max_model_len=max_total_tokens={config.max_model_len}. "
            "Please request fewer output tokens.",
            "max_tokens",
            max_tokens,
        )
    if max_tokens is None:
        if kind == "completion":
            max_tokens = 16
        else:
            max_tokens = max(1, min(config.max_tokens, config.max_model_len - prompt_max))
    if max_tokens >= 1 and prompt_max + max_tokens > config.max_model_len:
        raise param_error(
            f"This model's maximum context length is {config.max_model_len} tokens. "
            f"However, you requested {max_tokens} output tokens and your prompt contains "
            f"at least {prompt_max} input tokens, for a total of at least "
            f"{prompt_max + max_tokens} tokens. Please reduce the length of the input prompt "
            "or the number of requested output tokens.",
            "input_tokens",
            prompt_max,
        )

    # SamplingParams._verify_args, in its order (the ones without a parameter name
    # answer param null, as n's does).
    if n is not None and n < 1:
        raise bad_request(f"n must be at least 1, got {n}.")
    if n is not None and n > MAX_N:
        # The simulator's own bound, not vLLM's: it builds every choice in memory, and
        # `"n": 1e20` grew one to 23 GB until the kernel killed it (a shared test machine).
        raise bad_request(f"n must be at most {MAX_N} in the simulator, got {n}.")
    sampling.check_penalties()
    if temperature is not None and temperature < 0:
        raise param_error(
            f"temperature must be non-negative, got {temperature}.", "temperature", temperature
        )
    if top_p is not None and not 0 < top_p <= 1:
        raise param_error(f"top_p must be in (0, 1], got {top_p}.", "top_p", top_p)
    sampling.check_top_k_and_min_p()
    if max_tokens < 1:
        raise param_error(
            f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens", max_tokens
        )
    sampling.check_min_tokens(max_tokens)
    if logprobs is not None and logprobs < 0:
        raise param_error(f"logprobs must be non-negative, got {logprobs}.", "logprobs", logprobs)
    # The engine's own check, after SamplingParams: a huge count also had the simulator
    # build that many alternatives per token, holding its event loop for minutes.
    if logprobs is not None and logprobs > config.max_logprobs:
        raise param_error(
            f"Requested sample logprobs of {logprobs}, which is greater than max allowed: "
            f"{config.max_logprobs}",
            "logprobs",
            logprobs,
        )

    return GenerationParams(
        kind=kind,
        model=served,
        prompts=prompts,
        prompt_tokens=prompt_tokens,
        n=n or 1,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous,
        stop=() if sim.ignore_stop else stop,
        include_stop_str=include_stop_str,
        logprobs=logprobs,
        seed=config.seed if seed is None else seed,
        request_id=request_id if isinstance(request_id, str) and request_id else None,
        sim=sim,
    )
