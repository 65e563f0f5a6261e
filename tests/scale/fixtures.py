"""Helpers of the scale tests: real redis-server and PostgreSQL servers on free loopback
ports in temporary directories, `sluice serve` processes with a given limit, and bursts
of concurrent streams counted by status.

Imported as tests.scale.fixtures.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.fixtures import ProcessServer, StreamResult, free_port, sluice_cmd, stream_request

ADMIN_TOKEN = "adm-scale-3c7e91d0a2"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
BOUNDED_S = 15.0


def redis_binary() -> str:
    found = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(found):
        raise RuntimeError("redis-server is missing: run `make scale-deps` (apt-get, root)")
    return found


class RedisServer:
    """A real redis-server on a free loopback port, data in `directory`, no persistence."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [
            redis_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + BOUNDED_S
        while not self.ping():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def ping(self) -> bool:
        try:
            return self.command("PING") == "+PONG"
        except OSError:
            return False

    def command(self, *words: str) -> str:
        """One inline command; the first line of the reply (enough for PING, ZCARD...)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as conn:
            conn.sendall((" ".join(words) + "\r\n").encode())
            return conn.makefile("rb").readline().decode().strip()

    def script_calls(self) -> int:
        """Lua script calls run so far (every take, give back and renewal is one)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as conn:
            conn.sendall(b"INFO commandstats\r\n")
            reply = conn.makefile("rb")
            size = int(reply.readline().decode().strip().lstrip("$"))
            text = reply.read(size + 2).decode()
        calls = re.findall(r"^cmdstat_evalsha?:calls=(\d+)", text, re.M)
        return sum(int(c) for c in calls)

    def zcard(self, key: str) -> int:
        return int(self.command("ZCARD", key).lstrip(":"))

    def live(self, key: str) -> int:
        """Members of a lease set whose lease has not run out (same host: same clock)."""
        now_ms = int(time.time() * 1000)
        return int(self.command("ZCOUNT", key, str(now_ms), "+inf").lstrip(":"))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def held_key(limiter: str) -> str:
    return "sluice:limit:{" + limiter + "}:held"


def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is missing: run `make scale-deps` (apt-get, root)")
    return Path(found[-1]).parent


class PostgresServer:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl) on a free loopback port; trust
    authentication on loopback only, its socket in its own directory. PostgreSQL refuses
    to run as root: then it runs as the `postgres` user (Debian's package creates it) in
    a directory of its own under /tmp (pytest's are private to root)."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        self.root = Path(tempfile.mkdtemp(prefix="sluice-pg-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            user = "postgres"
            try:
                entry = pwd.getpwnam(user)
            except KeyError:
                user, entry = "nobody", pwd.getpwnam("nobody")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self.as_user = ["runuser", "-u", user, "--"]
        self.data = self.root / "data"
        self.port = free_port()
        self._run("initdb", "-D", str(self.data), "-U", "sluice", "-A", "trust", "--no-sync")
        self._start()
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "sluice", "records")

    def _start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", opts, "-w", "-t", "30",
            "-l", str(self.root / "pg.log"), "start",
        )  # fmt: skip

    def restart(self) -> None:
        """Stopped (every connection closed by the server) and started again."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        self._start()

    def _run(self, program: str, *args: str, check: bool = True) -> None:
        argv = [*self.as_user, str(self.bin / program), *args]
        result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{program} failed: {result.stderr.strip()[-500:]}")

    @property
    def url(self) -> str:
        return f"postgresql://sluice@127.0.0.1:{self.port}/records"

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)


GATEWAY = """\
kind: Gateway
admin: {{token: env:SLUICE_ADMIN_TOKEN}}
{limits}
backends:
  - name: sim
    urls: ["{sim_url}"]
    max_concurrency: {limit}
    queue: {{max: {queue_max}, max_wait: {queue_wait}}}
routes:
  - {{model: chat, backend: sim, upstream_model: sim-model}}
{extra}"""


def write_gateway(
    directory: Path,
    sim_url: str,
    *,
    limit: int,
    queue_max: int = 1,
    queue_wait: str = "300ms",
    store: str | None = None,
    lease: str = "2s",
    keep_idle: str = "100ms",
    extra: str = "",
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    # A generous store timeout: on a loaded 2-core machine a loopback call can take 0.5 s,
    # and the tests that mean to take Redis away kill it (refused at once).
    limits = (
        f"limits: {{store: {store}, lease: {lease}, store_timeout: 3s, keep_idle: {keep_idle}}}"
        if store
        else ""
    )
    (directory / "gateway.yaml").write_text(
        GATEWAY.format(
            limits=limits,
            sim_url=sim_url,
            limit=limit,
            queue_max=queue_max,
            queue_wait=queue_wait,
            extra=extra,
        ),
        encoding="utf-8",
    )
    return directory


def start_sluice(config: Path, *args: str, env: dict[str, str] | None = None) -> ProcessServer:
    return ProcessServer(
        sluice_cmd("serve", "--config", str(config), "--host", "127.0.0.1", "--port", "0", *args),
        env={"SLUICE_ADMIN_TOKEN": ADMIN_TOKEN, **(env or {})},
        timeout=30,
    )


def chat(max_tokens: int) -> dict[str, Any]:
    return {
        "model": "chat",
        "stream": True,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Say something."}],
    }


def burst(urls: list[str], n: int, max_tokens: int, timeout: float = 60.0) -> list[StreamResult]:
    """n concurrent streams, spread round-robin over `urls`; every result, in order."""
    with ThreadPoolExecutor(n) as pool:
        futures = [
            pool.submit(stream_request, urls[i % len(urls)], chat(max_tokens), timeout=timeout)
            for i in range(n)
        ]
        return [f.result(timeout=timeout + 5) for f in futures]


def statuses(results: list[StreamResult]) -> Counter[int]:
    return Counter(r.status for r in results)


def worker_pids(server: ProcessServer, workers: int) -> set[int]:
    """Polls /admin/status on fresh connections until every worker answered."""
    seen: set[int] = set()
    deadline = time.monotonic() + BOUNDED_S
    while len(seen) < workers:
        if time.monotonic() > deadline:
            raise AssertionError(f"only workers {seen} answered")
        try:
            reply = httpx.get(server.url + "/admin/status", headers=ADMIN, timeout=5)
        except httpx.ConnectError:  # a worker still starting; the port is briefly closed
            time.sleep(0.05)
            continue
        seen.add(reply.json()["pid"])
    return seen


def wait_until(
    what: str, check: Callable[[], bool], timeout: float = BOUNDED_S, step: float = 0.05
) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)
    return time.monotonic() - start


def stream(url: str, max_tokens: int, timeout: float = 60.0) -> StreamResult | None:
    """One stream; None when the connection broke (its server was killed)."""
    try:
        return stream_request(url, chat(max_tokens), timeout=timeout)
    except httpx.HTTPError:
        return None
