"""POST /v1/feedback through the proxy: authenticated by the app key, only for the app's
own requests, 400/401/403/404/405, and for a request whose record is still buffered."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sluice.control.ab.records import RecordWriter

from tests.apps.fixtures import BATCH_KEY, SUPPORT_KEY, AppsProxy, build, chat, digest, write_config
from tests.fixtures import ProcessServer

GATEWAY = """\
kind: Gateway
backends:
  - {{name: sim, urls: ["{sim}"]}}
routes:
  - {{model: chat, backend: sim, upstream_model: sim-model, preset: precise}}
apps:
  - {{name: support, keys: ["{support}"]}}
  - {{name: batch, keys: ["{batch}"]}}
records: {{path: data/records.sqlite, batch_size: 1000, flush_interval: {flush}}}
"""


def make_proxy(tmp_path: Path, sim: ProcessServer, flush: str) -> AppsProxy:
    text = GATEWAY.format(
        sim=sim.url, support=digest(SUPPORT_KEY), batch=digest(BATCH_KEY), flush=flush
    )
    return AppsProxy(build(write_config(tmp_path / "presets", text)))


@pytest.fixture
def proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sim: ProcessServer
) -> Iterator[AppsProxy]:
    monkeypatch.chdir(tmp_path)
    # A flush interval far longer than the test: every record is still in the buffer.
    p = make_proxy(tmp_path, sim, "1h")
    yield p
    p.close()


def feedback(url: str, key: str | None, body: object, method: str = "POST") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, url + "/v1/feedback", json=body, headers=headers, timeout=10)


def served(proxy: AppsProxy, key: str) -> str:
    with httpx.Client(timeout=10) as client:
        resp = chat(client, proxy.url, key, max_tokens=2)
    assert resp.status_code == 200
    return resp.headers["x-request-id"]


def test_rate_a_request_still_in_the_buffer(proxy: AppsProxy) -> None:
    request_id = served(proxy, SUPPORT_KEY)
    score = feedback(proxy.url, SUPPORT_KEY, {"request_id": request_id, "score": 4.5})
    assert score.status_code == 200, score.text
    assert score.json() == {"object": "feedback", "request_id": request_id, "score": 4.5}
    label = feedback(proxy.url, SUPPORT_KEY, {"request_id": request_id, "label": "good"})
    assert label.status_code == 200
    assert label.json()["label"] == "good"
    integer = feedback(proxy.url, SUPPORT_KEY, {"request_id": request_id, "score": -2})
    assert integer.status_code == 200 and integer.json()["score"] == -2.0
    proxy.close_records()
    with sqlite3.connect("data/records.sqlite") as conn:
        rows = conn.execute(
            "SELECT request_id, app, score, label FROM feedback ORDER BY id"
        ).fetchall()
    assert rows == [
        (request_id, "support", 4.5, None),
        (request_id, "support", None, "good"),
        (request_id, "support", -2.0, None),
    ]


def test_only_the_app_that_made_the_request_may_rate_it(proxy: AppsProxy) -> None:
    request_id = served(proxy, SUPPORT_KEY)
    resp = feedback(proxy.url, BATCH_KEY, {"request_id": request_id, "label": "bad"})
    assert resp.status_code == 403
    error = resp.json()["error"]
    assert (error["type"], error["code"]) == ("permission_error", "not_your_request")


def test_a_client_chosen_request_id_is_rated_per_app(proxy: AppsProxy) -> None:
    with httpx.Client(timeout=10) as client:
        for key in (SUPPORT_KEY, BATCH_KEY):
            resp = chat(client, proxy.url, key, max_tokens=1, headers={"x-request-id": "shared-1"})
            assert resp.headers["x-request-id"] == "shared-1"
    for key in (SUPPORT_KEY, BATCH_KEY):
        assert feedback(proxy.url, key, {"request_id": "shared-1", "score": 1}).status_code == 200


def test_authentication(proxy: AppsProxy) -> None:
    request_id = served(proxy, SUPPORT_KEY)
    missing = feedback(proxy.url, None, {"request_id": request_id, "score": 1})
    wrong = feedback(proxy.url, "sk-wrong", {"request_id": request_id, "score": 1})
    assert (missing.status_code, wrong.status_code) == (401, 401)
    assert wrong.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"request_id": "r", "score": "5"}, "score"),
        ({"request_id": "r", "score": True}, "score"),
        ({"request_id": "r", "score": float("inf")}, None),  # JSON has no inf: invalid JSON
        ({"request_id": "r", "label": "meh"}, "label"),
        ({"request_id": "r"}, None),
        ({"request_id": "r", "score": 1, "label": "good"}, None),
        ({"score": 1}, "request_id"),
        ({"request_id": "", "score": 1}, "request_id"),
        ({"request_id": "r" * 129, "score": 1}, "request_id"),
        ({"request_id": 5, "score": 1}, "request_id"),
        ({"request_id": "r", "score": 1, "comment": "x"}, "comment"),
        ({"request_id": "r", "score": 1e200}, "score"),  # the report's sums overflowed
        ({"request_id": "r", "score": -1.5e6}, "score"),
        ({"request_id": "a\u0000b", "score": 1}, "request_id"),  # PostgreSQL refused it: 503
        ({"request_id": "\u00e9" * 10, "score": 1}, "request_id"),  # never an x-request-id
        (["request_id", "r"], None),
    ],
)
def test_bad_bodies_are_400(proxy: AppsProxy, body: object, param: str | None) -> None:
    if isinstance(body, dict) and body.get("score") == float("inf"):
        resp = httpx.post(
            proxy.url + "/v1/feedback",
            content=b'{"request_id": "r", "score": Infinity}',
            headers={"Authorization": f"Bearer {SUPPORT_KEY}"},
        )
    else:
        resp = feedback(proxy.url, SUPPORT_KEY, body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_not_json_and_wrong_method(proxy: AppsProxy) -> None:
    resp = httpx.post(
        proxy.url + "/v1/feedback", content=b"{", headers={"Authorization": f"Bearer {SUPPORT_KEY}"}
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
    get = httpx.get(proxy.url + "/v1/feedback", headers={"Authorization": f"Bearer {SUPPORT_KEY}"})
    assert get.status_code == 405 and get.headers["allow"] == "POST"


def test_an_unknown_id_is_404_after_one_recheck(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sim: ProcessServer
) -> None:
    monkeypatch.chdir(tmp_path)
    proxy = make_proxy(tmp_path, sim, "200ms")
    try:
        started = time.monotonic()
        resp = feedback(proxy.url, SUPPORT_KEY, {"request_id": "never-served", "label": "good"})
        elapsed = time.monotonic() - started
    finally:
        proxy.close()
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "request_not_found"
    # Looked up again after one flush interval: another worker may still buffer it.
    assert 0.2 <= elapsed < 2.0


def test_no_records_no_feedback_route(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sim: ProcessServer
) -> None:
    monkeypatch.chdir(tmp_path)
    text = GATEWAY.format(
        sim=sim.url, support=digest(SUPPORT_KEY), batch=digest(BATCH_KEY), flush="1s"
    )
    text = text.replace("path: data/records.sqlite", "path: null")
    proxy = AppsProxy(build(write_config(tmp_path / "presets", text)))
    try:
        request_id = served(proxy, SUPPORT_KEY)
        resp = feedback(proxy.url, SUPPORT_KEY, {"request_id": request_id, "score": 1})
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_url"
    finally:
        proxy.close()
    assert not (tmp_path / "data").exists()


def test_a_closed_store_answers_503_with_retry_after(proxy: AppsProxy) -> None:
    request_id = served(proxy, SUPPORT_KEY)
    ok = feedback(proxy.url, SUPPORT_KEY, {"request_id": request_id, "label": "good"})
    proxy.close_records()  # as during shutdown
    late = feedback(proxy.url, SUPPORT_KEY, {"request_id": request_id, "label": "good"})
    assert ok.status_code == 200
    assert late.status_code == 503 and late.headers["retry-after"] == "1"
    assert late.json()["error"]["code"] == "feedback_unavailable"
    writer = proxy.records
    assert isinstance(writer, RecordWriter)
    counted = writer.metrics.feedback
    assert counted.labels("recorded")._value.get() == 1
    assert counted.labels("unavailable")._value.get() == 1
