"""JSON that orjson refuses and a client's parser reads: a string with a lone surrogate
escape (`"\\ud800"`). Python's `json` (the openai SDK's parser) reads it, so a chunk
orjson could not parse must not pass a guard unread: it is read here, and written back
escaped (`ensure_ascii`) when the guard changed it. Off the hot path: only after orjson
has refused a body.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(raw: bytes) -> Any | None:
    """`raw` as Python's json reads it; None when it is not JSON to it either."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def dumps(obj: Any) -> bytes:
    """Compact JSON of `obj`, its non-ASCII escaped (so a lone surrogate is `\\udXXX`)."""
    return json.dumps(obj, separators=(",", ":")).encode()


def read(raw: bytes) -> Any | None:
    """`raw` through orjson, or through `loads` when orjson refuses it."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return loads(raw)


def write(obj: Any) -> bytes:
    """`obj` through orjson, or through `dumps` when it holds what orjson does not write."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:
        return dumps(obj)
