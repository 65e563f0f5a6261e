"""Fixtures of the observability and operations tests: a config directory pointing at the
session's simulator, and real `sluice serve` processes that are always stopped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures import ProcessServer
from tests.ops.fixtures import start_sluice, write_config

StartSluice = Callable[..., ProcessServer]


@pytest.fixture(scope="module")
def ops_config(tmp_path_factory: pytest.TempPathFactory, sim: ProcessServer) -> Path:
    return write_config(tmp_path_factory.mktemp("ops") / "cfg", sim.url)


@pytest.fixture(scope="module")
def gateway(ops_config: Path) -> Iterator[ProcessServer]:
    """One `sluice serve` shared by a module's tests (they compare metric deltas)."""
    server = start_sluice(ops_config)
    yield server
    server.stop()


@pytest.fixture
def start() -> Iterator[StartSluice]:
    """start(config, *args) -> a `sluice serve` of the test's own, stopped at teardown."""
    started: list[ProcessServer] = []

    def run(config: Path, *args: str) -> ProcessServer:
        server = start_sluice(config, *args)
        started.append(server)
        return server

    yield run
    for server in started:
        server.stop()  # also closes its pipes when the test already ended the process
