"""vLLM's other routes through sluice: answered locally (/health, /ping, /version,
/v1/models/{id}) or forwarded with the same authentication, route rules, limits and
records as chat; multipart bodies; pass-through of unknown paths and its switch; the
structured-output rule on every endpoint."""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import httpx
import pytest
from sluice.proxy.snapshot import App, Backend, QueueLimits, StreamPolicy, StreamTimeouts
from sluice.proxy.stopwords import GuardSpec
from sluice.proxy.structured import StructuredOutputs

from tests.fixtures import (
    ProcessServer,
    ProxyHarness,
    SimClient,
    free_port,
    passthrough_snapshot,
    routed_snapshot,
    send_until_answered,
    start_sim,
)

KEY = b"sk-app-a"
AUTH = {"authorization": "Bearer " + KEY.decode()}
MSG = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "string"}}}


def _policy(mode: str, max_bytes: int | None = None) -> StreamPolicy:
    rule = StructuredOutputs(mode=mode, max_schema_bytes=max_bytes)  # type: ignore[arg-type]
    return StreamPolicy(name=f"so-{mode}", structured=rule)


@pytest.fixture
def routed(sim: ProcessServer) -> Iterator[ProxyHarness]:
    app = App(
        name="a",
        key_hashes=frozenset({hashlib.sha256(KEY).digest()}),
        routes=frozenset({"chat"}),
        max_concurrency=1,
        queue=QueueLimits(max_len=0, max_wait=1),
    )
    snap = routed_snapshot(
        sim.url,
        {"chat": {}, "other": {}},
        apps=(app,),
        apps_by_key={hashlib.sha256(KEY).digest(): app},
    )
    harness = ProxyHarness(snap)
    SimClient(sim.url).reset()
    yield harness
    harness.close()


def test_forwarded_routes_keep_auth_route_rules_and_records(
    routed: ProxyHarness, sim: ProcessServer
) -> None:
    url = routed.url
    assert httpx.post(url + "/tokenize", json={"prompt": "x"}, timeout=10).status_code == 401
    denied = httpx.post(
        url + "/tokenize", json={"model": "other", "prompt": "x"}, headers=AUTH, timeout=10
    )
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "route_not_allowed"
    ok = httpx.post(url + "/tokenize", json={"prompt": "Hello there"}, headers=AUTH, timeout=10)
    assert ok.status_code == 200, ok.text  # no model: the app's only route
    assert ok.json()["count"] == 3
    sent = SimClient(sim.url).requests()[-1]
    assert sent["path"] == "/tokenize" and sent["body"]["model"] == "sim-model"
    detok = httpx.post(
        url + "/detokenize", json={"model": "chat", "tokens": [1, 2]}, headers=AUTH, timeout=10
    )
    assert detok.status_code == 200 and "prompt" in detok.json()
    emb = httpx.post(
        url + "/v1/embeddings", json={"model": "chat", "input": "a"}, headers=AUTH, timeout=10
    )
    assert emb.status_code == 200 and emb.headers["x-sluice-config"] == "test-1"
    records = [ex for ex in routed.finished if ex.endpoint == "/v1/embeddings"]
    assert records and records[-1].route == "chat" and records[-1].app == "a"
    assert records[-1].status == 200 and records[-1].prompt_tokens == 1


def test_forwarded_routes_share_the_app_limit(routed: ProxyHarness) -> None:
    slow = {"model": "chat", "messages": MSG, "max_tokens": 30, "sim": {"itl_ms": 25}}
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(
            httpx.post, routed.url + "/v1/chat/completions", json=slow, headers=AUTH, timeout=10
        )
        deadline = time.monotonic() + 5
        while routed.permits_in_use() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = httpx.post(
            routed.url + "/v1/embeddings", json={"model": "chat", "input": "a"},
            headers=AUTH, timeout=10,
        )  # fmt: skip
        assert busy.status_code == 429
        assert busy.json()["error"]["code"] == "app_concurrency_limit"
        assert first.result().status_code == 200
    assert routed.permits_in_use() == 0


def test_multipart_audio_is_forwarded_with_the_upstream_model(routed: ProxyHarness) -> None:
    audio = b"RIFF" + bytes(range(256)) * 64
    resp = httpx.post(
        routed.url + "/v1/audio/transcriptions",
        files={"file": ("a.wav", audio, "audio/wav")},
        data={"model": "chat", "language": "en"},
        headers=AUTH,
        timeout=10,
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["text"].endswith("for sim-model")


def _form(*parts: tuple[str, bytes]) -> bytes:
    out = b""
    for name, value in parts:
        disposition = f'form-data; name="{name}"'
        if name == "file":
            disposition += '; filename="a.wav"'
        out += f"--b\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return out + b"--b--\r\n"


@pytest.mark.parametrize(
    ("parts", "code"),
    [
        # vLLM keeps the last `model`: sluice would have judged the first.
        ((("model", b"chat"), ("file", b"R" * 100_000), ("model", b"other")), "duplicate_model"),
        # The only `model` comes after the bytes read before the route is chosen.
        ((("file", b"R" * 100_000), ("model", b"other")), "form_field_too_late"),
        ((("model", b"chat"), ("file", b"R" * 100_000), ("stream", b"true")), "form_field_too_late"),
    ],
)  # fmt: skip
def test_a_field_past_the_read_prefix_refuses_the_upload(
    routed: ProxyHarness, sim: ProcessServer, parts: tuple[tuple[str, bytes], ...], code: str
) -> None:
    """A form is streamed upstream as it comes; a `model` or `stream` field after the
    bytes sluice read to route it is one vLLM would read and sluice did not judge: the
    upload is cut (the backend never completes the request) and the client gets 400."""
    client = SimClient(sim.url)
    client.reset()
    body = _form(*parts)

    def upload() -> Iterator[bytes]:
        yield body[:70_000]  # what sluice reads before it chooses the route
        time.sleep(0.3)
        yield body[70_000:]

    resp = httpx.post(
        routed.url + "/v1/audio/transcriptions",
        content=upload(),
        headers={**AUTH, "content-type": "multipart/form-data; boundary=b"},
        timeout=10,
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == code
    assert client.requests() == []  # the simulator logs a transcription it received whole
    assert routed.permits_in_use() == 0 and routed.busy_upstream_connections() == 0


@pytest.mark.parametrize(
    "disposition",
    ["form-data; name=model", 'form-data; name="model"; x=y', 'FORM-DATA;NAME="model" '],
)
def test_the_model_field_is_found_as_vllms_form_parser_finds_it(
    routed: ProxyHarness, disposition: str
) -> None:
    """Unquoted, with parameters after it, in another case: vLLM reads each as the
    `model` field, so sluice judges it against the app's routes (app a may not use
    `other`); unseen, the form went to the app's only route with `other` in it."""
    form = (
        f"--b\r\ncontent-disposition: {disposition}\r\n\r\nother\r\n"
        '--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        "RIFF\r\n--b--\r\n"
    )
    resp = httpx.post(
        routed.url + "/v1/audio/transcriptions",
        content=form.encode(),
        headers={**AUTH, "content-type": "multipart/form-data; boundary=b"},
        timeout=10,
    )
    assert resp.status_code == 403, resp.text
    assert resp.json()["error"]["code"] == "route_not_allowed"


def test_a_form_with_two_model_fields_is_refused(routed: ProxyHarness) -> None:
    """vLLM's form parser keeps a field's last value; sluice routes by the first `model`:
    with two, the app's route rules would judge one model and vLLM serve the other."""
    part = 'Content-Disposition: form-data; name="model"\r\n\r\n{}\r\n'
    form = (
        "--b\r\n" + part.format("chat") + "--b\r\n" + part.format("other")
        + '--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        + "RIFF\r\n--b--\r\n"
    )  # fmt: skip
    resp = httpx.post(
        routed.url + "/v1/audio/transcriptions",
        content=form.encode(),
        headers={**AUTH, "content-type": "multipart/form-data; boundary=b"},
        timeout=10,
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "duplicate_model"


def test_health_ping_version_and_model_card(routed: ProxyHarness) -> None:
    url = routed.url
    for path in ("/health", "/ping"):
        resp = httpx.get(url + path, timeout=10)
        assert (resp.status_code, resp.content) == (200, b"")
    assert httpx.post(url + "/ping", timeout=10).status_code == 200
    version = httpx.get(url + "/version", timeout=10).json()
    assert version["version"] == "0.26.0" and "sluice" in version
    card = httpx.get(url + "/v1/models/chat", headers=AUTH, timeout=10)
    assert card.status_code == 200 and card.json()["id"] == "chat"
    other = httpx.get(url + "/v1/models/other", headers=AUTH, timeout=10)
    assert other.status_code == 404  # exists, but not for this app
    routed.lt.call(lambda: setattr(routed.app, "ready", False))
    assert httpx.get(url + "/health", timeout=10).status_code == 503


def test_health_is_503_while_every_replica_is_ejected() -> None:
    """With no health check, a replica that keeps failing is ejected; with all of them
    out, sluice is not serving that backend, and vLLM's /health says so too."""
    dead = tuple(f"http://127.0.0.1:{free_port()}" for _ in range(2))
    backend = Backend(name="sim", urls=dead, queue=QueueLimits())
    harness = ProxyHarness(routed_snapshot(dead[0], {"chat": {}}, backend=backend))
    try:
        assert httpx.get(harness.url + "/health", timeout=10).status_code == 200
        body = {"model": "chat", "messages": MSG}
        for _ in range(4):  # each tries both replicas: three failures eject each
            r = httpx.post(harness.url + "/v1/chat/completions", json=body, timeout=10)
            assert r.status_code == 502, r.text
        assert httpx.get(harness.url + "/health", timeout=10).status_code == 503
        assert httpx.get(harness.url + "/healthz", timeout=10).status_code == 200
    finally:
        harness.close()


def test_passthrough_reads_a_form_to_a_generating_path_whole(sim: ProcessServer) -> None:
    """Pass-through streams the uploads of the paths it forwards; a form sent to a path
    sluice serves itself is read whole and refused as what it is (it was streamed and
    never read: "a zero-length document", and the connection closed)."""
    harness = ProxyHarness(passthrough_snapshot(sim.url))
    try:
        with httpx.Client(base_url=harness.url, timeout=10) as client:
            for path in ("/v1/chat/completions", "/v1/completions"):
                resp = client.post(path, data={"model": "sim-model"}, files={"x": b"1"})
                assert resp.status_code == 400, resp.text
                assert resp.json()["error"]["code"] == "invalid_json", resp.text
                port = resp.extensions["network_stream"].get_extra_info("client_addr")[1]
                after = client.get("/v1/models")  # the same connection, still in step
                assert after.status_code == 200
                assert after.extensions["network_stream"].get_extra_info("client_addr")[1] == port
    finally:
        harness.close()


# A chunked multipart upload's head and first part: its handler reads the body as it comes.
UPLOAD_HEAD = (
    b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
)
UPLOAD_PART = b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\n' + b"R" * 1000


def test_a_malformed_chunk_in_a_streamed_upload_is_answered_400(sim: ProcessServer) -> None:
    """A chunked upload whose second chunk's size line is not hex: the handler reading
    the stream answers 400 (it got no answer: the stream failed as a client gone)."""
    harness = ProxyHarness(passthrough_snapshot(sim.url))
    try:
        with socket.create_connection(("127.0.0.1", harness.port), timeout=5) as sock:
            sock.sendall(
                UPLOAD_HEAD + b"%x\r\n%b\r\nzz\r\nabc\r\n" % (len(UPLOAD_PART), UPLOAD_PART)
            )
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert b'"code":"bad_http"' in answer and b"malformed HTTP request" in answer
        assert harness.wait_finished(1)[-1].status == 400
    finally:
        harness.close()


def test_a_trailer_that_never_ends_in_a_streamed_upload_is_answered(sim: ProcessServer) -> None:
    """A chunked upload whose trailer never ends: the handler reading the stream answers
    (a refusal from the reader would fail the stream as a client gone: no answer)."""
    harness = ProxyHarness(passthrough_snapshot(sim.url))
    try:
        with socket.create_connection(("127.0.0.1", harness.port), timeout=5) as sock:
            sock.sendall(UPLOAD_HEAD + b"%x\r\n%b\r\n0\r\nX-T: " % (len(UPLOAD_PART), UPLOAD_PART))
            answer, sent = send_until_answered(sock, b"t" * 16384, 4 * 1024 * 1024)
            sock.settimeout(5)
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert b"request trailers too large" in answer
        assert sent < 1024 * 1024
    finally:
        harness.close()


def test_passthrough_forwards_unknown_paths_unless_closed(sim: ProcessServer) -> None:
    harness = ProxyHarness(passthrough_snapshot(sim.url))
    try:
        stats = httpx.get(harness.url + "/sim/stats", timeout=10)
        assert stats.status_code == 200 and "requests" in stats.json()
        card = httpx.get(harness.url + "/v1/models/sim-model", timeout=10)
        assert card.status_code == 200 and card.json()["owned_by"] == "vllm"
        harness.swap(replace(passthrough_snapshot(sim.url), forward_unknown_paths=False))
        closed = httpx.get(harness.url + "/sim/stats", timeout=10)
        assert closed.status_code == 404
        assert closed.json()["error"]["code"] == "unknown_url"
        # Known vLLM routes still go through.
        assert httpx.post(harness.url + "/tokenize", json={"prompt": "a"}, timeout=10).is_success
    finally:
        harness.close()


def test_passthrough_never_forwards_vllms_operator_routes(sim: ProcessServer) -> None:
    """Pass-through relays the paths sluice does not know, but not vLLM's operator routes
    (sleep, elastic scaling, LoRA loading, ...): a client must not put the GPU to sleep."""
    harness = ProxyHarness(passthrough_snapshot(sim.url))
    try:
        for path in ("/sleep", "/scale_elastic_ep", "/v1/load_lora_adapter", "/collective_rpc"):
            resp = httpx.post(harness.url + path, json={}, timeout=10)
            assert resp.status_code == 403, (path, resp.text)  # forwarded: the sim's 404
            assert resp.json()["error"]["code"] == "operator_route"
        assert harness.open_upstream_connections() == 0  # the backend was never asked
        assert httpx.get(harness.url + "/sim/stats", timeout=10).status_code == 200
    finally:
        harness.close()


@pytest.mark.parametrize(
    ("mode", "path", "body", "status", "code"),
    [
        ("deny", "/v1/chat/completions",
         {"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
         400, "structured_output_denied"),
        ("deny", "/v1/responses",
         {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": SCHEMA}}},
         400, "structured_output_denied"),
        ("require", "/v1/completions", {"prompt": "hi"}, 400, "structured_output_required"),
        ("small", "/v1/chat/completions",
         {"messages": MSG, "structured_outputs": {"json": SCHEMA}}, 400, "structured_output_too_large"),
        ("require", "/v1/chat/completions",
         {"messages": MSG, "max_tokens": 3, "structured_outputs": {"regex": "[a-z]+"}}, 200, None),
        # Forwarded JSON bodies obey the rule too: /invocations runs vLLM's chat handler.
        ("deny", "/invocations",
         {"messages": MSG, "response_format": {"type": "json_object"}}, 400, "structured_output_denied"),
        ("small", "/inference/v1/generate",
         {"token_ids": [1, 2], "structured_outputs": {"json": SCHEMA}}, 400, "structured_output_too_large"),
        ("require", "/v1/chat/completions/batch", {"messages": MSG}, 400, "structured_output_required"),
        # No text is generated there: `require` asks nothing of them.
        ("require", "/tokenize", {"prompt": "hi"}, 200, None),
        ("require", "/v1/embeddings", {"input": "a"}, 200, None),
    ],
)  # fmt: skip
def test_structured_output_rule(
    sim: ProcessServer, mode: str, path: str, body: dict[str, Any], status: int, code: str | None
) -> None:
    policy = _policy("allow", 16) if mode == "small" else _policy(mode)
    harness = ProxyHarness(routed_snapshot(sim.url, {"m": {"policy": policy}}))
    try:
        resp = httpx.post(harness.url + path, json={"model": "m", **body}, timeout=10)
        assert resp.status_code == status, resp.text
        if code is not None:
            error = resp.json()["error"]
            assert error["code"] == code and policy.name in error["message"]
    finally:
        harness.close()


def test_messages_output_config_format_obeys_the_rule(sim: ProcessServer) -> None:
    """vLLM's /v1/messages constrains its output with `output_config.format` (a JSON
    schema): deny refuses it before the backend sees it, require accepts it."""
    fmt = {"type": "json_schema", "schema": SCHEMA}
    body = {"model": "m", "messages": MSG, "max_tokens": 3, "output_config": {"format": fmt}}
    client = SimClient(sim.url)
    client.reset()
    harness = ProxyHarness(routed_snapshot(sim.url, {"m": {"policy": _policy("deny")}}))
    try:
        refused = httpx.post(harness.url + "/v1/messages", json=body, timeout=10)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"] == {
            "type": "invalid_request_error",
            "message": "policy 'so-deny' does not allow structured output "
            "('output_config.format' was set)",
        }
        assert client.requests() == []
        effort_only = {**body, "output_config": {"effort": "low"}}
        assert httpx.post(harness.url + "/v1/messages", json=effort_only, timeout=10).is_success

        harness.swap(routed_snapshot(sim.url, {"m": {"policy": _policy("require")}}))
        accepted = httpx.post(harness.url + "/v1/messages", json=body, timeout=10)
        assert accepted.status_code == 200, accepted.text
        assert client.requests()[-1]["body"]["output_config"] == {"format": fmt}
        # vLLM ignores a format without a schema: the output would be free text.
        no_schema = {**body, "output_config": {"format": {"type": "json_schema"}}}
        assert (
            httpx.post(harness.url + "/v1/messages", json=no_schema, timeout=10).status_code == 400
        )

        harness.swap(routed_snapshot(sim.url, {"m": {}}))
        assert httpx.post(harness.url + "/v1/messages", json=body, timeout=10).status_code == 200
    finally:
        harness.close()


def test_tgi_grammar_becomes_structured_outputs_and_obeys_the_rule(sim: ProcessServer) -> None:
    harness = ProxyHarness(routed_snapshot(sim.url, {"m": {}}))
    tgi = {
        "inputs": "hi",
        "parameters": {"max_new_tokens": 3, "grammar": {"type": "json", "value": SCHEMA}},
    }
    try:
        assert httpx.post(harness.url + "/generate", json=tgi, timeout=10).status_code == 200
        sent = SimClient(sim.url).requests()[-1]["body"]
        assert sent["structured_outputs"] == {"json": SCHEMA} and sent["max_tokens"] == 3
        harness.swap(routed_snapshot(sim.url, {"m": {"policy": _policy("deny")}}))
        refused = httpx.post(harness.url + "/generate", json=tgi, timeout=10)
        assert refused.status_code == 400
        assert refused.json()["error_type"] == "validation"
        assert "does not allow structured output" in refused.json()["error"]
    finally:
        harness.close()


def test_backend_errors_reach_tgi_clients_in_tgi_shape(sim: ProcessServer) -> None:
    harness = ProxyHarness(routed_snapshot(sim.url, {"m": {}}))
    try:
        body = {"inputs": "hi", "parameters": {"max_new_tokens": 100000}}
        for path in ("/generate", "/generate_stream"):
            resp = httpx.post(harness.url + path, json=body, timeout=10)
            assert resp.status_code == 400
            error = resp.json()
            assert error["error_type"] == "validation" and "max_tokens" in error["error"]
    finally:
        harness.close()


def test_tgi_parameters_must_be_an_object_or_absent(sim: ProcessServer) -> None:
    """An empty list, string, zero or false passed as no parameters (falsy); TGI refuses
    them. null is taken as absent."""
    harness = ProxyHarness(routed_snapshot(sim.url, {"m": {}}))
    try:
        for params in ([], "", 0, False, [1], "x"):
            resp = httpx.post(
                harness.url + "/generate", json={"inputs": "hi", "parameters": params}, timeout=10
            )
            assert resp.status_code == 422, (params, resp.text)
            assert resp.json() == {
                "error": "`parameters` must be an object",
                "error_type": "validation",
            }
        for body in ({"inputs": "hi", "parameters": None}, {"inputs": "hi"}):
            assert httpx.post(harness.url + "/generate", json=body, timeout=10).status_code == 200
    finally:
        harness.close()


def test_tgi_refuses_top_level_fields_that_make_more_than_one_text(sim: ProcessServer) -> None:
    """A top-level `n: 2` passed through to /v1/completions: two choices merged into one
    TGI stream (and the guard ran per choice on text the client read merged)."""
    harness = ProxyHarness(routed_snapshot(sim.url, {"m": {}}))
    SimClient(sim.url).reset()
    try:
        for extra in ({"n": 2}, {"best_of": 3}, {"echo": True}):
            for path in ("/generate", "/generate_stream"):
                body = {"inputs": "hi", "parameters": {"max_new_tokens": 2}, **extra}
                resp = httpx.post(harness.url + path, json=body, timeout=10)
                assert resp.status_code == 422, (extra, path, resp.text)
                assert resp.json()["error_type"] == "validation"
                assert next(iter(extra)) in resp.json()["error"]
        assert SimClient(sim.url).stats()["requests"] == 0
        for same in ({"n": 1}, {"best_of": None}, {"echo": False}):
            body = {"inputs": "hi", "parameters": {"max_new_tokens": 2}, **same}
            resp = httpx.post(harness.url + "/generate", json=body, timeout=10)
            assert resp.status_code == 200, (same, resp.text)
    finally:
        harness.close()


def _multipart(model: str, size: int) -> tuple[bytes, str]:
    boundary = "sluice-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    body = head + b"\x01" * size + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_uploads_stream_through_beyond_the_body_limit(sim: ProcessServer) -> None:
    """A 5 MiB upload, over the 4 MiB buffered-body limit, goes through, with a Content-Length
    and chunked; the backend gets every byte (and the route's upstream model)."""
    harness = ProxyHarness(routed_snapshot(sim.url, {"chat": {}}))
    try:
        body, content_type = _multipart("chat", 5 * 1024 * 1024)
        expected = len(body) + len("sim-model") - len("chat")
        url = harness.url + "/v1/audio/transcriptions"
        resp = httpx.post(url, content=body, headers={"content-type": content_type}, timeout=30)
        assert resp.status_code == 200, resp.text
        assert resp.json()["text"] == f"sim transcription of {expected} bytes for sim-model"

        def pieces() -> Iterator[bytes]:
            for start in range(0, len(body), 1 << 20):
                yield body[start : start + (1 << 20)]

        resp = httpx.post(url, content=pieces(), headers={"content-type": content_type}, timeout=30)
        assert resp.status_code == 200, resp.text  # chunked both ways
        assert resp.json()["text"] == f"sim transcription of {expected} bytes for sim-model"
        # Over the upload limit: 413 before anything is relayed.
        harness.swap(replace(routed_snapshot(sim.url, {"chat": {}}), max_upload_bytes=1 << 20))
        resp = httpx.post(url, content=body, headers={"content-type": content_type}, timeout=30)
        assert resp.status_code == 413
        # Chunked, so only the bytes tell: sluice answers 413 mid-body and reads no more
        # (the client may see that answer or a connection closed under its writes).
        try:
            resp = httpx.post(
                url, content=pieces(), headers={"content-type": content_type}, timeout=30
            )
            assert resp.status_code == 413
        except httpx.TransportError:
            pass
        deadline = time.monotonic() + 5
        while not any(ex.status == 413 for ex in harness.finished):
            assert time.monotonic() < deadline, [ex.status for ex in harness.finished]
            time.sleep(0.02)
        assert harness.permits_in_use() == 0
    finally:
        harness.close()


def test_an_app_rule_applies_on_top_of_the_route_policy(sim: ProcessServer) -> None:
    app = App(
        name="strict",
        key_hashes=frozenset({hashlib.sha256(KEY).digest()}),
        routes=None,
        structured=StructuredOutputs(mode="require"),
    )
    snap = routed_snapshot(
        sim.url, {"m": {}}, apps=(app,), apps_by_key={hashlib.sha256(KEY).digest(): app}
    )
    harness = ProxyHarness(snap)
    try:
        free = {"model": "m", "messages": MSG, "max_tokens": 2}
        resp = httpx.post(harness.url + "/v1/chat/completions", json=free, headers=AUTH, timeout=10)
        assert resp.status_code == 400
        assert resp.json()["error"]["message"].startswith("app 'strict' requires structured")
        shaped = free | {"response_format": {"type": "json_object"}}
        resp = httpx.post(
            harness.url + "/v1/chat/completions", json=shaped, headers=AUTH, timeout=10
        )
        assert resp.status_code == 200, resp.text
    finally:
        harness.close()


@pytest.mark.parametrize("path", ["/v1/embeddings", "/tokenize", "/v1/models", "/no/such/path"])
def test_a_head_request_is_answered_at_once_and_its_connection_stays_usable(
    sim: ProcessServer, path: str
) -> None:
    """A HEAD relayed to the backend: its answer has a Content-Length and no body. The
    upstream parser, not told the method, waited for that body until the backend closed
    its idle connection (75 s for the simulator), holding the backend's permit."""
    harness = ProxyHarness(passthrough_snapshot(sim.url))
    try:
        with httpx.Client(timeout=5) as client:
            started = time.monotonic()
            head = client.head(harness.url + path)
            took = time.monotonic() - started
            after = client.post(harness.url + "/tokenize", json={"prompt": "Hello there"})
    finally:
        harness.close()
    assert took < 3, took
    assert head.status_code < 500 and head.content == b""
    assert after.status_code == 200


class _FileHandler(http.server.BaseHTTPRequestHandler):
    """A backend that answers HEAD as RFC 9110 asks (vLLM's FastAPI answers it 405): the
    head a GET gets, no body; for /chunked, no Content-Length at all; for /missing, a 404
    with an OpenAI-shaped error."""

    protocol_version = "HTTP/1.1"
    BODY = b"x" * 1234
    MISSING = b'{"error":{"message":"no such file","type":"NotFoundError","param":null,"code":404}}'

    def _head(self) -> None:
        if self.path == "/missing":
            self.send_response(404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(self.MISSING)))
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("content-type", "application/octet-stream")
        if self.path == "/chunked":
            self.send_header("transfer-encoding", "chunked")
        else:
            self.send_header("content-length", str(len(self.BODY)))
        self.end_headers()

    def do_HEAD(self) -> None:
        self._head()

    def do_GET(self) -> None:
        self._head()
        if self.path == "/missing":
            self.wfile.write(self.MISSING)
        elif self.path == "/chunked":
            self.wfile.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(self.BODY), self.BODY))
        else:
            self.wfile.write(self.BODY)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_relayed_head_answer_states_the_backends_length() -> None:
    """Not the empty body's: a client that asks HEAD for the size gets the size."""
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FileHandler)
    thread = threading.Thread(target=backend.serve_forever, daemon=True)
    thread.start()
    harness = ProxyHarness(passthrough_snapshot(f"http://127.0.0.1:{backend.server_port}"))
    try:
        with httpx.Client(timeout=5) as client:
            head = client.head(harness.url + "/files/model.bin")
            get = client.get(harness.url + "/files/model.bin")
            unsized = client.head(harness.url + "/chunked")
            again = client.get(harness.url + "/chunked")
            missing_head = client.head(harness.url + "/missing")
            missing = client.get(harness.url + "/missing")
    finally:
        harness.close()
        backend.shutdown()
        backend.server_close()
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == "1234" == get.headers["content-length"]
    assert get.content == _FileHandler.BODY
    # No length stated: none relayed (a HEAD's answer may leave it out), not "0".
    assert unsized.status_code == 200 and "content-length" not in unsized.headers
    assert again.content == _FileHandler.BODY
    # An error's head as its GET gets it: the backend's status and length, not sluice's
    # own error (a HEAD's empty body is no malformed error).
    assert missing.status_code == missing_head.status_code == 404
    assert missing_head.headers["content-length"] == missing.headers["content-length"]
    assert missing.json()["error"]["message"] == "no such file"


def test_speech_to_text_under_a_preset_or_guard_is_refused(sim: ProcessServer) -> None:
    """Transcription and translation generate text (with vLLM's sampling fields, as form
    fields) that sluice neither reads nor guards: under a preset or a guarding Policy they
    are refused as /invocations is, never served without them."""
    guarded = StreamPolicy(name="guarded", stop=("###",), guard=GuardSpec(stop=("###",)))
    harness = ProxyHarness(routed_snapshot(sim.url, {"m": {"policy": guarded}, "open": {}}))
    try:
        for path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
            resp = httpx.post(
                harness.url + path,
                files={"file": ("a.wav", b"RIFF" + bytes(64), "audio/wav")},
                data={"model": "m", "temperature": "1.0"},
                timeout=10,
            )
            assert resp.status_code == 400, resp.text
            error = resp.json()["error"]
            assert error["code"] == "policy_not_enforceable" and "guarded" in error["message"]
        served = httpx.post(
            harness.url + "/v1/audio/transcriptions",
            files={"file": ("a.wav", b"RIFF" + bytes(64), "audio/wav")},
            data={"model": "open"},
            timeout=10,
        )
        assert served.status_code == 200 and served.json()["text"].startswith("sim transcription")
    finally:
        harness.close()


@pytest.fixture
def silent_backend() -> Iterator[str]:
    """A backend that takes connections and requests (the kernel's backlog) and never
    answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def test_version_and_model_card_wait_for_a_silent_backend_only_so_long(
    silent_backend: str,
) -> None:
    """`/version` (no key needed) and pass-through's `/v1/models/{id}` ask the backend
    themselves: a backend that never answers costs the client the response-head limit,
    and the connection is closed, not left open in the pool."""
    quick = StreamPolicy(name="quick", timeouts=StreamTimeouts(response_head=0.5))
    routed = ProxyHarness(routed_snapshot(silent_backend, {"m": {"policy": quick}}))
    bare = passthrough_snapshot(silent_backend)
    assert bare.fallback_route is not None
    passthrough = ProxyHarness(
        replace(bare, fallback_route=replace(bare.fallback_route, policy=quick))
    )
    try:
        started = time.monotonic()
        version = httpx.get(routed.url + "/version", timeout=10)
        assert version.status_code == 200 and version.json()["version"] is None
        card = httpx.get(passthrough.url + "/v1/models/m", timeout=10)
        assert card.status_code == 504, card.text
        assert card.json()["error"]["code"] == "response_head_timeout"
        assert time.monotonic() - started < 4.0
        for harness in (routed, passthrough):
            assert harness.open_upstream_connections() == 0
    finally:
        routed.close()
        passthrough.close()


@pytest.mark.parametrize(
    "content_type", [None, "APPLICATION/JSON", "application/vnd.api+json; charset=utf-8"]
)
def test_a_body_vllm_reads_as_json_is_read_as_json(
    routed: ProxyHarness, sim: ProcessServer, content_type: str | None
) -> None:
    """vLLM's server reads a body as JSON with no Content-Type, or any application/json or
    application/*+json in any case: sluice reads the same bodies, so their `model` meets
    the app's route rules and the route's upstream model (an unread body went upstream
    with the model it named)."""
    headers = dict(AUTH)
    if content_type is not None:
        headers["content-type"] = content_type
    url = routed.url + "/v1/embeddings"
    denied = httpx.post(url, content=b'{"model": "other", "input": "a"}', headers=headers)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "route_not_allowed"
    ok = httpx.post(url, content=b'{"model": "chat", "input": "a"}', headers=headers)
    assert ok.status_code == 200, ok.text
    assert SimClient(sim.url).requests()[-1]["body"]["model"] == "sim-model"


@pytest.fixture(scope="module")
def slow_sim() -> Iterator[ProcessServer]:
    server = start_sim("--ttft-ms", "1500", "--itl-ms", "5")
    yield server
    server.stop()


def test_a_streamed_transcription_is_relayed_as_a_stream_with_its_deadlines(
    slow_sim: ProcessServer,
) -> None:
    """`stream=true` in a transcription's form (any case of its Content-Type): vLLM
    answers with `transcription.chunk` events, which sluice relays as they come, under
    the stream deadlines; read as a whole answer, the first-token limit never applied."""
    quick = StreamPolicy(name="quick", timeouts=StreamTimeouts(first_token=0.3))
    harness = ProxyHarness(routed_snapshot(slow_sim.url, {"m": {}, "quick": {"policy": quick}}))
    client = SimClient(slow_sim.url)
    client.reset()
    try:
        boundary = "b0undary"
        form = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{{model}}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="stream"\r\n\r\nTrue\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            f"Content-Type: audio/wav\r\n\r\nRIFF0123\r\n--{boundary}--\r\n"
        )
        headers = {"content-type": f"Multipart/Form-Data; boundary={boundary}"}
        url = harness.url + "/v1/audio/transcriptions"
        with httpx.stream("POST", url, content=form.format(model="m"), headers=headers) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            events = [line for line in resp.iter_lines() if line.startswith("data: ")]
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert events[-1] == "data: [DONE]" and chunks[0]["object"] == "transcription.chunk"
        text = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks)
        assert text.startswith("sim transcription of ") and text.endswith(" for sim-model")
        assert harness.wait_finished(1)[-1].stream
        started = time.monotonic()
        cut = httpx.post(url, content=form.format(model="quick"), headers=headers, timeout=10)
        assert time.monotonic() - started < 1.2  # the backend's first token comes at 1.5 s
        assert cut.status_code == 200
        assert '"code":"first_token_timeout"' in cut.text.replace(" ", "")
        client.wait_for(lambda stats: stats["aborted"] == 1, timeout=3.0)
        assert harness.permits_in_use() == 0 and harness.busy_upstream_connections() == 0
    finally:
        harness.close()


def test_stream_true_to_an_endpoint_that_never_streams_is_a_whole_answer(
    sim: ProcessServer,
) -> None:
    """vLLM ignores `stream` on /v1/embeddings (and tokenize, pooling, score, ...): the
    answer is JSON. Read as a stream, a slow answer got a keep-alive's SSE head, and the
    embeddings that came then were answered as a broken stream."""
    chatty = StreamPolicy(name="chatty", keepalive_interval=0.2)
    harness = ProxyHarness(routed_snapshot(sim.url, {"m": {"policy": chatty}}))
    try:
        body = {"model": "m", "input": "a", "stream": True, "sim": {"slow_first_byte_ms": 700}}
        resp = httpx.post(harness.url + "/v1/embeddings", json=body, timeout=10)
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("application/json")
        assert resp.json()["data"][0]["object"] == "embedding"
        assert not harness.wait_finished(1)[-1].stream
    finally:
        harness.close()
