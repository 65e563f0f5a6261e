"""`sluice serve --workers 2`: /metrics sums both workers whichever answers the scrape,
the gauges are live, a dead worker's gauges drop out, and the metrics directory goes."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx

from tests.fixtures import ProcessServer
from tests.ops.fixtures import ADMIN, Streams, auth, chat, scrape, usage, wait_until

WORKERS = 2


def worker_states(server: ProcessServer) -> dict[int, dict[str, Any]]:
    """/admin/status of every worker, by pid (each request on a fresh connection, so
    SO_REUSEPORT spreads them; polled until every worker answered)."""
    states: dict[int, dict[str, Any]] = {}

    def all_seen() -> bool:
        for _ in range(8):
            body = httpx.get(server.url + "/admin/status", headers=ADMIN, timeout=5).json()
            states[body["pid"]] = body
        return len(states) == WORKERS

    wait_until("every worker's /admin/status", all_seen, step=0.01)
    return states


def metrics_dir(server: ProcessServer) -> Path:
    def started() -> dict[str, Any] | None:
        return next((e for e in server.json_logs() if e.get("event") == "workers_started"), None)

    # A worker can answer before the supervisor, descheduled under load, logs the line.
    wait_until("the supervisor's workers_started line", lambda: started() is not None)
    event = started()
    assert event is not None and len(event["pids"]) == WORKERS
    return Path(event["metrics_dir"])


def test_metrics_add_up_across_workers(start, ops_config: Path) -> None:
    server = start(ops_config, "--workers", str(WORKERS), "--drain-timeout", "1")
    url = server.url
    states = worker_states(server)
    assert sorted(s["worker"] for s in states.values()) == ["0", "1"]
    directory = metrics_dir(server)
    assert directory.is_dir()

    streams = Streams()
    try:
        plan = [chat("plain", 4 + i % 5) for i in range(24)]
        for body in plan:
            streams.start(url, body, auth("alpha" if len(streams.futures) % 2 else "beta"))
        results = streams.results()
    finally:
        streams.close()
    out = sum(usage(r)["completion_tokens"] for r in results)
    assert out == sum(b["max_tokens"] for b in plan)

    def sums_match() -> bool:
        s = scrape(url)
        return (
            s.total("sluice_requests_total", status="200") == 24
            and s.total("sluice_tokens_total", direction="out") == out
            and s.total("sluice_ttft_seconds_count") == 24
            and s.total("sluice_stream_duration_seconds_count") == 24
        )

    wait_until("24 requests in /metrics", sums_match)
    for _ in range(6):  # whichever worker answers, the sums are both workers'
        assert sums_match()
    apps = [
        {a["name"]: (a["requests"], a["tokens_out"]) for a in s["apps"]}
        for s in worker_states(server).values()
    ]
    assert apps[0] == apps[1]
    assert apps[0]["alpha"][0] + apps[0]["beta"][0] == 24

    assert server.stop() == 0
    assert not directory.exists()
    assert sorted(e["code"] for e in server.json_logs() if e["event"] == "worker_exited") == [0, 0]


def test_live_gauges_and_a_dead_worker(start, ops_config: Path) -> None:
    server = start(ops_config, "--workers", str(WORKERS), "--drain-timeout", "1")
    url = server.url
    directory = metrics_dir(server)
    worker_states(server)
    streams = Streams()
    try:
        for _ in range(6):
            streams.start(url, chat("plain", 300, sim={"itl_ms": 50}), auth("alpha"))

        def steady(n: int) -> bool:
            return all(scrape(url).get("sluice_active_streams") == n for _ in range(4))

        wait_until("6 active streams from every worker", lambda: steady(6))
        states = worker_states(server)
        assert sum(s["active_streams"] for s in states.values()) == 6
        victim = max(states, key=lambda pid: states[pid]["active_streams"])
        os.kill(victim, signal.SIGKILL)
        wait_until("its streams to break", lambda: sum(f.done() for f in streams.futures) > 0)
        survivors = 6 - states[victim]["active_streams"]
        wait_until(f"{survivors} active streams", lambda: steady(survivors))
        assert not (directory / f"gauge_livesum_{victim}.db").exists()
        assert server.proc.poll() is None  # the supervisor keeps the other worker
        # ... and starts the dead one again (issue 13): the log says so.
        wait_until(
            "the dead worker restarted",
            lambda: any(e["event"] == "worker_restarted" for e in server.json_logs()),
        )
        died = [e for e in server.json_logs() if e["event"] == "worker_died"]
        assert [(e["pid"], e["code"]) for e in died] == [(victim, -signal.SIGKILL)]
        worker_states(server)  # both workers answer again
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=10)
    finally:
        streams.close()
    assert code == 0  # the exit status covers the shutdown; the death was logged and healed
    assert not directory.exists()
    exits = {e["pid"]: e["code"] for e in server.json_logs() if e["event"] == "worker_exited"}
    assert victim not in exits and sorted(exits.values()) == [0, 0]


def test_a_worker_file_still_being_created_reads_as_empty(start, ops_config: Path) -> None:
    """A starting worker creates its values' file empty and sizes it a moment later; a
    scrape or /admin/status that reads it in between (another worker answering while one
    starts) reads no values from it, not a 500."""
    server = start(ops_config, "--workers", str(WORKERS), "--drain-timeout", "1")
    pids = set(worker_states(server))
    for name in ("counter_999999.db", "gauge_livesum_999999.db", "histogram_999999.db"):
        (metrics_dir(server) / name).touch()
    for _ in range(6):  # each on a fresh connection: both workers answer some
        status = httpx.get(server.url + "/admin/status", headers=ADMIN, timeout=5)
        assert status.status_code == 200, status.text
        assert status.json()["pid"] in pids
        metrics = httpx.get(server.url + "/metrics", timeout=5)
        assert metrics.status_code == 200, metrics.text
        assert "sluice_active_streams" in metrics.text
