"""Acceptance: three apps through one endpoint. Keys (Bearer and x-api-key, sha256: and
env:), 401 and 403, /v1/models per app, presets per app, isolation of the apps' limits, and
no key in a log line, an error body or a record."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import structlog
from sluice.proxy.observe import log_exchange

from tests.apps.fixtures import (
    ANALYTICS_KEY,
    BATCH_KEY,
    SUPPORT_KEY,
    AppsProxy,
    build,
    chat,
    digest,
    write_config,
)
from tests.fixtures import ProcessServer, SimClient, stream_request

GATEWAY = """\
kind: Gateway
backends:
  - {{name: sim, urls: ["{sim}"], max_concurrency: 256}}
routes:
  - {{model: chat, backend: sim, upstream_model: sim-model, preset: precise}}
  - {{model: code, backend: sim, upstream_model: sim-model}}
  - {{model: internal, backend: sim, upstream_model: sim-model}}
apps:
  - {{name: support, keys: ["{support}"], routes: [chat], max_concurrency: 8}}
  - name: batch
    keys: ["{batch}"]
    routes: [chat, code]
    max_concurrency: 2
    queue: {{max: 100, max_wait: 30s}}
    default_preset: batchy
    allow_preset_header: true
  - {{name: analytics, keys: ["env:ANALYTICS_KEY"], routes: [code, internal]}}
admin: {{token: env:ADMIN_TOKEN}}
records: {{path: records.sqlite, flush_interval: 50ms}}
"""
ADMIN_TOKEN = "admin-test-token"


@pytest.fixture
def gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sim: ProcessServer
) -> Iterator[AppsProxy]:
    monkeypatch.chdir(tmp_path)
    text = GATEWAY.format(sim=sim.url, support=digest(SUPPORT_KEY), batch=digest(BATCH_KEY))
    built = build(
        write_config(tmp_path / "presets", text),
        {"ANALYTICS_KEY": ANALYTICS_KEY, "ADMIN_TOKEN": ADMIN_TOKEN},
    )
    proxy = AppsProxy(built)
    yield proxy
    proxy.close()


def test_each_app_gets_in_with_its_key_in_either_header(gateway: AppsProxy) -> None:
    with httpx.Client(timeout=10) as client:
        for key, model in ((SUPPORT_KEY, "chat"), (BATCH_KEY, "code"), (ANALYTICS_KEY, "internal")):
            bearer = chat(client, gateway.url, key, model=model, max_tokens=2)
            assert bearer.status_code == 200, bearer.text
            api_key = chat(
                client, gateway.url, None, model=model, max_tokens=2, headers={"x-api-key": key}
            )
            assert api_key.status_code == 200, api_key.text
    apps = [ex.app for ex in gateway.harness.wait_finished(6)]
    assert apps == ["support", "support", "batch", "batch", "analytics", "analytics"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer sk-not-a-key"},
        {"x-api-key": "sk-not-a-key"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Basic {SUPPORT_KEY}"},
        {"Authorization": f"Bearer {SUPPORT_KEY}x"},
    ],
)
def test_a_missing_or_unknown_key_is_401(gateway: AppsProxy, headers: dict[str, str]) -> None:
    with httpx.Client(timeout=10) as client:
        resp = chat(client, gateway.url, None, headers=headers)
        models = client.get(gateway.url + "/v1/models", headers=headers)
    for answer in (resp, models):
        assert answer.status_code == 401
        error = answer.json()["error"]
        assert error["type"] == "authentication_error"
        assert error["code"] in ("missing_api_key", "invalid_api_key")
        assert "sk-" not in answer.text


def test_a_route_the_app_may_not_use_is_403(gateway: AppsProxy, sim: ProcessServer) -> None:
    sim_client = SimClient(sim.url)
    sim_client.reset()
    with httpx.Client(timeout=10) as client:
        for key, model in ((SUPPORT_KEY, "code"), (BATCH_KEY, "internal"), (ANALYTICS_KEY, "chat")):
            resp = chat(client, gateway.url, key, model=model)
            assert resp.status_code == 403, resp.text
            error = resp.json()["error"]
            assert (error["type"], error["code"], error["param"]) == (
                "permission_error",
                "route_not_allowed",
                "model",
            )
    assert sim_client.stats()["requests"] == 0


def test_models_lists_only_the_apps_routes(gateway: AppsProxy) -> None:
    expected = {
        SUPPORT_KEY: ["chat"],
        BATCH_KEY: ["chat", "code"],
        ANALYTICS_KEY: ["code", "internal"],
    }
    with httpx.Client(timeout=10) as client:
        for key, models in expected.items():
            resp = client.get(
                gateway.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}
            )
            assert resp.status_code == 200
            assert [m["id"] for m in resp.json()["data"]] == models


def test_an_unset_env_key_closes_the_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sim: ProcessServer
) -> None:
    monkeypatch.chdir(tmp_path)
    text = GATEWAY.format(sim=sim.url, support=digest(SUPPORT_KEY), batch=digest(BATCH_KEY))
    built = build(write_config(tmp_path / "presets", text), environ={})
    assert any("ANALYTICS_KEY is unset" in w.message for w in built.warnings)
    proxy = AppsProxy(built)
    try:
        with httpx.Client(timeout=10) as client:
            assert chat(client, proxy.url, ANALYTICS_KEY, model="code").status_code == 401
            assert chat(client, proxy.url, "", model="code").status_code == 401
            assert chat(client, proxy.url, SUPPORT_KEY, max_tokens=1).status_code == 200
    finally:
        proxy.close()


def test_presets_per_app(gateway: AppsProxy, sim: ProcessServer) -> None:
    sim_client = SimClient(sim.url)
    sim_client.reset()
    with httpx.Client(timeout=10) as client:
        routed = chat(client, gateway.url, BATCH_KEY, model="chat")  # the route's preset wins
        default = chat(client, gateway.url, BATCH_KEY, model="code")  # no route preset
        picked = chat(
            client, gateway.url, BATCH_KEY, model="code", headers={"x-sluice-preset": "creative"}
        )
        unknown = chat(
            client, gateway.url, BATCH_KEY, model="code", headers={"x-sluice-preset": "nope"}
        )
        refused = chat(client, gateway.url, SUPPORT_KEY, headers={"x-sluice-preset": "creative"})
        none = chat(client, gateway.url, ANALYTICS_KEY, model="code", max_tokens=1)
    assert [r.headers.get("x-sluice-preset") for r in (routed, default, picked)] == [
        "precise",
        "batchy",
        "creative",
    ]
    assert "x-sluice-preset" not in none.headers
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "unknown_preset"
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "preset_header_not_allowed"
    sent = [r["body"] for r in sim_client.requests()]
    assert [(b.get("max_tokens"), b.get("temperature")) for b in sent] == [
        (3, 0.3),
        (2, 0.0),
        (6, 0.9),
        (1, None),
    ]


@pytest.mark.serial  # load-timed: TTFTs compared while 8 streams saturate an app
def test_one_app_saturating_its_limit_adds_no_queueing_to_another(gateway: AppsProxy) -> None:
    """batch may run 2 requests at once; 8 slow batch streams keep it saturated with a
    queue. support's requests meanwhile wait for no permit and keep their TTFT."""
    app = gateway.harness.app
    slow = {"max_tokens": 15, "sim": {"itl_ms": 40}}

    def batch_stream(_: int) -> int:
        with httpx.Client(timeout=30) as client:
            return chat(client, gateway.url, BATCH_KEY, model="code", **slow).status_code

    def batch_queue() -> int:
        return sum(lim.queued for lim in app.limiters.all() if lim.name == "app:batch")

    baseline = []
    for _ in range(3):
        result = stream_request(
            gateway.url,
            {
                "model": "chat",
                "stream": True,
                "max_tokens": 3,
                "messages": [{"role": "user", "content": "x"}],
            },
            headers={"Authorization": f"Bearer {SUPPORT_KEY}"},
        )
        baseline.append(result.content_times()[0])

    with ThreadPoolExecutor(8) as pool:
        batch = [pool.submit(batch_stream, i) for i in range(8)]
        deadline = time.monotonic() + 5
        while gateway.harness.lt.call(batch_queue) < 4:
            assert time.monotonic() < deadline, "batch never queued"
            time.sleep(0.01)
        during = []
        ids = []
        for _ in range(5):
            assert gateway.harness.lt.call(batch_queue) >= 1  # still saturated
            result = stream_request(
                gateway.url,
                {
                    "model": "chat",
                    "stream": True,
                    "max_tokens": 3,
                    "messages": [{"role": "user", "content": "x"}],
                },
                headers={"Authorization": f"Bearer {SUPPORT_KEY}"},
            )
            assert result.status == 200
            during.append(result.content_times()[0])
            ids.append(result.headers["x-request-id"])
        assert [f.result() for f in batch] == [200] * 8

    finished = gateway.harness.wait_finished(3 + 8 + 5)
    by_id = {ex.request_id: ex for ex in finished}
    assert [by_id[i].queue_wait for i in ids] == [0.0] * 5
    batch_waits = [ex.queue_wait for ex in finished if ex.app == "batch"]
    assert max(batch_waits) > 0.5  # the saturated app did queue
    # TTFT of support while batch is saturated: as without it (sim TTFT 20 ms), not a wait
    # for one of batch's 0.6 s streams.
    assert max(during) < max(baseline) + 0.15, (baseline, during)


def test_keys_appear_in_no_log_line_error_or_record(gateway: AppsProxy) -> None:
    gateway.harness.app.on_complete.append(log_exchange)
    with structlog.testing.capture_logs() as logs, httpx.Client(timeout=10) as client:
        bodies = [
            chat(client, gateway.url, SUPPORT_KEY, max_tokens=1).text,
            chat(client, gateway.url, SUPPORT_KEY, model="code").text,
            chat(client, gateway.url, BATCH_KEY, headers={"x-sluice-preset": "nope"}).text,
            chat(client, gateway.url, ANALYTICS_KEY + "x", model="code").text,
            client.post(
                gateway.url + "/v1/feedback",
                json={"request_id": "none", "label": "good"},
                headers={"x-api-key": ANALYTICS_KEY},
            ).text,
        ]
        gateway.harness.wait_finished(4)  # each completion's log line is written by then
    gateway.close_records()
    assert len([e for e in logs if e.get("event") == "request"]) == 4
    text = repr(logs) + "".join(bodies) + Path("records.sqlite").read_bytes().decode("latin-1")
    for key in (SUPPORT_KEY, BATCH_KEY, ANALYTICS_KEY):
        assert key not in text
        assert key[3:] not in text  # not even without its prefix


def test_concurrent_apps_are_each_counted_as_themselves(gateway: AppsProxy) -> None:
    keys = {
        SUPPORT_KEY: ("support", "chat"),
        BATCH_KEY: ("batch", "code"),
        ANALYTICS_KEY: ("analytics", "code"),
    }
    seen: dict[str, str] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        key = list(keys)[i % 3]
        resp = chat(client, gateway.url, key, model=keys[key][1], max_tokens=1)
        assert resp.status_code == 200
        with lock:
            seen[resp.headers["x-request-id"]] = keys[key][0]

    with httpx.Client(timeout=10) as client, ThreadPoolExecutor(12) as pool:
        list(pool.map(one, range(60)))
    finished = gateway.harness.wait_finished(60)
    assert len(finished) == 60
    for ex in finished:
        assert ex.app == seen[ex.request_id]


def test_keys_appear_in_no_admin_output(gateway: AppsProxy) -> None:
    from sluice.control.runtime.admin import admin_routes
    from sluice.proxy.metrics import Metrics
    from sluice.proxy.observe import Observer

    harness = gateway.harness
    observer = Observer(harness.ref, Metrics(), access_log=False)
    harness.app.on_complete.append(observer.on_complete)
    harness.app.extra_routes.update(admin_routes(harness.ref, harness.app, None, observer))
    with httpx.Client(timeout=10) as client:
        for key in (SUPPORT_KEY, BATCH_KEY):
            assert chat(client, gateway.url, key, max_tokens=1).status_code == 200
        harness.wait_finished(2)  # both are in the observer's figures
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        outputs = [
            client.get(gateway.url + path, headers=admin)
            for path in ("/admin/status", "/admin/config")
        ]
        outputs.append(client.get(gateway.url + "/metrics"))
    assert [r.status_code for r in outputs] == [200, 200, 200]
    assert "support" in outputs[0].text  # the apps are named...
    text = "".join(r.text for r in outputs)
    for key in (SUPPORT_KEY, BATCH_KEY, ANALYTICS_KEY, ADMIN_TOKEN):
        assert key not in text  # ...but neither their keys
        assert digest(key).removeprefix("sha256:") not in text  # nor the keys' digests
