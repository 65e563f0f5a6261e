"""A reload through `sluice serve` reconciles hot state and says what it cannot apply
(issue 12 defect 8): a changed listen port is named in the reload's warning, its log event
and /admin/config until a restart; limits follow the swap."""

from __future__ import annotations

import hashlib

from tests.reload.fixtures import PICKER_KEY, ConfigDir, Gateway, StartGateway, write_in_place


def test_listen_change_needs_a_restart_and_says_so(
    config: ConfigDir, start_gateway: StartGateway
) -> None:
    gateway: Gateway = start_gateway(config)
    assert gateway.admin_config()["restart_required"] == []
    text = config.files["gateway.yaml"].replace("max_concurrency: 512", "max_concurrency: 7")
    expected = config.save("gateway.yaml", text + "listen: {port: 18999}\n", write_in_place)
    assert expected is not None
    gateway.wait_for_version(expected)
    state = gateway.admin_config()
    assert state["restart_required"] == ["listen.port"]
    (event,) = gateway.wait_logged("config_needs_restart")
    assert event["level"] == "warning" and event["fields"] == ["listen.port"]
    # The rest of the edit is in force: the backend's limit was set at the swap.
    status = gateway.client.get("/admin/status", headers=gateway.admin_headers).json()
    limits = {queue["name"]: queue["limit"] for queue in status["queues"]}
    assert limits["backend:sim"] == 7  # no request since: set at the swap, not lazily


def test_a_reload_never_turns_api_keys_off(config: ConfigDir, start_gateway: StartGateway) -> None:
    """A gateway.yaml without its apps (removed, or caught half-written before `apps:`)
    is refused: keys stay required, the error says why, the last good config serves."""
    gateway: Gateway = start_gateway(config)
    before = config.version()
    text = config.files["gateway.yaml"]
    cut = text[text.index("apps:\n") : text.index("experiments:\n")]
    assert config.save("gateway.yaml", text.replace(cut, ""), write_in_place) is not None
    state = gateway.wait_until(lambda s: s["last_result"] == "error", "the refused reload")
    assert "removes every app, which would turn API keys off" in state["last_error"], state
    assert state["version"] == before
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert gateway.client.post("/v1/chat/completions", json=body).status_code == 401
    assert config.save("gateway.yaml", text, write_in_place) == before
    gateway.wait_until(lambda s: s["last_result"] == "ok", "the revert")


def test_a_reload_never_drops_the_origin_secret(
    config: ConfigDir, start_gateway: StartGateway
) -> None:
    """The same for `edge.origin_secret`: an edit without it (or a gateway.yaml cut off
    before `edge:`) would let requests skip the edge; it is refused."""
    digest = hashlib.sha256(b"edge-s3cret").hexdigest()
    text = config.files["gateway.yaml"]
    with_secret = text + f"edge: {{origin_secret: 'sha256:{digest}'}}\n"
    assert config.save("gateway.yaml", with_secret, write_in_place) is not None
    gateway: Gateway = start_gateway(config)
    before = config.version()
    assert config.save("gateway.yaml", text, write_in_place) is not None
    state = gateway.wait_until(lambda s: s["last_result"] == "error", "the refused reload")
    assert "edge.origin_secret: the edit removes it" in state["last_error"], state
    assert state["version"] == before
    resp = gateway.client.get("/v1/models", headers={"authorization": f"Bearer {PICKER_KEY}"})
    assert resp.status_code == 403 and "origin_secret_required" in resp.text, resp.text
