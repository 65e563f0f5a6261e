"""What the simulator counts: `/sim/stats`, `/sim/requests` and vLLM-named `/metrics`.

Proxy tests read these to prove what reached the backend: that a client's disconnect
closed the upstream stream (`aborted`, within the tick of the close), and the exact JSON
the proxy forwarded (`/sim/requests`).
"""

from __future__ import annotations

import collections
import resource
import time

from sluice.proxy.http import Request

# vLLM pre-declares these label values; 0.26 does not count client aborts under "abort"
# (transcript 07), and neither do we.
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Stats:
    """Counters of one simulator. `active` and `waiting` are live gauges; the rest count up
    until `reset()`."""

    def __init__(self, log_size: int) -> None:
        self.active = 0  # generation requests in flight (waiting, generating or stalled)
        self.waiting = 0  # of which in their sim.slow_first_byte_ms delay
        self._log: collections.deque[dict[str, object]] = collections.deque(maxlen=log_size)
        self.started = time.monotonic()
        self.reset()

    def reset(self) -> None:
        self.requests = 0  # generation requests received, whatever became of them
        self.completed = 0  # answered in full ([DONE] written / body sent)
        self.aborted = 0  # the client went away first
        self.closed = 0  # sim.close_after dropped the connection
        self.stalled = 0  # sim.stall_after stopped the tokens
        self.failed = 0  # sim.error_after sent a mid-stream error
        self.errors = 0  # answered with an error status (validation, sim.status, ...)
        self.tokens = 0  # completion tokens generated (vllm:generation_tokens_total)
        self.prompt_tokens = 0
        # High-water mark of `active` since the reset: what a gateway's limit let through.
        self.max_active = self.active
        self.finished = dict.fromkeys(FINISH_REASONS, 0)
        self._log.clear()

    def record_finish(self, reason: str) -> None:
        self.finished[reason] = self.finished.get(reason, 0) + 1

    def log_request(self, request: Request, body: object, body_text: str | None) -> None:
        headers = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in request.headers.items()
            if name != b"authorization"
        }
        entry: dict[str, object] = {
            "method": request.method,
            "path": request.path,
            "x_request_id": request.header(b"x-request-id"),
            "authorization": b"authorization" in request.headers,
            "headers": headers,
            "body": body,
        }
        if body_text is not None:
            entry["body_text"] = body_text  # only when the body was not valid JSON
        self._log.append(entry)

    def requests_log(self) -> list[dict[str, object]]:
        return list(self._log)

    def snapshot(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "active": self.active,
            "max_active": self.max_active,
            "waiting": self.waiting,
            "completed": self.completed,
            "aborted": self.aborted,
            "closed": self.closed,
            "stalled": self.stalled,
            "failed": self.failed,
            "errors": self.errors,
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "finished": dict(self.finished),
            # Process-wide: in-process tests include their own client here;
            # `loop_cpu_seconds` is the serving thread's alone.
            "cpu_seconds": round(process_cpu_seconds(), 6),
            "loop_cpu_seconds": round(time.thread_time(), 6),
            "uptime_seconds": round(time.monotonic() - self.started, 3),
        }

    def render_metrics(
        self,
        model: str,
        *,
        prefill_waiting: int = 0,
        kv_usage: float = 0.0,
        cache_queries: int = 0,
        cache_hits: int = 0,
    ) -> bytes:
        """Prometheus text with vLLM's metric names and labels. `prefill_waiting`: requests
        queued behind another's prefill (the prefix cache model), counted as waiting."""
        labels = f'engine="0",model_name="{_escape(model)}"'
        waiting = min(self.active, self.waiting + prefill_waiting)
        running = self.active - waiting
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{labels}}} {float(running)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{labels}}} {float(waiting)}",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{labels}}} {float(kv_usage)}",
            "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number "
            "of queried tokens.",
            "# TYPE vllm:prefix_cache_queries_total counter",
            f"vllm:prefix_cache_queries_total{{{labels}}} {float(cache_queries)}",
            "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of "
            "cached tokens.",
            "# TYPE vllm:prefix_cache_hits_total counter",
            f"vllm:prefix_cache_hits_total{{{labels}}} {float(cache_hits)}",
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{labels}}} {float(self.prompt_tokens)}",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{labels}}} {float(self.tokens)}",
            "# HELP vllm:request_success_total Count of successfully processed requests.",
            "# TYPE vllm:request_success_total counter",
        ]
        for reason, count in self.finished.items():
            lines.append(
                f'vllm:request_success_total{{engine="0",finished_reason="{_escape(reason)}",'
                f'model_name="{_escape(model)}"}} {float(count)}'
            )
        return ("\n".join(lines) + "\n").encode()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
