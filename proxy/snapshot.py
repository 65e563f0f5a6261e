"""The immutable config the data plane runs on.

The control plane builds a `Snapshot` (everything that can fail happens there) and the data
plane swaps it in with one assignment to `SnapshotRef.current`. A request reads
`ref.current` once and uses that object until it ends, so a stream is never served by half
of one config and half of another. Every type here is frozen and holds no Optionals that a
request would have to resolve: references are already resolved to objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal

from .stopwords import CutPattern, GuardSpec, RepetitionGuard
from .structured import StructuredOutputs
from .upstream_pool import DEFAULT_IDLE_TIMEOUT

DEFAULT_MAX_BODY_BYTES: Final = 4 * 1024 * 1024
DEFAULT_CONNECT_TIMEOUT: Final = 5.0
# Below the idle limits of the usual intermediaries (Cloudflare 100 s, proxies 30-60 s).
DEFAULT_KEEPALIVE_INTERVAL: Final = 15.0
DEFAULT_RESUME_BUFFER: Final = 1024 * 1024
# Below vLLM's own keep-alive idle timeout (uvicorn's 5 s): see proxy/upstream_pool.py.
DEFAULT_UPSTREAM_IDLE_TIMEOUT: Final = DEFAULT_IDLE_TIMEOUT

EMPTY_MAPPING: Final[Mapping[str, Any]] = MappingProxyType({})


def _empty_mapping() -> Mapping[Any, Any]:
    return EMPTY_MAPPING


@dataclass(frozen=True, slots=True)
class StreamTimeouts:
    """Per-route deadlines in seconds; None disables one.

    first_token: request start -> first content token. inter_token: between content tokens
    (keep-alives, role-only and empty deltas do not reset it). total: request start -> end.
    response_head: request start -> the backend's response head, for streams (a
    non-stream response's head comes with its whole body: `total` bounds it).
    """

    first_token: float | None = None
    inter_token: float | None = None
    total: float | None = None
    response_head: float | None = None

    def __post_init__(self) -> None:
        for name in ("first_token", "inter_token", "total", "response_head"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} timeout must be > 0 seconds, got {value}")
        if (
            self.total is not None
            and self.first_token is not None
            and self.first_token > self.total
        ):
            raise ValueError(
                f"first_token timeout {self.first_token}s exceeds total timeout {self.total}s"
            )


NO_TIMEOUTS: Final = StreamTimeouts()
# Every route's deadlines unless the Gateway's `timeouts` or the route's Policy say
# otherwise (pass-through `--backend` mode included): generous enough for a long prefill
# under load, short enough that a hung backend or a stalled stream gives its permit and
# its GPU slot back.
DEFAULT_FIRST_TOKEN_TIMEOUT: Final = 120.0
DEFAULT_INTER_TOKEN_TIMEOUT: Final = 30.0
DEFAULT_TOTAL_TIMEOUT: Final = 600.0
DEFAULT_RESPONSE_HEAD_TIMEOUT: Final = 60.0
DEFAULT_TIMEOUTS: Final = StreamTimeouts(
    first_token=DEFAULT_FIRST_TOKEN_TIMEOUT,
    inter_token=DEFAULT_INTER_TOKEN_TIMEOUT,
    total=DEFAULT_TOTAL_TIMEOUT,
    response_head=DEFAULT_RESPONSE_HEAD_TIMEOUT,
)


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    """A resolved `kind: Policy`: what the stream guard enforces and the stream deadlines."""

    name: str
    stop: tuple[str, ...] = ()
    cut_patterns: tuple[CutPattern, ...] = ()
    repetition_guard: RepetitionGuard | None = None
    timeouts: StreamTimeouts = DEFAULT_TIMEOUTS
    # Compiled from stop, cut_patterns and repetition_guard by the control plane (where a
    # bad pattern is a config error with file:line); None when the policy guards no text.
    guard: GuardSpec | None = None
    # Streams (seconds / bytes; see proxy/keepalive.py and proxy/resume.py). None: off.
    keepalive_interval: float | None = DEFAULT_KEEPALIVE_INTERVAL
    resume_window: float | None = None
    resume_buffer: int = DEFAULT_RESUME_BUFFER
    # Whether requests may / must constrain their output (JSON schema, regex, grammar).
    structured: StructuredOutputs | None = None


NO_POLICY: Final = StreamPolicy(name="")


# Fields of a vLLM request that a client must not set unless a route or app allows them:
# `priority` jumps the backend's queue (with --scheduling-policy priority), `chat_template`
# is a template the backend executes, `kv_transfer_params` steers disaggregated prefill's KV
# transfers, `vllm_xargs` reaches custom logits processors and plugins, `background` (the
# Responses API, with vLLM's response store on) goes on generating after the request has
# ended: past the app's limits, the deadlines and a disconnect's abort.
DEFAULT_DENIED_FIELDS: Final = (
    "priority",
    "chat_template",
    "kv_transfer_params",
    "vllm_xargs",
    "background",
)
DEFAULT_DENIER: Final = "sluice's default request-field policy (allow it with request_fields)"
DEFAULT_DENIED: Final[Mapping[str, str]] = MappingProxyType(
    dict.fromkeys(DEFAULT_DENIED_FIELDS, DEFAULT_DENIER)
)


@dataclass(frozen=True, slots=True)
class FieldRules:
    """The request-field policy of a route (and app): fields a request may not change
    (field -> who denies it, for the message) and fields whose value is replaced."""

    denied: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType(
            dict.fromkeys(DEFAULT_DENIED_FIELDS, DEFAULT_DENIER)
        )
    )
    forced: Mapping[str, Any] = field(default_factory=_empty_mapping)
    # The same as tuples, for the per-request check: compiled, a tuple is walked directly;
    # a read-only mapping's items() is a method call and an iterator per request.
    denied_items: tuple[tuple[str, str], ...] = field(init=False, default=())
    forced_items: tuple[tuple[str, Any], ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "denied_items", tuple(self.denied.items()))
        object.__setattr__(self, "forced_items", tuple(self.forced.items()))


DEFAULT_FIELD_RULES: Final = FieldRules()


# `int | float`, not `float`: an integer field's bounds stay integers in the request sent
# (compiled code would store a value typed `float` as a float, 3 becoming 3.0).
ClampBounds = tuple[int | float | None, int | float | None]


@dataclass(frozen=True, slots=True)
class SamplingPlan:
    """A resolved preset (after `extends`) in vLLM request vocabulary.

    Field names are those of vLLM's OpenAI-compatible request body (`max_tokens`, not
    `max_new_tokens`): the GenerationConfig mapping ran when the snapshot was built.
    Merge order: defaults <- request <- forced; then clamps; a request that sets a denied
    field is rejected with 400.
    """

    name: str
    defaults: Mapping[str, Any] = field(default_factory=_empty_mapping)
    forced: Mapping[str, Any] = field(default_factory=_empty_mapping)
    clamps: Mapping[str, ClampBounds] = field(default_factory=_empty_mapping)
    denied: frozenset[str] = frozenset()


NO_PRESET: Final = SamplingPlan(name="")


@dataclass(frozen=True, slots=True)
class QueueLimits:
    """A semaphore's bounded FIFO wait queue: length and the longest wait in seconds."""

    max_len: int = 1024
    max_wait: float = 10.0

    def wait_ends(self, now: float, deadline: float | None) -> float:
        """When a wait that starts `now` ends (monotonic clock): after `max_wait`, or at the
        request's own `deadline` when that comes first (never before `now`)."""
        end = now + self.max_wait
        if deadline is not None and deadline < end:
            end = max(now, deadline)
        return end


@dataclass(frozen=True, slots=True)
class HealthCheck:
    path: str = "/health"
    interval: float = 5.0
    timeout: float = 2.0


RoutingStrategy = Literal["score", "least_outstanding"]


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    """How a request picks one of a backend's replicas (see proxy/affinity.py).

    `score`: prefix affinity + session affinity + load, each a weighted scorer; a replica
    over `max_waiting`, `max_kv_usage` or `max_imbalance` loses its affinity bonuses.
    `least_outstanding`: the replica with the fewest requests in flight from this process.
    """

    strategy: RoutingStrategy = "score"
    block_chars: int = 256  # prompt characters per hashed block (about 64 tokens)
    index_blocks: int = 16384  # blocks remembered per replica (LRU): ~1M tokens, ~2 MB
    prefix_weight: float = 3.0
    load_weight: float = 2.0
    kv_weight: float = 1.0
    session_header: str | None = None  # lower case
    session_weight: float = 10.0
    max_waiting: int = 8
    max_kv_usage: float = 0.95
    max_imbalance: int = 16
    scrape_interval: float | None = 0.5  # GET /metrics every this many seconds; None: off
    scrape_path: str = "/metrics"
    shared_index: bool = True  # share the prefix index through limits.store (Redis) if set
    shared_index_timeout: float = 0.002  # a slower read of the shared index: local only


DEFAULT_ROUTING: Final = RoutingPolicy()


@dataclass(frozen=True, slots=True)
class Backend:
    """An upstream pool: one or more replicas of an OpenAI-compatible server."""

    name: str
    urls: tuple[str, ...]
    max_concurrency: int = 256
    queue: QueueLimits = field(default_factory=QueueLimits)
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    health: HealthCheck | None = None
    routing: RoutingPolicy = DEFAULT_ROUTING
    # Pooled connections idle this long are not reused (keep it below the backend's own).
    idle_timeout: float = DEFAULT_UPSTREAM_IDLE_TIMEOUT


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    preset: SamplingPlan
    policy: StreamPolicy | None
    weight: int


StickyKind = Literal["header", "user", "app"]


@dataclass(frozen=True, slots=True)
class Experiment:
    name: str
    route: str
    sticky_kind: StickyKind
    sticky_name: str  # header name (lower case) when sticky_kind == "header"
    variants: tuple[Variant, ...]


@dataclass(frozen=True, slots=True)
class Route:
    """Public model name -> backend, upstream model, preset and policy.

    upstream_model None means "send the request's model unchanged" (pass-through routes).
    """

    model: str
    backend: Backend
    upstream_model: str | None
    preset: SamplingPlan = NO_PRESET
    policy: StreamPolicy = NO_POLICY
    experiment: Experiment | None = None
    request_fields: FieldRules = DEFAULT_FIELD_RULES


@dataclass(frozen=True, slots=True)
class App:
    name: str
    key_hashes: frozenset[bytes]  # sha256 digests of the app's API keys
    routes: frozenset[str] | None  # None: every route
    max_concurrency: int | None = None
    queue: QueueLimits = field(default_factory=QueueLimits)
    default_preset: SamplingPlan | None = None
    allow_preset_header: bool = False
    structured: StructuredOutputs | None = None  # on top of the route policy's rule


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One complete, validated config. Built by `sluice.control`, read by the data plane."""

    version: str
    routes: Mapping[str, Route]
    backends: Mapping[str, Backend]
    presets: Mapping[str, SamplingPlan] = field(default_factory=_empty_mapping)
    policies: Mapping[str, StreamPolicy] = field(default_factory=_empty_mapping)
    apps: tuple[App, ...] = ()
    # sha256 digest -> app. With no apps declared the gateway is open.
    apps_by_key: Mapping[bytes, App] = field(default_factory=_empty_mapping)
    experiments: Mapping[str, Experiment] = field(default_factory=_empty_mapping)
    # Route used for a model name that matches no route (pass-through mode); None -> 404.
    fallback_route: Route | None = None
    listen_host: str = "127.0.0.1"
    listen_port: int = 8000
    admin_token_hash: bytes | None = None
    origin_secret_hash: bytes | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Multipart uploads to forwarded routes (audio) are streamed, not buffered: their limit.
    max_upload_bytes: int = 100 * 1024 * 1024
    # Pass-through mode (no routes, a fallback route): relay paths sluice does not know.
    forward_unknown_paths: bool = True
    source: str = ""  # where it came from, for /admin/config ("presets/", "--backend URL")
    # (app, route model) -> the route's request-field rules with the app's on top; only
    # for apps that set their own.
    app_field_rules: Mapping[tuple[str, str], FieldRules] = field(default_factory=_empty_mapping)
    # Per-app cache_salt (prefix-cache isolation) with apps declared; the key of its HMAC
    # (None: the process's generated key, see ProxyApp.salt_key).
    cache_isolation: bool = True
    cache_salt_key: bytes | None = None

    @property
    def requires_auth(self) -> bool:
        # Declared apps mean keys are required, even when none of their keys resolved
        # (an unset env variable must close the gateway, not open it).
        return bool(self.apps)


class SnapshotRef:
    """Holds the current snapshot. Swapping is one reference assignment."""

    __slots__ = ("current",)

    def __init__(self, snapshot: Snapshot) -> None:
        self.current = snapshot


__all__ = [
    "App",
    "Backend",
    "CutPattern",
    "Experiment",
    "FieldRules",
    "GuardSpec",
    "HealthCheck",
    "QueueLimits",
    "RepetitionGuard",
    "Route",
    "RoutingPolicy",
    "SamplingPlan",
    "Snapshot",
    "SnapshotRef",
    "StreamPolicy",
    "StreamTimeouts",
    "Variant",
]
