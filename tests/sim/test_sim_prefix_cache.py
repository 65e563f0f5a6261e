"""The simulator's prefix cache model: a repeated prompt skips its prefill, a new one pays
per block and queues behind the prefill before it, vLLM's metric names report it."""

from __future__ import annotations

import time
from typing import Any

from sluice.sim.prefixcache import BLOCK_TOKENS

SYSTEM = "You are the support assistant of tenant seven. " * 45  # ~2,000 characters


def _chat(sim: Any, question: str, **extra: Any) -> float:
    started = time.monotonic()
    response = sim.chat(
        messages=[
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
        ],
        max_tokens=1,
        **extra,
    )
    assert response.status == 200, response.body
    return time.monotonic() - started


def _metric(sim: Any, name: str) -> float:
    text = sim.request("GET", "/metrics").body.decode()
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_cached_prefix_skips_prefill_and_salt_separates(make_sim: Any) -> None:
    # ~31 blocks of 16 tokens at 8 ms each: a miss costs ~250 ms, a hit ~8 ms.
    sim = make_sim(prefix_cache_blocks=1000, prefill_ms_per_block=8.0)
    cold = _chat(sim, "How do I reset my password?")
    warm = _chat(sim, "Where is my invoice?")
    salted = _chat(sim, "Where is my invoice?", cache_salt="tenant-7")
    assert cold > 0.2, cold
    assert warm < cold / 3, (cold, warm)
    assert salted > 0.2, salted  # vLLM shares no prefix across salts
    queries = _metric(sim, "vllm:prefix_cache_queries_total")
    hits = _metric(sim, "vllm:prefix_cache_hits_total")
    assert queries >= 3 * 30 * BLOCK_TOKENS
    assert 29 * BLOCK_TOKENS <= hits < 2 * 30 * BLOCK_TOKENS  # only the second was a hit
    assert _metric(sim, "vllm:kv_cache_usage_perc") == 0.0  # nothing in flight


def test_lru_capacity_evicts_and_prefill_queues(make_sim: Any, loops: Any) -> None:
    sim = make_sim(prefix_cache_blocks=60, prefill_ms_per_block=5.0)
    _chat(sim, "first")
    # Another tenant's 33 blocks push the first's 31 out of a 60-block cache.
    sim.chat(messages=[{"role": "system", "content": "Other tenant. " * 150}], max_tokens=1)
    assert _chat(sim, "again") > 0.12
    # Two misses at once: the second waits for the first's prefill (one GPU's compute),
    # and /metrics counts it as waiting meanwhile.
    streams = [
        sim.open_stream(
            "/v1/chat/completions",
            {
                "model": "tiny-llama",
                "messages": [{"role": "user", "content": f"{i} unique " * 400}],
                "max_tokens": 1,
                "stream": True,
            },
        )
        for i in range(2)
    ]
    assert _metric(sim, "vllm:num_requests_waiting") == 1.0
    assert _metric(sim, "vllm:kv_cache_usage_perc") == 1.0  # 2 x 57 blocks held > 60
    for stream in streams:
        assert b"data: [DONE]" in b"".join(stream.read_all().chunks)
    assert _metric(sim, "vllm:num_requests_waiting") == 0.0
