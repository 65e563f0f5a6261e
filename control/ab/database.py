"""Where A/B records live: the embedded SQLite file (default), or PostgreSQL
(`records.url: postgresql://...`), which every replica writes, so that `sluice ab report`
and feedback see all of them.

`connect(location)` opens either and returns something with the small part of sqlite3's
connection interface the records code uses: `execute(sql, params)` (iterable rows),
`executemany`, `with conn:` for one transaction, `close()`. SQL is written once with `?`
placeholders; the PostgreSQL side turns them into psycopg's `%s` (the statements contain
no other `?` or `%`).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Protocol

import psycopg
from sluice.control.config.gateway_schema import RecordsSection
from sluice.control.errors import CliError

# Every error either database raises for a failed statement or connection.
DB_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)
OPEN_ERRORS: tuple[type[Exception], ...] = (OSError, sqlite3.Error, psycopg.Error)
CONNECT_TIMEOUT = 5  # seconds; a replica must not hang at start-up on an unreachable database

PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id BIGSERIAL PRIMARY KEY,
    request_id TEXT NOT NULL,
    time DOUBLE PRECISION NOT NULL,
    app TEXT NOT NULL,
    route TEXT NOT NULL,
    experiment TEXT NOT NULL,
    variant TEXT NOT NULL,
    preset TEXT NOT NULL,
    config_version TEXT NOT NULL,
    status INTEGER NOT NULL,
    finish_reason TEXT,
    error TEXT,
    ttft DOUBLE PRECISION,
    mean_itl DOUBLE PRECISION,
    tokens_in INTEGER,
    tokens_out INTEGER,
    duration DOUBLE PRECISION NOT NULL,
    stream INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS records_request ON records (request_id);
CREATE INDEX IF NOT EXISTS records_experiment ON records (experiment, time);
CREATE TABLE IF NOT EXISTS feedback (
    id BIGSERIAL PRIMARY KEY,
    request_id TEXT NOT NULL,
    app TEXT NOT NULL,
    time DOUBLE PRECISION NOT NULL,
    score DOUBLE PRECISION,
    label TEXT CHECK (label IN ('good', 'bad')),
    CHECK ((score IS NULL) != (label IS NULL))
);
CREATE INDEX IF NOT EXISTS feedback_request ON feedback (request_id, app);
"""
# Replicas starting together create the schema once: the others wait on this lock.
_SCHEMA_LOCK = 0x5_1C_E_AB


class Connection(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ...) -> Iterable[Any]: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Any: ...

    def __enter__(self) -> Any: ...

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Any: ...

    def close(self) -> None: ...


def is_postgres(location: str) -> bool:
    return location.split("://", 1)[0] in ("postgresql", "postgres")


def redact(location: str) -> str:
    """The location without a password, for messages and logs."""
    if not is_postgres(location) or "@" not in location:
        return location
    scheme, rest = location.split("://", 1)
    userinfo, host = rest.rsplit("@", 1)
    return f"{scheme}://{userinfo.split(':', 1)[0]}@{host}"


class PgConnection:
    """psycopg 3 behind the sqlite3-like interface above (autocommit; `with` = one
    transaction)."""

    def __init__(self, url: str, *, create: bool) -> None:
        self._url = url
        self._conn = self._connect()
        self._tx: list[AbstractContextManager[Any]] = []
        if create:
            with self._conn.transaction():
                self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                self._conn.execute(PG_SCHEMA)

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT)

    def _live(self) -> psycopg.Connection[Any]:
        """The connection, opened again when the server closed it (a restart, a failover):
        the call that found it closed failed (its batch is dropped and counted); the next
        one connects. While the server is down, each call fails at connecting."""
        if self._conn.closed or self._conn.broken:
            self._conn = self._connect()
        return self._conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Iterable[Any]:
        return self._live().execute(sql.replace("?", "%s"), params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._live().cursor() as cursor:
            cursor.executemany(sql.replace("?", "%s"), rows)

    def __enter__(self) -> PgConnection:
        tx = self._live().transaction()
        tx.__enter__()
        self._tx.append(tx)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._tx.pop().__exit__(kind, exc, tb)

    def close(self) -> None:
        self._conn.close()


def records_location(
    section: RecordsSection, environ: Mapping[str, str] | None = None
) -> str | None:
    """`records.url` (resolving env:VAR) when set, else the SQLite `records.path`."""
    if section.url is None:
        return section.path
    if not section.url.startswith("env:"):
        return section.url
    name = section.url.removeprefix("env:")
    value = (os.environ if environ is None else environ).get(name, "")
    if not value:
        raise CliError(f"records.url is {section.url} but ${name} is unset or empty")
    return value


__all__ = [
    "DB_ERRORS",
    "OPEN_ERRORS",
    "Connection",
    "PgConnection",
    "is_postgres",
    "records_location",
    "redact",
]
