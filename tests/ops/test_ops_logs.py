"""The access log of a real `sluice serve`: one JSON line per request with the fields ops
need, the request id echoed, and never a key, a token or any prompt or completion text."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx

from tests.fixtures import ProcessServer, stream_request
from tests.ops.fixtures import ADMIN, ADMIN_TOKEN, KEYS, auth, chat, wait_until

ALWAYS = {
    "request_id", "endpoint", "app", "route", "backend", "preset", "variant", "config_version",
    "status", "stream", "ttft_ms", "tokens_in", "tokens_out", "finish_reason",
    "duration_ms", "event", "level", "timestamp",
}  # fmt: skip
GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")


def request_lines(server: ProcessServer, n: int) -> list[dict[str, Any]]:
    """The access log lines, once there are `n` (each is written as its request ends)."""
    found: list[dict[str, Any]] = []

    def enough() -> bool:
        found[:] = [e for e in server.json_logs() if e.get("event") == "request"]
        return len(found) >= n

    wait_until(f"{n} access log lines", enough)
    return found


def test_one_line_per_request_with_its_id(start, ops_config: Path) -> None:
    server = start(ops_config)
    url = server.url
    given = stream_request(
        url, chat("ab", 5), headers={**auth("alpha"), "x-request-id": "trace-42", "x-user-id": "u1"}
    )
    generated = stream_request(url, chat("plain", 3), headers=auth("beta"))
    too_long = stream_request(
        url, chat("plain", 2), headers={**auth("beta"), "x-request-id": "x" * 200}
    )
    whole = httpx.post(
        url + "/v1/completions",
        json={"model": "tuned", "prompt": "hi", "max_tokens": 4},
        headers={**auth("alpha"), "x-request-id": "whole-1"},
        timeout=10,
    )
    refused = httpx.post(
        url + "/v1/chat/completions", json=chat("plain", 2), headers={"x-request-id": "nokey"}
    )
    assert [r.status for r in (given, generated, too_long)] == [200, 200, 200]
    assert (whole.status_code, refused.status_code) == (200, 401)

    lines = {e["request_id"]: e for e in request_lines(server, 5)}
    assert len(lines) == 5
    assert given.headers["x-request-id"] == "trace-42"
    assert GENERATED_ID.match(generated.headers["x-request-id"])
    assert GENERATED_ID.match(too_long.headers["x-request-id"])  # not echoed: replaced
    assert whole.headers["x-request-id"] == "whole-1"
    assert refused.headers["x-request-id"] == "nokey"
    for resp_id in (generated.headers["x-request-id"], too_long.headers["x-request-id"]):
        assert resp_id in lines

    line = lines["trace-42"]
    assert set(line) >= ALWAYS
    expected = {
        "app": "alpha",
        "route": "ab",
        "backend": "sim",
        "preset": given.headers["x-sluice-preset"],
        "variant": given.headers["x-sluice-variant"],
        "experiment": "split",
        "config_version": given.headers["x-sluice-config"],
        "status": 200,
        "stream": True,
        "tokens_out": 5,
        "finish_reason": "length",
        "level": "info",
    }
    assert {k: line[k] for k in expected} == expected
    assert isinstance(line["tokens_in"], int) and line["tokens_in"] > 0
    assert 15 <= line["ttft_ms"] <= line["duration_ms"]
    assert lines["whole-1"]["stream"] is False and lines["whole-1"]["tokens_out"] == 4
    assert lines["whole-1"]["ttft_ms"] is None
    nokey = lines["nokey"]
    assert (nokey["status"], nokey["error"], nokey["app"], nokey["route"]) == (
        401,
        "missing_api_key",
        "",
        "",
    )


def test_no_key_token_or_text_is_ever_logged(start, ops_config: Path) -> None:
    """Every key, the admin token, the prompt and the completion are sent; debug level."""
    server = start(ops_config, "--log-level", "debug")
    url = server.url
    prompt = "PROMPT-MARKER-6d1f the secret plan"
    script = ["COMPLETION", "-MARKER", "-9a7e", " reply"]
    body = chat("plain", 8, sim={"script": script})
    body["messages"] = [{"role": "user", "content": prompt}]
    for app in KEYS:
        result = stream_request(url, body, headers=auth(app))
        assert result.status == 200 and result.text() == "".join(script)
    whole = {k: v for k, v in body.items() if k != "stream_options"} | {"stream": False}
    assert httpx.post(url + "/v1/chat/completions", json=whole, headers=auth("alpha")).is_success
    wrong = "sk-ops-wrong-0c4b2e8d17"
    assert httpx.post(url + "/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {wrong}"}).status_code == 401  # fmt: skip
    assert httpx.get(url + "/admin/status", headers=ADMIN).status_code == 200
    assert httpx.post(url + "/admin/reload", headers=ADMIN, timeout=10).status_code == 200
    bad_admin = "adm-wrong-77e1"
    assert httpx.get(url + "/admin/status",
                     headers={"authorization": f"Bearer {bad_admin}"}).status_code == 401  # fmt: skip
    request_lines(server, len(KEYS) + 2)
    assert server.stop() == 0

    secrets = [*KEYS.values(), ADMIN_TOKEN, wrong, bad_admin, "PROMPT-MARKER", "COMPLETION-MARKER",
               "MARKER-9a7e", "secret plan"]  # fmt: skip
    logged = server.stderr_lines + server.stdout_lines
    assert len(logged) > len(KEYS) + 2
    leaks = [line for line in logged for s in secrets if s in line]
    assert leaks == []


def test_console_format_and_level(start, ops_config: Path) -> None:
    console = start(ops_config, "--log-format", "console")
    assert stream_request(console.url, chat("plain", 2), headers=auth("alpha")).status == 200
    wait_until("a console line", lambda: any("request" in x for x in console.stderr_lines))
    line = next(x for x in console.stderr_lines if "request" in x and "request_id=" in x)
    assert not line.startswith("{") and "status=200" in line

    quiet = start(ops_config, "--log-level", "warning")
    assert stream_request(quiet.url, chat("plain", 2), headers=auth("alpha")).status == 200
    assert quiet.stop() == 0
    assert [e for e in quiet.json_logs() if e["level"] == "info"] == []


def test_access_log_and_metrics_switched_off(start, ops_config: Path) -> None:
    server = start(ops_config, "--no-access-log", "--no-metrics")
    url = server.url
    assert stream_request(url, chat("plain", 3), headers=auth("alpha")).status == 200
    resp = httpx.get(url + "/metrics")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "metrics_disabled"
    status = httpx.get(url + "/admin/status", headers=ADMIN).json()
    assert (status["metrics"], status["access_log"]) == (False, False)
    assert server.stop() == 0
    assert [e for e in server.json_logs() if e.get("event") == "request"] == []
    assert any(e.get("event") == "stopped" for e in server.json_logs())
