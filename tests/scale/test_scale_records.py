"""Item 4 of issue 13: A/B records from every replica in one PostgreSQL database
(`records.url`), feedback posted to replica B for a request served by replica A, and
`sluice ab report` reading it all; a real PostgreSQL cluster (initdb + pg_ctl)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

from tests.fixtures import key_line, sluice_cmd
from tests.scale.fixtures import ADMIN_TOKEN, wait_until

KEY = "sk-scale-records-2f9c41d7e8"
GATEWAY = """\
kind: Gateway
backends:
  - {{name: sim, urls: ["{sim_url}"]}}
routes:
  - {{model: chat, backend: sim, upstream_model: sim-model}}
apps:
  - {{name: support, keys: ["{key}"]}}
experiments:
  - name: tone
    route: chat
    sticky: header:x-user-id
    variants:
      - {{name: a, preset: warm, weight: 1}}
      - {{name: b, preset: cold, weight: 1}}
records: {{url: env:SLUICE_TEST_PG, flush_interval: 200ms}}
"""


def test_records_from_two_replicas_in_postgres(start, slow_sim, postgres, tmp_path: Path) -> None:
    config = tmp_path / "cfg"
    config.mkdir()
    (config / "gateway.yaml").write_text(GATEWAY.format(sim_url=slow_sim.url, key=key_line(KEY)))
    (config / "warm.yaml").write_text("kind: Preset\ngeneration: {temperature: 0.7}\n")
    (config / "cold.yaml").write_text("kind: Preset\ngeneration: {temperature: 0.1}\n")
    env = {"SLUICE_TEST_PG": postgres.url}
    replica_a, replica_b = start(config, env=env), start(config, env=env)
    # The module's tests share the database, in any order (pytest-randomly).
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute("TRUNCATE records, feedback")
    served: dict[str, str] = {}
    for i in range(12):
        replica = replica_a if i % 2 == 0 else replica_b
        resp = httpx.post(
            replica.url + "/v1/chat/completions",
            json={
                "model": "chat",
                "max_tokens": 3,
                "messages": [{"role": "user", "content": "hi"}],
            },
            headers={"authorization": f"Bearer {KEY}", "x-user-id": f"user-{i}"},
            timeout=10,
        )
        assert resp.status_code == 200, resp.text
        served[resp.headers["x-request-id"]] = replica.url

    # Feedback to replica B for a request that replica A served.
    from_a = next(rid for rid, url in served.items() if url == replica_a.url)
    rated = httpx.post(
        replica_b.url + "/v1/feedback",
        json={"request_id": from_a, "score": 4.0},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=10,
    )
    assert rated.status_code == 200, rated.text

    with psycopg.connect(postgres.url, autocommit=True) as conn:

        def all_written() -> bool:
            return conn.execute("SELECT count(*) FROM records").fetchone() == (12,)

        wait_until("every record in PostgreSQL", all_written)
        rows = conn.execute("SELECT request_id, app, score FROM feedback").fetchall()
    assert rows == [(from_a, "support", 4.0)]

    # A password in the URL (trust authentication ignores it) is never printed.
    with_password = postgres.url.replace("sluice@", "sluice:hunter2@")
    report = subprocess.run(
        sluice_cmd("ab", "report", "tone", "--config", str(config), "--json"),
        env={**os.environ, "SLUICE_TEST_PG": with_password},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert report.returncode == 0, report.stderr
    body = json.loads(report.stdout)
    assert sum(v["n"] for v in body["variants"]) == 12
    assert postgres.url.split("@")[0] not in report.stderr  # no credentials in messages
    assert "hunter2" not in report.stdout + report.stderr, report.stdout


def _chat(replica: Any, user: str) -> str:
    resp = httpx.post(
        replica.url + "/v1/chat/completions",
        json={"model": "chat", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {KEY}", "x-user-id": user},
        timeout=10,
    )
    assert resp.status_code == 200, resp.text
    return str(resp.headers["x-request-id"])


def test_records_and_feedback_resume_after_postgres_restarts(
    start, slow_sim, postgres, tmp_path: Path
) -> None:
    """The writer's connection dies with the server; once PostgreSQL is back, records
    and feedback go through again (they were lost, and feedback answered 503, until
    sluice itself restarted). What came while it was down is dropped and counted."""
    config = tmp_path / "cfg"
    config.mkdir()
    (config / "gateway.yaml").write_text(GATEWAY.format(sim_url=slow_sim.url, key=key_line(KEY)))
    (config / "warm.yaml").write_text("kind: Preset\ngeneration: {temperature: 0.7}\n")
    (config / "cold.yaml").write_text("kind: Preset\ngeneration: {temperature: 0.1}\n")
    replica = start(config, env={"SLUICE_TEST_PG": postgres.url})
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute("TRUNCATE records, feedback")
    before = {_chat(replica, f"before-{i}") for i in range(3)}

    def recorded(ids: set[str]) -> bool:
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            rows = conn.execute("SELECT request_id FROM records").fetchall()
        return ids <= {row[0] for row in rows}

    wait_until("the first records", lambda: recorded(before))
    postgres.restart()
    # The first write after the restart finds the connection closed; the next connects.
    deadline = time.monotonic() + 20
    probes: set[str] = set()
    while not any(recorded({probe}) for probe in probes):
        assert time.monotonic() < deadline, "no record written after PostgreSQL restarted"
        probes.add(_chat(replica, f"probe-{len(probes)}"))
        time.sleep(0.5)
    after = {_chat(replica, f"after-{i}") for i in range(3)}
    wait_until("every record after the restart", lambda: recorded(after))
    rated = httpx.post(
        replica.url + "/v1/feedback",
        json={"request_id": next(iter(after)), "score": 1.0},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=10,
    )
    assert rated.status_code == 200, rated.text


CONSOLE_GATEWAY = GATEWAY.replace(
    "kind: Gateway\n", "kind: Gateway\nadmin: {{token: env:SLUICE_ADMIN_TOKEN}}\n"
)


def test_the_consoles_ab_view_reads_the_records_in_postgres(
    start, slow_sim, postgres, tmp_path: Path
) -> None:
    """The console reads where the writer writes (`records.url`), as `sluice ab report`
    does, not the SQLite `records.path` left at its default; the URL's password is never
    shown."""
    config = tmp_path / "cfg"
    config.mkdir()
    gateway = CONSOLE_GATEWAY.format(sim_url=slow_sim.url, key=key_line(KEY))
    (config / "gateway.yaml").write_text(gateway.replace("name: tone", "name: tone-console"))
    (config / "warm.yaml").write_text("kind: Preset\ngeneration: {temperature: 0.7}\n")
    (config / "cold.yaml").write_text("kind: Preset\ngeneration: {temperature: 0.1}\n")
    with_password = postgres.url.replace("sluice@", "sluice:hunter2@")
    replica = start(config, env={"SLUICE_TEST_PG": with_password})
    served = {_chat(replica, f"console-{i}") for i in range(4)}

    def recorded() -> bool:
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            rows = conn.execute("SELECT request_id FROM records").fetchall()
        return served <= {row[0] for row in rows}

    wait_until("the records in PostgreSQL", recorded)
    with httpx.Client(base_url=replica.url, timeout=10) as client:
        login = client.post("/console/login", data={"token": ADMIN_TOKEN})
        assert login.status_code == 303, login.text
        reply = client.get("/console/api/ab")
    assert reply.status_code == 200, reply.text
    assert "hunter2" not in reply.text and reply.json()["db"] == postgres.url
    (report,) = reply.json()["experiments"]
    assert report["experiment"] == "tone-console" and "error" not in report, report
    assert sum(v["n"] for v in report["variants"]) == len(served)
