"""The Gateway document -> the snapshot's backends, routes, apps and experiments.

References are resolved to objects here (a route holds its Backend, SamplingPlan and
StreamPolicy), so every unknown name is found before anything is served. A reference to a
document that failed validation is not reported again: its own error is on the list.
Secrets are resolved here and kept only as SHA-256 digests.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sluice.proxy.snapshot import (
    DEFAULT_FIELD_RULES,
    DEFAULT_TIMEOUTS,
    NO_PRESET,
    App,
    Backend,
    Experiment,
    FieldRules,
    HealthCheck,
    QueueLimits,
    Route,
    RoutingPolicy,
    SamplingPlan,
    StickyKind,
    StreamPolicy,
    StreamTimeouts,
    Variant,
)

from .gateway_schema import (
    BackendSection,
    FieldRule,
    GatewayFile,
    QueueSection,
    RoutingSection,
)
from .issues import ConfigIssue
from .loader import Document
from .policies import structured_rule

Path = tuple[str | int, ...]


@dataclass(slots=True)
class GatewayParts:
    backends: dict[str, Backend] = field(default_factory=dict)
    routes: dict[str, Route] = field(default_factory=dict)
    apps: list[App] = field(default_factory=list)
    apps_by_key: dict[bytes, App] = field(default_factory=dict)
    experiments: dict[str, Experiment] = field(default_factory=dict)
    admin_token_hash: bytes | None = None
    origin_secret_hash: bytes | None = None
    app_field_rules: dict[tuple[str, str], FieldRules] = field(default_factory=dict)
    cache_salt_key: bytes | None = None


def layer_field_rules(base: FieldRules, rules: Mapping[str, FieldRule], who: str) -> FieldRules:
    """`rules` on top of `base`: the more specific layer decides each field it names."""
    if not rules:
        return base
    denied: dict[str, str] = dict(base.denied)
    forced: dict[str, Any] = dict(base.forced)
    for name, rule in rules.items():
        denied.pop(name, None)
        forced.pop(name, None)
        if rule.mode == "deny":
            denied[name] = who
        elif rule.mode == "force":
            forced[name] = rule.value
    return FieldRules(MappingProxyType(denied), MappingProxyType(forced))


def hash_secret(secret: str, environ: Mapping[str, str]) -> bytes | None:
    """The SHA-256 digest a secret stands for; None when its variable is unset or empty."""
    if secret.startswith("sha256:"):
        return bytes.fromhex(secret.removeprefix("sha256:"))
    value = environ.get(secret.removeprefix("env:"), "")
    return hashlib.sha256(value.encode()).digest() if value else None


def _queue(section: QueueSection) -> QueueLimits:
    return QueueLimits(max_len=section.max, max_wait=section.max_wait)


def _backend(section: BackendSection, override: str | None) -> Backend:
    health = section.health
    return Backend(
        name=section.name,
        urls=(override,) if override is not None else section.urls,
        max_concurrency=section.max_concurrency,
        queue=_queue(section.queue),
        connect_timeout=section.connect_timeout,
        idle_timeout=section.idle_timeout,
        health=None
        if health is None
        else HealthCheck(path=health.path, interval=health.interval, timeout=health.timeout),
        routing=_routing(section.routing),
    )


def _routing(section: RoutingSection) -> RoutingPolicy:
    return RoutingPolicy(
        strategy=section.strategy,
        block_chars=section.block_chars,
        index_blocks=section.index_blocks,
        prefix_weight=section.prefix_weight,
        load_weight=section.load_weight,
        kv_weight=section.kv_weight,
        session_header=section.session_header,
        session_weight=section.session_weight,
        max_waiting=section.max_waiting,
        max_kv_usage=section.max_kv_usage,
        max_imbalance=section.max_imbalance,
        scrape_interval=section.scrape_interval,
        scrape_path=section.scrape_path,
        shared_index=section.shared_index,
        shared_index_timeout=section.shared_index_timeout,
    )


def _sticky(value: str) -> tuple[StickyKind, str]:
    if value.startswith("header:"):
        return "header", value.removeprefix("header:").lower()
    return ("user", "") if value == "user" else ("app", "")


class _Builder:
    def __init__(
        self,
        doc: Document,
        presets: Mapping[str, SamplingPlan],
        policies: Mapping[str, StreamPolicy],
        broken: Mapping[str, set[str]],
        environ: Mapping[str, str],
        timeouts: StreamTimeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        assert isinstance(doc.model, GatewayFile)
        self.doc = doc
        self.gw: GatewayFile = doc.model
        # A route without a Policy still has deadlines: the Gateway's `timeouts`.
        self.default_policy = StreamPolicy(name="", timeouts=timeouts)
        self.base_fields = layer_field_rules(
            DEFAULT_FIELD_RULES, self.gw.request_fields, "the Gateway's request_fields"
        )
        self.presets = presets
        self.policies = policies
        self.broken = broken
        self.environ = environ
        self.issues: list[ConfigIssue] = []
        self.warnings: list[ConfigIssue] = []

    def error(self, path: Path, message: str) -> None:
        self.issues.append(self.doc.issue(path, message))

    def warn(self, path: Path, message: str) -> None:
        self.warnings.append(self.doc.issue(path, message, severity="warning"))

    def unknown(self, path: Path, what: str, name: str, known: list[str]) -> None:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known) or 'none'}"
        self.error(path, f"unknown {what} {name!r} ({hint})")

    def preset(self, path: Path, name: str) -> SamplingPlan | None:
        if name in self.presets:
            return self.presets[name]
        if name not in self.broken["Preset"]:
            self.unknown(path, "preset", name, sorted(self.presets))
        return None

    def policy(self, path: Path, name: str) -> StreamPolicy | None:
        if name in self.policies:
            return self.policies[name]
        if name not in self.broken["Policy"]:
            self.unknown(path, "policy", name, sorted(self.policies))
        return None

    def secret(self, path: Path, secret: str, unset: str) -> bytes | None:
        digest = hash_secret(secret, self.environ)
        if digest is None:
            self.warn(path, f"{secret} is unset or empty in this environment; {unset}")
        return digest

    def build(self, override: str | None) -> GatewayParts:
        parts = GatewayParts()
        gw = self.gw
        parts.backends = {b.name: _backend(b, override) for b in gw.backends}
        experiments = self.experiments(set(r.model for r in gw.routes))
        used_backends: set[str] = set()
        for i, section in enumerate(gw.routes):
            preset = policy = None
            if section.preset is not None:
                preset = self.preset(("routes", i, "preset"), section.preset)
            if section.policy is not None:
                policy = self.policy(("routes", i, "policy"), section.policy)
            backend = parts.backends.get(section.backend)
            used_backends.add(section.backend)
            if backend is None:
                self.unknown(
                    ("routes", i, "backend"), "backend", section.backend, sorted(parts.backends)
                )
                continue
            parts.routes[section.model] = Route(
                model=section.model,
                backend=backend,
                upstream_model=section.upstream_model,
                preset=preset or NO_PRESET,
                policy=policy or self.default_policy,
                experiment=experiments.get(section.model),
                request_fields=layer_field_rules(
                    self.base_fields, section.request_fields, f"route {section.model!r}"
                ),
            )
        for i, b in enumerate(gw.backends):
            if b.name not in used_backends:
                self.warn(("backends", i, "name"), f"backend {b.name!r} is not used by any route")
        parts.experiments = {e.name: e for e in experiments.values()}
        self.apps(parts)
        self.app_fields(parts)
        isolation = gw.cache_isolation
        if isolation.mode == "per_app" and isolation.secret is not None:
            parts.cache_salt_key = self.secret(
                ("cache_isolation", "secret"),
                isolation.secret,
                f"the generated key in {isolation.secret_file} salts the cache instead",
            )
        admin = gw.admin.token
        if admin is not None:
            parts.admin_token_hash = self.secret(
                ("admin", "token"), admin, "the admin API is disabled"
            )
        origin = gw.edge.origin_secret
        if origin is not None:
            parts.origin_secret_hash = self.secret(
                ("edge", "origin_secret"), origin, "sluice will not require the origin secret"
            )
        self.replica_sharing()
        return parts

    def replica_sharing(self) -> None:
        """Several replicas behind nginx and state that each keeps on its own host. Warnings,
        not errors: a test setup may list several replicas on one host."""
        nginx = self.gw.edge.nginx
        if nginx is None or len(nginx.replicas) < 2:
            return
        path: Path = ("edge", "nginx", "replicas")
        count = f"{len(nginx.replicas)} replicas"
        gw = self.gw
        if gw.limits.store is None:
            self.warn(
                path,
                f"{count} and no limits.store: each replica admits every max_concurrency "
                "on its own (documented as in flight across all replicas); set limits.store "
                "to a Redis URL shared by the replicas",
            )
        isolation = gw.cache_isolation
        if isolation.mode == "per_app" and gw.apps and isolation.secret is None:
            self.warn(
                path,
                f"{count} and no cache_isolation.secret: each replica salts with the key it "
                f"generates into {isolation.secret_file}, so an app's prompts cached through "
                "one replica miss through another; set cache_isolation.secret (env:VAR, the "
                "same on every replica)",
            )
        resumable = self.resumable_policies()
        if resumable and gw.limits.store is None:
            names = ", ".join(resumable)
            self.warn(
                path,
                f"{count} and resume_window in policies {names} without limits.store: a "
                "resume (GET /v1/streams/<id>) reaches the replica that runs the generation "
                "only by chance (404 stream_not_found otherwise); set limits.store to a Redis "
                "URL shared by the replicas (docs/STREAMS.md)",
            )
        if gw.records.path is not None and gw.records.url is None:
            self.warn(
                path,
                f"{count} and records in SQLite (records.path): each replica writes its own "
                "file, so `sluice ab report` covers one replica and /v1/feedback finds only "
                "its requests; set records.url to a PostgreSQL URL (or records.path: null)",
            )

    def resumable_policies(self) -> list[str]:
        """The policies with `resume_window` that a route or an experiment variant uses."""
        used = {r.policy for r in self.gw.routes} | {
            v.policy for e in self.gw.experiments for v in e.variants
        }
        return sorted(
            name
            for name in used
            if name is not None and name in self.policies and self.policies[name].resume_window
        )

    def app_fields(self, parts: GatewayParts) -> None:
        """Each app that sets request_fields: its rules over every route's."""
        routes = list(parts.routes.values())
        for section in self.gw.apps:
            if not section.request_fields:
                continue
            who = f"app {section.name!r}"
            for route in routes:
                parts.app_field_rules[(section.name, route.model)] = layer_field_rules(
                    route.request_fields, section.request_fields, who
                )

    def experiments(self, routes: set[str]) -> dict[str, Experiment]:
        by_route: dict[str, Experiment] = {}
        for i, section in enumerate(self.gw.experiments):
            variants = []
            for j, v in enumerate(section.variants):
                base: Path = ("experiments", i, "variants", j)
                preset = self.preset((*base, "preset"), v.preset)
                policy = self.policy((*base, "policy"), v.policy) if v.policy else None
                if preset is not None:
                    variants.append(Variant(v.name, preset, policy, v.weight))
            if section.route not in routes:
                self.unknown(("experiments", i, "route"), "route", section.route, sorted(routes))
            elif section.route in by_route:
                first = by_route[section.route].name
                self.error(
                    ("experiments", i, "route"),
                    f"route {section.route!r} already has experiment {first!r}; "
                    "a route runs one experiment at a time",
                )
            else:
                kind, name = _sticky(section.sticky)
                by_route[section.route] = Experiment(
                    section.name, section.route, kind, name, tuple(variants)
                )
        return by_route

    def apps(self, parts: GatewayParts) -> None:
        first_key: dict[bytes, tuple[str, Path]] = {}
        for i, section in enumerate(self.gw.apps):
            digests: set[bytes] = set()
            for j, key in enumerate(section.keys):
                path: Path = ("apps", i, "keys", j)
                digest = self.secret(path, key, f"app {section.name!r} cannot use this key")
                if digest is None:
                    continue
                if digest in first_key and first_key[digest][0] != section.name:
                    other = first_key[digest][0]
                    self.error(path, f"the same key is also a key of app {other!r}")
                first_key.setdefault(digest, (section.name, path))
                digests.add(digest)
            if section.keys and not digests:
                self.warn(("apps", i, "keys"), f"app {section.name!r} has no usable key")
            allowed = None
            if section.routes is not None:
                for j, model in enumerate(section.routes):
                    # A route with an unknown backend is not built but is declared.
                    if not any(r.model == model for r in self.gw.routes):
                        self.unknown(("apps", i, "routes", j), "route", model, sorted(parts.routes))
                allowed = frozenset(section.routes)
            default = None
            if section.default_preset is not None:
                default = self.preset(("apps", i, "default_preset"), section.default_preset)
            app = App(
                name=section.name,
                key_hashes=frozenset(digests),
                routes=allowed,
                max_concurrency=section.max_concurrency,
                queue=_queue(section.queue),
                default_preset=default,
                allow_preset_header=section.allow_preset_header,
                structured=structured_rule(section.structured_outputs),
            )
            parts.apps.append(app)
            for digest in digests:
                parts.apps_by_key.setdefault(digest, app)
        if not self.gw.apps:
            self.warn(("apps",), "no apps: the gateway accepts requests without an API key")


def build_gateway(
    doc: Document,
    presets: Mapping[str, SamplingPlan],
    policies: Mapping[str, StreamPolicy],
    broken: Mapping[str, set[str]],
    *,
    backend_override: str | None,
    environ: Mapping[str, str] | None = None,
    timeouts: StreamTimeouts = DEFAULT_TIMEOUTS,
) -> tuple[GatewayParts, list[ConfigIssue], list[ConfigIssue]]:
    """(parts, errors, warnings); the parts are only meaningful when errors is empty.
    `timeouts`: the Gateway's default deadlines, for routes without a Policy."""
    environ = os.environ if environ is None else environ
    builder = _Builder(doc, presets, policies, broken, environ, timeouts)
    parts = builder.build(backend_override)
    return parts, builder.issues, builder.warnings
