"""The records writer: batched, off the hot path, bounded, flushed on close; the read side."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sluice.control.ab.records import (
    MAX_PENDING_JOBS,
    RECORD_COLUMNS,
    RecordWriter,
    StoreUnavailable,
    experiments_recorded,
    read_experiment,
)
from sluice.proxy.exchange import Exchange


def exchange(
    request_id: str, *, variant: str = "a", app: str = "bot", route: str = "chat"
) -> Exchange:
    ex = Exchange(request_id, started_at=100.0)
    ex.app, ex.route, ex.experiment, ex.variant, ex.preset = (
        app,
        route,
        "exp",
        variant,
        "p-" + variant,
    )
    ex.config_version, ex.status, ex.stream = "v1", 200, True
    ex.first_token_at, ex.ended_at = 100.02, 100.5
    ex.add_gap(0.01)
    ex.add_gap(0.03)
    ex.prompt_tokens, ex.completion_tokens, ex.finish_reason = 7, 12, "stop"
    return ex


def count(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM records").fetchone()[0])


def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def test_a_record_holds_every_field(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    writer = RecordWriter(db, flush_interval=0.05)
    writer.submit(exchange("req-1"))
    assert writer.close()
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        row = dict(conn.execute("SELECT * FROM records").fetchone())
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert set(RECORD_COLUMNS) <= set(row)
    assert row["request_id"] == "req-1"
    assert (row["app"], row["route"], row["experiment"], row["variant"]) == (
        "bot",
        "chat",
        "exp",
        "a",
    )
    assert (row["preset"], row["config_version"], row["status"]) == ("p-a", "v1", 200)
    assert row["finish_reason"] == "stop"
    assert row["ttft"] == pytest.approx(0.02)
    assert row["mean_itl"] == pytest.approx(0.02)
    assert (row["tokens_in"], row["tokens_out"]) == (7, 12)
    assert row["duration"] == pytest.approx(0.5)
    assert abs(row["time"] - time.time()) < 60


def test_fields_that_do_not_apply_are_null(tmp_path: Path) -> None:
    """None is written as SQL NULL (through the adapter registered for it), as sqlite3
    writes it without one: no error, no first token, no gap between tokens."""
    db = tmp_path / "r.sqlite"
    writer = RecordWriter(db, flush_interval=0.05)
    ex = Exchange("req-2", started_at=100.0)
    ex.app, ex.route, ex.status, ex.ended_at = "bot", "chat", 200, 100.5
    writer.submit(ex)
    assert writer.close()
    with sqlite3.connect(db) as conn:
        nulls = conn.execute(
            "SELECT typeof(error), typeof(ttft), typeof(mean_itl), typeof(status) FROM records"
        ).fetchone()
    assert nulls == ("null", "null", "null", "integer")


def test_unrouted_requests_are_not_recorded(tmp_path: Path) -> None:
    writer = RecordWriter(tmp_path / "r.sqlite")
    writer.submit(exchange("x", route=""))  # a 401 or a bad body: metrics and log only
    assert writer.pending == 0
    writer.close()


def test_records_wait_at_most_the_flush_interval(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    writer = RecordWriter(db, batch_size=1000, flush_interval=0.1)
    try:
        writer.submit(exchange("one"))
        time.sleep(0.02)
        assert count(db) == 0  # not yet: batched
        wait_until(lambda: count(db) == 1, timeout=1.0)
    finally:
        writer.close()


def test_a_full_batch_is_written_at_once(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    writer = RecordWriter(db, batch_size=50, flush_interval=30.0)
    try:
        for i in range(50):
            writer.submit(exchange(f"r{i}"))
        wait_until(lambda: count(db) == 50, timeout=2.0)
    finally:
        writer.close()


def test_close_writes_everything_buffered(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    writer = RecordWriter(db, batch_size=100, flush_interval=30.0, max_buffer=10_000)
    for i in range(2_345):
        writer.submit(exchange(f"r{i}"))
    assert writer.close()
    assert count(db) == 2_345
    assert writer.written == 2_345
    writer.submit(exchange("late"))
    assert writer.dropped["closed"] == 1


def test_a_slow_disk_never_blocks_submit_and_overflow_is_counted(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    writer = RecordWriter(db, batch_size=10, flush_interval=0.01, max_buffer=100)
    stuck = threading.Event()
    release = threading.Event()

    def slow_disk(conn: sqlite3.Connection) -> None:
        stuck.set()
        release.wait(10)

    writer.call(slow_disk)  # holds the writer thread as a stalled fsync would
    assert stuck.wait(2)
    started = time.perf_counter()
    for i in range(1_000):
        writer.submit(exchange(f"r{i}"))
    per_submit = (time.perf_counter() - started) / 1_000
    assert per_submit < 100e-6, per_submit  # microseconds, while the disk is stuck
    assert writer.pending == 100
    assert writer.dropped["overflow"] == 900
    assert writer.metrics.dropped.labels("overflow")._value.get() == 900
    release.set()
    assert writer.close()
    assert count(db) == 100


def test_a_failed_write_is_counted_and_the_writer_goes_on(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    writer = RecordWriter(db, batch_size=1, flush_interval=0.01)
    try:
        writer.call(
            lambda conn: conn.execute(
                "CREATE TRIGGER no BEFORE INSERT ON records BEGIN SELECT RAISE(ABORT, 'disk full'); END"
            )
        ).result(2)
        writer.submit(exchange("lost"))
        wait_until(lambda: writer.dropped["error"] == 1)
        writer.call(lambda conn: conn.execute("DROP TRIGGER no")).result(2)
        writer.submit(exchange("kept"))
    finally:
        writer.close()
    assert [r.request_id for r in read_experiment(db, "exp")] == ["kept"]


def test_a_value_sqlite_cannot_bind_loses_its_batch_not_the_writer(tmp_path: Path) -> None:
    # An integer beyond 64 bits raised OverflowError out of executemany, which is no
    # sqlite3.Error: the writer thread died and nothing was recorded after it.
    db = tmp_path / "r.sqlite"
    writer = RecordWriter(db, batch_size=1, flush_interval=0.01)
    try:
        huge = exchange("huge")
        huge.prompt_tokens = 2**64
        writer.submit(huge)
        wait_until(lambda: writer.dropped["error"] == 1)
        writer.submit(exchange("kept"))
    finally:
        assert writer.close()
    assert [r.request_id for r in read_experiment(db, "exp")] == ["kept"]


def test_jobs_see_records_still_in_the_buffer(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    writer = RecordWriter(db, batch_size=1000, flush_interval=30.0)
    try:
        writer.submit(exchange("fresh", app="bot"))

        async def rate() -> list[str]:
            return [
                await writer.rate("fresh", "bot", 4.0, None),
                await writer.rate("fresh", "other", None, "good"),
                await writer.rate("nope", "bot", None, "bad"),
            ]

        assert asyncio.run(rate()) == ["recorded", "forbidden", "unknown"]
    finally:
        writer.close()


def test_a_job_sees_a_record_submitted_while_other_jobs_ran(tmp_path: Path) -> None:
    # Feedback jobs arriving back to back kept the thread in its jobs loop, and a record
    # submitted meanwhile waited behind them: a user's feedback on a just-finished request
    # was refused with 404 (seen under load in test_ab_report).
    db = tmp_path / "r.sqlite"
    writer = RecordWriter(db, batch_size=1000, flush_interval=30.0)
    busy, release = threading.Event(), threading.Event()

    def earlier_job(conn: sqlite3.Connection) -> None:
        busy.set()
        release.wait(10)

    def sees(request_id: str) -> Callable[[sqlite3.Connection], int]:
        return lambda conn: len(
            conn.execute("SELECT 1 FROM records WHERE request_id = ?", (request_id,)).fetchall()
        )

    try:
        writer.call(earlier_job)
        assert busy.wait(2)  # the writer thread is inside a job now
        writer.submit(exchange("just-finished"))
        seen = writer.call(sees("just-finished"))
        release.set()
        assert seen.result(5) == 1
    finally:
        release.set()
        writer.close()


def test_the_latest_score_and_label_count(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    writer = RecordWriter(db, flush_interval=0.05)
    writer.submit(exchange("r1", variant="a"))
    writer.submit(exchange("r2", variant="b"))
    writer.submit(exchange("r3", variant="b"))

    async def feedback() -> None:
        assert await writer.rate("r1", "bot", 2.0, None) == "recorded"
        assert await writer.rate("r1", "bot", 5.0, None) == "recorded"
        assert await writer.rate("r1", "bot", None, "bad") == "recorded"
        assert await writer.rate("r2", "bot", None, "good") == "recorded"

    asyncio.run(feedback())
    writer.close()
    rows = {r.request_id: r for r in read_experiment(db, "exp")}
    assert (rows["r1"].score, rows["r1"].label) == (5.0, "bad")
    assert (rows["r2"].score, rows["r2"].label) == (None, "good")
    assert (rows["r3"].score, rows["r3"].label) == (None, None)
    assert rows["r1"].ttft == pytest.approx(0.02) and rows["r1"].stream is True
    assert experiments_recorded(db) == ["exp"]
    assert read_experiment(db, "exp", since=time.time() + 60) == []


def test_the_store_refuses_jobs_when_busy_or_closed(tmp_path: Path) -> None:
    writer = RecordWriter(tmp_path / "r.sqlite")
    started, release = threading.Event(), threading.Event()
    writer.call(lambda conn: started.set() or release.wait(10))
    assert started.wait(2)
    queued = [writer.call(lambda conn: None) for _ in range(MAX_PENDING_JOBS)]
    with pytest.raises(StoreUnavailable, match="busy"):
        writer.call(lambda conn: None)
    release.set()
    for future in queued:
        future.result(5)
    writer.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        writer.call(lambda conn: None)


def test_two_writers_share_one_file(tmp_path: Path) -> None:
    # Several worker processes: each its own writer, one WAL database.
    db = tmp_path / "r.sqlite"
    first = RecordWriter(db, batch_size=10, flush_interval=0.01)
    second = RecordWriter(db, batch_size=10, flush_interval=0.01)
    for i in range(500):
        (first if i % 2 else second).submit(exchange(f"r{i}"))
    assert first.close() and second.close()
    assert count(db) == 500


def test_reading_a_missing_database_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no records database"):
        read_experiment(tmp_path / "none.sqlite", "exp")
    assert not (tmp_path / "none.sqlite").exists()


def test_feedback_that_cannot_be_written_is_unavailable_not_a_crash(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    writer = RecordWriter(db, flush_interval=0.01)
    try:
        writer.submit(exchange("r1"))
        writer.call(
            lambda conn: conn.execute(
                "CREATE TRIGGER no BEFORE INSERT ON feedback BEGIN SELECT RAISE(ABORT, 'disk full'); END"
            )
        ).result(2)
        with pytest.raises(StoreUnavailable, match="disk full"):
            asyncio.run(writer.rate("r1", "bot", 1.0, None))
    finally:
        writer.close()


def test_workers_opening_a_new_database_together_all_succeed(tmp_path) -> None:
    """--workers N: every worker process opens the same new file at start-up; the race to
    create it and switch it to WAL must not fail the losers ("database is locked")."""
    import subprocess
    import sys
    import time

    code = (
        "import sys, time\n"
        "from sluice.control.ab.records import open_store\n"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
        "open_store(sys.argv[1]).close()\n"
    )
    for attempt in range(4):
        path = tmp_path / f"race-{attempt}.sqlite"
        start_at = time.time() + 1.0  # all processes imported by then
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(path), str(start_at)], stderr=subprocess.PIPE
            )
            for _ in range(4)
        ]
        results = [
            (p.wait(timeout=30), p.stderr.read().decode() if p.stderr else "") for p in procs
        ]
        for p in procs:
            if p.stderr:
                p.stderr.close()
        assert [status for status, _ in results] == [0] * 4, [err for _, err in results if err]
