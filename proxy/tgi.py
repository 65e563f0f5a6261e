"""The TGI protocol (`POST /generate`, `/generate_stream`, `/`) on the route's vLLM
completions endpoint.

A TGI request is translated into a completions body (TGI's parameter names mapped onto
vLLM's: `max_new_tokens` -> `max_tokens`, `do_sample: false` -> `temperature: 0`,
`grammar` -> `structured_outputs`, ...), then the preset and policy apply to that body
exactly as to a completions request, and the completions stream, guarded by the usual
ChunkFilter, is rewritten into TGI events:
`data:{"index":0,"token":{"id","text","logprob","special"},"generated_text","details"}`,
`generated_text` and `details` on the last event only, no `[DONE]`. One event per vLLM
chunk (a chunk can hold several tokens). vLLM's completions give no token ids here, so
`id` is 0 and `logprob` null. Errors use TGI's shape `{"error", "error_type"}`.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from . import lenientjson
from .adapters import Adapter
from .chunks import ChunkFilter
from .errors import ApiError
from .exchange import Exchange
from .http import Header
from .nonstream import guard_completion
from .response import JSON_HEADERS
from .routing import RouteChoice
from .snapshot import App, StreamPolicy
from .sse import data_of
from .stopwords import GuardSpec
from .timeouts import StreamWatchdog

TGI_PATHS: Final = ("/", "/generate", "/generate_stream")
# TGI parameter -> vLLM completions field, copied as they are.
_SAME: Final = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repetition_penalty": "repetition_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
    "stop": "stop",
    "max_new_tokens": "max_tokens",
    "truncate": "truncate_prompt_tokens",
}
# Accepted and answered by sluice itself (they change the reply, not the sampling).
_LOCAL: Final = ("details", "return_full_text", "do_sample", "grammar", "top_n_tokens")
# TGI parameters vLLM cannot honour: refused (when set to anything but their default).
_UNSUPPORTED: Final = {
    "watermark": False,
    "decoder_input_details": False,
    "typical_p": None,
    "best_of": 1,
    "adapter_id": None,
}
_TGI_FIELDS: Final = ("inputs", "parameters", "stream")
# Top-level completions fields that would make more than the one text TGI answers (the
# stream filter reads one choice): refused at any other value.
_ONE_TEXT: Final = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False)}
_FINISH: Final = {"length": "length", "stop": "eos_token", "content_filter": "stop_sequence"}


def tgi_error(status: int, message: str, error_type: str) -> ApiError:
    exc = ApiError(status, message, code=error_type)
    exc.type = error_type
    return exc


def translate(body: dict[str, Any], stream: bool) -> dict[str, Any]:
    """A TGI request body -> a vLLM completions body; raises a TGI validation error."""
    inputs = body.get("inputs")
    if not isinstance(inputs, str):
        raise tgi_error(422, "`inputs` must be a string", "validation")
    params = body.get("parameters")
    if params is None:  # absent, or null: TGI's defaults
        params = {}
    elif not isinstance(params, dict):  # [], "", 0 and false too (they passed as {})
        raise tgi_error(422, "`parameters` must be an object", "validation")
    for name, default in _UNSUPPORTED.items():
        value = params.get(name)
        if value is not None and value != default:
            raise tgi_error(
                422, f"`{name}` is not supported by this server (vLLM backend)", "validation"
            )
    unknown = sorted(
        k for k in params if k not in _SAME and k not in _LOCAL and k not in _UNSUPPORTED
    )
    if unknown:
        raise tgi_error(422, f"unknown parameters: {', '.join(unknown)}", "validation")
    for name, allowed in _ONE_TEXT.items():
        if body.get(name) not in allowed:
            raise tgi_error(422, f"`{name}` is not supported: TGI answers one text", "validation")
    # Other top-level fields pass through, as unknown fields of an OpenAI body do.
    out: dict[str, Any] = {k: v for k, v in body.items() if k not in _TGI_FIELDS}
    out["prompt"] = inputs
    for tgi_name, vllm_name in _SAME.items():
        value = params.get(tgi_name)
        if value is not None:
            out[vllm_name] = value
    if params.get("do_sample") is False and "temperature" not in out:
        out["temperature"] = 0.0  # greedy, as TGI's do_sample=false means
    top_n = params.get("top_n_tokens")
    if top_n is not None:
        out["logprobs"] = top_n
    grammar = params.get("grammar")
    if grammar is not None:
        out["structured_outputs"] = _grammar(grammar)
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def _grammar(grammar: Any) -> dict[str, Any]:
    if not isinstance(grammar, dict) or "type" not in grammar:
        raise tgi_error(
            422, '`grammar` must be {"type": "json"|"regex", "value": ...}', "validation"
        )
    kind = grammar["type"]
    value = grammar.get("value")
    if kind == "json":
        return {"json": value}
    if kind == "regex" and isinstance(value, str):
        return {"regex": value}
    if kind == "json_object":
        return {"json_object": True}
    raise tgi_error(422, f"unsupported grammar type {kind!r}", "validation")


def _details(finish: str | None, stop_reason: Any, tokens: int, seed: Any) -> dict[str, Any]:
    reason = _FINISH.get(finish or "length", "length")
    if finish == "stop" and isinstance(stop_reason, str):
        reason = "stop_sequence"
    return {"finish_reason": reason, "generated_tokens": tokens, "seed": seed}


class TgiStreamFilter(ChunkFilter):
    """The completions ChunkFilter (timers, guard) with its output rewritten to TGI
    events. Tokens are counted from the usage chunk vLLM sends last."""

    __slots__ = ("ended", "final", "prefix", "seed", "text", "tokens")

    def __init__(
        self,
        ex: Exchange,
        guard_spec: GuardSpec | None,
        watchdog: StreamWatchdog | None,
        prefix: str,
        seed: Any,
    ) -> None:
        super().__init__(ex, False, guard_spec, 1, watchdog)
        self.text: list[str] = []
        self.prefix = prefix
        self.seed = seed
        self.tokens = 0
        self.final: tuple[str, str | None, Any] | None = None  # last text, finish, stop_reason
        self.ended = False  # the final event or an error event went out

    def observe(self, event: bytes, text: str = "") -> bytes:
        return self._to_tgi(super().observe(event, text))

    def guarded(self, event: bytes, text: str = "") -> bytes | None:
        out = super().guarded(event, text)
        return None if out is None else self._to_tgi(out)

    def eof_tail(self) -> bytes:
        """The backend ended without [DONE]: the final event if its finish came, else
        TGI's `incomplete_generation` error, so the client never reads a stream that just
        stops (a TGI stream's last event carries `generated_text`)."""
        out = self._to_tgi(self.flush_held())
        if self.final is None and not self.ended:
            self.ended = True
            return out + _event(
                {
                    "error": "the backend ended the stream before the generation finished",
                    "error_type": "incomplete_generation",
                }
            )
        return out + self._last()

    def _to_tgi(self, data: bytes) -> bytes:
        parts: list[bytes] = []
        for event in data.split(b"\n\n"):
            _, data_lines = data_of(event + b"\n\n")  # what a client reads: id:, event: aside
            if data_lines is None:
                continue
            payload = data_lines.strip()
            if payload == b"[DONE]":
                parts.append(self._last())
                continue
            obj = lenientjson.read(payload)
            if not isinstance(obj, dict):
                continue
            error = obj.get("error")
            if error is not None:
                message = error.get("message") if isinstance(error, dict) else str(error)
                parts.append(_event({"error": message, "error_type": "generation"}))
                self.ended = True
                continue
            usage = obj.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                self.tokens = usage["completion_tokens"]
            choices = obj.get("choices")
            for choice in choices if isinstance(choices, list) else ():
                if not isinstance(choice, dict):
                    continue  # not a completion's choice: nothing of it is a TGI token
                text = choice.get("text")
                if not isinstance(text, str):
                    text = ""
                finish = choice.get("finish_reason")
                if not isinstance(finish, str):
                    finish = None
                if finish is None:
                    if text:
                        self.text.append(text)
                        parts.append(_token_event(text, None))
                else:
                    self.final = (text, finish, choice.get("stop_reason"))
        return b"".join(parts)

    def _last(self) -> bytes:
        if self.final is None:
            return b""
        text, finish, stop_reason = self.final
        self.final = None
        self.ended = True
        self.text.append(text)
        generated = self.prefix + "".join(self.text)
        tokens = self.tokens or self.ex.completion_tokens or self.ex.content_chunks
        details = _details(finish, stop_reason, tokens, self.seed)
        special = not text and finish == "stop" and not isinstance(stop_reason, str)
        return _token_event(text, (generated, details), special)


def _token_event(
    text: str, last: tuple[str, dict[str, Any]] | None, special: bool = False
) -> bytes:
    obj: dict[str, Any] = {
        "index": 0,
        "token": {"id": 0, "text": text, "logprob": None, "special": special},
        "generated_text": None if last is None else last[0],
        "details": None if last is None else last[1],
    }
    return _event(obj)


def _event(obj: Any) -> bytes:
    return b"data:" + lenientjson.write(obj) + b"\n\n"  # a lone surrogate: escaped


def _error_type(exc: ApiError) -> str:
    """TGI's `error_type` for the error."""
    if exc.type in ("validation", "generation", "overloaded"):
        return exc.type
    if exc.status in (429, 503):
        return "overloaded"
    return "validation" if exc.status < 500 else "generation"


class TgiAdapter(Adapter):
    """One TGI route: `/generate_stream` always streams, `/generate` never does, `/`
    follows the body's `stream` (and answers a list, as TGI's compat route does)."""

    upstream_path = b"/v1/completions"
    chat = False
    model_optional = True
    reshape_errors = True
    resumable = False

    def __init__(self, path: str) -> None:
        self.name = f"TGI {path}"
        self.path = path

    def begin(self, body: dict[str, Any]) -> tuple[Adapter, dict[str, Any]]:
        stream = self.path == "/generate_stream" or (
            self.path == "/" and body.get("stream") is True
        )
        translated = translate(body, stream)
        params = body.get("parameters") or {}  # an object or None: translate checked it
        adapter = TgiRequestAdapter(
            self.path,
            details=params.get("details") is True,
            prefix=body["inputs"] if params.get("return_full_text") is True else "",
            seed=params.get("seed"),
        )
        return adapter, translated

    def error_response(self, exc: ApiError) -> tuple[list[Header], bytes]:
        body = orjson.dumps({"error": exc.message, "error_type": _error_type(exc)})
        return [*JSON_HEADERS, *exc.headers], body

    def stream_refusal(self, exc: ApiError, relayed: dict[str, object] | None = None) -> bytes:
        """TGI's error event, its `error_type` as in `error_response` (`overloaded` for a
        limit): huggingface_hub raises its OverloadedError for it."""
        return _event({"error": exc.message, "error_type": _error_type(exc)})

    def stream_error(
        self, message: str, type: str, code: str, chunk_filter: ChunkFilter | None = None
    ) -> bytes:
        return _event({"error": message, "error_type": "generation"})


class TgiRequestAdapter(TgiAdapter):
    """A TGI adapter bound to one request's reply options."""

    def __init__(self, path: str, *, details: bool, prefix: str, seed: Any) -> None:
        super().__init__(path)
        self.details = details
        self.prefix = prefix
        self.seed = seed

    def prepare(
        self, body: dict[str, Any], choice: RouteChoice, app: App | None = None
    ) -> tuple[dict[str, Any], bool]:
        return super().prepare(body, choice, app)[0], True  # a translated body is always new

    def chunk_filter(
        self, ex: Exchange, policy: StreamPolicy, n_choices: int, watchdog: StreamWatchdog | None
    ) -> ChunkFilter:
        return TgiStreamFilter(ex, policy.guard, watchdog, self.prefix, self.seed)

    def rewrite_body(self, obj: Any, policy: StreamPolicy, ex: Exchange) -> Any | None:
        # No completion to translate (not JSON, not an object, no choice with a text): the
        # backend's fault, not the client's, so a 502 rather than a `generated_text` of "".
        choices = obj.get("choices") if isinstance(obj, dict) else None
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict) or not isinstance(choice.get("text"), str):
            ex.upstream_error = "unexpected_body"
            raise ApiError(
                502,
                "backend answered an unexpected body",
                type="upstream_error",
                code="upstream_error",
            )
        if policy.guard is not None:
            guard_completion(obj, policy.guard, False, ex)  # changes `choice` in place
        usage = obj.get("usage")
        if not isinstance(usage, dict):
            usage = {}
        ex.record_usage(usage)
        finish = choice.get("finish_reason")
        if not isinstance(finish, str):
            finish = None
        ex.finish_reason = finish or ex.finish_reason
        out: dict[str, Any] = {"generated_text": self.prefix + choice["text"]}
        if self.details:
            tokens = usage.get("completion_tokens")
            out["details"] = _details(
                finish,
                choice.get("stop_reason"),
                tokens if type(tokens) is int else 0,
                self.seed,
            ) | {"prefill": [], "tokens": [], "best_of_sequences": None}
        return [out] if self.path == "/" else out


__all__ = ["TGI_PATHS", "TgiAdapter", "TgiRequestAdapter", "translate"]
