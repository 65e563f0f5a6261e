"""POST /v1/feedback through the proxy: authenticated by the app key, only for the app's
own requests, 400/401/403/404/405, for a request whose record is still buffered, and for
one whose record another worker writes late."""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sluice.control.ab import feedback as feedback_module
from sluice.control.ab.records import BUSY_TIMEOUT, RecordWriter

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


def test_a_record_another_worker_writes_late_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sim: ProcessServer
) -> None:
    # Two workers on one database; another connection holds the write lock for 2.5 s (a
    # slow disk, a long checkpoint), so the serving worker's record lands 2.5 s late. The
    # feedback, through the other worker, was 404 after one recheck (0.1 s here).
    monkeypatch.chdir(tmp_path)
    serving = make_proxy(tmp_path, sim, "100ms")
    rating = AppsProxy(serving.built)
    lock = sqlite3.connect("data/records.sqlite", isolation_level=None, check_same_thread=False)
    release = threading.Timer(2.5, lock.execute, ("COMMIT",))
    try:
        lock.execute("BEGIN IMMEDIATE")
        release.start()
        request_id = served(serving, SUPPORT_KEY)
        started = time.monotonic()
        with httpx.Client(timeout=30) as client:
            resp = client.post(
                rating.url + "/v1/feedback",
                json={"request_id": request_id, "label": "good"},
                headers={"Authorization": f"Bearer {SUPPORT_KEY}"},
            )
        elapsed = time.monotonic() - started
    finally:
        release.join()
        lock.close()
        rating.close()
        serving.close()
    assert resp.status_code == 200, resp.text
    assert resp.json()["label"] == "good"
    assert 2.0 <= elapsed < 2.5 + 2.0  # found within a recheck gap of the lock's release
    with sqlite3.connect("data/records.sqlite") as conn:
        rows = conn.execute("SELECT request_id, app, label FROM feedback").fetchall()
    assert rows == [(request_id, "support", "good")]


def test_an_unknown_id_is_404_once_no_record_can_be_on_its_way(
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
    # Looked up until another worker's flush and its wait for the lock are over.
    assert 0.2 + BUSY_TIMEOUT <= elapsed < 0.2 + BUSY_TIMEOUT + 3.0


def test_an_id_still_undecided_when_the_wait_ends_is_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sim: ProcessServer
) -> None:
    # A flush interval longer than a feedback request waits: the record may still come.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(feedback_module, "MAX_LOOKUP_WAIT", 0.5)
    proxy = make_proxy(tmp_path, sim, "30s")
    try:
        started = time.monotonic()
        resp = feedback(proxy.url, SUPPORT_KEY, {"request_id": "not-yet", "score": 1})
        elapsed = time.monotonic() - started
    finally:
        proxy.close()
    assert resp.status_code == 503, resp.text
    assert resp.headers["retry-after"] == str(math.ceil(30 + BUSY_TIMEOUT - 0.5))
    error = resp.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "request_not_recorded_yet")
    assert 0.5 <= elapsed < 3.0


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
