"""Item 6 of issue 13 (and the permit side of item 1): the supervisor starts a worker
that dies again, with back-off, and says so in its log; the permits the dead worker held
return at once (its socket closed), so the limit is whole again for the new worker. A
worker that cannot start at all (port taken, records file unopenable) is not started again:
the supervisor exits with its message, as `sluice serve` alone does."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

from tests.fixtures import sluice_cmd
from tests.scale.fixtures import burst, statuses, stream, wait_until, worker_pids, write_gateway

WORKERS = 2
# A process's start-up (imports, config, bind) takes 1-3 s on a loaded 2-core machine; one
# that cannot start must have said so well within this.
START_FAILURE_S = 20.0


def test_dead_worker_is_restarted_and_its_permits_return(
    start, slow_sim, sim_stats, tmp_path: Path
) -> None:
    config = write_gateway(tmp_path / "cfg", slow_sim.url, limit=2, queue_max=0)
    server = start(config, "--workers", str(WORKERS))
    pids = worker_pids(server, WORKERS)
    # Long streams hold both permits; which worker holds them does not matter: kill both.
    holders = [threading.Thread(target=stream, args=(server.url, 2000), daemon=True)]
    holders.append(threading.Thread(target=stream, args=(server.url, 2000), daemon=True))
    for thread in holders:
        thread.start()
    wait_until("both permits in use", lambda: sim_stats.stats()["active"] == 2)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)

    def restarted() -> bool:
        events = [e for e in server.json_logs() if e.get("event") == "worker_restarted"]
        return len(events) == WORKERS

    wait_until("both workers restarted", restarted)
    died = [e for e in server.json_logs() if e.get("event") == "worker_died"]
    assert sorted(e["pid"] for e in died) == sorted(pids)
    assert all(e["code"] == -signal.SIGKILL and e["restart_in_s"] == 0.5 for e in died)
    new = worker_pids(server, WORKERS)
    assert not new & pids
    # The dead workers' permits are back: two new streams are admitted at once (no queue).
    sim_stats.reset()
    assert statuses(burst([server.url], 2, 5)) == {200: 2}
    assert server.stop() == 0


def _serve(config: Path, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """`sluice serve` to its end; one still running after START_FAILURE_S is killed with
    its workers (its own process group) and fails the test."""
    argv = sluice_cmd("serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port))
    proc = subprocess.Popen(
        [*argv, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=START_FAILURE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        raise AssertionError(f"still running after {START_FAILURE_S}s: {err[-2000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _said(stderr: str) -> list[str]:
    """The CLI's one-line messages (the rest of stderr is JSON log lines)."""
    return [line for line in stderr.splitlines() if line.startswith("sluice serve:")]


def _events(stderr: str, event: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("event") == event]


def test_workers_that_cannot_listen_end_the_supervisor_with_their_message(
    tmp_path: Path,
) -> None:
    """The port is held by a socket without SO_REUSEPORT, so no worker can join it (as
    `sluice serve` alone cannot bind it): the supervisor prints the message one process
    prints, once, and exits 1, instead of starting the workers again for ever."""
    config = write_gateway(tmp_path / "cfg", "http://127.0.0.1:9", limit=2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        alone = _serve(config, port)
        workers = _serve(config, port, "--workers", str(WORKERS))
    assert alone.returncode == 1 and len(_said(alone.stderr)) == 1, alone.stderr[-2000:]
    assert "address already in use" in _said(alone.stderr)[0]
    assert workers.returncode == 1, workers.stderr[-2000:]
    assert _said(workers.stderr) == _said(alone.stderr)
    assert _events(workers.stderr, "worker_restarted") == []
    failed = _events(workers.stderr, "worker_failed_to_start")
    assert failed and failed[0]["code"] == 1 and failed[0]["worker"] in range(WORKERS)
    # The config's warnings (no admin token in this environment) are logged once, by the
    # supervisor, not by each worker.
    assert len(_events(workers.stderr, "config_warnings")) == 1


def test_a_records_file_that_cannot_be_opened_ends_the_supervisor(tmp_path: Path) -> None:
    unopenable = tmp_path / "a-directory"  # (a missing parent directory is created)
    unopenable.mkdir()
    records = f'records: {{path: "{unopenable}"}}\n'
    config = write_gateway(tmp_path / "cfg", "http://127.0.0.1:9", limit=2, extra=records)
    result = _serve(config, 0, "--workers", str(WORKERS))
    assert result.returncode == 1, result.stderr[-2000:]
    (said,) = _said(result.stderr)
    assert said.startswith(f"sluice serve: cannot open the records database {unopenable}: ")
    assert _events(result.stderr, "worker_restarted") == []
