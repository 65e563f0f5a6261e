"""vLLM's load figures, scraped off the hot path for replica choice by score.

One task per replica URL of every backend that routes by score (several replicas,
`routing.strategy: score`, `routing.scrape_interval` set) GETs its `/metrics` every
interval on a fresh connection (never a pooled one, as the health probes) and stores
`vllm:num_requests_waiting`, `vllm:num_requests_running` (summed over engines) and
`vllm:kv_cache_usage_perc` (the fullest engine; `vllm:gpu_cache_usage_perc` before vLLM
0.10) in the router's per-URL state. A replica whose scrape fails keeps its last figures
until they go stale (affinity.STALE_AFTER_INTERVALS); the request path never waits on a
scrape. Tasks follow reloads as the health prober's do.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import ssl
import time
from typing import Final

import httptools
import structlog

from .backends import BackendPools, Replica
from .snapshot import Backend, Snapshot, SnapshotRef
from .upstream_pool import Origin

MAX_METRICS_BYTES: Final = 8 * 1024 * 1024
RECONCILE_INTERVAL: Final = 1.0
WAITING: Final = b"vllm:num_requests_waiting"
RUNNING: Final = b"vllm:num_requests_running"
KV_USAGE: Final = (b"vllm:kv_cache_usage_perc", b"vllm:gpu_cache_usage_perc")
_WANTED: Final = frozenset((WAITING, RUNNING, *KV_USAGE))

_log = structlog.get_logger("sluice.loadscrape")


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()  # once: loading the CA bundle costs milliseconds


class LoadFigures:
    __slots__ = ("kv_usage", "running", "seen", "waiting")

    def __init__(self) -> None:
        self.waiting = 0.0
        self.running = 0.0
        self.kv_usage = 0.0
        self.seen = False  # at least one of the three names was present


def _value(line: bytes) -> float | None:
    # `name{labels} value [timestamp]`: labels may hold spaces inside quotes, so the
    # value is found after the closing brace.
    brace = line.rfind(b"}")
    rest = line[brace + 1 :] if brace >= 0 else line.partition(b" ")[2]
    parts = rest.split()
    if not parts:
        return None
    try:
        return float(parts[0])
    except ValueError:
        return None


def _name(line: bytes) -> bytes:
    end = len(line)
    for sep in (b"{", b" "):
        i = line.find(sep)
        if 0 <= i < end:
            end = i
    return line[:end]


def parse_metrics(text: bytes) -> LoadFigures:
    """The three figures from a Prometheus text exposition (other lines are skipped)."""
    figures = LoadFigures()
    for line in text.split(b"\n"):
        if not line.startswith(b"vllm:"):
            continue
        name = _name(line)
        if name in _WANTED:
            value = _value(line)
            if value is None or math.isnan(value):
                continue
            figures.seen = True
            if name == WAITING:
                figures.waiting += value
            elif name == RUNNING:
                figures.running += value
            else:
                figures.kv_usage = max(figures.kv_usage, value)
    return figures


class _Collector:
    """httptools callbacks: status and body of one response."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.body: list[bytes] = []
        self.size = 0
        self.complete = False

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > MAX_METRICS_BYTES:
            raise ValueError(f"/metrics over {MAX_METRICS_BYTES} bytes")
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


async def fetch_metrics(origin: Origin, path: str, timeout: float) -> bytes:
    """GET `path` once on a fresh connection; raises OSError/ValueError/TimeoutError."""
    context = _tls_context() if origin.scheme == "https" else None
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                origin.host,
                origin.port,
                ssl=context,
                server_hostname=origin.host if context else None,
            )
            writer.write(
                b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: sluice-routing\r\n"
                b"Accept: text/plain\r\nConnection: close\r\n\r\n"
                % (path.encode(), origin.host_header)
            )
            collector = _Collector()
            while not collector.complete:
                data = await reader.read(65536)
                if not data:
                    break  # a close-delimited body ends here (httptools has no finish)
                collector.parser.feed_data(data)
    except httptools.HttpParserError as exc:
        raise ValueError(f"malformed response: {exc}") from None
    except httptools.HttpParserUpgrade:
        # Not an error to httptools, and not one the scrape loop catches: it would end it.
        raise ValueError("the server switched protocols (101)") from None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    status = collector.parser.get_status_code()
    if not 200 <= status < 300:
        raise ValueError(f"HTTP {status}")
    return b"".join(collector.body)


class LoadScraper:
    """The scrape tasks, reconciled with the current snapshot."""

    def __init__(
        self,
        ref: SnapshotRef,
        pools: BackendPools,
        *,
        reconcile_interval: float = RECONCILE_INTERVAL,
    ) -> None:
        self.ref = ref
        self.pools = pools
        self.reconcile_interval = reconcile_interval
        self._seen: Snapshot | None = None
        self._tasks: dict[str, tuple[float, str, asyncio.Task[None]]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    async def _supervise(self) -> None:
        while True:
            self.reconcile(self.ref.current)
            await asyncio.sleep(self.reconcile_interval)

    @staticmethod
    def _scraped(backend: Backend) -> bool:
        policy = backend.routing
        return (
            policy.strategy == "score"
            and len(backend.urls) > 1
            and policy.scrape_interval is not None
        )

    def reconcile(self, snap: Snapshot) -> None:
        if snap is self._seen:
            return
        self._seen = snap
        wanted: dict[str, tuple[float, str, Replica]] = {}
        for backend in snap.backends.values():
            if self._scraped(backend):
                interval = backend.routing.scrape_interval
                assert interval is not None
                replicas = self.pools.replicas(backend)
                for url, replica in zip(backend.urls, replicas, strict=True):
                    previous = wanted.get(url)
                    if previous is None or interval < previous[0]:
                        wanted[url] = (interval, backend.routing.scrape_path, replica)
        for url, (interval, path, task) in list(self._tasks.items()):
            want = wanted.get(url)
            if want is None or want[:2] != (interval, path):
                task.cancel()
                del self._tasks[url]
        loop = asyncio.get_running_loop()
        for url, (interval, path, replica) in wanted.items():
            if url not in self._tasks:
                task = loop.create_task(self._scrape_loop(replica, interval, path))
                self._tasks[url] = (interval, path, task)

    async def _scrape_loop(self, replica: Replica, interval: float, path: str) -> None:
        origin = replica.pool.origin
        url = origin.url
        state = self.pools.router.state(url)
        timeout = max(0.2, min(2.0, interval * 2))
        failing = False
        while True:
            try:
                own = replica.pool.outstanding  # before the GET: vLLM counts it this soon
                figures = parse_metrics(await fetch_metrics(origin, path, timeout))
                if not figures.seen:
                    raise ValueError("no vllm:num_requests_* metric (not a vLLM server?)")
                own = min(own, replica.pool.outstanding)
                state.set_load(
                    figures.waiting, figures.running, figures.kv_usage, own, time.monotonic()
                )
                if failing:
                    _log.info("replica_metrics_ok", url=url)
                failing = False
            except (OSError, ValueError, TimeoutError) as exc:
                if not failing:
                    _log.warning("replica_metrics_failed", url=url, reason=str(exc) or repr(exc))
                failing = True
            await asyncio.sleep(interval)

    async def aclose(self) -> None:
        tasks = [task for *_, task in self._tasks.values()]
        if self._task is not None:
            tasks.append(self._task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._task = None


__all__ = ["LoadFigures", "LoadScraper", "fetch_metrics", "parse_metrics"]
