"""The request-field policy and per-app prefix-cache isolation (issue 12 defect 9), through a
real sluice data plane to the real simulator, asserting the JSON the simulator received."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sluice.control.config.build import load_config

from tests.fixtures import ProcessServer, ProxyHarness, SimClient, key_line

KEY = bytes(range(32))
MSG = [{"role": "user", "content": "Hi"}]


def _gateway(sim_url: str, extra: str = "") -> str:
    return f"""\
kind: Gateway
backends:
  - {{name: sim, urls: ["{sim_url}"]}}
routes:
  - {{model: chat, backend: sim, upstream_model: sim-model}}
  - {{model: queue, backend: sim, upstream_model: sim-model, request_fields: {{priority: allow}}}}
apps:
  - {{name: alpha, keys: ["{key_line("sk-alpha")}"]}}
  - name: beta
    keys: ["{key_line("sk-beta")}"]
    request_fields: {{chat_template: allow, user: {{force: beta-user}}}}
{extra}"""


@pytest.fixture
def make(tmp_path: Path, sim: ProcessServer) -> Iterator[Any]:
    made: list[ProxyHarness] = []

    def start(extra: str = "") -> ProxyHarness:
        (tmp_path / "gateway.yaml").write_text(_gateway(sim.url, extra))
        harness = ProxyHarness(load_config(tmp_path).snapshot)
        harness.app.salt_key = KEY  # what `sluice serve` reads from its key file
        made.append(harness)
        return harness

    yield start
    for harness in made:
        harness.close()


def _post(harness: ProxyHarness, app: str, model: str = "chat", **fields: Any) -> httpx.Response:
    return httpx.post(
        harness.url + "/v1/chat/completions",
        json={"model": model, "messages": MSG, "max_tokens": 2, **fields},
        headers={"authorization": f"Bearer sk-{app}"},
        timeout=10,
    )


def _received(sim_client: SimClient) -> dict[str, Any]:
    body = sim_client.requests()[-1]["body"]
    assert isinstance(body, dict)
    return body


def _salt(app: str, client_salt: str | None = None) -> str:
    message = app.encode() if client_salt is None else app.encode() + b"\0" + client_salt.encode()
    return hmac.new(KEY, message, hashlib.sha256).hexdigest()


@pytest.mark.parametrize(
    "field", [{"priority": -10}, {"chat_template": "{{ 7*7 }}"}, {"kv_transfer_params": {}},
              {"vllm_xargs": {"a": 1}}],
)  # fmt: skip
def test_risky_fields_are_denied_by_default(
    make: Any, sim_client: SimClient, field: dict[str, Any]
) -> None:
    harness = make()
    r = _post(harness, "alpha", **field)
    assert r.status_code == 400
    error = r.json()["error"]
    (name,) = field
    assert error["code"] == "field_denied" and error["param"] == name
    assert "default request-field policy" in error["message"]
    assert sim_client.requests() == []


def test_deny_accepts_vllms_own_default(make: Any, sim_client: SimClient) -> None:
    harness = make()
    assert _post(harness, "alpha", priority=0, chat_template=None).status_code == 200
    assert _received(sim_client) == {
        "model": "sim-model",
        "messages": MSG,
        "max_tokens": 2,
        "chat_template": None,  # null is vLLM's default: passed on unchanged
        "cache_salt": _salt("alpha"),
    }


def test_route_and_app_rules(make: Any, sim_client: SimClient) -> None:
    harness = make()
    assert _post(harness, "alpha", model="queue", priority=-5).status_code == 200
    assert _received(sim_client)["priority"] == -5
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    r = _post(harness, "beta", chat_template=template, user="someone")
    assert r.status_code == 200, r.text
    received = _received(sim_client)
    assert received["chat_template"] == template and received["user"] == "beta-user"
    assert _post(harness, "alpha", chat_template=template).status_code == 400


def test_cache_salt_per_app(make: Any, sim_client: SimClient) -> None:
    harness = make()
    assert _post(harness, "alpha").status_code == 200
    alpha = _received(sim_client)["cache_salt"]
    assert _post(harness, "beta").status_code == 200
    beta = _received(sim_client)["cache_salt"]
    assert (alpha, beta) == (_salt("alpha"), _salt("beta")) and alpha != beta
    # A client's own salt partitions its app's cache further, never reaches another app's.
    assert _post(harness, "alpha", cache_salt=beta).status_code == 200
    assert _received(sim_client)["cache_salt"] == _salt("alpha", beta) != beta
    assert _post(harness, "alpha", cache_salt=7).status_code == 400


def test_cache_isolation_off(make: Any, sim_client: SimClient) -> None:
    harness = make("cache_isolation: {mode: off}\n")
    assert _post(harness, "alpha", cache_salt="mine").status_code == 200
    assert _received(sim_client)["cache_salt"] == "mine"
    assert _post(harness, "alpha").status_code == 200
    assert "cache_salt" not in _received(sim_client)


def _forward(harness: ProxyHarness, app: str, path: str, **body: Any) -> httpx.Response:
    return httpx.post(
        harness.url + path,
        json={"model": "chat", **body},
        headers={"authorization": f"Bearer sk-{app}"},
        timeout=10,
    )


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/embeddings", {"input": "a"}), ("/tokenize", {"prompt": "a"}),
     ("/invocations", {"messages": MSG})],
)  # fmt: skip
def test_forwarded_json_bodies_are_held_to_the_field_rules(
    make: Any, sim_client: SimClient, path: str, body: dict[str, Any]
) -> None:
    """A forwarded route relays its body unread but for `model`; a JSON object is still
    held to the request-field rules: `priority` on /invocations (vLLM's chat handler) or
    /v1/embeddings jumps vLLM's queue as it would on /v1/chat/completions."""
    harness = make()
    for field in ({"priority": -10}, {"chat_template": "{{ 7*7 }}"}):
        r = _forward(harness, "alpha", path, **body, **field)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "field_denied"
    assert sim_client.requests() == []


def test_forwarded_json_bodies_get_forced_fields_and_the_salt_where_a_model_runs(
    make: Any, sim_client: SimClient
) -> None:
    harness = make()
    r = _forward(harness, "beta", "/v1/embeddings", input="a", priority=0)
    assert r.status_code == 200, r.text
    # The app's forced field, vLLM's default priority dropped, the app's salt added.
    assert _received(sim_client) == {
        "model": "sim-model",
        "input": "a",
        "user": "beta-user",
        "cache_salt": _salt("beta"),
    }
    # Tokenizing runs no model: no prefix cache to isolate, no salt for vLLM to ignore.
    assert _forward(harness, "beta", "/tokenize", prompt="a").status_code == 200
    assert _received(sim_client) == {"model": "sim-model", "prompt": "a", "user": "beta-user"}


def _raw_post(harness: ProxyHarness, target: str, body: dict[str, Any]) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", harness.port, timeout=10)
    try:
        headers = {"authorization": "Bearer sk-alpha", "content-type": "application/json"}
        conn.request("POST", target, json.dumps(body), headers)
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        conn.close()


def test_a_percent_encoded_path_is_the_endpoint_vllm_decodes_it_to(
    make: Any, sim_client: SimClient
) -> None:
    """vLLM's server decodes %XX in the path once: `/v1/chat%2Fcompletions` is its chat
    endpoint. Sluice routes the decoded path, so the chat pipeline's rules hold on it; a
    path that would decode twice, or into what a path cannot hold, is refused."""
    harness = make()
    body = {"model": "chat", "messages": MSG, "max_tokens": 2}
    for target in ("/v1/chat%2Fcompletions", "/v1/%63hat/completions"):
        status, answer = _raw_post(harness, target, {**body, "priority": -10})
        assert (status, answer["error"]["code"]) == (400, "field_denied")
        status, answer = _raw_post(harness, target, body)
        assert status == 200 and answer["object"] == "chat.completion"
        assert _received(sim_client)["cache_salt"] == _salt("alpha")
    for target in ("/v1/chat%252Fcompletions", "/v1/chat/completions%3F", "/v1/chat%20x"):
        status, answer = _raw_post(harness, target, body)
        assert (status, answer["error"]["code"]) == (400, "invalid_path"), target


@pytest.mark.parametrize("method", ["OPTIONS", "GET"])
def test_the_asterisk_target_is_refused_not_forwarded_as_the_root(make: Any, method: str) -> None:
    """`OPTIONS *` (and `GET *`, which HTTP does not allow) name no path: refused with
    400 as nginx does, where they went to the backend as `/`."""
    harness = make()
    conn = http.client.HTTPConnection("127.0.0.1", harness.port, timeout=10)
    try:
        conn.request(method, "*", headers={"authorization": "Bearer sk-alpha"})
        answer = conn.getresponse()
        status, error = answer.status, json.loads(answer.read())["error"]
    finally:
        conn.close()
    assert (status, error["code"]) == (400, "invalid_path")
    assert "'*'" in error["message"]


def test_a_background_response_is_denied_by_default(make: Any, sim_client: SimClient) -> None:
    """`background: true` (the Responses API, with vLLM's response store on) is answered
    at once while vLLM goes on generating: past the app's limits, the deadlines and a
    disconnect's abort. Denied unless allowed; `false`, vLLM's default, is dropped."""
    harness = make()

    def respond(**fields: Any) -> httpx.Response:
        return httpx.post(
            harness.url + "/v1/responses",
            json={"model": "chat", "input": "Hi", "max_output_tokens": 2, **fields},
            headers={"authorization": "Bearer sk-alpha"},
            timeout=10,
        )

    refused = respond(background=True, store=True)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == "field_denied"
    assert refused.json()["error"]["param"] == "background"
    assert sim_client.requests() == []
    assert respond(background=False).status_code == 200
    assert "background" not in _received(sim_client)
