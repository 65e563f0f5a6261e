"""The rendered nginx config in the real nginx: `nginx -t`, then client -> nginx -> sluice ->
simulator on loopback. Streams must arrive event by event, a client that goes away must
abort the generation, and nginx's own answers must be sluice-shaped."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.edge.fixtures import (
    Nginx,
    nginx_stack_gateway,
    openssl_binary,
    render,
    start_sluice,
    websocket_exchange,
    write_config,
)
from tests.fixtures import ProcessServer, SimClient, free_port, stream_request

pytestmark = pytest.mark.edge

TTFT = 0.020  # the session simulator's
# Loaded 2-core CI machines: generous for latency, still far below a buffered stream's.
MARGIN = 0.5


@dataclass
class Stack:
    sluice: ProcessServer
    nginx: Nginx
    url: str


def _stack(sim: ProcessServer, root: Path, sluice: ProcessServer, **nginx_fields: Any) -> Nginx:
    port = free_port()
    gateway = nginx_stack_gateway(sim.url, sluice.port, port, root, **nginx_fields)
    config = write_config(root / "render-config", gateway)
    render("nginx", config, root)
    return Nginx(root, port)


@pytest.fixture(scope="module")
def sluice(sim: ProcessServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    root = tmp_path_factory.mktemp("sluice")
    config = write_config(root / "config", nginx_stack_gateway(sim.url, 8000, 8080, root))
    server = start_sluice(config)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(
    sim: ProcessServer, sluice: ProcessServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    nginx = _stack(
        sim,
        tmp_path_factory.mktemp("nginx"),
        sluice,
        limit_conn=64,
        limit_req={"rate": "1000r/s", "burst": 1000},
    )
    checked = nginx.test_config()
    assert checked.returncode == 0, checked.stderr
    nginx.start()
    yield Stack(sluice, nginx, nginx.url)
    nginx.stop()


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


def test_nginx_t_passes_on_the_rendered_config(stack: Stack) -> None:
    result = stack.nginx.test_config()
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_stream_arrives_incrementally(stack: Stack, sim_client: SimClient) -> None:
    result = stream_request(
        stack.url, chat(20, itl_ms=20), headers={"accept-encoding": "gzip"}, timeout=10
    )
    assert result.status == 200
    assert result.headers["content-type"].startswith("text/event-stream")
    assert "content-encoding" not in result.headers  # never gzipped
    assert result.data()[-1] == "[DONE]"
    times = result.content_times()
    assert len(times) == 20
    assert times[0] < TTFT + MARGIN, times
    # 19 gaps of 20 ms: a buffered relay would deliver them together at the end.
    assert times[-1] - times[0] > 0.2, times
    assert len({round(t, 3) for t in times}) > 10, times


def test_client_disconnect_at_nginx_aborts_the_generation(
    stack: Stack, sim_client: SimClient
) -> None:
    result = stream_request(stack.url, chat(2000), stop_after_events=3, timeout=10)
    assert result.status == 200
    took = sim_client.wait_for(lambda s: s["aborted"] >= 1 and s["active"] == 0, timeout=5.0)
    assert took < 5.0


def test_request_id_reaches_the_backend_and_returns(stack: Stack, sim_client: SimClient) -> None:
    given = stream_request(stack.url, chat(2), headers={"x-request-id": "edge-test-42"})
    assert given.headers["x-request-id"] == "edge-test-42"
    generated = stream_request(stack.url, chat(2))
    made = generated.headers["x-request-id"]
    assert len(made) == 32 and made != "edge-test-42"  # nginx's $request_id
    seen = [r["x_request_id"] for r in sim_client.requests()]
    assert seen[-2:] == ["edge-test-42", made]
    entry = '"request_id":"edge-test-42"'
    assert entry in stack.nginx.access_log(containing=entry)


def test_json_access_log_holds_one_object_per_request(stack: Stack) -> None:
    marker = "access-log-test"
    httpx.get(stack.url + "/v1/models", headers={"x-request-id": marker}, timeout=5)
    lines = [json.loads(line) for line in stack.nginx.access_log(containing=marker).splitlines()]
    last = lines[-1]
    assert last["request_id"] == marker
    assert last["uri"] == "/v1/models" and last["method"] == "GET"
    assert last["status"] == 200 and last["upstream"].startswith("127.0.0.1:")


def test_body_over_sluices_limit_is_refused_by_nginx(stack: Stack) -> None:
    response = httpx.post(
        stack.url + "/v1/chat/completions",
        content=b"x" * (65536 + 1),
        headers={"content-type": "application/json"},
        timeout=5,
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert "x-sluice-config" not in response.headers  # nginx answered, not sluice


def test_only_v1_and_health_are_public(stack: Stack) -> None:
    assert httpx.get(stack.url + "/healthz", timeout=5).status_code == 200
    assert httpx.get(stack.url + "/readyz", timeout=5).status_code == 200
    for private in ("/metrics", "/admin/status"):
        response = httpx.get(stack.url + private, timeout=5)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


def test_per_client_rate_limit_answers_429_like_sluice(
    sim: ProcessServer, sluice: ProcessServer, tmp_path: Path
) -> None:
    nginx = _stack(sim, tmp_path, sluice, limit_req={"rate": "1r/m", "burst": 0})
    nginx.start()
    try:
        statuses = [httpx.get(nginx.url + "/v1/models", timeout=5) for _ in range(3)]
    finally:
        nginx.stop()
    assert statuses[0].status_code == 200
    limited = statuses[-1]
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "1"
    assert limited.json()["error"]["code"] == "edge_rate_limited"


def test_tls_server_block_serves_and_plain_http_redirects(
    sim: ProcessServer, sluice: ProcessServer, tmp_path: Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *(openssl_binary(), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    tls_port = free_port()
    nginx = _stack(
        sim,
        tmp_path,
        sluice,
        tls={"cert": str(cert), "key": str(key), "port": tls_port},
        trusted_proxies=["127.0.0.1/32"],
    )
    checked = nginx.test_config()
    assert checked.returncode == 0, checked.stderr
    nginx.start()
    try:
        plain = httpx.post(nginx.url + "/v1/chat/completions", json=chat(2), timeout=5)
        trust = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(verify=trust, timeout=10) as client:
            secure = client.post(
                f"https://localhost:{tls_port}/v1/chat/completions",
                json=chat(2),
                headers={"x-sluice-client-ip": "203.0.113.7"},
            )
        health = httpx.get(nginx.url + "/healthz", timeout=5)
    finally:
        nginx.stop()
    assert plain.status_code == 308
    assert plain.headers["location"] == f"https://localhost:{tls_port}/v1/chat/completions"
    assert health.status_code == 200
    assert secure.status_code == 200 and "data: [DONE]" in secure.text
    # From a trusted proxy, the Worker's client-address header is the client.
    client = '"client":"203.0.113.7"'
    assert client in nginx.access_log(containing=client)


def test_vllm_and_tgi_routes_outside_v1_pass_and_uploads_stream(stack: Stack) -> None:
    """/health, /tokenize and TGI's /generate_stream reach sluice through the rendered
    nginx; a multipart upload over the 64 KiB body limit streams through /v1/audio/."""
    health = httpx.get(stack.url + "/health", timeout=5)
    assert health.status_code == 200 and "x-request-id" in health.headers
    tokens = httpx.post(stack.url + "/tokenize", json={"model": "chat", "prompt": "Hi"}, timeout=5)
    assert tokens.status_code == 200 and tokens.json()["count"] >= 1
    body = {"model": "chat", "inputs": "Hello", "parameters": {"max_new_tokens": 4}}
    with httpx.stream("POST", stack.url + "/generate_stream", json=body, timeout=10) as resp:
        raw = resp.read()
    assert resp.status_code == 200
    assert raw.startswith(b"data:{") and b'"generated_text":"' in raw and b"[DONE]" not in raw
    upload = httpx.post(
        stack.url + "/v1/audio/transcriptions",
        files={"file": ("a.wav", b"\x01" * 300_000, "audio/wav")},
        data={"model": "chat"},
        timeout=10,
    )
    assert upload.status_code == 200, upload.text
    assert "transcription of" in upload.json()["text"]


@pytest.mark.parametrize(
    ("path", "request_body"),
    [
        ("/v1/chat/completions", chat(5)),
        ("/v1/completions", {"model": "chat", "prompt": "Once", "max_tokens": 5}),
    ],
)
def test_websocket_passes_nginx(stack: Stack, path: str, request_body: dict[str, Any]) -> None:
    """sluice's WebSocket on the completion paths works through nginx as it does direct,
    and a plain POST on the same path still reuses the keep-alive connection."""
    messages, code = asyncio.run(websocket_exchange(stack.url, path, request_body))
    assert code == 1000
    assert messages[-1] == "[DONE]" and len(messages) > 1
    assert "choices" in json.loads(messages[0])
    assert httpx.post(stack.url + path, json=request_body, timeout=5).status_code == 200
