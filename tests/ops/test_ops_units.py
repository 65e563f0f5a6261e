"""In-process checks of the metrics, the access log line and the logging setup."""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import io
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram
from sluice.control.runtime.logs import access_lines, configure_logging
from sluice.proxy.exchange import ITL_BUCKETS, Exchange, itl_bucket
from sluice.proxy.metrics import DURATION_BUCKETS, Metrics, bucket_of
from sluice.proxy.observe import JsonAccessLog, Observer, access_fields
from sluice.proxy.request import declared_length
from sluice.proxy.snapshot import Snapshot, SnapshotRef
from structlog.testing import capture_logs


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, tuple[Any, ...]], float]:
    out = {}
    for family in registry.collect():
        if family.name == name:
            for s in family.samples:
                if not s.name.endswith("_created"):
                    out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def streamed(gaps: list[float], **fields: Any) -> Exchange:
    ex = Exchange("r1", 100.0)
    ex.app, ex.route, ex.backend, ex.status, ex.stream = "app", "chat", "sim", 200, True
    for key, value in fields.items():
        setattr(ex, key, value)
    t = 100.05
    ex.first_token_at = ex.last_token_at = t
    for gap in gaps:
        t += gap
        ex.add_gap(gap)
    ex.content_chunks = len(gaps) + 1
    ex.ended_at = t + 0.001
    return ex


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=30.0), max_size=60))
def test_folded_gaps_equal_one_observe_per_gap(gaps: list[float]) -> None:
    """The per-stream bucket counts folded in at the end give exactly the histogram that
    one `observe` per gap gives (this leans on prometheus-client's bucket storage)."""
    metrics = Metrics()
    metrics.observe(streamed(gaps))
    reference = CollectorRegistry()
    ref = Histogram("sluice_inter_token_seconds", "", ["route", "variant"],
                    buckets=ITL_BUCKETS, registry=reference)  # fmt: skip
    child = ref.labels("chat", "")
    for gap in gaps:
        child.observe(gap)
    got = samples(metrics.registry, "sluice_inter_token_seconds")
    want = samples(reference, "sluice_inter_token_seconds")
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


def test_gaps_on_and_around_every_bucket_bound_land_where_prometheus_puts_them() -> None:
    gaps = [0.0, 100.0]
    for bound in ITL_BUCKETS:
        gaps += [bound, bound * 0.999, bound * 1.001]
    test_folded_gaps_equal_one_observe_per_gap.hypothesis.inner_test(gaps)  # type: ignore[attr-defined]


def test_itl_bucket_is_the_first_bound_not_below_the_gap_at_and_beside_each_bound() -> None:
    """itl_bucket's comparisons, written out with literals, against ITL_BUCKETS by bisect
    (le semantics): on each bound, the float just below it and the float just above."""
    gaps = [0.0, -1.0, math.inf, 1e9]
    for bound in ITL_BUCKETS:
        gaps += [bound, math.nextafter(bound, 0.0), math.nextafter(bound, math.inf)]
    for gap in gaps:
        assert itl_bucket(gap) == bisect.bisect_left(ITL_BUCKETS, gap), gap
    assert itl_bucket(math.nan) == len(ITL_BUCKETS)  # as the loop it replaced: +Inf


def test_zero_gaps_count_as_gaps_of_zero() -> None:
    """Tokens that came in one read: add_zero_gaps(k) records what k add_gap(0.0) do."""
    one_by_one, at_once = Exchange("a", 1.0), Exchange("b", 1.0)
    for ex in (one_by_one, at_once):
        ex.add_gap(0.02)
    for _ in range(3):
        one_by_one.add_gap(0.0)
    at_once.add_zero_gaps(3)
    for ex in (one_by_one, at_once):
        ex.add_gap(0.2)
    fields = ("gap_count", "gap_sum", "gap_max", "gap_buckets")
    assert [getattr(at_once, f) for f in fields] == [getattr(one_by_one, f) for f in fields]
    assert at_once.gap_count == 5 and at_once.gap_buckets[0] == 3


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=700.0),
            st.sampled_from(["a", "b"]),
            st.sampled_from(["chat", "chat", ""]),  # "": rejected before routing
            st.sampled_from([200, 499]),
            st.integers(min_value=0, max_value=3),  # prompt tokens (0: none reported)
            st.integers(min_value=0, max_value=2),  # content chunks (no usage)
        ),
        min_size=1,
        max_size=40,
    ),
    st.integers(min_value=0, max_value=40),
)
def test_counted_in_python_then_read_equals_prometheus_observing_each_request(
    requests: list[tuple[float, str, str, int, int, int]], read_after: int
) -> None:
    """Issue 19: `observe` counts in plain Python and a read folds the counts in. Whenever
    the metrics are read (here once midway), they equal what prometheus-client shows
    when each request is observed as it ends, and no request is counted twice: the
    counts a key keeps between reads start again from 0 after each. A routed request's
    token series exist from its first request with tokens on; an unrouted one has none."""
    metrics = Metrics()
    reference = CollectorRegistry()
    durations = Histogram("sluice_stream_duration_seconds", "", ["route", "variant"],
                          buckets=DURATION_BUCKETS, registry=reference)  # fmt: skip
    counted = Counter("sluice_requests", "", ["app", "route", "preset", "variant", "status"],
                      registry=reference)  # fmt: skip
    tokens = Counter("sluice_tokens", "", ["app", "route", "direction"], registry=reference)
    for i, (duration, app, route, status, prompt, chunks) in enumerate(requests):
        if i == read_after:
            metrics.render()
        ex = streamed([], app=app, route=route, status=status, prompt_tokens=prompt or None)
        ex.content_chunks = chunks
        ex.ended_at = ex.started_at + duration
        metrics.observe(ex)
        counted.labels(app, route, "", "", str(status)).inc()
        if not route:
            continue
        durations.labels(route, "").observe(duration)
        if prompt or chunks:
            tokens.labels(app, route, "in").inc(prompt)
            tokens.labels(app, route, "out").inc(chunks)
    for name in ("sluice_stream_duration_seconds", "sluice_requests", "sluice_tokens"):
        got, want = samples(metrics.registry, name), samples(reference, name)
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value), key
    for name in ("sluice_requests", "sluice_tokens"):  # a second read adds nothing
        assert samples(metrics.registry, name) == samples(reference, name)


def test_outcomes_map_to_their_counters() -> None:
    m = Metrics()
    m.observe(streamed([0.01], cut="###", finish_reason="stop"))
    m.observe(streamed([0.01], cut="(?i)ignore", finish_reason="content_filter"))
    m.observe(streamed([0.01], cut="repetition:3", finish_reason="stop"))
    m.observe(streamed([0.01], error_code="shutdown"))
    m.observe(streamed([], timeout="inter_token_timeout"))
    m.observe(streamed([], upstream_error="reset", client_disconnected=True, status=200))
    rejected = Exchange("r2", 1.0)
    rejected.status, rejected.error_code, rejected.ended_at = 401, "invalid_api_key", 1.001
    m.observe(rejected)
    queued_out = streamed([], error_code="queue_timeout", status=429)
    queued_out.first_token_at = None
    m.observe(queued_out)

    r = m.registry
    assert samples(r, "sluice_stream_cuts") == {
        ("sluice_stream_cuts_total", (("reason", reason),)): 1.0
        for reason in ("stop", "content_filter", "repetition", "shutdown")
    }
    assert samples(r, "sluice_timeouts") == {
        ("sluice_timeouts_total", (("kind", "inter_token_timeout"),)): 1.0
    }
    assert samples(r, "sluice_upstream_errors") == {
        ("sluice_upstream_errors_total", (("backend", "sim"), ("kind", "reset"))): 1.0
    }
    assert samples(r, "sluice_client_disconnects") == {("sluice_client_disconnects_total", ()): 1}
    requests = samples(r, "sluice_requests")
    blank = (("app", ""), ("preset", ""), ("route", ""))
    assert requests[("sluice_requests_total", (*blank, ("status", "401"), ("variant", "")))] == 1
    assert sum(requests.values()) == 8
    # Every routed request but the limiter's rejection waited (0 s here) for its permits.
    assert samples(r, "sluice_queue_wait_seconds")[("sluice_queue_wait_seconds_count", ())] == 6
    ttft = samples(r, "sluice_ttft_seconds")
    assert ttft[("sluice_ttft_seconds_count", (("route", "chat"), ("variant", "")))] == 6
    assert ttft[("sluice_ttft_seconds_sum", (("route", "chat"), ("variant", "")))] == (
        pytest.approx(6 * 0.05)
    )
    overhead = samples(r, "sluice_proxy_overhead_seconds")
    assert set(overhead.values()) == {0.0}  # no exchange carried one


def test_tokens_and_overhead_and_app_usage() -> None:
    m = Metrics()
    ex = streamed([0.01, 0.02], prompt_tokens=7, completion_tokens=3, first_token_overhead=4e-5)
    m.observe(ex)
    m.observe(streamed([0.01], app="other", prompt_tokens=None))  # no usage: 2 chunks out
    tokens = samples(m.registry, "sluice_tokens")
    assert tokens == {
        ("sluice_tokens_total", (("app", "app"), ("direction", "in"), ("route", "chat"))): 7,
        ("sluice_tokens_total", (("app", "app"), ("direction", "out"), ("route", "chat"))): 3,
        ("sluice_tokens_total", (("app", "other"), ("direction", "in"), ("route", "chat"))): 0,
        ("sluice_tokens_total", (("app", "other"), ("direction", "out"), ("route", "chat"))): 2,
    }
    overhead = samples(m.registry, "sluice_proxy_overhead_seconds")
    lv = (("route", "chat"), ("variant", ""))
    assert overhead[("sluice_proxy_overhead_seconds_count", lv)] == 1
    assert overhead[("sluice_proxy_overhead_seconds_bucket", (("le", "5e-05"), *lv))] == 1
    usage = m.app_usage()
    assert (usage["app"].requests, usage["app"].tokens_in, usage["app"].tokens_out) == (1, 7, 3)
    assert usage["other"].by_status == {"200": 1}


def test_gauges_follow_the_state() -> None:
    m = Metrics()
    m.set_gauges(3, {"app:a": 2, "backend:sim": 0}, "v1")
    m.set_gauges(1, {"app:a": 0, "backend:sim": 4}, "v2")
    r = m.registry
    assert samples(r, "sluice_active_streams") == {("sluice_active_streams", ()): 1}
    assert samples(r, "sluice_queue_depth") == {
        ("sluice_queue_depth", (("limiter", "app:a"),)): 0,
        ("sluice_queue_depth", (("limiter", "backend:sim"),)): 4,
    }
    assert samples(r, "sluice_config_info") == {("sluice_config_info", (("version", "v2"),)): 1}
    m.set_gauges(1, {"backend:sim": 1}, "v3")  # a reload removed app a and its limiter
    assert samples(r, "sluice_queue_depth") == {
        ("sluice_queue_depth", (("limiter", "backend:sim"),)): 1,
    }
    m.record_reload("error")
    m.record_reload("error")
    assert samples(r, "sluice_config_last_reload_success") == {
        ("sluice_config_last_reload_success", ()): 0
    }
    m.record_reload("unchanged")
    assert samples(r, "sluice_config_last_reload_success") == {
        ("sluice_config_last_reload_success", ()): 1
    }
    reloads = samples(r, "sluice_config_reload")
    assert reloads[("sluice_config_reload_total", (("result", "error"),))] == 2


@given(seconds=st.floats(min_value=0.0, max_value=86_400.0))
def test_access_log_milliseconds_are_round_to_a_tenth(seconds: float) -> None:
    """The access line's durations (computed without `round`) are what round(ms, 1)
    gives, up to a tie at the half tenth."""
    ex = Exchange("r", 10.0)
    ex.ended_at = 10.0 + seconds
    got = access_fields(ex)["duration_ms"]
    assert isinstance(got, float)
    assert abs(got - round((ex.ended_at - ex.started_at) * 1000, 1)) <= 0.1 + 1e-9 * seconds
    assert abs(got * 10 - round(got * 10)) < 1e-6 * max(1.0, got)


@given(
    bounds=st.lists(st.floats(min_value=0.0, max_value=100.0), max_size=25).map(
        lambda b: tuple(sorted(b))
    ),
    value=st.floats(min_value=-1.0, max_value=200.0) | st.sampled_from([0.0, 1.0, 5.0]),
)
def test_a_histograms_bucket_is_bisect_lefts(bounds: tuple[float, ...], value: float) -> None:
    """`metrics.bucket_of` (a compiled binary search) picks the bucket bisect_left picks,
    on a bound exactly too (le semantics)."""
    assert bucket_of(bounds, value) == bisect.bisect_left(bounds, value)
    for bound in bounds:
        assert bucket_of(bounds, bound) == bisect.bisect_left(bounds, bound)


@given(st.integers(min_value=0, max_value=10**25))
def test_a_declared_length_is_ints_reading(n: int) -> None:
    """`declared_length` sums the digits itself; any length reads as int() reads it."""
    for value in (b"%d" % n, b"%020d" % n, b" %d " % n):
        assert declared_length({b"content-length": value}) == int(value)
    assert declared_length({b"content-length": b"12a"}) == 0
    assert declared_length({b"content-length": b""}) == 0
    assert declared_length({}) == 0


def test_access_log_line_fields() -> None:
    observer = Observer(SnapshotRef(Snapshot("v1", {}, {})), None)
    ex = streamed([0.01, 0.03], prompt_tokens=5, completion_tokens=3, finish_reason="length")
    quiet = Exchange("r9", 1.0)
    quiet.status, quiet.error_code, quiet.ended_at = 401, "invalid_api_key", 1.0005
    with capture_logs() as logs:
        observer.on_complete(ex)
        observer.on_complete(quiet)
    assert logs[0] == {
        "event": "request",
        "log_level": "info",
        "request_id": "r1",
        "endpoint": "",
        "app": "app",
        "route": "chat",
        "backend": "sim",
        "preset": "",
        "variant": "",
        "config_version": "",
        "status": 200,
        "stream": True,
        "ttft_ms": 50.0,
        "tokens_in": 5,
        "tokens_out": 3,
        "finish_reason": "length",
        "duration_ms": 91.0,
        "itl_mean_ms": 20.0,
        "itl_max_ms": 30.0,
    }
    assert logs[1]["error"] == "invalid_api_key" and logs[1]["ttft_ms"] is None
    assert "itl_mean_ms" not in logs[1] and "cut" not in logs[1]
    with capture_logs() as logs:
        Observer(observer.ref, None, access_log=False).on_complete(ex)
    assert logs == []


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_rendered_by_orjson(restore_logging: None) -> None:
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    configure_logging("info", "json", stream=stream)
    log = structlog.get_logger("test")
    log.info("hello", n=1, path=b"x", obj=object())
    log.debug("hidden")
    logging.getLogger("asyncio").warning("from %s", "stdlib")
    stream.flush()
    lines = stream.buffer.getvalue().decode().splitlines()  # type: ignore[attr-defined]
    first, second = (orjson.loads(line) for line in lines)
    assert len(lines) == 2
    assert (first["event"], first["n"], first["level"]) == ("hello", 1, "info")
    assert first["timestamp"].endswith("Z") and "object object" in first["obj"]
    assert second == second | {"event": "from stdlib", "logger": "asyncio", "level": "warning"}
    assert second["timestamp"].endswith("Z")


def test_direct_access_line_is_the_line_structlog_writes(restore_logging: None) -> None:
    """`sluice serve` writes the access line itself (issue 19); it must be the line the
    JSON logging setup writes through structlog: same keys, same order, same values."""
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    configure_logging("info", "json", stream=stream)
    direct = access_lines("info", "json", stream)
    assert direct is not None
    ref = SnapshotRef(Snapshot("v1", {}, {}))
    cut = streamed([0.01], cut="STOP", experiment="exp", queue_wait=0.2, client_disconnected=True)
    # A logger of its own: observe's module logger would cache this test's stream.
    log = structlog.get_logger("sluice.access")
    for ex in (streamed([0.01, 0.03], finish_reason="length"), cut, Exchange("r9", 1.0)):
        log.info("request", **access_fields(ex))  # what log_exchange writes
        Observer(ref, None, json_lines=direct).on_complete(ex)
    stream.flush()
    lines = [orjson.loads(x) for x in stream.buffer.getvalue().splitlines()]  # type: ignore[attr-defined]
    assert len(lines) == 6
    for via_structlog, written in zip(lines[::2], lines[1::2], strict=True):
        assert list(written) == list(via_structlog)  # the keys, in order
        stamp = written.pop("timestamp")
        assert stamp.endswith("Z") and len(stamp) == len("2026-12-03T08:03:12.537678Z")
        assert abs(dt.datetime.fromisoformat(stamp[:-1] + "+00:00").timestamp() - time.time()) < 5
        via_structlog.pop("timestamp")
        assert written == via_structlog
    assert lines[2]["cut"] == "STOP" and lines[3]["queue_ms"] == 200.0


class _CountingRaw(io.RawIOBase):
    """A stream that records each write it receives (each one a system call on a file)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.writes.append(bytes(data))
        return len(data)


def test_access_lines_of_one_loop_pass_go_out_in_one_write() -> None:
    raw = _CountingRaw()
    lines = JsonAccessLog(io.BufferedWriter(raw, 1 << 16))

    async def requests_end() -> None:
        for i in range(3):  # three requests ending in one pass of the loop
            lines.write({"request_id": f"r{i}"})
        assert raw.writes == []  # held until the pass ends, not longer
        await asyncio.sleep(0)
        assert len(raw.writes) == 1
        lines.write({"request_id": "r3"})  # a quiet moment: its own write, at once
        await asyncio.sleep(0)
        assert len(raw.writes) == 2

    asyncio.run(requests_end())
    lines.write({"request_id": "r4"})  # no loop running: written at once
    assert len(raw.writes) == 3
    ids = [orjson.loads(line)["request_id"] for w in raw.writes for line in w.splitlines()]
    assert ids == ["r0", "r1", "r2", "r3", "r4"]


def test_other_log_lines_keep_their_place_after_buffered_access_lines(
    restore_logging: None,
) -> None:
    raw = _CountingRaw()
    stream = io.TextIOWrapper(io.BufferedWriter(raw, 1 << 16), encoding="utf-8")
    configure_logging("info", "json", stream=stream)
    lines = access_lines("info", "json", stream)
    assert lines is not None

    async def serve() -> None:
        lines.write({"request_id": "before"})
        structlog.get_logger("test-order").warning("upstream_slow")
        lines.write({"request_id": "after"})
        await asyncio.sleep(0)

    asyncio.run(serve())
    events = [
        orjson.loads(line).get("request_id") or orjson.loads(line)["event"]
        for w in raw.writes
        for line in w.splitlines()
    ]
    assert events == ["before", "upstream_slow", "after"]


def test_access_line_goes_through_structlog_unless_json_at_info() -> None:
    assert access_lines("info", "json") is not None
    assert access_lines("debug", "json") is not None
    assert access_lines("warning", "json") is None  # the line is not written at all
    assert access_lines("info", "console") is None  # rendered by structlog's console
    ref = SnapshotRef(Snapshot("v1", {}, {}))
    direct = access_lines("info", "json", io.TextIOWrapper(io.BytesIO()))
    assert Observer(ref, None, access_log=False, json_lines=direct).json_lines is None


def test_console_format_and_bad_settings(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("warning", "console", stream=stream)
    structlog.get_logger("test").warning("careful", n=2)
    structlog.get_logger("test").info("hidden")
    assert "careful" in stream.getvalue() and "n=2" in stream.getvalue()
    assert "hidden" not in stream.getvalue()
    with pytest.raises(ValueError):
        configure_logging("loud", "json")
