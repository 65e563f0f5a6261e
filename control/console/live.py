"""What the live page charts: the last minutes of finished requests, per route.

A completion hook appends one small tuple per finished request to a bounded deque (no
work per token, nothing on the request path but the append: `proxy/finished.py`, compiled
with the data plane); the page's JSON is computed on demand from it. TTFT percentiles
are exact over the window; inter-token latency percentiles come from the per-stream gap
buckets the data plane already keeps, so they are bucket upper bounds, like Prometheus'
`histogram_quantile`. Values are this process's own (with `--workers N`, the worker that
answered); /metrics sums across workers.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, NamedTuple

from sluice.proxy.exchange import ITL_BUCKETS
from sluice.proxy.finished import FinishedLog

WINDOW_S = 300.0
BIN_S = 10.0
MAX_ENTRIES = 50_000


class Finished(NamedTuple):
    at: float  # unix time the request ended
    route: str
    status: int
    ttft: float | None
    gaps: tuple[int, ...] | None  # per-bucket gap counts, None when no gap
    tokens_out: int
    duration: float
    timeout: str | None
    disconnected: bool


def _quantiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    if len(values) == 1:
        v = values[0]
        return {"p50": v, "p90": v, "p99": v}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": q[49], "p90": q[89], "p99": q[98]}


def _bucket_quantile(counts: list[int], fraction: float) -> float | None:
    total = sum(counts)
    if not total:
        return None
    rank = fraction * total
    seen = 0
    for i, n in enumerate(counts):
        seen += n
        if seen >= rank:
            return ITL_BUCKETS[i] if i < len(ITL_BUCKETS) else ITL_BUCKETS[-1]
    return ITL_BUCKETS[-1]


def _sum_buckets(rows: list[Finished]) -> list[int]:
    total = [0] * (len(ITL_BUCKETS) + 1)
    for row in rows:
        if row.gaps is not None:
            for i, n in enumerate(row.gaps):
                total[i] += n
    return total


class LiveSeries:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.record = FinishedLog(max_entries)
        # The completion hook (register this, not a method of this interpreted class).
        self.on_complete = self.record.on_complete

    def summary(self, window: float = WINDOW_S, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        start = now - window
        rows = [Finished._make(r) for r in self.record.rows if r[0] >= start]
        routes: dict[str, list[Finished]] = {}
        for row in rows:
            if row.route:
                routes.setdefault(row.route, []).append(row)
        bins = max(1, int(window // BIN_S))
        out_routes = []
        for name in sorted(routes):
            route_rows = routes[name]
            series = []
            for b in range(bins):
                lo = start + b * BIN_S
                in_bin = [r for r in route_rows if lo <= r.at < lo + BIN_S]
                ttfts = [r.ttft for r in in_bin if r.ttft is not None]
                buckets = _sum_buckets(in_bin)
                series.append(
                    {
                        "t": round(lo + BIN_S, 3),
                        "requests": len(in_bin),
                        "ttft_p50": statistics.median(ttfts) if ttfts else None,
                        "itl_p50": _bucket_quantile(buckets, 0.5),
                        "tokens_per_s": sum(r.tokens_out for r in in_bin) / BIN_S,
                    }
                )
            buckets = _sum_buckets(route_rows)
            out_routes.append(
                {
                    "route": name,
                    "requests": len(route_rows),
                    "errors": sum(1 for r in route_rows if r.status >= 500),
                    "ttft": _quantiles([r.ttft for r in route_rows if r.ttft is not None]),
                    "itl": (
                        None
                        if not sum(buckets)
                        else {
                            "p50": _bucket_quantile(buckets, 0.5),
                            "p90": _bucket_quantile(buckets, 0.9),
                            "p99": _bucket_quantile(buckets, 0.99),
                        }
                    ),
                    "tokens_per_s": sum(r.tokens_out for r in route_rows) / window,
                    "series": series,
                }
            )
        timeouts: dict[str, int] = {}
        for row in rows:
            if row.timeout:
                timeouts[row.timeout] = timeouts.get(row.timeout, 0) + 1
        return {
            "window_s": window,
            "bin_s": BIN_S,
            "now": now,
            "requests": len(rows),
            "timeouts": timeouts,
            "disconnects": sum(1 for r in rows if r.disconnected),
            "routes": out_routes,
        }
