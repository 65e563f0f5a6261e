"""Fixtures: real simulators on 127.0.0.1:0, served by a uvloop loop in a background
thread, so tests can use blocking clients (the openai SDK, httpx) as well as the raw
socket client; and the real vLLM transcripts, parsed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sluice.sim import SimConfig, start_sim

from tests.fixtures import LoopThread
from tests.sim.fixtures import FAST, TRANSCRIPTS, Sim, Transcripts, shape


@pytest.fixture(scope="session")
def loops() -> Iterator[LoopThread]:
    runner = LoopThread()
    yield runner
    runner.stop()


@pytest.fixture
def make_sim(loops: LoopThread) -> Iterator[Callable[..., Sim]]:
    started: list[Sim] = []

    def make(**overrides: Any) -> Sim:
        config = SimConfig(**{**FAST, **overrides})
        started.append(Sim(loops.run(start_sim(config)), loops))
        return started[-1]

    yield make
    for sim in started:
        for stream in sim.streams:
            stream.close()
        loops.run(sim.server.close())


@pytest.fixture
def sim(make_sim: Callable[..., Sim]) -> Sim:
    return make_sim()


@pytest.fixture(scope="session")
def transcripts() -> Transcripts:
    if not TRANSCRIPTS.is_dir():
        pytest.skip("the vLLM transcripts are not on this machine")
    return Transcripts(TRANSCRIPTS)


@pytest.fixture(scope="session")
def shape_of() -> Callable[[Any], Any]:
    return shape
