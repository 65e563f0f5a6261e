"""How long the edge waits for sluice, derived from the Gateway document and the policies.

Before its first byte, sluice waits for an app permit, a backend permit and the backend's
connect; after it, a stream lasts at most its route's `total` (its Policy's, else the
Gateway's `timeouts.total`). The edge's timeouts cover
all of it plus a margin, so sluice's own deadlines always fire first and the client gets
sluice's terminal error event rather than a cut connection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sluice.control.config.build import BuiltConfig
from sluice.control.config.gateway_schema import GatewayFile

# What the edge adds to the proxy's longest stream before it gives up on the origin.
EDGE_TIMEOUT_MARGIN = 30.0
# Stand-in for "no total timeout": some route's streams may run for as long as they last.
UNBOUNDED_STREAM_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class EdgeTiming:
    """The longest waits sluice may make an edge sit through, in seconds."""

    longest_total: float | None  # None: some route's streams have no total timeout
    queue_wait: float  # longest app wait + longest backend wait
    connect: float

    @property
    def first_byte(self) -> float:
        return self.queue_wait + self.connect

    @property
    def read_timeout(self) -> int:
        total = UNBOUNDED_STREAM_SECONDS if self.longest_total is None else self.longest_total
        return math.ceil(total + self.first_byte + EDGE_TIMEOUT_MARGIN)


def edge_timing(built: BuiltConfig, gateway: GatewayFile) -> EdgeTiming:
    """From the deadlines sluice applies to each route and experiment variant (its Policy's,
    else the Gateway's `timeouts`, as the snapshot resolved them), and the queues."""
    totals: list[float | None] = []
    for route in built.snapshot.routes.values():
        totals.append(route.policy.timeouts.total)
        if route.experiment is not None:
            totals += [(v.policy or route.policy).timeouts.total for v in route.experiment.variants]
    longest = None if not totals or None in totals else max(t for t in totals if t is not None)
    # Only apps with a concurrency limit queue.
    limited = [app for app in gateway.apps if app.max_concurrency is not None]
    app_wait = max((app.queue.max_wait for app in limited), default=0.0)
    backend_wait = max((b.queue.max_wait for b in gateway.backends), default=0.0)
    connect = max((b.connect_timeout for b in gateway.backends), default=0.0)
    return EdgeTiming(longest, app_wait + backend_wait, connect)


def seconds(value: float) -> str:
    return f"{value:g}s"
