"""The `kind: Gateway` document as ops write it: listen address, backends, routes, apps,
experiments, records and the edge renderers' input. File models only (see schema.py);
`gateway.py` resolves the references into the snapshot.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, Strict

from .schema import DocumentIssue, Path, Section, StructuredOutputsSection
from .values import (
    ENV_RE,
    Bool,
    Duration,
    FilePath,
    Float,
    HeaderName,
    Host,
    HostPort,
    HttpPath,
    Int,
    ModelName,
    Name,
    Origin,
    Port,
    Rate,
    RoutePattern,
    Secret,
    ServerName,
    Sticky,
    TypeLabel,
    UpstreamModel,
    Url,
    WorkerName,
)


def _check_network(value: str) -> str:
    """An address or network in CIDR form (173.245.48.0/20, 2400:cb00::/32), normalised."""
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ValueError(
            f"{value!r} is not an IP address or network like 173.245.48.0/20"
        ) from None


Network = Annotated[str, Strict(), AfterValidator(_check_network), TypeLabel("IP network")]


class ListenSection(Section):
    host: Host = Field(default="127.0.0.1", description="Address sluice listens on.")
    port: Port = Field(default=8000, ge=1, le=65535, description="Port sluice listens on.")


class AdminSection(Section):
    token: Secret | None = Field(
        default=None,
        description="Admin API bearer token (sha256:<hex> or env:VAR); null or an unset "
        "variable: the admin API is disabled.",
    )


def _check_store_url(value: str) -> str:
    """redis://, rediss:// or unix:// (a Redis URL), or env:VAR holding one."""
    if ENV_RE.fullmatch(value) or value.split("://", 1)[0] in ("redis", "rediss", "unix"):
        return value
    raise ValueError(f"expected a Redis URL (redis://host:6379/0) or env:VAR, got {value!r}")


def _check_records_url(value: str) -> str:
    """postgresql:// (or postgres://), or env:VAR holding one."""
    if ENV_RE.fullmatch(value) or value.split("://", 1)[0] in ("postgresql", "postgres"):
        return value
    raise ValueError(
        f"expected a PostgreSQL URL (postgresql://user@host/db) or env:VAR, got {value!r}"
    )


StoreUrl = Annotated[str, Strict(), AfterValidator(_check_store_url), TypeLabel("Redis URL")]
RecordsUrl = Annotated[
    str, Strict(), AfterValidator(_check_records_url), TypeLabel("PostgreSQL URL")
]


class LimitsSection(Section):
    max_body_bytes: Int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above)."
    )
    max_upload_bytes: Int = Field(
        default=100 * 1024 * 1024,
        ge=1024,
        description="Largest multipart upload (audio) to a forwarded route; streamed through.",
    )
    forward_unknown_paths: bool = Field(
        default=True,
        description="Pass-through mode (--backend, no routes): relay paths sluice does not "
        "know to the backend; false: answer 404.",
    )
    store: StoreUrl | None = Field(
        default=None,
        description="Redis URL (or env:VAR) that makes every backend and app limit global "
        "across replicas and workers; null: one host (the supervisor shares them).",
    )
    lease: Duration = Field(
        default=10.0, description="A dead replica's permits return within this time (Redis)."
    )
    store_timeout: Duration = Field(
        default=1.0, description="A Redis call slower than this falls back to the local share."
    )


class QueueSection(Section):
    max: Int = Field(default=1024, ge=0, description="Requests that may wait for a permit.")
    max_wait: Duration = Field(default=10.0, description="Longest wait for a permit.")


class HealthSection(Section):
    path: HttpPath = Field(default="/health", description="GET this path on every replica.")
    interval: Duration = Field(default=5.0, description="Time between checks.")
    timeout: Duration = Field(default=2.0, description="A check slower than this fails.")


class RoutingSection(Section):
    strategy: Literal["score", "least_outstanding"] = Field(
        default="score",
        description="How a request picks a replica: score (prefix affinity, session "
        "affinity and load; docs/ROUTING.md) or least_outstanding (fewest requests in flight).",
    )
    block_chars: Int = Field(
        default=256,
        ge=16,
        le=65536,
        description="Prompt characters (UTF-8 bytes) per hashed block, about 4 per token.",
    )
    index_blocks: Int = Field(
        default=16384,
        ge=1,
        le=10_000_000,
        description="Block hashes remembered per replica (LRU; ~125 bytes each); the default "
        "covers ~1M tokens, more than most replicas' KV cache.",
    )
    prefix_weight: Float = Field(
        default=3.0, ge=0, description="Weight of the share of the prompt a replica has cached."
    )
    load_weight: Float = Field(
        default=2.0, ge=0, description="Weight of a replica's load (in flight + vLLM's queue)."
    )
    kv_weight: Float = Field(
        default=1.0, ge=0, description="Weight of a replica's free KV cache (vLLM's /metrics)."
    )
    session_header: HeaderName | None = Field(
        default=None,
        description="Header whose value pins a session to the replica it last used; null: off.",
    )
    session_weight: Float = Field(
        default=10.0, ge=0, description="Weight of the session pin (when session_header is set)."
    )
    max_waiting: Int = Field(
        default=8,
        ge=0,
        description="Load guard: a replica with more queued requests (vllm:num_requests_waiting) "
        "gets no affinity bonus.",
    )
    max_kv_usage: Float = Field(
        default=0.95,
        ge=0,
        le=1,
        description="Load guard: a replica with more KV cache in use gets no affinity bonus.",
    )
    max_imbalance: Int = Field(
        default=16,
        ge=0,
        description="Load guard: a replica with this many more requests in flight than the least "
        "loaded one gets no affinity bonus.",
    )
    scrape_interval: Duration | None = Field(
        default=0.5,
        gt=0,
        description="How often vLLM's /metrics is read on each replica; null: never (load is "
        "this process's requests in flight only).",
    )
    scrape_path: HttpPath = Field(default="/metrics", description="Path of vLLM's metrics.")


class BackendSection(Section):
    name: Name = Field(description="Backend name, referenced by routes.")
    urls: tuple[Url, ...] = Field(
        min_length=1, description="Replica base URLs, http(s)://host[:port] (no path)."
    )
    max_concurrency: Int = Field(default=256, ge=1, description="Requests in flight, all replicas.")
    queue: QueueSection = Field(
        default_factory=QueueSection, description="Wait queue (503 when full)."
    )
    connect_timeout: Duration = Field(default=5.0, description="TCP connect deadline.")
    health: HealthSection | None = Field(
        default=None, description="Active health check; null: off."
    )
    routing: RoutingSection = Field(
        default_factory=RoutingSection,
        description="Replica choice when the backend has several URLs.",
    )


class RouteSection(Section):
    model: ModelName = Field(description="Public model name clients send.")
    backend: Name = Field(description="Backend that serves it.")
    upstream_model: UpstreamModel | None = Field(
        default=None, description="Model name sent upstream; null: the public name unchanged."
    )
    preset: Name | None = Field(default=None, description="Preset applied; null: none.")
    policy: Name | None = Field(default=None, description="Policy applied; null: none.")


class AppSection(Section):
    name: Name = Field(description="App name (logs, metrics, records).")
    keys: tuple[Secret, ...] = Field(
        min_length=1, description="API keys as sha256:<hex> or env:VAR; never plaintext."
    )
    routes: tuple[ModelName, ...] | None = Field(
        default=None, description="Routes (public model names) allowed; null: all."
    )
    max_concurrency: Int | None = Field(
        default=None, ge=1, description="Requests in flight for this app; null: no limit."
    )
    queue: QueueSection = Field(
        default_factory=QueueSection, description="Wait queue (429 when full)."
    )
    default_preset: Name | None = Field(
        default=None, description="Preset for routes that set none; null: none."
    )
    allow_preset_header: Bool = Field(
        default=False, description="Let requests pick a preset with the x-sluice-preset header."
    )
    structured_outputs: StructuredOutputsSection | None = Field(
        default=None,
        description="Structured-output rule for this app's requests, on top of the "
        "route policy's; null: none.",
    )


class VariantSection(Section):
    name: Name = Field(description="Variant name (x-sluice-variant, records).")
    preset: Name = Field(description="Preset this variant applies.")
    policy: Name | None = Field(default=None, description="Policy; null: the route's.")
    weight: Int = Field(ge=1, description="Relative share of traffic.")


class ExperimentSection(Section):
    name: Name = Field(description="Experiment name (`sluice ab report NAME`).")
    route: ModelName = Field(description="Route (public model name) whose traffic is split.")
    sticky: Sticky = Field(
        description="Assignment key: header:<name>, user (the body's user field) or app."
    )
    variants: tuple[VariantSection, ...] = Field(min_length=2, description="At least two.")


class RecordsSection(Section):
    path: FilePath | None = Field(
        default="sluice-records.sqlite",
        description="SQLite file, relative to the working directory; null: no records and "
        "no /v1/feedback. This section is read at start-up (a change needs a restart).",
    )
    url: RecordsUrl | None = Field(
        default=None,
        description="PostgreSQL URL (or env:VAR): every replica writes there instead of "
        "`path`, so `sluice ab report` and feedback see all of them.",
    )
    batch_size: Int = Field(default=256, ge=1, description="Records per write transaction.")
    flush_interval: Duration = Field(default=1.0, description="Longest time a record waits.")
    max_buffer: Int = Field(
        default=10000, ge=1, description="Records buffered at most; beyond, new ones are dropped."
    )


class TlsSection(Section):
    cert: FilePath = Field(description="Certificate chain file (PEM).")
    key: FilePath = Field(description="Private key file (PEM).")
    port: Port = Field(
        default=443, ge=1, le=65535, description="Port of the TLS server block (HTTP/2 and 1.1)."
    )


class LimitReqSection(Section):
    rate: Rate = Field(description="Like 20r/s or 600r/m.")
    burst: Int = Field(default=0, ge=0, description="Requests above the rate that may queue.")


class NginxSection(Section):
    server_name: ServerName = Field(description="Public host name.")
    listen: Port = Field(default=8080, ge=1, le=65535, description="Port nginx listens on.")
    replicas: tuple[HostPort, ...] = Field(
        default=(), description="sluice replicas as host:port; empty: the Gateway's listen."
    )
    tls: TlsSection | None = Field(default=None, description="TLS certificate; null: plain HTTP.")
    limit_conn: Int | None = Field(
        default=None, ge=1, description="Connections per client address; null: no limit."
    )
    limit_req: LimitReqSection | None = Field(
        default=None, description="Request rate per client address; null: no limit."
    )
    trusted_proxies: tuple[Network, ...] = Field(
        default=(),
        description="Addresses of the proxies in front of nginx (Cloudflare's ranges): from "
        "them, the x-sluice-client-ip header the rendered Worker sets is the client address "
        "for limit_conn, limit_req and the log; empty: the TCP peer is the client.",
    )
    access_log: FilePath = Field(
        default="/var/log/nginx/sluice-access.log",
        description="JSON access log file (relative: to nginx's prefix).",
    )


class CloudflareSection(Section):
    worker_name: WorkerName = Field(description="Worker script name.")
    routes: tuple[RoutePattern, ...] = Field(
        min_length=1, description="Route patterns like api.example.com/v1/*."
    )
    origin: Url = Field(description="Origin the Worker forwards to (nginx), no path.")
    allowed_origins: tuple[Origin, ...] = Field(
        default=(), description="CORS origins allowed; empty: no CORS headers."
    )
    keepalive_interval: Duration = Field(
        default=30.0, description="SSE comment sent when a stream is idle this long (< 100s)."
    )


class EdgeSection(Section):
    origin_secret: Secret | None = Field(
        default=None,
        description="Shared secret the edge sends in x-sluice-origin-secret; when set, sluice "
        "rejects requests without it. sha256:<hex> or env:VAR.",
    )
    nginx: NginxSection | None = Field(default=None, description="`sluice render nginx` input.")
    cloudflare: CloudflareSection | None = Field(
        default=None, description="`sluice render cloudflare` input."
    )


class GatewayFile(Section):
    """`kind: Gateway` - the one document that says what sluice serves (at most one)."""

    kind: Literal["Gateway"] = Field(description="Gateway.")
    listen: ListenSection = Field(default_factory=ListenSection, description="Listen address.")
    admin: AdminSection = Field(default_factory=AdminSection, description="Admin API.")
    limits: LimitsSection = Field(default_factory=LimitsSection, description="Request limits.")
    backends: tuple[BackendSection, ...] = Field(default=(), description="Upstream pools.")
    routes: tuple[RouteSection, ...] = Field(default=(), description="Public model names.")
    apps: tuple[AppSection, ...] = Field(
        default=(), description="Clients and their keys; none: the gateway needs no API key."
    )
    experiments: tuple[ExperimentSection, ...] = Field(default=(), description="A/B tests.")
    records: RecordsSection = Field(
        default_factory=RecordsSection, description="Per-request records (A/B reports)."
    )
    edge: EdgeSection = Field(default_factory=EdgeSection, description="Edge renderers' input.")


def _duplicates(items: tuple[Any, ...], attr: str, base: Path) -> Iterator[DocumentIssue]:
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        value = getattr(item, attr)
        if value in seen:
            yield (
                (*base, index, attr),
                f"duplicate {attr} {value!r} (also {base[-1]}[{seen[value]}])",
            )
        else:
            seen[value] = index


def gateway_issues(doc: GatewayFile) -> list[DocumentIssue]:
    """Rules that relate fields of the Gateway document; each names the path to blame."""
    issues: list[DocumentIssue] = []
    issues += _duplicates(doc.backends, "name", ("backends",))
    issues += _duplicates(doc.routes, "model", ("routes",))
    issues += _duplicates(doc.apps, "name", ("apps",))
    issues += _duplicates(doc.experiments, "name", ("experiments",))
    for i, exp in enumerate(doc.experiments):
        issues += _duplicates(exp.variants, "name", ("experiments", i, "variants"))
    for i, backend in enumerate(doc.backends):
        health = backend.health
        if health is not None and health.timeout >= health.interval:
            issues.append(
                (
                    ("backends", i, "health", "timeout"),
                    f"timeout {health.timeout:g}s must be < interval {health.interval:g}s",
                )
            )
    records = doc.records
    if records.max_buffer < records.batch_size:
        issues.append(
            (
                ("records", "max_buffer"),
                f"max_buffer {records.max_buffer} < batch_size {records.batch_size}",
            )
        )
    cloudflare = doc.edge.cloudflare
    if cloudflare is not None and cloudflare.keepalive_interval >= 100:
        issues.append(
            (
                ("edge", "cloudflare", "keepalive_interval"),
                "must be < 100s: Cloudflare closes a connection idle for 100s",
            )
        )
    return issues
