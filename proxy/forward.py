"""The routes sluice relays without reading their text (tokenize, embeddings, pooling,
speech to text, ...) and the ones it answers itself (`/health`, `/ping`, `/version`,
`GET /v1/models/{id}`).

A forwarded request runs the generating endpoints' pipeline (`ProxyApp.completions`):
authentication, the app's route rules, limits, deadlines, metrics and the access log. A
body that vLLM reads as a JSON object also gets the request-field rules, the app's
cache_salt where a model runs, and (where text is generated) the structured-output rules,
and is re-encoded when they change it; any other body (a multipart form, ...) goes upstream
as the client sent it, but for its `model`, rewritten to the route's upstream model. The
route is the one the body's `model` names (a JSON body, or a form's `model` field), else
the app's only route.
"""

from __future__ import annotations

import asyncio
import time
from importlib import metadata
from typing import Any, Final, Protocol
from urllib.parse import parse_qs

import orjson

from .adapters import Adapter, check_output_rules
from .auth import authenticate
from .backends import BackendPools, Replica
from .chunks import ChunkFilter
from .endpoints import (
    FORWARDED,
    GENERATING,
    LOCAL_PATHS,
    UNGUARDED_GENERATING,
    UNGUARDED_PREFIXES,
    forwarded_path,
    runs_model,
)
from .errors import ApiError, bad_gateway, bad_request, not_found
from .exchange import Exchange
from .formparts import FormScan, form_boundary
from .http import Request, Response
from .jsonbody import check_nesting
from .modellist import answer_limit, backend_get, fetch_model_list
from .response import JSON_HEADERS
from .routing import RouteChoice
from .snapshot import App, Backend, Route, Snapshot, SnapshotRef, StreamPolicy
from .timeouts import StreamWatchdog
from .upload import BodyStream, BodyTooLarge, BodyUnreadable, open_streamed_exchange
from .upstream import UpstreamConnection, UpstreamError


class ProxyApp(Protocol):
    """What the forwarder uses of its app (`app.ProxyApp`): readiness, snapshot, pools."""

    @property
    def ready(self) -> bool: ...

    @property
    def ref(self) -> SnapshotRef: ...

    @property
    def pools(self) -> BackendPools: ...


try:
    SLUICE_VERSION: str | None = metadata.version("sluice-gateway")
except metadata.PackageNotFoundError:  # a source tree without an install
    SLUICE_VERSION = None
MAX_VERSION_BODY: Final = 4096
# What pydantic reads as true in a form field (vLLM's TranscriptionRequest.stream).
FORM_TRUE: Final = frozenset((b"1", b"true", b"t", b"yes", b"y", b"on"))
_SNIFF_BYTES: Final = 64 * 1024


def _read_as_json(content_type: bytes) -> bool:
    """Whether vLLM's server (FastAPI) reads a body as JSON: with no Content-Type, or
    application/json or any application/*+json, in any case. Sluice must read the same
    bodies: one it left unread would reach vLLM past the route and field rules."""
    if not content_type:
        return True
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


class FormTail:
    """Watches a streamed form past the bytes read before its route was chosen: a `model`
    or `stream` field there is one vLLM would read and sluice did not."""

    __slots__ = ("_had_model", "_scan")

    def __init__(self, scan: FormScan, had_model: bool) -> None:
        self._scan = scan
        self._had_model = had_model

    def check(self, data: bytes) -> None:
        for field in self._scan.feed(data):
            if field.name == b"model" and self._had_model:
                raise _misplaced("the form has more than one 'model' field", "duplicate_model")
            raise _misplaced(
                f"the form's '{field.name.decode()}' field comes after the first "
                f"{_SNIFF_BYTES // 1024} KiB: send it before the file",
                "form_field_too_late",
            )


def _misplaced(message: str, code: str) -> ApiError:
    return bad_request(message, param="file", code=code)


def _is_form(content_type: bytes) -> bool:
    """A multipart form, as Starlette reads one (its media type in any case)."""
    return content_type[:19].lower() == b"multipart/form-data"


def only_route(snap: Snapshot, app: App | None) -> str | None:
    """The route a request without `model` means: the only one the app may use."""
    allowed = [m for m in snap.routes if app is None or app.routes is None or m in app.routes]
    return allowed[0] if len(allowed) == 1 else None


def upload_limit(request: Request, snap: Snapshot) -> int:
    """A multipart upload to a forwarded route is streamed, up to max_upload_bytes; any
    other body is buffered (0)."""
    if request.method != "POST":
        return 0
    content_type = request.headers.get(b"content-type", b"")
    if not _is_form(content_type):
        return 0
    path = request.path
    # Pass-through forwards every path, but those the app serves itself (the generating
    # ones, the local ones, the model list) read their body whole: streamed, it was never
    # read, and a form to /v1/chat/completions got "a zero-length document".
    if path in GENERATING or path in LOCAL_PATHS or path.startswith("/v1/models"):
        return 0
    return snap.max_upload_bytes if forwarded_path(path, snap) else 0


class ForwardAdapter(Adapter):
    """One forwarded request: its method, path and content type travel as they came."""

    forwards = True
    model_optional = True
    resumable = False

    def __init__(self, request: Request | None = None) -> None:
        self.request = request
        self.name = request.path if request is not None else "forward"
        self.method = request.method.encode() if request is not None else b"POST"
        self.reads_fields = self.takes_cache_salt = False  # until a JSON object is read
        self.form_model: tuple[int, int] | None = None  # where a multipart `model` value is
        if request is not None:
            path = request.path + ("?" + request.query if request.query else "")
            self.upstream_path = path.encode("latin-1")
            self.content_type = request.headers.get(b"content-type", b"")

    def read_form(self, scan: FormScan, prefix: bytes, body: dict[str, Any]) -> None:
        """The form's `model` (its route) and `stream` from the bytes read before the route
        is chosen; a streamed rest is watched for either (vLLM would read one sluice did
        not judge: the request is refused, its upload cut)."""
        fields = scan.feed(prefix)
        models = [f for f in fields if f.name == b"model"]
        if len(models) > 1:
            raise _misplaced("the form has more than one 'model' field", "duplicate_model")
        if models:
            model = models[0]
            if model.end < 0:
                raise _misplaced("the form's 'model' field is too long", "invalid_model")
            self.form_model = (model.start, model.end)
            body["model"] = prefix[model.start : model.end].decode("utf-8", "replace")
        streams = [f for f in fields if f.name == b"stream"]
        if streams:  # vLLM keeps a field's last value
            flag = streams[-1]
            value = prefix[flag.start : flag.end] if flag.end >= 0 else b""
            if value.strip().lower() in FORM_TRUE:
                body["stream"] = True
        if self.body_stream is not None:
            self.body_stream.inspect = FormTail(scan, bool(models)).check

    async def begin_forward(self, request: Request) -> tuple[Adapter, dict[str, Any]]:
        adapter = ForwardAdapter(request)
        content_type = adapter.content_type
        body: Any = {}
        stream = request.body_stream
        if stream is not None:
            # Streamed upload: the model field is looked for in the first bytes only.
            try:
                request.body = await stream.read_prefix(_SNIFF_BYTES)
            except (
                BodyTooLarge,
                BodyUnreadable,
                TimeoutError,
            ) as unread:  # mypyc types a name once
                raise upload_error(unread) from None
            adapter.body_stream = stream
            length = request.headers.get(b"content-length")
            adapter.stream_length = int(length) if length is not None else None
        if request.body and _read_as_json(content_type):
            check_nesting(request.body)  # re-encoding a deeper body would fail
            try:
                body = orjson.loads(request.body)
            except orjson.JSONDecodeError as exc:
                raise bad_request(
                    f"request body is not valid JSON: {exc}", code="invalid_json"
                ) from None
            if isinstance(body, dict):
                adapter.reads_fields = True
                adapter.takes_cache_salt = runs_model(request.path)
            else:
                body = {}
        elif _is_form(content_type):
            boundary = form_boundary(content_type)
            if boundary is not None:  # without one, no form vLLM could read either
                adapter.read_form(FormScan(boundary), request.body, body)
        if "model" not in body and request.query and adapter.names_stored_response(body):
            # A stored response is read without a body: an app with several routes names
            # its model in the query (vLLM ignores the parameter).
            named = parse_qs(request.query).get("model")
            if named:
                body["model"] = named[-1]
        return adapter, body

    def n_choices(self, body: dict[str, Any]) -> int:
        """A forwarded body goes as it came (a form's fields are strings): its `n` refuses
        nothing here."""
        n = body.get("n")
        return n if type(n) is int else 1

    def names_stored_response(self, body: dict[str, Any]) -> bool:
        return self.name.startswith(UNGUARDED_PREFIXES)

    def prepare(
        self, body: dict[str, Any], choice: RouteChoice, app: App | None = None
    ) -> tuple[dict[str, Any], bool]:
        policy = choice.policy
        if self.name not in FORWARDED and (choice.plan.name or policy.guard is not None):
            what = [f"preset '{choice.plan.name}'"] if choice.plan.name else []
            if policy.guard is not None:
                what.append(f"policy '{policy.name}'")
            raise ApiError(
                400,
                f"{self.name} generates text that sluice cannot apply {' and '.join(what)} "
                "to; use /v1/chat/completions, /v1/completions, /v1/responses or /v1/messages",
                code="policy_not_enforceable",
            )
        if self.reads_fields and self.name in UNGUARDED_GENERATING:
            # Only where text is generated: tokenize or embeddings under `require` are no
            # requests for free text.
            check_output_rules(body, policy, app)
        return body, False

    def is_stream(self, body: dict[str, Any]) -> bool:
        """`stream: true` where the endpoint may stream (generating ones, and paths sluice
        does not know); tokenize, embeddings, pooling, score, ... answer JSON whatever
        `stream` says, and a stream's early keep-alive head would turn that answer into
        a broken stream."""
        return body.get("stream") is True and self.name not in FORWARDED

    def payload(self, body: dict[str, Any], raw: bytes, modified: bool, route: Route) -> bytes:
        upstream = route.upstream_model
        renamed = upstream is not None and body.get("model") not in (None, upstream)
        if self.reads_fields:  # the body is a JSON object
            if renamed:
                body["model"] = upstream
            return orjson.dumps(body) if modified or renamed else raw
        if not renamed or upstream is None:
            return raw
        if self.form_model is not None:
            start, end = self.form_model
            if self.stream_length is not None:
                self.stream_length += len(upstream.encode()) - (end - start)
            return raw[:start] + upstream.encode() + raw[end:]
        return raw

    def upstream_headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", self.content_type)] if self.content_type else []
        if self.request is not None:
            accept = self.request.headers.get(b"accept")
            if accept:
                headers.append((b"accept", accept))
        return headers

    def chunk_filter(
        self, ex: Exchange, policy: StreamPolicy, n_choices: int, watchdog: StreamWatchdog | None
    ) -> ChunkFilter:
        return ChunkFilter(ex, True, None, 1, watchdog)  # timers only: nothing to guard

    def rewrite_body(self, obj: Any, policy: StreamPolicy, ex: Exchange) -> Any | None:
        if isinstance(obj, dict):
            ex.record_usage(obj.get("usage"))
        return None


class Forwarder:
    """The local answers and the forwarding adapter of one ProxyApp."""

    def __init__(self, app: ProxyApp) -> None:
        self.app = app
        self.adapter = ForwardAdapter()

    async def local(self, request: Request, response: Response) -> None:
        """`/health` and `/ping`: 200 (empty, as vLLM) while sluice is ready and a replica
        of some backend is up, else 503. `/version`: the backend's version and sluice's."""
        path = request.path
        if path == "/version":
            if request.method not in ("GET", "HEAD"):
                raise ApiError(
                    405, f"{request.method} is not allowed on /version", code="method_not_allowed"
                )
            await self._version(response)
            return
        if (
            path == "/"
            or request.method in ("GET", "HEAD")
            or (path == "/ping" and request.method == "POST")
        ):
            ready = self.app.ready and self._backend_up()
            response.send(200 if ready else 503, [], b"")
            return
        raise ApiError(405, f"{request.method} is not allowed on {path}", code="method_not_allowed")

    def _backend_up(self) -> bool:
        snap = self.app.ref.current
        backends = list(snap.backends.values())
        if not backends and snap.fallback_route is not None:
            backends = [snap.fallback_route.backend]
        if not backends:
            return True
        # Up: passing its health check (if any) and not ejected for failing requests.
        now = time.monotonic()
        return any(
            replica.available(now)
            for backend in backends
            for replica in self.app.pools.replicas(backend)
        )

    async def _version(self, response: Response) -> None:
        snap = self.app.ref.current
        route = snap.fallback_route or next(iter(snap.routes.values()), None)
        backend_version: Any = None
        if route is not None:
            replica = self.app.pools.choose(route.backend)
            try:
                status, body = await asyncio.wait_for(
                    backend_get(replica, b"/version", MAX_VERSION_BODY), answer_limit(route)
                )
                if status == 200:
                    backend_version = orjson.loads(body).get("version")
            except (UpstreamError, TimeoutError, orjson.JSONDecodeError, AttributeError):
                backend_version = None
        out = {"version": backend_version, "sluice": SLUICE_VERSION}
        response.send(200, JSON_HEADERS, orjson.dumps(out))

    async def _upstream_card(self, route: Route, name: str, response: Response) -> None:
        """Pass-through mode: the card from the backend's /v1/models (vLLM 0.26 has no
        /v1/models/{id} route of its own)."""
        status, body = await fetch_model_list(route, self.app.pools)
        try:
            cards = orjson.loads(body).get("data") if status == 200 else None
        except (orjson.JSONDecodeError, AttributeError):
            cards = None
        if not isinstance(cards, list):
            raise ApiError(502, f"backend answered /v1/models with {status}", code="upstream_error")
        for card in cards:
            if isinstance(card, dict) and card.get("id") == name:
                response.send(200, JSON_HEADERS, orjson.dumps(card))
                return
        raise not_found(f"the model '{name}' does not exist", code="model_not_found", param="model")

    async def model_card(self, request: Request, response: Response) -> None:
        """`GET /v1/models/{id}`: the route's card, as one entry of `/v1/models`."""
        if request.method not in ("GET", "HEAD"):
            raise ApiError(405, f"{request.method} is not allowed here", code="method_not_allowed")
        snap = self.app.ref.current
        app = authenticate(request, snap)
        name = request.path[len("/v1/models/") :]
        if not snap.routes and snap.fallback_route is not None:
            await self._upstream_card(snap.fallback_route, name, response)
            return
        if name not in snap.routes or (
            app is not None and app.routes is not None and name not in app.routes
        ):
            raise not_found(
                f"the model '{name}' does not exist", code="model_not_found", param="model"
            )
        card = {"id": name, "object": "model", "created": 0, "owned_by": "sluice"}
        response.send(
            200, [*JSON_HEADERS, (b"x-sluice-config", snap.version.encode())], orjson.dumps(card)
        )


async def open_on_replica(
    pools: BackendPools,
    backend: Backend,
    method: bytes,
    path: bytes,
    headers: list[tuple[bytes, bytes]],
    prefix: bytes,
    body: BodyStream,
    length: int | None,
) -> tuple[UpstreamConnection, Replica]:
    """`open_streamed_exchange` on one replica of the backend, with the bookkeeping of
    BackendPools.open_exchange (outstanding count, failure record); errors become API errors."""
    replica = pools.choose(backend)
    replica.pool.outstanding += 1
    try:
        conn = await open_streamed_exchange(
            replica.pool, method, path, headers, prefix, body, length
        )
    except UpstreamError as exc:
        replica.pool.outstanding -= 1
        replica.record_failure()
        raise bad_gateway(f"backend {backend.name}: {exc}", code="upstream_" + exc.kind) from None
    except (
        BodyTooLarge,
        BodyUnreadable,
        TimeoutError,
    ) as unread:  # not `exc`: mypyc types a name once
        replica.pool.outstanding -= 1
        raise upload_error(unread) from None
    except BaseException:
        replica.pool.outstanding -= 1
        raise
    replica.record_success()
    return conn, replica


def upload_error(exc: BaseException) -> ApiError:
    """A streamed upload that could not be read whole, as the client's error."""
    if isinstance(exc, BodyTooLarge):
        return ApiError(413, str(exc), code="request_too_large")
    if isinstance(exc, BodyUnreadable):
        return ApiError(400, str(exc), code="bad_http")
    return ApiError(408, "the request body stopped arriving", code="request_timeout")
