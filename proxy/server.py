"""Listening sockets, the connections they accept, and the sweep that expires idle and
slow connections (one periodic check for all of them instead of timers per request)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from typing import Any, cast

from .clock import monotonic
from .http import HttpConnection, ServerState


class HttpServer:
    """Listening sockets plus the connections they accepted."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._servers: list[asyncio.base_events.Server] = []
        self._sweeper: asyncio.TimerHandle | None = None
        # Timeouts fire within one sweep interval after they end.
        self.sweep_interval = min(1.0, state.keepalive_timeout / 4, state.request_timeout / 4)

    async def listen(
        self, host: str, port: int, *, reuse_port: bool = False, sock: socket.socket | None = None
    ) -> int:
        """Starts listening; returns the bound port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            server = await loop.create_server(
                lambda: HttpConnection(self.state), sock=sock, backlog=2048
            )
        else:
            server = await loop.create_server(
                lambda: HttpConnection(self.state),
                host=host,
                port=port,
                reuse_port=reuse_port or None,
                backlog=2048,
            )
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.sweep_interval, self._sweep)
        sockets: Sequence[socket.socket] = cast(Any, server).sockets  # uvloop's is a list
        return int(sockets[0].getsockname()[1]) if sockets else port

    def _sweep(self) -> None:
        now = monotonic()
        for conn in list(self.state.connections):
            conn.expire_if_due(now)
        self._sweeper = asyncio.get_running_loop().call_later(self.sweep_interval, self._sweep)

    def stop_accepting(self) -> None:
        """Closes the listeners and idle keep-alive connections; in-flight ones finish."""
        self.state.closing = True
        for server in self._servers:
            server.close()
        for conn in list(self.state.connections):
            if conn.idle:
                conn.close()

    @property
    def active_connections(self) -> int:
        return sum(1 for conn in self.state.connections if not conn.idle)

    async def close(self) -> None:
        """Closes everything; running handlers are cancelled and awaited."""
        self.stop_accepting()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        # The running handlers, and the workers of idle connections (waiting for a next
        # request: their connection's loss ends them, a loop pass later).
        tasks = [
            task for c in self.state.connections for task in {c.task, c.worker} if task is not None
        ]
        for conn in list(self.state.connections):
            conn.close()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
