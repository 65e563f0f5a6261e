"""The row a finished exchange adds to the request records (`control/ab/records.py`
writes the rows to SQLite or PostgreSQL on its own thread, in batches).

Built here, in the compiled data plane, because the completion hook builds one per request
on the event loop: interpreted, the seventeen attribute reads and four properties of the
`Exchange` cost ~10,000 instructions a request, compiled a few hundred."""

from __future__ import annotations

from typing import Final

from .exchange import Exchange

RECORD_COLUMNS: Final = (
    "request_id",
    "time",
    "app",
    "route",
    "experiment",
    "variant",
    "preset",
    "config_version",
    "status",
    "finish_reason",
    "error",
    "ttft",
    "mean_itl",
    "tokens_in",
    "tokens_out",
    "duration",
    "stream",
)

RecordRow = tuple[
    str,
    float,
    str,
    str,
    str,
    str,
    str,
    str,
    int,
    str | None,
    str | None,
    float | None,
    float | None,
    int | None,
    int,
    float,
    int,
]


def _gone(ex: Exchange) -> str | None:
    return "client_gone" if ex.client_disconnected else None


def record_row(ex: Exchange) -> RecordRow:
    """`ex` as a row of RECORD_COLUMNS, in that order."""
    return (
        ex.request_id,
        ex.started_wall,
        ex.app,
        ex.route,
        ex.experiment,
        ex.variant,
        ex.preset,
        ex.config_version,
        ex.status,
        ex.finish_reason,
        # A client that left mid-stream ends a 200 with no finish reason: said so.
        ex.timeout or ex.upstream_error or ex.error_code or _gone(ex),
        ex.ttft,
        ex.mean_itl,
        ex.prompt_tokens,
        ex.output_tokens,
        ex.duration,
        int(ex.stream),
    )


__all__ = ["RECORD_COLUMNS", "RecordRow", "record_row"]
