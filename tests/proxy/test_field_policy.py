"""The request-field policy and per-app prefix-cache isolation (issue 12 defect 9), through a
real sluice data plane to the real simulator, asserting the JSON the simulator received."""

from __future__ import annotations

import hashlib
import hmac
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
