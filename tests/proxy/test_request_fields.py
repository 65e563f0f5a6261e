"""What reaches the backend: clamps on whole numbers, vLLM's own range errors, `deny` as
"may not change", and Retry-After on a backend's 429/503. Each case runs a real sluice data
plane against the real simulator and asserts the exact JSON the simulator received."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sluice.control.config.build import load_config
from sluice.proxy.errors import retry_headers

from tests.fixtures import ProcessServer, ProxyHarness, SimClient

MSG = [{"role": "user", "content": "Hello"}]


def _config(tmp_path: Path, sim_url: str, preset: str) -> Path:
    (tmp_path / "gateway.yaml").write_text(
        "kind: Gateway\n"
        f'backends:\n  - {{name: sim, urls: ["{sim_url}"]}}\n'
        "routes:\n  - {model: chat, backend: sim, upstream_model: sim-model, preset: p}\n"
    )
    (tmp_path / "p.yaml").write_text("kind: Preset\nname: p\n" + preset)
    return tmp_path


@pytest.fixture
def harness_for(tmp_path: Path, sim: ProcessServer) -> Iterator[Any]:
    made: list[ProxyHarness] = []

    def make(preset: str) -> ProxyHarness:
        built = load_config(_config(tmp_path, sim.url, preset))
        harness = ProxyHarness(built.snapshot)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


def _sent(sim_client: SimClient) -> dict[str, Any]:
    """The body of the last request the simulator received."""
    body = sim_client.requests()[-1]["body"]
    assert isinstance(body, dict)
    return body


def _post(harness: ProxyHarness, **fields: Any) -> httpx.Response:
    body = {"model": "chat", "messages": MSG, "max_tokens": 2, **fields}
    return httpx.post(harness.url + "/v1/chat/completions", json=body, timeout=10)


# The reproducers of issue 12, defect 2: whole numbers bypassed a float clamp.
@pytest.mark.parametrize(
    ("sent", "received"),
    [(0, 0.5), (2, 1.5), (50, 1.5), (1, 1), (0.0, 0.5), (2.0, 1.5), (0.7, 0.7)],
)
def test_float_clamp_bounds_whole_numbers(
    harness_for: Any, sim_client: SimClient, sent: float, received: float
) -> None:
    harness = harness_for("policy:\n  temperature: {clamp: [0.5, 1.5]}\n")
    r = _post(harness, temperature=sent)
    assert r.status_code == 200, r.text
    got = _sent(sim_client)["temperature"]
    assert got == received and type(got) is type(received)


@pytest.mark.parametrize("sent", [-3, -0.5])
def test_negative_temperature_is_vllms_400_not_a_clamp(
    harness_for: Any, sim_client: SimClient, sent: float
) -> None:
    harness = harness_for("policy:\n  temperature: {clamp: [0.5, 1.5]}\n")
    r = _post(harness, temperature=sent)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "temperature"
    assert error["message"].startswith(f"temperature must be non-negative, got {float(sent)}.")
    assert sim_client.requests() == []  # nothing reached the backend


def test_integer_clamp_keeps_integers(harness_for: Any, sim_client: SimClient) -> None:
    harness = harness_for("policy:\n  max_new_tokens: {clamp: [1, 3.0]}\n")
    assert _post(harness, max_tokens=50).status_code == 200
    got = _sent(sim_client)["max_tokens"]
    assert got == 3 and type(got) is int


def test_deny_accepts_the_value_sent_anyway(harness_for: Any, sim_client: SimClient) -> None:
    # LangChain's completions class always sends n: 1; the preset sets no n.
    harness = harness_for(
        "generation: {seed: 7}\npolicy:\n  num_return_sequences: deny\n  seed: deny\n"
    )
    assert _post(harness, n=1).status_code == 200
    assert _sent(sim_client)["seed"] == 7 and "n" not in _sent(sim_client)
    assert _post(harness, seed=7, n=1.0).status_code == 200
    assert _sent(sim_client)["seed"] == 7
    for changed in ({"n": 2}, {"seed": 8}, {"n": True}):
        r = _post(harness, **changed)
        assert r.status_code == 400, changed
        assert r.json()["error"]["code"] == "field_denied"
    assert len(sim_client.requests()) == 2


def test_backend_503_and_429_carry_retry_after(harness_for: Any, sim_client: SimClient) -> None:
    harness = harness_for("generation: {temperature: 0.5}\n")
    own = _post(harness, sim={"status": 429, "retry_after": 7})
    assert own.status_code == 429 and own.headers["retry-after"] == "7"
    for status in (429, 503):
        estimated = _post(harness, sim={"status": status})
        assert estimated.status_code == status
        assert int(estimated.headers["retry-after"]) >= 1
    stream = _post(harness, stream=True, sim={"status": 503, "retry_after": 3})
    assert stream.status_code == 503 and stream.headers["retry-after"] == "3"


def test_a_backend_retry_after_is_passed_on_only_as_seconds() -> None:
    """A date or garbage from the backend becomes sluice's estimate; other statuses none."""
    assert retry_headers(429, b"7", lambda: 3) == [(b"retry-after", b"7")]
    assert retry_headers(503, b"Wed, 21 Oct 2026 07:28:00 GMT", lambda: 3) == [
        (b"retry-after", b"3")
    ]
    assert retry_headers(503, None, None) == [(b"retry-after", b"1")]
    assert retry_headers(500, b"7", lambda: 3) == []


def _post_to(harness: ProxyHarness, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(harness.url + path, json={"model": "chat", **body}, timeout=10)


def test_beam_search_is_refused_under_a_preset_it_would_undo(
    harness_for: Any, sim_client: SimClient
) -> None:
    """vLLM's beam search drops top_k, top_p, the penalties, seed and stop: under a preset
    that sets one, `use_beam_search` would undo it."""
    harness = harness_for(
        "generation: {top_k: 20, stop_strings: ['END']}\npolicy: {top_k: force}\n"
    )
    for path, body in (
        ("/v1/chat/completions", {"messages": MSG}),
        ("/v1/completions", {"prompt": "Hi"}),
    ):
        r = _post_to(harness, path, {**body, "use_beam_search": True, "n": 2})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "field_denied" and error["param"] == "use_beam_search"
        assert "stop, top_k" in error["message"]
    assert sim_client.requests() == []
    # Off, it changes nothing.
    assert _post(harness, use_beam_search=False).status_code == 200
    assert _sent(sim_client)["top_k"] == 20


def test_beam_search_passes_under_a_preset_it_honours(
    harness_for: Any, sim_client: SimClient
) -> None:
    harness = harness_for("generation: {temperature: 0.3, max_new_tokens: 4}\n")
    assert _post(harness, use_beam_search=True).status_code == 200
    sent = _sent(sim_client)
    assert sent["use_beam_search"] is True and sent["temperature"] == 0.3


def test_max_completion_tokens_stands_for_max_tokens_only_in_chat(
    harness_for: Any, sim_client: SimClient
) -> None:
    """vLLM reads max_completion_tokens in chat requests only: elsewhere it must not keep
    the preset's limit from being sent."""
    harness = harness_for(
        "generation: {max_new_tokens: 5}\npolicy:\n  max_new_tokens: {clamp: [1, 5]}\n"
    )
    r = _post_to(harness, "/v1/responses", {"input": "Hi", "max_completion_tokens": 1})
    assert r.status_code == 200, r.text
    assert _sent(sim_client)["max_output_tokens"] == 5
    r = _post_to(harness, "/v1/completions", {"prompt": "Hi", "max_completion_tokens": 1})
    assert r.status_code == 200, r.text
    assert _sent(sim_client)["max_tokens"] == 5
    # In chat it is the request's limit (vLLM prefers it to max_tokens).
    r = _post_to(harness, "/v1/chat/completions", {"messages": MSG, "max_completion_tokens": 2})
    assert r.status_code == 200, r.text
    assert _sent(sim_client)["max_completion_tokens"] == 2
    assert "max_tokens" not in _sent(sim_client)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses"])
def test_a_max_tokens_clamp_bounds_a_request_that_sets_none(
    harness_for: Any, sim_client: SimClient, path: str
) -> None:
    """Left out, the limit is the whole context: a clamp's upper bound applies."""
    harness = harness_for("policy:\n  max_new_tokens: {clamp: [1, 5]}\n")
    body: dict[str, Any] = {
        "/v1/chat/completions": {"messages": MSG},
        "/v1/completions": {"prompt": "Hi"},
        "/v1/responses": {"input": "Hi"},
    }[path]
    name = "max_output_tokens" if path == "/v1/responses" else "max_tokens"
    for extra in ({}, {name: None}):
        r = _post_to(harness, path, {**body, **extra})
        assert r.status_code == 200, r.text
        assert _sent(sim_client)[name] == 5
    r = _post_to(harness, path, {**body, name: 3})
    assert r.status_code == 200, r.text
    assert _sent(sim_client)[name] == 3


def test_errors_name_the_endpoints_own_field(harness_for: Any, sim_client: SimClient) -> None:
    harness = harness_for(
        "generation: {max_new_tokens: 5}\n"
        "policy:\n  max_new_tokens: {clamp: [1, 5]}\n  stop_strings: deny\n"
    )
    r = _post_to(harness, "/v1/responses", {"input": "Hi", "max_output_tokens": "5"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "max_output_tokens" and "'max_output_tokens'" in error["message"]
    r = _post_to(
        harness,
        "/v1/messages",
        {"max_tokens": 5, "messages": MSG, "stop_sequences": ["x"]},
    )
    assert r.status_code == 400, r.text
    assert "'stop_sequences' may not be set" in r.text
    assert sim_client.requests() == []
