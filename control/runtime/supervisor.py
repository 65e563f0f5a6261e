"""The `--workers N` supervisor: N `sluice serve` processes sharing one port.

The workers bind the same port through SO_REUSEPORT; each loads and watches the config
itself (the `x-sluice-config` header shows that they agree). The supervisor only starts
them, forwards signals and reports how they exited.
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

import structlog
from prometheus_client.multiprocess import mark_process_dead
from sluice.proxy.metrics import MULTIPROC_ENV

WORKER_ENV = "SLUICE_WORKER_ID"
SUPERVISOR_POLL_S = 0.1


def supervise(workers_wanted: int, host: str, port: int, *, metrics: bool) -> int:
    """Starts the workers, forwards SIGTERM/SIGINT/SIGHUP, exits when they all have.

    Metrics: the workers share a fresh PROMETHEUS_MULTIPROC_DIR (set in their environment,
    so before they import prometheus_client); a worker that exits is marked dead there at
    once, so its live gauges drop out of the sums; the directory goes when all have exited.
    Exit status: 0 when every worker exited 0, else the first failure's (128+N: signal N).
    """
    log = structlog.get_logger("sluice")
    reserved: socket.socket | None = None
    if port == 0:
        # Workers must share one port: pick it here, and keep it bound (not listening) until
        # they exit, so that the host hands it to nothing else while they start; they join
        # it through SO_REUSEPORT. A bound socket that does not listen gets no connections.
        reserved = socket.socket()
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind((host, 0))
        port = reserved.getsockname()[1]
    argv = [sys.executable, "-m", "sluice.control.cli", *sys.argv[1:]]
    argv = [a for a in argv if a != "--demo"]
    argv += ["--port", str(port)]
    env = dict(os.environ)
    metrics_dir = None
    if metrics:
        metrics_dir = tempfile.mkdtemp(prefix="sluice-metrics-")
        env[MULTIPROC_ENV] = metrics_dir
    workers: dict[int, subprocess.Popen[bytes]] = {}
    codes: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        for proc in workers.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    # A reload request (SIGHUP) while a worker still starts must not kill it: an ignored
    # signal stays ignored across exec until the worker's serve() handles SIGHUP itself,
    # and a starting worker loads the current config anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        for worker_id in range(workers_wanted):
            proc = subprocess.Popen(argv, env={**env, WORKER_ENV: str(worker_id)})
            workers[proc.pid] = proc
        signal.signal(signal.SIGHUP, forward)
        log.info("workers_started", pids=list(workers), port=port, metrics_dir=metrics_dir)
        while workers:
            time.sleep(SUPERVISOR_POLL_S)
            for pid, proc in list(workers.items()):
                code = proc.poll()
                if code is None:
                    continue
                del workers[pid]
                codes.append(code)
                if metrics_dir is not None:
                    mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
                log.log(
                    logging.INFO if code == 0 else logging.ERROR,
                    "worker_exited",
                    pid=pid,
                    code=code,
                    left=len(workers),
                )
    finally:
        for proc in workers.values():  # only on an error in the loop above
            proc.kill()
            proc.wait()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        if reserved is not None:
            reserved.close()
    failed = next((code for code in codes if code != 0), 0)
    return 128 - failed if failed < 0 else failed
