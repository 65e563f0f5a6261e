"""Upstream pools per backend replica, and replica choice.

Pools are long-lived (keyed by replica URL, they survive reloads and keep their warm
connections); the snapshot's `Backend` only names the URLs and the settings. `reconcile`
runs once per snapshot swap, on the event loop: it applies changed pool settings
(connect_timeout, idle_timeout), creates the pools of new replicas and retires those of
replicas no backend names any more. Requests only look pools up, so a request still
holding an older snapshot cannot set an old setting back. A replica is chosen by least
outstanding requests, or by score (prefix and session affinity + load, proxy/affinity.py)
when the request carries a routing hint; one whose connections keep failing is ejected for
a cool-down.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Final

from .affinity import AffinityRouter, RoutingHint
from .errors import bad_gateway
from .response import Header
from .snapshot import Backend
from .timeouts import StreamWatchdog
from .upstream import UpstreamConnection, UpstreamError
from .upstream_pool import Origin, UpstreamPool, open_exchange

EJECT_AFTER_FAILURES: Final = 3
EJECT_SECONDS: Final = 10.0


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


def _new_replica(url: str, backend: Backend) -> Replica:
    return Replica(UpstreamPool(Origin(url), backend.connect_timeout, backend.idle_timeout))


class BackendPools:
    """Replicas by URL; `replicas(backend)` returns them in the backend's order."""

    def __init__(self) -> None:
        self._replicas: dict[str, Replica] = {}
        self._by_backend: dict[tuple[str, tuple[str, ...]], tuple[Replica, ...]] = {}
        self.router = AffinityRouter()

    def reconcile(self, backends: Iterable[Backend]) -> list[str]:
        """Makes the pools match the backends of a new snapshot; returns the URLs retired.
        A URL named by two backends keeps one pool (the first backend's settings)."""
        wanted: dict[str, Backend] = {}
        for backend in backends:
            for url in backend.urls:
                wanted.setdefault(url, backend)
        for url, backend in wanted.items():
            replica = self._replicas.get(url)
            if replica is None:
                self._replicas[url] = _new_replica(url, backend)
            else:
                replica.pool.connect_timeout = backend.connect_timeout
                replica.pool.idle_timeout = backend.idle_timeout
                replica.pool.expire_idle()
        retired = [url for url in self._replicas if url not in wanted]
        for url in retired:
            self._replicas.pop(url).pool.retire()
            self.router.states.pop(url, None)  # its prefix index goes with it
        self._by_backend.clear()
        return retired

    def replicas(self, backend: Backend) -> tuple[Replica, ...]:
        key = (backend.name, backend.urls)
        found = self._by_backend.get(key)
        if found is not None:
            return found
        replicas = []
        for url in backend.urls:
            replica = self._replicas.get(url)
            if replica is None:
                # Not reconciled yet (a snapshot assigned without ProxyApp.swap), or a request
                # of an older snapshot whose replica was removed: the next reconcile retires
                # it again.
                replica = self._replicas[url] = _new_replica(url, backend)
            replicas.append(replica)
        result = tuple(replicas)
        self._by_backend[key] = result
        return result

    def choose(
        self,
        backend: Backend,
        exclude: tuple[Replica, ...] = (),
        hint: RoutingHint | None = None,
    ) -> Replica:
        """By score with a hint, else least outstanding requests, among available replicas
        not in `exclude` (those a request already tried); all ejected -> the one whose
        ejection ends first (better to try than to fail without trying)."""
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
            if replica in exclude or not replica.available(now):
                continue
            if best is None or replica.pool.outstanding < best.pool.outstanding:
                best = replica
        if best is None:
            candidates = [r for r in replicas if r not in exclude] or list(replicas)
            best = min(candidates, key=lambda r: r.ejected_until)
        return best

    async def open_exchange(
        self,
        backend: Backend,
        method: bytes,
        path: bytes,
        headers: list[Header],
        payload: bytes,
        hint: RoutingHint | None = None,
        watch: StreamWatchdog | None = None,
        seek_stored: bool = False,
    ) -> tuple[UpstreamConnection, Replica]:
        """Sends a request to one of the backend's replicas and waits for the response
        head; a replica that cannot be reached before any response byte is recorded as
        failing and another one is tried, each replica once at most (as nginx's
        `proxy_next_upstream` tries every server): with two of three replicas down, a
        request that picked both still reaches the third. The replica's `outstanding`
        count includes the exchange; its caller takes it off when the exchange ends. A
        hint still reading the replicas' load waits for it first (affinity.py). `watch`,
        a stream's watchdog, is told each replica the request goes to: one that holds a
        stream without a head until it times out counts as failing (`hung_backend`).
        `seek_stored`: the request reads a response vLLM stored in one replica's memory; a
        404 from one replica is followed by the next (as nginx's `proxy_next_upstream
        http_404`), and the last replica's answer is the client's."""
        if hint is not None and hint.reading is not None:
            await self.router.settle(backend, hint)
        tried: tuple[Replica, ...] = ()
        last: UpstreamError | None = None
        for _ in range(len(backend.urls)):
            replica = self.choose(backend, exclude=tried, hint=hint)
            replica.pool.outstanding += 1
            if watch is not None:
                watch.sending(replica)
            try:
                conn = await open_exchange(replica.pool, method, path, headers, payload)
            except UpstreamError as exc:
                replica.pool.outstanding -= 1
                replica.record_failure()
                last = exc
                tried = (*tried, replica)
                if not exc.before_response:
                    break
                continue
            except BaseException:
                replica.pool.outstanding -= 1
                raise
            replica.record_success()
            if seek_stored and conn.status == 404 and len(tried) + 1 < len(backend.urls):
                # Not the replica that holds it. Its 404 comes whole with its head (vLLM's
                # error JSON): the connection goes back to the pool, else it is closed.
                conn.settle()
                replica.pool.release(conn)
                replica.pool.outstanding -= 1
                tried = (*tried, replica)
                continue
            return conn, replica
        assert last is not None
        raise bad_gateway(f"backend {backend.name}: {last}", code="upstream_" + last.kind)

    def all(self) -> list[Replica]:
        return list(self._replicas.values())

    def open_connections(self) -> int:
        return sum(len(r.pool.open) for r in self._replicas.values())

    def retries(self) -> int:
        return sum(r.pool.retries for r in self._replicas.values())

    def close(self) -> None:
        for replica in self._replicas.values():
            replica.pool.close()
