"""The Cloudflare Worker in front of the origin (`sluice render cloudflare`).

Two files: `worker.js`, an ES module whose settings are one JSON object (`json.dumps`,
never string concatenation), and `wrangler.toml` with the routes and the origin URL as a
variable. The origin secret is never in either: the Worker reads it from the
SLUICE_ORIGIN_SECRET secret (`wrangler secret put`).
"""

from __future__ import annotations

from typing import Any

from sluice.control.config.build import BuiltConfig
from sluice.control.config.gateway_schema import GatewayFile
from sluice.control.errors import CliError

from .nginx import root_paths
from .templates import RenderedFiles, environment
from .timing import edge_timing, seconds

TEMPLATES = "sluice.edge.cloudflare"
WORKER_FILE = "worker.js"
WRANGLER_FILE = "wrangler.toml"
# The Workers runtime behaviour the Worker was written and tested against (workerd in
# cloudflare/package.json supports it).
COMPATIBILITY_DATE = "2025-09-01"
# Cloudflare answers 524 when an origin sends no response headers for this long.
CLOUDFLARE_IDLE_LIMIT = 100.0

# Request headers a browser may send cross-origin; experiments' sticky headers are added.
CORS_ALLOW_HEADERS = (
    "authorization",
    "content-type",
    "x-api-key",
    "x-request-id",
    "x-sluice-preset",
)
# A resume's position in the stream (GET /v1/streams/<id>), sent by EventSource itself.
RESUME_HEADER = "last-event-id"
# Response headers a browser script may read.
CORS_EXPOSE_HEADERS = (
    "retry-after",
    "x-request-id",
    "x-sluice-config",
    "x-sluice-preset",
    "x-sluice-variant",
)
# x-sluice-* request headers a client may send; every other one only the edge sets.
CLIENT_SLUICE_HEADERS = ("x-sluice-preset",)
CORS_MAX_AGE = 86400


def _sticky_headers(gateway: GatewayFile) -> list[str]:
    return sorted(
        {
            e.sticky.removeprefix("header:")
            for e in gateway.experiments
            if e.sticky.startswith("header:")
        }
    )


def _config_headers(built: BuiltConfig, gateway: GatewayFile) -> set[str]:
    """Request headers the config gives a meaning: experiments' sticky headers, backends'
    session headers (routing.session_header), and Last-Event-ID where a route's streams
    are resumable (resume_window)."""
    headers = set(_sticky_headers(gateway))
    headers |= {b.routing.session_header for b in gateway.backends if b.routing.session_header}
    policies = [route.policy for route in built.snapshot.routes.values()]
    for route in built.snapshot.routes.values():
        if route.experiment is not None:
            policies += [v.policy for v in route.experiment.variants if v.policy is not None]
    if any(policy.resume_window for policy in policies):
        headers.add(RESUME_HEADER)
    return headers


def worker_settings(built: BuiltConfig, gateway: GatewayFile) -> dict[str, Any]:
    """What worker.js embeds as `SETTINGS`: plain JSON data."""
    section = gateway.edge.cloudflare
    assert section is not None
    allow = sorted(set(CORS_ALLOW_HEADERS) | _config_headers(built, gateway))
    return {
        "allowedOrigins": list(section.allowed_origins),
        "corsAllowHeaders": allow,
        "corsExposeHeaders": list(CORS_EXPOSE_HEADERS),
        "corsMaxAge": CORS_MAX_AGE,
        "clientSluiceHeaders": list(CLIENT_SLUICE_HEADERS),
        "keepaliveMs": round(section.keepalive_interval * 1000),
        "originSecretRequired": gateway.edge.origin_secret is not None,
        "pathPrefix": "/v1/",
        # vLLM's and TGI's routes outside /v1/, exactly (see nginx.root_paths).
        "rootPaths": ["/", *("/" + path for path in root_paths())],
    }


def render_cloudflare(built: BuiltConfig, gateway: GatewayFile) -> RenderedFiles:
    section = gateway.edge.cloudflare
    if section is None:
        raise CliError("the Gateway document has no edge.cloudflare section: nothing to render")
    env = environment(TEMPLATES)
    settings = worker_settings(built, gateway)
    worker = env.get_template("worker.js.j2").render(settings=settings)
    wrangler = env.get_template("wrangler.toml.j2").render(
        name=section.worker_name,
        main=WORKER_FILE,
        compatibility_date=COMPATIBILITY_DATE,
        routes=list(section.routes),
        origin=section.origin,
        secret_required=settings["originSecretRequired"],
    )
    warnings = []
    timing = edge_timing(built, gateway)
    if timing.first_byte >= CLOUDFLARE_IDLE_LIMIT:
        warnings.append(
            f"queue waits and connect add up to {seconds(timing.first_byte)}: Cloudflare "
            f"answers 524 when the origin sends no headers for {seconds(CLOUDFLARE_IDLE_LIMIT)}"
            " (lower apps[].queue.max_wait or backends[].queue.max_wait)"
        )
    if gateway.edge.origin_secret is None:
        warnings.append(
            "edge.origin_secret is not set: sluice accepts requests that bypass the Worker"
        )
    return RenderedFiles({WORKER_FILE: worker, WRANGLER_FILE: wrangler}, tuple(warnings))
