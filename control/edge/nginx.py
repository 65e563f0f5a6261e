"""The nginx config in front of sluice's replicas (`sluice render nginx`).

One http-context file (`sluice.conf`, for nginx.conf's http block; Debian:
/etc/nginx/conf.d/): an upstream of the replicas with HTTP/1.1 keep-alive, SSE-safe proxy
settings, WebSocket upgrades on the completion paths, timeouts derived from the routes'
deadlines, the body limit, X-Request-ID, per-client limits, a JSON access log, health
locations, and an optional TLS server block. Only /v1/ and the health checks are
reachable through it: /metrics and /admin stay private.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from sluice.control.config.build import BuiltConfig
from sluice.control.config.gateway_schema import GatewayFile
from sluice.control.errors import CliError
from sluice.proxy.endpoints import FORWARDED, LOCAL_PATHS, UNGUARDED_GENERATING
from sluice.proxy.http import KEEPALIVE_IDLE_TIMEOUT
from sluice.proxy.tgi import TGI_PATHS
from sluice.proxy.websocket import WEBSOCKET_PATHS

from .templates import RenderedFiles, environment
from .timing import (
    EDGE_TIMEOUT_MARGIN,
    UNBOUNDED_STREAM_SECONDS,
    EdgeTiming,
    edge_timing,
    seconds,
)

TEMPLATES = "sluice.edge.nginx"
CONFIG_FILE = "sluice.conf"
# nginx drops an idle upstream connection before sluice does, so it never sends a request
# on a connection that sluice is closing (a POST is not retried: the client would get 502).
UPSTREAM_KEEPALIVE_TIMEOUT = int(KEEPALIVE_IDLE_TIMEOUT) - 15
# Idle connections each nginx worker keeps to the replicas: the backends' concurrency, so
# a burst's connections are reused rather than re-opened, within reason.
UPSTREAM_KEEPALIVE_MAX = 1024
UPSTREAM_KEEPALIVE_MIN = 16
UPSTREAM_CONNECT_TIMEOUT = 5
HEALTH_READ_TIMEOUT = 5
# Request bodies up to this size stay in memory; beyond, nginx spools them to a temp file.
BODY_BUFFER_MAX = 1024 * 1024
LIMIT_ZONE_SIZE = "10m"  # ~160k client addresses per zone


def _replica(host: str, port: int) -> str:
    """The Gateway's listen address as an upstream server: wildcards mean this host."""
    wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1"}
    host = wildcard.get(host, host)
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a host name
    return f"{host}:{port}"


def nginx_context(built: BuiltConfig, gateway: GatewayFile) -> dict[str, Any]:
    section = gateway.edge.nginx
    assert section is not None
    timing: EdgeTiming = edge_timing(built, gateway)
    replicas = list(section.replicas) or [_replica(gateway.listen.host, gateway.listen.port)]
    concurrency = sum(backend.max_concurrency for backend in gateway.backends)
    keepalive = min(max(concurrency, UPSTREAM_KEEPALIVE_MIN), UPSTREAM_KEEPALIVE_MAX)
    max_body = gateway.limits.max_body_bytes
    tls = section.tls
    concrete_name = section.server_name != "_" and not section.server_name.startswith("*.")
    redirect_host = None
    if tls is not None and concrete_name:
        redirect_host = section.server_name + ("" if tls.port == 443 else f":{tls.port}")
    longest = timing.longest_total
    return {
        "server_name": section.server_name,
        "listen": section.listen,
        "replicas": replicas,
        "keepalive": keepalive,
        "keepalive_timeout": UPSTREAM_KEEPALIVE_TIMEOUT,
        "sluice_idle_timeout": int(KEEPALIVE_IDLE_TIMEOUT),
        "connect_timeout": UPSTREAM_CONNECT_TIMEOUT,
        "health_timeout": HEALTH_READ_TIMEOUT,
        "read_timeout": timing.read_timeout,
        "read_timeout_why": (
            f"longest route total {seconds(longest)}"
            if longest is not None
            else f"a route without a total timeout ({seconds(UNBOUNDED_STREAM_SECONDS)})"
        )
        + f" + queue waits and connect {seconds(timing.first_byte)}"
        + f" + margin {seconds(EDGE_TIMEOUT_MARGIN)}",
        "max_body_bytes": max_body,
        "max_upload_bytes": gateway.limits.max_upload_bytes,
        "root_paths": root_paths(),
        "websocket_paths": [path[1:] for path in WEBSOCKET_PATHS],
        "body_buffer": min(max_body, BODY_BUFFER_MAX),
        "limit_conn": section.limit_conn,
        "limit_req": section.limit_req,
        "zone_size": LIMIT_ZONE_SIZE,
        "trusted_proxies": list(section.trusted_proxies),
        "access_log": section.access_log,
        "tls": tls,
        "redirect_host": redirect_host,
    }


def root_paths() -> list[str]:
    """The routes sluice serves outside /v1/ (TGI's, vLLM's tokenizer, pooling and health
    routes), without their leading slash; `/` itself has its own location."""
    paths = {*FORWARDED, *UNGUARDED_GENERATING, *LOCAL_PATHS, *TGI_PATHS}
    return sorted(p[1:] for p in paths if p != "/" and not p.startswith("/v1/"))


def render_nginx(built: BuiltConfig, gateway: GatewayFile) -> RenderedFiles:
    if gateway.edge.nginx is None:
        raise CliError("the Gateway document has no edge.nginx section: nothing to render")
    template = environment(TEMPLATES).get_template("sluice.conf.j2")
    return RenderedFiles({CONFIG_FILE: template.render(nginx_context(built, gateway))})
