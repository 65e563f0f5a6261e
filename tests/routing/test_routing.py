"""Replica choice by score through the real proxy and real simulators (prefix cache model
on): a tenant's requests stay on the replica holding its prompt, a loaded replica loses
that bonus and the choice falls back to load, sessions pin, and the /metrics scraper reads
vLLM's load figures."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import httpx
import pytest
from sluice.proxy.loadscrape import LoadScraper, fetch_metrics, parse_metrics
from sluice.proxy.prefix import chain_hashes, prompt_bytes
from sluice.proxy.snapshot import Backend, RoutingPolicy
from sluice.proxy.upstream_pool import Origin
from sluice.sim import SimConfig, SimServer, start_sim

from tests.fixtures import LoopThread, ProxyHarness, routed_snapshot
from tests.reliability.fixtures import RawBackend

TENANTS = [
    f"You are the assistant of tenant {t}. Answer briefly and politely. " * 30 for t in "ABC"
]


class Cluster:
    """Three simulators behind one proxy backend, all on one loop thread."""

    def __init__(self, routing: RoutingPolicy) -> None:
        self.lt = LoopThread()
        config = SimConfig(ttft_ms=2, itl_ms=1, prefix_cache_blocks=2000, prefill_ms_per_block=1)
        self.sims: list[SimServer] = [self.lt.run(start_sim(config)) for _ in range(3)]
        urls = tuple(s.url for s in self.sims)
        backend = Backend(name="sim", urls=urls, routing=routing)
        snapshot = routed_snapshot(urls[0], {"chat": {}}, backend=backend)
        self.proxy = ProxyHarness(snapshot, lt=self.lt)
        self.client = httpx.Client(timeout=30)

    def served(self) -> list[int]:
        return [s.stats.requests for s in self.sims]

    def chat(self, system: str, question: str, **extra: Any) -> int:
        """Sends one chat request; returns the index of the replica that served it."""
        before = self.served()
        self.post(system, question, **extra)
        after = self.served()
        changed = [i for i in range(3) if after[i] != before[i]]
        assert len(changed) == 1, (before, after)
        return changed[0]

    def post(
        self, system: str, question: str, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        body = {
            "model": "chat",
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": question},
            ],
            "max_tokens": 2,
            **extra,
        }
        response = self.client.post(
            self.proxy.url + "/v1/chat/completions", json=body, headers=headers
        )
        assert response.status_code == 200, response.text

    def in_flight(self) -> list[int]:
        backend = self.proxy.ref.current.backends["sim"]
        return self.lt.call(
            lambda: [r.pool.outstanding for r in self.proxy.app.pools.replicas(backend)]
        )

    def hold(
        self,
        pool: ThreadPoolExecutor,
        count: int,
        system: str,
        seconds: float,
        headers: dict[str, str] | None = None,
        delay: str = "slow_first_byte_ms",
    ) -> list[Any]:
        """`count` requests that stay in flight for `seconds` (the sim delays its answer),
        sent one after the other so each choice sees the ones before it."""
        futures = []
        arrived = sum(self.served())
        for i in range(count):
            sim = {delay: seconds * 1000}
            futures.append(pool.submit(self.post, system, f"hold {i}", headers, sim=sim))
            # In flight at the proxy and arrived at its simulator: the proxy counts a
            # request before its bytes reach the replica, and `chat` reads the replicas'
            # counts, so a hold still on the wire would look like a second replica served.
            wait_until(
                lambda n=i + 1: sum(self.in_flight()) == n and sum(self.served()) == arrived + n,
                10,
            )
        return futures

    def set_healthy(self, index: int, healthy: bool) -> None:
        """What the active health probe sets (proxy/health.py) when a replica goes down."""
        backend = self.proxy.ref.current.backends["sim"]
        replica = self.proxy.app.pools.replicas(backend)[index]
        self.lt.call(lambda: setattr(replica, "healthy", healthy))

    def close(self) -> None:
        self.client.close()
        self.lt.run(self.proxy.server.close())
        self.lt.call(self.proxy.app.pools.close)
        for sim in self.sims:
            self.lt.run(sim.close())
        self.lt.stop()


def wait_until(predicate: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.fixture
def make_cluster() -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(**routing: Any) -> Cluster:
        made.append(Cluster(RoutingPolicy(**routing)))
        return made[-1]

    yield make
    for cluster in made:
        cluster.close()


def test_tenant_stays_on_the_replica_holding_its_prefix(make_cluster: Any) -> None:
    cluster = make_cluster(scrape_interval=None)
    homes: dict[int, set[int]] = {t: set() for t in range(3)}
    for round_ in range(4):
        for t, system in enumerate(TENANTS):
            homes[t].add(cluster.chat(system, f"question {round_} of tenant {t}?"))
    assert all(len(replicas) == 1 for replicas in homes.values()), homes
    # An idle backend spreads new prefixes round the replicas instead of piling them on one.
    assert len({next(iter(r)) for r in homes.values()}) == 3, homes
    hits = [s.app.prefix_cache.hit_tokens for s in cluster.sims if s.app.prefix_cache]
    assert min(hits) > 0, hits  # every replica re-used its tenant's blocks


def test_cache_salt_is_part_of_the_key(make_cluster: Any) -> None:
    cluster = make_cluster(scrape_interval=None)
    salted = {cluster.chat(TENANTS[0], f"q{i}", cache_salt="app-1") for i in range(3)}
    assert len(salted) == 1
    body = {"messages": [{"role": "system", "content": TENANTS[0]}]}
    plain = chain_hashes(prompt_bytes(body, True), 256)
    assert plain != chain_hashes(prompt_bytes(body, True), 256, "app-1")
    assert (
        chain_hashes(prompt_bytes(body, True), 256, "app-1")[:3]
        == chain_hashes(
            prompt_bytes({"messages": [*body["messages"], {"role": "user", "content": "x"}]}, True),
            256,
            "app-1",
        )[:3]
    )


def test_loaded_replica_loses_its_bonus_and_load_decides(make_cluster: Any) -> None:
    cluster = make_cluster(scrape_interval=None, max_imbalance=2)
    home = cluster.chat(TENANTS[0], "warm up")
    assert cluster.chat(TENANTS[0], "again") == home
    with ThreadPoolExecutor(8) as pool:
        # Three requests of the same tenant in flight on its home replica (3 - 0 > 2).
        futures = cluster.hold(pool, 3, TENANTS[0], 1.5)
        assert cluster.in_flight()[home] == 3
        spilled = cluster.chat(TENANTS[0], "while loaded")
        assert spilled != home
        for future in futures:
            future.result()
    assert cluster.in_flight() == [0, 0, 0]
    # Unloaded again: back to a replica that holds the prefix (now both do).
    assert cluster.chat(TENANTS[0], "after") in {home, spilled}


def test_unique_prompts_balance_by_load(make_cluster: Any) -> None:
    cluster = make_cluster(scrape_interval=None)
    with ThreadPoolExecutor(8) as pool:
        futures = cluster.hold(pool, 6, "", 1.0)
        assert sorted(cluster.in_flight()) == [2, 2, 2]
        for future in futures:
            future.result()


def test_session_header_pins_and_falls_back_when_overloaded(make_cluster: Any) -> None:
    cluster = make_cluster(scrape_interval=None, session_header="x-session-id", max_imbalance=1)
    session = {"x-session-id": "user-42"}
    pinned = {cluster.chat("", f"unrelated question {i}", headers=session) for i in range(4)}
    assert len(pinned) == 1  # no shared prefix: the session alone keeps them together
    home = pinned.pop()
    with ThreadPoolExecutor(8) as pool:
        futures = cluster.hold(pool, 2, "", 1.5, headers=session)
        assert cluster.in_flight()[home] == 2  # the pin held while within max_imbalance
        moved = cluster.chat("", "overloaded", headers=session)
        assert moved != home
        for future in futures:
            future.result()
    # The pin follows the fallback: the session's latest turns are cached there now.
    assert cluster.chat("", "recovered", headers=session) == moved
    # A pinned replica that fails its health check is skipped too.
    cluster.set_healthy(moved, False)
    elsewhere = cluster.chat("", "while down", headers=session)
    assert elsewhere != moved
    cluster.set_healthy(moved, True)
    assert cluster.chat("", "back", headers=session) == elsewhere


def test_scraper_reads_vllm_load_figures(make_cluster: Any) -> None:
    cluster = make_cluster(scrape_interval=0.05)
    scraper = LoadScraper(cluster.proxy.ref, cluster.proxy.app.pools)
    cluster.lt.call(scraper.start)
    try:
        first = cluster.sims[0]
        text = cluster.lt.run(fetch_metrics(Origin(first.url), "/metrics", 2.0))
        figures = parse_metrics(text)
        assert figures.seen and figures.waiting == 0 and figures.kv_usage == 0
        with ThreadPoolExecutor(8) as pool:
            # A long TTFT: admitted (its blocks held in the KV cache) and running.
            futures = cluster.hold(pool, 3, TENANTS[1], 1.0, delay="ttft_ms")
            state = cluster.proxy.app.pools.router.states
            wait_until(lambda: sum(state[s.url].running for s in cluster.sims) == 3, 5)
            assert sum(state[s.url].kv_usage > 0 for s in cluster.sims) >= 1
            for future in futures:
                future.result()
    finally:
        cluster.lt.run(scraper.aclose())


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
        b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\n\r\n",
    ],
    ids=["switching-protocols", "bad-length", "503"],
)
def test_a_metrics_answer_that_is_not_one_is_a_value_error(answer: bytes) -> None:
    """The scrape loop catches OSError, ValueError and TimeoutError: anything else ended
    it, and the replica's load figures were never read again (a 101 did)."""
    lt = LoopThread()
    backend = RawBackend(lt, answer)
    try:
        with pytest.raises(ValueError):
            lt.run(fetch_metrics(Origin(backend.url), "/metrics", 2.0))
    finally:
        backend.stop()
        lt.stop()


def test_parse_metrics_sums_engines_and_ignores_other_names() -> None:
    text = (
        b"# HELP vllm:num_requests_waiting x\n"
        b'vllm:num_requests_waiting{engine="0",model_name="m"} 3.0\n'
        b'vllm:num_requests_waiting{engine="1",model_name="m x"} 2.0\n'
        b'vllm:num_requests_running{engine="0"} 7\n'
        b"vllm:num_requests_running_total 99\n"
        b'vllm:kv_cache_usage_perc{engine="0"} 0.25\n'
        b'vllm:kv_cache_usage_perc{engine="1"} 0.5\n'
        b"vllm:kv_cache_usage_perc_other 0.9\n"
    )
    figures = parse_metrics(text)
    assert (figures.waiting, figures.running, figures.kv_usage) == (5.0, 7.0, 0.5)
    assert not parse_metrics(b"process_cpu_seconds_total 1\n").seen


def test_hashing_a_4k_token_prompt_is_cheap() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "word " * 3276},
            {"role": "user", "content": "q"},
        ]
    }  # 16 KiB of text: ~4k tokens
    rounds = 200
    started = time.perf_counter()
    for _ in range(rounds):
        chain_hashes(prompt_bytes(body, True), 256, "salt")
    per_prompt = (time.perf_counter() - started) / rounds
    # ~70 us on this machine (docs/ROUTING.md); 1 ms leaves room for a busy CI box.
    assert per_prompt < 0.001, per_prompt
    assert replace(RoutingPolicy(), block_chars=64).block_chars == 64
