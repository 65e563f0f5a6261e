"""The `kind: Gateway` document as ops write it: listen address, backends, routes, apps,
experiments, records and the edge renderers' input. File models only (see schema.py);
`gateway.py` resolves the references into the snapshot.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, Strict, model_validator
from sluice.proxy.snapshot import (
    DEFAULT_FIRST_TOKEN_TIMEOUT,
    DEFAULT_INTER_TOKEN_TIMEOUT,
    DEFAULT_RESPONSE_HEAD_TIMEOUT,
    DEFAULT_TOTAL_TIMEOUT,
    DEFAULT_UPSTREAM_IDLE_TIMEOUT,
)

from .schema import DocumentIssue, Path, Section, StructuredOutputsSection
from .values import (
    ENV_RE,
    Bool,
    Duration,
    DurationOrZero,
    FilePath,
    Float,
    HeaderName,
    Host,
    HostPort,
    HttpPath,
    Int,
    KeepaliveInterval,
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
    check_json_value,
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


def _check_env_secret(value: str) -> str:
    """`env:VAR` only: a secret sluice must know in full (not a digest)."""
    if not ENV_RE.fullmatch(value):
        raise ValueError("expected env:VAR (the variable holds the secret)")
    return value


EnvSecret = Annotated[str, Strict(), AfterValidator(_check_env_secret), TypeLabel("env:VAR")]


def _check_log_path(value: str) -> str:
    """A log file; `off` would turn nginx's log off and leave the format name after it."""
    if value == "off":
        raise ValueError(
            "'off' is not a file path here: nginx would read it as turning the log off and "
            "then refuse the log format after it; to discard the log, write /dev/null"
        )
    return value


LogPath = Annotated[FilePath, AfterValidator(_check_log_path)]

FIELD_MODES_HINT = "allow, deny or {force: value}"


class FieldRule(Section):
    """What a request may do with one top-level body field: written `allow`, `deny` or
    `{force: value}`."""

    mode: Literal["allow", "deny", "force"] = Field(description="allow, deny or force.")
    value: Annotated[Any, AfterValidator(check_json_value)] = Field(
        default=None, description="The value sent for mode force."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value not in ("allow", "deny"):
                hint = " (write {force: value})" if value == "force" else ""
                raise ValueError(f"unknown mode {value!r}; expected {FIELD_MODES_HINT}{hint}")
            return {"mode": value}
        if isinstance(value, dict):
            if set(value) != {"force"}:
                raise ValueError(f"expected {FIELD_MODES_HINT}, got a mapping with {sorted(value)}")
            return {"mode": "force", "value": value["force"]}
        raise ValueError(f"expected {FIELD_MODES_HINT}")


RequestFields = dict[str, FieldRule]
REQUEST_FIELDS_DESCRIPTION = (
    "Per top-level request field: allow, deny (400 unless the value is vLLM's default) or "
    "{force: value}. Layered: Gateway, then route, then app (the more specific wins); "
    "priority, chat_template, kv_transfer_params, vllm_xargs and background are denied "
    "unless allowed."
)


class TimeoutDefaultsSection(Section):
    """Every route's deadlines unless its Policy sets them (pass-through mode uses these
    defaults too); null turns one off."""

    first_token: Duration | None = Field(
        default=DEFAULT_FIRST_TOKEN_TIMEOUT,
        description=(
            "Request start (queues included) to first content token, for streams; null: none."
        ),
    )
    inter_token: Duration | None = Field(
        default=DEFAULT_INTER_TOKEN_TIMEOUT,
        description="Between content tokens (keep-alives don't count), for streams; null: none.",
    )
    total: Duration | None = Field(
        default=DEFAULT_TOTAL_TIMEOUT,
        description="Whole request, queues included, stream or not; null: none.",
    )
    response_head: Duration | None = Field(
        default=DEFAULT_RESPONSE_HEAD_TIMEOUT,
        description="Request start to the backend's response head, for streams and "
        "GET /v1/models forwarding; null: none.",
    )


def _off_is_false(value: Any) -> Any:
    # YAML 1.1 (pyyaml) reads a bare `off` as false; that is what ops mean by it here.
    return "off" if value is False else value


class CacheIsolationSection(Section):
    mode: Annotated[Literal["per_app", "off"], BeforeValidator(_off_is_false)] = Field(
        default="per_app",
        description="per_app: with apps declared, every JSON request that runs a model "
        "(not tokenize or render) carries vLLM's cache_salt derived from its app "
        "(HMAC-SHA256 of the app name, and of the client's own cache_salt if it sent one), "
        "so one app cannot probe another's cached prompts by "
        "timing; off: requests go upstream as sent.",
    )
    secret: EnvSecret | None = Field(
        default=None,
        description="Key of the HMAC (set it when several replicas must agree); null: a "
        "random key generated once into secret_file.",
    )
    secret_file: FilePath = Field(
        default="sluice-cache-salt.key",
        description="Where the generated key is kept (mode 0600), relative to the working "
        "directory; read at start-up (a change needs a restart).",
    )


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
    """redis://, rediss:// or unix:// (a Redis URL the client can use: port, options), or
    env:VAR holding one (checked at start-up)."""
    if ENV_RE.fullmatch(value):
        return value
    if value.split("://", 1)[0] not in ("redis", "rediss", "unix"):
        raise ValueError(f"expected a Redis URL (redis://host:6379/0) or env:VAR, got {value!r}")
    from sluice.proxy.limit_redis import check_url  # noqa: PLC0415 (imports redis)

    try:
        check_url(value)
    except ValueError as exc:
        raise ValueError(f"not a usable Redis URL: {exc}") from None
    return value


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
        "across replicas and workers, and lets any of them resume a resumable stream "
        "(docs/STREAMS.md); null: one host (the supervisor shares the limits).",
    )
    lease: Duration = Field(
        default=10.0, description="A dead replica's permits return within this time (Redis)."
    )
    store_timeout: Duration = Field(
        default=1.0, description="A Redis call slower than this falls back to the local share."
    )
    keep_idle: DurationOrZero = Field(
        default=0.1,
        le=10.0,
        description="How long a process keeps a permit its request gave back, for its next "
        "request without a round trip to Redis, while nobody waits for one (Redis); 0: give "
        "every permit back at once.",
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
    shared_index: bool = Field(
        default=True,
        description="With limits.store set: share the prefix index with every worker and "
        "replica through Redis (docs/ROUTING.md); false or no store: each process its own.",
    )
    shared_index_timeout: Duration = Field(
        default=0.002,
        gt=0,
        le=1,
        description="A read of the shared index slower than this is dropped and the local "
        "index decides (Redis is then skipped for 1 s).",
    )


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
    idle_timeout: Duration = Field(
        default=DEFAULT_UPSTREAM_IDLE_TIMEOUT,
        description="Pooled connections idle this long are closed, not reused; keep it "
        "below the backend's own keep-alive timeout (vLLM: 5 s).",
    )
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
    policy: Name | None = Field(
        default=None, description="Policy applied; null: none (the Gateway's timeouts apply)."
    )
    request_fields: RequestFields = Field(
        default_factory=dict, description=REQUEST_FIELDS_DESCRIPTION
    )


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
    request_fields: RequestFields = Field(
        default_factory=dict, description=REQUEST_FIELDS_DESCRIPTION
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
        default=443,
        ge=1,
        le=65535,
        description="Port of the TLS server block (HTTP/2 and 1.1); not the same as listen.",
    )


class LimitReqSection(Section):
    rate: Rate = Field(description="Like 20r/s or 600r/m.")
    burst: Int = Field(default=0, ge=0, description="Requests above the rate that may queue.")


class NginxSection(Section):
    server_name: ServerName = Field(description="Public host name.")
    listen: Port = Field(default=8080, ge=1, le=65535, description="Port nginx listens on.")
    replicas: tuple[HostPort, ...] = Field(
        default=(),
        description="sluice replicas as host:port or [IPv6]:port; empty: the Gateway's listen.",
    )
    tls: TlsSection | None = Field(default=None, description="TLS certificate; null: plain HTTP.")
    limit_conn: Int | None = Field(
        default=None,
        ge=1,
        le=65535,  # nginx: "connection limit must be less 65536"
        description="Connections per client address; null: no limit.",
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
    access_log: LogPath = Field(
        default="/var/log/nginx/sluice-access.log",
        description="JSON access log file (relative: to nginx's prefix); /dev/null: none.",
    )


class CloudflareSection(Section):
    worker_name: WorkerName = Field(description="Worker script name.")
    routes: tuple[RoutePattern, ...] = Field(
        min_length=1, description="Route patterns like api.example.com/v1/*."
    )
    origin: Url = Field(description="Origin the Worker forwards to (nginx), no path.")
    allowed_origins: tuple[Origin, ...] = Field(
        default=(),
        description="CORS origins allowed, like https://app.example.com (normalised as browsers "
        "send them: lower case, no default port); empty: no CORS headers.",
    )
    keepalive_interval: KeepaliveInterval = Field(
        default=30.0,
        description="SSE comment sent when a stream is idle this long (< 100s).",
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
    timeouts: TimeoutDefaultsSection = Field(
        default_factory=TimeoutDefaultsSection,
        description="Default deadlines of every route; a Policy's timeouts override them.",
    )
    request_fields: RequestFields = Field(
        default_factory=dict, description=REQUEST_FIELDS_DESCRIPTION
    )
    cache_isolation: CacheIsolationSection = Field(
        default_factory=CacheIsolationSection,
        description="Per-app prefix-cache isolation through vLLM's cache_salt.",
    )
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


def _sampling_fields() -> dict[str, str]:
    """vLLM request field -> the GenerationConfig field a preset governs it by."""
    from .presets import MAPPING  # noqa: PLC0415 (presets is heavier; only checks need it)

    fields = {m.vllm: m.name for m in MAPPING if m.name != "do_sample"}
    fields["max_completion_tokens"] = "max_new_tokens"
    return fields


# Fields the route itself decides (or sluice does): never a request-field rule.
UNGOVERNED_FIELDS = {
    "model": "the route decides the model",
    "messages": "the prompt is the request itself",
    "prompt": "the prompt is the request itself",
    "stream": "streaming is the client's choice",
    "cache_salt": "cache_isolation sets it",
}


def _field_rule_issues(rules: dict[str, FieldRule], base: Path) -> Iterator[DocumentIssue]:
    sampling = _sampling_fields()
    for name, rule in rules.items():
        path = (*base, name)
        if name in sampling:
            yield (
                path,
                f"{name} is a sampling field: govern it in a preset's policy "
                f"(policy.{sampling[name]})",
            )
        elif name in UNGOVERNED_FIELDS:
            yield (path, f"{name} cannot have a request-field rule: {UNGOVERNED_FIELDS[name]}")
        elif rule.mode == "force" and rule.value is None:
            yield (path, "force needs a value (to drop a field, deny it)")


def _timeout_issues(doc: GatewayFile) -> Iterator[DocumentIssue]:
    t = doc.timeouts
    for name in ("first_token", "response_head"):
        value = getattr(t, name)
        if value is not None and t.total is not None and value > t.total:
            yield (("timeouts", name), f"{name} {value:g}s > total {t.total:g}s")
    for name in ("first_token", "inter_token", "total", "response_head"):
        value = getattr(t, name)
        if value is not None and value <= 0:
            yield (("timeouts", name), f"must be > 0 seconds (null turns it off), got {value:g}")


def gateway_issues(doc: GatewayFile) -> list[DocumentIssue]:
    """Rules that relate fields of the Gateway document; each names the path to blame."""
    issues: list[DocumentIssue] = []
    issues += _timeout_issues(doc)
    issues += _field_rule_issues(doc.request_fields, ("request_fields",))
    for i, route in enumerate(doc.routes):
        issues += _field_rule_issues(route.request_fields, ("routes", i, "request_fields"))
    for i, app in enumerate(doc.apps):
        issues += _field_rule_issues(app.request_fields, ("apps", i, "request_fields"))
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
    nginx = doc.edge.nginx
    if nginx is not None and nginx.tls is not None and nginx.tls.port == nginx.listen:
        issues.append(
            (
                ("edge", "nginx", "tls", "port"),
                f"{nginx.listen} is also edge.nginx.listen: the plain-HTTP server (health "
                "checks, the redirect to TLS) and the TLS server need two ports",
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
