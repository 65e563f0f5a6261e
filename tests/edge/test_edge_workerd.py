"""The rendered Worker in workerd (Cloudflare's runtime, from npm) in front of sluice, and
in front of a scripted origin for what sluice never sends (a half-written event, headers
to echo). Bindings are wrangler.toml's [vars] plus the secret `wrangler secret put` adds."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.edge.fixtures import (
    ORIGIN_SECRET,
    Workerd,
    render,
    start_sluice,
    websocket_exchange,
    write_config,
)
from tests.fixtures import ProcessServer, SimClient, stream_request

pytestmark = pytest.mark.edge

TTFT = 0.020  # the session simulator's
MARGIN = 0.5
KEEPALIVE = 0.3  # edge.cloudflare.keepalive_interval in these tests
APP_ORIGIN = "https://app.example.com"


def gateway(origin: str) -> dict[str, Any]:
    return {
        "backends": [{"name": "sim", "urls": ["http://127.0.0.1:8100"]}],
        "routes": [{"model": "chat", "backend": "sim", "upstream_model": "sim-model"}],
        "edge": {
            "origin_secret": "env:SLUICE_ORIGIN_SECRET",
            "cloudflare": {
                "worker_name": "sluice-edge-test",
                "routes": ["api.example.com/v1/*"],
                "origin": origin,
                "allowed_origins": [APP_ORIGIN],
                "keepalive_interval": f"{int(KEEPALIVE * 1000)}ms",
            },
        },
    }


def start_worker(
    root: Path,
    origin: str,
    *,
    secret: str | None = ORIGIN_SECRET,
    document: dict[str, Any] | None = None,
    files: dict[str, str] | None = None,
) -> Workerd:
    """Renders `document` (default: gateway(origin)) and `files` and runs worker.js with
    wrangler.toml's vars and the secret."""
    config = write_config(root / "render-config", document or gateway(origin), files)
    render("cloudflare", config, root)
    bindings = dict(tomllib.loads((root / "wrangler.toml").read_text())["vars"])
    if secret is not None:
        bindings["SLUICE_ORIGIN_SECRET"] = secret
    return Workerd(root, bindings).start()


@dataclass
class Stack:
    sluice: ProcessServer
    worker: Workerd


@pytest.fixture(scope="module")
def stack(sim: ProcessServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("workerd")
    # --backend points the config's backend at the session simulator.
    config = write_config(root / "config", gateway("http://127.0.0.1:1"))
    sluice = start_sluice(config, env={"SLUICE_ORIGIN_SECRET": ORIGIN_SECRET}, backend=sim.url)
    try:
        worker = start_worker(root / "worker", sluice.url)
    except BaseException:
        sluice.stop()
        raise
    yield Stack(sluice, worker)
    worker.stop()
    sluice.stop()


def chat(max_tokens: int, **sim: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "chat",
        "stream": True,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Hello"}],
    }
    if sim:
        body["sim"] = sim
    return body


def test_stream_arrives_incrementally(stack: Stack, sim_client: SimClient) -> None:
    result = stream_request(stack.worker.url, chat(20, itl_ms=20), timeout=10)
    assert result.status == 200
    assert result.headers["content-type"].startswith("text/event-stream")
    assert result.data()[-1] == "[DONE]"
    times = result.content_times()
    assert len(times) == 20
    assert times[0] < TTFT + MARGIN, times
    assert times[-1] - times[0] > 0.2, times
    assert len({round(t, 3) for t in times}) > 10, times
    assert not any(event.startswith(b":") for _, event in result.events)  # never idle


def test_client_disconnect_at_the_worker_aborts_the_generation(
    stack: Stack, sim_client: SimClient
) -> None:
    result = stream_request(stack.worker.url, chat(2000), stop_after_events=3, timeout=10)
    assert result.status == 200
    sim_client.wait_for(lambda s: s["aborted"] >= 1 and s["active"] == 0, timeout=5.0)


def test_sluice_rejects_requests_without_the_origin_secret(stack: Stack) -> None:
    direct = httpx.post(stack.sluice.url + "/v1/chat/completions", json=chat(2), timeout=5)
    assert direct.status_code == 403
    assert direct.json()["error"]["code"] == "origin_secret_required"
    forged = httpx.post(
        stack.sluice.url + "/v1/chat/completions",
        json=chat(2),
        headers={"x-sluice-origin-secret": "guess"},
        timeout=5,
    )
    assert forged.status_code == 403
    # The Worker replaces whatever the client claims with the real secret.
    through = httpx.post(
        stack.worker.url + "/v1/chat/completions",
        json=chat(2),
        headers={"x-sluice-origin-secret": "guess"},
        timeout=5,
    )
    assert through.status_code == 200
    assert "data: [DONE]" in through.text


def test_worker_without_the_secret_fails_closed(stack: Stack, tmp_path: Path) -> None:
    worker = start_worker(tmp_path, stack.sluice.url, secret=None)
    try:
        response = httpx.post(worker.url + "/v1/chat/completions", json=chat(2), timeout=5)
    finally:
        worker.stop()
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "edge_misconfigured"


def test_cors_preflight_is_answered_at_the_edge(stack: Stack) -> None:
    preflight = {"access-control-request-method": "POST"}
    allowed = httpx.options(
        stack.worker.url + "/v1/chat/completions",
        headers={**preflight, "origin": APP_ORIGIN},
        timeout=5,
    )
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"]
    denied = httpx.options(
        stack.worker.url + "/v1/chat/completions",
        headers={**preflight, "origin": "https://elsewhere.example"},
        timeout=5,
    )
    assert denied.status_code == 403
    assert "access-control-allow-origin" not in denied.headers
    actual = httpx.get(stack.worker.url + "/v1/models", headers={"origin": APP_ORIGIN}, timeout=5)
    assert actual.status_code == 200
    assert actual.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "x-request-id" in actual.headers["access-control-expose-headers"]


def test_cors_preflight_allows_the_headers_the_config_uses(tmp_path: Path) -> None:
    """Last-Event-ID where a route's streams are resumable, a backend's session header."""
    document = gateway("http://127.0.0.1:1")
    document["backends"][0]["routing"] = {"session_header": "X-Chat-Session"}
    document["routes"][0]["policy"] = "resumable"
    policy = "kind: Policy\nname: resumable\nresume_window: 30s\n"
    worker = start_worker(
        tmp_path, "http://127.0.0.1:1", document=document, files={"policy.yaml": policy}
    )
    try:
        allowed = httpx.options(
            worker.url + "/v1/streams/abc",
            headers={
                "access-control-request-method": "GET",
                "access-control-request-headers": "last-event-id, x-chat-session",
                "origin": APP_ORIGIN,
            },
            timeout=5,
        )
    finally:
        worker.stop()
    assert allowed.status_code == 204
    listed = {h.strip() for h in allowed.headers["access-control-allow-headers"].split(",")}
    assert {"last-event-id", "x-chat-session", "authorization"} <= listed


def test_cors_preflight_lists_no_header_the_config_does_not_use(stack: Stack) -> None:
    allowed = httpx.options(
        stack.worker.url + "/v1/chat/completions",
        headers={"access-control-request-method": "POST", "origin": APP_ORIGIN},
        timeout=5,
    )
    assert "last-event-id" not in allowed.headers["access-control-allow-headers"]


def test_silent_origin_gets_keepalive_comments(stack: Stack, sim_client: SimClient) -> None:
    # The backend goes quiet after 2 tokens; sluice (no inter-token timeout) keeps waiting.
    start = time.monotonic()
    result = stream_request(
        stack.worker.url, chat(50, stall_after=2), stop_after_events=7, timeout=10
    )
    took = time.monotonic() - start
    comments = [t for t, event in result.events if event == b": keep-alive"]
    assert len(comments) >= 3, result.events
    gaps = [b - a for a, b in zip(comments, comments[1:], strict=False)]
    assert all(KEEPALIVE * 0.8 < gap < KEEPALIVE + MARGIN for gap in gaps), gaps
    assert took < 5.0
    sim_client.wait_for(lambda s: s["aborted"] >= 1, timeout=5.0)


# -- a scripted origin -----------------------------------------------------------------------


class ScriptedOrigin(BaseHTTPRequestHandler):
    """/v1/echo answers the request's headers as JSON; /v1/split sends one SSE event in two
    writes a second apart."""

    protocol_version = "HTTP/1.0"  # the body ends when the connection closes

    def do_GET(self) -> None:
        if self.path == "/v1/echo":
            body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        self.wfile.write(b'data: {"part": ')
        self.wfile.flush()
        time.sleep(KEEPALIVE * 3)
        self.wfile.write(b'"whole"}\n\ndata: [DONE]\n\n')
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def scripted_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workerd]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedOrigin)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        worker = start_worker(tmp_path_factory.mktemp("scripted"), f"http://127.0.0.1:{port}")
        yield worker
        worker.stop()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_tgi_and_vllm_root_routes_pass_the_worker(stack: Stack) -> None:
    body = {"model": "chat", "inputs": "Hello", "parameters": {"max_new_tokens": 3}}
    response = httpx.post(stack.worker.url + "/generate", json=body, timeout=10)
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["generated_text"], str)
    assert httpx.get(stack.worker.url + "/health", timeout=5).status_code == 200


def test_internal_headers_from_the_client_are_stripped(scripted_worker: Workerd) -> None:
    response = httpx.get(
        scripted_worker.url + "/v1/echo",
        headers={
            "x-sluice-origin-secret": "forged",
            "x-sluice-client-ip": "198.51.100.1",
            "x-sluice-internal": "forged",
            "x-sluice-preset": "creative",
            "cf-connecting-ip": "203.0.113.9",
            "x-request-id": "client-id-1",
        },
        timeout=5,
    )
    seen = response.json()
    assert seen["x-sluice-origin-secret"] == ORIGIN_SECRET
    assert seen["x-sluice-client-ip"] == "203.0.113.9"  # Cloudflare sets cf-connecting-ip
    assert "x-sluice-internal" not in seen
    assert seen["x-sluice-preset"] == "creative"  # a client may pick a preset
    assert seen["x-request-id"] == "client-id-1"
    assert ORIGIN_SECRET not in (scripted_worker.log.read_text())


def test_keepalive_never_splits_an_event(scripted_worker: Workerd) -> None:
    with httpx.stream("GET", scripted_worker.url + "/v1/split", timeout=10) as response:
        body = b"".join(response.iter_raw())
    assert body == b'data: {"part": "whole"}\n\ndata: [DONE]\n\n'


def test_paths_outside_v1_are_not_forwarded(scripted_worker: Workerd) -> None:
    response = httpx.get(scripted_worker.url + "/admin/status", timeout=5)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_websocket_passes_the_worker(stack: Stack) -> None:
    """sluice's WebSocket on a completion path works through the Worker as it does direct
    (the Worker adds the origin secret to the upgrade request)."""
    messages, code = asyncio.run(
        websocket_exchange(stack.worker.url, "/v1/chat/completions", chat(5))
    )
    assert code == 1000
    assert messages[-1] == "[DONE]" and len(messages) > 1
    assert "choices" in json.loads(messages[0])
