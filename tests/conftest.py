from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import ProcessServer, SimClient, start_sim


@pytest.fixture(scope="session")
def sim() -> Iterator[ProcessServer]:
    """The simulator honouring `stop` as vLLM does (TTFT 20 ms, ITL 10 ms)."""
    server = start_sim("--ttft-ms", "20", "--itl-ms", "10")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sim_ignore_stop() -> Iterator[ProcessServer]:
    """A simulator that ignores `stop`, so only the proxy's own enforcement cuts."""
    server = start_sim("--ttft-ms", "20", "--itl-ms", "10", "--ignore-stop")
    yield server
    server.stop()


@pytest.fixture
def sim_client(sim: ProcessServer) -> SimClient:
    client = SimClient(sim.url)
    client.reset()
    return client
