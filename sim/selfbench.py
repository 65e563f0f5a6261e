"""What the simulator itself costs: CPU seconds per 1000 streamed tokens.

    python -m sluice.sim.selfbench [--streams 256] [--tokens 64] [--itl-ms 10]

Starts `sluice sim` as its own process (so its CPU is its own), opens `--streams`
concurrent chat streams with a lean raw-socket client, checks every stream got all its
tokens, and reads the simulator's CPU time from its /sim/stats (getrusage in the sim
process) before and after. A benchmark of the proxy is only meaningful while this number
is small next to the proxy's own.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import orjson

from .client import fetch

DEFAULT_TIMEOUT = 120.0


@dataclass(frozen=True)
class BenchResult:
    streams: int
    tokens: int
    wall_seconds: float
    sim_cpu_seconds: float
    ttft_p50_ms: float
    itl_p50_ms: float

    @property
    def cpu_ms_per_1000_tokens(self) -> float:
        return 1000.0 * self.sim_cpu_seconds / self.tokens * 1000.0

    def summary(self) -> str:
        return (
            f"{self.streams} streams, {self.tokens} tokens in {self.wall_seconds:.2f} s; "
            f"sim CPU {self.sim_cpu_seconds:.3f} s = {self.cpu_ms_per_1000_tokens:.1f} ms "
            f"per 1000 tokens; client-side TTFT p50 {self.ttft_p50_ms:.1f} ms, "
            f"ITL p50 {self.itl_p50_ms:.1f} ms"
        )


async def _stats(port: int) -> dict[str, Any]:
    response = await fetch("127.0.0.1", port, "GET", "/sim/stats")
    stats = response.json()
    assert isinstance(stats, dict)
    return stats


async def run_load(port: int, streams: int, tokens: int, timeout: float) -> BenchResult:
    """`streams` concurrent chat streams of `tokens` tokens against a running simulator."""
    body = orjson.dumps(
        {
            "messages": [{"role": "user", "content": "Benchmark the simulator, please."}],
            "max_tokens": tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    before = await _stats(port)
    start = time.monotonic()
    async with asyncio.timeout(timeout):
        responses = await asyncio.gather(
            *(
                fetch("127.0.0.1", port, "POST", "/v1/chat/completions", body)
                for _ in range(streams)
            )
        )
    wall = time.monotonic() - start
    after = await _stats(port)

    ttfts: list[float] = []
    itls: list[float] = []
    for response in responses:
        events = response.json_events()
        usage = events[-1].get("usage") if events else None
        if not (response.complete and isinstance(usage, dict)):
            raise RuntimeError(f"a stream did not finish: {response.raw[-300:]!r}")
        if usage["completion_tokens"] != tokens:
            raise RuntimeError(f"a stream got {usage['completion_tokens']} tokens, not {tokens}")
        ttfts.append(response.times[0])
        token_times = response.times[1 : tokens + 1]
        itls.extend(b - a for a, b in itertools.pairwise(token_times))
    return BenchResult(
        streams=streams,
        tokens=int(after["tokens"]) - int(before["tokens"]),
        wall_seconds=wall,
        sim_cpu_seconds=float(after["cpu_seconds"]) - float(before["cpu_seconds"]),
        ttft_p50_ms=1000.0 * statistics.median(ttfts),
        itl_p50_ms=1000.0 * statistics.median(itls) if itls else 0.0,
    )


def start_sim_process(ttft_ms: float, itl_ms: float) -> tuple[subprocess.Popen[str], int]:
    command = [sys.executable, "-m", "sluice.control.cli", "sim", "--port", "0"]
    command += ["--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("sluice sim listening on http://"):
        proc.kill()
        raise RuntimeError(f"sluice sim did not start: {line!r}")
    port = int(line.split()[4].rsplit(":", 1)[1])
    return proc, port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--itl-ms", type=float, default=10.0)
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="per round, s")
    args = parser.parse_args(argv)
    proc, port = start_sim_process(args.ttft_ms, args.itl_ms)
    try:
        # A warm-up round: first connections and imports are not the steady state.
        asyncio.run(run_load(port, min(args.streams, 16), args.tokens, args.timeout))
        results = []
        for _ in range(args.rounds):
            result = asyncio.run(run_load(port, args.streams, args.tokens, args.timeout))
            results.append(result)
            print(result.summary(), flush=True)
        best = min(result.cpu_ms_per_1000_tokens for result in results)
        median = statistics.median(result.cpu_ms_per_1000_tokens for result in results)
        print(f"sim CPU per 1000 tokens: median {median:.1f} ms, best {best:.1f} ms")
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
