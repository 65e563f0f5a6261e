"""The simulator's own cost stays small: 256 streams x 64 tokens at 10 ms ITL."""

from __future__ import annotations

import asyncio

import pytest
from sluice.sim.selfbench import run_load, start_sim_process

# Measured ~12-18 ms per 1000 tokens on the 2-core dev box (client in the same box); a
# per-token timer or a JSON document per chunk would show up here first.
MAX_CPU_MS_PER_1000_TOKENS = 50.0


@pytest.mark.slow
def test_sim_cpu_per_token_is_small():
    proc, port = start_sim_process(ttft_ms=20, itl_ms=10)
    try:
        asyncio.run(run_load(port, 16, 64, timeout=30))  # warm-up
        result = asyncio.run(run_load(port, 256, 64, timeout=60))
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert result.tokens == 256 * 64
    assert result.wall_seconds < 10.0
    assert result.cpu_ms_per_1000_tokens < MAX_CPU_MS_PER_1000_TOKENS, result.summary()
