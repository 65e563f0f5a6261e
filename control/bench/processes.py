"""The processes `sluice bench --compare` runs: the simulator, nginx and sluice.

Each child gets its own session (a terminal's Ctrl-C reaches only bench, which stops them in
order) and dies with bench through PR_SET_PDEATHSIG; every wait is bounded. CPU time is
read from /proc for a process and all its descendants.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from sluice.control.errors import CliError

NGINX_PATHS = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
SIM_READY = re.compile(r"sluice sim listening on (http://\S+)")
SERVE_READY = re.compile(r"sluice serving on (http://\S+)")
_PR_SET_PDEATHSIG = 1

# `--policy`: what the stream-safety benchmark enforces. The stop strings also go out in
# every target's requests, so the backend holds back the same text whoever relays.
POLICY_STOP = ("###", "\n\nUser:", "\n\nHuman:", "<|im_end|>")
POLICY_CONFIG = """\
kind: Gateway
backends:
  - name: sim
    urls: ["http://127.0.0.1:9"]  # replaced by --backend
    max_concurrency: 4096
    queue: {{max: 4096, max_wait: 10s}}
routes:
  - {{model: {model}, backend: sim, upstream_model: {model}, policy: bench-guard}}
---
kind: Policy
name: bench-guard
stop: {stop}
cut_patterns:
  - {{pattern: "(?i)ignore (all )?(the )?previous instructions", max_len: 64}}
  - {{pattern: "BEGIN [A-Z ]*PRIVATE KEY", max_len: 40}}
timeouts: {{first_token: 30s, inter_token: 5s, total: 300s}}
"""


def write_policy_config(workdir: Path, model: str) -> Path:
    """`--policy`'s config (POLICY_CONFIG for `model`) in a folder of its own under
    `workdir`: the folder, for `sluice serve --config`."""
    policy_dir = workdir / "policy"
    policy_dir.mkdir()
    stop = json.dumps(list(POLICY_STOP))
    (policy_dir / "bench.yaml").write_text(POLICY_CONFIG.format(model=json.dumps(model), stop=stop))
    return policy_dir


def pdeathsig_setter() -> Callable[[], bool] | None:
    """A function that has the calling process SIGTERMed when its parent dies (even by
    SIGKILL); it returns whether the kernel took the request. None where prctl is
    unavailable (not Linux). prctl is looked up here, so that a pre-exec hook runs no
    dynamic loading between fork and exec.

    The kernel sends the signal when the *thread* that forked the process exits, not its
    process: fork from a thread that lives as long as the parent (its main thread)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_pdeathsig() -> bool:
        return bool(prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) == 0)

    return set_pdeathsig


class Child:
    """A target process; its output goes to files in the run's temp dir (a pipe nobody
    reads would stall it), and its readiness is read from there."""

    def __init__(self, name: str, argv: list[str], workdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.out_path = workdir / f"{name}.out"
        self.err_path = workdir / f"{name}.err"
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            # Own session: a terminal's Ctrl-C reaches only us, and we stop children in order.
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=pdeathsig_setter(),  # noqa: PLW1509 -- loads nothing after fork
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_line(self, pattern: re.Pattern[str], timeout: float = START_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = pattern.search(self.out_path.read_text(errors="replace"))
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise CliError(self._failure(f"did not print {pattern.pattern!r} within {timeout:g}s"))

    def wait_port(self, port: int, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                return
            time.sleep(0.02)
        raise CliError(self._failure(f"did not listen on 127.0.0.1:{port} within {timeout:g}s"))

    def _failure(self, what: str) -> str:
        code = self.proc.poll()
        state = "running" if code is None else f"exit status {code}"
        tail = self.err_path.read_text(errors="replace").strip().splitlines()[-3:]
        return f"{self.name} ({state}) {what}: {' | '.join(tail) or 'no output'}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        # The session holds nginx's workers too; anything left in it goes now.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(STOP_TIMEOUT)


_CPUCLOCK_SCHED = 2  # the kernel's process CPU clock: its runtime, as the scheduler counts it


def process_cpu_seconds(pid: int) -> float | None:
    """The CPU time (user + system, all threads, exited ones included) of process `pid`,
    to the nanosecond: its CPU-time clock, the clock id Linux's clock_getcpuclockid(3)
    makes for a process. None when it cannot be read (the process is gone).

    /proc's utime and stime count clock ticks (10 ms): a relay spends ~0.3 s of CPU in a
    2-token round, so they measured it to +-3%, and nginx's ~0.16 s to +-6%."""
    try:
        return time.clock_gettime((~pid << 3) | _CPUCLOCK_SCHED)
    except OSError:
        return None


def tree_cpu_seconds(root: int) -> float:
    """The CPU time of `root` and all its descendants (process_cpu_seconds, or /proc's
    utime + stime where that cannot be read), and of their children already reaped."""
    parents: dict[int, int] = {}
    ticks: dict[int, tuple[int, int]] = {}  # pid: (utime + stime, cutime + cstime)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited while we looked
        # Fields after "(comm)": state ppid ... utime(14) stime(15) cutime(16) cstime(17).
        fields = stat[stat.rfind(b")") + 2 :].split()
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        ticks[pid] = (int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]))
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    frontier = [root]
    seen: set[int] = set()
    while frontier:
        pid = frontier.pop()
        if pid in seen or pid not in ticks:
            continue
        seen.add(pid)
        own, reaped = ticks[pid]
        precise = process_cpu_seconds(pid)
        total += (own / tick if precise is None else precise) + reaped / tick
        frontier.extend(child for child, parent in parents.items() if parent == pid)
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_nginx() -> str:
    for path in (shutil.which("nginx"), *NGINX_PATHS):
        if path and os.access(path, os.X_OK):
            return path
    raise CliError("nginx is not installed (needed by --compare): apt-get install nginx")


def nginx_version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False)
    return (out.stderr or out.stdout).strip().rpartition("/")[2] or "unknown"


def render_nginx_conf(workdir: Path, listen_port: int, backend: str) -> str:
    """One worker (sluice serves from one process too), an access log like sluice's, and
    nothing between the stream and the client: no buffering, cache or gzip."""
    upstream = backend.removeprefix("http://").rstrip("/")
    temp = "\n".join(
        f"  {kind}_temp_path {workdir}/nginx-{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log {workdir}/nginx-access.log;
{temp}
  upstream backend {{
    server {upstream};
    keepalive 1024;
  }}
  server {{
    listen 127.0.0.1:{listen_port} backlog=4096;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_cache off;
      gzip off;
      proxy_read_timeout 300s;
    }}
  }}
}}
"""


def sluice_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "sluice.control.cli", *args]


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    pid: int | None  # the relay's process (tree) whose CPU is counted; None: no relay


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every `finally` that stops a child runs.

    It is passed on as SIGINT rather than raised here: inside the event loop asyncio.Runner
    turns SIGINT into a cancellation of the run, while an exception raised in a signal
    handler could land in a protocol callback, where the loop would swallow it."""
    # Here, not at the top: every `sluice serve` worker imports this module (for
    # pdeathsig_setter), and the load generator brings the simulator's modules (~75 ms).
    from . import loadgen  # noqa: PLC0415

    def interrupt(signum: int, frame: FrameType | None) -> None:
        loadgen.interrupted.set()  # and no load goes on if the cancellation is lost
        signal.raise_signal(signal.SIGINT)

    loadgen.interrupted.clear()
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def start_targets(
    args: argparse.Namespace, workdir: Path
) -> Iterator[tuple[list[Target], int | None]]:
    """direct, nginx and sluice, started and ready; the simulator's pid (None with --url)."""
    nginx = find_nginx()
    children: list[Child] = []
    try:
        sim_pid: int | None = None
        if args.url:
            backend = args.url.rstrip("/")
        else:
            sim = Child(
                "sim",
                sluice_argv(
                    "sim",
                    *("--host", "127.0.0.1", "--port", "0", "--model", args.model),
                    *("--ttft-ms", f"{args.ttft_ms:g}", "--itl-ms", f"{args.itl_ms:g}"),
                ),
                workdir,
            )
            children.append(sim)
            backend = sim.wait_line(SIM_READY)
            sim_pid = sim.pid
        port = free_port()
        conf = workdir / "nginx.conf"
        conf.write_text(render_nginx_conf(workdir, port, backend))
        error_log = str(workdir / "nginx-error.log")  # -e: not the packaged /var/log path
        proxy = Child(
            "nginx", [nginx, "-p", str(workdir), "-e", error_log, "-c", str(conf)], workdir
        )
        children.append(proxy)
        serve_argv = ["serve", "--host", "127.0.0.1", "--port", "0", "--backend", backend]
        if args.config:
            serve_argv += ["--config", str(Path(args.config).resolve())]
        elif args.policy:
            serve_argv += ["--config", str(write_policy_config(workdir, args.model))]
        sluice = Child("sluice", sluice_argv(*serve_argv), workdir)
        children.append(sluice)
        proxy.wait_port(port)
        sluice_url = sluice.wait_line(SERVE_READY)
        yield (
            [
                Target("direct", backend, None),
                Target("nginx", f"http://127.0.0.1:{port}", proxy.pid),
                Target("sluice", sluice_url, sluice.pid),
            ],
            sim_pid,
        )
    finally:
        for child in reversed(children):
            child.stop()
