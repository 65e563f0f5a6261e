"""The admin API and /metrics, served on the proxy's listener.

`/admin/*` needs the admin token (`Authorization: Bearer <token>`, compared by SHA-256
digest in constant time); with no token configured the admin API answers 403. `/metrics`
is open, as Prometheus scrapers expect; it names apps and routes but holds no secret.
`/admin/status` is what `sluice status` prints: config version and last reload, backends
with health and in-flight counts, queue depths, per-app usage.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import signal
import time
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from sluice.proxy.app import ProxyApp
from sluice.proxy.errors import ApiError, send_error
from sluice.proxy.http import Handler, Request, Response
from sluice.proxy.observe import Observer
from sluice.proxy.response import JSON_HEADERS
from sluice.proxy.snapshot import SnapshotRef

from .reloader import ConfigReloader


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
    ref: SnapshotRef,
    app: ProxyApp,
    reloader: ConfigReloader | None,
    observer: Observer,
    *,
    worker: str | None = None,
) -> dict[str, Handler]:
    """`worker`: this process's index under `--workers N` (None: a single process)."""
    started = time.time()
    # Under `--workers N` a reload asked of one worker is asked of all: the supervisor
    # forwards SIGHUP to each. Its pid is taken now: a worker whose supervisor has died
    # has another parent (init), which must not get the signal.
    supervisor = os.getppid() if worker is not None else None

    def reload_every_worker() -> bool:
        if supervisor is None or os.getppid() != supervisor:
            return False
        os.kill(supervisor, signal.SIGHUP)
        return True

    def config_state() -> dict[str, object]:
        snap = ref.current
        state: dict[str, object] = {"version": snap.version, "source": snap.source}
        if reloader is not None:
            state.update(
                last_result=reloader.last_result,
                last_error=reloader.last_error,
                last_reload_at=reloader.last_reload_at,
                reloads=reloader.reload_counts,
                restart_required=reloader.restart_required,
            )
        return state

    def guarded(method: str, fn: Handler) -> Handler:
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
        response.send(200, JSON_HEADERS, orjson.dumps(config_state()))

    async def post_reload(request: Request, response: Response) -> None:
        if reloader is None:
            raise ApiError(
                409, "serving without a config directory: nothing to reload", code="no_config_dir"
            )
        result = await asyncio.to_thread(reloader.reload_now)
        status = 200 if result.ok else 422
        body: dict[str, object] = {
            "result": result.result,
            "version": ref.current.version,
            "errors": result.errors,
        }
        if worker is not None:
            # The result is this worker's; the others read the same files on the signal.
            body["worker"] = int(worker)
            body["all_workers"] = reload_every_worker()
        response.send(status, JSON_HEADERS, orjson.dumps(body))

    async def get_status(request: Request, response: Response) -> None:
        body = status_body(ref, app, observer, config_state(), started, worker)
        response.send(200, JSON_HEADERS, orjson.dumps(body))

    async def metrics(request: Request, response: Response) -> None:
        if request.method not in ("GET", "HEAD"):
            send_error(response, ApiError(405, "use GET", code="method_not_allowed"))
            return
        if observer.metrics is None:
            send_error(
                response,
                ApiError(404, "metrics are disabled (--no-metrics)", code="metrics_disabled"),
            )
            return
        observer.sample(app)
        body = observer.metrics.render()
        response.send(200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], body)

    return {
        "/admin/config": guarded("GET", get_config),
        "/admin/reload": guarded("POST", post_reload),
        "/admin/status": guarded("GET", get_status),
        "/metrics": metrics,
    }


def status_body(
    ref: SnapshotRef,
    app: ProxyApp,
    observer: Observer,
    config: dict[str, object],
    started: float,
    worker: str | None,
) -> dict[str, Any]:
    """GET /admin/status. Everything is this worker's own state but the apps' requests,
    statuses and tokens, which sum every worker's when metrics run in multiprocess mode
    (--workers N); the apps' in_flight and queued are this worker's (its limiters)."""
    snap = ref.current
    now = time.monotonic()
    backends = []
    for name, backend in snap.backends.items():
        replicas = app.pools.replicas(backend)
        backends.append(
            {
                "name": name,
                "in_flight": sum(r.pool.outstanding for r in replicas),
                "replicas": [
                    {
                        "url": r.pool.origin.url,
                        "healthy": r.healthy,
                        "ejected": r.ejected_until > now,
                        "in_flight": r.pool.outstanding,
                        "open_connections": len(r.pool.open),
                        "idle_connections": len(r.pool.idle),
                    }
                    for r in replicas
                ],
            }
        )
    limiters = {lim.name: lim for lim in app.limiters.all()}
    queues = [
        {
            "name": lim.name,
            "in_use": lim.in_use,
            "limit": lim.max_concurrency,
            "queued": lim.queued,
            "max_queue": lim.queue.max_len,
            "rejected": lim.rejected,
        }
        for lim in limiters.values()
    ]
    usage = observer.metrics.app_usage() if observer.metrics is not None else {}
    limited = {a.name for a in snap.apps if a.max_concurrency is not None}
    names = [a.name for a in snap.apps]
    names += sorted(n for n in usage if n not in names)
    apps = []
    for name in names:
        used = usage.get(name)
        limiter = limiters.get("app:" + name)
        # In flight and queued are known where the app has a concurrency limit; else null.
        idle = 0 if name in limited else None
        apps.append(
            {
                "name": name,
                "requests": used.requests if used else 0,
                "by_status": used.by_status if used else {},
                "tokens_in": used.tokens_in if used else 0,
                "tokens_out": used.tokens_out if used else 0,
                "in_flight": limiter.in_use if limiter else idle,
                "queued": limiter.queued if limiter else idle,
            }
        )
    return {
        "pid": os.getpid(),
        "worker": worker,
        "uptime_s": round(time.time() - started, 1),
        "ready": app.ready,
        "config": config,
        "active_streams": app.active_streams,
        "backends": backends,
        "queues": queues,
        "limit_store": app.limiters.store_state(),
        "apps": apps,
        "metrics": observer.metrics is not None,
        "access_log": observer.access_log,
    }
