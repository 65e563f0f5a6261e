"""Keep-alives measured through real nginx with a short idle timeout (proxy_read_timeout
1 s, standing in for Cloudflare's 100 s or a corporate proxy's 30-60 s): a stream that
waits longer than that (queued for a permit, or for a slow first token) is cut by nginx
without keep-alives and arrives whole with them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sluice.proxy.snapshot import Backend, QueueLimits, StreamPolicy

from tests.edge.fixtures import Nginx
from tests.fixtures import ProcessServer, ProxyHarness, free_port, routed_snapshot
from tests.streams.fixtures import RawStream, raw_stream

pytestmark = pytest.mark.edge

IDLE_TIMEOUT_S = 1


def nginx_in_front(tmp: Path, sluice_port: int) -> Nginx:
    port = free_port()
    (tmp / "sluice.conf").write_text(
        f"""
upstream sluice {{ server 127.0.0.1:{sluice_port}; keepalive 8; }}
server {{
    listen 127.0.0.1:{port};
    access_log {tmp / "access.log"};
    location / {{
        proxy_pass http://sluice;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_buffering off;
        proxy_read_timeout {IDLE_TIMEOUT_S}s;
    }}
}}
"""
    )
    return Nginx(tmp, port).start()


def make(sim_url: str, keepalive: float | None) -> ProxyHarness:
    backend = Backend(
        name="sim",
        urls=(sim_url,),
        max_concurrency=1,
        queue=QueueLimits(max_len=4, max_wait=10.0),
    )
    policy = StreamPolicy(name="ka", keepalive_interval=keepalive)
    return ProxyHarness(routed_snapshot(sim_url, {"chat": {"policy": policy}}, backend=backend))


def chat(**extra: Any) -> dict[str, Any]:
    return {
        "model": "chat",
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "max_tokens": 8,
        **extra,
    }


@pytest.fixture(params=[None, 0.4], ids=["no-keepalive", "keepalive-0.4s"])
def stack(
    request: pytest.FixtureRequest, sim: ProcessServer, tmp_path: Path
) -> Iterator[tuple[ProxyHarness, Nginx, float | None]]:
    h = make(sim.url, request.param)
    nginx = nginx_in_front(tmp_path, h.port)
    yield h, nginx, request.param
    nginx.stop()
    h.close()


def timed(url: str, body: dict[str, Any]) -> tuple[RawStream, float]:
    start = time.monotonic()
    result = raw_stream(url, "POST", "/v1/chat/completions", body)
    return result, time.monotonic() - start


def test_slow_first_token_behind_nginx(stack: tuple[ProxyHarness, Nginx, float | None]) -> None:
    _, nginx, keepalive = stack
    result, took = timed(nginx.url, chat(sim={"ttft_ms": 2500}))
    print(
        f"\n[slow first token, keepalive={keepalive}] status={result.status} "
        f"complete={result.complete} events={len(result.data_events())} took={took:.2f}s"
    )
    if keepalive is None:
        # The backend's head came at once, then nothing for longer than nginx's idle
        # timeout: nginx cut the stream, the client got a 200 with no event at all.
        assert result.status == 200
        assert not result.complete and not result.data_events()
        assert took < 2.4
    else:
        assert result.status == 200 and result.complete
        assert result.data_events()[-1].data == "[DONE]"
        assert sum(e.comment for e in result.events) >= 4


def test_queued_stream_behind_nginx(stack: tuple[ProxyHarness, Nginx, float | None]) -> None:
    h, nginx, keepalive = stack
    busy = threading.Thread(
        target=raw_stream,
        args=(h.url, "POST", "/v1/chat/completions", chat(max_tokens=100, sim={"itl_ms": 25})),
        daemon=True,
    )
    busy.start()
    time.sleep(0.3)  # the only permit is taken for ~2.5 s
    result, took = timed(nginx.url, chat())
    print(f"\n[queued ~2.2 s, keepalive={keepalive}] status={result.status} took={took:.2f}s")
    if keepalive is None:
        assert result.status == 504  # nginx's own answer: sluice had sent nothing yet
        assert took < 2.0
    else:
        assert result.status == 200 and result.complete
        assert result.data_events()[-1].data == "[DONE]"
    busy.join(10)
