"""Item 1 of issue 13: `sluice serve --workers N` keeps a limit exactly as configured.

The issue's table, re-measured: backend max_concurrency 2, queue 1 x 300 ms, 16 concurrent
100-token streams (about 1 s each). Before, N workers admitted 2N; the supervisor's permit
server makes it 2 for every N, and the simulator never sees more than 2 at once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.scale.fixtures import burst, statuses, write_gateway

# Load-timed: run alone, after the parallel pass (Makefile).
pytestmark = pytest.mark.serial


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_limit_holds_across_workers(start, slow_sim, sim_stats, tmp_path: Path, workers) -> None:
    config = write_gateway(tmp_path / "cfg", slow_sim.url, limit=2)
    server = start(config, "--workers", str(workers))
    results = burst([server.url], 16, 100)
    counts = statuses(results)
    assert counts[200] == 2, counts
    assert counts[503] == 14, counts
    assert all(r.headers.get("retry-after") for r in results if r.status == 503)
    assert sim_stats.stats()["max_active"] == 2
