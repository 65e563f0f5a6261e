"""Fixtures of the end-to-end reload tests: a config directory pointing at the session's
simulator, and real `sluice serve` processes that are always stopped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures import ProcessServer
from tests.reload.fixtures import ConfigDir, Gateway, StartGateway, base_files


@pytest.fixture
def config(tmp_path: Path, sim: ProcessServer) -> ConfigDir:
    return ConfigDir(tmp_path / "cfg", base_files(sim.url))


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[StartGateway]:
    """start(config, *extra_args, watching=True) -> a running gateway (by default one whose
    watcher is known to be live), stopped at teardown."""
    started: list[Gateway] = []

    def start(config: ConfigDir, *extra: str, watching: bool = True) -> Gateway:
        gateway = Gateway(config, tmp_path, *extra)
        started.append(gateway)
        if watching:
            gateway.wait_watching()
        return gateway

    yield start
    for gateway in started:
        gateway.close()


@pytest.fixture
def gateway(config: ConfigDir, start_gateway: StartGateway) -> Gateway:
    return start_gateway(config)
