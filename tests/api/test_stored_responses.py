"""Stored responses behind several replicas. vLLM keeps a stored response in the memory of
the server that made it (VLLM_ENABLE_RESPONSES_API_STORE=1), so `GET /v1/responses/{id}`,
`.../cancel` and `previous_response_id` only work on that replica: sluice asks the next
replica when one answers 404, in every mode (one process or `--workers`), and an app with
several routes names the model of a stored response in the query."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from sluice.proxy.snapshot import App, Backend, QueueLimits, RoutingPolicy

from tests.fixtures import ProcessServer, ProxyHarness, SimClient, routed_snapshot, start_sim
from tests.scale.fixtures import start_sluice

KEY = "sk-stored-a"


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[ProcessServer]]:
    sims = [start_sim("--responses-store", "--ttft-ms", "1", "--itl-ms", "1") for _ in range(2)]
    yield sims
    for sim in sims:
        sim.stop()


@pytest.fixture
def proxy(replicas: list[ProcessServer]) -> Iterator[ProxyHarness]:
    # Least outstanding: with both idle, replica 0 is asked first, every time (the score
    # strategy would alternate its ties, and sometimes ask the holder first).
    backend = Backend(
        name="sim",
        urls=tuple(s.url for s in replicas),
        queue=QueueLimits(),
        routing=RoutingPolicy(strategy="least_outstanding"),
    )
    harness = ProxyHarness(routed_snapshot("", {"chat": {}}, backend=backend))
    for sim in replicas:
        SimClient(sim.url).reset()
    yield harness
    harness.close()


def _sdk(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)


def _made_on(sim: ProcessServer, **extra: object) -> openai.types.responses.Response:
    """A response stored by one replica, asked of it directly."""
    with _sdk(sim.url) as direct:
        return direct.responses.create(
            model="sim-model", input="Hello", max_output_tokens=4, **extra
        )


def _asked(sim: ProcessServer, method: str, path: str) -> list[dict[str, object]]:
    return [r for r in SimClient(sim.url).requests() if r["method"] == method and r["path"] == path]


def test_a_stored_response_is_read_from_the_replica_that_holds_it(
    proxy: ProxyHarness, replicas: list[ProcessServer]
) -> None:
    with _sdk(proxy.url) as client:
        for holder in replicas:
            made = _made_on(holder)
            for _ in range(3):
                read = client.responses.retrieve(made.id)
                assert read.id == made.id and read.output_text == made.output_text
            assert len(_asked(holder, "GET", f"/v1/responses/{made.id}")) == 3
            # Replica 0 is asked first: it answers for its own, and 404 for the other's.
            assert len(_asked(replicas[0], "GET", f"/v1/responses/{made.id}")) == 3
            with pytest.raises(openai.BadRequestError) as refused:
                client.responses.cancel(made.id)  # the holder's answer, not another's 404
            assert "Cannot cancel a synchronous response." in refused.value.message
    # Each 404 came whole: its connection went back to the pool and was used again.
    first = proxy.lt.call(lambda: proxy.app.pools.all()[0])
    assert first.pool.origin.port == httpx.URL(replicas[0].url).port
    assert len(first.pool.open) == 1
    assert proxy.permits_in_use() == 0


def test_previous_response_id_continues_on_the_holder(
    proxy: ProxyHarness, replicas: list[ProcessServer]
) -> None:
    holder = replicas[1]  # replica 0 is asked first, and answers 404
    first = _made_on(holder)
    with _sdk(proxy.url) as client:
        follow = client.responses.create(
            model="chat", input="And?", max_output_tokens=3, previous_response_id=first.id
        )
        assert follow.previous_response_id == first.id
        events = list(
            client.responses.create(
                model="chat", input="Then?", max_output_tokens=3, stream=True,
                previous_response_id=follow.id,
            )
        )  # fmt: skip
        assert events[-1].type in ("response.completed", "response.incomplete")
        assert events[-1].response.previous_response_id == follow.id
    sent = _asked(holder, "POST", "/v1/responses")
    assert [r["body"].get("previous_response_id") for r in sent] == [None, first.id, follow.id]
    # Replica 0 was asked each time, answered 404 before generating, and holds nothing.
    assert len(_asked(replicas[0], "POST", "/v1/responses")) == 2
    assert SimClient(replicas[0].url).stats()["tokens"] == 0
    assert proxy.permits_in_use() == 0


def test_an_id_no_replica_holds_is_vllms_404_after_asking_each(
    proxy: ProxyHarness, replicas: list[ProcessServer]
) -> None:
    with _sdk(proxy.url) as client, pytest.raises(openai.NotFoundError) as missing:
        client.responses.retrieve("resp_0000")
    assert missing.value.response.json()["error"]["message"] == (
        "Response with id 'resp_0000' not found."
    )
    for sim in replicas:
        assert len(_asked(sim, "GET", "/v1/responses/resp_0000")) == 1


def test_an_app_with_several_routes_names_the_model_in_the_query(
    replicas: list[ProcessServer],
) -> None:
    digest = hashlib.sha256(KEY.encode()).digest()
    app = App(name="a", key_hashes=frozenset({digest}), routes=frozenset({"chat", "other"}))
    snap = routed_snapshot(
        replicas[0].url, {"chat": {}, "other": {}}, apps=(app,), apps_by_key={digest: app}
    )
    harness = ProxyHarness(snap)
    try:
        made = _made_on(replicas[0])
        with _sdk(harness.url, KEY) as client:
            with pytest.raises(openai.BadRequestError) as unnamed:
                client.responses.retrieve(made.id)
            error = unnamed.value.response.json()["error"]
            assert error["code"] == "missing_model" and "?model=NAME" in error["message"]
            read = client.responses.retrieve(made.id, extra_query={"model": "other"})
            assert read.id == made.id
            with pytest.raises(openai.NotFoundError):  # one replica: its 404, asked once
                client.responses.retrieve("resp_1111", extra_query={"model": "chat"})
        assert len(_asked(replicas[0], "GET", "/v1/responses/resp_1111")) == 1
    finally:
        harness.close()


def test_workers_find_the_holder_too(replicas: list[ProcessServer], tmp_path: Path) -> None:
    urls = ", ".join(f'"{s.url}"' for s in replicas)
    config = tmp_path / "cfg"
    config.mkdir()
    (config / "gateway.yaml").write_text(
        "kind: Gateway\n"
        f"backends:\n  - {{name: sim, urls: [{urls}], routing: {{strategy: least_outstanding}}}}\n"
        "routes:\n  - {model: chat, backend: sim, upstream_model: sim-model}\n",
        encoding="utf-8",
    )
    server = start_sluice(config, "--workers", "2")
    try:
        made = _made_on(replicas[1])
        for _ in range(6):  # new connections: either worker may take each
            with httpx.Client(timeout=10) as fresh:
                read = fresh.get(f"{server.url}/v1/responses/{made.id}")
            assert read.status_code == 200 and read.json()["id"] == made.id
        # Each worker asks replica 0 first (least outstanding, both idle): its 404, then
        # the holder's answer.
        assert len(_asked(replicas[0], "GET", f"/v1/responses/{made.id}")) == 6
    finally:
        server.stop()
