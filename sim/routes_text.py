"""The simulator's `/v1/responses` and `/v1/messages`.

Shapes follow vLLM 0.26: the Messages API as `vllm/entrypoints/anthropic/serving.py`
converts a chat stream (named events, then `data: [DONE]`); the Responses API as OpenAI's
event types (named events, no `[DONE]`), keys in the order of the pydantic models. Tokens
are paced with sleeps instead of the scheduler: these routes exist for client and policy
tests, not for load.

With `responses_store` (vLLM's VLLM_ENABLE_RESPONSES_API_STORE=1) a response asked with
`store` (the default) is kept in this process, as vLLM keeps it in its server's memory:
`GET /v1/responses/{id}` answers it, `POST /v1/responses/{id}/cancel` refuses it (it is not
a background one) and `previous_response_id` may name it. An id this process does not
hold is vLLM's 404, whichever replica made it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import orjson
from sluice.proxy.http import Request, Response
from sluice.proxy.response import JSON_HEADERS
from sluice.proxy.sse import DONE_EVENT

from .errors import api_error, field_error
from .routes_api import (
    SSE_HEADERS,
    ApiRoutes,
    plan_text,
    positive_int,
    sse_event,
    stop_list,
)
from .text import chat_prompt_text, count_chat_tokens

STORED_PREFIX = "/v1/responses/"
# vLLM never evicts (it warns of the leak); the simulator keeps the newest, for soak runs.
STORE_LIMIT = 10_000


class TextRoutes(ApiRoutes):
    """ApiRoutes plus the two text-generating routes and the stored responses."""

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self.stored: dict[str, dict[str, Any]] = {}

    def table(self) -> dict[str, dict[str, Any]]:
        return {
            **super().table(),
            "/v1/responses": {"POST": self.responses},
            "/v1/messages": {"POST": self.messages},
        }

    def stored_routes(self, path: str) -> dict[str, Any] | None:
        """`GET /v1/responses/{response_id}` and `POST .../{response_id}/cancel`, matched
        as FastAPI matches them (the id is one path segment); None: no such route."""
        rest = path[len(STORED_PREFIX) :] if path.startswith(STORED_PREFIX) else ""
        handlers: dict[str, Any] = {"GET": self.retrieve}
        if rest.endswith("/cancel"):
            rest = rest[: -len("/cancel")]
            handlers = {"POST": self.cancel}
        return handlers if rest and "/" not in rest else None

    # -- stored responses ----------------------------------------------------------------

    def _stored(self, response_id: str) -> dict[str, Any]:
        if not response_id.startswith("resp_"):
            raise api_error(
                400,
                f"Invalid 'response_id': '{response_id}'. Expected an ID that begins with 'resp'.",
                "response_id",
            )
        found = self.stored.get(response_id)
        if found is None:
            raise api_error(404, f"Response with id '{response_id}' not found.", "response_id")
        return found

    def _keep(self, obj: dict[str, Any]) -> None:
        self.stored[obj["id"]] = obj
        if len(self.stored) > STORE_LIMIT:
            del self.stored[next(iter(self.stored))]

    async def retrieve(self, request: Request, response: Response) -> None:
        await self._run(request, response, self._retrieve)

    async def _retrieve(self, request: Request, response: Response) -> None:
        self.app.stats.log_request(request, None, None)
        found = self._stored(request.path[len(STORED_PREFIX) :])
        response.send(200, JSON_HEADERS, orjson.dumps(found))

    async def cancel(self, request: Request, response: Response) -> None:
        await self._run(request, response, self._cancel)

    async def _cancel(self, request: Request, response: Response) -> None:
        self.app.stats.log_request(request, None, None)
        found = self._stored(request.path[len(STORED_PREFIX) : -len("/cancel")])
        if found["status"] not in ("queued", "in_progress"):  # no background mode here
            raise api_error(400, "Cannot cancel a synchronous response.", "response_id")
        response.send(200, JSON_HEADERS, orjson.dumps(found))

    # -- /v1/responses -----------------------------------------------------------------

    async def responses(self, request: Request, response: Response) -> None:
        await self._run(request, response, self._responses)

    async def _responses(self, request: Request, response: Response) -> None:
        body, sim = self._body(request)
        await self._faults(sim, "/v1/responses")
        previous = body.get("previous_response_id")
        if previous is not None:  # checked before anything runs, as vLLM does
            if not isinstance(previous, str):
                loc = ("body", "previous_response_id")
                raise field_error("string_type", loc, "Input should be a valid string", previous)
            self._stored(previous)
        keep = self.app.config.responses_store and body.get("store", True) is not False
        raw_input = body.get("input")
        if isinstance(raw_input, str):
            messages: list[Any] = [{"role": "user", "content": raw_input}]
        elif isinstance(raw_input, list):
            messages = [m for m in raw_input if isinstance(m, dict)]
        else:
            raise api_error(400, "input must be a string or a list of items", "input")
        if isinstance(body.get("instructions"), str):
            messages.insert(0, {"role": "system", "content": body["instructions"]})
        max_tokens = positive_int(body, "max_output_tokens", self.app.config.max_tokens)
        given = body.get("seed")
        seed = given if isinstance(given, int) else self.app.config.seed
        plan = plan_text(
            chat_prompt_text(messages), count_chat_tokens(messages), max_tokens,
            stop_list(body.get("stop")), seed, sim,
        )  # fmt: skip
        rid = f"resp_{secrets.token_hex(16)}"
        item_id = f"msg_{secrets.token_hex(16)}"
        created = int(time.time())

        def response_obj(status: str, text: str | None) -> dict[str, Any]:
            output = []
            if text is not None:
                output = [self._message_item(item_id, text, "completed")]
            usage = None
            if text is not None:
                usage = {
                    "input_tokens": plan.prompt_tokens,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": len(plan.pieces),
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": plan.prompt_tokens + len(plan.pieces),
                }
            incomplete = plan.finish == "length" and status != "in_progress"
            return {
                "id": rid, "created_at": created,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "instructions": body.get("instructions"), "metadata": None,
                "model": self.app.config.model, "object": "response", "output": output,
                "parallel_tool_calls": True, "temperature": body.get("temperature", 1.0),
                "tool_choice": "auto", "tools": [], "top_p": body.get("top_p", 1.0),
                "background": False, "max_output_tokens": max_tokens, "max_tool_calls": None,
                "previous_response_id": previous, "prompt": None, "reasoning": None,
                "service_tier": "auto",
                "status": "incomplete" if incomplete else status,
                "text": None, "top_logprobs": None, "truncation": "disabled", "usage": usage,
                "user": None,
            }  # fmt: skip

        text = "".join(plan.pieces)
        if body.get("stream") is not True:
            await asyncio.sleep(sim.ttft_s + sim.itl_s * max(0, len(plan.pieces) - 1))
            self.app.stats.tokens += len(plan.pieces)
            self._finish(plan)
            answer = response_obj("completed", text)
            if keep:
                self._keep(answer)
            response.send(200, JSON_HEADERS, orjson.dumps(answer))
            return
        response.start(200, SSE_HEADERS)
        sequence = iter(range(1 << 30))
        part: dict[str, Any] = {
            "annotations": [],
            "text": "",
            "type": "output_text",
            "logprobs": None,
        }
        head: list[tuple[str, dict[str, Any]]] = [
            ("response.created", {"response": response_obj("in_progress", None)}),
            ("response.in_progress", {"response": response_obj("in_progress", None)}),
            ("response.output_item.added",
             {"item": self._message_item(item_id, None, "in_progress"), "output_index": 0}),
            ("response.content_part.added",
             {"content_index": 0, "item_id": item_id, "output_index": 0, "part": part}),
        ]  # fmt: skip
        for name, obj in head:
            response.write(
                sse_event(name, {**obj, "sequence_number": next(sequence), "type": name})
            )

        def delta(piece: str) -> bytes:
            return sse_event(
                "response.output_text.delta",
                {"content_index": 0, "delta": piece, "item_id": item_id, "logprobs": [],
                 "output_index": 0, "sequence_number": next(sequence),
                 "type": "response.output_text.delta"},
            )  # fmt: skip

        await self._pace(plan, sim, response, delta)
        done_part = {**part, "text": text}
        tail = [
            ("response.output_text.done",
             {"content_index": 0, "item_id": item_id, "logprobs": [], "output_index": 0,
              "text": text}),
            ("response.content_part.done",
             {"content_index": 0, "item_id": item_id, "output_index": 0, "part": done_part}),
            ("response.output_item.done",
             {"item": self._message_item(item_id, text, "completed"), "output_index": 0}),
        ]  # fmt: skip
        for name, obj in tail:
            obj["sequence_number"] = next(sequence)
            obj["type"] = name
            response.write(sse_event(name, obj))
        final = response_obj("completed", text)
        if keep:
            self._keep(final)
        name = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        response.write(
            sse_event(name, {"response": final, "sequence_number": next(sequence), "type": name})
        )
        self._finish(plan)
        response.end()

    @staticmethod
    def _message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if text is not None:
            content = [{"annotations": [], "text": text, "type": "output_text", "logprobs": None}]
        return {
            "id": item_id, "content": content, "role": "assistant", "status": status,
            "type": "message",
        }  # fmt: skip

    # -- /v1/messages ------------------------------------------------------------------

    async def messages(self, request: Request, response: Response) -> None:
        await self._run(request, response, self._messages)

    async def _messages(self, request: Request, response: Response) -> None:
        body, sim = self._body(request)
        await self._faults(sim, "/v1/messages")
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise api_error(400, "messages: Field required", "messages")
        if "max_tokens" not in body:
            raise api_error(400, "max_tokens: Field required", "max_tokens")
        chat = [m for m in messages if isinstance(m, dict)]
        if isinstance(body.get("system"), str):
            chat.insert(0, {"role": "system", "content": body["system"]})
        plan = plan_text(
            chat_prompt_text(chat), count_chat_tokens(chat), positive_int(body, "max_tokens", 16),
            stop_list(body.get("stop_sequences")), self.app.config.seed, sim,
        )  # fmt: skip
        mid = f"chatcmpl-{secrets.token_hex(8)}"
        model = self.app.config.model
        stop_reason = "end_turn" if plan.finish == "stop" else "max_tokens"
        text = "".join(plan.pieces)
        if body.get("stream") is not True:
            await asyncio.sleep(sim.ttft_s + sim.itl_s * max(0, len(plan.pieces) - 1))
            self.app.stats.tokens += len(plan.pieces)
            self._finish(plan)
            out = {
                "id": mid, "type": "message", "role": "assistant",
                "content": [{"type": "text", "text": text}], "model": model,
                "stop_reason": stop_reason, "stop_sequence": None,
                "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": len(plan.pieces)},
            }  # fmt: skip
            response.send(200, JSON_HEADERS, orjson.dumps(out))
            return
        response.start(200, SSE_HEADERS)
        start = {
            "type": "message_start",
            "message": {
                "id": mid, "type": "message", "role": "assistant", "content": [], "model": model,
                "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": 0},
            },
        }  # fmt: skip
        response.write(sse_event("message_start", start))
        response.write(
            sse_event(
                "content_block_start",
                {"type": "content_block_start", "index": 0,
                 "content_block": {"type": "text", "text": ""}},
            )
        )  # fmt: skip

        def delta(piece: str) -> bytes:
            return sse_event(
                "content_block_delta",
                {"type": "content_block_delta", "index": 0,
                 "delta": {"type": "text_delta", "text": piece}},
            )  # fmt: skip

        await self._pace(plan, sim, response, delta)
        response.write(sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
        response.write(
            sse_event(
                "message_delta",
                {"type": "message_delta", "delta": {"stop_reason": stop_reason},
                 "usage": {"input_tokens": plan.prompt_tokens,
                           "output_tokens": len(plan.pieces)}},
            )
        )  # fmt: skip
        response.write(sse_event("message_stop", {"type": "message_stop"}))
        response.write(DONE_EVENT)
        self._finish(plan)
        response.end()
