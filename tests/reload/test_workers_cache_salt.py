"""`sluice serve --workers 2` with apps: both workers send the same cache_salt for an app
(the generated key is created once, in a file every worker reads), so workers never split
an app's prefix cache, and restarts keep it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.fixtures import ProcessServer
from tests.reload.fixtures import (
    ConfigDir,
    PinnedClient,
    StartGateway,
    auth,
    chat_body,
    sim_request,
    write_in_place,
)
from tests.reload.test_workers_e2e import pin_workers, worker_pids

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")


def test_workers_and_restarts_agree_on_the_salt(
    config: ConfigDir, start_gateway: StartGateway, sim: ProcessServer
) -> None:
    gateway = start_gateway(config, "--workers", "2", watching=False)
    pids = worker_pids(gateway)
    salts: dict[int, str] = {}
    for attempt in range(200):  # SO_REUSEPORT hashes each new connection to one worker
        client = PinnedClient(gateway.url, pids)
        if client.pid not in salts:
            request_id = f"salt-{attempt}"
            resp = client.client.post(
                "/v1/chat/completions",
                json=chat_body(max_tokens=2),
                headers=auth(**{"x-request-id": request_id}),
            )
            assert resp.status_code == 200, resp.text
            salts[client.pid] = sim_request(sim.url, request_id)["body"]["cache_salt"]
        client.close()
        if len(salts) == 2:
            break
    assert len(salts) == 2
    expected = gateway.cache_salt("picker")
    assert set(salts.values()) == {expected}
    key_file = gateway.cwd / "sluice-cache-salt.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    gateway.close()

    again = start_gateway(config)
    resp = again.client.post(
        "/v1/chat/completions",
        json=chat_body(max_tokens=2),
        headers=auth(**{"x-request-id": "salt-restart"}),
    )
    assert resp.status_code == 200
    assert sim_request(sim.url, "salt-restart")["body"]["cache_salt"] == expected


def test_apps_added_by_a_reload_get_one_salt_from_every_worker(
    config: ConfigDir, start_gateway: StartGateway, sim: ProcessServer
) -> None:
    """Started with no apps, the workers had no key file to read; the reload that adds
    apps must not leave each worker salting with a random key of its own."""
    with_apps = config.files["gateway.yaml"]
    cut = slice(with_apps.index("apps:\n"), with_apps.index("experiments:\n"))
    assert config.save("gateway.yaml", with_apps.replace(with_apps[cut], ""), write_in_place)
    gateway = start_gateway(config, "--workers", "2", watching=False)
    clients = pin_workers(gateway, config)
    expected_version = config.save("gateway.yaml", with_apps, write_in_place)
    salts: dict[int, str] = {}
    for pid, client in clients.items():
        gateway_deadline = 50
        while client.version() != expected_version:
            gateway_deadline -= 1
            assert gateway_deadline, client.admin_config()
            time.sleep(0.1)
        request_id = f"salt-added-{pid}"
        resp = client.client.post(
            "/v1/chat/completions",
            json=chat_body(max_tokens=2),
            headers=auth(**{"x-request-id": request_id}),
        )
        assert resp.status_code == 200, resp.text
        salts[pid] = sim_request(sim.url, request_id)["body"]["cache_salt"]
        client.close()
    assert set(salts.values()) == {gateway.cache_salt("picker")}, salts
