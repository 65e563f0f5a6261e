"""A bounded streaming load generator: N concurrent chat streams on raw asyncio protocols
(the project's one raw HTTP/1.1 client, `sluice.sim.client.ResponseProtocol`).

It shares the 2-core machine with the backend and the relay it measures, so it does as
little as it can per byte: httptools parses the HTTP framing, each SSE event is searched
for `"content":"` (or `"text":"`) followed by a non-empty value and otherwise left as bytes,
and each arrival is timed once per `data_received`, when the bytes reached the process,
not when a task got round to them. One future per request; no task hop per chunk.
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson
from sluice.proxy.sse import DONE_EVENT
from sluice.sim.client import ResponseProtocol, request_bytes

CHAT_PATH = "/v1/chat/completions"
PROMPT = "Write a long story about a lighthouse keeper."
# An error response body kept for the report; the rest is dropped.
MAX_ERROR_BODY = 2048
CONNECT_TIMEOUT = 10.0

# A value starting with anything but `"` is a token; re-serialisers may add a space.
_VALUE_KEYS = (b'"content":"', b'"text":"', b'"content": "', b'"text": "')
_USAGE = b'"completion_tokens":'
_DONE = DONE_EVENT.rstrip(b"\n")


@dataclass(frozen=True)
class LoadSpec:
    """What one run sends: `requests` streams, at most `concurrency` in flight, bounded by
    `timeout` seconds of wall-clock time (requests still open then count as errors)."""

    url: str
    concurrency: int = 64
    requests: int = 512
    max_tokens: int = 64
    model: str = "sim-model"
    api_key: str | None = None
    timeout: float = 120.0
    stop: tuple[str, ...] = ()  # sent as `stop`, so every relay's backend does the same work

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"--url must be http://host[:port], got {self.url!r}")
        if self.concurrency < 1 or self.requests < 1 or self.max_tokens < 1:
            raise ValueError("--concurrency, --requests and --max-tokens must be at least 1")
        if self.timeout <= 0:
            raise ValueError("--timeout must be positive")


@dataclass
class Samples:
    """Raw observations of one run, in seconds."""

    ttfts: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    first_error: str = ""

    def fail(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if not self.first_error:
            self.first_error = f"{kind}: {detail}"


@dataclass(frozen=True)
class LoadResult:
    """One run's figures; latencies in milliseconds."""

    requests: int
    ok: int
    errors: int
    error_kinds: dict[str, int]
    first_error: str
    tokens: int
    wall_s: float
    tok_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    client_cpu_s: float


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (1..99), interpolated between closest ranks as numpy's default
    does (`method="inclusive"`); nan when empty."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(spec: LoadSpec, samples: Samples, wall_s: float, cpu_s: float) -> LoadResult:
    errors = sum(samples.errors.values())
    return LoadResult(
        requests=spec.requests,
        ok=samples.ok,
        errors=errors,
        error_kinds=dict(sorted(samples.errors.items())),
        first_error=samples.first_error,
        tokens=samples.tokens,
        wall_s=wall_s,
        tok_per_s=samples.tokens / wall_s if wall_s > 0 else 0.0,
        ttft_p50_ms=percentile(samples.ttfts, 50) * 1000,
        ttft_p99_ms=percentile(samples.ttfts, 99) * 1000,
        itl_p50_ms=percentile(samples.gaps, 50) * 1000,
        itl_p99_ms=percentile(samples.gaps, 99) * 1000,
        client_cpu_s=cpu_s,
    )


class StreamConnection(ResponseProtocol):
    """One keep-alive connection carrying one streaming request at a time."""

    def __init__(self, samples: Samples) -> None:
        super().__init__()
        self.samples = samples
        self.loop = asyncio.get_running_loop()
        self._done: asyncio.Future[None] | None = None
        self._reset_request()

    def _reset_request(self) -> None:
        self.status = 0
        self._sent = 0.0
        self._last = 0.0
        self._gaps: list[float] = []
        self._ttft = -1.0
        self._events = 0
        self._usage = -1
        self._got_done = False
        self._failed = ""
        self._pending = b""
        self._error_body = b""

    # -- protocol and parser callbacks ---------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._done is not None:
            if self.status:
                self._finish("truncated", "connection closed mid-stream")
            else:
                self._finish("reset", "connection closed before the response")

    def on_parse_error(self, detail: str, *, fatal: bool) -> None:
        self._finish("protocol", detail)
        super().on_parse_error(detail, fatal=fatal)

    def on_body(self, body: bytes) -> None:
        if self.status != 200:
            if len(self._error_body) < MAX_ERROR_BODY:
                self._error_body += body[:MAX_ERROR_BODY]
            return
        data = self._pending + body if self._pending else body
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        end = data.rfind(b"\n\n")
        if end < 0:
            self._pending = data
            return
        self._pending = data[end + 2 :]
        for event in data[:end].split(b"\n\n"):
            self._on_event(event)

    def _on_event(self, event: bytes) -> None:
        for key in _VALUE_KEYS:
            pos = event.find(key)
            if pos >= 0:
                pos += len(key)
                break
        if pos >= 0 and event[pos : pos + 1] not in (b'"', b""):
            now = self.now
            if self._events:
                self._gaps.append(now - self._last)
            else:
                self._ttft = now - self._sent
            self._last = now
            self._events += 1
        usage = event.find(_USAGE)
        if usage >= 0:
            digits = event[usage + len(_USAGE) :].lstrip()
            n = 0
            while digits[n : n + 1].isdigit():
                n += 1
            if n:
                self._usage = int(digits[:n])
        elif event.startswith(_DONE):
            self._got_done = True
        elif pos < 0 and (event.startswith(b'data: {"error"') or b'"object":"error"' in event):
            self._failed = event[:200].decode(errors="replace")

    def on_message_complete(self) -> None:
        if self.status != 200:
            body = self._error_body[:200].decode(errors="replace")
            self._finish(f"http_{self.status}", body)
        elif self._failed:
            self._finish("error_event", self._failed)
        elif not self._got_done:
            self._finish("truncated", "stream ended without data: [DONE]")
        else:
            self._finish("", "")

    # -- the request ---------------------------------------------------------------------

    def _finish(self, error: str, detail: str) -> None:
        done = self._done
        if done is None:
            return
        self._done = None
        s = self.samples
        if error:
            s.fail(error, detail)
        else:
            s.ok += 1
            s.tokens += self._usage if self._usage >= 0 else self._events
            if self._ttft >= 0:
                s.ttfts.append(self._ttft)
            s.gaps.extend(self._gaps)
        if not done.done():
            done.set_result(None)

    async def exchange(self, request: bytes) -> None:
        """Sends one request and returns once its response ended (recorded in samples)."""
        assert self.transport is not None
        self._reset_request()
        self._done = self.loop.create_future()
        done = self._done
        self._sent = time.perf_counter()
        self.transport.write(request)
        try:
            await done
        finally:
            if self._done is done:  # cancelled (the run's deadline): counted by the caller
                self._done = None
                self.abort()


def build_request(spec: LoadSpec) -> bytes:
    parts = urlsplit(spec.url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    payload: dict[str, object] = {
        "model": spec.model,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "max_tokens": spec.max_tokens,
        # vLLM: generate exactly max_tokens, so every relay moves the same bytes.
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    if spec.stop:
        payload["stop"] = list(spec.stop)
    headers = {"connection": "keep-alive", "accept": "text/event-stream"}
    if spec.api_key:
        headers["authorization"] = "Bearer " + spec.api_key
    path = parts.path.rstrip("/") + CHAT_PATH
    return request_bytes("POST", host, port, path, orjson.dumps(payload), headers)


# Set on SIGTERM (processes.interruptible): a running load sends no further request, even
# when the run's cancellation was lost in the event loop (a signal landing in a callback).
interrupted = threading.Event()


async def run_load(spec: LoadSpec) -> LoadResult:
    """Runs `spec` to completion or to its deadline; never raises for server failures."""
    loop = asyncio.get_running_loop()
    parts = urlsplit(spec.url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    request = build_request(spec)
    samples = Samples()
    remaining = spec.requests
    in_flight = 0

    async def connect() -> StreamConnection:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            _, conn = await loop.create_connection(lambda: StreamConnection(samples), host, port)
        return conn

    async def worker() -> None:
        nonlocal remaining, in_flight
        conn: StreamConnection | None = None
        try:
            while remaining > 0 and not interrupted.is_set():
                remaining -= 1
                in_flight += 1
                try:
                    if conn is None or conn.closed or not conn.keep_alive:
                        if conn is not None:
                            conn.abort()
                        conn = await connect()
                    await conn.exchange(request)
                except (OSError, TimeoutError) as exc:
                    samples.fail("connect", str(exc) or type(exc).__name__)
                    conn = None
                in_flight -= 1
        finally:
            if conn is not None:
                conn.abort()

    cpu_before = _own_cpu_seconds()
    started = time.perf_counter()
    workers = [asyncio.ensure_future(worker()) for _ in range(min(spec.concurrency, spec.requests))]
    try:
        async with asyncio.timeout(spec.timeout):
            await asyncio.gather(*workers)
    except TimeoutError:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        unfinished = in_flight + remaining
        if unfinished:
            samples.errors["timeout"] += unfinished
            if not samples.first_error:
                samples.first_error = (
                    f"timeout: {unfinished} requests unfinished after {spec.timeout:g}s"
                )
    finally:
        for task in workers:
            task.cancel()
    if interrupted.is_set():
        raise KeyboardInterrupt  # asyncio lets it through: the run ends, unwinding
    wall = time.perf_counter() - started
    return summarize(spec, samples, wall, _own_cpu_seconds() - cpu_before)


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
