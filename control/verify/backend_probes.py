"""Probes of the backend's own behaviour that sluice depends on: a client's disconnect
aborts the generation (seen in the backend's `/metrics`), the backend's idle keep-alive
timeout against sluice's pool expiry, and sluice's added TTFT and CPU under a short load."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import socket
import statistics
import threading
import time
from urllib.parse import urlsplit

import orjson
import uvloop
from sluice.control.bench.loadgen import LoadResult, LoadSpec, run_load

from .client import MESSAGES, ProbeClient
from .harness import InProcessSluice
from .report import Check

RUNNING = re.compile(rb"^vllm:num_requests_running(?:\{[^}]*\})? ([0-9.eE+-]+)", re.M)
ABORT_TOKENS = 400
ABORT_WITHIN_S = 5.0


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def running_requests(client: ProbeClient, backend: str) -> float | None:
    """vllm:num_requests_running summed over its label sets; None when not exported."""
    answer = client.get(backend + "/metrics")
    values = RUNNING.findall(answer.body) if answer.status == 200 else []
    return sum(float(v) for v in values) if values else None


def disconnect_abort(client: ProbeClient, backend: str, sluice: str, model: str) -> Check:
    """A stream through sluice whose client closes after three events: the backend's
    running-requests gauge must fall back to 0 (sluice closed its upstream stream)."""
    check = Check("disconnect_aborts_backend")
    before = _wait_idle(client, backend)
    if before is None:
        check.problems.append("the backend's /metrics has no vllm:num_requests_running gauge")
        return check
    if before > 0:
        check.problems.append(f"the backend stayed busy ({before:g} running) before the probe")
        return check
    body = orjson.dumps({"model": model, "messages": MESSAGES, "stream": True,
                         "max_tokens": ABORT_TOKENS, "ignore_eos": True})  # fmt: skip
    host, port = _address(sluice)
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (host.encode(), len(body), body))  # fmt: skip
        got = b""
        while got.count(b"data: ") < 3:
            piece = sock.recv(65536)
            if not piece:
                check.problems.append(f"sluice closed the stream early: {got[:200]!r}")
                return check
            got += piece
        during = running_requests(client, backend) or 0.0
    closed = time.perf_counter()
    after = during
    while time.perf_counter() - closed < ABORT_WITHIN_S:
        after = running_requests(client, backend) or 0.0
        if after == 0:
            break
        time.sleep(0.02)
    elapsed_ms = (time.perf_counter() - closed) * 1000
    check.data = {"running_while_open": during, "running_after": after,
                  "back_to_zero_ms": round(elapsed_ms, 1)}  # fmt: skip
    if during < 1:
        check.problems.append("vllm:num_requests_running did not count the open stream")
    if after > 0:
        check.problems.append(f"still {after:g} running {ABORT_WITHIN_S:g} s after the close")
    else:
        check.detail = f"running {during:g} while open, 0 in {elapsed_ms:.0f} ms after the close"
    return check


def _wait_idle(client: ProbeClient, backend: str, within: float = 5.0) -> float | None:
    deadline = time.monotonic() + within
    while True:
        value = running_requests(client, backend)
        if value is None or value == 0 or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


class KeepAliveProbe:
    """Measures, on a thread, how long the backend keeps an idle keep-alive connection:
    one request on a fresh connection, then the time until the backend closes it, up to
    `window` seconds (then: "longer than the window")."""

    def __init__(self, backend: str, window: float) -> None:
        self.backend = backend
        self.window = window
        self.closed_after: float | None = None
        self.error = ""
        self.thread = threading.Thread(target=self._measure, daemon=True)
        self.thread.start()

    def _measure(self) -> None:
        host, port = _address(self.backend)
        try:
            with socket.create_connection((host, port), timeout=10) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
                head = b""
                while b"\r\n\r\n" not in head:
                    piece = sock.recv(4096)
                    if not piece:
                        self.error = "the backend closed the connection before answering"
                        return
                    head += piece
                idle_from = time.monotonic()
                match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if match is None or b"connection: close" in head.lower():
                    self.error = "the backend's /health answer does not keep the connection"
                    return
                sock.settimeout(self.window)
                try:
                    while sock.recv(4096):  # the rest of the body, then EOF at the close
                        idle_from = time.monotonic()
                except TimeoutError:
                    return
                except OSError:  # a reset is a close too
                    pass
                self.closed_after = time.monotonic() - idle_from
        except OSError as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def result(self, expiry: float | None) -> Check:
        self.thread.join(self.window + 15)
        check = Check("keepalive_vs_pool_expiry")
        check.data = {"backend_idle_close_s": self.closed_after, "window_s": self.window,
                      "sluice_pool_idle_expiry_s": expiry}  # fmt: skip
        ours = "no expiry" if expiry is None else f"{expiry:g} s"
        if self.error:
            check.problems.append(self.error)
            return check
        if self.closed_after is None:
            check.detail = (f"the backend kept an idle connection over the {self.window:g} s "
                            f"window; sluice pool expiry: {ours}")  # fmt: skip
            return check
        theirs = f"{self.closed_after:.2f} s"
        check.detail = f"the backend closes idle connections after {theirs}; sluice: {ours}"
        if expiry is None:
            check.warnings.append(
                "sluice has no pool idle expiry: a request may take a connection the backend "
                "is closing (sluice retries such a request once on a fresh connection)"
            )
        elif expiry >= self.closed_after:
            check.problems.append(
                f"sluice keeps idle upstream connections {ours}, longer than the backend's "
                f"{theirs}: requests race the backend's close; set the backend's idle expiry "
                "below it"
            )
        return check


@dataclasses.dataclass(frozen=True)
class LoadPlan:
    concurrency: int = 16
    requests: int = 64
    max_tokens: int = 32
    rounds: int = 2

    @property
    def total_requests(self) -> int:
        """Every load request: a warm-up of `concurrency` to each target, then the rounds."""
        return 2 * (self.concurrency + self.requests * self.rounds)


def overhead(backend: str, proxy: InProcessSluice, model: str, plan: LoadPlan) -> Check:
    """Interleaved rounds of the same bounded load, direct and through sluice (order
    alternating): sluice's added TTFT (median of the rounds' p50s) and the serving thread's
    CPU per token relayed."""
    check = Check("overhead")
    spec = LoadSpec(url=backend, concurrency=plan.concurrency, requests=plan.requests,
                    max_tokens=plan.max_tokens, model=model, timeout=120.0)  # fmt: skip
    runs: dict[str, list[LoadResult]] = {"direct": [], "sluice": []}
    cpu = 0.0
    # Not measured: opens sluice's upstream pool and warms both paths (on the H200 run the
    # first, cold round made direct look 1.8x slower than sluice).
    warm = dataclasses.replace(spec, requests=plan.concurrency, max_tokens=4)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        for url in (backend, proxy.url):
            runner.run(run_load(dataclasses.replace(warm, url=url)))
        for round_no in range(plan.rounds):
            order = ["direct", "sluice"] if round_no % 2 == 0 else ["sluice", "direct"]
            for target in order:
                url = backend if target == "direct" else proxy.url
                before = proxy.cpu_seconds()
                runs[target].append(runner.run(run_load(dataclasses.replace(spec, url=url))))
                if target == "sluice":
                    cpu += proxy.cpu_seconds() - before
    failed = {t: sum(r.errors for r in rs) for t, rs in runs.items()}
    for target, errors in failed.items():
        if errors:
            first = next(r.first_error for r in runs[target] if r.errors)
            check.problems.append(f"{target}: {errors} of the load's requests failed ({first})")
    tokens = sum(r.tokens for r in runs["sluice"])
    med = {t: statistics.median(r.ttft_p50_ms for r in rs) for t, rs in runs.items()}
    tps = {t: statistics.median(r.tok_per_s for r in rs) for t, rs in runs.items()}
    us_per_token = cpu / tokens * 1e6 if tokens else float("nan")
    check.data = {
        "plan": dataclasses.asdict(plan),
        "ttft_p50_ms": med,
        "ttft_added_ms": med["sluice"] - med["direct"],
        "tok_per_s": tps,
        "sluice_cpu_us_per_token": us_per_token,
        "sluice_tokens": tokens,
    }
    check.detail = (
        f"TTFT p50 {med['direct']:.1f} ms direct, {med['sluice']:.1f} ms through sluice "
        f"({med['sluice'] - med['direct']:+.1f} ms); sluice CPU {us_per_token:.1f} us/token; "
        f"tok/s {tps['direct']:.0f} direct, {tps['sluice']:.0f} sluice "
        f"({plan.rounds} rounds of {plan.requests} streams x {plan.max_tokens} tokens, "
        f"{plan.concurrency} at a time)"
    )
    return check
