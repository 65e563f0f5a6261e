"""A request's prompt as a chain of block hashes, the key of prefix-affinity routing.

vLLM caches a prompt's KV in fixed-size token blocks and finds a cached block by a hash
that chains every block before it (and the request's `cache_salt`), so two prompts share
cached blocks exactly as far as they share a prefix. Sluice does not tokenize; it cuts the
prompt's text into blocks of `block_chars` bytes of UTF-8 and chains them the same way:
block i's hash covers the salt and blocks 0..i. Only full blocks are hashed (vLLM caches
only full blocks too). The hashes are blake2b (stable across processes, so workers could
share them), 8 bytes each; a 4k-token prompt costs tens of microseconds (docs/ROUTING.md).
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Any, Final

import orjson

DIGEST_BYTES: Final = 8
MAX_HASHED_BYTES: Final = 1 << 20  # beyond 1 MiB of prompt, the rest does not change the choice


def _content_bytes(content: Any, out: list[bytes]) -> None:
    if isinstance(content, str):
        out.append(content.encode("utf-8", "surrogatepass"))
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    out.append(text.encode("utf-8", "surrogatepass"))
                else:
                    # An image or audio part: its URL or data stands for it (same part,
                    # same cached prefix).
                    out.append(orjson.dumps(part))
    elif content is not None:
        out.append(orjson.dumps(content))


def prompt_bytes(body: dict[str, Any], chat: bool) -> bytes:
    """What vLLM renders into the prompt, in its order: tools (chat templates put them in
    the system turn), then each message's role and content; or the completion prompt."""
    if not chat:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return prompt.encode("utf-8", "surrogatepass")
        return orjson.dumps(prompt) if prompt is not None else b""
    out: list[bytes] = []
    tools = body.get("tools")
    if tools:
        out.append(orjson.dumps(tools))
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            role = message.get("role")
            out.append(b"\x00" + (role.encode() if isinstance(role, str) else b"?") + b"\x01")
            _content_bytes(message.get("content"), out)
    return b"".join(out)


def chain_hashes(data: bytes, block_bytes: int, salt: str | None = None) -> list[bytes]:
    """The hash of every full block of `data`, each chained to all blocks before it."""
    if len(data) > MAX_HASHED_BYTES:
        data = data[:MAX_HASHED_BYTES]
    prev = b"" if salt is None else blake2b(salt.encode(), digest_size=DIGEST_BYTES).digest()
    hashes: list[bytes] = []
    view = memoryview(data)
    for start in range(0, len(data) - block_bytes + 1, block_bytes):
        block = blake2b(prev, digest_size=DIGEST_BYTES)
        block.update(view[start : start + block_bytes])
        prev = block.digest()
        hashes.append(prev)
    return hashes


__all__ = ["chain_hashes", "prompt_bytes"]
