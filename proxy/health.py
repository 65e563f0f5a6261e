"""Active health checks: one small probe task per backend replica that has `health` set.

Each task GETs the replica's health path every `interval` on a fresh connection (never a
pooled one: a probe must not take or poison the relay's keep-alive connections) and sets
`Replica.healthy`, which replica choice reads; the hot path never waits on a probe.
A replica is marked down after UNHEALTHY_AFTER failed probes in a row and up again after
one success. The prober follows reloads: it compares the snapshot it last saw with
`ref.current` every RECONCILE_INTERVAL and starts, restarts or stops probes to match;
a replica whose probe is removed counts as healthy again, and its `sluice_backend_healthy`
series goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import ssl
from typing import Final

import structlog
from prometheus_client import CollectorRegistry, Gauge

from .backends import BackendPools, Replica
from .metrics import MULTIPROC_ENV
from .snapshot import HealthCheck, Snapshot, SnapshotRef
from .upstream_pool import Origin

UNHEALTHY_AFTER: Final = 2  # one lost probe on a busy engine is not an outage
RECONCILE_INTERVAL: Final = 1.0
MAX_STATUS_LINE: Final = 1024

# With several workers a series' timestamp in the multiprocess files is its rank, not a time.
# The gauge is `livemostrecent`: at scrape time prometheus-client keeps, per series, the
# live workers' sample of the largest timestamp and leaves out a series whose samples all
# carry 0. It cannot delete a label set from a worker's file (Gauge.remove only warns, on
# stderr), so a retired series is written with rank 0; down outranks up, so a replica any
# worker sees down reads 0, as under `livemin`.
_RETIRED: Final = 0.0
_UP: Final = 1.0
_DOWN: Final = 2.0

_log = structlog.get_logger("sluice.health")


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # Built once: loading the CA bundle costs milliseconds of CPU on the event loop.
    return ssl.create_default_context()


def _request_head(origin: Origin, check: HealthCheck) -> bytes:
    return b"".join(
        (
            b"GET ",
            check.path.encode(),
            b" HTTP/1.1\r\nHost: ",
            origin.host_header,
            b"\r\nUser-Agent: sluice-health\r\nConnection: close\r\n\r\n",
        )
    )


async def probe(origin: Origin, check: HealthCheck) -> str | None:
    """None when `GET check.path` answers 2xx within `check.timeout`, else why not."""
    context = _tls_context() if origin.scheme == "https" else None
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(check.timeout):
            reader, writer = await asyncio.open_connection(
                origin.host,
                origin.port,
                ssl=context,
                server_hostname=origin.host if context else None,
                limit=MAX_STATUS_LINE,
            )
            writer.write(_request_head(origin, check))
            line = await reader.readline()
    except TimeoutError:
        return f"no answer within {check.timeout:g}s"
    except (OSError, ValueError, asyncio.LimitOverrunError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return "not an HTTP response"
    status = int(parts[1])
    return None if 200 <= status < 300 else f"HTTP {status}"


class HealthMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.healthy = Gauge(
            "sluice_backend_healthy",
            "1 while the replica passes its active health check, 0 while it fails",
            ["backend", "url"],
            registry=registry if registry is not None else CollectorRegistry(),
            multiprocess_mode="livemostrecent",
        )

    def set(self, backend: str, url: str, *, healthy: bool) -> None:
        child = self.healthy.labels(backend, url)
        value = 1.0 if healthy else 0.0
        if self.multiprocess:  # Gauge.set would write the time as the rank
            child._value.set(value, timestamp=_UP if healthy else _DOWN)
        else:
            child.set(value)

    def retire(self, backend: str, url: str) -> None:
        """Takes the series out of /metrics: its probe is gone."""
        if self.multiprocess:
            self.healthy.labels(backend, url)._value.set(1.0, timestamp=_RETIRED)
        else:
            self.healthy.remove(backend, url)


class HealthProber:
    """The probe tasks, reconciled with the current snapshot."""

    def __init__(
        self,
        ref: SnapshotRef,
        pools: BackendPools,
        metrics: HealthMetrics | None = None,
        *,
        reconcile_interval: float = RECONCILE_INTERVAL,
    ) -> None:
        self.ref = ref
        self.pools = pools
        self.metrics = metrics or HealthMetrics()
        self.reconcile_interval = reconcile_interval
        self._seen: Snapshot | None = None
        # url -> (backend name, check, replica, task); a URL in two backends is probed once.
        self._probes: dict[str, tuple[str, HealthCheck, Replica, asyncio.Task[None]]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    async def _supervise(self) -> None:
        while True:
            self.reconcile(self.ref.current)
            await asyncio.sleep(self.reconcile_interval)

    def reconcile(self, snap: Snapshot) -> None:
        if snap is self._seen:
            return
        self._seen = snap
        wanted: dict[str, tuple[str, HealthCheck, Replica]] = {}
        for backend in snap.backends.values():
            if backend.health is None:
                continue
            replicas = self.pools.replicas(backend)
            for url, replica in zip(backend.urls, replicas, strict=True):
                wanted.setdefault(url, (backend.name, backend.health, replica))
        for url, (name, check, replica, task) in list(self._probes.items()):
            want = wanted.get(url)
            if want is None or want[:2] != (name, check):
                task.cancel()
                del self._probes[url]
                if want is None:
                    self._set(url, name, replica, healthy=True)
                if want is None or want[0] != name:
                    self.metrics.retire(name, url)
        loop = asyncio.get_running_loop()
        for url, (name, check, replica) in wanted.items():
            if url not in self._probes:
                task = loop.create_task(self._probe_loop(url, name, check, replica))
                self._probes[url] = (name, check, replica, task)

    async def _probe_loop(self, url: str, name: str, check: HealthCheck, replica: Replica) -> None:
        failures = 0
        self.metrics.set(name, url, healthy=replica.healthy)
        while True:
            problem = await probe(replica.pool.origin, check)
            if problem is None:
                failures = 0
                if not replica.healthy:
                    self._set(url, name, replica, healthy=True)
            else:
                failures += 1
                if failures >= UNHEALTHY_AFTER and replica.healthy:
                    self._set(url, name, replica, healthy=False, reason=problem)
            await asyncio.sleep(check.interval)

    def _set(
        self, url: str, backend: str, replica: Replica, *, healthy: bool, reason: str = ""
    ) -> None:
        if replica.healthy == healthy:
            return
        replica.healthy = healthy
        self.metrics.set(backend, url, healthy=healthy)
        if healthy:
            _log.info("replica_healthy", backend=backend, url=url)
        else:
            _log.warning("replica_unhealthy", backend=backend, url=url, reason=reason)

    async def aclose(self) -> None:
        tasks = [task for *_, task in self._probes.values()]
        if self._task is not None:
            tasks.append(self._task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._probes.clear()
        self._task = None


__all__ = ["UNHEALTHY_AFTER", "HealthMetrics", "HealthProber", "probe"]
