from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures import ProcessServer, start_sim


@pytest.fixture(scope="session")
def sim_ignore_stop() -> Iterator[ProcessServer]:
    """A simulator that ignores stop strings: only sluice's own guard can cut."""
    server = start_sim("--ttft-ms", "5", "--itl-ms", "2", "--ignore-stop")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sim() -> Iterator[ProcessServer]:
    server = start_sim("--ttft-ms", "5", "--itl-ms", "2")
    yield server
    server.stop()
