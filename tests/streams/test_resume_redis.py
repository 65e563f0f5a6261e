"""Resumable SSE across processes (issue 16 item 1, the Redis part): with `limits.store`
set, a resume that reaches another replica or worker replays the missed events from the
Redis copy and follows the live rest; the generation stays on its process. A real
redis-server, real `sluice serve` processes, a fixed-seed simulator."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures import ProcessServer, SimClient, sluice_cmd
from tests.scale.fixtures import RedisServer
from tests.streams.fixtures import RawStream, raw_stream, text_of

GATEWAY = """kind: Gateway
listen: {{host: 127.0.0.1, port: 8000}}
limits: {{store: "{redis}", store_timeout: 3s}}
backends:
  - {{name: sim, urls: ["{sim}"], max_concurrency: 8}}
routes:
  - {{model: chat, backend: sim, upstream_model: sim-model, policy: resumable}}
"""
POLICY = """kind: Policy
name: resumable
keepalive_interval: 1s
resume_window: 5s
resume_buffer: 262144
"""
BODY = {
    "model": "chat",
    "messages": [{"role": "user", "content": "A long story"}],
    "stream": True,
    "max_tokens": 300,  # 10 ms a token: about 3 s of generation to drop and resume in
    "seed": 11,
}
SHORT = {**BODY, "max_tokens": 60}
REMOTE = "x-sluice-resumed-from"


def write(directory: Path, sim_url: str, redis_url: str, policy: str = POLICY) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "gateway.yaml").write_text(GATEWAY.format(sim=sim_url, redis=redis_url))
    (directory / "policies.yaml").write_text(policy)
    return directory


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    yield server
    server.kill()


def serve(config: Path, *args: str) -> ProcessServer:
    return ProcessServer(
        sluice_cmd("serve", "--config", str(config), "--host", "127.0.0.1", "--port", "0", *args),
        timeout=30,
    )


@pytest.fixture
def replicas(
    sim: ProcessServer, redis: RedisServer, tmp_path: Path
) -> Iterator[list[ProcessServer]]:
    config = write(tmp_path / "config", sim.url, redis.url)
    servers = [serve(config), serve(config)]
    yield servers
    for server in servers:
        server.stop()


def resume(url: str, rid: str, last: str, stop_after: int | None = None) -> RawStream:
    return raw_stream(
        url, "GET", f"/v1/streams/{rid}", None, {"last-event-id": last}, stop_after=stop_after
    )


def ids_contiguous(parts: list[RawStream], rid: str) -> bool:
    ids = [e.id for p in parts for e in p.data_events()]
    return ids == [f"{rid}:{n}" for n in range(len(ids))]


def test_resume_on_another_replica_replays_then_follows_live(
    replicas: list[ProcessServer], sim: ProcessServer
) -> None:
    a, b = replicas
    full = raw_stream(a.url, "POST", "/v1/chat/completions", BODY)
    assert full.complete
    stats = SimClient(sim.url)
    before = stats.stats()
    # Cut on A, then alternate B, A, B: the owner (A) and the other replica (B) each serve
    # parts; the last part runs to the end on B.
    first = raw_stream(a.url, "POST", "/v1/chat/completions", BODY, stop_after=5)
    rid = first.headers["x-request-id"]
    parts = [first]
    running_at_last_resume = False
    for url, cut in ((b.url, 20), (a.url, 25), (b.url, 20), (b.url, None)):
        if cut is None:
            running_at_last_resume = stats.stats()["active"] == 1
        part = resume(url, rid, parts[-1].last_id or "", stop_after=cut)
        assert part.status == 200, part.body
        parts.append(part)
    # The last part attached on B while A still generated: it followed the live rest.
    assert running_at_last_resume
    assert parts[-1].complete
    assert parts[1].headers.get(REMOTE) == "redis"  # served from the copy on B
    assert REMOTE not in parts[2].headers  # back on the owner: its local buffer
    assert text_of([e for p in parts for e in p.data_events()]) == full.text()
    assert ids_contiguous(parts, rid)
    # One generation for the resumed stream, not a new one per reconnect.
    after = stats.stats()
    assert after.get("requests", 0) - before.get("requests", 0) == 1, (before, after)
    # An id nobody runs is 404 on the other replica too.
    other = resume(b.url, "nope-" + rid, "")
    assert other.status == 404


def test_resume_on_another_replica_after_the_end(replicas: list[ProcessServer]) -> None:
    a, b = replicas
    full = raw_stream(a.url, "POST", "/v1/chat/completions", SHORT)
    first = raw_stream(a.url, "POST", "/v1/chat/completions", SHORT, stop_after=3)
    rid = first.headers["x-request-id"]
    rest = resume(b.url, rid, first.last_id or "")
    assert rest.status == 200 and rest.complete and rest.headers.get(REMOTE) == "redis"
    assert text_of(first.data_events() + rest.data_events()) == full.text()


def test_a_client_following_elsewhere_keeps_the_generation_past_the_window(
    sim: ProcessServer, redis: RedisServer, tmp_path: Path
) -> None:
    """Window 0.5 s, generation ~3 s: the client leaves the owner and follows on the other
    replica for longer than the window; the owner must not abort the generation."""
    policy = POLICY.replace("resume_window: 5s", "resume_window: 500ms")
    config = write(tmp_path / "config", sim.url, redis.url, policy)
    a, b = serve(config), serve(config)
    try:
        full = raw_stream(a.url, "POST", "/v1/chat/completions", BODY)
        first = raw_stream(a.url, "POST", "/v1/chat/completions", BODY, stop_after=5)
        rid = first.headers["x-request-id"]
        rest = resume(b.url, rid, first.last_id or "")
        assert rest.status == 200 and rest.complete and rest.headers.get(REMOTE) == "redis"
        assert text_of(first.data_events() + rest.data_events()) == full.text()
        # Nobody back within the window after that: a late resume anywhere is refused.
        time.sleep(2.0)
        assert resume(a.url, rid, first.last_id or "").status in (404, 410)
    finally:
        a.stop()
        b.stop()


def test_without_redis_a_resume_stays_local(
    replicas: list[ProcessServer], redis: RedisServer
) -> None:
    a, b = replicas
    full = raw_stream(a.url, "POST", "/v1/chat/completions", SHORT)
    redis.kill()
    first = raw_stream(a.url, "POST", "/v1/chat/completions", SHORT, stop_after=5)
    rid = first.headers["x-request-id"]
    assert resume(b.url, rid, first.last_id or "").status == 404
    rest = resume(a.url, rid, first.last_id or "")
    assert rest.status == 200 and rest.complete
    assert text_of(first.data_events() + rest.data_events()) == full.text()
    downs = [e for e in a.json_logs() if e.get("event") == "resume_store_down"]
    assert len(downs) == 1, downs


def test_workers_resume_lands_on_the_other_worker(
    sim: ProcessServer, redis: RedisServer, tmp_path: Path
) -> None:
    """`--workers 2`: the kernel spreads connections; reconnect until one lands on the
    worker that does not run the generation (its answer is marked), then read to the end."""
    server = serve(write(tmp_path / "config", sim.url, redis.url), "--workers", "2")
    try:
        full = raw_stream(server.url, "POST", "/v1/chat/completions", BODY)
        first = raw_stream(server.url, "POST", "/v1/chat/completions", BODY, stop_after=3)
        rid = first.headers["x-request-id"]
        parts = [first]
        landings = []
        for _ in range(30):  # each landing is a coin toss: 30 misses are ~1e-9
            part = resume(server.url, rid, parts[-1].last_id or "", stop_after=3)
            assert part.status == 200, part.body
            parts.append(part)
            landings.append(part.headers.get(REMOTE) == "redis")
            if landings[-1]:
                break
        assert any(landings)
        parts.append(resume(server.url, rid, parts[-1].last_id or ""))
        assert parts[-1].status == 200 and parts[-1].complete
        assert text_of([e for p in parts for e in p.data_events()]) == full.text()
        assert ids_contiguous(parts, rid)
    finally:
        server.stop()
