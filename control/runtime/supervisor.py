"""The `--workers N` supervisor: N `sluice serve` processes sharing one port.

The workers bind the same port through SO_REUSEPORT; each loads and watches the config
itself (the `x-sluice-config` header shows that they agree). The supervisor only starts
them, forwards signals and reports how they exited.

A worker tells the supervisor two things through files in the state directory
(STATE_DIR_ENV, shared with lastgood.py): that it serves (`report_serving`), and, when one
of the first workers cannot start, the one line `sluice serve` alone would print
(`report_start_failure`). Such a failure (port taken, records database or cache-salt key
unreadable) would recur at every restart, so the supervisor stops the others and exits 1
with that line instead of restarting them for ever behind a live-looking process.

No worker outlives the supervisor (`die_with_supervisor`): one left behind by a SIGKILLed
supervisor would go on serving the shared port, an old build, beside the workers of the
next `sluice serve --workers N`, each with its own permits.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import structlog
from prometheus_client.multiprocess import mark_process_dead
from sluice.control.bench.processes import pdeathsig_setter
from sluice.control.errors import CliError
from sluice.proxy.metrics import MULTIPROC_ENV
from sluice.proxy.permit_socket import PERMIT_SOCKET_ENV

from .lastgood import STATE_DIR_ENV, state_dir
from .limits import PermitServerThread

WORKER_ENV = "SLUICE_WORKER_ID"
RESTARTED_ENV = "SLUICE_WORKER_RESTARTS"  # how often its slot was started again (0: first)
SUPERVISOR_PID_ENV = "SLUICE_SUPERVISOR_PID"
# Where a worker cannot have the kernel signal it (no prctl), it looks this often whether
# its supervisor is still its parent.
SUPERVISOR_WATCH_S = 1.0
SUPERVISOR_POLL_S = 0.1
# A worker that dies is started again after 0.5 s, then 1, 2, 4... up to 30 s while it
# keeps dying within STABLE_S of its start; one that ran that long starts over at 0.5 s.
RESTART_BASE_S = 0.5
RESTART_MAX_S = 30.0
STABLE_S = 60.0


class _Worker:
    """One worker slot: its current process and its restart back-off."""

    def __init__(self, worker_id: int) -> None:
        self.worker_id = worker_id
        self.proc: subprocess.Popen[bytes]
        self.started = 0.0
        self.restarts = 0
        self.quick_failures = 0
        self.restart_at = 0.0

    def backoff(self, now: float) -> float:
        """Schedules the restart after a death; returns the delay."""
        self.quick_failures = 1 if now - self.started >= STABLE_S else self.quick_failures + 1
        delay = min(RESTART_MAX_S, RESTART_BASE_S * (1 << min(self.quick_failures - 1, 10)))
        self.restart_at = now + delay
        self.restarts += 1
        return delay


# A worker's reports in the state directory, named by its pid.
SERVING_FILE = "serving-{pid}"
START_FAILURE_FILE = "start-failure-{pid}"


def report_serving() -> None:
    """Tells the supervisor, if any, that this worker listens: from now on its death is a
    crash, and it is started again."""
    state = state_dir()
    if state is not None and os.environ.get(WORKER_ENV) is not None:
        try:
            (state / SERVING_FILE.format(pid=os.getpid())).touch()
        except OSError as exc:  # the worker serves anyway; a start failure is then a crash
            structlog.get_logger("sluice").warning("serving_not_reported", error=str(exc))


def report_start_failure(message: str) -> bool:
    """Hands the supervisor why this worker, one of the first, could not start; True when
    handed (the supervisor prints it once for all workers, the caller prints nothing). False
    in a single process, in a worker started again (the supervisor retries it with back-off)
    and once it served: the caller prints the message itself."""
    state = state_dir()
    if state is None or os.environ.get(WORKER_ENV) is None:
        return False
    if os.environ.get(RESTARTED_ENV, "0") != "0":
        return False
    if (state / SERVING_FILE.format(pid=os.getpid())).exists():
        return False
    try:
        (state / START_FAILURE_FILE.format(pid=os.getpid())).write_text(message, "utf-8")
    except OSError:
        return False
    return True


def die_with_supervisor() -> bool:
    """In a worker: has the kernel SIGTERM it, so that it drains, when the supervisor dies,
    even by SIGKILL (PR_SET_PDEATHSIG). False where prctl is unavailable (not Linux): the
    worker then polls `supervisor_gone` every SUPERVISOR_WATCH_S instead. Either way the
    caller checks `supervisor_gone` once after this: a supervisor that died before the
    request took effect sends nothing."""
    setter = pdeathsig_setter()
    return setter is not None and setter()


def supervisor_gone() -> bool:
    """True in a worker whose supervisor has exited (the worker was re-parented); False in
    a single process."""
    expected = os.environ.get(SUPERVISOR_PID_ENV)
    return expected is not None and os.getppid() != int(expected)


def _reserve(host: str) -> socket.socket:
    """A bound (not listening) socket on a free port of `host`, of the address family that
    `host` resolves to (IPv6 for ::1); CliError with the line `sluice serve` alone prints
    when it cannot be bound."""
    sock: socket.socket | None = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise CliError(f"cannot listen on {host}:0: {exc.strerror or exc}") from None
    return sock


def _start_failure(state: Path, slot: _Worker, code: int) -> str | None:
    """Why the process of `slot`, one of the first workers, exited before it served; None
    when it served or was itself a restart (a crash: it is started again)."""
    pid = slot.proc.pid
    served = state / SERVING_FILE.format(pid=pid)
    if served.exists():
        served.unlink()
        return None
    if slot.restarts > 0:
        return None
    try:
        return (state / START_FAILURE_FILE.format(pid=pid)).read_text("utf-8")
    except OSError:  # it died without a message of its own (a signal, a traceback)
        return f"worker {slot.worker_id} exited with status {code} before it served"


def supervise(
    workers_wanted: int, host: str, port: int, *, metrics: bool, permit_server: bool = True
) -> int:
    """Starts the workers, forwards SIGTERM/SIGINT/SIGHUP, exits when they all have.

    A worker that dies while no shutdown was asked for (a crash, the OOM killer, SIGKILL)
    is logged (`worker_died`) and started again with back-off (`worker_restarted`); its
    permits went back when its socket closed.

    Metrics: the workers share a fresh PROMETHEUS_MULTIPROC_DIR (set in their environment,
    so before they import prometheus_client); a worker that exits is marked dead there at
    once, so its live gauges drop out of the sums; the directory goes when all have exited.
    Exit status: 0 when every worker exited 0, else the first failure's (128+N: signal N).
    One of the first workers that exits non-zero before it served stops the others and
    raises CliError with its message (exit status 1, as `sluice serve` alone).
    """
    log = structlog.get_logger("sluice")
    reserved: socket.socket | None = None
    if port == 0:
        # Workers must share one port: pick it here, and keep it bound (not listening) until
        # they exit, so that the host hands it to nothing else while they start; they join
        # it through SO_REUSEPORT. A bound socket that does not listen gets no connections.
        reserved = _reserve(host)
        port = reserved.getsockname()[1]
    argv = [sys.executable, "-m", "sluice.control.cli", *sys.argv[1:]]
    argv = [a for a in argv if a != "--demo"]
    # The address the supervisor resolved: a worker started again after an edit of
    # `listen` must join its siblings' socket, not bind the new one (that needs a restart).
    argv += ["--host", host, "--port", str(port)]
    # Each worker asks the kernel to signal it when its parent dies (die_with_supervisor).
    # The kernel means the thread that forked it: that is this main thread (signal.signal
    # below works only there), which lives as long as the supervisor.
    env = {**os.environ, SUPERVISOR_PID_ENV: str(os.getpid())}
    metrics_dir = None
    if metrics:
        metrics_dir = tempfile.mkdtemp(prefix="sluice-metrics-")
        env[MULTIPROC_ENV] = metrics_dir
    # Where the workers keep the config they started from and the last one they applied,
    # for a worker started again (lastgood.py).
    config_dir = tempfile.mkdtemp(prefix="sluice-config-")
    env[STATE_DIR_ENV] = config_dir
    permits = None
    if permit_server:
        # No Redis: the supervisor owns the permits, so a limit holds across the workers.
        permits = PermitServerThread()
        env[PERMIT_SOCKET_ENV] = permits.path
    workers: dict[int, _Worker] = {}  # by pid
    waiting: list[_Worker] = []  # dead, to be started again at their `restart_at`
    codes: list[int] = []
    stopping = False
    stop_signal: int | None = None
    start_failure: str | None = None

    def start(slot: _Worker) -> None:
        # A reload request (SIGHUP) must not kill a worker that is starting: it is born
        # with SIGHUP blocked (the mask survives exec) until the CLI ignores the signal,
        # and unblocks it only then; its serve() handles it once it runs. The
        # supervisor's own SIGHUP waits meanwhile and is forwarded right after.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            worker_env = {WORKER_ENV: str(slot.worker_id), RESTARTED_ENV: str(slot.restarts)}
            proc = subprocess.Popen(argv, env={**env, **worker_env})
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        slot.proc, slot.started = proc, time.monotonic()
        workers[proc.pid] = slot
        if stopping:  # SIGTERM or SIGINT came while it started: it was not forwarded to it
            proc.send_signal(stop_signal or signal.SIGTERM)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping, stop_signal
        if signum != signal.SIGHUP:
            stopping = True  # a worker that exits now is not restarted
            stop_signal = signum
            waiting.clear()
        for slot in workers.values():
            if slot.proc.poll() is None:
                slot.proc.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        for worker_id in range(workers_wanted):
            start(_Worker(worker_id))
        log.info("workers_started", pids=list(workers), port=port, metrics_dir=metrics_dir)
        while workers or waiting:
            time.sleep(SUPERVISOR_POLL_S)
            for pid, slot in list(workers.items()):
                code = slot.proc.poll()
                if code is None:
                    continue
                del workers[pid]
                if metrics_dir is not None:
                    mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
                if stopping:
                    codes.append(code)
                    log.log(
                        logging.INFO if code == 0 else logging.ERROR,
                        "worker_exited",
                        pid=pid,
                        code=code,
                        left=len(workers),
                    )
                    continue
                failure = _start_failure(Path(config_dir), slot, code) if code else None
                if failure is not None:
                    log.error(
                        "worker_failed_to_start",
                        pid=pid,
                        code=code,
                        worker=slot.worker_id,
                        error=failure,
                    )
                    start_failure = failure
                    forward(signal.SIGTERM, None)
                    codes.append(code)
                    continue
                delay = slot.backoff(time.monotonic())
                log.error(
                    "worker_died",
                    pid=pid,
                    code=code,
                    worker=slot.worker_id,
                    restart_in_s=round(delay, 2),
                    restarts=slot.restarts,
                )
                waiting.append(slot)
            now = time.monotonic()
            for slot in [w for w in waiting if w.restart_at <= now]:
                waiting.remove(slot)
                old = slot.proc.pid
                start(slot)
                log.warning(
                    "worker_restarted",
                    pid=slot.proc.pid,
                    replaced=old,
                    worker=slot.worker_id,
                    restarts=slot.restarts,
                )
    finally:
        for slot in workers.values():  # only on an error in the loop above
            slot.proc.kill()
            slot.proc.wait()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        shutil.rmtree(config_dir, ignore_errors=True)
        if permits is not None:
            permits.close()
        if reserved is not None:
            reserved.close()
    if start_failure is not None:
        raise CliError(start_failure)  # the line one process prints; exit status 1
    failed = next((code for code in codes if code != 0), 0)
    return 128 - failed if failed < 0 else failed
