"""Graceful shutdown of a real `sluice serve` with real streams (the simulator at 50 ms a
token): on SIGTERM readiness goes at once, new connections are refused, short streams
finish, long ones end with the terminal `shutdown` event at the deadline; exit status 0."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx

from tests.fixtures import SimClient
from tests.ops.fixtures import (
    Streams,
    auth,
    chat,
    connect_refused,
    error_events,
    scrape,
    wait_until,
)

ITL_MS = 50


def test_sigterm_drains_then_cuts_at_the_deadline(
    start, ops_config: Path, sim_client: SimClient
) -> None:
    deadline_s = 3.0
    server = start(ops_config, "--drain-timeout", str(deadline_s))
    url, port = server.url, server.port
    streams = Streams()
    ended: dict[int, float] = {}
    try:
        bodies = [chat("plain", n, sim={"itl_ms": ITL_MS}) for n in (30, 36, 400, 400)]
        for i, body in enumerate(bodies):
            future = streams.start(url, body, auth("alpha"))
            future.add_done_callback(lambda _f, i=i: ended.setdefault(i, time.monotonic()))
        wait_until("4 streams", lambda: scrape(url).get("sluice_active_streams") == 4)

        sigterm_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        refused_after = wait_until("the listener to close", lambda: connect_refused(port), 0.5)
        code = server.proc.wait(timeout=deadline_s + 5)
        exited_after = time.monotonic() - sigterm_at
        results = streams.results(timeout=5)
    finally:
        streams.close()

    assert code == 0
    assert refused_after < 0.5
    assert deadline_s <= exited_after < deadline_s + 3.0
    for short in results[:2]:
        assert error_events(short) == []
        assert short.data()[-1] == "[DONE]"
        finishes = [c.get("finish_reason") for o in short.data() if isinstance(o, dict)
                    for c in o.get("choices") or []]  # fmt: skip
        assert "length" in finishes
        assert short.content_times()[-1] < deadline_s + 1.0  # before the deadline
    for i, long in enumerate(results[2:], start=2):
        errors = error_events(long)
        assert [e["code"] for e in errors] == ["shutdown"], errors
        assert errors[0]["type"] == "server_error"
        assert long.data()[-2:] == [{"error": errors[0]}, "[DONE]"]
        assert ended[i] - sigterm_at >= deadline_s - 0.1  # cut at the deadline, not before
        assert len(long.content_times()) < 400
    # The cut streams' generations were aborted at the backend, freeing their slots.
    sim_client.wait_for(lambda s: s["active"] == 0, timeout=5)

    server.stop()
    logs = server.json_logs()
    events = [e["event"] for e in logs]
    assert (
        events.index("draining") < events.index("drain_deadline_passed") < events.index("stopped")
    )
    assert next(e for e in logs if e["event"] == "drain_deadline_passed")["interrupted"] == 2
    access = [e for e in logs if e["event"] == "request"]
    assert sorted(e.get("error") for e in access if e.get("error")) == ["shutdown", "shutdown"]
    assert sorted(e["finish_reason"] for e in access if not e.get("error")) == ["length"] * 2


def test_readiness_goes_at_once_and_the_grace_keeps_serving(start, ops_config: Path) -> None:
    grace_s = 2.5  # long enough for the checks below on a loaded 2-core machine
    server = start(ops_config, "--drain-grace", str(grace_s), "--drain-timeout", "5")
    url, port = server.url, server.port
    assert httpx.get(url + "/readyz").status_code == 200
    streams = Streams()
    try:
        in_flight = streams.start(url, chat("plain", 30, sim={"itl_ms": ITL_MS}), auth("alpha"))
        wait_until("the stream", lambda: scrape(url).get("sluice_active_streams") == 1)
        sigterm_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        wait_until(
            "/readyz 503", lambda: httpx.get(url + "/readyz").status_code == 503, timeout=0.5
        )
        assert httpx.get(url + "/readyz").json() == {"status": "draining"}
        assert httpx.get(url + "/healthz").status_code == 200  # alive: do not restart it
        # Within the grace a request that a load balancer still sends is served.
        late = streams.start(url, chat("plain", 3), auth("alpha")).result(timeout=5)
        assert late.status == 200 and late.data()[-1] == "[DONE]"
        assert time.monotonic() - sigterm_at < grace_s
        wait_until("the listener to close", lambda: connect_refused(port), grace_s + 1.0)
        assert time.monotonic() - sigterm_at >= grace_s - 0.05
        result = in_flight.result(timeout=10)
        code = server.proc.wait(timeout=10)
    finally:
        streams.close()
    assert code == 0
    assert error_events(result) == [] and len(result.content_times()) == 30
