"""Deadlines on time: the inter-token deadline starts with the first token (issue 12 defect 5),
a backend that never sends its response head is cut (defect 6), and `GET /v1/models`
forwarding is bounded and leaves no connection behind."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from sluice.proxy.snapshot import (
    DEFAULT_TIMEOUTS,
    Backend,
    Route,
    Snapshot,
    StreamPolicy,
    StreamTimeouts,
)

from tests.fixtures import ProcessServer, ProxyHarness, SimClient, routed_snapshot, stream_request
from tests.proxy.raw_backends import RawBackend

MSG = [{"role": "user", "content": "Hello"}]


def _policy(timeouts: StreamTimeouts) -> StreamPolicy:
    return StreamPolicy(name="deadlines", timeouts=timeouts)


@pytest.fixture
def silent() -> Iterator[RawBackend]:
    backend = RawBackend("silent")
    yield backend
    backend.close()


def test_stall_after_three_tokens_is_cut_one_inter_token_after_the_last(
    sim: ProcessServer, sim_client: SimClient
) -> None:
    timeouts = StreamTimeouts(first_token=2.0, inter_token=1.0)
    harness = ProxyHarness(routed_snapshot(sim.url, {"chat": {"policy": _policy(timeouts)}}))
    try:
        body = {
            "model": "chat",
            "messages": MSG,
            "stream": True,
            "max_tokens": 50,
            "sim": {"stall_after": 3},
        }
        result = stream_request(harness.url, body)
        data = result.data()
        assert data[-1] == "[DONE]"
        assert data[-2]["error"]["code"] == "inter_token_timeout"
        times = result.content_times()
        assert len(times) == 3
        cut_at = result.events[-1][0]
        # 1 s after the last token, not at the first-token deadline (2 s after the start).
        assert 0.95 <= cut_at - times[-1] < 1.6
        assert cut_at < 1.85
        sim_client.wait_for(lambda s: s["aborted"] >= 1, timeout=2.0)
    finally:
        harness.close()


def test_route_without_policy_has_the_default_deadlines() -> None:
    route = Route(model="m", backend=Backend(name="b", urls=("http://127.0.0.1:1",)),
                  upstream_model=None)  # fmt: skip
    assert route.policy.timeouts == DEFAULT_TIMEOUTS
    assert all(
        value is not None
        for value in (
            DEFAULT_TIMEOUTS.first_token,
            DEFAULT_TIMEOUTS.inter_token,
            DEFAULT_TIMEOUTS.total,
            DEFAULT_TIMEOUTS.response_head,
        )
    )


def _passthrough(url: str, timeouts: StreamTimeouts) -> Snapshot:
    backend = Backend(name="raw", urls=(url,))
    route = Route(model="*", backend=backend, upstream_model=None, policy=_policy(timeouts))
    return Snapshot(version="t", routes={}, backends={"raw": backend}, fallback_route=route)


def test_backend_that_never_answers_is_cut_at_the_response_head_deadline(
    silent: RawBackend,
) -> None:
    harness = ProxyHarness(_passthrough(silent.url, StreamTimeouts(response_head=0.5)))
    try:
        start = time.monotonic()
        result = stream_request(harness.url, {"model": "m", "messages": MSG, "stream": True})
        elapsed = time.monotonic() - start
        data = result.data()
        assert data[-2]["error"]["code"] == "response_head_timeout"
        assert 0.5 <= elapsed < 1.5
        assert silent.requests == 1
        assert harness.open_upstream_connections() == 0
        assert harness.permits_in_use() == 0
    finally:
        harness.close()


def test_models_forwarding_times_out_and_leaks_no_connection(silent: RawBackend) -> None:
    harness = ProxyHarness(_passthrough(silent.url, StreamTimeouts(response_head=0.5)))
    try:
        start = time.monotonic()
        r = httpx.get(harness.url + "/v1/models", timeout=10)
        elapsed = time.monotonic() - start
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "response_head_timeout"
        assert 0.5 <= elapsed < 1.5
        assert harness.open_upstream_connections() == 0
    finally:
        harness.close()


def test_models_forwarding_reuses_its_connection(sim: ProcessServer) -> None:
    harness = ProxyHarness(_passthrough(sim.url, DEFAULT_TIMEOUTS))
    try:
        for _ in range(3):
            r = httpx.get(harness.url + "/v1/models", timeout=10)
            assert r.status_code == 200 and r.json()["data"][0]["id"] == "sim-model"
        assert harness.open_upstream_connections() == 1
    finally:
        harness.close()
