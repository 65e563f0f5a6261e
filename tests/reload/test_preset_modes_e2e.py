"""A real `sluice serve` in front of a real `sluice sim`: for each way a preset is chosen
(route, x-sluice-preset header, experiment variant, app default) and each policy mode
(default, request override, force, clamp at both bounds, deny), the exact JSON body the
simulator received."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sluice.control.config.build import load_config
from sluice.proxy.routing import assign_variant

from tests.fixtures import ProcessServer, start_sim
from tests.reload.fixtures import (
    FIXED_KEY,
    PICKER_KEY,
    ConfigDir,
    Gateway,
    auth,
    base_files,
    sim_request,
    sim_request_ids,
)

MESSAGES = [{"role": "user", "content": "Hello"}]
# What the `modes` preset and the `guard` policy add to a chat request that sets nothing.
MODES_SENT = {
    "temperature": 0.3,
    "top_p": 0.9,
    "top_k": 40,
    "repetition_penalty": 1.1,
    "max_tokens": 16,
    "stop": ["###"],
}
# `alt`: do_sample false is sent as temperature 0, and forced.
ALT_SENT = {"temperature": 0, "top_p": 0.5, "max_tokens": 8}
_ids = itertools.count()


@pytest.fixture(scope="module")
def fast_sim() -> Iterator[ProcessServer]:
    """Every token at once: these tests look at request bodies, not timing."""
    server = start_sim("--ttft-ms", "1", "--itl-ms", "0")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, fast_sim: ProcessServer) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("modes")
    gateway = Gateway(ConfigDir(root / "cfg", base_files(fast_sim.url)), root)
    yield gateway
    gateway.close()


@pytest.fixture(scope="module")
def version(served: Gateway) -> str:
    return served.config.version()


def send(
    gateway: Gateway,
    sim: ProcessServer,
    body: dict[str, Any],
    *,
    key: str = PICKER_KEY,
    path: str = "/v1/chat/completions",
    **headers: str,
) -> tuple[httpx.Response, dict[str, Any] | None]:
    """POSTs through the gateway; returns the response and the body the simulator got
    (None when the gateway answered without calling the backend)."""
    request_id = f"modes-{next(_ids)}"
    resp = gateway.client.post(
        path, json=body, headers=auth(key, **{"x-request-id": request_id, **headers})
    )
    if resp.status_code != 200:
        assert request_id not in sim_request_ids(sim.url), "a rejected request reached the backend"
        return resp, None
    if body.get("stream"):
        assert resp.text.rstrip().endswith("data: [DONE]"), resp.text
    received = sim_request(sim.url, request_id)["body"]
    # Every request also carries its app's cache_salt (per-app prefix-cache isolation).
    app = "picker" if key == PICKER_KEY else "fixed"
    assert received.pop("cache_salt") == gateway.cache_salt(app)
    return resp, received


def chat(stream: bool = True, **fields: Any) -> dict[str, Any]:
    return {"model": "chat", "messages": MESSAGES, "stream": stream, **fields}


@pytest.mark.parametrize(
    ("request_fields", "sent_fields"),
    [
        pytest.param({}, MODES_SENT, id="defaults-filled"),
        pytest.param(
            {"temperature": 0.5, "top_p": 0.25, "top_k": 7, "max_tokens": 20},
            {**MODES_SENT, "temperature": 0.5, "top_p": 0.25, "top_k": 7, "max_tokens": 20},
            id="request-overrides-kept",
        ),
        pytest.param({"temperature": None}, MODES_SENT, id="null-is-unset-so-the-default-fills-it"),
        pytest.param({"repetition_penalty": 1.5}, MODES_SENT, id="forced-value-replaced"),
        pytest.param(
            {"temperature": 0.05, "max_tokens": 1},
            {**MODES_SENT, "temperature": 0.2, "max_tokens": 4},
            id="clamped-at-the-lower-bound",
        ),
        pytest.param(
            {"temperature": 1.7, "max_tokens": 1000},
            {**MODES_SENT, "temperature": 0.8, "max_tokens": 32},
            id="clamped-at-the-upper-bound",
        ),
        pytest.param(
            {"temperature": 0.2, "max_tokens": 32},
            {**MODES_SENT, "temperature": 0.2, "max_tokens": 32},
            id="values-at-the-bounds-kept",
        ),
        pytest.param(
            {"max_completion_tokens": 1000},
            {
                **{k: v for k, v in MODES_SENT.items() if k != "max_tokens"},
                "max_completion_tokens": 32,
            },
            id="max_completion_tokens-clamped-high-no-max_tokens-added",
        ),
        pytest.param(
            {"max_completion_tokens": 2},
            {
                **{k: v for k, v in MODES_SENT.items() if k != "max_tokens"},
                "max_completion_tokens": 4,
            },
            id="max_completion_tokens-clamped-low",
        ),
        pytest.param(
            {"stop": "END"}, {**MODES_SENT, "stop": ["END", "###"]}, id="policy-stop-appended"
        ),
    ],
)
def test_route_preset_policy_modes(
    served: Gateway,
    fast_sim: ProcessServer,
    version: str,
    request_fields: dict[str, Any],
    sent_fields: dict[str, Any],
) -> None:
    resp, received = send(served, fast_sim, chat(**request_fields))
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-sluice-preset"] == "modes"
    assert resp.headers["x-sluice-config"] == version
    assert received == {"model": "sim-model", "messages": MESSAGES, "stream": True, **sent_fields}
    assert type(received["temperature"]) is float  # 0.2, not a JSON int that equals it


def test_non_stream_request_gets_the_same_merge(served: Gateway, fast_sim: ProcessServer) -> None:
    resp, received = send(served, fast_sim, chat(stream=False, temperature=9.0, max_tokens=2))
    assert resp.status_code == 200, resp.text
    assert resp.json()["object"] == "chat.completion"
    expected = {**MODES_SENT, "temperature": 0.8, "max_tokens": 4}
    assert received == {"model": "sim-model", "messages": MESSAGES, "stream": False, **expected}


def test_completions_endpoint_gets_the_same_merge(served: Gateway, fast_sim: ProcessServer) -> None:
    body = {"model": "chat", "prompt": "Once", "stream": True, "max_tokens": 99}
    resp, received = send(served, fast_sim, body, path="/v1/completions")
    assert resp.status_code == 200, resp.text
    assert received == {
        "model": "sim-model",
        "prompt": "Once",
        "stream": True,
        **{**MODES_SENT, "max_tokens": 32},
    }


@pytest.mark.parametrize(
    ("field", "value", "sent"),
    [
        ("n", 1, MODES_SENT),  # vLLM's default: changes nothing (LangChain always sends it)
        ("seed", None, {**MODES_SENT, "seed": None}),  # null is "not set"
    ],
)
def test_denied_field_with_the_value_sent_anyway_is_accepted(
    served: Gateway, fast_sim: ProcessServer, field: str, value: Any, sent: dict[str, Any]
) -> None:
    resp, received = send(served, fast_sim, chat(**{field: value}))
    assert resp.status_code == 200, resp.text
    assert received == {"model": "sim-model", "messages": MESSAGES, "stream": True, **sent}


@pytest.mark.parametrize(("field", "value"), [("n", 2), ("seed", 7), ("n", "1")])
def test_denied_field_is_rejected_with_400(
    served: Gateway, fast_sim: ProcessServer, version: str, field: str, value: Any
) -> None:
    resp, received = send(served, fast_sim, chat(**{field: value}))
    assert received is None
    assert resp.status_code == 400
    assert resp.headers["x-sluice-config"] == version
    error = resp.json()["error"]
    assert error["param"] == field
    assert error["code"] == "field_denied"
    assert error["type"] == "invalid_request_error"
    assert "modes" in error["message"]


def test_header_picks_a_preset_for_an_app_allowed_to(
    served: Gateway, fast_sim: ProcessServer
) -> None:
    # alt forces do_sample false (temperature 0), whatever the request says.
    resp, received = send(
        served, fast_sim, chat(temperature=0.9, top_p=0.7), **{"x-sluice-preset": "alt"}
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-sluice-preset"] == "alt"
    # The route's policy still applies: only the preset was picked.
    expected = {**ALT_SENT, "top_p": 0.7, "stop": ["###"]}
    assert received == {"model": "sim-model", "messages": MESSAGES, "stream": True, **expected}


def test_header_is_refused_for_an_app_not_allowed_to(
    served: Gateway, fast_sim: ProcessServer
) -> None:
    resp, received = send(served, fast_sim, chat(), key=FIXED_KEY, **{"x-sluice-preset": "alt"})
    assert received is None
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "preset_header_not_allowed"


def test_header_naming_an_unknown_preset_is_a_400(served: Gateway, fast_sim: ProcessServer) -> None:
    resp, received = send(served, fast_sim, chat(), **{"x-sluice-preset": "nope"})
    assert received is None
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == "unknown_preset"
    assert "alt" in error["message"] and "modes" in error["message"]


def users_by_variant(served: Gateway) -> dict[str, str]:
    """One x-user-id per variant of the `split` experiment, by the proxy's own assignment."""
    experiment = load_config(served.config.path).snapshot.routes["ab"].experiment
    assert experiment is not None
    users: dict[str, str] = {}
    for i in range(1000):
        users.setdefault(assign_variant(experiment, f"user-{i}").name, f"user-{i}")
        if len(users) == 2:
            return users
    raise AssertionError(f"no user for every variant: {users}")


def test_experiment_variant_applies_its_preset(served: Gateway, fast_sim: ProcessServer) -> None:
    sent = {"a": ("modes", MODES_SENT), "b": ("alt", {**ALT_SENT, "stop": ["###"]})}
    for variant, user in users_by_variant(served).items():
        preset, fields = sent[variant]
        for _ in range(2):  # sticky: the same user gets the same variant again
            body = {**chat(), "model": "ab"}
            resp, received = send(served, fast_sim, body, **{"x-user-id": user})
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-sluice-variant"] == variant
            assert resp.headers["x-sluice-preset"] == preset
            assert received == {
                "model": "sim-model",
                "messages": MESSAGES,
                "stream": True,
                **fields,
            }


def test_header_takes_precedence_over_the_experiment(
    served: Gateway, fast_sim: ProcessServer
) -> None:
    user_a = users_by_variant(served)["a"]  # variant a would apply modes
    body = {**chat(), "model": "ab"}
    resp, received = send(served, fast_sim, body, **{"x-user-id": user_a, "x-sluice-preset": "alt"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-sluice-preset"] == "alt"
    assert "x-sluice-variant" not in resp.headers
    expected = {**ALT_SENT, "stop": ["###"]}
    assert received == {"model": "sim-model", "messages": MESSAGES, "stream": True, **expected}


def test_app_default_preset_applies_where_the_route_names_none(
    served: Gateway, fast_sim: ProcessServer
) -> None:
    body = {**chat(), "model": "bare"}
    resp, received = send(served, fast_sim, body, key=FIXED_KEY)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-sluice-preset"] == "alt"
    assert received == {"model": "sim-model", "messages": MESSAGES, "stream": True, **ALT_SENT}


def test_route_without_preset_forwards_the_request_unchanged(
    served: Gateway, fast_sim: ProcessServer
) -> None:
    body = {**chat(temperature=1.9, n=2), "model": "bare"}
    resp, received = send(served, fast_sim, body)
    assert resp.status_code == 200, resp.text
    assert "x-sluice-preset" not in resp.headers
    assert received == {**body, "model": "sim-model"}
