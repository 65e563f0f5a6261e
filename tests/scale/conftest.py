"""Fixtures of the scale tests: a slow simulator of their own (its high-water mark is the
witness of every limit), a real redis-server per test, a PostgreSQL cluster per module."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures import ProcessServer, SimClient, start_sim
from tests.scale.fixtures import PostgresServer, RedisServer, start_sluice


@pytest.fixture(scope="module")
def slow_sim() -> Iterator[ProcessServer]:
    """TTFT 20 ms, 10 ms a token: a 100-token stream holds its permit for about 1 s."""
    server = start_sim("--ttft-ms", "20", "--itl-ms", "10")
    yield server
    server.stop()


@pytest.fixture
def sim_stats(slow_sim: ProcessServer) -> SimClient:
    client = SimClient(slow_sim.url)
    client.reset()
    return client


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    yield server
    server.kill()


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture
def start() -> Iterator[Callable[..., ProcessServer]]:
    """start(config, *args, env=None) -> a `sluice serve`, stopped at teardown."""
    started: list[ProcessServer] = []

    def run(config: Path, *args: str, env: dict[str, str] | None = None) -> ProcessServer:
        server = start_sluice(config, *args, env=env)
        started.append(server)
        return server

    yield run
    for server in started:
        server.stop()
