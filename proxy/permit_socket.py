"""Permits shared by the workers of one host: the supervisor runs the limiters, workers
take and give back permits over a unix socket.

`PermitServer` runs in the supervisor (its own thread and event loop) with ordinary
`Limiter`s, so `--workers N` keeps exactly what one process guarantees: the configured
number in flight, one FIFO queue, bounded in length and in time. A worker keeps one
connection and sends one line to take a permit and one to give it back. When a worker
dies, the kernel closes its socket and the server gives back every permit it held and
drops its queued requests at once: no lease to wait for.

Lines (ASCII, space-separated; names never contain spaces):
  worker -> server  `A <id> <max_concurrency> <queue_max> <queue_max_wait> <set_at> <wait>
                    <name>`: take a permit, waiting `wait` seconds at most (what is left
                    of the request's max_wait); `R <id>`: give it back, or leave the queue
  server -> worker  `G <id> <waited>`: granted;  `X <id> <reason> <queued>`: refused
Each request carries its worker's numbers for the limiter and when that worker set them
(`set_at`, the host's monotonic clock: at start-up or at the reload that changed them).
The server applies numbers set later than those it has, so a reload reaches the shared
limiter at the first request of a worker that has reloaded, and a worker that has not yet
cannot set the old numbers back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Final

import structlog

from .clock import monotonic
from .limit_store import STORE_GRACE, StoreDown, StoreLimiter
from .limits import Limiter, LimiterRegistry, LimitExceeded, Permit
from .snapshot import QueueLimits

PERMIT_SOCKET_ENV: Final = "SLUICE_PERMIT_SOCKET"
RECONNECT_INTERVAL: Final = 1.0
MAX_LINE: Final = 1024

_log = structlog.get_logger("sluice.limits")


class PermitServer:
    """The supervisor side: limiters by name, one task per waiting request."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.registry = LimiterRegistry()
        self._set_at: dict[str, float] = {}  # by limiter: `set_at` of its numbers
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, self.path, limit=MAX_LINE)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def limiter(self, name: str) -> Limiter | None:
        for lim in self.registry.all():
            if lim.name == name:
                assert isinstance(lim, Limiter)
                return lim
        return None

    def _limiter(self, name: str, max_concurrency: int, fields: list[str]) -> Limiter:
        """The limiter `name`, with the numbers of the request if they were set later than
        its own (`fields`: queue_max, queue_max_wait, set_at)."""
        queue = QueueLimits(max_len=int(fields[0]), max_wait=float(fields[1]))
        set_at = float(fields[2])
        limiter = self.registry.get(name, max_concurrency, queue)
        assert isinstance(limiter, Limiter)
        if set_at > self._set_at.get(name, -math.inf):
            self._set_at[name] = set_at
            if limiter.max_concurrency != max_concurrency or limiter.queue != queue:
                limiter.configure(max_concurrency, queue)
        return limiter

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held: dict[str, Permit] = {}
        waiting: dict[str, asyncio.Task[None]] = {}

        async def take(rid: str, limiter: Limiter, deadline: float) -> None:
            try:
                waited = await limiter.take(deadline)
            except LimitExceeded as exc:
                writer.write(f"X {rid} {exc.reason} {limiter.queued}\n".encode())
                return
            finally:
                waiting.pop(rid, None)
            held[rid] = Permit(limiter.release, waited)
            writer.write(f"G {rid} {waited:.6f}\n".encode())

        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                parts = line.decode("ascii", "replace").split()
                if len(parts) == 8 and parts[0] == "A":
                    rid, name = parts[1], parts[7]
                    limiter = self._limiter(name, int(parts[2]), parts[3:6])
                    deadline = monotonic() + float(parts[6])  # what is left of its wait
                    waiting[rid] = asyncio.create_task(take(rid, limiter, deadline))
                elif len(parts) == 2 and parts[0] == "R":
                    permit = held.pop(parts[1], None)
                    if permit is not None:
                        permit.release()
                    else:
                        task = waiting.pop(parts[1], None)
                        if task is not None:
                            task.cancel()  # Limiter passes on a permit granted meanwhile
                # Anything else is a bug in the client; it is ignored rather than trusted.
        except (ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            # The worker is gone (exit, crash, SIGKILL): its queue places and permits go.
            for task in list(waiting.values()):
                task.cancel()
            for permit in held.values():
                permit.release()
            held.clear()
            writer.close()


class SocketPermitStore:
    """The worker side: one connection to the supervisor's permit server."""

    def __init__(self, path: str, workers: int) -> None:
        self.path = path
        self.workers = max(1, workers)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[str, asyncio.Future[tuple[bool, str, str]]] = {}
        self._ids = itertools.count()
        self._generation = 0
        self._task: asyncio.Task[None] | None = None
        self._was_up: bool | None = None
        self.on_change: list[Callable[[bool], None]] = []

    @property
    def up(self) -> bool:
        return self._writer is not None

    def share(self, max_concurrency: int) -> int:
        return max(1, max_concurrency // self.workers)

    async def start(self) -> None:
        """Connects (falling back to the local share if that fails) and keeps reconnecting."""
        await self._connect()
        self._task = asyncio.get_running_loop().create_task(self._keep_connected())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def _connect(self) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(self.path, limit=MAX_LINE)
        except OSError as exc:
            self._state(False, str(exc))
            return
        self._reader, self._writer = reader, writer
        self._generation += 1
        self._state(True, "")

    async def _keep_connected(self) -> None:
        while True:
            reader, self._reader = self._reader, None
            if reader is None:
                await asyncio.sleep(RECONNECT_INTERVAL)
                await self._connect()
                continue
            await self._read(reader)
            self._lost()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                parts = line.decode("ascii", "replace").split()
                if len(parts) >= 3:
                    future = self._pending.pop(parts[1], None)
                    if future is not None and not future.done():
                        extra = parts[3] if len(parts) > 3 else "0"
                        future.set_result((parts[0] == "G", parts[2], extra))
        except (ConnectionError, ValueError, asyncio.LimitOverrunError):
            return

    def _lost(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = None
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(StoreDown("permit server connection lost"))
        self._state(False, "connection lost")

    def _state(self, up: bool, why: str) -> None:
        if up == self._was_up:
            return
        first = self._was_up is None
        self._was_up = up
        if up and not first:
            _log.info("limit_store_up", store="supervisor")
        elif not up:
            _log.warning("limit_store_down", store="supervisor", error=why, fallback="share")
        for callback in self.on_change:
            callback(up)

    async def take(self, limiter: StoreLimiter) -> tuple[Hashable, float]:
        writer = self._writer
        if writer is None:
            raise StoreDown("not connected")
        rid = str(next(self._ids))
        future: asyncio.Future[tuple[bool, str, str]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        queue = limiter.queue
        wait = limiter.wait_left()  # it may have waited for the local share first
        writer.write(
            f"A {rid} {limiter.max_concurrency} {queue.max_len} {queue.max_wait} "
            f"{limiter.configured_at!r} {wait!r} {limiter.name}\n".encode()
        )
        generation = self._generation
        try:
            granted, first, second = await asyncio.wait_for(
                asyncio.shield(future), wait + STORE_GRACE
            )
        except TimeoutError:
            self._pending.pop(rid, None)
            self._send(generation, f"R {rid}\n")
            raise StoreDown("permit server did not answer in time") from None
        except asyncio.CancelledError:
            self._pending.pop(rid, None)
            self._send(generation, f"R {rid}\n")
            raise
        if not granted:
            raise LimitExceeded(limiter.name, first, limiter.retry_after_with(int(second)))
        return (generation, rid), float(first)

    def adopt(self, limiter: StoreLimiter) -> Hashable:
        # The server counts this worker's permits by its connection; one taken while the
        # connection was down is this worker's own until it is given back.
        return None

    def give_back(self, limiter: StoreLimiter, handle: Hashable) -> None:
        if handle is None:
            return
        assert isinstance(handle, tuple)
        generation, rid = handle
        self._send(int(generation), f"R {rid}\n")

    def _send(self, generation: int, line: str) -> None:
        # A permit from an earlier connection went back when that connection closed.
        if self._writer is not None and generation == self._generation:
            self._writer.write(line.encode())


__all__ = ["PERMIT_SOCKET_ENV", "PermitServer", "SocketPermitStore"]
