"""`sluice serve --workers 2`: a replica that a reload takes out of a health-checked backend
leaves /metrics (prometheus-client cannot remove a label set from a worker's file), and
nothing but JSON lines reaches stderr on the way."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures import ProcessServer, start_sim
from tests.ops.fixtures import scrape, wait_until, write_config
from tests.ops.test_ops_workers import WORKERS, worker_states

HEALTH = "health: {path: /health, interval: 200ms, timeout: 150ms}"
RELOADED_S = 30.0  # each worker's watcher sees the edit and reloads; a loaded box is slow


@pytest.fixture
def second_sim() -> Iterator[ProcessServer]:
    server = start_sim()
    yield server
    server.stop()


def healthy_urls(url: str) -> dict[str, float]:
    return {
        dict(labels)["url"]: value
        for (name, labels), value in scrape(url).samples.items()
        if name == "sluice_backend_healthy"
    }


def is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def set_replicas(gateway: Path, old: str, urls: list[str]) -> None:
    """The ops gateway's `sim` backend, on these replicas and health-checked."""
    text = gateway.read_text(encoding="utf-8")
    listed = ", ".join(f'"{u}"' for u in urls)
    new = f"urls: [{listed}], {HEALTH},"
    assert text.count(old) == 1
    gateway.write_text(text.replace(old, new), encoding="utf-8")


def test_a_removed_replica_leaves_metrics_under_workers(
    start, sim: ProcessServer, second_sim: ProcessServer, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "cfg", sim.url)
    gateway = config / "gateway.yaml"
    set_replicas(gateway, f'urls: ["{sim.url}"],', [sim.url, second_sim.url])
    server = start(config, "--workers", str(WORKERS), "--drain-timeout", "1")
    worker_states(server)
    both = {sim.url: 1.0, second_sim.url: 1.0}
    wait_until("both replicas healthy in /metrics", lambda: healthy_urls(server.url) == both)

    set_replicas(gateway, f'urls: ["{sim.url}", "{second_sim.url}"], {HEALTH},', [sim.url])

    def reloads() -> int:
        return sum(e.get("event") == "config_reloaded" for e in server.json_logs())

    wait_until(f"{WORKERS} workers reloaded", lambda: reloads() >= WORKERS, timeout=RELOADED_S)
    wait_until(
        "the removed replica's series gone",
        lambda: healthy_urls(server.url) == {sim.url: 1.0},
    )
    for _ in range(6):  # whichever worker answers the scrape
        assert healthy_urls(server.url) == {sim.url: 1.0}

    assert server.stop() == 0
    assert [line for line in server.stderr_lines if not is_json_object(line)] == []
