"""Resolving a request to route, preset, policy and experiment variant.

Preset precedence: an `x-sluice-preset` header (only for apps allowed to pick), then the
experiment's variant, then the route's preset, then the app's default preset.
Experiment assignment is sticky: a hash of (experiment, key) picks a bucket out of 10,000,
and variants own consecutive bucket ranges in their configured order. Changing weights
moves only the buckets whose owner changed (50/50 -> 60/40 moves 10% of keys).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Final

from .errors import ApiError, not_found
from .http import Header, Request
from .snapshot import (
    NO_PRESET,
    App,
    Experiment,
    Route,
    SamplingPlan,
    Snapshot,
    StreamPolicy,
    Variant,
)

BUCKETS: Final = 10_000
PRESET_HEADER: Final = b"x-sluice-preset"
# A stored Responses-API response's own paths (GET, cancel): their request has no body
# to name a model in. Here, not in `endpoints`, which imports this module.
STORED_RESPONSE_PREFIX: Final = "/v1/responses/"


class RouteChoice:
    """Where one request goes and with what: its route, preset and policy, the experiment
    variant it got, and the response headers that say so.

    A plain class, not a dataclass: compiled, a dataclass's `__init__` is the one the
    dataclasses module generates, interpreted, once per request."""

    __slots__ = ("experiment", "headers", "plan", "policy", "route", "variant")

    def __init__(self, route: Route, plan: SamplingPlan, policy: StreamPolicy) -> None:
        self.route = route
        self.plan = plan
        self.policy = policy
        self.experiment = ""
        self.variant = ""
        self.headers: list[Header] = []


def bucket_of(experiment: str, key: str) -> int:
    digest = hashlib.blake2b(f"{experiment}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def assign_variant(experiment: Experiment, key: str | None) -> Variant:
    """Sticky when a key is given; uniformly random (by weight) when it is absent."""
    bucket = bucket_of(experiment.name, key) if key else random.randrange(BUCKETS)
    total = sum(v.weight for v in experiment.variants)
    edge = 0
    for variant in experiment.variants:
        edge += variant.weight
        if bucket * total < edge * BUCKETS:
            return variant
    return experiment.variants[-1]


def _sticky_key(
    experiment: Experiment, body: dict[str, Any], app: App | None, request: Request
) -> str | None:
    if experiment.sticky_kind == "header":
        return request.header(experiment.sticky_name.encode())
    if experiment.sticky_kind == "user":
        user = body.get("user")
        return user if isinstance(user, str) and user else None
    return app.name if app is not None else None


def _routes_for(snap: Snapshot, app: App | None) -> list[str]:
    return [m for m in snap.routes if app is None or app.routes is None or m in app.routes]


def choose_route(
    snap: Snapshot, body: dict[str, Any], app: App | None, request: Request
) -> RouteChoice:
    model = body.get("model")
    route: Route | None = None
    if isinstance(model, str):
        route = snap.routes.get(model)
    if route is None:
        route = snap.fallback_route
    if route is None:
        allowed = _routes_for(snap, app)
        if not isinstance(model, str) or not model:
            where = ""
            if request.path.startswith(STORED_RESPONSE_PREFIX):
                where = " (a stored response's: in the query, ?model=NAME)"
            raise ApiError(
                400,
                f"'model' is required{where}; available models: {', '.join(allowed) or 'none'}",
                param="model",
                code="missing_model",
            )
        raise not_found(
            f"the model '{model}' does not exist; available models: {', '.join(allowed) or 'none'}",
            code="model_not_found",
            param="model",
        )
    if app is not None and app.routes is not None and route.model not in app.routes:
        raise ApiError(
            403,
            f"app '{app.name}' may not use model '{route.model}'",
            type="permission_error",
            code="route_not_allowed",
            param="model",
        )
    plan = route.preset
    policy = route.policy
    choice = RouteChoice(route, plan, policy)
    wanted = request.headers.get(PRESET_HEADER)
    if wanted is not None:
        name = wanted.decode("latin-1")
        if app is None or not app.allow_preset_header:
            raise ApiError(
                403,
                "this app may not choose a preset with x-sluice-preset",
                type="permission_error",
                code="preset_header_not_allowed",
            )
        chosen = snap.presets.get(name)
        if chosen is None:
            raise ApiError(
                400,
                f"unknown preset '{name}' in x-sluice-preset; known: {', '.join(snap.presets)}",
                code="unknown_preset",
            )
        choice.plan = chosen
    elif route.experiment is not None:
        experiment = route.experiment
        variant = assign_variant(experiment, _sticky_key(experiment, body, app, request))
        choice.plan = variant.preset
        if variant.policy is not None:
            choice.policy = variant.policy
        choice.experiment = experiment.name
        choice.variant = variant.name
        choice.headers.append((b"x-sluice-variant", variant.name.encode()))
    elif plan is NO_PRESET and app is not None and app.default_preset is not None:
        choice.plan = app.default_preset
    if choice.plan.name:
        choice.headers.append((b"x-sluice-preset", choice.plan.name.encode()))
    return choice
