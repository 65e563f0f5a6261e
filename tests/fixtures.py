"""Test helpers: real servers on loopback (subprocesses or a proxy on its own loop thread),
and small raw clients that show exactly what arrived and when."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvloop
from sluice.proxy.app import ProxyApp
from sluice.proxy.errors import server_error_body
from sluice.proxy.http import Handler, ServerState
from sluice.proxy.server import HttpServer
from sluice.proxy.snapshot import Backend, QueueLimits, Route, Snapshot, SnapshotRef

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
LISTEN_RE = re.compile(r"(?:listening|serving) on (http://[0-9.:\[\]a-z]+)")


def key_line(key: str) -> str:
    """How a Gateway document holds an API key: its SHA-256 digest."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def sluice_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sluice.control.cli", *args]


class ProcessServer:
    """A real server process; `url` is read from its 'listening on' / 'serving on' line."""

    def __init__(
        self,
        argv: list[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = 30.0,  # only a failure waits this long; a loaded machine starts slowly
    ) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        self.stderr_lines: list[str] = []
        self.stdout_lines: list[str] = []
        self.url = self._wait_for_url(timeout)
        self._drains = [
            threading.Thread(target=self._drain, args=(stream, sink), daemon=True)
            for stream, sink in (
                (self.proc.stderr, self.stderr_lines),
                (self.proc.stdout, self.stdout_lines),
            )
        ]
        for thread in self._drains:
            thread.start()

    def _wait_for_url(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        result: list[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.stdout_lines.append(line)
                match = LISTEN_RE.search(line)
                if match:
                    result.append(match.group(1))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout=max(0.0, deadline - time.monotonic()))
        if not result:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=5)
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()
            raise RuntimeError(f"{self.argv} did not start: {err[-2000:]}")
        return result[0]

    @staticmethod
    def _drain(stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            for t in self._drains:
                t.join(timeout=5)
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()

    def json_logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stderr_lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out


def start_sim(*args: str) -> ProcessServer:
    return ProcessServer(sluice_cmd("sim", "--port", "0", *args))


class SimClient:
    """The simulator's test endpoints."""

    def __init__(self, url: str) -> None:
        self.url = url

    def stats(self) -> dict[str, Any]:
        return httpx.get(self.url + "/sim/stats", timeout=5).json()

    def requests(self) -> list[dict[str, Any]]:
        return httpx.get(self.url + "/sim/requests", timeout=5).json()

    def reset(self) -> None:
        httpx.post(self.url + "/sim/reset", timeout=5)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 2.0) -> float:
        """Polls /sim/stats until predicate holds; returns the seconds it took."""
        start = time.monotonic()
        while True:
            if predicate(self.stats()):
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise AssertionError(f"sim stats never matched: {self.stats()}")
            time.sleep(0.02)


class LoopThread:
    """An event loop (uvloop) on a thread, for servers the test inspects directly."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def call(self, fn: Callable[[], Any]) -> Any:
        async def wrapper() -> Any:
            return fn()

        return self.run(wrapper())

    def record_errors(self) -> list[str]:
        """What reaches the loop's exception handler from now on, instead of the log: an
        exception out of a protocol callback closes its connection unanswered ("Fatal
        error on transport"), which a test asserts never happens."""
        errors: list[str] = []
        self.loop.set_exception_handler(
            lambda _loop, context: errors.append(
                f"{context.get('message')}: {context.get('exception')!r}"
            )
        )
        return errors

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


class HandlerServer:
    """The HTTP server alone, with `handler`, on a LoopThread and a free loopback port:
    what tests of the server itself send raw HTTP to and look inside."""

    def __init__(self, handler: Handler, max_body: int = 1024, **state_kw: Any) -> None:
        self.lt = LoopThread()
        self.state = ServerState(
            handler, lambda: max_body, error_body=server_error_body, **state_kw
        )
        self.server = HttpServer(self.state)
        self.port: int = self.lt.run(self.server.listen("127.0.0.1", 0))

    def close(self) -> None:
        self.lt.run(self.server.close())
        self.lt.stop()


@dataclass
class ProxyHarness:
    """The proxy's data plane on a loop thread, with a snapshot the test controls."""

    snapshot: Snapshot
    lt: LoopThread = field(default_factory=LoopThread)

    def __post_init__(self) -> None:
        self.ref = SnapshotRef(self.snapshot)
        self.finished: list[Any] = []
        self._finished_changed = threading.Condition()
        self.app = ProxyApp(self.ref, on_complete=[self._record_finished])
        self.server = HttpServer(
            ServerState(
                self.app,
                self.app.max_body_bytes,
                error_body=server_error_body,
                stream_body=self.app.wants_body_stream,
            )
        )
        self.port = self.lt.run(self.server.listen("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.port}"

    def _record_finished(self, exchange: Any) -> None:
        with self._finished_changed:
            self.finished.append(exchange)
            self._finished_changed.notify_all()

    def wait_finished(self, count: int, timeout: float = 10.0) -> list[Any]:
        """The finished exchanges once there are at least `count`. The completion hook runs
        after the response's last byte went out, so a client can have read a whole response
        before its exchange is recorded: wait for it, never read `finished` straight away."""
        with self._finished_changed:
            if not self._finished_changed.wait_for(lambda: len(self.finished) >= count, timeout):
                raise AssertionError(f"{len(self.finished)} exchanges finished, not {count}")
            return list(self.finished)

    def swap(self, snapshot: Snapshot) -> None:
        self.lt.call(lambda: self.app.swap(snapshot))

    def open_upstream_connections(self) -> int:
        return int(self.lt.call(self.app.pools.open_connections))

    def busy_upstream_connections(self) -> int:
        def busy() -> int:
            return sum(len(r.pool.open) - len(r.pool.idle) for r in self.app.pools.all())

        return int(self.lt.call(busy))

    def wait_upstream_idle(self, timeout: float = 5.0) -> None:
        """Until no pooled upstream connection is busy. One goes back to the pool when the
        backend's chunked terminator has arrived, which can be after the client read the
        end of its response and after the exchange was recorded: there is no event to wait
        on, so the state is polled, up to `timeout`."""
        deadline = time.monotonic() + timeout
        while (busy := self.busy_upstream_connections()) > 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"{busy} upstream connections still busy after {timeout} s")
            time.sleep(0.01)

    def permits_in_use(self) -> int:
        return int(
            self.lt.call(lambda: sum(lim.in_use + lim.queued for lim in self.app.limiters.all()))
        )

    def close(self) -> None:
        self.lt.run(self.server.close())
        self.lt.call(self.app.pools.close)
        self.lt.stop()


def passthrough_snapshot(backend_url: str, **backend_kw: Any) -> Snapshot:
    backend = Backend(name="sim", urls=(backend_url,), **backend_kw)
    route = Route(model="*", backend=backend, upstream_model=None)
    return Snapshot(version="test-1", routes={}, backends={"sim": backend}, fallback_route=route)


def routed_snapshot(
    backend_url: str, models: dict[str, dict[str, Any]], version: str = "test-1", **snap_kw: Any
) -> Snapshot:
    backend = snap_kw.pop("backend", None) or Backend(
        name="sim", urls=(backend_url,), queue=QueueLimits()
    )
    routes = {
        name: Route(
            model=name, backend=backend, upstream_model=kw.pop("upstream_model", "sim-model"), **kw
        )
        for name, kw in models.items()
    }
    return Snapshot(version=version, routes=routes, backends={"sim": backend}, **snap_kw)


# -- raw streaming client -----------------------------------------------------------------


@dataclass
class StreamResult:
    status: int
    headers: dict[str, str]
    events: list[tuple[float, bytes]]  # (seconds since request sent, raw event)
    body: bytes

    def data(self) -> list[Any]:
        out: list[Any] = []
        for _, event in self.events:
            if event.startswith(b"data: "):
                payload = event[6:]
                out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
        return out

    def text(self) -> str:
        parts = []
        for obj in self.data():
            if isinstance(obj, dict):
                for choice in obj.get("choices") or []:
                    parts.append(
                        (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                    )
        return "".join(parts)

    def content_times(self) -> list[float]:
        times = []
        for t, event in self.events:
            if event.startswith(b"data: {"):
                obj = json.loads(event[6:])
                for choice in obj.get("choices") or []:
                    if (choice.get("delta") or {}).get("content") or choice.get("text"):
                        times.append(t)
                        break
        return times


def stream_request(
    url: str,
    body: dict[str, Any],
    *,
    path: str = "/v1/chat/completions",
    headers: Mapping[str, str] | None = None,
    stop_after_events: int | None = None,
    timeout: float = 30.0,
) -> StreamResult:
    """POSTs with httpx streaming and records each SSE event with its arrival time."""
    events: list[tuple[float, bytes]] = []
    with httpx.Client(timeout=timeout) as client:
        start = time.monotonic()
        with client.stream("POST", url + path, json=body, headers=dict(headers or {})) as resp:
            if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                raw = resp.read()
                return StreamResult(resp.status_code, dict(resp.headers), [], raw)
            buffer = b""
            for chunk in resp.iter_raw():
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    events.append((time.monotonic() - start, event))
                if stop_after_events is not None and len(events) >= stop_after_events:
                    break
            return StreamResult(resp.status_code, dict(resp.headers), events, b"")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def send_until_answered(sock: socket.socket, filler: bytes, limit: int) -> tuple[bytes, int]:
    """Sends `filler` until the server answers or closes, `limit` bytes at most (what a
    client that never ends a header or trailer does); returns the first bytes of the
    answer and how many bytes went out. The caller reads the rest of the answer."""
    sock.settimeout(0.05)
    sent = 0
    answer = b""
    while sent < limit and not answer:
        try:
            sock.sendall(filler)
            sent += len(filler)
            answer = sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
    return answer, sent
