"""Prometheus metrics of the data plane.

Everything per token is aggregated in the `Exchange` and observed here once per request,
so a stream of 1,000 tokens costs the same handful of metric updates as one of 10.
With several workers, prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR,
set by the supervisor before any worker imports this module) sums them at scrape time.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from .exchange import Exchange

# LLM streams span milliseconds (TTFT of a warm GPU) to minutes (long generations).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "sluice_requests",
            "Completion requests by outcome",
            ["app", "route", "preset", "variant", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "sluice_ttft_seconds",
            "Request start to first content token sent",
            ["route", "variant"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "sluice_inter_token_seconds",
            "Mean gap between content tokens, one observation per stream",
            ["route", "variant"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.inter_token_max = Histogram(
            "sluice_inter_token_max_seconds",
            "Longest gap between content tokens, one observation per stream",
            ["route", "variant"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "sluice_stream_duration_seconds",
            "Request start to end of response",
            ["route", "variant"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "sluice_tokens", "Tokens by direction (from usage when sent)", ["direction"], registry=r
        )
        self.queue_wait = Histogram(
            "sluice_queue_wait_seconds",
            "Time spent waiting for concurrency permits",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.timeouts = Counter("sluice_timeouts", "Stream timeouts by kind", ["kind"], registry=r)
        self.cuts = Counter(
            "sluice_stream_cuts", "Streams ended by the guard", ["reason"], registry=r
        )
        self.disconnects = Counter(
            "sluice_client_disconnects", "Clients that went away mid-request", registry=r
        )
        self.upstream_errors = Counter(
            "sluice_upstream_errors", "Backend failures", ["backend", "kind"], registry=r
        )
        self.active_streams = Gauge(
            "sluice_active_streams",
            "Streams being relayed",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_depth = Gauge(
            "sluice_queue_depth",
            "Requests waiting for a permit",
            ["limiter"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.config_info = Gauge(
            "sluice_config_info",
            "The config version being served (value 1)",
            ["version"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.config_reloads = Counter(
            "sluice_config_reload", "Config reloads by result", ["result"], registry=r
        )

    def observe(self, ex: Exchange) -> None:
        status = str(ex.status or 0)
        self.requests.labels(ex.app, ex.route, ex.preset, ex.variant, status).inc()
        if ex.client_disconnected:
            self.disconnects.inc()
        if ex.timeout is not None:
            self.timeouts.labels(ex.timeout).inc()
        if ex.cut is not None:
            reason = "content_filter" if ex.finish_reason == "content_filter" else "stop"
            if ex.cut.startswith("repetition"):
                reason = "repetition"
            self.cuts.labels(reason).inc()
        if ex.upstream_error is not None:
            self.upstream_errors.labels(ex.backend, ex.upstream_error).inc()
        if ex.queue_wait:
            self.queue_wait.observe(ex.queue_wait)
        if not ex.route:
            return
        ttft = ex.ttft
        if ttft is not None:
            self.ttft.labels(ex.route, ex.variant).observe(ttft)
        if ex.gap_count:
            self.inter_token.labels(ex.route, ex.variant).observe(ex.gap_sum / ex.gap_count)
            self.inter_token_max.labels(ex.route, ex.variant).observe(ex.gap_max)
        self.duration.labels(ex.route, ex.variant).observe(ex.duration)
        if ex.prompt_tokens:
            self.tokens.labels("in").inc(ex.prompt_tokens)
        out = ex.output_tokens
        if out:
            self.tokens.labels("out").inc(out)

    def render(self) -> bytes:
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
