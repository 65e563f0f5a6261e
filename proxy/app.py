"""The request handler: route, authenticate, resolve, merge, take permits, relay.

Reads `ref.current` once per request. Everything a client can get wrong ends in an
OpenAI-shaped error with a precise status; permits and upstream connections are released
in `finally` blocks, which also run when the client goes away (the HTTP layer cancels the
handler) or a timeout fires (the watchdog cancels it).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from typing import Any, Final

from .adapters import Adapter
from .affinity import RoutingHint
from .auth import authenticate
from .backends import BackendPools, Replica
from .chunks import ChunkFilter
from .clock import monotonic
from .deadlines import Deadlines
from .endpoints import GENERATING, LOCAL_PATHS, OPERATOR_PATHS, forwarded_path
from .errors import (
    ApiError,
    method_not_allowed,
    not_found,
    send_error,
)
from .exchange import Exchange
from .fields import app_salt, apply_field_rules, salt_request
from .forward import Forwarder, only_route, open_on_replica, upload_limit
from .http import ClientGone, Handler, Header, Request, Response
from .ids import request_id
from .jsonbody import parse_object
from .keepalive import KeepAlive, relay_refusal
from .limits import ConcurrencyLimiter, LimiterRegistry, LimitExceeded
from .modellist import answer_models
from .nonstream import relay_whole
from .refusal import answer_refusal
from .relay_stream import MESSAGE_END_TIMEOUT, relay_stream
from .response import JSON_HEADERS
from .resume import STREAMS_PREFIX, StreamRegistry, StreamStore
from .routing import RouteChoice, choose_route
from .snapshot import (
    App,
    Backend,
    Snapshot,
    SnapshotRef,
    StreamPolicy,
    StreamTimeouts,
)
from .timeouts import SHUTDOWN, StreamWatchdog, request_deadline, timeout_message
from .upstream import UpstreamConnection

SSE_HEADERS: Final[list[Header]] = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]

CompletionHook = Callable[[Exchange], None]
SwapHook = Callable[[Snapshot], None]


class ProxyApp:
    """The data plane's HTTP handler."""

    def __init__(
        self,
        ref: SnapshotRef,
        pools: BackendPools | None = None,
        limiters: LimiterRegistry | None = None,
        *,
        extra_routes: Mapping[str, Handler] | None = None,
        on_complete: list[CompletionHook] | None = None,
    ) -> None:
        self.ref = ref
        self.pools = pools or BackendPools()
        self.limiters = limiters or LimiterRegistry()
        self.extra_routes = dict(extra_routes or {})
        self.on_complete = on_complete or []
        self.ready = True
        self.active_streams = 0
        self.watchdogs: set[StreamWatchdog] = set()  # one per exchange with the backend
        self.streams: StreamStore | None = StreamRegistry()  # resumable streams
        self.forwarder = Forwarder(self)
        self.on_swap: list[SwapHook] = []  # e.g. the health prober's reconcile
        # Key of the per-app cache_salt HMAC unless the config names one: `sluice serve`
        # sets the key it keeps in a file, so workers and restarts agree.
        self.salt_key = os.urandom(32)
        self._salts: dict[tuple[bytes, str], str] = {}
        self._deadlines: Deadlines | None = None  # bound to the loop of the first request
        self.reconcile(ref.current)

    @property
    def deadlines(self) -> Deadlines:
        """The timeouts' and keep-alives' timer slots (see deadlines.py)."""
        deadlines = self._deadlines
        if deadlines is None or deadlines.loop.is_closed():
            deadlines = self._deadlines = Deadlines(asyncio.get_running_loop())
        return deadlines

    def swap(self, snapshot: Snapshot) -> None:
        """The reload's commit, on the event loop: the one assignment, then hot state made
        to match in the same loop step (no request runs between the two)."""
        self.ref.current = snapshot
        self.reconcile(snapshot)

    def reconcile(self, snap: Snapshot) -> None:
        """Limits, pools and probes follow the snapshot now, not lazily per request: an idle
        limiter shows its new limit, a changed connect_timeout applies to the next connect,
        and limiters and pools of removed apps and backends are dropped."""
        wanted = {"backend:" + b.name: (b.max_concurrency, b.queue) for b in snap.backends.values()}
        for app in snap.apps:
            if app.max_concurrency is not None:
                wanted["app:" + app.name] = (app.max_concurrency, app.queue)
        self.limiters.reconcile(wanted)
        self._salts.clear()  # apps may be gone
        backends = list(snap.backends.values())
        if snap.fallback_route is not None:
            backends.append(snap.fallback_route.backend)
        self.pools.reconcile(backends)
        for hook in self.on_swap:
            hook(snap)

    def interrupt_all(self, kind: str) -> int:
        """Ends every request in flight (drain deadline passed): exchanges with a backend
        end with the terminal error event or 503, queued requests get 503. Returns how
        many."""
        watchdogs = list(self.watchdogs)
        for watchdog in watchdogs:
            watchdog.interrupt(kind)
        # Resumable streams whose client is away end the same way (their watchdog or their
        # queue place); a resume then gets the terminal shutdown event from the buffer.
        return len(watchdogs) + sum(lim.reject_waiters() for lim in self.limiters.all())

    async def __call__(self, request: Request, response: Response) -> None:
        path = request.path
        try:
            adapter = GENERATING.get(path)
            if adapter is not None:
                if request.method != "POST":
                    if path == "/" and request.method in ("GET", "HEAD"):
                        await self.forwarder.local(request, response)  # TGI's info probe
                        return
                    raise method_not_allowed(request.method, path, "POST")
                await self.completions(request, response, adapter)
            elif path in LOCAL_PATHS:
                await self.forwarder.local(request, response)
            elif path.startswith("/v1/models/"):
                await self.forwarder.model_card(request, response)
            elif path == "/v1/models":
                if request.method not in ("GET", "HEAD"):
                    raise method_not_allowed(request.method, path, "GET")
                await answer_models(self.ref.current, self.pools, request, response)
            elif path.startswith(STREAMS_PREFIX) and self.streams is not None:
                await self.streams.resume(request, response, self.ref.current)
            elif path in ("/healthz", "/readyz"):
                if request.method not in ("GET", "HEAD"):
                    raise method_not_allowed(request.method, path, "GET")
                if path == "/healthz":
                    response.send(200, JSON_HEADERS, b'{"status":"ok"}')
                elif self.ready:
                    response.send(200, JSON_HEADERS, b'{"status":"ready"}')
                else:
                    response.send(503, JSON_HEADERS, b'{"status":"draining"}')
            else:
                handler = self.extra_routes.get(path)
                if handler is not None:
                    await handler(request, response)
                elif path in OPERATOR_PATHS:
                    raise ApiError(
                        403,
                        f"{path} is one of vLLM's operator routes: sluice does not forward "
                        "it; call the backend directly",
                        code="operator_route",
                    )
                elif forwarded_path(path, self.ref.current):
                    await self.completions(request, response, self.forwarder.adapter)
                else:
                    raise not_found(f"no route for {request.method} {path}", code="unknown_url")
        except ApiError as exc:
            if not response.started:
                send_error(response, exc)

    # -- completions ---------------------------------------------------------------------

    async def completions(
        self,
        request: Request,
        response: Response,
        adapter: Adapter | None = None,
        *,
        chat: bool = True,
        caller: App | None = None,
    ) -> None:
        """Every endpoint's exchange with a backend: the adapter says what differs (None:
        chat or completions, as `chat` says). `caller`: an identity already established by
        the caller's own authentication (the console's session); None authenticates the
        request's API key as usual."""
        if adapter is None:
            adapter = GENERATING["/v1/chat/completions" if chat else "/v1/completions"]
        snap = self.ref.current
        ex = Exchange(request_id(request), monotonic())
        ex.chat = adapter.chat
        ex.endpoint = request.path
        ex.config_version = snap.version
        base_headers: list[Header] = [
            (b"x-request-id", ex.request_id.encode()),
            (b"x-sluice-config", snap.version.encode()),
        ]
        try:
            await self._completions(request, response, snap, ex, base_headers, adapter, caller)
        except (ApiError, LimitExceeded) as exc:
            answer_refusal(response, ex, exc, base_headers, adapter)
        except (asyncio.CancelledError, ClientGone):
            # Gone while we waited or while we wrote: recorded alike.
            ex.client_disconnected = True
            if not ex.status or not response.started:
                ex.status = 499
            raise
        except Exception:
            # A bug: the HTTP layer answers 500 (or cuts a started stream); the record
            # carries the status the client got, never 0.
            ex.error_code = ex.error_code or "internal_error"
            if not response.started:
                ex.status = 500
            raise
        finally:
            ex.ended_at = monotonic()
            for hook in self.on_complete:
                hook(ex)

    async def _completions(
        self,
        request: Request,
        response: Response,
        snap: Snapshot,
        ex: Exchange,
        base_headers: list[Header],
        adapter: Adapter,
        caller: App | None = None,
    ) -> None:
        if adapter.forwards:
            # Authenticated before a streamed upload is read any further.
            app = caller if caller is not None else authenticate(request, snap)
            if app is not None:
                ex.app = app.name
            adapter, body = await adapter.begin_forward(request)
        else:
            body = parse_object(request.body)  # nesting depth first: before anything else
            app = caller if caller is not None else authenticate(request, snap)
            if app is not None:
                ex.app = app.name
            adapter, body = adapter.begin(body)
        if adapter.model_optional and "model" not in body:
            only = only_route(snap, app)
            if only is not None:
                body["model"] = only
        choice = choose_route(snap, body, app, request)
        # From here on a refusal (a denied field, a limit) names the variant and preset
        # too, as every answer of the route does.
        base_headers.extend(choice.headers)
        ex.route = choice.route.model
        ex.backend = choice.route.backend.name
        ex.preset = choice.plan.name
        ex.experiment = choice.experiment
        ex.variant = choice.variant
        policy = choice.policy
        stream = adapter.is_stream(body)
        ex.stream = stream
        # Request-field rules and the app's cache_salt on the body in vLLM's field names
        # (a forwarded body too, when it is a JSON object; any other is relayed as sent).
        modified = adapter.reads_fields and self._request_fields(
            body, snap, choice, app, adapter.takes_cache_salt
        )
        body, prepared = adapter.prepare(body, choice, app)
        modified = modified or prepared
        route = choice.route
        payload = adapter.payload(body, request.body, modified, route)
        # After the request policy: the prompt and cache_salt as the backend will see them.
        hint = self.pools.router.hint(route.backend, body, ex.chat, request)
        if hint is not None and self.pools.router.shared is not None:
            # Read the shared index while the permits are taken; settled before the choice.
            self.pools.router.share(route.backend, hint)
        n_choices = adapter.n_choices(body)
        extra_headers = base_headers  # with the choice's (never mutated past here)
        # vLLM keeps a stored response in one replica's memory: the others answer 404.
        seek_stored = len(route.backend.urls) > 1 and adapter.names_stored_response(body)

        app_limiter = None
        if app is not None and app.max_concurrency is not None:
            app_limiter = self.limiters.get("app:" + app.name, app.max_concurrency, app.queue)
        backend = route.backend
        backend_limiter = self.limiters.get(
            "backend:" + backend.name, backend.max_concurrency, backend.queue
        )
        if (
            stream
            and policy.resume_window is not None
            and adapter.resumable
            and self.streams is not None
            and type(response) is Response  # an SSE client (not a WebSocket)
        ):
            resumable = self.streams.open(ex, response, policy, request)
            try:
                await self._limited(
                    resumable,
                    ex,
                    app_limiter,
                    backend_limiter,
                    payload,
                    policy,
                    stream,
                    n_choices,
                    extra_headers,
                    route.backend,
                    adapter,
                    hint,
                    seek_stored,
                )
            except (ApiError, LimitExceeded) as exc:
                answer_refusal(resumable, ex, exc, base_headers, adapter)
            finally:
                resumable.close()
            return
        await self._limited(
            response,
            ex,
            app_limiter,
            backend_limiter,
            payload,
            policy,
            stream,
            n_choices,
            extra_headers,
            route.backend,
            adapter,
            hint,
            seek_stored,
        )

    def _request_fields(
        self,
        body: dict[str, Any],
        snap: Snapshot,
        choice: RouteChoice,
        app: App | None,
        salted: bool,
    ) -> bool:
        """The request-field policy, then the app's cache_salt (`salted`: the endpoint
        runs the model); True when body changed."""
        rules = choice.route.request_fields
        if app is not None and snap.app_field_rules:
            rules = snap.app_field_rules.get((app.name, choice.route.model), rules)
        modified = apply_field_rules(body, rules)
        if salted and app is not None and snap.cache_isolation:
            key = snap.cache_salt_key or self.salt_key
            salt = self._salts.get((key, app.name))
            if salt is None:
                salt = self._salts[(key, app.name)] = app_salt(key, app.name)
            salt_request(body, key, app.name, salt)
            modified = True
        return modified

    async def _limited(
        self,
        response: Response,
        ex: Exchange,
        app_limiter: ConcurrencyLimiter | None,
        backend_limiter: ConcurrencyLimiter,
        payload: bytes,
        policy: StreamPolicy,
        stream: bool,
        n_choices: int,
        extra_headers: list[Header],
        backend: Backend,
        adapter: Adapter,
        hint: RoutingHint | None = None,
        seek_stored: bool = False,
    ) -> None:
        """Permits (app, then backend), then the exchange with the backend."""
        keepalive = None
        if stream and policy.keepalive_interval is not None:
            keepalive = KeepAlive(
                response,
                policy.keepalive_interval,
                ex,
                adapter.sse_headers + extra_headers,
                self.deadlines,
            )
        try:
            app_permit = None
            # A wait no longer than the request's own deadline: then the queue's timeout.
            ends = request_deadline(policy.timeouts, ex.started_at, stream)
            if app_limiter is not None:
                app_permit = await app_limiter.acquire(ends)
                ex.queue_wait += app_permit.waited
            try:
                backend_permit = await backend_limiter.acquire(ends)
                ex.queue_wait += backend_permit.waited
                if ex.queue_wait and ends is not None and monotonic() >= ends:
                    # Its deadline passed while it queued: the queue's own timeout (503 or
                    # 429, Retry-After), and the backend is not asked for what the client
                    # no longer waits for.
                    backend_permit.release()
                    queued_at = (
                        app_limiter
                        if app_limiter is not None
                        and app_permit is not None
                        and app_permit.waited > backend_permit.waited
                        else backend_limiter
                    )
                    raise LimitExceeded(queued_at.name, "queue_timeout", queued_at.retry_after())
                started = monotonic()
                try:
                    await self._exchange(
                        response,
                        ex,
                        backend,
                        payload,
                        policy.timeouts,
                        policy,
                        stream,
                        n_choices,
                        extra_headers,
                        adapter,
                        keepalive,
                        hint,
                        backend_limiter.retry_after,
                        seek_stored,
                    )
                finally:
                    backend_permit.release()
                    backend_limiter.observe_service_time(monotonic() - started)
            finally:
                if app_permit is not None:
                    app_permit.release()
        finally:
            if keepalive is not None:
                keepalive.stop()

    async def _exchange(
        self,
        response: Response,
        ex: Exchange,
        backend: Backend,
        payload: bytes,
        timeouts: StreamTimeouts,
        policy: StreamPolicy,
        stream: bool,
        n_choices: int,
        extra_headers: list[Header],
        adapter: Adapter,
        keepalive: KeepAlive | None = None,
        hint: RoutingHint | None = None,
        retry_after: Callable[[], int] | None = None,
        seek_stored: bool = False,
    ) -> None:
        path = adapter.upstream_path
        upstream_headers = [*adapter.upstream_headers(), (b"x-request-id", ex.request_id.encode())]
        # A non-stream response's head comes with its whole body: only total bounds it.
        effective = timeouts if stream else _total_only(timeouts.total)
        # From the request's start: first_token and total count its wait in the queues.
        watchdog = StreamWatchdog(effective, self.deadlines, started=ex.started_at)
        self.watchdogs.add(watchdog)
        conn: UpstreamConnection | None = None
        replica: Replica | None = None
        chunk_filter: ChunkFilter | None = None  # the stream's, once its head came
        clean = False
        try:
            try:
                # Another replica is tried if one cannot be reached (only ever before a
                # byte went to the client, and never for a streamed upload).
                if adapter.body_stream is not None:
                    conn, replica = await open_on_replica(
                        self.pools, backend, adapter.method, path, upstream_headers, payload,
                        adapter.body_stream, adapter.stream_length,
                    )  # fmt: skip
                else:
                    conn, replica = await self.pools.open_exchange(
                        backend,
                        adapter.method,
                        path,
                        upstream_headers,
                        payload,
                        hint,
                        watchdog if stream else None,  # a whole answer's head waits for it all
                        seek_stored,
                    )
                if keepalive is not None:
                    keepalive.may_start = False
                watchdog.head()
                if conn.retried:
                    ex.upstream_retries += 1
                if not stream or conn.status != 200 or not conn.is_event_stream():
                    if response.started:  # the SSE head went out early (a keep-alive)
                        clean = await relay_refusal(
                            ex, conn, response, adapter.stream_refusal, retry_after
                        )
                    else:
                        clean = await relay_whole(
                            ex,
                            conn,
                            response,
                            policy,
                            extra_headers,
                            adapter.rewrite_body,
                            adapter.reshape_errors,
                            retry_after,
                        )
                    return
                ex.status = 200
                if not response.started:
                    response.start(200, adapter.sse_headers + extra_headers, with_first_write=True)
                self.active_streams += 1
                try:
                    chunk_filter = adapter.chunk_filter(ex, policy, n_choices, watchdog)
                    clean = await relay_stream(
                        ex,
                        conn,
                        response,
                        policy,
                        watchdog,
                        n_choices,
                        chunk_filter,
                        adapter.stream_error,
                    )
                finally:
                    self.active_streams -= 1
            except asyncio.CancelledError:
                if not watchdog.claim_cancellation():
                    raise
                kind = watchdog.expired or "timeout"
                hung = watchdog.hung_backend()
                if isinstance(hung, Replica):  # passive ejection, as for a refused connect
                    hung.record_failure()
                message = timeout_message(kind, effective)
                if kind == SHUTDOWN:
                    ex.error_code = kind
                    error_type, status = "server_error", 503
                else:
                    ex.timeout = kind
                    error_type, status = "timeout", 504
                if response.started:
                    response.write(adapter.stream_error(message, error_type, kind, chunk_filter))
                elif stream:
                    ex.status = 200
                    response.start(200, adapter.sse_headers + extra_headers)
                    response.write(adapter.stream_error(message, error_type, kind))
                else:
                    raise ApiError(status, message, type=error_type, code=kind) from None
        finally:
            watchdog.stop()
            self.watchdogs.discard(watchdog)
            if conn is not None and replica is not None:
                replica.pool.outstanding -= 1
                if not clean:
                    conn.abort()
                elif stream:
                    replica.pool.release_when_complete(conn, MESSAGE_END_TIMEOUT, self.deadlines)
                else:
                    replica.pool.release(conn)

    def max_body_bytes(self) -> int:
        """For the HTTP server, once per request: the current config's body limit (a method
        of this compiled class, not an interpreted lambda)."""
        return self.ref.current.max_body_bytes

    def wants_body_stream(self, request: Request) -> int:
        """For the HTTP server: how much of this request's body to stream (0: buffer it)."""
        return upload_limit(request, self.ref.current)


# StreamTimeouts(total=t) by t: built once, not per non-stream request (a dataclass's
# __init__ and checks, interpreted even in the compiled build). A handful of values.
_TOTAL_ONLY: Final[dict[float | None, StreamTimeouts]] = {}


def _total_only(total: float | None) -> StreamTimeouts:
    timeouts = _TOTAL_ONLY.get(total)
    if timeouts is None:
        timeouts = _TOTAL_ONLY[total] = StreamTimeouts(total=total)
    return timeouts


__all__ = ["SSE_HEADERS", "ProxyApp", "RouteChoice"]
