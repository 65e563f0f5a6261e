"""The multi-tenant workload of `sluice bench routing` and its bounded load runner.

`shared`: TENANTS tenants, each with its own SYSTEM_CHARS-character system prompt, and a
random question per request (the tenant drawn uniformly); `unique`: a fresh system prompt
per request. Every prompt starts with the run's tag, so no run shares a prefix with
another. Requests are streaming chat completions timed by the `loadgen` protocol (TTFT =
request written -> first content event).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from .loadgen import CONNECT_TIMEOUT, Samples, StreamConnection

_WORD_TEXT = (
    "account billing invoice refund order shipping return policy warranty password login "
    "profile address payment card plan upgrade cancel support ticket status delivery store "
    "product price discount coupon email phone language region tax receipt subscription"
)
WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True)
class RoutingSpec:
    """What `sluice bench routing` runs: its flags, checked (ValueError -> CLI error)."""

    replicas: int = 4
    tenants: int = 40
    system_chars: int = 2000
    concurrency: int = 64
    requests: int = 1200
    max_tokens: int = 16
    ttft_ms: float = 20.0
    itl_ms: float = 20.0
    prefix_cache: int = 1200
    prefill_ms_per_block: float = 1.5
    workers: tuple[int, ...] = ()
    urls: tuple[str, ...] = ()
    model: str = "sim-model"
    timeout: float = 120.0
    seed: int = 1
    shared_index_timeout: float = 0.002

    def __post_init__(self) -> None:
        if not 0 < self.shared_index_timeout <= 1:
            raise ValueError("--shared-index-timeout must be more than 0 and at most 1000 ms")
        if self.urls and len(self.urls) < 2:
            raise ValueError("--urls needs at least two replicas")
        for url in self.urls:
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"--urls: {url!r} is not http://host:port")
        if not 2 <= self.replicas <= 16:
            raise ValueError("--replicas must be in [2, 16]")
        if self.tenants < 1 or self.system_chars < 0 or self.concurrency < 1:
            raise ValueError("--tenants and --concurrency must be at least 1")
        if not 1 <= self.requests <= 100_000 or not 1 <= self.max_tokens <= 4096:
            raise ValueError("--requests must be in [1, 100000], --max-tokens in [1, 4096]")
        if any(not 1 <= w <= 16 for w in self.workers):
            raise ValueError("--workers must be in [1, 16]")


class Workload:
    """Chat bodies: `shared` (tenants' system prompts) or `unique` (one per request)."""

    def __init__(self, spec: RoutingSpec, kind: str, tag: str) -> None:
        self.spec = spec
        self.kind = kind
        self.rng = random.Random(f"{spec.seed}/{kind}/{tag}")
        self.tag = tag
        self.systems = [self._system(f"tenant {t}") for t in range(spec.tenants)]

    def _words(self, chars: int) -> str:
        out: list[str] = []
        size = 0
        while size < chars:
            word = self.rng.choice(WORDS)
            out.append(word)
            size += len(word) + 1
        return " ".join(out)[:chars]

    def _system(self, who: str) -> str:
        head = f"[{self.tag}] You are the assistant of {who}. "
        return head + self._words(max(0, self.spec.system_chars - len(head)))

    def body(self, model: str) -> dict[str, Any]:
        if self.kind == "shared":
            system = self.rng.choice(self.systems)
        else:
            system = self._system(f"customer {self.rng.randrange(1 << 30)}")
        question = self._words(self.rng.randint(40, 120)) + "?"
        return {
            "model": model,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": question},
            ],
            "stream": True,
            "max_tokens": self.spec.max_tokens,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }


def _request(url: str, body: dict[str, Any]) -> bytes:
    parts = urlsplit(url)
    payload = orjson.dumps(body)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
        "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def run_requests(
    url: str, model: str, workload: Workload, spec: RoutingSpec
) -> tuple[Samples, float]:
    """`spec.requests` streams, `spec.concurrency` at a time, within `spec.timeout`."""
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    samples = Samples()
    remaining = spec.requests

    async def worker() -> None:
        nonlocal remaining
        conn: StreamConnection | None = None
        try:
            while remaining > 0:
                remaining -= 1
                request = _request(url, workload.body(model))
                try:
                    if conn is None or conn.closed or not conn.keep_alive:
                        if conn is not None:
                            conn.abort()
                        async with asyncio.timeout(CONNECT_TIMEOUT):
                            _, conn = await loop.create_connection(
                                lambda: StreamConnection(samples), host, port
                            )
                    await conn.exchange(request)
                except (OSError, TimeoutError) as exc:
                    samples.fail("connect", str(exc) or type(exc).__name__)
                    conn = None
        finally:
            if conn is not None:
                conn.abort()

    started = time.perf_counter()
    tasks = [asyncio.ensure_future(worker()) for _ in range(min(spec.concurrency, spec.requests))]
    try:
        async with asyncio.timeout(spec.timeout):
            await asyncio.gather(*tasks)
    except TimeoutError:
        samples.fail("timeout", f"run unfinished after {spec.timeout:g}s")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return samples, time.perf_counter() - started
