"""The record of one request, filled in along the hot path and read once at its end.

Metrics, the access log line and the experiment records all read this object after the
response is complete, so the per-token work is a few attribute updates and no callback.
Inter-token gaps are aggregated here (count, sum, max, and a count per histogram bucket)
and folded into the histogram once per stream, without a lock or an object per token.
"""

from __future__ import annotations

from typing import Any, Final

from .clock import wall

# The largest token count recorded from a backend's usage (int64's largest).
MAX_COUNT: Final = 2**63 - 1
# Upper bounds of the inter-token latency histogram (seconds; +Inf follows): a gap between
# content chunks, from merged chunks (~0) and a healthy GPU (10-50 ms) to stalls. Typed
# `tuple[float, ...]`: mypyc keeps a fixed-length tuple of floats as a C struct and boxed
# all 21 into a new tuple each time add_gap read it.
ITL_BUCKETS: Final[tuple[float, ...]] = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


def itl_bucket(gap: float) -> int:
    """The histogram bucket of an inter-token gap: the index of the first of ITL_BUCKETS
    not below it (le semantics), len(ITL_BUCKETS) past the last (and for NaN). Written
    out as comparisons with literals, smallest first (a typical gap is found in a few):
    compiled, each is one machine comparison, where a loop over ITL_BUCKETS unboxed one
    float per bound (~250 instructions a token). `bucket_of(ITL_BUCKETS, gap)`, the
    histograms' binary search (metrics.py), unboxes a float per probe: ~390 instructions a
    call, measured. tests/ops/test_ops_units.py holds the two to each other."""
    if gap <= 0.001:
        return 0
    if gap <= 0.0025:
        return 1
    if gap <= 0.005:
        return 2
    if gap <= 0.0075:
        return 3
    if gap <= 0.01:
        return 4
    if gap <= 0.0125:
        return 5
    if gap <= 0.015:
        return 6
    if gap <= 0.02:
        return 7
    if gap <= 0.025:
        return 8
    if gap <= 0.03:
        return 9
    if gap <= 0.04:
        return 10
    if gap <= 0.05:
        return 11
    if gap <= 0.075:
        return 12
    if gap <= 0.1:
        return 13
    if gap <= 0.15:
        return 14
    if gap <= 0.25:
        return 15
    if gap <= 0.5:
        return 16
    if gap <= 1.0:
        return 17
    if gap <= 2.5:
        return 18
    if gap <= 5.0:
        return 19
    if gap <= 10.0:
        return 20
    return 21


class Exchange:
    __slots__ = (
        "app",
        "backend",
        "chat",
        "client_disconnected",
        "completion_tokens",
        "config_version",
        "content_chunks",
        "cut",
        "ended_at",
        "endpoint",
        "error_code",
        "experiment",
        "finish_reason",
        "first_token_at",
        "first_token_overhead",
        "gap_buckets",
        "gap_count",
        "gap_max",
        "gap_sum",
        "last_token_at",
        "preset",
        "prompt_tokens",
        "queue_wait",
        "request_id",
        "route",
        "started_at",
        "started_wall",
        "status",
        "stream",
        "timeout",
        "upstream_error",
        "upstream_retries",
        "variant",
    )

    def __init__(self, request_id: str, started_at: float) -> None:
        self.request_id = request_id
        self.started_at = started_at  # time.monotonic()
        self.started_wall = wall()
        self.app = ""
        self.route = ""
        self.backend = ""
        self.preset = ""
        self.experiment = ""
        self.variant = ""
        self.config_version = ""
        self.chat = True
        self.endpoint = ""  # the request path, for the access log and metrics
        self.stream = False
        self.status = 0
        self.queue_wait = 0.0
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.ended_at = 0.0
        self.gap_count = 0
        self.gap_sum = 0.0
        self.gap_max = 0.0
        self.gap_buckets = [0] * (len(ITL_BUCKETS) + 1)  # le semantics; the last is +Inf
        # Upstream chunk carrying the first token received -> written to the client (s).
        self.first_token_overhead: float | None = None
        self.content_chunks = 0
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.finish_reason: str | None = None
        self.cut: str | None = None
        self.timeout: str | None = None
        self.upstream_error: str | None = None
        self.upstream_retries = 0  # resent once on a fresh connection (keep-alive race)
        self.client_disconnected = False
        self.error_code: str | None = None

    def add_gap(self, gap: float) -> None:
        self.gap_count += 1
        self.gap_sum += gap
        buckets = self.gap_buckets
        bucket = itl_bucket(gap)
        buckets[bucket] = buckets[bucket] + 1
        if gap > self.gap_max:  # noqa: PLR1730 - cheaper than max() per token
            self.gap_max = gap

    def add_zero_gaps(self, count: int) -> None:
        """`count` gaps of 0: tokens that came in the read of the one before them."""
        self.gap_count += count
        buckets = self.gap_buckets
        buckets[0] = buckets[0] + count

    def record_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            prompt = usage.get("prompt_tokens")
            completion = usage.get("completion_tokens")
            # A count: not a bool (an int to isinstance), not negative, and within 64 bits
            # (JSON's reader takes any integer; the access line's encoder, the metrics and
            # the records store take int64).
            if type(prompt) is int and 0 <= prompt <= MAX_COUNT:
                self.prompt_tokens = prompt
            if type(completion) is int and 0 <= completion <= MAX_COUNT:
                self.completion_tokens = completion

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started_at

    @property
    def duration(self) -> float:
        return self.ended_at - self.started_at

    @property
    def output_tokens(self) -> int:
        """Tokens from usage when the backend sent it, else content chunks (a lower bound:
        vLLM merges several tokens into one chunk under load)."""
        if self.completion_tokens is not None:
            return self.completion_tokens
        return self.content_chunks

    @property
    def mean_itl(self) -> float | None:
        return self.gap_sum / self.gap_count if self.gap_count else None
