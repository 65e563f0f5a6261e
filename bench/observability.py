"""What metrics and the access log cost: sluice with both on against sluice with both off.

    .venv/bin/python -m bench.observability [--concurrency 256] [--requests 1024]
        [--max-tokens 64] [--rounds 3] [--micro]

Starts the simulator and two `sluice serve --backend <sim>` processes, one as shipped
(metrics, JSON access log to a file) and one with `--no-metrics --no-access-log`, warms both
up, then runs the same bounded load (`sluice bench`'s load generator) against each in
interleaved rounds, the order alternating, and reports the medians: CPU seconds of the
sluice process per 1000 tokens (/proc, as `sluice bench --compare` counts it) and TTFT p50.
The bar (the issue): at most +10% CPU per token and +5 ms TTFT p50 with both on.

`--micro` also times `Observer.on_complete` in-process per request (metrics only, the log
line only, both), for a 64-token stream.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

from sluice.control.bench.processes import (
    SERVE_READY,
    Child,
    sluice_argv,
)

from bench.rounds import add_load_options, interleaved, load_spec, start_sim

GOAL_CPU_RATIO = 1.10
GOAL_TTFT_P50_EXTRA_MS = 5.0


def run_macro(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sluice-obs-bench-") as tmp:
        workdir = Path(tmp)
        children: list[Child] = []
        try:
            backend = start_sim(workdir, children)
            serve = ["serve", "--host", "127.0.0.1", "--port", "0", "--backend", backend]
            on = Child("sluice-on", sluice_argv(*serve), workdir)
            off = Child(
                "sluice-off", sluice_argv(*serve, "--no-metrics", "--no-access-log"), workdir
            )
            children += [on, off]
            targets = {"on": (on.wait_line(SERVE_READY), on.pid),
                       "off": (off.wait_line(SERVE_READY), off.pid)}  # fmt: skip
            spec = load_spec(args, backend)
            runs = interleaved(targets, spec, args.rounds)
            access_lines = sum(1 for _ in (workdir / "sluice-on.err").open())
        finally:
            for child in reversed(children):
                child.stop()
    med = {
        name: {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        for name, rounds in runs.items()
    }
    return {
        "settings": vars(args),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rounds": runs,
        "median": med,
        "cpu_ratio": med["on"]["cpu_s_per_1k"] / med["off"]["cpu_s_per_1k"],
        "ttft_p50_delta_ms": med["on"]["ttft_p50_ms"] - med["off"]["ttft_p50_ms"],
        "access_log_lines": access_lines,
    }


def run_micro() -> dict[str, float]:
    """Microseconds per request of Observer.on_complete (a 64-token stream's Exchange)."""
    from sluice.control.runtime.logs import configure_logging
    from sluice.proxy.exchange import Exchange
    from sluice.proxy.metrics import Metrics
    from sluice.proxy.observe import Observer
    from sluice.proxy.snapshot import Snapshot, SnapshotRef

    sink = io.TextIOWrapper(open("/dev/null", "wb"), encoding="utf-8")  # noqa: SIM115
    configure_logging("info", "json", stream=sink)
    ref = SnapshotRef(Snapshot("v1", {}, {}))

    def exchange() -> Exchange:
        ex = Exchange("0123456789abcdef01234567", 10.0)
        ex.app, ex.route, ex.backend, ex.preset, ex.status = "app", "chat", "sim", "p", 200
        ex.stream, ex.config_version, ex.finish_reason = True, "829ef118f0af", "length"
        ex.first_token_at = ex.last_token_at = 10.02
        for _ in range(63):
            ex.add_gap(0.01)
        ex.prompt_tokens, ex.completion_tokens, ex.ended_at = 12, 64, 10.66
        return ex

    exchanges = [exchange() for _ in range(2000)]
    out: dict[str, float] = {}
    for name, observer in (
        ("metrics", Observer(ref, Metrics(), access_log=False)),
        ("access_log", Observer(ref, None, access_log=True)),
        ("both", Observer(ref, Metrics(), access_log=True)),
    ):
        batch = [observer.on_complete] * len(exchanges)
        best = min(
            timeit.repeat(lambda b=batch: list(map(_call, b, exchanges)), number=1, repeat=7)
        )
        out[name + "_us_per_request"] = best / len(exchanges) * 1e6
    # The per-token part: Exchange.add_gap with its bucket count.
    ex = exchange()
    best = min(timeit.repeat(lambda: ex.add_gap(0.0123), number=100_000, repeat=7))
    out["add_gap_ns_per_token"] = best / 100_000 * 1e9
    return out


def _call(fn: Any, arg: Any) -> Any:
    return fn(arg)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_load_options(parser, rounds=3)
    parser.add_argument("--micro", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = run_macro(args)
    if args.micro:
        report["micro"] = run_micro()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    m = report["median"]
    print(f"{report['date']}: {args.concurrency} streams, {args.requests} requests x "
          f"{args.max_tokens} tokens, {args.rounds} rounds (medians)")  # fmt: skip
    print("sluice         tok/s  TTFT p50  TTFT p99  ITL p99  CPU s/1k tok  errors")
    for name in ("on", "off"):
        r = m[name]
        print(f"{'metrics+log ' + name:<13} {r['tok_per_s']:6.0f}  {r['ttft_p50_ms']:8.1f}  "
              f"{r['ttft_p99_ms']:8.1f}  {r['itl_p99_ms']:7.1f}  {r['cpu_s_per_1k']:12.4f}  "
              f"{sum(x['errors'] for x in report['rounds'][name]):6d}")  # fmt: skip
    for name in ("on", "off"):
        per_round = " / ".join(f"{x['cpu_s_per_1k']:.4f}" for x in report["rounds"][name])
        ttfts = " / ".join(f"{x['ttft_p50_ms']:.1f}" for x in report["rounds"][name])
        print(f"  {name}: CPU per round {per_round}; TTFT p50 per round {ttfts}")
    ok_cpu = report["cpu_ratio"] <= GOAL_CPU_RATIO
    ok_ttft = report["ttft_p50_delta_ms"] <= GOAL_TTFT_P50_EXTRA_MS
    print(f"on/off: CPU per token x{report['cpu_ratio']:.3f} (goal <= {GOAL_CPU_RATIO}: "
          f"{'met' if ok_cpu else 'MISSED'}), TTFT p50 {report['ttft_p50_delta_ms']:+.1f} ms "
          f"(goal <= +{GOAL_TTFT_P50_EXTRA_MS:g}: {'met' if ok_ttft else 'MISSED'}); "
          f"access log lines written: {report['access_log_lines']}")  # fmt: skip
    if args.micro:
        print("in-process: " + ", ".join(f"{k} {v:.2f}" for k, v in report["micro"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
