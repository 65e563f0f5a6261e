"""Issue 12's reproducers against the real proxy on loopback, in front of the simulator:
each was a wrong answer (a 500, no answer, an empty reply) and is now a defined one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from sluice.proxy.adapters import Adapter
from sluice.proxy.endpoints import GENERATING
from sluice.proxy.snapshot import Route, SamplingPlan

from tests.fixtures import ProcessServer, SimClient, routed_snapshot
from tests.reliability.fixtures import TunedHarness, census, exchange, statuses

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture
def proxy(sim: ProcessServer) -> Iterator[TunedHarness]:
    # A preset and an upstream model name: the body is re-encoded for the backend, the
    # path where deep nesting used to fail.
    plan = SamplingPlan(name="p", defaults={"temperature": 0.5})
    h = TunedHarness(routed_snapshot(sim.url, {"chat": {"preset": plan}}))
    yield h
    h.close()


def _post(body: bytes, path: bytes = b"/v1/chat/completions", extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n" % path + (
        b"Content-Length: %d\r\n%b\r\n%b" % (len(body), extra, body)
    )


def _nested(depth: int) -> bytes:
    inner = b"[" * depth + b"]" * depth
    return b'{"model":"chat","messages":[{"role":"user","content":"hi"}],"max_tokens":2,"x":%s}' % (
        inner
    )


@pytest.mark.parametrize("depth", [200, 254, 300, 1024, 1100])
def test_deeply_nested_json_is_a_400_recorded_as_400(
    proxy: TunedHarness, sim_client: SimClient, depth: int
) -> None:
    data, _ = exchange(proxy.port, _post(_nested(depth)))
    assert statuses(data) == [400]
    assert b'"code":"json_too_deep"' in data
    assert sim_client.stats()["requests"] == 0  # refused before anything else
    assert proxy.finished[-1].status == 400
    assert proxy.requests_by_status() == {"400": 1.0}


def test_nesting_within_the_limit_reaches_the_backend(
    proxy: TunedHarness, sim_client: SimClient
) -> None:
    data, _ = exchange(proxy.port, _post(_nested(100)))
    assert statuses(data) == [200]
    assert sim_client.stats()["requests"] == 1


class _BrokenPayload(Adapter):
    """The chat endpoint with a bug where the request for the backend is built."""

    def payload(self, body: dict[str, Any], raw: bytes, modified: bool, route: Route) -> bytes:
        raise RuntimeError("injected bug")


def test_an_internal_error_is_recorded_as_500_not_0(
    proxy: TunedHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug injected inside the pipeline (after routing, before the backend): the client
    # gets a 500 and the access record, metrics and /admin/status see 500. (Through an
    # adapter: the compiled handler's own methods cannot be replaced.)
    monkeypatch.setitem(GENERATING, "/v1/chat/completions", _BrokenPayload())
    body = orjson.dumps({"model": "chat", "messages": MSG, "max_tokens": 2})
    data, _ = exchange(proxy.port, _post(body))
    assert statuses(data) == [500]
    assert b"injected bug" not in data  # no internals to the client
    assert proxy.finished[-1].status == 500
    assert proxy.finished[-1].error_code == "internal_error"
    assert proxy.requests_by_status() == {"500": 1.0}
    assert census(proxy).permits == 0


def test_a_complete_request_with_a_trailing_byte_gets_the_completion(
    proxy: TunedHarness, sim_client: SimClient
) -> None:
    body = orjson.dumps({"model": "chat", "messages": MSG, "max_tokens": 3})
    data, _ = exchange(proxy.port, _post(body) + b"}")
    assert statuses(data) == [200, 400]
    assert b'"chat.completion"' in data
    assert sim_client.stats()["requests"] == 1


def test_http10_post_without_content_length_gets_411(
    proxy: TunedHarness, sim_client: SimClient
) -> None:
    body = orjson.dumps({"model": "chat", "messages": MSG, "max_tokens": 3})
    data, _ = exchange(proxy.port, b"POST /v1/chat/completions HTTP/1.0\r\nHost: t\r\n\r\n" + body)
    assert statuses(data) == [411]
    assert sim_client.stats()["requests"] == 0


@pytest.mark.parametrize(
    "upgrade",
    [
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n",
        b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    ],
    ids=["h2c", "websocket"],
)
def test_upgrade_attempts_get_a_normal_completion(proxy: TunedHarness, upgrade: bytes) -> None:
    body = orjson.dumps({"model": "chat", "messages": MSG, "max_tokens": 3})
    data, _ = exchange(proxy.port, _post(body, extra=upgrade))
    assert statuses(data) == [200]
    assert b'"chat.completion"' in data


def test_post_healthz_is_405(proxy: TunedHarness) -> None:
    resp = httpx.post(proxy.url + "/healthz")
    assert resp.status_code == 405
    assert resp.headers["allow"] == "GET"
    assert httpx.get(proxy.url + "/healthz").status_code == 200
