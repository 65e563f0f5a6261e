from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers import ProcessServer, start_sim


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
