"""Items 2 and 3 of issue 13: `limits.store: redis://...` makes a limit global across
replicas; a replica killed with SIGKILL gives its permits back within the lease; Redis
going away mid-load fails no request (each replica falls back to its share) and limits
are global again once it is back, with no permit leaked."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx

from tests.fixtures import StreamResult, free_port
from tests.scale.fixtures import (
    ADMIN,
    RedisServer,
    burst,
    held_key,
    statuses,
    stream,
    wait_until,
    write_gateway,
)

HELD = held_key("backend:sim")


def test_limit_is_global_across_replicas(start, slow_sim, sim_stats, redis, tmp_path: Path) -> None:
    config = write_gateway(tmp_path / "cfg", slow_sim.url, limit=3, store=redis.url)
    replicas = [start(config), start(config, "--workers", "2")]
    results = burst([r.url for r in replicas], 18, 100)
    counts = statuses(results)
    downs = [e for r in replicas for e in r.json_logs() if "store" in e.get("event", "")]
    assert counts[200] == 3, (counts, downs)
    assert counts[503] == 15, counts
    assert sim_stats.stats()["max_active"] == 3
    wait_until("every permit back in Redis", lambda: redis.zcard(HELD) == 0)

    def store() -> object:
        return httpx.get(replicas[0].url + "/admin/status", headers=ADMIN, timeout=5).json()[
            "limit_store"
        ]

    # The live count is each process's last heartbeat's reading: on a busy machine one
    # may lag a beat (a CI run read 2 once), so it is waited for, not read once.
    wait_until(
        "three live processes", lambda: store() == {"store": "redis", "up": True, "processes": 3}
    )


def test_sigkilled_replica_permits_return_within_lease(
    start, slow_sim, sim_stats, redis, tmp_path: Path
) -> None:
    config = write_gateway(
        tmp_path / "cfg", slow_sim.url, limit=2, queue_max=8, queue_wait="10s", store=redis.url
    )
    victim, survivor = start(config), start(config)
    holders: list[StreamResult | None] = []
    threads = [
        threading.Thread(target=lambda: holders.append(stream(victim.url, 3000))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    wait_until("the victim holds both permits", lambda: redis.zcard(HELD) == 2)
    victim.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    # The survivor's request queues behind the dead replica's permits until their leases
    # (2 s) run out, then runs to the end.
    result = stream(survivor.url, 20)
    assert result is not None
    waited = time.monotonic() - killed
    assert result.status == 200
    assert waited < 2 + 2.5, waited
    wait_until("no permit left", lambda: redis.zcard(HELD) == 0)
    for t in threads:
        t.join(10)


def test_redis_outage_under_load(start, slow_sim, sim_stats, redis, tmp_path: Path) -> None:
    config = write_gateway(
        tmp_path / "cfg", slow_sim.url, limit=4, queue_max=64, queue_wait="20s", store=redis.url
    )
    replicas = [start(config), start(config)]
    urls = [r.url for r in replicas]
    wait_until("both replicas count 2 processes", lambda: all(_processes(u) == 2 for u in urls))
    outcome: list[list[StreamResult]] = []
    load = threading.Thread(target=lambda: outcome.append(burst(urls, 24, 30, timeout=60)))
    load.start()
    wait_until("permits taken in Redis", lambda: redis.zcard(HELD) > 0)
    redis.kill()
    time.sleep(1.0)
    redis.start()
    load.join(60)
    assert outcome, "the load did not finish"
    counts = statuses(outcome[0])
    errors = [e for r in replicas for e in r.json_logs() if e.get("event") == "handler_error"]
    assert counts == {200: 24}, (counts, errors)
    # During the outage each replica keeps to its share (4 / 2). Around the switches the
    # replicas do not change at the same instant, and the total may pass the limit by up
    # to one replica's share (docs/OPERATIONS.md, "Redis down or slow"); measured: 4, and
    # 5 in about one run out of six.
    assert sim_stats.stats()["max_active"] <= 4 + 2
    # Back to global: the store says up again, and a new burst is held to 4 in total.
    wait_until("store up again", lambda: all(_store_up(u) for u in urls), timeout=10)
    sim_stats.reset()
    counts = statuses(burst(urls, 12, 30))
    assert counts == {200: 12}, counts
    events = [
        (e["event"], e.get("error"), e["timestamp"])
        for r in replicas
        for e in r.json_logs()
        if "limit_store" in e.get("event", "")
    ]
    assert sim_stats.stats()["max_active"] <= 4, events
    wait_until("no permit leaked", lambda: redis.live(HELD) == 0)
    downs = [e for r in replicas for e in r.json_logs() if e.get("event") == "limit_store_down"]
    assert 1 <= len(downs) <= 2 * 2  # logged once per outage per replica, not per request


def _processes(url: str) -> int:
    status = httpx.get(url + "/admin/status", headers=ADMIN, timeout=5).json()
    return int(status["limit_store"]["processes"])


def _store_up(url: str) -> bool:
    text = httpx.get(url + "/metrics", headers=ADMIN, timeout=5).text
    return 'sluice_limit_store_up{store="redis"} 1.0' in text


def test_redis_down_at_start_up(start, slow_sim, sim_stats, tmp_path: Path) -> None:
    """No Redis yet: the replica starts on its share (2 workers: 4 / 2 each, so 4 in all),
    says so once, and goes global when Redis appears."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    config = write_gateway(tmp_path / "cfg", slow_sim.url, limit=4, queue_max=0, store=url)
    server = start(config, "--workers", "2")
    counts = statuses(burst([server.url], 12, 60))
    assert counts[200] <= 4 and counts[200] + counts[503] == 12, counts
    assert sim_stats.stats()["max_active"] <= 4
    assert not _store_up(server.url)
    redis = RedisServer(tmp_path / "redis", port=port)
    try:
        wait_until("global limits once Redis is there", lambda: _store_up(server.url))
        sim_stats.reset()
        counts = statuses(burst([server.url], 12, 60))
        assert counts == {200: 4, 503: 8}, counts
        assert sim_stats.stats()["max_active"] == 4
    finally:
        redis.kill()
