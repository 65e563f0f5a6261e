"""Logging setup: structlog, JSON lines (default) or console, at a configurable level.

JSON is rendered by orjson straight to bytes (structlog's stdlib-json renderer showed up at
~5% of the proxy's CPU under load, as the access log line is written once per request).
Records from the standard library's `logging` (asyncio, watchfiles) are rendered as the
same JSON lines, so the stream stays one JSON object per line.
"""

from __future__ import annotations

import atexit
import datetime as dt
import logging
import sys
from typing import Any, BinaryIO, TextIO, cast

import orjson
import structlog
from sluice.proxy.observe import JsonAccessLog, flush_quietly

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FORMATS = ("json", "console")


class SharedLines:
    """The one writer every JSON line of the process goes through: structlog's, the
    standard library's and the access log's. A line is held until `flush`; structlog and
    the standard library flush after each of theirs, the access log once per event-loop
    pass (observe.JsonAccessLog). So a busy proxy writes its access lines with one system
    call per pass (stderr is unbuffered: one per line before), and the lines keep the
    order in which they were written."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        # The lines not yet written, in order. The access log appends to this list itself
        # (JsonAccessLog's `held`): a compiled append, not a call of this interpreted class.
        self.held: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.held.append(data)
        return len(data)

    def flush(self) -> None:
        held = self.held
        if held:
            data = memoryview(held[0] if len(held) == 1 else b"".join(held))
            held.clear()
            while data:  # an unbuffered stream may take part of it
                written = self._out.write(data)
                data = data[written if written is not None else len(data) :]
        self._out.flush()


class _TextLines:
    """The standard library's handler writes text: encoded onto the shared lines."""

    def __init__(self, lines: SharedLines) -> None:
        self._lines = lines

    def write(self, text: str) -> int:
        return self._lines.write(text.encode("utf-8", "replace"))

    def flush(self) -> None:
        self._lines.flush()


_shared: tuple[TextIO, SharedLines] | None = None


def shared_lines(stream: TextIO) -> SharedLines:
    """The shared writer of `stream` (one per stream, flushed at exit)."""
    global _shared
    if _shared is None or _shared[0] is not stream:
        lines = SharedLines(stream.buffer)
        atexit.register(flush_quietly, lines)
        _shared = (stream, lines)
    return _shared[1]


def configure_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Configures structlog and the root logger; `stream` defaults to stderr."""
    if level not in LEVELS or fmt not in FORMATS:
        raise ValueError(f"log level {level!r} / format {fmt!r} not in {list(LEVELS)} / {FORMATS}")
    out = stream if stream is not None else sys.stderr
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    common: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        timestamper,
        structlog.processors.format_exc_info,
    ]
    factory: Any
    if fmt == "json":
        renderer: structlog.typing.Processor = structlog.processors.JSONRenderer(
            serializer=orjson.dumps
        )
        factory = structlog.BytesLoggerFactory(file=cast("BinaryIO", shared_lines(out)))
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        factory = structlog.WriteLoggerFactory(file=out)
    structlog.configure(
        processors=[*common, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    handler: logging.Handler = (
        logging.StreamHandler(_TextLines(shared_lines(out)))
        if fmt == "json"
        else logging.StreamHandler(out)
    )
    handler.setFormatter(
        _JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])


def access_lines(level: str, fmt: str, stream: TextIO | None = None) -> JsonAccessLog | None:
    """The access log's direct JSON writer when `configure_logging(level, fmt, stream)`
    writes JSON lines at level info; None where structlog must render the line."""
    if fmt != "json" or LEVELS[level] > logging.INFO:
        return None
    lines = shared_lines(stream if stream is not None else sys.stderr)
    return JsonAccessLog(lines, held=lines.held)


class _JsonFormatter(logging.Formatter):
    """A standard-library record as the same JSON line structlog writes."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "event": record.getMessage(),
            "logger": record.name,
            "level": record.levelname.lower(),
            "timestamp": self.formatTime(record),
        }
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(event, default=repr).decode()

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # ISO 8601 in UTC, as structlog's TimeStamper(fmt="iso", utc=True) writes it.
        stamp = dt.datetime.fromtimestamp(record.created, dt.UTC)
        return stamp.isoformat(timespec="microseconds").replace("+00:00", "Z")
