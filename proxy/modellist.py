"""`GET /v1/models`: the config's routes an app may use, or, in pass-through (`--backend`),
where sluice has no config to answer it from, the backend's list: fetched, and relayed
only as JSON."""

from __future__ import annotations

import asyncio

import orjson

from .auth import authenticate
from .backends import BackendPools, Replica
from .errors import ApiError, bad_gateway
from .http import Request, Response
from .nonstream import MAX_NONSTREAM_BODY
from .response import JSON_HEADERS
from .snapshot import DEFAULT_RESPONSE_HEAD_TIMEOUT, Route, Snapshot
from .upstream import UpstreamConnection, UpstreamError
from .upstream_pool import open_exchange


async def backend_get(replica: Replica, path: bytes, max_bytes: int) -> tuple[int, bytes]:
    """The backend's answer to `GET path`: its status and body. The connection is pooled
    only after a complete response and closed on any failure or cancellation (never
    leaked)."""
    conn: UpstreamConnection | None = None
    try:
        conn = await open_exchange(replica.pool, b"GET", path, [], b"")
        return conn.status, await conn.read_all(max_bytes)
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


async def answer_models(
    snap: Snapshot, pools: BackendPools, request: Request, response: Response
) -> None:
    """The model list the caller may use: the config's route names (an app's own routes
    when it names them), or the backend's list where pass-through has no routes."""
    app = authenticate(request, snap)
    if not snap.routes and snap.fallback_route is not None:
        await _forward_models(snap, pools, response)
        return
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "sluice"}
        for name in snap.routes
        if app is None or app.routes is None or name in app.routes
    ]
    body = orjson.dumps({"object": "list", "data": data})
    response.send(200, [*JSON_HEADERS, (b"x-sluice-config", snap.version.encode())], body)


def answer_limit(route: Route) -> float:
    """How long sluice waits for a backend's answer to a GET it makes for a client."""
    timeouts = route.policy.timeouts
    return timeouts.response_head or timeouts.total or DEFAULT_RESPONSE_HEAD_TIMEOUT


async def fetch_model_list(route: Route, pools: BackendPools) -> tuple[int, bytes]:
    """The route's backend's `GET /v1/models` within `answer_limit`; a failure or no
    answer in time is the client's 502 or 504."""
    replica = pools.choose(route.backend)
    limit = answer_limit(route)
    try:
        # wait_for, not `async with asyncio.timeout`: this module is compiled (setup.py).
        return await asyncio.wait_for(
            backend_get(replica, b"/v1/models", MAX_NONSTREAM_BODY), limit
        )
    except UpstreamError as exc:
        raise bad_gateway(f"backend {route.backend.name}: {exc}") from None
    except TimeoutError:
        raise ApiError(
            504,
            f"backend {route.backend.name}: no answer to GET /v1/models within {limit:g}s",
            type="timeout",
            code="response_head_timeout",
        ) from None


async def _forward_models(snap: Snapshot, pools: BackendPools, response: Response) -> None:
    route = snap.fallback_route
    assert route is not None
    status, body = await fetch_model_list(route, pools)
    if not relayable(status, body):
        raise bad_gateway(
            f"backend {route.backend.name} answered {status} to GET /v1/models, "
            "not a JSON model list or error",
            code=f"upstream_http_{status}",
        )
    response.send(status, JSON_HEADERS, body)
