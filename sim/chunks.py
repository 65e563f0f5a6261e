"""vLLM 0.26's SSE chunks and response bodies, byte for byte and key for key.

Streaming is the hot path: the parts of a chunk that do not change within a request (id,
created, model, choice index) are rendered once into byte templates, so a token chunk
costs one `orjson.dumps` of its text and one concatenation. Key order follows the
transcripts (vLLM's pydantic field order), e.g. a chat token chunk is
`{"id","object","created","model","choices":[{"index","delta":{"content"},"logprobs",
"finish_reason","token_ids"}]}`, plus `"usage"` with continuous usage stats.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import orjson
from sluice.proxy.errors import error_body
from sluice.proxy.sse import SEPARATOR

from .text import alternatives

FINGERPRINT = "vllm-0.26.0-nohash"
KEEPALIVE_COMMENT = b": keep-alive\n\n"

_NULL = b"null"
_FINGERPRINT_FIELD = b',"system_fingerprint":"' + FINGERPRINT.encode() + b'"'
_dumps = orjson.dumps


def usage_json(prompt_tokens: int, completion_tokens: int) -> bytes:
    """Usage as in a stream chunk: prompt_tokens, total_tokens, completion_tokens."""
    return b'{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}' % (
        prompt_tokens,
        prompt_tokens + completion_tokens,
        completion_tokens,
    )


def error_event(status: int, message: str, type_: str) -> bytes:
    """A mid-stream error: vLLM sends it as a data event (HTTP status stays 200)."""
    return b"data: " + error_body(message, type_, status) + SEPARATOR


class ChoiceResult(Protocol):
    """What a finished choice hands to `body()`."""

    index: int
    finish_reason: str | None
    stop_reason: str | None

    def final_text(self) -> str: ...

    def all_logprobs(self) -> tuple[list[str], list[float]] | None: ...


class ChunkFormat(Protocol):
    """The per-request renderer of one endpoint's chunks and body."""

    has_role_chunk: bool

    def role(self, index: int, usage: bytes | None) -> bytes: ...

    def content(
        self, index: int, text: str, logprobs: bytes | None, usage: bytes | None
    ) -> bytes: ...

    def final(
        self,
        index: int,
        text: str,
        logprobs: bytes | None,
        finish_reason: str,
        stop_reason: str | None,
        usage: bytes | None,
        fingerprint: bool,
    ) -> bytes: ...

    def usage_chunk(self, usage: bytes) -> bytes: ...

    def logprobs(self, tokens: Sequence[str], values: Sequence[float], first_offset: int) -> object:
        """The logprobs object of a chunk, or from offset 0 of a whole choice."""
        ...

    def body(
        self, choices: Sequence[ChoiceResult], prompt_tokens: int, completion_tokens: int
    ) -> bytes: ...


def _prefix(rid: str, object_name: bytes, created: int, model: str) -> bytes:
    return b'data: {"id":%b,"object":"%b","created":%d,"model":%b,"choices":[' % (
        _dumps(rid),
        object_name,
        created,
        _dumps(model),
    )


def _usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, object]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


class ChatFormat:
    """/v1/chat/completions: role chunk first, `delta.content`, `chat.completion` body."""

    has_role_chunk = True
    _TAIL = b'},"logprobs":null,"finish_reason":null,"token_ids":null}]}\n\n'

    def __init__(self, rid: str, created: int, model: str, choices: int, top: int) -> None:
        self.rid = rid
        self.created = created
        self.model = model
        self.top = top
        self._prefix = _prefix(rid, b"chat.completion.chunk", created, model)
        self._heads = [
            self._prefix + b'{"index":%d,"delta":{"content":' % index for index in range(choices)
        ]

    def role(self, index: int, usage: bytes | None) -> bytes:
        parts = [
            self._prefix,
            b'{"index":%d,"delta":{"role":"assistant","content":""},' % index,
            b'"logprobs":null,"finish_reason":null}]',
        ]
        if usage is not None:
            parts += (b',"usage":', usage)
        parts.append(b',"prompt_token_ids":null,"prompt_text":null}\n\n')
        return b"".join(parts)

    def content(self, index: int, text: str, logprobs: bytes | None, usage: bytes | None) -> bytes:
        if logprobs is None and usage is None:
            return self._heads[index] + _dumps(text) + self._TAIL
        return b"".join(
            (
                self._heads[index],
                _dumps(text),
                b'},"logprobs":',
                _NULL if logprobs is None else logprobs,
                b',"finish_reason":null,"token_ids":null}]',
                b"" if usage is None else b',"usage":' + usage,
                b"}\n\n",
            )
        )

    def final(
        self,
        index: int,
        text: str,
        logprobs: bytes | None,
        finish_reason: str,
        stop_reason: str | None,
        usage: bytes | None,
        fingerprint: bool,
    ) -> bytes:
        return b"".join(
            (
                self._heads[index],
                _dumps(text),
                b'},"logprobs":',
                _NULL if logprobs is None else logprobs,
                b',"finish_reason":',
                _dumps(finish_reason),
                b',"stop_reason":',
                _dumps(stop_reason),
                b',"token_ids":null}]',
                b"" if usage is None else b',"usage":' + usage,
                _FINGERPRINT_FIELD if fingerprint else b"",
                b"}\n\n",
            )
        )

    def usage_chunk(self, usage: bytes) -> bytes:
        return self._prefix + b'],"usage":' + usage + _FINGERPRINT_FIELD + b"}\n\n"

    def logprobs(self, tokens: Sequence[str], values: Sequence[float], first_offset: int) -> object:
        del first_offset  # chat logprobs carry no offsets
        content = []
        for token, value in zip(tokens, values, strict=True):
            top = alternatives(token, value, self.top) if self.top else []
            content.append(
                {
                    "token": token,
                    "logprob": value,
                    "bytes": list(token.encode()),
                    "top_logprobs": [
                        {"token": alt, "logprob": lp, "bytes": list(alt.encode())}
                        for alt, lp in top
                    ],
                }
            )
        return {"content": content}

    def body(
        self, choices: Sequence[ChoiceResult], prompt_tokens: int, completion_tokens: int
    ) -> bytes:
        rendered = []
        for choice in choices:
            logprobs = choice.all_logprobs()
            rendered.append(
                {
                    "index": choice.index,
                    "message": {
                        "role": "assistant",
                        "content": choice.final_text(),
                        "refusal": None,
                        "annotations": None,
                        "audio": None,
                        "function_call": None,
                        "reasoning": None,
                    },
                    "logprobs": None if logprobs is None else self.logprobs(*logprobs, 0),
                    "finish_reason": choice.finish_reason,
                    "stop_reason": choice.stop_reason,
                    "token_ids": None,
                    "routed_experts": None,
                }
            )
        return _dumps(
            {
                "id": self.rid,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": rendered,
                "service_tier": None,
                "system_fingerprint": FINGERPRINT,
                "usage": _usage_body(prompt_tokens, completion_tokens),
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "prompt_text": None,
                "kv_transfer_params": None,
                "ec_transfer_params": None,
                "metrics": None,
            }
        )


class CompletionFormat:
    """/v1/completions: no role chunk, `text`, legacy logprobs, `text_completion` body."""

    has_role_chunk = False
    _TAIL = (
        b',"logprobs":null,"finish_reason":null,"stop_reason":null,'
        b'"prompt_token_ids":null,"token_ids":null}]}\n\n'
    )

    def __init__(self, rid: str, created: int, model: str, choices: int, top: int) -> None:
        self.rid = rid
        self.created = created
        self.model = model
        self.top = max(top, 1)  # logprobs=0 still reports the sampled token
        self._prefix = _prefix(rid, b"text_completion", created, model)
        self._heads = [self._prefix + b'{"index":%d,"text":' % index for index in range(choices)]

    def role(self, index: int, usage: bytes | None) -> bytes:
        raise NotImplementedError("completions have no role chunk")

    def content(self, index: int, text: str, logprobs: bytes | None, usage: bytes | None) -> bytes:
        if logprobs is None and usage is None:
            return self._heads[index] + _dumps(text) + self._TAIL
        return self._chunk(index, text, logprobs, _NULL, _NULL, usage, False)

    def final(
        self,
        index: int,
        text: str,
        logprobs: bytes | None,
        finish_reason: str,
        stop_reason: str | None,
        usage: bytes | None,
        fingerprint: bool,
    ) -> bytes:
        return self._chunk(
            index, text, logprobs, _dumps(finish_reason), _dumps(stop_reason), usage, fingerprint
        )

    def _chunk(
        self,
        index: int,
        text: str,
        logprobs: bytes | None,
        finish_reason: bytes,
        stop_reason: bytes,
        usage: bytes | None,
        fingerprint: bool,
    ) -> bytes:
        return b"".join(
            (
                self._heads[index],
                _dumps(text),
                b',"logprobs":',
                _NULL if logprobs is None else logprobs,
                b',"finish_reason":',
                finish_reason,
                b',"stop_reason":',
                stop_reason,
                b',"prompt_token_ids":null,"token_ids":null}]',
                b"" if usage is None else b',"usage":' + usage,
                _FINGERPRINT_FIELD if fingerprint else b"",
                b"}\n\n",
            )
        )

    def usage_chunk(self, usage: bytes) -> bytes:
        return self._prefix + b'],"usage":' + usage + _FINGERPRINT_FIELD + b"}\n\n"

    def logprobs(self, tokens: Sequence[str], values: Sequence[float], first_offset: int) -> object:
        offsets = []
        top_entries = []
        offset = first_offset
        for token, value in zip(tokens, values, strict=True):
            offsets.append(offset)
            offset += len(token)
            top_entries.append(dict(alternatives(token, value, self.top)))
        return {
            "text_offset": offsets,
            "token_logprobs": list(values),
            "tokens": list(tokens),
            "top_logprobs": top_entries,
        }

    def body(
        self, choices: Sequence[ChoiceResult], prompt_tokens: int, completion_tokens: int
    ) -> bytes:
        rendered = []
        for choice in choices:
            logprobs = choice.all_logprobs()
            rendered.append(
                {
                    "index": choice.index,
                    "text": choice.final_text(),
                    "logprobs": None if logprobs is None else self.logprobs(*logprobs, 0),
                    "finish_reason": choice.finish_reason,
                    "stop_reason": choice.stop_reason,
                    "token_ids": None,
                    "prompt_logprobs": None,
                    "prompt_token_ids": None,
                    "routed_experts": None,
                }
            )
        return _dumps(
            {
                "id": self.rid,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": rendered,
                "service_tier": None,
                "system_fingerprint": FINGERPRINT,
                "usage": _usage_body(prompt_tokens, completion_tokens),
                "kv_transfer_params": None,
                "ec_transfer_params": None,
                "metrics": None,
            }
        )
