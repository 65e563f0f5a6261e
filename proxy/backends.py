"""Upstream pools per backend replica, and replica choice.

Pools are long-lived (keyed by replica URL, they survive reloads and keep their warm
connections); the snapshot's `Backend` only names the URLs. A replica is chosen by least
outstanding requests, or by score (prefix and session affinity + load, proxy/affinity.py)
when the request carries a routing hint; one whose connections keep failing is ejected for
a cool-down.
"""

from __future__ import annotations

import time

from .affinity import AffinityRouter, RoutingHint
from .snapshot import Backend
from .upstream import Origin, UpstreamPool

EJECT_AFTER_FAILURES = 3
EJECT_SECONDS = 10.0


class Replica:
    __slots__ = ("consecutive_failures", "ejected_until", "healthy", "pool")

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.consecutive_failures = 0
        self.ejected_until = 0.0
        self.healthy = True  # set by active health checks

    def available(self, now: float) -> bool:
        return self.healthy and self.ejected_until <= now

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        if self.consecutive_failures >= EJECT_AFTER_FAILURES:
            self.ejected_until = time.monotonic() + EJECT_SECONDS

    def record_success(self) -> None:
        self.consecutive_failures = 0
        self.ejected_until = 0.0


class BackendPools:
    """Replicas by URL; `replicas(backend)` returns them in the backend's order."""

    def __init__(self) -> None:
        self._replicas: dict[str, Replica] = {}
        self._by_backend: dict[tuple[str, tuple[str, ...]], tuple[Replica, ...]] = {}
        self.router = AffinityRouter()

    def replicas(self, backend: Backend) -> tuple[Replica, ...]:
        key = (backend.name, backend.urls)
        found = self._by_backend.get(key)
        if found is not None:
            return found
        replicas = []
        for url in backend.urls:
            replica = self._replicas.get(url)
            if replica is None:
                pool = UpstreamPool(Origin(url), backend.connect_timeout)
                replica = self._replicas[url] = Replica(pool)
            replica.pool.connect_timeout = backend.connect_timeout
            replicas.append(replica)
        result = tuple(replicas)
        self._by_backend[key] = result
        return result

    def choose(
        self, backend: Backend, exclude: Replica | None = None, hint: RoutingHint | None = None
    ) -> Replica:
        """By score with a hint, else least outstanding requests, among available replicas;
        all ejected -> the one whose ejection ends first (better to try than to fail
        without trying)."""
        replicas = self.replicas(backend)
        if len(replicas) == 1:
            return replicas[0]
        now = time.monotonic()
        if hint is not None:
            scored = self.router.choose(backend, replicas, hint, exclude, now)
            if scored is not None:
                return scored
        best: Replica | None = None
        for replica in replicas:
            if replica is exclude or not replica.available(now):
                continue
            if best is None or replica.pool.outstanding < best.pool.outstanding:
                best = replica
        if best is None:
            candidates = [r for r in replicas if r is not exclude] or list(replicas)
            best = min(candidates, key=lambda r: r.ejected_until)
        return best

    def all(self) -> list[Replica]:
        return list(self._replicas.values())

    def open_connections(self) -> int:
        return sum(len(r.pool.open) for r in self._replicas.values())

    def close(self) -> None:
        for replica in self._replicas.values():
            replica.pool.close()
