"""Which store the limits of `sluice serve` use, decided once at start-up.

- `limits.store` set (a Redis URL, or env:VAR holding one): every replica's and every
  worker's permits live in Redis (proxy/limit_redis.py).
- `--workers N` without a store: the supervisor's permit server (proxy/permit_socket.py).
- One process: the local `Limiter`.
Either shared store falls back to this process's share of each limit while it is down.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sluice.control.config.build import BuiltConfig
from sluice.control.errors import CliError
from sluice.proxy.limit_redis import RedisPermitStore, check_url
from sluice.proxy.limit_store import store_factory
from sluice.proxy.limits import LimiterRegistry
from sluice.proxy.metrics import Metrics
from sluice.proxy.permit_socket import PERMIT_SOCKET_ENV, PermitServer, SocketPermitStore
from sluice.proxy.resume_redis import RedisStreamStore


class _Store(Protocol):
    async def aclose(self) -> None: ...


@dataclass
class LimitStore:
    registry: LimiterRegistry
    kind: str  # "local" | "supervisor" | "redis"
    store: _Store | None = None

    @property
    def redis(self) -> RedisPermitStore | None:
        return self.store if isinstance(self.store, RedisPermitStore) else None

    async def aclose(self) -> None:
        if self.store is not None:
            await self.store.aclose()


def store_url(built: BuiltConfig, environ: dict[str, str] | None = None) -> str | None:
    """The Redis URL of `limits.store`, resolving env:VAR; None: no store configured."""
    gateway = built.gateway
    if gateway is None or gateway.limits.store is None:
        return None
    url = gateway.limits.store
    if url.startswith("env:"):
        env = os.environ if environ is None else environ
        name = url.removeprefix("env:")
        url = env.get(name, "")
        if not url:
            raise CliError(f"limits.store is {gateway.limits.store} but ${name} is unset or empty")
        try:
            check_url(url)  # a literal URL passed the same check in the config's validation
        except ValueError as exc:
            raise CliError(
                f"limits.store is {gateway.limits.store} but ${name} is not a usable Redis "
                f"URL: {exc}"
            ) from None
    return url


def expected_processes(built: BuiltConfig, workers: int) -> int:
    """How many processes share a limit before Redis has said: the replicas the Gateway
    lists for nginx (at least 1) times this host's workers."""
    gateway = built.gateway
    replicas = 1
    if gateway is not None and gateway.edge is not None and gateway.edge.nginx is not None:
        replicas = max(1, len(gateway.edge.nginx.replicas))
    return replicas * max(1, workers)


async def start_limit_store(
    built: BuiltConfig, workers: int, metrics: Metrics | None
) -> LimitStore:
    """Opens the configured store (call it with the event loop running)."""
    url = store_url(built)
    if url is not None:
        assert built.gateway is not None
        limits = built.gateway.limits
        try:
            redis_store = RedisPermitStore(
                url,
                lease=limits.lease,
                timeout=limits.store_timeout,
                keep_idle=limits.keep_idle,
                expected_processes=expected_processes(built, workers),
            )
        except (ValueError, TypeError) as exc:  # what check_url has not foreseen
            raise CliError(f"limits.store is not a usable Redis URL: {exc}") from None
        _watch(redis_store.on_change, metrics, "redis")
        await redis_store.start()
        registry = LimiterRegistry(
            store_factory(redis_store),
            store="redis",
            store_up=lambda: redis_store.up,
            store_processes=lambda: redis_store.known_processes,
        )
        return LimitStore(registry, "redis", redis_store)
    path = os.environ.get(PERMIT_SOCKET_ENV)
    if path:
        socket_store = SocketPermitStore(path, workers)
        _watch(socket_store.on_change, metrics, "supervisor")
        await socket_store.start()
        registry = LimiterRegistry(
            store_factory(socket_store),
            store="supervisor",
            store_up=lambda: socket_store.up,
            store_processes=lambda: socket_store.workers,
        )
        return LimitStore(registry, "supervisor", socket_store)
    return LimitStore(LimiterRegistry(), "local")


async def start_stream_store(permits: RedisPermitStore, built: BuiltConfig) -> RedisStreamStore:
    """Resumable streams copied to the Redis of `limits.store`, on its client (one pool)."""
    assert built.gateway is not None
    store = RedisStreamStore(
        permits.client, permits.url, timeout=built.gateway.limits.store_timeout
    )
    await store.start()
    return store


def _watch(callbacks: list[Callable[[bool], None]], metrics: Metrics | None, kind: str) -> None:
    if metrics is None:
        return
    gauge = metrics.limit_store_up.labels(store=kind)
    gauge.set(0)
    callbacks.append(lambda up: gauge.set(1 if up else 0))


class PermitServerThread:
    """The supervisor's permit server on its own thread and event loop (the supervisor's
    main thread polls its workers). The socket lives in a private temporary directory."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="sluice-permits-")
        self.path = os.path.join(self.directory, "permits.sock")
        self.server = PermitServer(self.path)
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="permit-server", daemon=True
        )
        self._thread.start()
        started.wait(10)
        if not os.path.exists(self.path):
            raise CliError("the permit server for the workers did not start")

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.server.start())
        finally:
            started.set()
        self._loop.run_forever()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        shutil.rmtree(self.directory, ignore_errors=True)
