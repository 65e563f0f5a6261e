"""What happens once per request after it ends: metrics and the access log line.

The access log line never holds an API key, a header or any prompt or completion text:
only the fields of the `Exchange`, which records none of them.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Final, Protocol

import orjson
import structlog

from .clock import wall
from .exchange import Exchange
from .metrics import Metrics
from .native import c_function
from .snapshot import SnapshotRef

if TYPE_CHECKING:
    from .app import ProxyApp

# How often each worker writes its gauges (active streams, queue depths, config version).
# A scrape also refreshes the answering worker's own; with several workers the others'
# are at most this old.
GAUGE_INTERVAL_S: Final = 1.0

_log = structlog.get_logger("sluice.access")
# Final names: compiled, a C static each rather than orjson's attributes (see clock.py).
_dumps: Final = orjson.dumps
_APPEND_NEWLINE: Final = orjson.OPT_APPEND_NEWLINE

# proxy/_jsonline.c's `line`: the access line written in C, byte for byte orjson's.
_line: Final[Any] = c_function("_jsonline", "line")
# Whether the access line is written in C (`sluice serve` reports the build).
LINES_IN_C: Final = _line is not None


class Observer:
    """Turns each finished `Exchange` into metric updates and one structured log line.

    `metrics=None` turns metrics off (no /metrics, nothing observed); `access_log=False`
    the log line. With both off, `enabled` is False and the server skips the hook."""

    def __init__(
        self,
        ref: SnapshotRef,
        metrics: Metrics | None,
        *,
        access_log: bool = True,
        json_lines: JsonAccessLog | None = None,
    ) -> None:
        """`json_lines`: where `sluice serve` writes JSON logs at level info, the line is
        written there directly; else through structlog (console format, tests)."""
        self.ref = ref
        self.metrics = metrics
        self.access_log = access_log
        self.json_lines = json_lines if access_log else None

    @property
    def enabled(self) -> bool:
        return self.metrics is not None or self.access_log

    def on_complete(self, ex: Exchange) -> None:
        if self.metrics is not None:
            self.metrics.observe(ex)
        if self.json_lines is not None:
            self.json_lines.write_exchange(ex)
        elif self.access_log:
            log_exchange(ex)

    def on_reload(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.record_reload(result)

    def sample(self, app: ProxyApp) -> None:
        """Writes the gauges from the app's live state."""
        if self.metrics is not None:
            queues = {lim.name: lim.queued for lim in app.limiters.all()}
            self.metrics.set_gauges(app.active_streams, queues, self.ref.current.version)


def log_exchange(ex: Exchange) -> None:
    """The access log line through structlog."""
    _log.info("request", **access_fields(ex))


def _ms(seconds: float) -> float:
    """Milliseconds to a tenth, for a duration (>= 0): `round(x, 1)` formats the number
    through the decimal digits (~0.3 us; four per stream), this is two float operations."""
    return int(seconds * 10_000.0 + 0.5) / 10.0


def exchange_line(ex: Exchange, now: float) -> bytes:
    """`access_fields(ex)` with `event`, `level` and the `timestamp` of `now`, as one JSON
    line written in C (proxy/_jsonline.c; the compiled build only). The same keys in the
    same order; `...` leaves out a field that does not apply."""
    first = ex.first_token_at
    gaps = ex.gap_count
    line: bytes = _line(
        now,
        b'"request_id":', ex.request_id,
        b'"endpoint":', ex.endpoint,
        b'"app":', ex.app,
        b'"route":', ex.route,
        b'"backend":', ex.backend,
        b'"preset":', ex.preset,
        b'"variant":', ex.variant,
        b'"config_version":', ex.config_version,
        b'"status":', ex.status,
        b'"stream":', ex.stream,
        b'"ttft_ms":', None if first is None else _ms(first - ex.started_at),
        b'"tokens_in":', ex.prompt_tokens,
        b'"tokens_out":', ex.output_tokens,
        b'"finish_reason":', ex.finish_reason,
        b'"duration_ms":', _ms(ex.ended_at - ex.started_at),
        b'"experiment":', ex.experiment if ex.experiment else ...,
        b'"cut":', ... if ex.cut is None else ex.cut,
        b'"timeout":', ... if ex.timeout is None else ex.timeout,
        b'"upstream_error":', ... if ex.upstream_error is None else ex.upstream_error,
        b'"error":', ... if ex.error_code is None else ex.error_code,
        b'"client_disconnected":', True if ex.client_disconnected else ...,
        b'"queue_ms":', _ms(ex.queue_wait) if ex.queue_wait else ...,
        b'"itl_mean_ms":', int(ex.gap_sum / gaps * 100_000.0 + 0.5) / 100.0 if gaps else ...,
        b'"itl_max_ms":', _ms(ex.gap_max) if gaps else ...,
        b'"event":', "request",
        b'"level":', "info",
    )  # fmt: skip
    return line


def access_fields(ex: Exchange) -> dict[str, object]:
    """The access log line's fields: these keys always, the rest only when they apply."""
    first = ex.first_token_at
    fields: dict[str, object] = {
        "request_id": ex.request_id,
        "endpoint": ex.endpoint,
        "app": ex.app,
        "route": ex.route,
        "backend": ex.backend,
        "preset": ex.preset,
        "variant": ex.variant,
        "config_version": ex.config_version,
        "status": ex.status,
        "stream": ex.stream,
        "ttft_ms": None if first is None else _ms(first - ex.started_at),
        "tokens_in": ex.prompt_tokens,
        "tokens_out": ex.output_tokens,
        "finish_reason": ex.finish_reason,
        "duration_ms": _ms(ex.ended_at - ex.started_at),
    }
    if ex.experiment:
        fields["experiment"] = ex.experiment
    if ex.cut is not None:
        fields["cut"] = ex.cut
    if ex.timeout is not None:
        fields["timeout"] = ex.timeout
    if ex.upstream_error is not None:
        fields["upstream_error"] = ex.upstream_error
    if ex.error_code is not None:
        fields["error"] = ex.error_code
    if ex.client_disconnected:
        fields["client_disconnected"] = True
    if ex.queue_wait:
        fields["queue_ms"] = _ms(ex.queue_wait)
    if ex.gap_count:
        fields["itl_mean_ms"] = int(ex.gap_sum / ex.gap_count * 100_000.0 + 0.5) / 100.0
        fields["itl_max_ms"] = _ms(ex.gap_max)
    return fields


class LineSink(Protocol):
    """Where the access lines go (`sluice serve`: logs.SharedLines over stderr)."""

    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


class JsonAccessLog:
    """Writes the access log line as the JSON logging setup writes every line (the same
    keys in the same order, `event`, `level`, an ISO UTC `timestamp` last) into the same
    binary stream, without structlog's processor chain: the line is written once per
    request, and the chain (bound logger, level, timestamp, renderer) was ~6% of the
    proxy's CPU per short request.

    The lines of one event-loop pass go out in one `write`: the sink is flushed once, by a
    callback at the end of the pass in which the first of them was written (like nginx's
    `access_log ... buffer=`, but never held longer than that pass). A quiet proxy still
    writes each line at once; a busy one writes one system call for many lines. Other log
    lines go through the same sink and flush it, so the order of lines holds."""

    __slots__ = ("_file", "_flush_pending", "_held", "_loop", "_second", "_stamp")

    def __init__(self, file: LineSink, held: list[bytes] | None = None) -> None:
        """`held`: the sink's own list of lines not yet written, when it has one
        (logs.SharedLines): a line is appended to it rather than passed to `write`."""
        self._file = file
        self._held = held
        self._second = -1
        self._stamp = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_pending = False

    def write_exchange(self, ex: Exchange) -> None:
        """The access line of `ex`: written in C where the build has it (~3,000
        instructions against ~14,800 for the dict and orjson)."""
        if LINES_IN_C:
            self.write_line(exchange_line(ex, wall()))
        else:
            self.write(access_fields(ex))

    def write(self, fields: dict[str, object]) -> None:
        """A line of `fields` (changed: `event`, `level` and `timestamp` are added)."""
        self.write_line(self.fields_line(fields, wall()))

    def fields_line(self, fields: dict[str, object], now: float) -> bytes:
        second = int(now)
        if second != self._second:  # the date and time to the second, once a second
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        fields["event"] = "request"
        fields["level"] = "info"
        # The microseconds zero-padded by str() of a 7-digit number: %-formatting parses
        # its format each time (~4x), a compiled f-string goes through format().
        micros = int((now - second) * 1e6)
        fields["timestamp"] = self._stamp + "." + str(1_000_000 + micros)[1:] + "Z"
        return _dumps(fields, option=_APPEND_NEWLINE)

    def write_line(self, line: bytes) -> None:
        if self._held is not None:
            self._held.append(line)
        else:
            self._file.write(line)
        if self._flush_pending:
            return
        loop = self._loop
        if loop is None or loop.is_closed():
            try:
                loop = self._loop = asyncio.get_running_loop()
            except RuntimeError:  # written outside a running loop: at once
                self.flush()
                return
        self._flush_pending = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        """Writes the lines buffered so far (see `flush_quietly`)."""
        self._flush_pending = False
        flush_quietly(self._file)


def flush_quietly(sink: LineSink) -> None:
    """Flushes `sink`; a stream that cannot be written (a closed stderr) loses its lines:
    a request never fails for its log line, nor does the process's exit."""
    try:
        sink.flush()
    except (OSError, ValueError):
        pass
