"""`stream` must be a JSON boolean on every generating endpoint. vLLM reads "true", 1 or
"yes" as true and streams; sluice relayed such a stream as one answer, after the last
token, without stream deadlines and without the route's stop strings (an audit's finding).
Anything but true, false or null is now a 400 that names the field, before the backend."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sluice.proxy.snapshot import StreamPolicy
from sluice.proxy.stopwords import GuardSpec

from tests.fixtures import ProcessServer, ProxyHarness, SimClient, routed_snapshot

MESSAGES = [{"role": "user", "content": "hi"}]
BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": "chat", "messages": MESSAGES, "max_tokens": 3},
    "/v1/completions": {"model": "chat", "prompt": "hi", "max_tokens": 3},
    "/v1/responses": {"model": "chat", "input": "hi", "max_output_tokens": 3},
    "/v1/messages": {"model": "chat", "messages": MESSAGES, "max_tokens": 3},
}
STOP = StreamPolicy(name="no-hash", stop=("###",), guard=GuardSpec(stop=("###",)))


@pytest.fixture
def proxy(sim: ProcessServer) -> Iterator[ProxyHarness]:
    harness = ProxyHarness(routed_snapshot(sim.url, {"chat": {"policy": STOP}}))
    yield harness
    harness.close()


@pytest.mark.parametrize("path", list(BODIES))
@pytest.mark.parametrize("stream", ["true", 1, "yes", 0, "false", [], {}, 1.0])
def test_a_stream_flag_that_is_not_a_boolean_is_a_400(
    proxy: ProxyHarness, sim: ProcessServer, path: str, stream: object
) -> None:
    sim_client = SimClient(sim.url)
    sim_client.reset()
    resp = httpx.post(proxy.url + path, json={**BODIES[path], "stream": stream}, timeout=10)
    assert resp.status_code == 400, resp.text
    assert "Invalid type for 'stream': expected a boolean" in resp.text
    if path != "/v1/messages":  # Anthropic's error shape has no param
        assert resp.json()["error"]["param"] == "stream"
    assert sim_client.stats()["requests"] == 0


@pytest.mark.parametrize("path", list(BODIES))
@pytest.mark.parametrize("stream", [None, False, True])
def test_true_false_and_null_are_read_as_before(
    proxy: ProxyHarness, path: str, stream: object
) -> None:
    resp = httpx.post(proxy.url + path, json={**BODIES[path], "stream": stream}, timeout=10)
    assert resp.status_code == 200, resp.text
    is_sse = resp.headers["content-type"].startswith("text/event-stream")
    assert is_sse == (stream is True)
