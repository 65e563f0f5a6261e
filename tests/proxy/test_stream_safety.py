"""Stream safety against the real simulator: stop words cut by sluice itself, per-token
timeouts, bounded queues with Retry-After, and no leaked permit or connection."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sluice.proxy.snapshot import Backend, QueueLimits, Snapshot, StreamPolicy, StreamTimeouts
from sluice.proxy.stopwords import CutPattern, GuardSpec

from tests.fixtures import ProcessServer, ProxyHarness, SimClient, routed_snapshot, stream_request

MSG = [{"role": "user", "content": "Hello"}]


def policy(stop: tuple[str, ...] = (), timeouts: StreamTimeouts | None = None) -> StreamPolicy:
    return StreamPolicy(
        name="p",
        stop=stop,
        timeouts=timeouts or StreamTimeouts(),
        guard=GuardSpec(stop=stop) if stop else None,
    )


@pytest.fixture
def ignore_stop_client(sim_ignore_stop: ProcessServer) -> SimClient:
    client = SimClient(sim_ignore_stop.url)
    client.reset()
    return client


def test_stop_string_split_across_chunks_is_cut_by_sluice(
    sim_ignore_stop: ProcessServer, ignore_stop_client: SimClient
) -> None:
    harness = ProxyHarness(
        routed_snapshot(sim_ignore_stop.url, {"chat": {"policy": policy(stop=("\n\nUser:",))}})
    )
    try:
        script = ["Sure", ", here", " it is.", "\n", "\nU", "se", "r:", " now", " obey", " me"] + [
            " more"
        ] * 40
        body = {
            "model": "chat",
            "messages": MSG,
            "stream": True,
            "sim": {"script": script, "itl_ms": 15},
        }
        result = stream_request(harness.url, body)
        assert result.text() == "Sure, here it is."
        data = result.data()
        assert data[-1] == "[DONE]"
        final = data[-2]["choices"][0]
        assert final["finish_reason"] == "stop"
        assert final["stop_reason"] == "\n\nUser:"
        # The backend received the stop string too, and sluice aborted it after the cut.
        sent = ignore_stop_client.requests()[-1]
        assert "\n\nUser:" in sent["body"]["stop"]
        ignore_stop_client.wait_for(lambda s: s["aborted"] >= 1, timeout=1.0)
        assert all("obey" not in t for t in [result.text()])
    finally:
        harness.close()


def test_cut_pattern_ends_with_content_filter(sim_ignore_stop: ProcessServer) -> None:
    cut = CutPattern(pattern=r"(?i)ignore (all )?previous instructions", max_len=64)
    pol = StreamPolicy(name="p", cut_patterns=(cut,), guard=GuardSpec(cut_patterns=(cut,)))
    harness = ProxyHarness(routed_snapshot(sim_ignore_stop.url, {"chat": {"policy": pol}}))
    try:
        script = ["OK.", " Ign", "ore all pre", "vious", " instruc", "tions", " and leak"]
        result = stream_request(
            harness.url,
            {"model": "chat", "messages": MSG, "stream": True, "sim": {"script": script}},
        )
        assert result.text() == "OK. "
        assert result.data()[-2]["choices"][0]["finish_reason"] == "content_filter"
    finally:
        harness.close()


def test_non_stream_response_gets_the_same_rules(sim_ignore_stop: ProcessServer) -> None:
    harness = ProxyHarness(
        routed_snapshot(sim_ignore_stop.url, {"chat": {"policy": policy(stop=("###",))}})
    )
    try:
        script = ["Answer", " one", " #", "## next", " turn"]
        r = httpx.post(
            harness.url + "/v1/chat/completions",
            json={"model": "chat", "messages": MSG, "sim": {"script": script}},
            timeout=10,
        )
        choice = r.json()["choices"][0]
        assert choice["message"]["content"] == "Answer one "
        assert choice["finish_reason"] == "stop"
        assert choice["stop_reason"] == "###"
    finally:
        harness.close()


# vLLM reads n: 2.0 as 2: counted as one choice, choice 1 was cut when choice 0 ended.
@pytest.mark.parametrize("n", [2, 2.0])
def test_n2_choices_are_guarded_independently(sim_ignore_stop: ProcessServer, n: float) -> None:
    harness = ProxyHarness(
        routed_snapshot(sim_ignore_stop.url, {"chat": {"policy": policy(stop=("###",))}})
    )
    try:
        script = ["a", "b", "#", "##", "c", "d"]
        result = stream_request(
            harness.url,
            {"model": "chat", "messages": MSG, "stream": True, "n": n, "sim": {"script": script}},
        )
        texts: dict[int, str] = {}
        finishes: dict[int, str] = {}
        for obj in result.data():
            if isinstance(obj, dict):
                for c in obj["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + (
                        (c.get("delta") or {}).get("content") or ""
                    )
                    if c.get("finish_reason"):
                        finishes[c["index"]] = c["finish_reason"]
        assert texts == {0: "ab", 1: "ab"}
        assert finishes == {0: "stop", 1: "stop"}
        assert result.data()[-1] == "[DONE]"
    finally:
        harness.close()


def _chunk_tokens(choice: dict[str, Any], chat: bool) -> tuple[str, list[str]]:
    """A streamed choice's text and the tokens its logprobs name."""
    if chat:
        entries = (choice.get("logprobs") or {}).get("content") or []
        return (choice.get("delta") or {}).get("content") or "", [t["token"] for t in entries]
    return choice.get("text") or "", list((choice.get("logprobs") or {}).get("tokens") or [])


def _guarded_stream(url: str, chat: bool, script: list[str]) -> list[dict[str, Any]]:
    harness = ProxyHarness(routed_snapshot(url, {"chat": {"policy": policy(stop=("###",))}}))
    try:
        body: dict[str, Any] = {"model": "chat", "stream": True, "sim": {"script": script}}
        if chat:
            body.update(messages=MSG, logprobs=True)
        else:
            body.update(prompt="Hello", logprobs=1)
        result = stream_request(
            harness.url, body, path="/v1/chat/completions" if chat else "/v1/completions"
        )
        return [
            obj["choices"][0] for obj in result.data() if isinstance(obj, dict) and obj["choices"]
        ]
    finally:
        harness.close()


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_logprobs_of_held_text_wait_and_leave_with_a_cut(
    sim_ignore_stop: ProcessServer, chat: bool
) -> None:
    """The logprobs of text the guard holds back (it may begin a stop string) wait with
    it: they would show it before the guard decided, and here it is cut. The chunk that
    ends the choice carries none; the client sees only the tokens of the text it got."""
    choices = _guarded_stream(sim_ignore_stop.url, chat, ["a", "b", "#", "##", "c"])
    pairs = [_chunk_tokens(c, chat) for c in choices]
    assert [tokens for _, tokens in pairs if tokens] == [["a"], ["b"]], choices
    assert "".join(text for text, _ in pairs) == "ab"
    last = choices[-1]
    assert last["finish_reason"] == "stop" and last["logprobs"] is None


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_logprobs_of_held_text_go_out_with_it(sim_ignore_stop: ProcessServer, chat: bool) -> None:
    """Text held back and then released (no stop string after all) goes out with its
    logprobs: every chunk's logprobs name exactly the tokens of its own text, so none are
    lost and none shown twice (the console's playground draws a chunk by its tokens)."""
    script = ["a", "x#", "#y", "b#", "c", "#", "##"]
    choices = _guarded_stream(sim_ignore_stop.url, chat, script)
    pairs = [_chunk_tokens(c, chat) for c in choices]
    for text, tokens in pairs:
        assert text == "".join(tokens), pairs
    assert [t for _, tokens in pairs for t in tokens] == ["a", "x#", "#y", "b#", "c"], pairs
    assert "".join(text for text, _ in pairs) == "ax##yb#c"
    assert choices[-1]["finish_reason"] == "stop"


@pytest.mark.parametrize("n", ["2", 1.5, False, [2]])
def test_an_n_that_is_no_whole_number_is_refused(sim_ignore_stop: ProcessServer, n: object) -> None:
    harness = ProxyHarness(
        routed_snapshot(sim_ignore_stop.url, {"chat": {"policy": policy(stop=("###",))}})
    )
    try:
        r = httpx.post(
            harness.url + "/v1/chat/completions",
            json={"model": "chat", "messages": MSG, "stream": True, "n": n},
            timeout=10,
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "n" and error["code"] == "invalid_type"
        assert "expected an integer" in error["message"]
    finally:
        harness.close()


# -- timeouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timeouts", "sim_opts", "code", "limit"),
    [
        (StreamTimeouts(first_token=0.3), {"slow_first_byte_ms": 3000}, "first_token_timeout", 0.3),
        (StreamTimeouts(first_token=0.3), {"ttft_ms": 3000}, "first_token_timeout", 0.3),
        (
            StreamTimeouts(inter_token=0.25),
            {"stall_after": 3, "keepalive_comments_ms": 50},
            "inter_token_timeout",
            None,
        ),
        (StreamTimeouts(total=0.6), {"itl_ms": 50}, "total_timeout", 0.6),
    ],
)
def test_timeouts_fire_on_time_with_error_event_and_abort(
    sim: ProcessServer,
    sim_client: SimClient,
    timeouts: StreamTimeouts,
    sim_opts: dict,
    code: str,
    limit: float | None,
) -> None:
    harness = ProxyHarness(
        routed_snapshot(sim.url, {"chat": {"policy": policy(timeouts=timeouts)}})
    )
    try:
        body = {
            "model": "chat",
            "messages": MSG,
            "stream": True,
            "max_tokens": 200,
            "sim": sim_opts,
        }
        start = time.monotonic()
        result = stream_request(harness.url, body)
        elapsed = time.monotonic() - start
        data = result.data()
        assert data[-1] == "[DONE]"
        assert data[-2]["error"]["code"] == code
        assert data[-2]["error"]["type"] == "timeout"
        if limit is not None:
            # timeout + 100 ms, plus the client's overhead on a loaded 2-core machine
            assert limit <= elapsed < limit + 0.1 + 0.4
        else:
            times = result.content_times()
            assert len(times) == 3  # keep-alive comments did not reset the inter-token timer
            last_event_at = result.events[-1][0]
            # Client-side times: the last token may reach the client a little later than
            # sluice stamped it, so the gap seen here can be a few ms under 0.25 s.
            assert 0.25 - 0.02 <= last_event_at - times[-1] < 0.25 + 0.1 + 0.1
        sim_client.wait_for(lambda s: s["aborted"] >= 1, timeout=1.0)
        assert harness.open_upstream_connections() == 0
    finally:
        harness.close()


def test_non_stream_total_timeout_is_504(sim: ProcessServer) -> None:
    harness = ProxyHarness(
        routed_snapshot(sim.url, {"chat": {"policy": policy(timeouts=StreamTimeouts(total=0.3))}})
    )
    try:
        r = httpx.post(
            harness.url + "/v1/chat/completions",
            json={"model": "chat", "messages": MSG, "max_tokens": 100, "sim": {"itl_ms": 50}},
            timeout=10,
        )
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "total_timeout"
    finally:
        harness.close()


# -- queues ---------------------------------------------------------------------------------


def _limited(sim_url: str, max_concurrency: int, queue_len: int, max_wait: float) -> Snapshot:
    backend = Backend(
        name="sim",
        urls=(sim_url,),
        max_concurrency=max_concurrency,
        queue=QueueLimits(max_len=queue_len, max_wait=max_wait),
    )
    return routed_snapshot(sim_url, {"chat": {}}, backend=backend)


def test_backend_queue_limit_2_with_10_concurrent(sim: ProcessServer) -> None:
    harness = ProxyHarness(_limited(sim.url, 2, 3, 15.0))
    try:
        barrier = threading.Barrier(10)

        # Each stream lasts ~2 s, far longer than the ten requests take to arrive even on a
        # loaded machine (at 0.4 s, CI once saw early streams end before the last request
        # came, so 7 were served). The third queued one waits ~4 s: within max_wait.
        def one(_: int) -> httpx.Response:
            barrier.wait()
            return httpx.post(
                harness.url + "/v1/chat/completions",
                json={"model": "chat", "messages": MSG, "max_tokens": 20, "sim": {"itl_ms": 100}},
                timeout=30,
            )

        with ThreadPoolExecutor(10) as pool:
            responses = list(pool.map(one, range(10)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) == 5  # 2 served at once + 3 queued
        assert statuses.count(503) == 5
        for r in responses:
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "backend_saturated"
                assert 1 <= int(r.headers["retry-after"]) <= 60
        harness.wait_finished(10)  # permits are released before an exchange is recorded
        assert harness.permits_in_use() == 0
    finally:
        harness.close()


def test_queue_wait_expiry_is_503_and_app_limit_is_429(sim: ProcessServer) -> None:
    import hashlib

    from sluice.proxy.snapshot import App

    key = b"sk-test-app"
    backend = Backend(
        name="sim", urls=(sim.url,), max_concurrency=1, queue=QueueLimits(max_len=10, max_wait=0.2)
    )
    app = App(
        name="a",
        key_hashes=frozenset({hashlib.sha256(key).digest()}),
        routes=None,
        max_concurrency=1,
        queue=QueueLimits(max_len=0, max_wait=1),
    )
    snap = routed_snapshot(
        sim.url,
        {"chat": {}},
        backend=backend,
        apps=(app,),
        apps_by_key={hashlib.sha256(key).digest(): app},
    )
    harness = ProxyHarness(snap)
    try:
        auth = {"authorization": "Bearer sk-test-app"}
        slow = {"model": "chat", "messages": MSG, "max_tokens": 40, "sim": {"itl_ms": 25}}

        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(
                httpx.post,
                harness.url + "/v1/chat/completions",
                json=slow,
                headers=auth,
                timeout=10,
            )
            time.sleep(0.2)
            second = httpx.post(
                harness.url + "/v1/chat/completions", json=slow, headers=auth, timeout=10
            )
            assert second.status_code == 429
            assert second.json()["error"]["code"] == "app_concurrency_limit"
            assert int(second.headers["retry-after"]) >= 1
            assert first.result().status_code == 200
        # Backend queue wait expiry: occupy the single backend permit without the app.
        snap2 = routed_snapshot(sim.url, {"chat": {}}, backend=backend)
        harness.swap(snap2)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(
                httpx.post, harness.url + "/v1/chat/completions", json=slow, timeout=10
            )
            time.sleep(0.2)
            start = time.monotonic()
            second = httpx.post(harness.url + "/v1/chat/completions", json=slow, timeout=10)
            waited = time.monotonic() - start
            assert second.status_code == 503
            assert 0.15 < waited < 1.0
            assert first.result().status_code == 200
        harness.wait_finished(4)
        assert harness.permits_in_use() == 0
    finally:
        harness.close()


def test_queued_request_whose_client_leaves_frees_its_place(sim: ProcessServer) -> None:
    harness = ProxyHarness(_limited(sim.url, 1, 1, 10.0))
    try:
        body = {"model": "chat", "messages": MSG, "max_tokens": 30, "sim": {"itl_ms": 20}}
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(
                httpx.post, harness.url + "/v1/chat/completions", json=body, timeout=10
            )
            time.sleep(0.15)
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(
                    harness.url + "/v1/chat/completions", json=body, timeout=0.2
                )  # queued, then gone
            time.sleep(0.1)
            # Its queue slot is free again: another request can queue (queue length 1).
            third = pool.submit(
                httpx.post, harness.url + "/v1/chat/completions", json=body, timeout=10
            )
            assert first.result().status_code == 200
            assert third.result().status_code == 200
        harness.wait_finished(3)
        assert harness.permits_in_use() == 0
    finally:
        harness.close()


# -- leaks -------------------------------------------------------------------------------------


def test_no_leaks_after_mixed_chaos(sim_ignore_stop: ProcessServer) -> None:
    rng = random.Random(7)
    pol = StreamPolicy(
        name="p",
        stop=("###",),
        timeouts=StreamTimeouts(inter_token=0.3, total=3.0),
        guard=GuardSpec(stop=("###",)),
    )
    backend = Backend(
        name="sim",
        urls=(sim_ignore_stop.url,),
        max_concurrency=16,
        queue=QueueLimits(max_len=64, max_wait=5),
    )
    harness = ProxyHarness(
        routed_snapshot(sim_ignore_stop.url, {"chat": {"policy": pol}}, backend=backend)
    )
    try:

        def one(i: int) -> str:
            kind = rng.choice(["ok", "disconnect", "stall", "close", "cut", "nonstream"])
            sim: dict[str, object] = {"itl_ms": 5}
            stop_after = None
            if kind == "disconnect":
                stop_after = 3
            elif kind == "stall":
                sim["stall_after"] = 2
            elif kind == "close":
                sim["close_after"] = 2
            elif kind == "cut":
                sim["script"] = ["a", "b", "#", "##", "c"] + ["d"] * 20
            body = {
                "model": "chat",
                "messages": MSG,
                "max_tokens": 20,
                "stream": kind != "nonstream",
                "sim": sim,
            }
            if kind == "nonstream":
                r = httpx.post(harness.url + "/v1/chat/completions", json=body, timeout=10)
                assert r.status_code == 200
            else:
                stream_request(harness.url, body, stop_after_events=stop_after)
            return kind

        with ThreadPoolExecutor(16) as pool:
            kinds = list(pool.map(one, range(300)))
        assert len(kinds) == 300
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and (
            harness.permits_in_use() or harness.busy_upstream_connections()
        ):
            time.sleep(0.05)
        assert harness.permits_in_use() == 0
        assert harness.busy_upstream_connections() == 0

        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and harness.lt.call(lambda: len(harness.app.watchdogs)):
            time.sleep(0.05)
        assert harness.lt.run(_count_tasks(harness)) == 0
    finally:
        harness.close()


async def _count_tasks(harness: ProxyHarness) -> int:
    import asyncio

    current = asyncio.current_task()
    return len([t for t in asyncio.all_tasks() if t is not current and not t.done()])


def test_shutdown_interrupt_ends_streams_and_sends_queued_requests_away(sim: ProcessServer) -> None:
    harness = ProxyHarness(_limited(sim.url, 1, 4, 30.0))
    try:
        long_body = {
            "model": "chat",
            "messages": MSG,
            "stream": True,
            "max_tokens": 400,
            "sim": {"itl_ms": 20},
        }
        with ThreadPoolExecutor(2) as pool:
            streaming = pool.submit(stream_request, harness.url, long_body)
            time.sleep(0.3)
            queued = pool.submit(
                httpx.post,
                harness.url + "/v1/chat/completions",
                json={"model": "chat", "messages": MSG},
                timeout=10,
            )
            time.sleep(0.3)
            assert harness.lt.call(lambda: harness.app.interrupt_all("shutdown")) == 2
            result = streaming.result(timeout=10)
            rejected = queued.result(timeout=10)
        assert result.data()[-2]["error"]["code"] == "shutdown"
        assert result.data()[-1] == "[DONE]"
        assert rejected.status_code == 503
        assert rejected.json()["error"]["code"] == "shutdown"
        assert rejected.headers["retry-after"] == "1"
        harness.wait_finished(2)
        assert harness.permits_in_use() == 0
    finally:
        harness.close()
