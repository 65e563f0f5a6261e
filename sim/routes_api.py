"""The simulator's other vLLM routes: `/v1/embeddings`, `/tokenize`, `/detokenize` and
`/v1/audio/transcriptions` (shapes as in vllm-transcripts/06), and what the text routes
of `routes_text.py` share: body parsing, bookkeeping, pacing, and the text plan (the same
sampler as chat, `sim.script` included, cut at `stop` unless the simulator ignores it).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from sluice.proxy.http import Request, Response
from sluice.proxy.response import JSON_HEADERS

from .config import SimConfig, SimOptions, parse_sim_options
from .errors import ApiError, api_error, model_not_found, simulated_status
from .params import parse_json
from .stats import Stats
from .text import VOCAB, chat_prompt_text, count_text_tokens, sample_tokens


class SimApp(Protocol):
    """What the routes use of their app (`server.SimApp`): its config and its stats."""

    @property
    def config(self) -> SimConfig: ...

    @property
    def stats(self) -> Stats: ...


SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8")]
EMBEDDING_DIM = 8
_FORM_MODEL = re.compile(rb'name="model"\r\n(?:[^\r\n]+\r\n)*\r\n([^\r\n]*)\r\n')
_FORM_STREAM = re.compile(rb'name="stream"\r\n(?:[^\r\n]+\r\n)*\r\n([^\r\n]*)\r\n')
# What pydantic reads as true in a form field (vLLM's TranscriptionRequest.stream).
FORM_TRUE = frozenset((b"1", b"true", b"t", b"yes", b"y", b"on"))


@dataclass
class Plan:
    pieces: list[str]  # the text deltas, one per token
    finish: str  # "stop" or "length"
    stop_reason: str | None
    prompt_tokens: int


def sse_event(name: str, obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def positive_int(body: dict[str, Any], name: str, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise api_error(400, f"{name} must be a positive integer, got {value!r}", name)
    return value


def stop_list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise api_error(400, "stop must be a string or a list of strings", "stop")


def plan_text(
    prompt: str, prompt_tokens: int, max_tokens: int, stops: tuple[str, ...], seed: int,
    sim: SimOptions,
) -> Plan:  # fmt: skip
    """The tokens to send, cut at the first stop string as vLLM cuts (not included)."""
    tokens = (
        list(sim.script[:max_tokens]) if sim.script else sample_tokens(seed, prompt, 0, max_tokens)
    )
    stops = () if sim.ignore_stop else stops
    text = ""
    ends: list[int] = []  # the text's length after each token sent
    finish, stop_reason = ("length" if len(tokens) >= max_tokens else "stop"), None
    for token in tokens:
        candidate = text + token
        hits = [(candidate.find(s), s) for s in stops if s in candidate]
        if hits:
            where, stop_reason = min(hits)
            if where > len(text):
                text = candidate[:where]
                ends.append(where)
            else:
                text = candidate[:where]  # the stop string began in text already sent
            finish = "stop"
            break
        text = candidate
        ends.append(len(text))
    # vLLM holds back what could still become a stop string (its output text buffer,
    # the longest stop string less one character) and never sends a part of one.
    holdback = max(map(len, stops)) - 1 if stops else 0
    pieces: list[str] = []
    sent = 0
    for i, end in enumerate(ends):
        limit = len(text) if i == len(ends) - 1 else min(len(text), max(sent, end - holdback))
        pieces.append(text[sent:limit])
        sent = limit
    return Plan(pieces, finish, stop_reason, prompt_tokens)


class ApiRoutes:
    """Handlers bound to one SimApp (its config and stats)."""

    def __init__(self, app: SimApp) -> None:
        self.app = app

    def table(self) -> dict[str, dict[str, Any]]:
        return {
            "/v1/embeddings": {"POST": self.embeddings},
            "/tokenize": {"POST": self.tokenize},
            "/detokenize": {"POST": self.detokenize},
            "/v1/audio/transcriptions": {"POST": self.transcriptions},
        }

    # -- shared --------------------------------------------------------------------

    def _body(self, request: Request) -> tuple[dict[str, Any], SimOptions]:
        app = self.app
        body = parse_json(request.body)
        app.stats.log_request(request, body, None)
        if not isinstance(body, dict):
            raise api_error(400, "request body must be a JSON object", "body")
        model = body.get("model") or app.config.model
        if model != app.config.model:
            raise model_not_found(str(model))
        return body, parse_sim_options(body.get("sim"), app.config)

    async def _faults(self, sim: SimOptions, path: str) -> None:
        """`sim.slow_first_byte_ms` and `sim.status` as on the chat and completions routes.
        The faults of their generation engine (`stall_after`, `close_after`,
        `error_after`) are refused with a 400 naming them: these routes pace their events
        without it, and a fault asked for must not pass silently."""
        for name in ("stall_after", "close_after", "error_after"):
            if getattr(sim, name) is not None:
                raise api_error(400, f"sim.{name} is not simulated on {path}", "sim")
        if sim.slow_first_byte_s > 0:
            self.app.stats.waiting += 1  # as the chat route counts it (vllm:num_requests_waiting)
            try:
                await asyncio.sleep(sim.slow_first_byte_s)
            finally:
                self.app.stats.waiting -= 1
        if sim.status is not None:
            raise simulated_status(sim.status, sim.retry_after)

    async def _run(self, request: Request, response: Response, handler: Any) -> None:
        stats = self.app.stats
        stats.requests += 1
        stats.active += 1
        try:
            await handler(request, response)
        except ApiError as error:
            stats.errors += 1
            response.send(error.status, error.headers, error.body)
        except asyncio.CancelledError:
            stats.aborted += 1
            raise
        finally:
            stats.active -= 1

    async def _pace(self, plan: Plan, sim: SimOptions, response: Response, render: Any) -> None:
        """Writes one rendered event per piece, at the configured TTFT and ITL."""
        await asyncio.sleep(sim.ttft_s)
        for position, piece in enumerate(plan.pieces):
            if position:
                await asyncio.sleep(sim.itl_s)
            if response.must_drain:
                await response.drain()
            if piece:  # all of it held back (a possible stop string): nothing to send yet
                response.write(render(piece))
            self.app.stats.tokens += 1

    def _finish(self, plan: Plan) -> None:
        self.app.stats.completed += 1
        self.app.stats.record_finish(plan.finish)

    # -- pooling and tokenizer ---------------------------------------------------------

    async def embeddings(self, request: Request, response: Response) -> None:
        await self._run(request, response, self._embeddings)

    async def _embeddings(self, request: Request, response: Response) -> None:
        body, sim = self._body(request)
        await self._faults(sim, "/v1/embeddings")
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if not isinstance(inputs, list) or not inputs:
            raise api_error(400, "input must be a string or a list of strings", "input")
        data = []
        tokens = 0
        for index, item in enumerate(inputs):
            text = str(item)
            tokens += count_text_tokens(text)
            values = [
                round(((sum(ord(c) for c in text) * (d + 1)) % 1000) / 1000 - 0.5, 6)
                for d in range(EMBEDDING_DIM)
            ]
            data.append({"index": index, "object": "embedding", "embedding": values})
        out = {
            "id": f"embd-{secrets.token_hex(8)}", "object": "list", "created": int(time.time()),
            "model": self.app.config.model, "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None},
        }  # fmt: skip
        response.send(200, JSON_HEADERS, orjson.dumps(out))

    async def tokenize(self, request: Request, response: Response) -> None:
        await self._run(request, response, self._tokenize)

    async def _tokenize(self, request: Request, response: Response) -> None:
        body, _ = self._body(request)
        if isinstance(body.get("messages"), list):
            text = chat_prompt_text(body["messages"])
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            raise api_error(400, "prompt or messages is required", "prompt")
        count = count_text_tokens(text)
        ids = [(sum(map(ord, text[i * 4 : i * 4 + 4])) % len(VOCAB)) for i in range(count)]
        out = {
            "count": count, "max_model_len": self.app.config.max_model_len, "tokens": ids,
            "token_strs": None,
        }  # fmt: skip
        response.send(200, JSON_HEADERS, orjson.dumps(out))

    async def detokenize(self, request: Request, response: Response) -> None:
        await self._run(request, response, self._detokenize)

    async def _detokenize(self, request: Request, response: Response) -> None:
        body, _ = self._body(request)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise api_error(400, "tokens must be a list of integers", "tokens")
        text = "".join(VOCAB[t % len(VOCAB)] for t in tokens)
        response.send(200, JSON_HEADERS, orjson.dumps({"prompt": text}))

    # -- speech to text (multipart) ----------------------------------------------------

    async def transcriptions(self, request: Request, response: Response) -> None:
        """Echoes what arrived: the form's model and the size of the upload."""
        self.app.stats.log_request(request, None, None)
        content_type = request.header(b"content-type") or ""
        if not content_type.lower().startswith("multipart/form-data"):  # as Starlette reads it
            error = api_error(400, "expected multipart/form-data", "file")
            response.send(error.status, error.headers, error.body)
            return
        match = _FORM_MODEL.search(request.body)
        model = match[1].decode("utf-8", "replace") if match else self.app.config.model
        text = f"sim transcription of {len(request.body)} bytes for {model}"
        flag = _FORM_STREAM.search(request.body)
        if flag is not None and flag[1].strip().lower() in FORM_TRUE:
            await self._run(request, response, lambda _r, out: self._transcribe(out, model, text))
            return
        response.send(200, JSON_HEADERS, orjson.dumps({"text": text, "usage": None}))

    async def _transcribe(self, response: Response, model: str, text: str) -> None:
        """`stream=true`: vLLM's `transcription.chunk` events (its TranscriptionStreamResponse
        dumped whole), a word each at the configured TTFT and ITL, then the finish chunk
        and `[DONE]`."""
        words = text.split(" ")
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        plan = Plan(pieces, "stop", None, 0)
        head: dict[str, Any] = {
            "id": "trsc-" + secrets.token_hex(16),
            "object": "transcription.chunk",
            "created": int(time.time()),
            "model": model,
        }

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            choice = {"delta": delta, "finish_reason": finish, "stop_reason": None}
            return b"data: " + orjson.dumps({**head, "choices": [choice], "usage": None}) + b"\n\n"

        def render(piece: str) -> bytes:
            return chunk({"role": None, "content": piece, "tool_calls": []}, None)

        response.start(200, SSE_HEADERS)
        await self._pace(plan, parse_sim_options(None, self.app.config), response, render)
        response.write(chunk({"role": None, "content": None, "tool_calls": []}, "stop"))
        response.write(b"data: [DONE]\n\n")
        response.end()
        self._finish(plan)
