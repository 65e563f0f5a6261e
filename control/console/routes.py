"""The console's HTTP surface: pages, static assets and JSON endpoints under /console.

Every path but the login page and its assets needs a valid session cookie; POSTs also
need the CSRF header. With no admin token configured the console is off (403), like the
admin API. Responses never hold a key, a key digest, another request's prompt or
completion: the live page works from timings and counts only, config files are
redacted, and A/B numbers are the report's aggregates.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import orjson
from sluice.proxy.app import ProxyApp
from sluice.proxy.auth import check_origin
from sluice.proxy.errors import ApiError, send_error
from sluice.proxy.http import Handler, Request, Response
from sluice.proxy.observe import Observer
from sluice.proxy.routing import choose_route
from sluice.proxy.sampling import apply_plan, merge_stop
from sluice.proxy.snapshot import App, SnapshotRef

from . import session
from .history import ConfigHistory
from .live import LiveSeries

CONSOLE_PREFIX = "/console"
# The playground's caller: a name no config can declare (app names are identifiers), so
# its requests are told apart in metrics and logs and never count as an app's.
CONSOLE_CALLER = App(name="@console", key_hashes=frozenset(), routes=None, allow_preset_header=True)
PLAYGROUND_MAX_TOKENS = 512
PLAYGROUND_MAX_PROMPT = 16_000
TOP_LOGPROBS = 5

JSON = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
# The pages run only their own script and style; nothing is loaded from elsewhere.
PAGE_HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
]
STATIC_TYPES = {".js": b"text/javascript; charset=utf-8", ".css": b"text/css; charset=utf-8"}


@dataclass(slots=True)
class ConsoleServices:
    """What the console reads, wired by `sluice serve`."""

    ref: SnapshotRef
    app: ProxyApp
    observer: Observer
    history: ConfigHistory
    live: LiveSeries
    status: Callable[[], dict[str, Any]]  # /admin/status's body
    # records_location(): the SQLite file or the PostgreSQL URL; None when records are off
    records_db: str | None = None


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def _token_hash(services: ConsoleServices) -> bytes:
    expected = services.ref.current.admin_token_hash
    if expected is None:
        raise ApiError(
            403,
            "the console is disabled: set admin.token in the Gateway document",
            type="permission_error",
            code="admin_disabled",
        )
    return expected


def _session(request: Request, services: ConsoleServices) -> str:
    """The valid session cookie's value, or ApiError 401."""
    check_origin(request, services.ref.current)
    key = _token_hash(services)
    value = session.cookie_from_header(request.headers.get(b"cookie"))
    if value is None or not session.session_valid(key, value):
        raise ApiError(401, "log in to the console first", type="authentication_error",
                       code="console_login_required")  # fmt: skip
    return value


def _check_csrf(request: Request, services: ConsoleServices, cookie: str) -> None:
    given = (request.headers.get(session.CSRF_HEADER) or b"").decode("latin-1")
    if not session.csrf_valid(_token_hash(services), cookie, given):
        raise ApiError(403, "missing or wrong x-csrf-token", type="permission_error",
                       code="csrf_failed")  # fmt: skip


def _form_field(body: bytes, name: str) -> str | None:
    values = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).get(name)
    return values[0] if values else None


def console_routes(services: ConsoleServices) -> dict[str, Handler]:
    login_page = _static("login.html")
    app_page = _static("index.html")
    assets = {name: _static(name) for name in ("console.js", "console.css", "login.js")}

    def wrap(methods: tuple[str, ...], fn: Handler, *, auth: bool = True) -> Handler:
        async def handler(request: Request, response: Response) -> None:
            try:
                if request.method not in methods:
                    raise ApiError(405, f"use {' or '.join(methods)}", code="method_not_allowed",
                                   headers=[(b"allow", ", ".join(methods).encode())])  # fmt: skip
                if auth:
                    cookie = _session(request, services)
                    if request.method == "POST":
                        _check_csrf(request, services, cookie)
                await fn(request, response)
            except ApiError as exc:
                if not response.started:
                    send_error(response, exc)

        return handler

    async def page(request: Request, response: Response) -> None:
        check_origin(request, services.ref.current)
        key = _token_hash(services)
        value = session.cookie_from_header(request.headers.get(b"cookie"))
        logged_in = value is not None and session.session_valid(key, value)
        response.send(200, PAGE_HEADERS, app_page if logged_in else login_page)

    async def login(request: Request, response: Response) -> None:
        check_origin(request, services.ref.current)
        key = _token_hash(services)
        token = (_form_field(request.body, "token") or "").strip().encode()
        if not hmac.compare_digest(hashlib.sha256(token).digest(), key):
            headers = [*PAGE_HEADERS]
            body = login_page.replace(b'<p id="error" hidden>', b'<p id="error">')
            response.send(401, headers, body)
            return
        secure = request.headers.get(b"x-forwarded-proto") == b"https"
        cookie = session.issue_cookie(key)
        response.send(303, [(b"location", CONSOLE_PREFIX.encode()),
                            (b"set-cookie", session.set_cookie_header(cookie, secure=secure)),
                            (b"cache-control", b"no-store")], b"")  # fmt: skip

    async def logout(request: Request, response: Response) -> None:
        response.send(200, [*JSON, (b"set-cookie", session.clear_cookie_header())], b"{}")

    async def api_session(request: Request, response: Response) -> None:
        cookie = _session(request, services)
        snap = services.ref.current
        body = {
            "csrf": session.csrf_token(_token_hash(services), cookie),
            "version": snap.version,
            "routes": sorted(snap.routes),
            "presets": sorted(snap.presets),
        }
        response.send(200, JSON, orjson.dumps(body))

    async def api_live(request: Request, response: Response) -> None:
        window = _query_float(request, "window", 300.0, 30.0, 3600.0)
        body = {"status": services.status(), "live": services.live.summary(window)}
        response.send(200, JSON, orjson.dumps(body))

    async def api_config(request: Request, response: Response) -> None:
        err = services.history.last_error()
        body = {
            "serving": services.ref.current.version,
            "versions": [
                {"version": v.version, "at": v.at, "trigger": v.trigger, "files": sorted(v.files)}
                for v in services.history.versions()
            ],
            "last_error": None if err is None else asdict(err),
        }
        response.send(200, JSON, orjson.dumps(body))

    async def api_diff(request: Request, response: Response) -> None:
        query = parse_qs(request.query)
        old, new = query.get("from", [""])[0], query.get("to", [""])[0]
        diff = services.history.diff(old, new)
        if diff is None:
            raise ApiError(404, "unknown version (this process keeps the last 50)",
                           code="unknown_version")  # fmt: skip
        response.send(200, JSON, orjson.dumps({"from": old, "to": new, "diff": diff}))

    async def api_ab(request: Request, response: Response) -> None:
        reports = await asyncio.to_thread(_ab_reports, services)
        response.send(200, JSON, orjson.dumps(reports))

    async def api_plan(request: Request, response: Response) -> None:
        _, sent = _playground_request(request, services)
        response.send(200, JSON, orjson.dumps(sent))

    async def api_playground(request: Request, response: Response) -> None:
        internal, _ = _playground_request(request, services)
        await services.app.completions(internal, response, chat=True, caller=CONSOLE_CALLER)

    routes: dict[str, Handler] = {
        CONSOLE_PREFIX: wrap(("GET", "HEAD"), page, auth=False),
        CONSOLE_PREFIX + "/": wrap(("GET", "HEAD"), page, auth=False),
        CONSOLE_PREFIX + "/login": wrap(("POST",), login, auth=False),
        CONSOLE_PREFIX + "/logout": wrap(("POST",), logout),
        CONSOLE_PREFIX + "/api/session": wrap(("GET",), api_session),
        CONSOLE_PREFIX + "/api/live": wrap(("GET",), api_live),
        CONSOLE_PREFIX + "/api/config": wrap(("GET",), api_config),
        CONSOLE_PREFIX + "/api/config/diff": wrap(("GET",), api_diff),
        CONSOLE_PREFIX + "/api/ab": wrap(("GET",), api_ab),
        CONSOLE_PREFIX + "/api/playground": wrap(("POST",), api_playground),
        CONSOLE_PREFIX + "/api/playground/plan": wrap(("POST",), api_plan),
    }
    for name, data in assets.items():
        routes[f"{CONSOLE_PREFIX}/static/{name}"] = wrap(
            ("GET", "HEAD"), _asset(data, STATIC_TYPES[os.path.splitext(name)[1]]), auth=False
        )
    return routes


def _asset(data: bytes, content_type: bytes) -> Handler:
    async def handler(request: Request, response: Response) -> None:
        response.send(200, [(b"content-type", content_type), (b"cache-control", b"no-cache"),
                            (b"x-content-type-options", b"nosniff")], data)  # fmt: skip

    return handler


def _query_float(request: Request, name: str, default: float, lo: float, hi: float) -> float:
    raw = parse_qs(request.query).get(name)
    if not raw:
        return default
    try:
        value = float(raw[0])
    except ValueError:
        raise ApiError(400, f"'{name}' must be a number", param=name) from None
    return min(hi, max(lo, value))


def _playground_request(
    request: Request, services: ConsoleServices
) -> tuple[Request, dict[str, Any]]:
    """The chat request the playground sends, and the sampling fields sluice adds to it."""
    try:
        given = orjson.loads(request.body)
    except orjson.JSONDecodeError:
        raise ApiError(400, "body must be JSON", code="invalid_json") from None
    if not isinstance(given, dict):
        raise ApiError(400, "body must be a JSON object", code="invalid_json")
    route, prompt = given.get("route"), given.get("prompt")
    preset = given.get("preset") or ""
    max_tokens = given.get("max_tokens", 128)
    if not isinstance(route, str) or route not in services.ref.current.routes:
        raise ApiError(400, "pick one of the routes", param="route")
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > PLAYGROUND_MAX_PROMPT:
        raise ApiError(400, f"a prompt of 1-{PLAYGROUND_MAX_PROMPT} characters", param="prompt")
    if not isinstance(preset, str) or (preset and preset not in services.ref.current.presets):
        raise ApiError(400, "unknown preset", param="preset")
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= PLAYGROUND_MAX_TOKENS:
        raise ApiError(400, f"max_tokens must be 1-{PLAYGROUND_MAX_TOKENS}", param="max_tokens")
    body: dict[str, Any] = {
        "model": route,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": True,
        "top_logprobs": TOP_LOGPROBS,
        "max_tokens": max_tokens,
    }
    # Always an explicit preset: a playground request never joins an experiment (so it
    # never counts in an A/B report); by default the route's preset, else its control's.
    snap_route = services.ref.current.routes[route]
    if not preset:
        preset = snap_route.preset.name
    if not preset and snap_route.experiment is not None:
        preset = snap_route.experiment.variants[0].preset.name
    headers: dict[bytes, bytes] = {b"content-type": b"application/json"}
    if preset:
        headers[b"x-sluice-preset"] = preset.encode()
    internal = Request("POST", "/v1/chat/completions", "", headers, "1.1", True, request.client)
    internal.body = orjson.dumps(body)
    # What the pipeline will add: the same functions on a copy of the body.
    choice = choose_route(services.ref.current, copy.deepcopy(body), CONSOLE_CALLER, internal)
    merged = copy.deepcopy(body)
    if choice.plan.name:
        apply_plan(merged, choice.plan)
    merge_stop(merged, choice.policy.stop)
    sent = {k: v for k, v in merged.items() if body.get(k) != v}
    sent_info = {
        "preset": choice.plan.name,
        "variant": choice.variant,
        "policy": choice.policy.name,
        "stop": list(choice.policy.stop),
        "cut_patterns": [c.pattern for c in choice.policy.cut_patterns],
        "fields": sent,
    }
    return internal, sent_info


def _ab_reports(services: ConsoleServices) -> dict[str, Any]:
    """Every configured experiment's report, as `sluice ab report --json` computes it."""
    from sluice.control.ab.database import DB_ERRORS, redact  # noqa: PLC0415 - off the import path
    from sluice.control.ab.records import read_experiment  # noqa: PLC0415
    from sluice.control.ab.report import build_report, render_json  # noqa: PLC0415

    snap = services.ref.current
    db = services.records_db
    shown = None if db is None else redact(db)  # a PostgreSQL URL's password never leaves
    unreadable: tuple[type[Exception], ...] = (FileNotFoundError, *DB_ERRORS)
    out: list[dict[str, Any]] = []
    for name, experiment in snap.experiments.items():
        if db is None:
            out.append({"experiment": name, "error": "records are off (records.path: null)"})
            continue
        try:
            records = read_experiment(db, name, None)
        except unreadable as exc:
            out.append({"experiment": name, "error": f"cannot read the records: {exc}"})
            continue
        report = build_report(name, records, config=experiment, db=shown or "")
        out.append(json.loads(render_json(report)))
    return {"db": shown, "experiments": out}
