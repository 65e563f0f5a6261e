"""Acceptance: 200 concurrent streams while the preset file is rewritten 50 times, valid
and invalid edits interleaved, saved every way editors save.

- every request succeeds (200, a complete stream ending in `data: [DONE]`, no error event);
- every response's x-sluice-config is the version of a config that was valid (computed by
  the loader on a scratch copy of each edit), the initial one included;
- within 1 s of the last valid edit, every new request is served by it.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvloop
from sluice.control.config.build import ConfigInvalid
from sluice.sim.client import fetch

from tests.fixtures import ProcessServer
from tests.reload.fixtures import (
    MODES,
    PICKER_KEY,
    ConfigDir,
    StartGateway,
    delete_and_recreate,
    expected_version,
    modes_with_temperature,
    truncate_and_write,
    vim_style,
    write_in_place,
    write_temp_and_mv,
)

# Load-timed: run alone, after the parallel pass (Makefile).
pytestmark = pytest.mark.serial

CONCURRENCY = 200
EDITS = 50
CONVERGE_S = 1.0  # the acceptance bound: last valid edit -> every new request uses it
TAIL_S = 1.6  # load keeps running this long after the last edit
REQUEST_TIMEOUT_S = 20.0
STREAM = {
    "model": "chat",
    "messages": [{"role": "user", "content": "Hello"}],
    "stream": True,
    "max_tokens": 4,
    "sim": {"ttft_ms": 5, "itl_ms": 5},
}
PAYLOAD = json.dumps(STREAM).encode()

INVALID_EDITS = [
    MODES.replace("temperature: 0.3\n", "temperature: hot\n"),  # wrong type
    MODES.replace("{clamp: [0.2, 0.8]}", "{clamp: [0.9, 0.2]}"),  # min > max
    MODES[: MODES.index("{clamp: [0.2") + 9],  # cut mid-file: unclosed flow mapping
    "",  # empty file
    MODES.replace("  top_k: 40\n", "  top_kk: 40\n"),  # unknown key
    MODES.replace("  top_p: 0.9\n", "\ttop_p: 0.9\n"),  # tab indentation
    MODES + "  typical_p: deny\n",  # a policy for a field vLLM lacks
]
STYLES: list[Callable[[Path, str], None]] = [
    write_in_place,
    truncate_and_write,
    write_temp_and_mv,
    vim_style,
    delete_and_recreate,
]


@dataclass(frozen=True)
class Edit:
    text: str
    save: Callable[[Path, str], None]
    pause_after: float
    version: str | None  # None: the directory is invalid after this edit


def edit_plan(config: ConfigDir) -> list[Edit]:
    """50 edits: invalid and valid alternate, the last one valid. Most follow each other
    within the debounce; every fifth valid edit and every seventh invalid one stays long
    enough for the watcher to act on it, so several versions really go live and several
    errors really happen."""
    rng = random.Random(50)
    plan = []
    for i in range(EDITS):
        valid = i % 2 == 1
        if valid:
            text = modes_with_temperature(round(0.5 + 0.01 * (i // 2), 2))
            linger = (i // 2) % 5 == 4
        else:
            text = INVALID_EDITS[(i // 2) % len(INVALID_EDITS)]
            linger = (i // 2) % 7 == 6
        files = config.with_file("modes.yaml", text)
        version = expected_version(files) if valid else None
        if not valid:
            with pytest.raises(ConfigInvalid, match=r"modes\.yaml"):
                expected_version(files)
        pause = 0.4 if linger else rng.uniform(0.01, 0.12)
        plan.append(Edit(text, STYLES[i % len(STYLES)], pause, version))
    assert plan[-1].version is not None
    return plan


@dataclass
class Outcome:
    started: float  # time.monotonic() when the request was sent
    status: int = 0
    version: str = ""
    complete: bool = False  # ended with data: [DONE]
    error_event: bool = False
    tokens: int = 0
    exception: str = ""


class StreamLoad:
    """CONCURRENCY streams in flight at all times until `stop()`: the raw HTTP/1.1 client
    (`sluice.sim.client`) on a uvloop loop in its own thread (an httpx pool of 200
    connections costs more CPU than the proxy it measures)."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the load did not wind down"

    def wait_for(self, completed: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < completed:
            assert self._thread.is_alive(), "the load generator died"
            assert time.monotonic() < deadline, f"only {len(self.outcomes)} requests done"
            time.sleep(0.02)

    def _main(self) -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(self._run())

    async def _run(self) -> None:
        await asyncio.gather(*(self._worker(i) for i in range(CONCURRENCY)))

    async def _worker(self, worker: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            outcome = Outcome(started=time.monotonic())
            headers = {
                "authorization": f"Bearer {PICKER_KEY}",
                "x-request-id": f"load-{worker}-{n}",
            }
            try:
                response = await fetch(
                    self.host,
                    self.port,
                    "POST",
                    "/v1/chat/completions",
                    PAYLOAD,
                    headers,
                    timeout=REQUEST_TIMEOUT_S,
                )
            except (OSError, TimeoutError) as exc:
                outcome.exception = repr(exc)
                outcome.status = -1
            else:
                body = response.body
                outcome.status = response.status
                outcome.version = response.header("x-sluice-config") or ""
                complete = response.complete and body.rstrip().endswith(b"data: [DONE]")
                outcome.complete = complete
                outcome.error_event = b'data: {"error"' in body
                outcome.tokens = body.count(b'"content":"') - body.count(b'"content":""')
            self.outcomes.append(outcome)


@pytest.mark.slow
def test_200_concurrent_streams_through_50_edits(
    config: ConfigDir, start_gateway: StartGateway, sim: ProcessServer
) -> None:
    gateway = start_gateway(config)
    initial = config.version()
    plan = edit_plan(config)
    valid_versions = {initial} | {e.version for e in plan if e.version is not None}
    final = plan[-1].version
    assert len(valid_versions) == EDITS // 2 + 1  # every valid edit is a distinct version

    load = StreamLoad(gateway.url)
    load.start()
    try:
        load.wait_for(completed=CONCURRENCY)
        for edit in plan:
            edit.save(config.path / "modes.yaml", edit.text)
            written = time.monotonic()
            time.sleep(edit.pause_after)
        last_valid_at = written
        time.sleep(max(0.0, last_valid_at + TAIL_S - time.monotonic()))
    finally:
        load.stop()
    outcomes = list(load.outcomes)

    # Every request succeeded.
    failed = [o for o in outcomes if o.status != 200 or not o.complete or o.error_event]
    assert not failed, f"{len(failed)} of {len(outcomes)} failed, e.g. {failed[:3]}"
    assert all(o.tokens == 4 for o in outcomes), {o.tokens for o in outcomes}
    # Every response carries the version of a valid config.
    served = {o.version for o in outcomes}
    assert served <= valid_versions, f"served but never valid: {served - valid_versions}"
    # The test saw config changes under load: the initial, at least one intermediate, the last.
    assert initial in served and final in served
    assert len(served) >= 3, f"only {len(served)} versions served: the edits never went live"
    # Within 1 s of the last valid edit, all new requests use it.
    late = [o for o in outcomes if o.started >= last_valid_at + CONVERGE_S]
    assert len(late) >= CONCURRENCY // 4, f"only {len(late)} requests after the deadline"
    stale = [o for o in late if o.version != final]
    assert not stale, (
        f"{len(stale)} requests started >= {CONVERGE_S}s after the last edit got an older version"
    )
    stale_starts = [o.started for o in outcomes if o.version != final]
    converged = max(stale_starts) - last_valid_at
    assert converged < CONVERGE_S

    # What the process itself says: only valid versions applied, errors counted.
    applied = gateway.reloaded_versions(at_least=2)
    deadline = time.monotonic() + 2.0
    while applied[-1] != final and time.monotonic() < deadline:  # its line may trail
        time.sleep(0.01)
        applied = gateway.reloaded_versions()
    assert set(applied) <= valid_versions and applied[-1] == final
    state = gateway.admin_config()
    assert state["version"] == final and state["last_result"] == "ok"
    assert state["reloads"]["error"] >= 1
    assert gateway.reload_metric() == state["reloads"]
    print(
        f"\n{len(outcomes)} streams, {len(served)} versions served, {len(applied)} applied, "
        f"{state['reloads']['error']} failed reloads; new version on every new request "
        f"{converged * 1000:.0f} ms after the last valid edit"
    )
