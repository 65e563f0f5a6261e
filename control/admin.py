"""The admin API and /metrics, served on the proxy's listener.

`/admin/*` needs the admin token (`Authorization: Bearer <token>`, compared by SHA-256
digest in constant time); with no token configured the admin API answers 403. `/metrics`
is open, as Prometheus scrapers expect; it names apps and routes but holds no secret.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable

import orjson
from sluice.proxy.app import ProxyApp
from sluice.proxy.errors import ApiError, send_error
from sluice.proxy.http import Request, Response
from sluice.proxy.observe import Observer
from sluice.proxy.snapshot import SnapshotRef

from .reloader import ConfigReloader

Handler = Callable[[Request, Response], Awaitable[None]]
JSON = [(b"content-type", b"application/json")]


def _authorize(request: Request, ref: SnapshotRef) -> None:
    expected = ref.current.admin_token_hash
    if expected is None:
        raise ApiError(
            403,
            "the admin API is disabled: set admin.token in the Gateway document",
            type="permission_error",
            code="admin_disabled",
        )
    auth = request.headers.get(b"authorization", b"")
    scheme, _, token = auth.partition(b" ")
    given = hashlib.sha256(token.strip()).digest() if scheme.lower() == b"bearer" else b""
    if not hmac.compare_digest(given, expected):
        raise ApiError(
            401,
            "admin token missing or wrong",
            type="authentication_error",
            code="invalid_admin_token",
        )


def admin_routes(
    ref: SnapshotRef, app: ProxyApp, reloader: ConfigReloader | None, observer: Observer
) -> dict[str, Handler]:
    started = time.time()

    def config_state() -> dict[str, object]:
        snap = ref.current
        state: dict[str, object] = {"version": snap.version, "source": snap.source}
        if reloader is not None:
            state.update(
                last_result=reloader.last_result,
                last_error=reloader.last_error,
                last_reload_at=reloader.last_reload_at,
                reloads=reloader.reload_counts,
            )
        return state

    def guarded(method: str, fn: Callable[[Request, Response], Awaitable[None]]) -> Handler:
        async def handler(request: Request, response: Response) -> None:
            try:
                if request.method != method:
                    raise ApiError(
                        405,
                        f"use {method}",
                        code="method_not_allowed",
                        headers=[(b"allow", method.encode())],
                    )
                _authorize(request, ref)
                await fn(request, response)
            except ApiError as exc:
                send_error(response, exc)

        return handler

    async def get_config(request: Request, response: Response) -> None:
        response.send(200, JSON, orjson.dumps(config_state()))

    async def post_reload(request: Request, response: Response) -> None:
        if reloader is None:
            raise ApiError(
                409, "serving without a config directory: nothing to reload", code="no_config_dir"
            )
        result = await asyncio.to_thread(reloader.reload_now)
        status = 200 if result.ok else 422
        response.send(
            status,
            JSON,
            orjson.dumps(
                {"result": result.result, "version": ref.current.version, "errors": result.errors}
            ),
        )

    async def get_status(request: Request, response: Response) -> None:
        snap = ref.current
        backends = []
        for name, backend in snap.backends.items():
            replicas = app.pools.replicas(backend)
            backends.append(
                {
                    "name": name,
                    "replicas": [
                        {
                            "url": r.pool.origin.url,
                            "healthy": r.healthy,
                            "ejected": r.ejected_until > time.monotonic(),
                            "in_flight": r.pool.outstanding,
                            "open_connections": len(r.pool.open),
                            "idle_connections": len(r.pool.idle),
                        }
                        for r in replicas
                    ],
                }
            )
        limiters = [
            {
                "name": lim.name,
                "in_use": lim.in_use,
                "limit": lim.max_concurrency,
                "queued": lim.queued,
                "rejected": lim.rejected,
            }
            for lim in app.limiters.all()
        ]
        body = {
            "config": config_state(),
            "uptime_s": round(time.time() - started, 1),
            "ready": app.ready,
            "active_streams": app.active_streams,
            "backends": backends,
            "limiters": limiters,
        }
        response.send(200, JSON, orjson.dumps(body))

    async def metrics(request: Request, response: Response) -> None:
        if request.method not in ("GET", "HEAD"):
            send_error(response, ApiError(405, "use GET", code="method_not_allowed"))
            return
        observer.refresh_gauges(
            app.active_streams, {lim.name: lim.queued for lim in app.limiters.all()}
        )
        response.send(
            200,
            [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")],
            observer.metrics.render(),
        )

    return {
        "/admin/config": guarded("GET", get_config),
        "/admin/reload": guarded("POST", post_reload),
        "/admin/status": guarded("GET", get_status),
        "/metrics": metrics,
    }
