"""The simulator's own cost stays small: 256 streams x 64 tokens at 10 ms ITL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sluice.control.bench.simcost import measure, start_sim

# Measured ~12-18 ms per 1000 tokens on the 2-core dev box (client in the same box); a
# per-token timer or a JSON document per chunk would show up here first.
MAX_CPU_MS_PER_1000_TOKENS = 50.0


@pytest.mark.slow
def test_sim_cpu_per_token_is_small(tmp_path: Path) -> None:
    sim, url = start_sim(tmp_path, ttft_ms=20, itl_ms=10)
    try:
        asyncio.run(measure(sim, url, 16, 64, timeout=30))  # warm-up
        result = asyncio.run(measure(sim, url, 256, 64, timeout=60))
    finally:
        sim.stop()
    assert result.tokens == 256 * 64
    assert result.wall_seconds < 10.0
    assert result.cpu_ms_per_1000_tokens < MAX_CPU_MS_PER_1000_TOKENS, result.summary()
