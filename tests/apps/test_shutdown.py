"""Acceptance: a SIGTERM during load loses no record of a completed request.

Runs a real `sluice serve` (it needs control/runtime/serve.py to call
`sluice.control.runtime.plugins.attach_records` and close it after the drain). The records'
flush interval is an hour: whatever reaches the database was written by the shutdown.
"""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.apps.fixtures import SUPPORT_KEY, digest, write_config
from tests.fixtures import ProcessServer, sluice_cmd, start_sim

GATEWAY = """\
kind: Gateway
backends: [{{name: sim, urls: ["{sim}"]}}]
routes: [{{model: chat, backend: sim, upstream_model: sim-model}}]
apps: [{{name: support, keys: ["{key}"]}}]
records: {{path: data/records.sqlite, batch_size: 100000, max_buffer: 100000, flush_interval: 1h}}
"""


@pytest.fixture(scope="module")
def slow_sim() -> Iterator[ProcessServer]:
    server = start_sim("--ttft-ms", "5", "--itl-ms", "5")
    yield server
    server.stop()


def test_sigterm_during_load_loses_no_record_of_a_completed_request(
    tmp_path: Path, slow_sim: ProcessServer
) -> None:
    write_config(tmp_path / "presets", GATEWAY.format(sim=slow_sim.url, key=digest(SUPPORT_KEY)))
    server = ProcessServer(
        sluice_cmd("serve", "--config", "presets", "--port", "0", "--drain-timeout", "10"),
        cwd=tmp_path,
    )
    completed: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client_loop(worker: int) -> None:
        body = {
            "model": "chat",
            "stream": True,
            "max_tokens": 30,
            "messages": [{"role": "user", "content": "hi"}],
        }
        with httpx.Client(timeout=15) as client:
            while not stop.is_set():
                try:
                    resp = client.post(
                        server.url + "/v1/chat/completions",
                        json=body,
                        headers={"Authorization": f"Bearer {SUPPORT_KEY}"},
                    )
                except httpx.HTTPError:
                    time.sleep(0.01)  # refused or cut while draining: not a completed request
                    continue
                if resp.status_code == 200 and resp.text.endswith("data: [DONE]\n\n"):
                    with lock:
                        completed.append(resp.headers["x-request-id"])

    with ThreadPoolExecutor(24) as pool:
        workers = [pool.submit(client_loop, i) for i in range(24)]
        deadline = time.monotonic() + 10
        while len(completed) < 200:  # well into the load
            assert time.monotonic() < deadline, "no load reached the proxy"
            time.sleep(0.01)
        code = server.stop(signal.SIGTERM, timeout=30)
        stop.set()
        for worker in workers:
            worker.result()
    assert code == 0, "".join(server.stderr_lines[-20:])

    db = tmp_path / "data" / "records.sqlite"
    assert db.exists(), "no records database: is attach_records wired into `sluice serve`?"
    with sqlite3.connect(db) as conn:
        recorded = {
            row[0] for row in conn.execute("SELECT request_id FROM records WHERE status = 200")
        }
    missing = set(completed) - recorded
    assert not missing, f"{len(missing)} of {len(completed)} completed requests have no record"
    assert len(completed) >= 200
