"""Per-request records and their feedback, in SQLite, written off the hot path.

The completion hook calls `RecordWriter.submit(ex)`: it copies the fields into a tuple and
appends it to a deque; no lock, no I/O, O(1). A background thread with its own connection
writes the deque in batches: every `flush_interval`, or at once when a batch is full. The
deque is bounded: when the disk is slower than the traffic, new records are dropped and
counted (`sluice_records_dropped{reason="overflow"}`); a stream is never slowed down.
`close()` writes everything still buffered.

Feedback runs as a job on the same thread, after the records submitted before it, so a
request can be rated while its record was still in the buffer. One writer thread per
process; several worker processes share the file (WAL, and a busy timeout for the lock).
"""

from __future__ import annotations

import asyncio
import math
import random
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import structlog
from prometheus_client import CollectorRegistry, Counter
from sluice.proxy.exchange import Exchange
from sluice.proxy.recordrow import RECORD_COLUMNS, RecordRow, record_row

from .database import DB_ERRORS, Connection, PgConnection, is_postgres, redact

DEFAULT_BATCH_SIZE = 256
# What a batch's write may raise: the database's errors, and a value the driver cannot bind.
_WRITE_ERRORS: tuple[type[Exception], ...] = (*DB_ERRORS, OverflowError, ValueError)
DEFAULT_FLUSH_INTERVAL = 1.0
DEFAULT_MAX_BUFFER = 10_000
# Feedback calls waiting for the writer thread; beyond, 503 (the disk is not keeping up).
MAX_PENDING_JOBS = 1024
# How long a clean shutdown waits for a stuck disk before giving up on the buffer.
CLOSE_TIMEOUT = 60.0
BUSY_TIMEOUT = 5.0  # another worker process holding the write lock
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    time REAL NOT NULL,            -- unix seconds when the request started
    app TEXT NOT NULL,             -- '' when the gateway declares no apps
    route TEXT NOT NULL,
    experiment TEXT NOT NULL,      -- '' outside an experiment
    variant TEXT NOT NULL,
    preset TEXT NOT NULL,
    config_version TEXT NOT NULL,
    status INTEGER NOT NULL,       -- HTTP status; 499: the client went away
    finish_reason TEXT,
    error TEXT,                    -- timeout kind, upstream error or error code
    ttft REAL,                     -- seconds to the first content token (streams)
    mean_itl REAL,                 -- mean seconds between content tokens (streams)
    tokens_in INTEGER,
    tokens_out INTEGER,
    duration REAL NOT NULL,
    stream INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS records_request ON records (request_id);
CREATE INDEX IF NOT EXISTS records_experiment ON records (experiment, time);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    app TEXT NOT NULL,
    time REAL NOT NULL,
    score REAL,
    label TEXT CHECK (label IN ('good', 'bad')),
    CHECK ((score IS NULL) != (label IS NULL))
);
CREATE INDEX IF NOT EXISTS feedback_request ON feedback (request_id, app);
"""

_INSERT_RECORD = (
    f"INSERT INTO records ({', '.join(RECORD_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in RECORD_COLUMNS)})"
)

RateResult = Literal["recorded", "unknown", "forbidden"]
T = TypeVar("T")

_log = structlog.get_logger("sluice.records")

# sqlite3 "adapts" every parameter that is not exactly int, float, str or bytearray, None
# included: it first asks its protocol type for `__adapt__`, and that failing lookup
# formats an AttributeError each time (two or three NULLs a record: 4.6 against 2.2 us per
# row of a 256-row executemany). An adapter registered for None is found in the registry
# before that: `dict.get` of an empty dict, a C method, answers None for its argument.
_NULL: dict[object, None] = {}
sqlite3.register_adapter(type(None), _NULL.get)


class StoreUnavailable(Exception):
    """The writer cannot take a job now: closed, or too many waiting."""


def open_store(path: str | Path) -> sqlite3.Connection:
    """Opens (creating if needed) the records database: WAL, schema in place.

    Workers starting together race to create the file and switch it to WAL; SQLite answers
    the loser "database is locked" at once for the journal-mode switch (no busy handler
    there), so the whole opening is retried until BUSY_TIMEOUT."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            return _open_store_once(path)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02 + random.random() * 0.05)


def _open_store_once(path: str | Path) -> sqlite3.Connection:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL survives a crash of the process (not of the machine) without an
        # fsync per commit.
        conn.execute("PRAGMA synchronous=NORMAL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"{path} has records schema {version}; this sluice knows {SCHEMA_VERSION}"
            )
        with conn:
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException:
        conn.close()
        raise
    return conn


class RecordMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.written = Counter("sluice_records_written", "Request records written", registry=r)
        self.dropped = Counter(
            "sluice_records_dropped",
            "Request records not written: overflow (buffer full), error (write failed), "
            "closed (after shutdown began)",
            ["reason"],
            registry=r,
        )
        self.feedback = Counter(
            "sluice_feedback",
            "Feedback requests by result: recorded, unknown, forbidden, unavailable",
            ["result"],
            registry=r,
        )


class RecordWriter:
    """The buffer, the writer thread and the feedback jobs; see the module docstring."""

    def __init__(
        self,
        path: str | Path,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        metrics: RecordMetrics | None = None,
    ) -> None:
        if batch_size < 1 or max_buffer < 1 or not flush_interval > 0:
            raise ValueError("batch_size and max_buffer must be >= 1, flush_interval > 0")
        self.path = str(path)
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_buffer = max_buffer
        self.metrics = metrics or RecordMetrics()
        self.written = 0
        self.dropped: dict[str, int] = {"overflow": 0, "error": 0, "closed": 0}
        self._records: deque[RecordRow] = deque()
        self._jobs: deque[tuple[Callable[[Connection], Any], Future[Any]]] = deque()
        self._wake = threading.Event()
        self._closed = False
        # Opened here so that a bad path fails `sluice serve` at start-up; from now on only
        # the writer thread touches it.
        self._conn: Connection = (
            PgConnection(self.path, create=True)
            if is_postgres(self.path)
            else open_store(self.path)
        )
        self._thread = threading.Thread(target=self._run, name="sluice-records", daemon=True)
        self._thread.start()

    # -- the event loop's side -----------------------------------------------------------

    def submit(self, ex: Exchange) -> None:
        """The completion hook: O(1), never blocks. Requests that were not routed (bad
        JSON, no key, unknown model) are in the metrics and the log, not in the records."""
        if not ex.route:
            return
        if self._closed or len(self._records) >= self.max_buffer:
            self._drop("closed" if self._closed else "overflow")
            return
        self._records.append(record_row(ex))
        if len(self._records) >= self.batch_size and not self._wake.is_set():
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._records)

    def call(self, job: Callable[[Connection], T]) -> Future[T]:
        """Runs `job(conn)` on the writer thread, after every record submitted before."""
        if self._closed:
            raise StoreUnavailable("the records store is closed")
        if len(self._jobs) >= MAX_PENDING_JOBS:
            raise StoreUnavailable("the records store is busy")
        future: Future[T] = Future()
        self._jobs.append((job, future))
        self._wake.set()
        return future

    async def rate(
        self, request_id: str, app: str, score: float | None, label: str | None
    ) -> RateResult:
        """Attaches feedback to `app`'s request: recorded, unknown (no such request) or
        forbidden (the id belongs to another app). Raises StoreUnavailable (also when the
        disk refuses the write)."""

        def job(conn: Connection) -> RateResult:
            owners = {
                row[0]
                for row in conn.execute(
                    "SELECT DISTINCT app FROM records WHERE request_id = ?", (request_id,)
                )
            }
            if app not in owners:
                return "forbidden" if owners else "unknown"
            with conn:
                conn.execute(
                    "INSERT INTO feedback (request_id, app, time, score, label) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (request_id, app, time.time(), score, label),
                )
            return "recorded"

        try:
            return await asyncio.wrap_future(self.call(job))
        except DB_ERRORS as exc:
            raise StoreUnavailable(f"the write failed: {exc}") from None

    def close(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Writes everything buffered and stops the thread; False if the disk did not let it
        finish within `timeout` (what was left is logged)."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            _log.error("records_close_timeout", pending=len(self._records), path=redact(self.path))
            return False
        return True

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def _drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n
        self.metrics.dropped.labels(reason).inc(n)

    # -- the writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        conn = self._conn
        try:
            while True:
                self._wake.wait(self.flush_interval)
                self._wake.clear()
                closing = self._closed
                self._drain(conn)
                if closing:
                    return
        finally:
            for _, future in self._jobs:
                future.cancel()
            conn.close()

    def _drain(self, conn: Connection) -> None:
        # A job sees every record submitted before it: the job is taken first and the
        # records after, so whatever was appended before the job is in the buffer by then.
        # (Writing records only once the jobs ran out let a steady stream of feedback jobs
        # starve a record for longer than the handler's recheck: a 404 for a real request.)
        while True:
            job = self._jobs.popleft() if self._jobs else None
            while self._records:
                batch: list[RecordRow] = []
                while self._records and len(batch) < self.batch_size:
                    batch.append(self._records.popleft())
                self._write(conn, batch)
            if job is None:
                return
            self._run_job(conn, *job)

    def _run_job(
        self, conn: Connection, job: Callable[[Connection], Any], future: Future[Any]
    ) -> None:
        if not future.set_running_or_notify_cancel():
            return  # the caller went away
        try:
            future.set_result(job(conn))
        except Exception as exc:
            _log.error("records_job_failed", error=str(exc), path=redact(self.path))
            future.set_exception(exc)

    def _write(self, conn: Connection, batch: list[RecordRow]) -> None:
        try:
            with conn:
                conn.executemany(_INSERT_RECORD, batch)
        except _WRITE_ERRORS as exc:
            # Dropped and counted, not retried: a full or failing disk must not grow the
            # buffer without bound; the next batch tries again. A value the driver cannot
            # bind (an integer beyond 64 bits) loses its batch, never the writer thread.
            self._drop("error", len(batch))
            _log.error(
                "records_write_failed", error=str(exc), records=len(batch), path=redact(self.path)
            )
            return
        self.written += len(batch)
        self.metrics.written.inc(len(batch))


# -- the read side (sluice ab report) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One record of an experiment with the app's latest score and latest label."""

    request_id: str
    time: float
    app: str
    variant: str
    preset: str
    config_version: str
    status: int
    finish_reason: str | None
    error: str | None
    ttft: float | None
    mean_itl: float | None
    tokens_in: int | None
    tokens_out: int | None
    duration: float
    stream: bool
    score: float | None
    label: str | None


_READ_EXPERIMENT = """
SELECT r.request_id, r.time, r.app, r.variant, r.preset, r.config_version, r.status,
       r.finish_reason, r.error, r.ttft, r.mean_itl, r.tokens_in, r.tokens_out, r.duration,
       r.stream,
       (SELECT f.score FROM feedback f
         WHERE f.request_id = r.request_id AND f.app = r.app AND f.score IS NOT NULL
         ORDER BY f.id DESC LIMIT 1),
       (SELECT f.label FROM feedback f
         WHERE f.request_id = r.request_id AND f.app = r.app AND f.label IS NOT NULL
         ORDER BY f.id DESC LIMIT 1)
FROM records r
WHERE r.experiment = ? AND r.time >= ?
ORDER BY r.id
"""


def _open_for_reading(path: str | Path) -> Connection:
    if is_postgres(str(path)):
        return PgConnection(str(path), create=False)
    if not Path(path).is_file():
        raise FileNotFoundError(f"no records database at {path}")
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT)
    conn.execute("PRAGMA query_only=ON")
    return conn


def read_experiment(
    path: str | Path, experiment: str, since: float | None = None
) -> list[StoredRecord]:
    """Every record of `experiment` started at or after `since` (unix seconds)."""
    conn = _open_for_reading(path)
    try:
        rows = conn.execute(_READ_EXPERIMENT, (experiment, -math.inf if since is None else since))
        out = []
        for row in rows:
            values = list(row)
            values[14] = bool(values[14])
            out.append(StoredRecord(*values))
        return out
    finally:
        conn.close()


def experiments_recorded(path: str | Path) -> list[str]:
    conn = _open_for_reading(path)
    try:
        rows = conn.execute(
            "SELECT DISTINCT experiment FROM records WHERE experiment != '' ORDER BY experiment"
        )
        return [row[0] for row in rows]
    finally:
        conn.close()


__all__ = [
    "RECORD_COLUMNS",
    "RecordMetrics",
    "RecordWriter",
    "StoreUnavailable",
    "StoredRecord",
    "experiments_recorded",
    "open_store",
    "read_experiment",
    "record_row",
]
