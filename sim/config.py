"""Simulator settings: the server's defaults (`SimConfig`) and one request's resolved
knobs (`SimOptions`, from the CLI defaults overridden by the request's `sim` object)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ApiError, bad_request

# Bounds that keep a typo in a test from tying the simulator up for hours.
MAX_DELAY_MS = 600_000.0
MAX_SCRIPT_TOKENS = 100_000


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Server-wide defaults. Every timing and fault knob can be overridden per request."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port; `SimServer.port` is the bound one
    ttft_ms: float = 20.0
    itl_ms: float = 10.0
    model: str = "sim-model"
    max_tokens: int = 64  # chat's default max_tokens: our stand-in for "the remaining context"
    tokens_per_chunk: int = 1
    ignore_stop: bool = False
    seed: int = 0
    max_model_len: int = 8192
    max_logprobs: int = 20  # vLLM's --max-logprobs default: more logprobs are a 400
    api_key: str | None = None  # as `vllm serve --api-key`: /v1/* then needs the bearer token
    request_log_size: int = 100
    # A drifting backend for `sluice verify`'s own tests: include_usage is ignored.
    drop_usage_chunk: bool = False
    # Prefix cache model (sim/prefixcache.py): LRU capacity in 16-token blocks, and the
    # prefill time of one uncached block. Both 0: no model, TTFT is ttft_ms alone.
    prefix_cache_blocks: int = 0
    prefill_ms_per_block: float = 0.0
    # Close a keep-alive connection idle this long, as vLLM's server (uvicorn) does after
    # 5 s; None: the HTTP server's own long default.
    keepalive_timeout_s: float | None = None
    # vLLM's VLLM_ENABLE_RESPONSES_API_STORE=1: `/v1/responses` keeps what it answers (in
    # this process, as vLLM does) for `GET /v1/responses/{id}` and `previous_response_id`.
    responses_store: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.ttft_ms <= MAX_DELAY_MS:
            problems.append(f"ttft_ms must be in [0, {MAX_DELAY_MS:g}], got {self.ttft_ms}")
        if not 0 <= self.itl_ms <= MAX_DELAY_MS:
            problems.append(f"itl_ms must be in [0, {MAX_DELAY_MS:g}], got {self.itl_ms}")
        if self.max_tokens < 1:
            problems.append(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.tokens_per_chunk < 1:
            problems.append(f"tokens_per_chunk must be at least 1, got {self.tokens_per_chunk}")
        if self.max_model_len < 2:
            problems.append(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.max_logprobs < 0:
            problems.append(f"max_logprobs must be at least 0, got {self.max_logprobs}")
        if not 0 <= self.prefix_cache_blocks <= 100_000_000:
            problems.append(
                f"prefix_cache_blocks must be in [0, 100000000], got {self.prefix_cache_blocks}"
            )
        if not 0 <= self.prefill_ms_per_block <= 1000:
            problems.append(
                f"prefill_ms_per_block must be in [0, 1000], got {self.prefill_ms_per_block}"
            )
        if self.keepalive_timeout_s is not None and not 0 < self.keepalive_timeout_s <= 3600:
            problems.append(
                f"keepalive_timeout must be in (0, 3600] seconds, got {self.keepalive_timeout_s}"
            )
        if not self.model:
            problems.append("model must not be empty")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True, slots=True)
class SimOptions:
    """One request's timing and faults, with the server defaults filled in."""

    script: tuple[str, ...] | None
    tokens_per_chunk: int
    ttft_s: float
    itl_s: float
    stall_after: int | None
    close_after: int | None
    error_after: int | None
    slow_first_byte_s: float
    status: int | None
    retry_after: int | None  # the Retry-After header sent with `status`
    keepalive_s: float | None
    empty_deltas: int
    ignore_stop: bool
    drop_usage_chunk: bool = False


def default_options(config: SimConfig) -> SimOptions:
    return SimOptions(
        script=None,
        tokens_per_chunk=config.tokens_per_chunk,
        ttft_s=config.ttft_ms / 1000.0,
        itl_s=config.itl_ms / 1000.0,
        stall_after=None,
        close_after=None,
        error_after=None,
        slow_first_byte_s=0.0,
        status=None,
        retry_after=None,
        keepalive_s=None,
        empty_deltas=0,
        ignore_stop=config.ignore_stop,
        drop_usage_chunk=config.drop_usage_chunk,
    )


_KNOWN_KEYS = frozenset(
    {
        "script",
        "tokens_per_chunk",
        "ttft_ms",
        "itl_ms",
        "stall_after",
        "close_after",
        "error_after",
        "slow_first_byte_ms",
        "status",
        "retry_after",
        "keepalive_comments_ms",
        "empty_deltas",
        "ignore_stop",
    }
)


def _sim_error(message: str) -> ApiError:
    return bad_request(f"sim: {message}", "sim")


def _count(raw: dict[str, object], key: str, minimum: int) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _sim_error(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _millis(raw: dict[str, object], key: str, positive: bool = False) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _sim_error(f"{key} must be a number of milliseconds, got {value!r}")
    if value > MAX_DELAY_MS or value < 0 or (positive and value == 0):
        bound = "(0" if positive else "[0"
        raise _sim_error(f"{key} must be in {bound}, {MAX_DELAY_MS:g}], got {value!r}")
    return float(value) / 1000.0


def parse_sim_options(raw: object, config: SimConfig) -> SimOptions:
    """The request's `sim` object over the server defaults. Unlike the OpenAI fields, an
    unknown or mistyped key here is a 400: a typo in a test should fail loudly."""
    base = default_options(config)
    if raw is None:
        return base
    if not isinstance(raw, dict):
        raise _sim_error(f"must be an object, got {raw!r}")
    unknown = sorted(str(key) for key in raw if key not in _KNOWN_KEYS)
    if unknown:
        raise _sim_error(f"unknown keys {unknown}; known: {sorted(_KNOWN_KEYS)}")

    script = raw.get("script")
    if script is not None and (
        not isinstance(script, list)
        or not all(isinstance(token, str) for token in script)
        or len(script) > MAX_SCRIPT_TOKENS
    ):
        raise _sim_error(f"script must be a list of at most {MAX_SCRIPT_TOKENS} strings")

    status = _count(raw, "status", 100)
    if status is not None and status > 599:
        raise _sim_error(f"status must be an HTTP status (100-599), got {status}")

    empty = raw.get("empty_deltas")
    if empty is None or empty is False:
        empty_deltas = 0
    elif empty is True:
        empty_deltas = 1
    elif isinstance(empty, int) and 0 <= empty <= 100:
        empty_deltas = empty
    else:
        raise _sim_error(f"empty_deltas must be a boolean or an integer 0-100, got {empty!r}")

    ignore_stop = raw.get("ignore_stop")
    if ignore_stop is not None and not isinstance(ignore_stop, bool):
        raise _sim_error(f"ignore_stop must be a boolean, got {ignore_stop!r}")

    tokens_per_chunk = _count(raw, "tokens_per_chunk", 1)
    ttft = _millis(raw, "ttft_ms")
    itl = _millis(raw, "itl_ms")
    slow = _millis(raw, "slow_first_byte_ms")
    return SimOptions(
        script=None if script is None else tuple(script),
        tokens_per_chunk=base.tokens_per_chunk if tokens_per_chunk is None else tokens_per_chunk,
        ttft_s=base.ttft_s if ttft is None else ttft,
        itl_s=base.itl_s if itl is None else itl,
        stall_after=_count(raw, "stall_after", 0),
        close_after=_count(raw, "close_after", 0),
        error_after=_count(raw, "error_after", 0),
        slow_first_byte_s=0.0 if slow is None else slow,
        status=None if status == 200 else status,
        retry_after=_count(raw, "retry_after", 0),
        keepalive_s=_millis(raw, "keepalive_comments_ms", positive=True),
        empty_deltas=empty_deltas,
        ignore_stop=base.ignore_stop if ignore_stop is None else ignore_stop,
        drop_usage_chunk=base.drop_usage_chunk,
    )
