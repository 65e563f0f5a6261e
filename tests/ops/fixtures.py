"""Helpers of the observability and operations tests: a config directory with routes for
every metric family, real `sluice serve` processes, a /metrics parser, streams in threads.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures import ProcessServer, StreamResult, key_line, sluice_cmd, stream_request

ADMIN_TOKEN = "adm-ops-7f3c9a1e55d2"
KEYS = {  # app -> API key; the tests check that no log line ever holds one
    "alpha": "sk-ops-alpha-5b8e0c2d9f41a7",
    "beta": "sk-ops-beta-c13d7a9e2b6f08",
    "solo": "sk-ops-solo-94e2f7c0a1b35d",
}
BOUNDED_S = 10.0  # every wait in these tests is bounded; none should come close


GATEWAY = """\
kind: Gateway
admin: {{token: env:SLUICE_ADMIN_TOKEN}}
backends:
  - {{name: sim, urls: ["{sim_url}"], max_concurrency: 512, queue: {{max: 1024, max_wait: 10s}}}}
routes:
  - {{model: plain, backend: sim, upstream_model: sim-model}}
  - {{model: tuned, backend: sim, upstream_model: sim-model, preset: warm}}
  - {{model: ab, backend: sim, upstream_model: sim-model}}
  - {{model: guarded, backend: sim, upstream_model: sim-model, policy: guard}}
apps:
  - {{name: alpha, keys: ["{alpha}"]}}
  - {{name: beta, keys: ["{beta}"]}}
  - {{name: solo, keys: ["{solo}"], max_concurrency: 1, queue: {{max: 8, max_wait: 10s}}}}
experiments:
  - name: split
    route: ab
    sticky: header:x-user-id
    variants:
      - {{name: a, preset: warm, weight: 1}}
      - {{name: b, preset: cold, weight: 1}}
"""
WARM = "kind: Preset\ngeneration: {temperature: 0.7}\n"
COLD = "kind: Preset\ngeneration: {temperature: 0.1}\n"
GUARD = """\
kind: Policy
stop: ["STOPHERE"]
timeouts: {first_token: 5s, inter_token: 400ms, total: 60s}
"""


def write_config(directory: Path, sim_url: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "gateway.yaml": GATEWAY.format(
            sim_url=sim_url, **{app: key_line(key) for app, key in KEYS.items()}
        ),
        "warm.yaml": WARM,
        "cold.yaml": COLD,
        "guard.yaml": GUARD,
    }
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def start_sluice(config: Path, *args: str, timeout: float = 20.0) -> ProcessServer:
    return ProcessServer(
        sluice_cmd("serve", "--config", str(config), "--host", "127.0.0.1", "--port", "0", *args),
        env={"SLUICE_ADMIN_TOKEN": ADMIN_TOKEN},
        timeout=timeout,
    )


def auth(app: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[app]}"}


ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def chat(model: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "max_tokens": max_tokens,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Say something."}],
    }
    body.update(extra)
    return body


# -- /metrics --------------------------------------------------------------------------

Key = tuple[str, tuple[tuple[str, str], ...]]


class Scrape:
    """One /metrics answer: sample name + labels -> value."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[Key, float] = {}
        self.families: set[str] = set()
        for family in text_string_to_metric_families(text):
            self.families.add(family.name)
            for s in family.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def get(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels (0 when absent: a counter never touched)."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum over every sample of `name` whose labels include these."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= set(ls))

    def minus(self, before: Scrape) -> Scrape:
        """Counters and histograms since `before` (gauges are meaningless here)."""
        delta = Scrape("")
        for key, value in self.samples.items():
            delta.samples[key] = value - before.samples.get(key, 0.0)
        return delta


def scrape(url: str) -> Scrape:
    resp = httpx.get(url + "/metrics", timeout=5)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return Scrape(resp.text)


def wait_until(
    what: str, check: Callable[[], bool], timeout: float = BOUNDED_S, step: float = 0.05
) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)
    return time.monotonic() - start


# -- streams in threads ----------------------------------------------------------------


class Streams:
    """Streams started in threads; `results()` waits for them all (bounded)."""

    def __init__(self, workers: int = 32) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.futures: list[Future[StreamResult]] = []

    def start(
        self,
        url: str,
        body: dict[str, Any],
        headers: Mapping[str, str] | None = None,
        **kw: Any,
    ) -> Future[StreamResult]:
        future = self.pool.submit(stream_request, url, body, headers=headers, **kw)
        self.futures.append(future)
        return future

    def results(self, timeout: float = 30.0) -> list[StreamResult]:
        return [f.result(timeout=timeout) for f in self.futures]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def content_events(result: StreamResult) -> int:
    return len(result.content_times())


def usage(result: StreamResult) -> dict[str, int]:
    for obj in result.data():
        if isinstance(obj, dict) and obj.get("usage"):
            return dict(obj["usage"])
    raise AssertionError("the stream carried no usage chunk")


def error_events(result: StreamResult) -> list[dict[str, Any]]:
    return [o["error"] for o in result.data() if isinstance(o, dict) and "error" in o]


def connect_refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True
