"""Hot state follows each snapshot swap (issue 12 defect 8): limits are set at the swap, not
lazily by requests (so one holding an older snapshot cannot set old limits back), a changed
connect_timeout takes effect, and limiters and pools of removed apps and backends go."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import httpx
import pytest
from sluice.proxy.snapshot import App, Backend, QueueLimits, Snapshot

from tests.fixtures import ProcessServer, ProxyHarness, routed_snapshot, stream_request

MSG = [{"role": "user", "content": "Hi"}]


def _app(max_concurrency: int | None = None) -> App:
    digest = hashlib.sha256(b"sk-app").digest()
    return App(name="app", key_hashes=frozenset({digest}), routes=None,
               max_concurrency=max_concurrency)  # fmt: skip


def _snapshot(url: str, version: str, *, backend_limit: int, app_limit: int | None) -> Snapshot:
    backend = Backend(name="sim", urls=(url,), max_concurrency=backend_limit, queue=QueueLimits())
    app = _app(app_limit)
    return routed_snapshot(
        url,
        {"chat": {}},
        version=version,
        backend=backend,
        apps=(app,),
        apps_by_key={next(iter(app.key_hashes)): app},
    )


def _limits(harness: ProxyHarness) -> dict[str, int]:
    return dict(
        harness.lt.call(
            lambda: {lim.name: lim.max_concurrency for lim in harness.app.limiters.all()}
        )
    )


AUTH = {"authorization": "Bearer sk-app"}


def test_limits_are_set_at_the_swap_and_an_old_snapshot_cannot_set_them_back(
    sim: ProcessServer,
) -> None:
    harness = ProxyHarness(_snapshot(sim.url, "v1", backend_limit=8, app_limit=1))
    try:
        assert _limits(harness) == {"backend:sim": 8, "app:app": 1}
        results: dict[str, object] = {}

        def slow() -> None:  # holds the app's only permit for ~0.8 s
            body = {"model": "chat", "messages": MSG, "stream": True, "max_tokens": 40,
                    "sim": {"itl_ms": 20}}  # fmt: skip
            results["slow"] = stream_request(harness.url, body, headers=AUTH).status

        def queued() -> None:  # captures snapshot v1, waits for the app permit
            r = httpx.post(harness.url + "/v1/chat/completions", headers=AUTH, timeout=10,
                           json={"model": "chat", "messages": MSG, "max_tokens": 2})  # fmt: skip
            results["queued"] = r.status_code

        first = threading.Thread(target=slow)
        first.start()
        time.sleep(0.2)
        second = threading.Thread(target=queued)
        second.start()
        time.sleep(0.2)
        harness.swap(_snapshot(sim.url, "v2", backend_limit=3, app_limit=1))
        # Set at the swap: an idle limiter shows the new limit at once.
        assert _limits(harness)["backend:sim"] == 3
        first.join(10)
        second.join(10)
        assert results == {"slow": 200, "queued": 200}
        # The queued request ran on snapshot v1 (backend limit 8) after the swap: the
        # limiter keeps v2's number.
        assert _limits(harness)["backend:sim"] == 3
    finally:
        harness.close()


def test_removed_app_and_backend_are_pruned(sim: ProcessServer) -> None:
    harness = ProxyHarness(_snapshot(sim.url, "v1", backend_limit=8, app_limit=2))
    try:
        r = httpx.post(harness.url + "/v1/chat/completions", headers=AUTH, timeout=10,
                       json={"model": "chat", "messages": MSG, "max_tokens": 2})  # fmt: skip
        assert r.status_code == 200
        assert harness.open_upstream_connections() == 1  # pooled
        other = Backend(name="other", urls=("http://127.0.0.1:9",))
        swapped = Snapshot(version="v2", routes={}, backends={"other": other})
        harness.swap(swapped)
        assert _limits(harness) == {"backend:other": 256}
        urls = harness.lt.call(lambda: [r.pool.origin.url for r in harness.app.pools.all()])
        assert urls == ["http://127.0.0.1:9"]
        assert harness.open_upstream_connections() == 0  # the idle one was closed
    finally:
        harness.close()


@pytest.fixture
def unaccepting() -> Iterator[str]:
    """A listener whose accept queue is full: a connect to it hangs until its timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=2)
    yield f"http://127.0.0.1:{port}"
    filler.close()
    listener.close()


def test_changed_connect_timeout_takes_effect(unaccepting: str) -> None:
    backend = Backend(name="sim", urls=(unaccepting,), connect_timeout=30.0)
    first = routed_snapshot(unaccepting, {"chat": {}}, backend=backend)
    harness = ProxyHarness(first)
    try:
        quick = replace(backend, connect_timeout=0.4)
        harness.swap(routed_snapshot(unaccepting, {"chat": {}}, version="v2", backend=quick))
        start = time.monotonic()
        r = httpx.post(harness.url + "/v1/chat/completions", timeout=10,
                       json={"model": "chat", "messages": MSG, "max_tokens": 2})  # fmt: skip
        elapsed = time.monotonic() - start
        assert r.status_code == 502
        assert "timed out after 0.4s" in r.json()["error"]["message"]
        assert 0.4 <= elapsed < 2.0
    finally:
        harness.close()
