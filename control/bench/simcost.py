"""What the simulator itself costs: CPU milliseconds per 1000 streamed tokens.

    python -m sluice.control.bench.simcost [--streams 256] [--tokens 64] [--itl-ms 10]

Starts `sluice sim` as its own process (so its CPU is its own), runs `--streams`
concurrent chat streams through `sluice bench`'s load generator, checks every stream got
all its tokens, and reads the simulator's CPU time from /proc before and after. A
benchmark of the proxy is only meaningful while this number is small next to the proxy's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import uvloop

from .loadgen import LoadSpec, run_load
from .processes import SIM_READY, Child, sluice_argv, tree_cpu_seconds

DEFAULT_TIMEOUT = 120.0


@dataclass(frozen=True)
class SimCost:
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


def start_sim(workdir: Path, ttft_ms: float, itl_ms: float) -> tuple[Child, str]:
    """`sluice sim` on a free loopback port; returns the child and its URL."""
    argv = sluice_argv("sim", "--port", "0", "--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms))
    sim = Child("sim", argv, workdir)
    try:
        return sim, sim.wait_line(SIM_READY)
    except BaseException:
        sim.stop()
        raise


async def measure(sim: Child, url: str, streams: int, tokens: int, timeout: float) -> SimCost:
    """`streams` concurrent chat streams of `tokens` tokens against a running simulator;
    raises RuntimeError when a stream failed or came up short."""
    spec = LoadSpec(
        url=url, concurrency=streams, requests=streams, max_tokens=tokens, timeout=timeout
    )
    cpu_before = tree_cpu_seconds(sim.pid)
    result = await run_load(spec)
    cpu = tree_cpu_seconds(sim.pid) - cpu_before
    if result.errors:
        raise RuntimeError(f"{result.errors} streams failed; first: {result.first_error}")
    if result.tokens != streams * tokens:
        raise RuntimeError(f"{result.tokens} tokens streamed, not {streams} x {tokens}")
    return SimCost(
        streams=streams,
        tokens=result.tokens,
        wall_seconds=result.wall_s,
        sim_cpu_seconds=cpu,
        ttft_p50_ms=result.ttft_p50_ms,
        itl_p50_ms=result.itl_p50_ms,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--itl-ms", type=float, default=10.0)
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="per round, s")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sluice-simcost-") as tmp:
        sim, url = start_sim(Path(tmp), args.ttft_ms, args.itl_ms)
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                # A warm-up round: first connections and imports are not the steady state.
                runner.run(measure(sim, url, min(args.streams, 16), args.tokens, args.timeout))
                results = []
                for _ in range(args.rounds):
                    result = runner.run(measure(sim, url, args.streams, args.tokens, args.timeout))
                    results.append(result)
                    print(result.summary(), flush=True)
        finally:
            sim.stop()
    costs = [result.cpu_ms_per_1000_tokens for result in results]
    median = statistics.median(costs)
    print(f"sim CPU per 1000 tokens: median {median:.1f} ms, best {min(costs):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
