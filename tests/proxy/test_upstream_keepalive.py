"""The backend's idle keep-alive race (issue 12 defect 7): pooled connections expire before
the backend's own idle timeout, a request on a reused connection that closes before any
response byte is resent once on a fresh connection (counted), and never once a response
began. Against raw backends that close at a chosen moment, and the simulator closing idle
connections like vLLM's server under concurrent load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvloop
from prometheus_client import CollectorRegistry
from sluice.proxy.deadlines import Deadlines
from sluice.proxy.metrics import Metrics
from sluice.proxy.upstream_pool import Origin, UpstreamPool, open_exchange

from tests.fixtures import ProcessServer, ProxyHarness, passthrough_snapshot, start_sim
from tests.proxy.raw_backends import RawBackend

BODY = {"model": "sim-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


def _chat(url: str, client: httpx.Client | None = None) -> httpx.Response:
    if client is not None:
        return client.post(url + "/v1/chat/completions", json=BODY)
    return httpx.post(url + "/v1/chat/completions", json=BODY, timeout=10)


@pytest.fixture
def raw(request: pytest.FixtureRequest) -> Iterator[RawBackend]:
    backend = RawBackend(request.param)
    yield backend
    backend.close()


@pytest.mark.parametrize("raw", ["close_reused"], indirect=True)
def test_reused_connection_closed_before_responding_is_retried_once(raw: RawBackend) -> None:
    harness = ProxyHarness(passthrough_snapshot(raw.url, idle_timeout=30.0))
    try:
        assert _chat(harness.url).status_code == 200
        second = _chat(harness.url)  # pooled connection; the backend closes it unanswered
        assert second.status_code == 200, second.text
        # First connection: two requests (the second unanswered); the resend on a fresh one.
        assert raw.requests_per_connection == [2, 1]
        assert [ex.upstream_retries for ex in harness.finished] == [0, 1]
        assert harness.lt.call(harness.app.pools.retries) == 1
        metrics = Metrics(CollectorRegistry())
        for ex in harness.finished:
            metrics.observe(ex)
        counted = metrics.registry.get_sample_value(
            "sluice_upstream_retries_total", {"backend": "sim"}
        )
        assert counted == 1
    finally:
        harness.close()


@pytest.mark.parametrize("raw", ["break_reused"], indirect=True)
def test_a_response_that_began_is_never_resent(raw: RawBackend) -> None:
    harness = ProxyHarness(passthrough_snapshot(raw.url, idle_timeout=30.0))
    try:
        assert _chat(harness.url).status_code == 200
        broken = _chat(harness.url)
        assert broken.status_code == 502
        assert broken.json()["error"]["code"] == "upstream_reset"
        assert raw.requests_per_connection == [2]  # sent once, not again
        assert harness.lt.call(harness.app.pools.retries) == 0
        assert harness.open_upstream_connections() == 0
    finally:
        harness.close()


@pytest.mark.parametrize("raw", ["close_reused"], indirect=True)
def test_idle_connections_expire_before_reuse(raw: RawBackend) -> None:
    harness = ProxyHarness(passthrough_snapshot(raw.url, idle_timeout=0.3))
    try:
        assert _chat(harness.url).status_code == 200
        time.sleep(0.5)
        assert _chat(harness.url).status_code == 200
        # The idle connection was not offered to the second request: no race, no retry.
        assert raw.requests_per_connection == [1, 1]
        assert harness.lt.call(harness.app.pools.retries) == 0
    finally:
        harness.close()


@pytest.fixture(scope="module")
def closing_sim() -> Iterator[ProcessServer]:
    """A simulator that closes keep-alive connections idle for 1 s (vLLM: 5 s)."""
    server = start_sim("--ttft-ms", "5", "--itl-ms", "1", "--keepalive-timeout", "1")
    yield server
    server.stop()


@pytest.mark.parametrize("idle_timeout", [30.0, 0.8])
def test_backend_closing_idle_connections_under_concurrency(
    closing_sim: ProcessServer, idle_timeout: float
) -> None:
    """Waves of 12 concurrent requests whose gaps straddle the moment the simulator closes
    the pooled connections. Above the backend's idle timeout (30 s) sluice races it and
    resends; below it (0.8 s) it never picks a connection the backend may be closing.
    Either way, every request succeeds."""
    harness = ProxyHarness(passthrough_snapshot(closing_sim.url, idle_timeout=idle_timeout))
    statuses: list[int] = []
    try:
        with (
            ThreadPoolExecutor(12) as pool,
            httpx.Client(timeout=10, limits=httpx.Limits(max_connections=12)) as client,
        ):
            for gap in (0.0, 1.0, 1.1, 1.2, 1.3):
                time.sleep(gap)
                statuses += pool.map(lambda _: _chat(harness.url, client).status_code, range(12))
        retries = harness.lt.call(harness.app.pools.retries)
        assert statuses == [200] * 60, statuses
        if idle_timeout < 1.0:
            assert retries == 0
        assert sum(ex.upstream_retries for ex in harness.finished) == retries
    finally:
        harness.close()


@pytest.mark.parametrize("terminator_after", [0.05, None])
def test_a_stream_connection_is_pooled_once_its_terminator_arrives_else_closed(
    terminator_after: float | None,
) -> None:
    """vLLM's server writes the chunked terminator after [DONE] in a write of its own: the
    connection is pooled when it arrives, and closed if it does not come within the limit
    (a backend that never ends its message must not be reused)."""
    within = 0.3

    async def main() -> tuple[bool, bool]:
        closed = asyncio.Event()

        async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)
            event = b"data: [DONE]\n\n"
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(event), event)
            )
            await writer.drain()
            if terminator_after is not None:
                await asyncio.sleep(terminator_after)
                writer.write(b"0\r\n\r\n")
            await reader.read()  # until the proxy closes the connection
            closed.set()
            writer.close()

        server = await asyncio.start_server(backend, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = UpstreamPool(Origin(f"http://127.0.0.1:{port}"), 5.0)
        try:
            conn = await open_exchange(pool, b"POST", b"/v1/chat/completions", [], b"{}")
            pool.release_when_complete(conn, within, Deadlines(asyncio.get_running_loop()))
            await asyncio.sleep(within + 0.2)
            pooled = pool.idle == [conn]
            was_closed = conn.closed
            if not pooled:
                await asyncio.wait_for(closed.wait(), 2.0)
            return pooled, was_closed
        finally:
            pool.close()
            server.close()

    pooled, was_closed = uvloop.run(main())
    if terminator_after is not None:
        assert pooled and not was_closed
    else:
        assert not pooled and was_closed
