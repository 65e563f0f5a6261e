"""`sluice serve --workers N`: no worker outlives its supervisor (one left behind by a
SIGKILLed supervisor would serve the port beside the next supervisor's workers, an old
build with permits of its own), and the supervisor binds the address family its host
resolves to (IPv6 for ::1), with the CLI's one-line error when the host cannot be bound."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import structlog
from sluice.control.runtime.lastgood import STATE_DIR_ENV
from sluice.control.runtime.serve import _watch_supervisor
from sluice.control.runtime.supervisor import SUPERVISOR_PID_ENV, SUPERVISOR_WATCH_S, WORKER_ENV

from tests.fixtures import ProcessServer, sluice_cmd
from tests.scale.fixtures import burst, statuses, wait_until, worker_pids, write_gateway
from tests.scale.test_scale_supervisor import START_FAILURE_S, WORKERS, _said, _serve

# A worker drains on its parent's death as on SIGTERM: with no request in flight that is
# well under a second; this bounds a loaded 2-core machine.
ORPHAN_EXIT_S = 10.0


def _alive(pid: int) -> bool:
    """Running, not a zombie (a worker's zombie waits for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def _accepts(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_workers_exit_when_the_supervisor_is_killed(start, slow_sim, tmp_path: Path) -> None:
    config = write_gateway(tmp_path / "cfg", slow_sim.url, limit=4)
    server: ProcessServer = start(config, "--workers", str(WORKERS), "--drain-timeout", "1")
    pids = worker_pids(server, WORKERS)
    assert statuses(burst([server.url], 2, 5)) == {200: 2}
    try:
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=5)
        wait_until(
            f"workers {sorted(pids)} to exit with their supervisor",
            lambda: not any(_alive(pid) for pid in pids),
            timeout=ORPHAN_EXIT_S,
        )
        assert not _accepts("127.0.0.1", server.port), "the port still accepts"
    finally:
        for pid in pids:  # the orphans of a failing run: never left to serve the port
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_workers_serve_on_ipv6_loopback(start, slow_sim, tmp_path: Path) -> None:
    if not _has_ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback (::1 cannot be bound)")
    config = write_gateway(tmp_path / "cfg", slow_sim.url, limit=4)
    server: ProcessServer = start(config, "--workers", str(WORKERS), "--host", "::1")
    assert server.url.startswith("http://[::1]:")
    assert len(worker_pids(server, WORKERS)) == WORKERS
    assert statuses(burst([server.url], 2, 5)) == {200: 2}
    assert server.stop() == 0


def test_a_host_that_cannot_be_bound_is_one_line(tmp_path: Path) -> None:
    """192.0.2.1 (TEST-NET-1) is no address of this machine: the supervisor cannot reserve
    a port on it, and says so as `sluice serve` alone would, without a traceback."""
    config = write_gateway(tmp_path / "cfg", "http://127.0.0.1:9", limit=2)
    result = _serve(config, 0, "--workers", str(WORKERS), "--host", "192.0.2.1")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    (said,) = _said(result.stderr)
    assert said.startswith("sluice serve: cannot listen on 192.0.2.1:0: "), said


def test_a_worker_whose_supervisor_already_died_does_not_serve(tmp_path: Path) -> None:
    """The supervisor died between the worker's fork and its PR_SET_PDEATHSIG: no signal
    will come, so the worker sees that its parent is not the supervisor it was started by
    (pid 1 here, never this test) and exits instead of serving."""
    config = write_gateway(tmp_path / "cfg", "http://127.0.0.1:9", limit=2)
    argv = sluice_cmd("serve", "--config", str(config), "--host", "127.0.0.1", "--port", "0")
    env = {**os.environ, WORKER_ENV: "0", SUPERVISOR_PID_ENV: "1"}
    env.pop(STATE_DIR_ENV, None)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=START_FAILURE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"a worker without its supervisor ran {START_FAILURE_S}s") from None
    assert proc.returncode == 1, err[-2000:]
    assert b"serving on" not in out
    assert b'"supervisor_gone"' in err


def test_without_prctl_a_worker_polls_for_its_supervisor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the kernel cannot signal it (no prctl), the worker's watch task ends the
    serve loop (a drain, as on SIGTERM) once its parent is no longer the supervisor."""
    monkeypatch.setenv(SUPERVISOR_PID_ENV, str(os.getppid()))

    async def watch() -> bool:
        stop = asyncio.Event()
        task = asyncio.create_task(_watch_supervisor(stop, structlog.get_logger("test")))
        await asyncio.sleep(0.05)
        if stop.is_set():
            return False  # it stopped with its supervisor alive
        monkeypatch.setenv(SUPERVISOR_PID_ENV, "1")  # as if re-parented
        await asyncio.wait_for(stop.wait(), timeout=SUPERVISOR_WATCH_S * 5)
        await task
        return True

    assert asyncio.run(watch())
