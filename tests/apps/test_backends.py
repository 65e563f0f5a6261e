"""A backend of several replicas: least-outstanding balancing, retry on another replica only
before the first byte, passive ejection, and the active health probes (proxy/health.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sluice.control.config.build import BuiltConfig
from sluice.proxy.backends import Replica
from sluice.proxy.deadlines import Deadlines
from sluice.proxy.health import UNHEALTHY_AFTER, HealthProber, probe
from sluice.proxy.snapshot import HealthCheck, StreamTimeouts
from sluice.proxy.timeouts import FIRST_TOKEN, RESPONSE_HEAD, SHUTDOWN, TOTAL, StreamWatchdog
from sluice.proxy.upstream_pool import Origin

from tests.apps.fixtures import SUPPORT_KEY, AppsProxy, build, chat, digest, write_config
from tests.fixtures import ProcessServer, SimClient, free_port, stream_request

GATEWAY = """\
kind: Gateway
backends:
  - name: pool
    urls: [{urls}]
    {health}
routes:
  - {{model: chat, backend: pool, upstream_model: sim-model}}
apps:
  - {{name: support, keys: ["{key}"]}}
records: {{path: null}}
"""
HEALTH = "health: {path: /health, interval: 200ms, timeout: 150ms}"
Pair = tuple[ProcessServer, ProcessServer]


def config(
    tmp_path: Path,
    urls: list[str],
    *,
    health: bool = False,
    name: str = "presets",
    strategy: str | None = None,
    extra: str = "",
) -> BuiltConfig:
    backend = [HEALTH] if health else []
    if strategy is not None:
        backend.append(f"routing: {{strategy: {strategy}}}")
    text = GATEWAY.format(
        urls=", ".join(f'"{u}"' for u in urls),
        health="\n    ".join(backend),
        key=digest(SUPPORT_KEY),
    )
    return build(write_config(tmp_path / name, text + extra))


@contextlib.contextmanager
def hung_replica() -> Iterator[str]:
    """A replica that takes connections and requests (the kernel's backlog) and never
    answers, as a stopped or wedged vLLM does."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.fixture
def clients(sim_pair: Pair) -> Iterator[tuple[SimClient, SimClient]]:
    first, second = SimClient(sim_pair[0].url), SimClient(sim_pair[1].url)
    first.reset()
    second.reset()
    yield first, second
    first.reset()  # /health back to 200 for the next test
    second.reset()


def replica(proxy: AppsProxy, url: str) -> Replica:
    backend = proxy.harness.ref.current.backends["pool"]
    replicas = proxy.harness.app.pools.replicas(backend)
    return dict(zip(backend.urls, replicas, strict=True))[url]


def wait_for(predicate: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not reached")
        time.sleep(0.02)
    return time.monotonic() - start


def requests_to(proxy: AppsProxy, n: int, **body: object) -> list[int]:
    def one(_: int) -> int:
        return chat(client, proxy.url, SUPPORT_KEY, **body).status_code

    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_least_outstanding_requests_spreads_concurrent_streams(
    tmp_path: Path, sim_pair: Pair, clients: tuple[SimClient, SimClient]
) -> None:
    proxy = AppsProxy(config(tmp_path, [sim_pair[0].url, sim_pair[1].url]))
    try:
        assert requests_to(proxy, 10, max_tokens=20) == [200] * 10  # 20 tokens x 5 ms each
    finally:
        proxy.close()
    counts = [c.stats()["requests"] for c in clients]
    assert sum(counts) == 10 and min(counts) >= 4, counts


def test_an_unreachable_replica_is_retried_elsewhere_then_ejected(
    tmp_path: Path, sim_pair: Pair, clients: tuple[SimClient, SimClient]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = AppsProxy(config(tmp_path, [dead, sim_pair[0].url]))
    try:
        with httpx.Client(timeout=10) as client:
            statuses = [
                chat(client, proxy.url, SUPPORT_KEY, max_tokens=2).status_code for _ in range(6)
            ]
        assert statuses == [200] * 6  # none of them saw the dead replica
        gone = replica(proxy, dead)
        assert proxy.harness.lt.call(lambda: gone.ejected_until > time.monotonic())
        assert gone.consecutive_failures == 3  # ejected after 3: later requests skip it
    finally:
        proxy.close()
    assert clients[0].stats()["requests"] == 6


@pytest.mark.parametrize("strategy", ["score", "least_outstanding"])
def test_a_replica_that_never_answers_a_streams_head_is_ejected_after_three_timeouts(
    tmp_path: Path, sim_pair: Pair, clients: tuple[SimClient, SimClient], strategy: str
) -> None:
    timeouts = "timeouts: {response_head: 400ms}\n"
    with hung_replica() as hung:
        proxy = AppsProxy(
            config(tmp_path, [hung, sim_pair[0].url], strategy=strategy, extra=timeouts)
        )
        try:
            stuck = replica(proxy, hung)
            outcomes: list[str] = []
            with httpx.Client(timeout=10) as client:
                # Other prompts each time: the score strategy would keep one prompt on the
                # replica that served it first (prefix affinity), whichever that was.
                for n in range(16):
                    answer = chat(
                        client,
                        proxy.url,
                        SUPPORT_KEY,
                        max_tokens=2,
                        messages=[{"role": "user", "content": f"question {n}"}],
                    )
                    assert answer.status_code == 200  # a stream's error is an SSE event
                    if "response_head_timeout" in answer.text:
                        outcomes.append("timeout")
                        assert stuck.consecutive_failures == outcomes.count("timeout")
                    else:
                        assert answer.text.rstrip().endswith("data: [DONE]"), answer.text
                        assert "error" not in answer.text
                        outcomes.append("served")
                    if outcomes.count("timeout") == 3 and outcomes[-1] == "served":
                        break
            assert outcomes.count("timeout") == 3, outcomes
            assert proxy.harness.lt.call(lambda: stuck.ejected_until > time.monotonic())
            assert stuck.consecutive_failures == 3
            with httpx.Client(timeout=10) as client:
                after = [chat(client, proxy.url, SUPPORT_KEY, max_tokens=2) for _ in range(3)]
            assert all("error" not in a.text and a.status_code == 200 for a in after)
        finally:
            proxy.close()
    # Every request the hung replica did not hold was served by the live one.
    assert clients[0].stats()["requests"] == outcomes.count("served") + len(after)


def test_a_whole_answer_or_a_client_that_leaves_does_not_count_against_the_replica(
    tmp_path: Path, sim_pair: Pair, clients: tuple[SimClient, SimClient]
) -> None:
    # A whole answer's head comes with its last token: its total limit says nothing of the
    # replica. A client that gives up says nothing of it either.
    timeouts = "timeouts: {first_token: 400ms, response_head: 400ms, total: 400ms}\n"
    with hung_replica() as hung:
        proxy = AppsProxy(
            config(tmp_path, [hung, sim_pair[0].url], strategy="least_outstanding", extra=timeouts)
        )
        try:
            stuck = replica(proxy, hung)
            with httpx.Client(timeout=10) as client:
                for _ in range(3):
                    whole = chat(client, proxy.url, SUPPORT_KEY, max_tokens=2, stream=False)
                    assert whole.status_code == 504
                    assert whole.json()["error"]["code"] == "total_timeout"
            for _ in range(3):
                with httpx.Client(timeout=0.2) as client, pytest.raises(httpx.ReadTimeout):
                    chat(client, proxy.url, SUPPORT_KEY, max_tokens=2)
                wait_for(lambda: stuck.pool.outstanding == 0, timeout=3.0)
            assert stuck.consecutive_failures == 0
            assert stuck.ejected_until == 0.0
        finally:
            proxy.close()
    assert clients[0].stats()["requests"] == 0  # all six went to the hung replica


@pytest.mark.parametrize(
    ("kind", "held_for", "blamed"),
    [
        (RESPONSE_HEAD, 1.0, True),  # held for the whole limit
        (RESPONSE_HEAD, 0.55, True),  # more than half of it
        (RESPONSE_HEAD, 0.45, False),  # queued for most of it: not the replica's doing
        (FIRST_TOKEN, 1.5, True),
        (FIRST_TOKEN, 1.2, False),  # under half of first_token (3 s)
        (TOTAL, 5.0, True),
        (TOTAL, 4.0, False),  # under half of total (10 s)
        (SHUTDOWN, 1.0, False),  # the proxy's doing
    ],
)
def test_the_replica_is_blamed_only_when_it_held_the_request_half_the_limit(
    kind: str, held_for: float, blamed: bool
) -> None:
    async def run() -> tuple[object | None, object | None]:
        timeouts = StreamTimeouts(first_token=3.0, inter_token=None, total=10.0, response_head=1.0)
        watchdog = StreamWatchdog(timeouts, Deadlines(asyncio.get_running_loop()))
        watchdog.sending("first")
        watchdog.sending("second")  # tried in turn: the last one holds the request
        watchdog.sent_at -= held_for
        watchdog.expired = kind
        hung = watchdog.hung_backend()
        watchdog.head()
        after_head = watchdog.hung_backend()
        watchdog.stop()
        return hung, after_head

    hung, after_head = asyncio.run(run())
    assert hung == ("second" if blamed else None)
    assert after_head is None  # a head came: whatever expired later is not a hang


def test_two_dead_replicas_of_three_never_fail_a_request(
    tmp_path: Path, sim_pair: Pair, clients: tuple[SimClient, SimClient]
) -> None:
    # A request tried two replicas at most: one that picked both dead ones got a 502 while
    # the third served, again each time their 10 s ejection ended. Each replica is tried
    # once at most now, the ejected ones last.
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    proxy = AppsProxy(config(tmp_path, [*dead, sim_pair[0].url]))
    try:
        assert requests_to(proxy, 12, max_tokens=2) == [200] * 12
        for url in dead:  # as when their ejection ends: both are picked again first
            gone = replica(proxy, url)
            proxy.harness.lt.call(lambda gone=gone: setattr(gone, "ejected_until", 0.0))
        assert requests_to(proxy, 12, max_tokens=2) == [200] * 12
        assert requests_to(proxy, 4, max_tokens=2, stream=True) == [200] * 4
    finally:
        proxy.close()
    assert clients[0].stats()["requests"] == 28


def test_no_retry_once_a_byte_reached_the_client(
    tmp_path: Path, sim_pair: Pair, clients: tuple[SimClient, SimClient]
) -> None:
    proxy = AppsProxy(config(tmp_path, [sim_pair[0].url, sim_pair[1].url]))
    try:
        result = stream_request(
            proxy.url,
            {
                "model": "chat",
                "stream": True,
                "max_tokens": 10,
                "messages": [{"role": "user", "content": "x"}],
                "sim": {"close_after": 3},
            },
            headers={"Authorization": f"Bearer {SUPPORT_KEY}"},
        )
    finally:
        proxy.close()
    assert result.status == 200
    data = result.data()
    assert data[-1] == "[DONE]" and "error" in data[-2]  # the terminal error event
    assert len(result.content_times()) == 3
    assert sum(c.stats()["requests"] for c in clients) == 1  # not sent again


def test_probe_reports_why_a_replica_fails(sim_pair: Pair) -> None:
    check = HealthCheck(path="/health", interval=1.0, timeout=0.5)

    async def run() -> list[str | None]:
        return [
            await probe(Origin(sim_pair[0].url), check),
            await probe(Origin(f"http://127.0.0.1:{free_port()}"), check),
            await probe(
                Origin(sim_pair[0].url), HealthCheck(path="/nope", interval=1, timeout=0.5)
            ),
        ]

    ok, refused, missing = asyncio.run(run())
    assert ok is None
    assert refused is not None and "ConnectionRefused" in refused
    assert missing == "HTTP 404"


def test_probe_times_out() -> None:
    with socket.socket() as server:  # accepts (backlog) but never answers
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        origin = Origin(f"http://127.0.0.1:{server.getsockname()[1]}")
        started = time.monotonic()
        reason = asyncio.run(probe(origin, HealthCheck(path="/health", interval=1, timeout=0.2)))
        assert reason == "no answer within 0.2s"
        assert time.monotonic() - started < 1.0


def test_a_replica_failing_its_health_check_gets_no_traffic_until_it_recovers(
    tmp_path: Path, sim_pair: Pair, clients: tuple[SimClient, SimClient]
) -> None:
    a, b = sim_pair
    proxy = AppsProxy(config(tmp_path, [a.url, b.url], health=True), health=True)
    try:
        sick = replica(proxy, b.url)
        assert sick.healthy
        httpx.post(b.url + "/sim/health", json={"status": 503}, timeout=5)
        # UNHEALTHY_AFTER failed probes 200 ms apart.
        took = wait_for(lambda: not sick.healthy, timeout=3.0)
        assert took >= (UNHEALTHY_AFTER - 1) * 0.2 * 0.8
        assert requests_to(proxy, 10, max_tokens=20) == [200] * 10
        assert [c.stats()["requests"] for c in clients] == [10, 0]
        prober = proxy.health
        assert isinstance(prober, HealthProber)
        assert prober.metrics.healthy.labels("pool", b.url)._value.get() == 0
        assert prober.metrics.healthy.labels("pool", a.url)._value.get() == 1
        httpx.post(b.url + "/sim/health", json={"status": 200}, timeout=5)
        wait_for(lambda: sick.healthy, timeout=2.0)
        assert requests_to(proxy, 10, max_tokens=20) == [200] * 10
        assert clients[1].stats()["requests"] >= 4
    finally:
        proxy.close()


def test_probes_follow_a_reload(
    tmp_path: Path, sim_pair: Pair, clients: tuple[SimClient, SimClient]
) -> None:
    a, b = sim_pair
    proxy = AppsProxy(config(tmp_path, [a.url, b.url], health=True), health=True)
    try:
        sick = replica(proxy, b.url)
        httpx.post(b.url + "/sim/health", json={"status": 500}, timeout=5)
        wait_for(lambda: not sick.healthy, timeout=3.0)
        # The reload drops the health check: the replica counts as healthy again.
        proxy.swap(config(tmp_path, [a.url, b.url], health=False, name="no-health"))
        wait_for(lambda: sick.healthy, timeout=3.0)
        # And back: probed again, found failing again.
        proxy.swap(config(tmp_path, [a.url, b.url], health=True, name="health-again"))
        wait_for(lambda: not sick.healthy, timeout=3.0)
    finally:
        proxy.close()
