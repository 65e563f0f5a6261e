from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures import ProcessServer, SimClient, start_sim


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
