"""GET /metrics of a real `sluice serve` after a known load, checked against what the
clients saw: request counts per label set, tokens, and the histograms' counts and sums."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import httpx

from tests.fixtures import ProcessServer, stream_request
from tests.ops.fixtures import (
    ADMIN,
    Scrape,
    Streams,
    auth,
    chat,
    content_events,
    error_events,
    scrape,
    usage,
    wait_until,
)

SIM_TTFT_S = 0.020  # the session simulator's (tests/conftest.py)


def _settled(url: str, before: Scrape, requests: int) -> Scrape:
    """The scrape once `requests` more requests were observed (each is observed right
    after its response ended, so a client can be a moment ahead of /metrics)."""
    box: list[Scrape] = []

    def done() -> bool:
        box[:] = [scrape(url).minus(before)]
        return box[0].total("sluice_requests_total") >= requests

    wait_until(f"{requests} requests in /metrics", done)
    return box[0]


def test_metrics_match_what_the_clients_saw(gateway: ProcessServer) -> None:
    url = gateway.url
    before = scrape(url)
    plan = [("alpha", chat("plain", n), {}) for n in (8, 12, 16, 20)]
    plan += [("beta", chat("tuned", 10), {}) for _ in range(3)]
    plan += [("alpha", chat("ab", 6), {"x-user-id": f"user-{i}"}) for i in range(6)]
    streams = Streams()
    try:
        for app, body, headers in plan:
            streams.start(url, body, {**auth(app), **headers})
        results = streams.results()
    finally:
        streams.close()

    requests: Counter[tuple[str, str, str, str]] = Counter()
    tokens: dict[tuple[str, str, str], int] = defaultdict(int)
    per_route: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0, 0, 0.0])
    for (app, body, _), r in zip(plan, results, strict=True):
        assert r.status == 200 and r.data()[-1] == "[DONE]"
        route, variant = body["model"], r.headers.get("x-sluice-variant", "")
        requests[(app, route, r.headers.get("x-sluice-preset", ""), variant)] += 1
        used = usage(r)
        assert used["completion_tokens"] == body["max_tokens"] == content_events(r)
        tokens[(app, route, "in")] += used["prompt_tokens"]
        tokens[(app, route, "out")] += used["completion_tokens"]
        seen = per_route[(route, variant)]
        seen[0] += 1  # streams
        seen[1] += r.content_times()[0]  # client TTFT: request sent -> first content
        seen[2] += content_events(r) - 1  # gaps between content events
        seen[3] += r.events[-1][0]  # client duration
    assert {key[3] for key in requests if key[1] == "ab"} == {"a", "b"}, "both variants ran"

    delta = _settled(url, before, len(plan))
    for (app, route, preset, variant), n in requests.items():
        labels = {"app": app, "route": route, "preset": preset, "variant": variant}
        assert delta.get("sluice_requests_total", **labels, status="200") == n, labels
    assert delta.total("sluice_requests_total") == len(plan)
    for (app, route, direction), n in tokens.items():
        got = delta.get("sluice_tokens_total", app=app, route=route, direction=direction)
        assert got == n, (app, route, direction)
    for (route, variant), (n, ttft, gaps, duration) in per_route.items():
        lv = {"route": route, "variant": variant}
        assert delta.get("sluice_ttft_seconds_count", **lv) == n
        ttft_sum = delta.get("sluice_ttft_seconds_sum", **lv)
        # sluice's clock starts after it read the request and stops before the client
        # reads the token; uvloop's clock ticks in milliseconds (slack: 2 ms a stream).
        assert SIM_TTFT_S * n * 0.9 <= ttft_sum <= ttft + 0.002 * n, (lv, ttft_sum, ttft)
        assert delta.get("sluice_ttft_seconds_bucket", **lv, le="+Inf") == n
        assert delta.get("sluice_inter_token_seconds_count", **lv) == gaps
        assert delta.get("sluice_stream_duration_seconds_count", **lv) == n
        assert delta.get("sluice_stream_duration_seconds_sum", **lv) <= duration + 0.002 * n
    # Every gap of a healthy stream (ITL 10 ms) lands in a bucket well under 1 s.
    assert delta.total("sluice_inter_token_seconds_bucket", le="0.5") == sum(
        v[2] for v in per_route.values()
    )
    assert delta.get("sluice_queue_wait_seconds_count") == len(plan)
    for quiet in ("sluice_timeouts_total", "sluice_stream_cuts_total",
                  "sluice_client_disconnects_total", "sluice_upstream_errors_total"):  # fmt: skip
        assert delta.total(quiet) == 0, quiet
    now = scrape(url)
    assert now.get("sluice_active_streams") == 0
    version = results[0].headers["x-sluice-config"]
    assert now.get("sluice_config_info", version=version) == 1


def test_rejected_requests_are_counted_by_status(gateway: ProcessServer) -> None:
    url = gateway.url
    before = scrape(url)
    with httpx.Client(base_url=url, timeout=5) as client:
        wrong_key = client.post("/v1/chat/completions", json=chat("plain", 4),
                                headers={"authorization": "Bearer sk-nope"})  # fmt: skip
        unknown = client.post("/v1/chat/completions", json=chat("nope", 4), headers=auth("beta"))
        forbidden_json = client.post(
            "/v1/chat/completions", content=b"{not json", headers=auth("beta")
        )
    assert (wrong_key.status_code, unknown.status_code, forbidden_json.status_code) == (
        401,
        404,
        400,
    )
    delta = _settled(url, before, 3)
    blank = {"route": "", "preset": "", "variant": ""}
    assert delta.get("sluice_requests_total", app="", **blank, status="401") == 1
    assert delta.get("sluice_requests_total", app="beta", **blank, status="404") == 1
    assert delta.get("sluice_requests_total", app="", **blank, status="400") == 1
    assert delta.total("sluice_ttft_seconds_count") == 0
    assert delta.total("sluice_queue_wait_seconds_count") == 0


def test_timeouts_cuts_disconnects_and_upstream_errors(gateway: ProcessServer) -> None:
    url = gateway.url
    before = scrape(url)
    stalled = stream_request(
        url, chat("guarded", 20, sim={"stall_after": 2}), headers=auth("alpha")
    )
    assert [e["code"] for e in error_events(stalled)] == ["inter_token_timeout"]
    script = ["Hello", " world", " STOP", "HERE", " never", " sent"]
    cut = stream_request(
        url,
        chat("guarded", 20, sim={"script": script, "ignore_stop": True}),
        headers=auth("alpha"),
    )
    assert cut.text() == "Hello world " and "STOPHERE" not in cut.text()
    broken = stream_request(url, chat("plain", 20, sim={"close_after": 3}), headers=auth("beta"))
    assert [e["code"] for e in error_events(broken)] == ["upstream_reset"]
    gone = stream_request(
        url, chat("plain", 200, sim={"itl_ms": 20}), headers=auth("beta"), stop_after_events=3
    )
    assert len(gone.events) == 3

    delta = _settled(url, before, 4)
    assert delta.get("sluice_timeouts_total", kind="inter_token_timeout") == 1
    assert delta.get("sluice_stream_cuts_total", reason="stop") == 1
    assert delta.get("sluice_upstream_errors_total", backend="sim", kind="reset") == 1
    wait_until(
        "the disconnect in /metrics",
        lambda: scrape(url).minus(before).get("sluice_client_disconnects_total") == 1,
    )
    assert scrape(url).get("sluice_active_streams") == 0


def test_queue_depth_and_wait(gateway: ProcessServer) -> None:
    """App `solo` has one permit: a second stream queues behind the first."""
    url = gateway.url
    before = scrape(url)
    streams = Streams()
    try:
        streams.start(url, chat("plain", 50, sim={"itl_ms": 40}), auth("solo"))
        wait_until("the first stream", lambda: scrape(url).get("sluice_active_streams") == 1)
        streams.start(url, chat("plain", 4), auth("solo"))
        wait_until(
            "the queued request",
            lambda: scrape(url).get("sluice_queue_depth", limiter="app:solo") == 1,
        )
        assert scrape(url).get("sluice_active_streams") == 1
        results = streams.results()
    finally:
        streams.close()
    assert [r.status for r in results] == [200, 200]
    delta = _settled(url, before, 2)
    assert delta.get("sluice_queue_wait_seconds_count") == 2
    assert delta.get("sluice_queue_wait_seconds_bucket", le="0.001") == 1  # the first: none
    assert delta.get("sluice_queue_wait_seconds_sum") > 0.5  # the second waited ~2 s
    now = scrape(url)
    assert now.get("sluice_queue_depth", limiter="app:solo") == 0
    assert now.get("sluice_active_streams") == 0


def test_reload_counters_and_config_info(start, ops_config: Path, tmp_path: Path) -> None:
    config = tmp_path / "cfg"
    config.mkdir()
    for path in ops_config.iterdir():
        (config / path.name).write_bytes(path.read_bytes())
    server = start(config)
    url = server.url
    first = httpx.get(url + "/v1/models", headers=auth("alpha")).headers["x-sluice-config"]
    assert scrape(url).get("sluice_config_info", version=first) == 1
    assert scrape(url).get("sluice_config_last_reload_success") == 1

    good = (config / "warm.yaml").read_text()
    (config / "warm.yaml").write_text("kind: Preset\ngeneration: {num_beams: 4}\n")
    resp = httpx.post(url + "/admin/reload", headers=ADMIN, timeout=10)
    assert resp.status_code == 422
    now = scrape(url)
    assert now.get("sluice_config_reload_total", result="error") >= 1
    assert now.get("sluice_config_last_reload_success") == 0
    assert now.get("sluice_config_info", version=first) == 1  # the last good one serves

    (config / "warm.yaml").write_text(good.replace("0.7", "0.6"))
    resp = httpx.post(url + "/admin/reload", headers=ADMIN, timeout=10)
    assert resp.status_code == 200
    second = resp.json()["version"]
    assert second != first
    now = scrape(url)
    assert now.get("sluice_config_last_reload_success") == 1
    assert now.get("sluice_config_info", version=second) == 1
    assert ("sluice_config_info", (("version", first),)) not in now.samples
    assert now.get("sluice_config_reload_total", result="ok") >= 1


def test_proxy_overhead_is_observed_once_per_stream(gateway: ProcessServer) -> None:
    url = gateway.url
    before = scrape(url)
    for n in (4, 8, 12):
        assert stream_request(url, chat("plain", n), headers=auth("alpha")).status == 200
    delta = _settled(url, before, 3)
    lv = {"route": "plain", "variant": ""}
    assert delta.get("sluice_proxy_overhead_seconds_count", **lv) == 3
    # Sluice's own time on a chunk: far below the backend's 10 ms between tokens.
    assert delta.get("sluice_proxy_overhead_seconds_bucket", **lv, le="0.01") == 3
