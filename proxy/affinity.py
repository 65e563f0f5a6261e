"""Replica choice by score: prefix affinity, session affinity and load.

For a backend with several replicas and `routing.strategy: score`, each available replica
gets

    prefix_weight  * (leading prompt blocks this replica likely holds / prompt blocks)
  + session_weight * (1 if the request's session is pinned here)
  + load_weight    * (1 - load / (highest load among candidates + 1))
  + kv_weight      * (1 - KV-cache usage)

and the highest score wins (ties: the lower load, then the next replica in turn). `load` is
this process's requests in flight on the replica (exact and current) plus the requests
other processes had there at the last scrape (vLLM's `num_requests_running` +
`num_requests_waiting` minus this process's in flight at that moment).
The load guard: a replica with more than `max_waiting` queued requests, more than
`max_kv_usage` of its KV cache in use, or more than `max_imbalance` requests above the
least loaded candidate gets no affinity bonus, so a hot prefix or session spills over to
other replicas instead of piling onto one. With no shared prefix and no session every
affinity term is 0 and the choice is by load alone.

The prefix index is approximate: per replica, a bounded LRU of the block hashes sluice sent
there (the blocks of each request, inserted tail first so that a prompt's first blocks are
the most recent, as vLLM evicts a finished request's tail blocks first). It is kept per
process; with a Redis store it is also shared by every worker and replica (sharedindex.py;
docs/ROUTING.md measures both), and a replica's match is the larger of the two.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Final, Generic, Protocol, TypeVar

from .http import Request
from .prefix import chain_hashes, prompt_bytes
from .sharedindex import SharedIndex, SharedRead
from .snapshot import Backend, RoutingPolicy
from .upstream_pool import UpstreamPool

# Scraped figures older than this many scrape intervals are not trusted (replica stopped
# answering /metrics): its load is then this process's in-flight count alone.
STALE_AFTER_INTERVALS: Final = 4.0
MAX_SESSIONS: Final = 65536
MAX_SESSION_KEY: Final = 256


class ReplicaLike(Protocol):
    """What scoring reads of a replica (backends.Replica; a Protocol avoids the cycle)."""

    @property
    def pool(self) -> UpstreamPool: ...

    def available(self, now: float) -> bool: ...


R = TypeVar("R", bound=ReplicaLike)


class RoutingHint:
    """What replica choice needs from one request, computed once before the first try."""

    __slots__ = ("blocks", "reading", "session", "shared")

    def __init__(self, blocks: list[bytes], session: bytes | None) -> None:
        self.blocks = blocks
        self.session = session
        self.shared: dict[str, int] | None = None  # URL -> leading blocks in the shared index
        self.reading: SharedRead | None = None  # the shared index's reply, on its way


class ReplicaState:
    """One replica URL's prefix index and last scraped load."""

    __slots__ = ("blocks", "kv_usage", "others", "running", "scraped_at", "waiting")

    def __init__(self) -> None:
        self.blocks: OrderedDict[bytes, None] = OrderedDict()
        self.waiting = 0.0
        self.running = 0.0
        self.kv_usage = 0.0
        self.others = 0.0  # requests there that this process did not send, at the scrape
        self.scraped_at = -1e18  # time.monotonic(); never scraped

    def matched(self, blocks: list[bytes]) -> int:
        """Leading blocks found in the index (a chained hash implies all before it)."""
        index = self.blocks
        n = 0
        for block in blocks:
            if block not in index:
                break
            n += 1
        return n

    def remember(self, blocks: list[bytes], capacity: int) -> None:
        index = self.blocks
        for block in reversed(blocks):
            if block in index:
                index.move_to_end(block)
            else:
                index[block] = None
        while len(index) > capacity:
            index.popitem(last=False)

    def set_load(
        self, waiting: float, running: float, kv_usage: float, own: int, now: float
    ) -> None:
        """vLLM's figures at `now`, when this process had `own` requests in flight there."""
        self.waiting = waiting
        self.running = running
        self.kv_usage = kv_usage
        self.others = max(0.0, waiting + running - own)
        self.scraped_at = now


class Candidate(Generic[R]):
    """The few numbers a replica is scored by (also what tests and the bench inspect)."""

    __slots__ = ("guarded", "kv_usage", "load", "matched", "replica", "state", "waiting")

    def __init__(self, replica: R, state: ReplicaState, outstanding: int, fresh: bool) -> None:
        self.replica = replica
        self.state = state
        if fresh:
            # Our own count is exact and current; the scrape adds only what others sent
            # (a stale copy of our own would make every process chase the same replica).
            self.load = outstanding + state.others
            self.waiting = state.waiting
            self.kv_usage = state.kv_usage
        else:
            self.load = float(outstanding)
            self.waiting = 0.0
            self.kv_usage = 0.0
        self.matched = 0
        self.guarded = False


class AffinityRouter:
    """Per-URL state for every scored backend; `choose` runs on the hot path."""

    def __init__(self) -> None:
        self.states: dict[str, ReplicaState] = {}
        self._sessions: OrderedDict[tuple[str, bytes], str] = OrderedDict()
        self._turn = 0
        self.shared: SharedIndex | None = None  # set at start-up when a Redis store exists

    def state(self, url: str) -> ReplicaState:
        state = self.states.get(url)
        if state is None:
            state = self.states[url] = ReplicaState()
        return state

    def hint(
        self, backend: Backend, body: dict[str, Any], chat: bool, request: Request
    ) -> RoutingHint | None:
        """The request's block hashes and session key; None when the backend does not
        route by score (one replica, or `least_outstanding`)."""
        policy = backend.routing
        if policy.strategy != "score" or len(backend.urls) < 2:
            return None
        salt = body.get("cache_salt")
        blocks = chain_hashes(
            prompt_bytes(body, chat),
            policy.block_chars,
            salt if isinstance(salt, str) and salt else None,
        )
        session = None
        if policy.session_header is not None:
            value = request.headers.get(policy.session_header.encode())
            if value:
                session = value[:MAX_SESSION_KEY]
        return RoutingHint(blocks, session)

    def share(self, backend: Backend, hint: RoutingHint) -> None:
        """Starts reading the shared index for this request (one pipelined call), to be
        settled by `settle` right before the choice; no store, or `shared_index: false`:
        nothing to read, the local index alone."""
        shared = self.shared
        if shared is not None and backend.routing.shared_index and hint.blocks:
            urls = tuple(url.rstrip("/") for url in backend.urls)  # as Origin.url has it
            hint.reading = shared.read(urls, hint.blocks)

    async def settle(self, backend: Backend, hint: RoutingHint) -> None:
        """Waits for the read `share` started, at most `shared_index_timeout` (it usually
        came back while the permits were taken); later than that: the local index alone."""
        reading, hint.reading = hint.reading, None
        if reading is not None and self.shared is not None:
            hint.shared = await self.shared.settle(reading, backend.routing.shared_index_timeout)

    def score(
        self,
        backend: Backend,
        candidates: list[Candidate[R]],
        hint: RoutingHint,
    ) -> Candidate[R]:
        """The winning candidate (fills in `matched` and `guarded` on each)."""
        policy = backend.routing
        min_load = min(c.load for c in candidates)
        max_load = max(c.load for c in candidates)
        pinned = None
        if hint.session is not None:
            pinned = self._sessions.get((backend.name, hint.session))
        total = len(hint.blocks)
        shared = hint.shared
        best: Candidate[R] | None = None
        best_score = 0.0
        # Ties (an idle backend, a new prefix) go round the replicas, not to the first.
        self._turn = turn = (self._turn + 1) % len(candidates)
        for c in candidates[turn:] + candidates[:turn]:
            c.guarded = _overloaded(c, policy, min_load)
            score = policy.load_weight * (1.0 - c.load / (max_load + 1.0))
            score += policy.kv_weight * (1.0 - min(c.kv_usage, 1.0))
            if total:
                c.matched = c.state.matched(hint.blocks)
                if shared is not None:
                    c.matched = max(c.matched, shared.get(c.replica.pool.origin.url, 0))
                if not c.guarded:
                    score += policy.prefix_weight * c.matched / total
            if pinned is not None and not c.guarded and c.replica.pool.origin.url == pinned:
                score += policy.session_weight
            if best is None or score > best_score or (score == best_score and c.load < best.load):
                best, best_score = c, score
        assert best is not None
        return best

    def record(self, backend: Backend, chosen: Candidate[R], hint: RoutingHint) -> None:
        """The request goes to `chosen`: its blocks will be cached there."""
        policy = backend.routing
        if hint.blocks:
            chosen.state.remember(hint.blocks, policy.index_blocks)
            if self.shared is not None and policy.shared_index:
                self.shared.remember(
                    chosen.replica.pool.origin.url, hint.blocks, policy.index_blocks
                )
        if hint.session is not None:
            sessions = self._sessions
            key = (backend.name, hint.session)
            sessions[key] = chosen.replica.pool.origin.url
            sessions.move_to_end(key)
            if len(sessions) > MAX_SESSIONS:
                sessions.popitem(last=False)

    def choose(
        self,
        backend: Backend,
        replicas: tuple[R, ...],
        hint: RoutingHint,
        exclude: tuple[R, ...],
        now: float,
    ) -> R | None:
        """The best available replica for this request, remembered in the index; None when
        none is available (the caller then picks among ejected ones)."""
        policy = backend.routing
        stale_before = (
            now - policy.scrape_interval * STALE_AFTER_INTERVALS
            if policy.scrape_interval is not None
            else None
        )
        candidates = []
        for replica in replicas:
            if replica in exclude or not replica.available(now):
                continue
            state = self.state(replica.pool.origin.url)
            fresh = stale_before is not None and state.scraped_at >= stale_before
            candidates.append(Candidate(replica, state, replica.pool.outstanding, fresh))
        if not candidates:
            return None
        chosen = self.score(backend, candidates, hint)
        self.record(backend, chosen, hint)
        return chosen.replica


def _overloaded(c: Candidate[Any], policy: RoutingPolicy, min_load: float) -> bool:
    return (
        c.waiting > policy.max_waiting
        or c.kv_usage > policy.max_kv_usage
        or c.load - min_load > policy.max_imbalance
    )


__all__ = ["AffinityRouter", "Candidate", "ReplicaState", "RoutingHint"]
