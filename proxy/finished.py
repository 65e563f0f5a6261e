"""The record of finished requests that the console's live page charts: one tuple per
request, appended by a completion hook.

The per-request half of `control/console/live.py`, kept here so it is compiled with the
data plane (setup.py): interpreted, the hook was ~1% of the proxy's CPU per short request.
The page's summary is computed on demand from `rows`, off the request path.
"""

from __future__ import annotations

from collections import deque

from .clock import wall
from .exchange import Exchange

# at (unix time the request ended), route, status, ttft (s or None), per-bucket gap counts
# (None when no gap), tokens out, duration (s), timeout (or None), client disconnected.
FinishedRow = tuple[
    float, str, int, float | None, tuple[int, ...] | None, int, float, str | None, bool
]


class FinishedLog:
    """The last `max_entries` finished requests (a bounded deque: nothing else grows)."""

    def __init__(self, max_entries: int) -> None:
        self.rows: deque[FinishedRow] = deque(maxlen=max_entries)

    def on_complete(self, ex: Exchange) -> None:
        """The completion hook: one tuple appended per request."""
        self.rows.append(
            (
                wall(),
                ex.route,
                ex.status,
                ex.ttft,
                tuple(ex.gap_buckets) if ex.gap_count else None,
                ex.output_tokens,
                ex.duration,
                ex.timeout,
                ex.client_disconnected,
            )
        )
