"""The backend's model list, for `GET /v1/models` in pass-through (`--backend`), where
sluice has no config to answer it from: fetched, and relayed only as JSON."""

from __future__ import annotations

import orjson

from .backends import Replica
from .nonstream import MAX_NONSTREAM_BODY
from .upstream import UpstreamConnection, open_exchange


async def model_list(replica: Replica) -> tuple[int, bytes]:
    """The backend's `GET /v1/models`: its status and body. The connection is pooled only
    after a complete response and closed on any failure or cancellation (never leaked)."""
    conn: UpstreamConnection | None = None
    try:
        conn = await open_exchange(replica.pool, b"GET", b"/v1/models", [], b"")
        return conn.status, await conn.read_all(MAX_NONSTREAM_BODY)
    finally:
        if conn is not None:
            if conn.complete:
                replica.pool.release(conn)
            else:
                conn.abort()


def relayable(status: int, body: bytes) -> bool:
    """Whether the backend's answer to GET /v1/models may go out as JSON with its status:
    a JSON object (the list, or an OpenAI-shaped error). An HTML error page or an empty
    body is a 502, not relayed under a JSON content type."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and (status == 200 or isinstance(obj.get("error"), dict))
