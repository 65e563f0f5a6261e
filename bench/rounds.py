"""One bounded load against several running relays, in interleaved rounds.

The benchmark scripts beside this file compare two `sluice serve` processes (metrics on and
off, local and Redis limits, two builds). Each target gets one unmeasured warm-up (one
request per connection, `WARMUP_TOKENS` tokens: it opens the relay's upstream pool), then
every round runs the same load against each target, the order reversed every other round,
and records the relay process's CPU (/proc, as `sluice bench --compare` counts it), TTFT
and tok/s. The scripts also share the simulator's start (`start_sim`), the load built from
their common options (`load_spec`) and the line a target's rounds print (`summary`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop
from sluice.control.bench.loadgen import LoadSpec, run_load
from sluice.control.bench.processes import SIM_READY, Child, sluice_argv, tree_cpu_seconds

WARMUP_TOKENS = 8

Round = dict[str, Any]
# Wraps one measurement of one target: (target name, the measurement) -> its result.
Around = Callable[[str, Callable[[], Round]], Round]


def start_sim(
    workdir: Path, children: list[Child], ttft_ms: float = 20.0, itl_ms: float = 10.0
) -> str:
    """Starts the simulator, adds it to `children` (which the script stops), returns its URL."""
    argv = sluice_argv("sim", "--port", "0", "--ttft-ms", f"{ttft_ms:g}", "--itl-ms", f"{itl_ms:g}")
    sim = Child("sim", argv, workdir)
    children.append(sim)
    return sim.wait_line(SIM_READY)


def add_load_options(parser: argparse.ArgumentParser, *, rounds: int) -> None:
    """The options `load_spec` reads, with every script's defaults."""
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=rounds)


def add_backend_options(parser: argparse.ArgumentParser) -> None:
    """A backend given, or the simulator's pace (`start_sim`), and the model to ask for."""
    parser.add_argument("--backend", default=None, help="backend URL (default: a simulator)")
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--itl-ms", type=float, default=10.0)
    parser.add_argument("--model", default="sim-model")


def load_spec(args: argparse.Namespace, url: str) -> LoadSpec:
    """The load of every round from the scripts' shared options (`--concurrency`,
    `--requests`, `--max-tokens`, and `--model` where a script has one); `interleaved`
    points it at each target in turn."""
    return LoadSpec(
        url=url,
        concurrency=args.concurrency,
        requests=args.requests,
        max_tokens=args.max_tokens,
        model=getattr(args, "model", LoadSpec.model),
        timeout=120.0,
    )


def measure(runner: asyncio.Runner, spec: LoadSpec, pid: int) -> Round:
    cpu0 = tree_cpu_seconds(pid)
    result = runner.run(run_load(spec))
    cpu = tree_cpu_seconds(pid) - cpu0
    return {
        "tok_per_s": result.tok_per_s,
        "ttft_p50_ms": result.ttft_p50_ms,
        "ttft_p99_ms": result.ttft_p99_ms,
        "itl_p99_ms": result.itl_p99_ms,
        "cpu_s_per_1k": cpu / result.tokens * 1000 if result.tokens else float("nan"),
        "tokens": result.tokens,
        "errors": result.errors,
    }


def interleaved(
    targets: dict[str, tuple[str, int]],
    spec: LoadSpec,
    rounds: int,
    around: Around | None = None,
) -> dict[str, list[Round]]:
    """`targets`: name -> (URL, pid of the process whose CPU counts). `spec.url` is
    replaced by each target's; `around` may do something before and after each
    measurement (count a store's calls, say)."""
    runs: dict[str, list[Round]] = {name: [] for name in targets}
    names = list(targets)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        for url, _ in targets.values():
            warm = dataclasses.replace(
                spec, url=url, requests=spec.concurrency, max_tokens=WARMUP_TOKENS
            )
            runner.run(run_load(warm))
        for round_no in range(rounds):
            for name in names if round_no % 2 == 0 else names[::-1]:
                url, pid = targets[name]
                one = dataclasses.replace(spec, url=url)

                def run(one: LoadSpec = one, pid: int = pid) -> Round:
                    return measure(runner, one, pid)

                runs[name].append(run() if around is None else around(name, run))
    return runs


def summary(rounds: list[Round]) -> str:
    """One target's rounds in a line: median CPU per token with every round's value, TTFT
    p50, tok/s and the errors."""
    per_token = [r["cpu_s_per_1k"] * 1000 for r in rounds]
    return (
        f"CPU {statistics.median(per_token):.2f} us per token (median; rounds "
        + " ".join(f"{x:.2f}" for x in per_token)
        + f"), TTFT p50 {statistics.median(r['ttft_p50_ms'] for r in rounds):.1f} ms, "
        f"{statistics.median(r['tok_per_s'] for r in rounds):.0f} tok/s, "
        f"errors {sum(r['errors'] for r in rounds)}"
    )
