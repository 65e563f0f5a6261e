"""Helpers of the reliability suite: raw-socket clients, a proxy harness with short
timeouts, a scripted raw backend for faults the simulator has no knob for, and the leak
census (permits, connections, tasks, file descriptors) each test ends with."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Any

from sluice.proxy.errors import server_error_body
from sluice.proxy.http import ServerState
from sluice.proxy.metrics import Metrics
from sluice.proxy.observe import Observer
from sluice.proxy.server import HttpServer
from sluice.proxy.snapshot import Snapshot

from tests.fixtures import HandlerServer, LoopThread, ProxyHarness

# Statuses the proxy may answer, each with a defined meaning (README, OPERATIONS.md).
DEFINED = frozenset(
    {200, 400, 401, 403, 404, 405, 408, 411, 413, 414, 417, 422, 429, 431, 501, 502, 503}
    | {504, 505}
)
STATUS_RE = re.compile(rb"HTTP/1\.1 (\d{3}) ")


def statuses(data: bytes) -> list[int]:
    return [int(m) for m in STATUS_RE.findall(data)]


def exchange(port: int, raw: bytes, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Sends `raw` on a new connection and reads until the server closes or goes quiet
    (0.3 s after a complete-looking response). Returns (bytes, hung): hung is True when
    nothing at all came back within `timeout`."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s.settimeout(0.3 if data else max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                if data:
                    break
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        return data, not data


class TunedHarness(ProxyHarness):
    """ProxyHarness whose HTTP server has the given ServerState settings and whose
    finished exchanges also feed real Metrics (as `sluice serve` wires them)."""

    def __init__(self, snapshot: Snapshot, **state_kw: Any) -> None:
        self._state_kw = state_kw
        super().__init__(snapshot)

    def __post_init__(self) -> None:
        super().__post_init__()
        # Replace the server ProxyHarness started with one using our settings.
        self.lt.run(self.server.close())
        self.metrics = Metrics()
        self.observer = Observer(self.ref, self.metrics, access_log=False)
        self.app.on_complete.append(self.observer.on_complete)
        self.state = ServerState(
            self.app,
            lambda: self.ref.current.max_body_bytes,
            error_body=server_error_body,
            stream_body=self.app.wants_body_stream,
            **self._state_kw,
        )
        self.server = HttpServer(self.state)
        self.port = self.lt.run(self.server.listen("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.port}"

    def requests_by_status(self) -> dict[str, float]:
        out: dict[str, float] = {}
        self.metrics.flush()  # the counts since the last read (a scrape flushes the same way)
        for metric in self.metrics.requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    key = sample.labels["status"]
                    out[key] = out.get(key, 0) + sample.value
        return out


@dataclass
class Census:
    """What a test must leave as it found it."""

    permits: int
    upstream_busy: int
    client_connections: int
    tasks: int
    fds: int


def census(h: ProxyHarness) -> Census:
    def inner() -> tuple[int, int]:
        return len(h.server.state.connections), len(asyncio.all_tasks())

    conns, tasks = h.lt.call(inner)
    return Census(
        permits=h.permits_in_use(),
        upstream_busy=h.busy_upstream_connections(),
        client_connections=conns,
        tasks=tasks,
        fds=len(os.listdir("/proc/self/fd")),
    )


def assert_no_leaks(h: ProxyHarness, before: Census, timeout: float = 5.0) -> Census:
    """Waits (bounded) until permits, busy upstream connections, client connections and
    tasks are back to `before`, and file descriptors within a few (pooled idle upstream
    connections may stay open: they are reused, not leaked)."""
    deadline = time.monotonic() + timeout
    while True:
        now = census(h)
        ok = (
            now.permits == 0
            and now.upstream_busy == 0
            and now.client_connections <= before.client_connections
            and now.tasks <= before.tasks
            and now.fds <= before.fds + h.open_upstream_connections() + 2
        )
        if ok:
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"leak: before={before} after={now}")
        time.sleep(0.05)


class RawBackend:
    """A backend on loopback that answers every request with fixed bytes (then closes
    when `close` is set): for faults no simulator knob makes, like malformed SSE. A tuple
    of answers is written part by part."""

    def __init__(
        self,
        lt: LoopThread,
        answer: bytes | tuple[bytes, ...],
        *,
        close: bool = True,
        idle_close: float = 0.0,
    ) -> None:
        self.lt = lt
        self.answer = answer
        self.close_after = close
        self.idle_close = idle_close  # close a kept-alive connection after this idle time
        self.requests = 0

        async def start() -> asyncio.base_events.Server:
            return await asyncio.start_server(self._serve, "127.0.0.1", 0)

        self.server = lt.run(start())
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                if self.idle_close and self.requests:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle_close)
                else:
                    head = await reader.readuntil(b"\r\n\r\n")
                match = re.search(rb"(?i)content-length: *(\d+)", head)
                if match:
                    await reader.readexactly(int(match.group(1)))
                self.requests += 1
                # A tuple: its parts written 50 ms apart, so that each is a read of its own.
                parts = self.answer if isinstance(self.answer, tuple) else (self.answer,)
                for i, part in enumerate(parts):
                    if i:
                        await asyncio.sleep(0.05)
                    writer.write(part)
                    await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        self.lt.run(stop())


class RecordingServer(HandlerServer):
    """The HTTP server alone, on loopback: records each request its handler got and
    answers `ok:<path>:<body length>`. What the smuggling table and the raw fuzz talk to."""

    def __init__(self, max_body: int = 1024 * 1024, **state_kw: Any) -> None:
        self.handled: list[tuple[str, str, bytes]] = []

        async def handler(request: Any, response: Any) -> None:
            self.handled.append((request.method, request.path, request.body))
            response.send(
                200,
                [(b"content-type", b"text/plain")],
                b"ok:%s:%d" % (request.path.encode("latin-1"), len(request.body)),
            )

        kw: dict[str, Any] = {"request_timeout": 1.0, "keepalive_timeout": 2.0, **state_kw}
        super().__init__(handler, max_body, **kw)
        self.loop_errors = self.lt.record_errors()

    def open_connections(self) -> int:
        return int(self.lt.call(lambda: len(self.state.connections)))
