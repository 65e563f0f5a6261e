"""A reload through `sluice serve` reconciles hot state and says what it cannot apply
(issue 12 defect 8): a changed listen port is named in the reload's warning, its log event
and /admin/config until a restart; limits follow the swap."""

from __future__ import annotations

from tests.reload.fixtures import ConfigDir, Gateway, StartGateway, write_in_place


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
