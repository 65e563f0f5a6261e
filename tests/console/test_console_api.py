"""The console's session, CSRF and data endpoints over HTTP, against a real sluice."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.console.fixtures import ADMIN_TOKEN, APP_KEY, start_sluice, write_config
from tests.fixtures import ProcessServer, start_sim


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProcessServer, Path]]:
    sim = start_sim("--ttft-ms", "5", "--itl-ms", "2")
    tmp = tmp_path_factory.mktemp("console")
    try:
        config = write_config(tmp / "config", sim.url, tmp / "records.sqlite")
        proxy = start_sluice(config)
        try:
            yield proxy, config
        finally:
            proxy.stop()
    finally:
        sim.stop()


def login(client: httpx.Client, url: str, token: str = ADMIN_TOKEN) -> httpx.Response:
    return client.post(url + "/console/login", data={"token": token}, follow_redirects=False)


def test_login_sets_a_strict_httponly_cookie_and_never_puts_the_token_in_a_url(stack) -> None:
    proxy, _ = stack
    with httpx.Client() as client:
        page = client.get(proxy.url + "/console")
        assert page.status_code == 200
        assert 'action="/console/login"' in page.text and 'method="post"' in page.text
        wrong = login(client, proxy.url, "not-the-token")
        assert wrong.status_code == 401
        assert "set-cookie" not in wrong.headers
        ok = login(client, proxy.url)
        assert ok.status_code == 303 and ok.headers["location"] == "/console"
        cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
        assert ADMIN_TOKEN not in cookie and ADMIN_TOKEN not in ok.headers["location"]
        assert client.get(proxy.url + "/console/api/session").status_code == 200


def test_every_api_needs_a_session(stack) -> None:
    proxy, _ = stack
    with httpx.Client() as client:
        for path in ("session", "live", "config", "ab", "config/diff?from=a&to=b"):
            resp = client.get(proxy.url + "/console/api/" + path)
            assert resp.status_code == 401, path
            assert resp.json()["error"]["code"] == "console_login_required"
        forged = client.get(
            proxy.url + "/console/api/live",
            headers={"cookie": "sluice_console=9999999999." + "0" * 64},
        )
        assert forged.status_code == 401


def test_posts_need_the_csrf_token(stack) -> None:
    proxy, _ = stack
    with httpx.Client() as client:
        login(client, proxy.url)
        body = {"route": "chat", "prompt": "Hi", "max_tokens": 4}
        refused = client.post(proxy.url + "/console/api/playground", json=body)
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "csrf_failed"
        csrf = client.get(proxy.url + "/console/api/session").json()["csrf"]
        wrong = client.post(
            proxy.url + "/console/api/playground", json=body, headers={"x-csrf-token": "0" * 64}
        )
        assert wrong.status_code == 403
        ok = client.post(
            proxy.url + "/console/api/playground/plan", json=body, headers={"x-csrf-token": csrf}
        )
        assert ok.status_code == 200, ok.text
        assert ok.json()["preset"] in ("precise", "creative")


def test_playground_streams_through_the_pipeline_with_logprobs(stack) -> None:
    proxy, _ = stack
    with httpx.Client() as client:
        login(client, proxy.url)
        csrf = client.get(proxy.url + "/console/api/session").json()["csrf"]
        body = {"route": "other", "prompt": "Tell me a story", "max_tokens": 8}
        with client.stream(
            "POST", proxy.url + "/console/api/playground", json=body, headers={"x-csrf-token": csrf}
        ) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert resp.headers["x-sluice-preset"] == "creative"
            text = resp.read().decode()
        assert '"top_logprobs":[' in text
        assert text.rstrip().endswith("data: [DONE]")


def test_live_reports_backends_and_route_latency_without_secrets(stack) -> None:
    proxy, _ = stack
    with httpx.Client() as client:
        for i in range(5):
            r = client.post(
                proxy.url + "/v1/chat/completions",
                headers={"authorization": f"Bearer {APP_KEY}", "x-user-id": f"u{i}"},
                json={
                    "model": "chat",
                    "stream": True,
                    "messages": [{"role": "user", "content": "secret prompt text"}],
                },
            )
            assert r.status_code == 200
        login(client, proxy.url)
        live = client.get(proxy.url + "/console/api/live").json()
    backends = live["status"]["backends"]
    assert backends[0]["name"] == "sim" and backends[0]["replicas"][0]["healthy"]
    routes = {r["route"]: r for r in live["live"]["routes"]}
    assert routes["chat"]["requests"] >= 5
    assert routes["chat"]["ttft"]["p50"] > 0
    assert routes["chat"]["itl"]["p50"] > 0
    dumped = str(live)
    assert "secret prompt text" not in dumped and APP_KEY not in dumped


def test_config_history_and_a_redacted_diff_after_a_reload(stack) -> None:
    proxy, config = stack
    with httpx.Client() as client:
        login(client, proxy.url)
        before = client.get(proxy.url + "/console/api/config").json()
        first = before["serving"]
        (config / "creative.yaml").write_text(
            "kind: Preset\ngeneration: {temperature: 0.7, max_new_tokens: 24}\n", encoding="utf-8"
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            after = client.get(proxy.url + "/console/api/config").json()
            if after["serving"] != first:
                break
            time.sleep(0.1)
        assert after["serving"] != first
        versions = [v["version"] for v in after["versions"]]
        assert versions[-2:] == [first, after["serving"]]
        assert after["versions"][-1]["trigger"] == "file change"
        diff = client.get(
            proxy.url + "/console/api/config/diff", params={"from": first, "to": after["serving"]}
        ).json()["diff"]
        assert "-kind: Preset\ngeneration: {temperature: 0.9" not in diff  # line-based
        assert "+generation: {temperature: 0.7, max_new_tokens: 24}" in diff
        # Key digests never leave: the gateway file's hash is redacted wherever it is shown.
        full = client.get(
            proxy.url + "/console/api/config/diff", params={"from": first, "to": first}
        ).json()
        assert full["diff"] == ""
        (config / "creative.yaml").write_text(
            "kind: Preset\ngeneration: {temperature: hot}\n", encoding="utf-8"
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            err = client.get(proxy.url + "/console/api/config").json()["last_error"]
            if err:
                break
            time.sleep(0.1)
        assert err is not None and "creative.yaml:2:" in err["message"]
        assert "temperature" in err["message"]


def test_playground_shows_the_rule_that_ended_the_stream(stack) -> None:
    proxy, _ = stack
    with httpx.Client() as client:
        login(client, proxy.url)
        csrf = client.get(proxy.url + "/console/api/session").json()["csrf"]
        body = {"route": "cut", "prompt": "Tell me a story", "max_tokens": 64}
        plan = client.post(
            proxy.url + "/console/api/playground/plan", json=body, headers={"x-csrf-token": csrf}
        ).json()
        assert plan["policy"] == "cutting" and plan["stop"] == ["e"]
        assert plan["fields"]["stop"] == ["e"] and plan["fields"]["temperature"] == 0.3
        text = client.post(
            proxy.url + "/console/api/playground", json=body, headers={"x-csrf-token": csrf}
        ).text
    finals = [line for line in text.splitlines() if '"finish_reason":"stop"' in line]
    assert finals and '"stop_reason":"e"' in finals[-1]


def test_a_session_holds_across_workers(tmp_path: Path) -> None:
    sim = start_sim("--ttft-ms", "1", "--itl-ms", "0")
    try:
        config = write_config(tmp_path / "config", sim.url, tmp_path / "records.sqlite")
        proxy = start_sluice(config, "--workers", "2")
    except BaseException:
        sim.stop()
        raise
    try:
        with httpx.Client() as client:
            assert login(client, proxy.url).status_code == 303
        cookie = client.cookies.get("sluice_console")
        pids = set()
        for _ in range(20):  # fresh connections: the kernel spreads them over both workers
            with httpx.Client(cookies={"sluice_console": cookie}) as fresh:
                resp = fresh.get(proxy.url + "/console/api/live")
                assert resp.status_code == 200
                pids.add(resp.json()["status"]["pid"])
        assert len(pids) == 2
    finally:
        proxy.stop()
        sim.stop()
