"""`sluice.client` against the real proxy: resume through a network that cuts connections,
retries that honour Retry-After, and a clear error where resuming is impossible."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sluice.client import AsyncSluiceClient, SluiceClient, StreamError
from sluice.proxy.snapshot import Backend, QueueLimits, StreamPolicy

from tests.fixtures import ProcessServer, ProxyHarness, routed_snapshot
from tests.streams.fixtures import CuttingRelay, raw_stream

RESUMABLE = StreamPolicy(name="r", resume_window=5.0)
REQUEST: dict[str, Any] = {
    "model": "chat",
    "messages": [{"role": "user", "content": "Write a long answer"}],
    "max_tokens": 80,
    "seed": 11,
}


def make(sim_url: str, policy: StreamPolicy, **backend_kw: Any) -> ProxyHarness:
    backend = Backend(name="sim", urls=(sim_url,), **backend_kw)
    return ProxyHarness(routed_snapshot(sim_url, {"chat": {"policy": policy}}, backend=backend))


@pytest.fixture
def proxy(sim: ProcessServer) -> Iterator[ProxyHarness]:
    h = make(sim.url, RESUMABLE)
    yield h
    h.close()


def reference_text(proxy: ProxyHarness) -> str:
    result = raw_stream(proxy.url, "POST", "/v1/chat/completions", {**REQUEST, "stream": True})
    assert result.complete
    return result.text()


def test_sync_client_resumes_through_cut_connections(proxy: ProxyHarness) -> None:
    expected = reference_text(proxy)
    relay = CuttingRelay(proxy.port, cuts=[1500, 2600, 900])  # three cuts mid-stream
    try:
        with SluiceClient(relay.url, retries=6) as client:
            text = "".join(client.stream_chat(**REQUEST))
        assert relay.cut == 3
        assert text == expected  # nothing lost, nothing repeated
    finally:
        relay.close()


def test_async_client_resumes_through_cut_connections(proxy: ProxyHarness) -> None:
    expected = reference_text(proxy)
    relay = CuttingRelay(proxy.port, cuts=[1200, 2000])

    async def run() -> str:
        async with AsyncSluiceClient(relay.url, retries=6) as client:
            return "".join([delta async for delta in client.stream_chat(**REQUEST)])

    try:
        assert asyncio.run(run()) == expected
        assert relay.cut == 2
    finally:
        relay.close()


def test_client_waits_for_retry_after_then_succeeds(sim: ProcessServer) -> None:
    h = make(
        sim.url,
        StreamPolicy(name="plain", keepalive_interval=None),
        max_concurrency=1,
        queue=QueueLimits(max_len=1, max_wait=0.1),
    )
    try:
        busy = threading.Thread(
            target=raw_stream,
            args=(h.url, "POST", "/v1/chat/completions"),
            kwargs={"body": {**REQUEST, "stream": True, "sim": {"itl_ms": 10}}},
            daemon=True,
        )
        busy.start()
        time.sleep(0.3)
        start = time.monotonic()
        with SluiceClient(h.url, retries=3) as client:
            text = "".join(client.stream_chat(**{**REQUEST, "max_tokens": 5}))
        assert text
        assert time.monotonic() - start >= 0.9  # Retry-After: 1 (whole seconds)
        busy.join(10)
    finally:
        h.close()


def test_a_cut_on_a_route_without_resume_is_a_clear_error(sim: ProcessServer) -> None:
    h = make(sim.url, StreamPolicy(name="plain"))
    relay = CuttingRelay(h.port, cuts=[1500])
    try:
        with SluiceClient(relay.url) as client, pytest.raises(StreamError, match="not resumable"):
            for _ in client.stream_chat(**REQUEST):
                pass
    finally:
        relay.close()
        h.close()
