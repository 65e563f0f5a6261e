"""The backends' keep-alive connections, pooled per origin: reuse (LIFO, none idle too
long), the request's head, the wait for a response's last bytes before a connection goes
back, and `open_exchange`, which sends a request with the one resend a keep-alive race
allows. The connection itself is upstream.py.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Final
from urllib.parse import urlsplit

from .clock import monotonic
from .deadlines import Deadlines
from .headjoin import join_head
from .upstream import UpstreamConnection, UpstreamError

MAX_IDLE_PER_ORIGIN: Final = 512
# A pooled connection idle this long is not reused: vLLM's server (uvicorn) closes idle
# keep-alive connections after 5 s, and a connection picked in the instant the backend
# closes it fails. Below the backend's own idle timeout, sluice never races it.
DEFAULT_IDLE_TIMEOUT: Final = 4.0


class Origin:
    """scheme://host:port of one backend replica."""

    __slots__ = ("host", "host_header", "port", "scheme", "url")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"backend URL must be http(s)://host[:port], got {url!r}")
        self.url = url.rstrip("/")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        default_port = 443 if parts.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if self.port == default_port else f"{host}:{self.port}").encode()


class UpstreamPool:
    """Idle keep-alive connections to one origin, reused LIFO (warmest socket first), none
    older than `idle_timeout` seconds."""

    def __init__(
        self, origin: Origin, connect_timeout: float, idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    ) -> None:
        self.origin = origin
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.retries = 0  # requests resent after a reused connection closed (keep-alive race)
        self.retired = False  # its backend left the config: connections are not pooled
        self.idle: list[UpstreamConnection] = []
        self.open: set[UpstreamConnection] = set()
        self.outstanding = 0  # requests in flight; least-outstanding balancing reads it
        self._ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if origin.scheme == "https" else None
        )
        self._head_prefix = b"Host: " + origin.host_header + b"\r\n"

    async def connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            # wait_for, not `async with asyncio.timeout`: this module is compiled (setup.py).
            _, protocol = await asyncio.wait_for(
                loop.create_connection(
                    lambda: UpstreamConnection(self),
                    self.origin.host,
                    self.origin.port,
                    ssl=self._ssl,
                    server_hostname=self.origin.host if self._ssl else None,
                ),
                self.connect_timeout,
            )
        except TimeoutError:
            raise UpstreamError(
                "connect",
                f"connecting to {self.origin.url} timed out after {self.connect_timeout:g}s",
                before_response=True,
            ) from None
        except OSError as exc:
            raise UpstreamError(
                "connect",
                f"cannot connect to {self.origin.url}: {exc.strerror or exc}",
                before_response=True,
            ) from None
        self.open.add(protocol)
        return protocol

    def take_idle(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if monotonic() - conn.idle_since >= self.idle_timeout:
                # LIFO: every connection left below this one has been idle even longer.
                conn.abort()
                self.expire_idle()
                return None
            return conn
        return None

    def expire_idle(self, now: float | None = None) -> int:
        """Closes the connections idle for idle_timeout or longer; returns how many."""
        now = monotonic() if now is None else now
        idle = self.idle
        count = 0
        while idle and now - idle[0].idle_since >= self.idle_timeout:
            idle.pop(0).abort()
            count += 1
        return count

    def release(self, conn: UpstreamConnection) -> None:
        """Returns a connection whose response ended cleanly; anything else is closed."""
        if conn.closed:
            return
        reusable = conn.complete and conn.keep_alive and not self.retired
        if reusable and len(self.idle) < MAX_IDLE_PER_ORIGIN:
            conn.idle_since = monotonic()
            self.expire_idle(conn.idle_since)
            self.idle.append(conn)
        else:
            conn.abort()

    def release_when_complete(
        self, conn: UpstreamConnection, within: float, deadlines: Deadlines
    ) -> None:
        """Pools a connection once its response has fully arrived (after the client got
        its [DONE], only the chunked terminator may still be in flight); closes it if the
        backend does not finish the message `within` seconds (on `deadlines`: no loop
        timer per response)."""
        conn.settle()
        if conn.complete or conn.closed:
            self.release(conn)
            return
        _TailWatcher(self, conn, monotonic() + within, deadlines)

    def forget(self, conn: UpstreamConnection) -> None:
        self.open.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)

    def close(self) -> None:
        for conn in list(self.open):
            conn.abort()
        self.idle.clear()

    def retire(self) -> None:
        """Its replica left the config: idle connections close now, busy ones when their
        response ends (requests still in flight on an older snapshot finish normally)."""
        self.retired = True
        for conn in self.idle:
            conn.abort()
        self.idle.clear()

    def build_head(
        self, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], n: int
    ) -> bytes:
        # n < 0: the caller frames the body itself (transfer-encoding: chunked).
        return join_head((method, b" ", path, b" HTTP/1.1\r\n", self._head_prefix), headers, n, b"")


class _TailWatcher:
    """Waits for a response's last bytes, then returns its connection to the pool; aborts
    the connection if they do not come by `deadline`. Most streams need one: vLLM's server
    writes the chunked terminator after [DONE] in a write of its own."""

    __slots__ = ("conn", "deadlines", "pool", "slot")

    def __init__(
        self, pool: UpstreamPool, conn: UpstreamConnection, deadline: float, deadlines: Deadlines
    ) -> None:
        self.pool = pool
        self.conn = conn
        self.deadlines = deadlines
        self.slot = deadlines.add(deadline, self)
        conn.set_consumer(self)

    def feed(self, data: bytes) -> None:
        pass  # only framing is expected after [DONE]

    def read_done(self) -> None:
        pass

    def complete(self) -> None:
        self.deadlines.remove(self.slot, self)
        self.pool.release(self.conn)

    def error(self, exc: BaseException) -> None:
        self.deadlines.remove(self.slot, self)

    def on_deadline(self) -> None:
        self.conn.abort()


async def open_exchange(
    pool: UpstreamPool,
    method: bytes,
    path: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
) -> UpstreamConnection:
    """Sends a request and waits for the response head.

    A reused connection that closes before any response byte was most likely closed by the
    backend while idle (a keep-alive race): the request is sent once more on a fresh
    connection (`conn.retried`, `pool.retries`). That is the only resend: once a response
    byte arrived the error goes to the caller, and a fresh connection is never retried.
    """
    head = pool.build_head(method, path, headers, len(body))
    conn = pool.take_idle()
    retried = False
    if conn is not None:
        try:
            conn.send(head, body)
            await conn.read_head()
            return conn
        except UpstreamError as exc:
            conn.abort()
            if not exc.before_response:
                raise
            retried = True
            pool.retries += 1
        except BaseException:
            conn.abort()
            raise
    conn = await pool.connect()
    try:
        conn.send(head, body)
        conn.retried = retried
        await conn.read_head()
    except BaseException:
        conn.abort()
        raise
    return conn
