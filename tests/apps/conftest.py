"""Fixtures of the apps / experiments / records tests: simulators of their own (these tests
change a simulator's health and count its requests) and config directories in tmp dirs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures import ProcessServer, start_sim


@pytest.fixture(scope="module")
def fast_sim() -> Iterator[ProcessServer]:
    """TTFT 2 ms, no gap between tokens: thousands of tiny streams in seconds."""
    server = start_sim("--ttft-ms", "2", "--itl-ms", "0")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sim_pair() -> Iterator[tuple[ProcessServer, ProcessServer]]:
    """Two replicas of one backend."""
    first = start_sim("--ttft-ms", "5", "--itl-ms", "5")
    try:
        second = start_sim("--ttft-ms", "5", "--itl-ms", "5")
    except BaseException:
        first.stop()
        raise
    yield first, second
    first.stop()
    second.stop()
