"""Reload latency, a few samples per save style: the figures in docs/BENCHMARKS.md come
from `python -m bench.reload_latency --samples 20`, the same code."""

from __future__ import annotations

import pytest
from sluice.control.bench.loadgen import percentile

from bench.reload_latency import STYLES, measure
from tests.reload.fixtures import ConfigDir, Gateway

# Load-timed: run alone, after the parallel pass (Makefile).
pytestmark = pytest.mark.serial

SAMPLES = 5
# The bound for "every new request uses it"; the design target is well under.
BOUND_S = 1.0


@pytest.mark.slow
@pytest.mark.parametrize("style", list(STYLES))
def test_reload_latency_is_well_under_a_second(
    gateway: Gateway, config: ConfigDir, style: str
) -> None:
    latencies = measure(gateway, config, STYLES[style], SAMPLES)
    assert percentile(latencies, 50) < BOUND_S / 2, latencies
    assert max(latencies) < BOUND_S, latencies
