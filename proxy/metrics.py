"""Prometheus metrics of the data plane.

Per-token work happens in the `Exchange` (counts, sums and a count per inter-token bucket);
`Metrics.observe` counts one finished exchange once per request, so a stream of 1,000
tokens costs the same handful of updates as one of 10. Those updates are plain Python
(a bisect and an addition per histogram, 1.5 us a request against prometheus-client's
9 us); `flush` adds them to prometheus-client's values whenever the metrics are read (a
scrape, `app_usage`, the registry) and once a second, so every read sees every finished
request of the answering process, and other workers' at most a second late. Gauges
(active streams, queue depths, the config version) are set from the app's state by
`set_gauges`, which the `Observer` calls on every scrape and once a second.

With several workers, prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set
by the supervisor before a worker starts) keeps every value in a file per process and sums
them at scrape time; the gauges are `live*` modes, so a dead worker's values drop out once
the supervisor calls `mark_process_dead`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric

from .exchange import ITL_BUCKETS, Exchange

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

# LLM streams span milliseconds (a warm GPU's first token) to minutes (long generations).
TTFT_BUCKETS: Final[tuple[float, ...]] = (
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0,
)  # fmt: skip
DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0,
    60.0, 90.0, 120.0, 180.0, 300.0, 600.0,
)  # fmt: skip
QUEUE_BUCKETS: Final[tuple[float, ...]] = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# Sluice's own time on a chunk: tens of microseconds, unless the event loop is saturated.
OVERHEAD_BUCKETS: Final[tuple[float, ...]] = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25,
)  # fmt: skip

# Limiter rejections: the request waited (or could not queue) but never got a permit.
_REJECTED: Final = frozenset({"queue_full", "queue_timeout"})
_SHUTDOWN: Final = "shutdown"  # ex.error_code of a stream ended by the drain deadline


@dataclass(slots=True)
class AppUsage:
    """One app's totals since start (across workers in multiprocess mode)."""

    requests: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    tokens_in: int = 0
    tokens_out: int = 0


def bucket_of(bounds: tuple[float, ...], value: float) -> int:
    """`bisect_left(bounds, value)`, compiled: floats compared unboxed, not through
    bisect's generic comparisons (~0.2 against ~0.05 us for 20 bounds)."""
    lo = 0
    hi = len(bounds)
    while lo < hi:
        mid = (lo + hi) // 2
        if bounds[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


class _Pending:
    """Observations of one histogram child since the last flush: a count per bucket (le
    semantics, the last is +Inf) and their sum. `observe` is a bisect and two additions;
    prometheus-client's own walks its bounds in Python under a lock."""

    __slots__ = ("bounds", "child", "counts", "total")

    def __init__(self, child: Histogram, bounds: tuple[float, ...]) -> None:
        self.child = child
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bucket_of(self.bounds, value)] += 1
        self.total += value

    def add(self, counts: list[int], total: float) -> None:
        mine = self.counts
        for i, n in enumerate(counts):
            if n:
                mine[i] += n
        self.total += total

    def flush(self) -> None:
        counts = self.counts
        if any(counts):
            _fold(self.child, counts, self.total)
            self.counts = [0] * len(counts)
            self.total = 0.0


class _RequestSeries:
    """One (app, route, preset, variant, status): its requests since the last flush, and
    the histograms and token counts its requests add to, shared with the other keys of
    their route and variant (`route`; None before routing) and of their app and route
    (`tokens`: [in, out] since the flush). Found with one lookup a request, where three
    tuples and three lookups found the same parts (~1,300 instructions)."""

    __slots__ = ("requests", "route", "tokens")

    def __init__(self, route: _RouteSeries | None, tokens: list[int]) -> None:
        self.requests = 0
        self.route = route
        self.tokens = tokens


class _RouteSeries:
    """The per-(route, variant) histograms, looked up once and cached."""

    __slots__ = ("duration", "itl", "overhead", "ttft")

    def __init__(self, m: Metrics, route: str, variant: str) -> None:
        self.ttft = _Pending(m.ttft.labels(route, variant), TTFT_BUCKETS)
        self.itl = _Pending(m.inter_token.labels(route, variant), ITL_BUCKETS)
        self.duration = _Pending(m.duration.labels(route, variant), DURATION_BUCKETS)
        self.overhead = _Pending(m.overhead.labels(route, variant), OVERHEAD_BUCKETS)

    def flush(self) -> None:
        self.ttft.flush()
        self.itl.flush()
        self.duration.flush()
        self.overhead.flush()


class _FlushFirst:
    """Registered first in the registry: whoever collects it (a scrape, a test reading
    the registry) gets the pending observations folded in before the metrics are read."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        self._metrics.flush()
        return []


class _WorkerFiles:
    """Every worker's values, read from the multiprocess directory's files.

    prometheus-client creates a process's file empty and only then sizes it (`MmapedDict`:
    open, then truncate), and its own collector fails in `struct.unpack_from` on a file
    read in between. A worker that starts, or is restarted, while another answers a
    scrape or /admin/status opens that window; an empty file holds no values yet, so it
    is left out rather than answering 500.
    """

    def __init__(self, directory: str) -> None:
        self._directory = directory

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        files = []
        for entry in os.scandir(self._directory):
            if not entry.name.endswith(".db"):
                continue
            try:
                if entry.stat().st_size:
                    files.append(entry.path)
            except FileNotFoundError:
                continue  # a dead worker's live gauges, removed since the listing
        merged: Iterable[Metric] = multiprocess.MultiProcessCollector.merge(  # type: ignore[no-untyped-call]
            files, accumulate=True
        )
        return merged


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        r.register(_FlushFirst(self))
        self.requests = Counter(
            "sluice_requests",
            "Completion requests by outcome (status 499: the client went away)",
            ["app", "route", "preset", "variant", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "sluice_ttft_seconds",
            "Request received to first content token relayed",
            ["route", "variant"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "sluice_inter_token_seconds",
            "Gaps between content chunks of a stream, every gap (folded in at stream end)",
            ["route", "variant"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "sluice_stream_duration_seconds",
            "Request received to end of response",
            ["route", "variant"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "sluice_proxy_overhead_seconds",
            "Upstream chunk carrying a stream's first token received -> written to the "
            "client, one observation per stream",
            ["route", "variant"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "sluice_tokens",
            "Tokens by direction (in: prompt, from usage; out: usage, else content chunks)",
            ["app", "route", "direction"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "sluice_queue_wait_seconds",
            "Time spent waiting for concurrency permits (app, then backend)",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.timeouts = Counter("sluice_timeouts", "Stream timeouts by kind", ["kind"], registry=r)
        self.cuts = Counter(
            "sluice_stream_cuts",
            "Streams ended by sluice: stop, content_filter, repetition (the guard), shutdown",
            ["reason"],
            registry=r,
        )
        self.disconnects = Counter(
            "sluice_client_disconnects", "Clients that went away mid-request", registry=r
        )
        self.upstream_errors = Counter(
            "sluice_upstream_errors", "Backend failures by kind", ["backend", "kind"], registry=r
        )
        self.upstream_retries = Counter(
            "sluice_upstream_retries",
            "Requests resent once on a fresh connection after a reused keep-alive connection "
            "closed before any response byte",
            ["backend"],
            registry=r,
        )
        self.active_streams = Gauge(
            "sluice_active_streams",
            "Streams being relayed",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_depth = Gauge(
            "sluice_queue_depth",
            "Requests waiting for a permit, per limiter (app:NAME, backend:NAME)",
            ["limiter"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.config_info = Gauge(
            "sluice_config_info",
            "1 for the config version being served (by any worker)",
            ["version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.config_reloads = Counter(
            "sluice_config_reload", "Config reloads by result", ["result"], registry=r
        )
        self.config_last_reload_ok = Gauge(
            "sluice_config_last_reload_success",
            "0 while the last reload failed (the previous config keeps serving; every worker)",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.config_last_reload_ok.set(1)
        self.limit_store_up = Gauge(
            "sluice_limit_store_up",
            "1 while limits are global through the shared store (store: supervisor | redis); "
            "0 while this process falls back to its share of each limit (any worker)",
            ["store"],
            registry=r,
            multiprocess_mode="livemin",
        )
        # Once per request the counts below go up in plain Python; `flush` adds them to
        # the prometheus-client values (every read of the metrics, and once a second).
        self._requests: dict[tuple[str, str, str, str, int], _RequestSeries] = {}
        self._routes: dict[tuple[str, str], _RouteSeries] = {}
        self._tokens: dict[tuple[str, str], list[int]] = {}  # [in, out] since the flush
        self._queue_wait = _Pending(self.queue_wait, QUEUE_BUCKETS)
        self._config_version = ""
        self._queue_names: set[str] = set()  # the limiters set_gauges saw last

    # -- once per request ----------------------------------------------------------------

    def observe(self, ex: Exchange) -> None:
        key = (ex.app, ex.route, ex.preset, ex.variant, ex.status)
        series = self._requests.get(key)
        if series is None:
            series = self._requests[key] = self._new_series(ex)
        series.requests += 1
        if ex.client_disconnected:
            self.disconnects.inc()
        if ex.timeout is not None:
            self.timeouts.labels(ex.timeout).inc()
        if ex.cut is not None:
            self.cuts.labels(_cut_reason(ex)).inc()
        elif ex.error_code == _SHUTDOWN:
            self.cuts.labels(_SHUTDOWN).inc()
        if ex.upstream_error is not None:
            self.upstream_errors.labels(ex.backend, ex.upstream_error).inc()
        if ex.upstream_retries:
            self.upstream_retries.labels(ex.backend).inc(ex.upstream_retries)
        route = series.route
        if route is None:
            return  # rejected before routing: no latency to speak of
        if ex.error_code not in _REJECTED:
            self._queue_wait.observe(ex.queue_wait)
        first = ex.first_token_at
        if first is not None:
            route.ttft.observe(first - ex.started_at)
        if ex.gap_count:
            route.itl.add(ex.gap_buckets, ex.gap_sum)
        if ex.first_token_overhead is not None:
            route.overhead.observe(ex.first_token_overhead)
        route.duration.observe(ex.ended_at - ex.started_at)
        tokens_in, tokens_out = ex.prompt_tokens, ex.output_tokens
        if tokens_in or tokens_out:
            pair = series.tokens
            if not pair:  # both series exist from the first request with tokens on
                self.tokens.labels(ex.app, ex.route, "in")
                self.tokens.labels(ex.app, ex.route, "out")
                pair.extend((0, 0))
            if tokens_in:
                pair[0] += tokens_in
            pair[1] += tokens_out

    def _new_series(self, ex: Exchange) -> _RequestSeries:
        if not ex.route:
            return _RequestSeries(None, [])
        route = self._routes.get((ex.route, ex.variant))
        if route is None:
            route = self._routes[(ex.route, ex.variant)] = _RouteSeries(self, ex.route, ex.variant)
        tokens = self._tokens.get((ex.app, ex.route))
        if tokens is None:
            tokens = self._tokens[(ex.app, ex.route)] = []  # [in, out] from the first tokens
        return _RequestSeries(route, tokens)

    def flush(self) -> None:
        """Adds what `observe` counted since the last flush to the exported values."""
        for (app, route, preset, variant, status), series in self._requests.items():
            if series.requests:
                self.requests.labels(app, route, preset, variant, str(status)).inc(series.requests)
                series.requests = 0
        self._queue_wait.flush()
        for histograms in self._routes.values():
            histograms.flush()
        for (app, route), pair in self._tokens.items():
            if not pair:
                continue  # no request with tokens yet
            if pair[0]:
                self.tokens.labels(app, route, "in").inc(pair[0])
            if pair[1]:
                self.tokens.labels(app, route, "out").inc(pair[1])
            pair[0] = pair[1] = 0

    # -- state, sampled ------------------------------------------------------------------

    def set_gauges(self, active_streams: int, queues: Mapping[str, int], version: str) -> None:
        self.flush()  # once a second and on every scrape: the counts a worker holds too
        self.active_streams.set(active_streams)
        for name, depth in queues.items():
            self.queue_depth.labels(name).set(depth)
        # A limiter a reload removed (an app, a backend) has no queue: its series goes.
        for name in self._queue_names.difference(queues):
            self.queue_depth.labels(name).set(0)
            if not self.multiprocess:  # files keep the 0 there; removal is unsupported
                self.queue_depth.remove(name)
        self._queue_names = set(queues)
        if version != self._config_version:
            if self._config_version:
                self.config_info.labels(self._config_version).set(0)
                if not self.multiprocess:  # files keep the 0 there; removal is unsupported
                    self.config_info.remove(self._config_version)
            self.config_info.labels(version).set(1)
            self._config_version = version

    def record_reload(self, result: str) -> None:
        """A reload's outcome: "ok", "unchanged" or "error" (called from any thread)."""
        self.config_reloads.labels(result).inc()
        self.config_last_reload_ok.set(0 if result == "error" else 1)

    # -- reading -------------------------------------------------------------------------

    def render(self) -> bytes:
        self.flush()
        if self.multiprocess:
            registry = CollectorRegistry()
            registry.register(_WorkerFiles(os.environ[MULTIPROC_ENV]))
            return generate_latest(registry)
        return generate_latest(self.registry)

    def _families(self) -> Iterable[Metric]:
        self.flush()
        if self.multiprocess:
            return _WorkerFiles(os.environ[MULTIPROC_ENV]).collect()
        return [*self.requests.collect(), *self.tokens.collect()]

    def app_usage(self) -> dict[str, AppUsage]:
        """Requests by status and tokens per app, from the same values /metrics shows."""
        usage: dict[str, AppUsage] = {}
        for family in self._families():
            if family.name not in ("sluice_requests", "sluice_tokens"):
                continue
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue  # _created
                n = int(sample.value)
                app = usage.setdefault(sample.labels["app"], AppUsage())
                if family.name == "sluice_requests":
                    app.requests += n
                    status = sample.labels["status"]
                    app.by_status[status] = app.by_status.get(status, 0) + n
                elif sample.labels["direction"] == "in":
                    app.tokens_in += n
                else:
                    app.tokens_out += n
        return usage


def _fold(child: Histogram, counts: list[int], total: float) -> None:
    """Adds a stream's pre-bucketed observations to a histogram child.

    prometheus-client has no "observe these n values" call; its per-bucket values and sum
    are what `observe` itself increments (tests/ops check the result equals observe's).
    """
    buckets = child._buckets
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)
    child._sum.inc(total)


def _cut_reason(ex: Exchange) -> str:
    cut = ex.cut or ""
    if cut.startswith("repetition:"):
        return "repetition"
    return "content_filter" if ex.finish_reason == "content_filter" else "stop"
