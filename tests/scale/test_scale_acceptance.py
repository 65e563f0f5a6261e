"""Issue 13's acceptance test: 3 replicas x 2 workers behind the rendered nginx, Redis for
limits, a backend limit of 8.

- 64 concurrent streams through nginx: the simulator never has more than 8 in flight (its
  own high-water mark); the rest wait in the queue or get 503 with Retry-After.
- A preset edit in the shared config directory reaches all 6 processes within 2 s.
- One replica (supervisor and workers) SIGKILLed while it holds permits: they return within
  the lease (2 s here), and the other replicas keep serving through nginx.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.edge.fixtures import Nginx, render
from tests.fixtures import ProcessServer, free_port, sluice_cmd
from tests.scale.fixtures import (
    ADMIN,
    ADMIN_TOKEN,
    burst,
    held_key,
    statuses,
    stream,
    wait_until,
)

# Edge binaries, and load-timed: run alone, after the parallel pass (Makefile).
pytestmark = [pytest.mark.edge, pytest.mark.serial]

REPLICAS = 3
WORKERS = 2
LIMIT = 8
LEASE_S = 2.0
HELD = held_key("backend:sim")

GATEWAY = """\
kind: Gateway
admin: {{token: env:SLUICE_ADMIN_TOKEN}}
limits: {{store: env:SLUICE_TEST_REDIS, lease: {lease}s, store_timeout: 3s}}
backends:
  - name: sim
    urls: ["{sim_url}"]
    max_concurrency: {limit}
    queue: {{max: 16, max_wait: 2s}}
routes:
  - {{model: chat, backend: sim, upstream_model: sim-model, preset: tone}}
edge:
  nginx:
    server_name: localhost
    listen: {nginx_port}
    replicas: [{replicas}]
    access_log: {root}/access.log
"""
PRESET = "kind: Preset\ngeneration: {{temperature: {t}}}\n"


class Replica:
    def __init__(self, config: Path, port: int, redis_url: str) -> None:
        argv = sluice_cmd(
            "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(WORKERS), "--drain-timeout", "1",
        )  # fmt: skip
        env = {"SLUICE_ADMIN_TOKEN": ADMIN_TOKEN, "SLUICE_TEST_REDIS": redis_url}
        self.server = ProcessServer(argv, env=env, timeout=40)
        self.url = f"http://127.0.0.1:{port}"

    def workers(self) -> list[int]:
        started = [e for e in self.server.json_logs() if e.get("event") == "workers_started"]
        return list(started[0]["pids"])

    def watchers_live(self) -> bool:
        live = [e for e in self.server.json_logs() if e.get("event") == "config_watch_live"]
        return len(live) >= WORKERS

    def sigkill(self) -> None:
        for pid in [self.server.proc.pid, *self.workers()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def status_all(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sluice_cmd("status", "--all", "--config", str(config)),
        env={**os.environ, "SLUICE_ADMIN_TOKEN": ADMIN_TOKEN, "SLUICE_TEST_REDIS": "redis://x"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def pinned_clients(replica: Replica) -> dict[int, httpx.Client]:
    """One keep-alive connection to each worker of `replica` (SO_REUSEPORT hashes each new
    connection to one worker), keyed by the worker's pid."""
    clients: dict[int, httpx.Client] = {}
    for _ in range(100):
        client = httpx.Client(base_url=replica.url, headers=ADMIN, timeout=5)
        pid = client.get("/admin/status").json()["pid"]
        if pid in clients:
            client.close()
        else:
            clients[pid] = client
        if len(clients) == WORKERS:
            return clients
    raise AssertionError(f"100 connections reached only workers {sorted(clients)}")


def test_three_replicas_two_workers_behind_nginx(slow_sim, sim_stats, redis, tmp_path: Path):
    root = tmp_path / "stack"
    root.mkdir()
    config = tmp_path / "cfg"
    config.mkdir()
    ports = [free_port() for _ in range(REPLICAS)]
    nginx_port = free_port()
    (config / "gateway.yaml").write_text(
        GATEWAY.format(
            lease=LEASE_S,
            sim_url=slow_sim.url,
            limit=LIMIT,
            nginx_port=nginx_port,
            replicas=", ".join(f'"127.0.0.1:{p}"' for p in ports),
            root=root,
        )
    )
    (config / "tone.yaml").write_text(PRESET.format(t=0.5))
    render("nginx", config, root)
    nginx = Nginx(root, nginx_port)
    replicas: list[Replica] = []
    clients: dict[int, httpx.Client] = {}
    try:
        nginx.start()
        replicas = [Replica(config, port, redis.url) for port in ports]
        wait_until(
            "every worker's config watcher", lambda: all(r.watchers_live() for r in replicas)
        )

        # 64 streams through nginx: at most 8 at the simulator, the rest queued or refused.
        results = burst([nginx.url], 64, 40)
        counts = statuses(results)
        assert set(counts) <= {200, 503}, counts
        assert counts[200] >= LIMIT, counts
        refused = [r for r in results if r.status == 503]
        assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
        assert sim_stats.stats()["max_active"] == LIMIT
        wait_until("every permit back", lambda: redis.zcard(HELD) == 0)

        # A preset edit reaches all 6 processes within 2 s.
        for replica in replicas:
            clients.update(pinned_clients(replica))
        assert len(clients) == REPLICAS * WORKERS
        before = {c.get("/admin/status").json()["config"]["version"] for c in clients.values()}
        assert len(before) == 1
        written = time.monotonic()
        (config / "tone.yaml").write_text(PRESET.format(t=0.8))
        reached: dict[int, float] = {}
        while len(reached) < len(clients):
            for pid, client in clients.items():
                if pid not in reached:
                    version = client.get("/admin/status").json()["config"]["version"]
                    if version not in before:
                        reached[pid] = time.monotonic() - written
            assert time.monotonic() - written < 2.0, f"after 2 s only {reached}"
            time.sleep(0.01)

        # `sluice status --all` reads the replicas from edge.nginx.replicas: all agree.
        # Each worker's sluice_config_info follows its reload within a second (the gauges
        # are sampled once a second), so the listing agrees shortly after the processes do.
        listings = []

        def agreed() -> bool:
            listings.append(status_all(config))
            return listings[-1].returncode == 0

        wait_until("status --all to agree", agreed, timeout=5)
        listing = listings[-1]
        lines = listing.stdout.strip().splitlines()
        assert len(lines) == REPLICAS + 1
        assert lines[-1].startswith(f"all {REPLICAS} replicas serve config ")
        assert all("limits redis" in line for line in lines[:-1])

        # SIGKILL one replica while it holds 4 permits; another holds 4 more.
        sim_stats.reset()
        victim, other = replicas[0], replicas[1]
        holders = [
            threading.Thread(target=stream, args=(replica.url, 400), daemon=True)
            for replica in (victim, other)
            for _ in range(4)
        ]
        for thread in holders:
            thread.start()
        wait_until("8 permits held", lambda: redis.zcard(HELD) == LIMIT)
        victim.sigkill()
        killed = time.monotonic()
        wait_until("the dead replica's permits back", lambda: redis.live(HELD) <= 4, timeout=10)
        returned = time.monotonic() - killed
        assert returned <= LEASE_S + 1.0, returned
        listing = status_all(config)
        assert listing.returncode == 1
        assert f"1 of {REPLICAS} replicas did not answer" in listing.stdout
        # nginx steers around the dead replica; the freed permits serve new streams.
        after = burst([nginx.url], 4, 10)
        assert statuses(after) == {200: 4}
        for thread in holders:
            thread.join(15)
        wait_until("no permit leaked", lambda: redis.zcard(HELD) == 0)
        assert sim_stats.stats()["max_active"] <= LIMIT
    finally:
        for client in clients.values():
            client.close()
        for replica in replicas:
            replica.server.stop()
        nginx.stop()
