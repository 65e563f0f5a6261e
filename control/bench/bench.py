"""`sluice bench`: load one URL, or compare a simulator direct, through nginx and through sluice.

`--compare` starts the simulator (or uses `--url` as the backend), nginx with an SSE
pass-through config, and `sluice serve`, then runs the same load against each in
interleaved rounds, rotating the order per round so drift on the shared machine falls on
every target alike, and reports the medians. Each relay's CPU time (user + system of its
process tree, from /proc, before and after each run) per token relayed is the figure that
is stable on a busy 2-core machine and the one ops pay for. Every child is stopped at the
end, on error and on Ctrl-C/SIGTERM; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

import uvloop
from sluice.control.errors import CliError

from .loadgen import LoadResult, LoadSpec, run_load
from .processes import (
    POLICY_STOP,
    Target,
    find_nginx,
    interruptible,
    nginx_version,
    start_targets,
    tree_cpu_seconds,
)

WARMUP_MAX_TOKENS = 8
# The foundation issue's bar at 256 streams (64 tokens, ITL 10 ms, TTFT 20 ms); the policy
# issue lowers tok/s to 85% with stop strings, cut patterns and timeouts on.
GOAL_TOK_RATIO = 0.90
GOAL_TOK_RATIO_POLICY = 0.85
GOAL_TTFT_P50_EXTRA_MS = 20.0
GOAL_TTFT_P99_EXTRA_MS = 50.0
GOAL_CPU_RATIO = 1.5
# The stream-safety issue's bar with a policy on: TTFT p50 within 30 ms, CPU within 1.7x.
GOAL_TTFT_P50_EXTRA_MS_POLICY = 30.0
GOAL_CPU_RATIO_POLICY = 1.7


def _spec(args: argparse.Namespace, url: str) -> LoadSpec:
    try:
        return LoadSpec(
            url=url,
            concurrency=args.concurrency,
            requests=args.requests,
            max_tokens=args.max_tokens,
            model=args.model,
            api_key=args.api_key,
            timeout=args.timeout,
            stop=POLICY_STOP if getattr(args, "policy", False) else (),
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    if args.compare:
        # The URL is each target's, set per run; --url, if given, is the backend.
        spec = _spec(args, args.url or "http://127.0.0.1")
        if args.rounds < 1:
            raise CliError("--rounds must be at least 1")
        if args.config and not Path(args.config).is_dir():
            raise CliError(f"config directory {args.config} does not exist")
        if args.policy and args.config:
            raise CliError("--policy writes its own config: give --policy or --config")
        report = compare(args, spec)
        print(json.dumps(report, indent=2) if args.json else format_compare(report))
        return 0
    if not args.url:
        raise CliError("--url is required (or --compare to start the targets itself)")
    spec = _spec(args, args.url)
    with interruptible():
        result = uvloop.run(run_load(spec))
    if args.json:
        print(json.dumps({"url": spec.url, "settings": _settings(spec), **_as_dict(result)}))
    else:
        print(format_single(spec, result))
    return 0


# -- the comparison ----------------------------------------------------------------------


def compare(args: argparse.Namespace, spec: LoadSpec) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "nginx": [], "sluice": []}
    with (
        interruptible(),
        tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp,
        start_targets(args, Path(tmp)) as (targets, sim_pid),
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
    ):
        for target in targets:
            _warm_up(runner, spec, target)
        for round_no in range(args.rounds):
            shift = round_no % len(targets)
            for target in targets[shift:] + targets[:shift]:
                runs[target.name].append(_measure(runner, spec, target, sim_pid))
    return build_report(args, spec, runs)


def _warm_up(runner: asyncio.Runner, spec: LoadSpec, target: Target) -> None:
    """Opens the relays' upstream keep-alive pools and warms caches; not measured."""
    n = min(spec.concurrency, spec.requests)
    warm = dataclasses.replace(
        spec, url=target.url, requests=n, max_tokens=min(spec.max_tokens, WARMUP_MAX_TOKENS)
    )
    result = runner.run(run_load(warm))
    if result.ok == 0:
        raise CliError(f"{target.name} ({target.url}): every warm-up request failed: "
                       f"{result.first_error}")  # fmt: skip


def _measure(
    runner: asyncio.Runner, spec: LoadSpec, target: Target, sim_pid: int | None
) -> dict[str, Any]:
    relay0, sim0 = _cpu(target.pid), _cpu(sim_pid)
    result = runner.run(run_load(dataclasses.replace(spec, url=target.url)))
    relay_s, sim_s = _cpu(target.pid) - relay0, _cpu(sim_pid) - sim0
    out = _as_dict(result)
    out["relay_cpu_s"] = relay_s if target.pid else None
    out["sim_cpu_s"] = sim_s if sim_pid else None
    return out


def _cpu(pid: int | None) -> float:
    return tree_cpu_seconds(pid) if pid else 0.0


def _per_1k(cpu_s: float | None, tokens: int) -> float | None:
    return None if cpu_s is None or tokens == 0 else cpu_s / tokens * 1000


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize_target(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians across rounds; error counts add up."""
    keys = ("tok_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "wall_s")
    out: dict[str, Any] = {key: _median([r[key] for r in rounds]) for key in keys}
    out["relay_cpu_s_per_1k_tokens"] = _median(
        [_per_1k(r["relay_cpu_s"], r["tokens"]) for r in rounds]
    )
    out["sim_cpu_s_per_1k_tokens"] = _median([_per_1k(r["sim_cpu_s"], r["tokens"]) for r in rounds])
    out["client_cpu_s_per_1k_tokens"] = _median(
        [_per_1k(r["client_cpu_s"], r["tokens"]) for r in rounds]
    )
    out["requests"] = sum(r["requests"] for r in rounds)
    out["tokens"] = sum(r["tokens"] for r in rounds)
    out["errors"] = sum(r["errors"] for r in rounds)
    out["first_error"] = next((r["first_error"] for r in rounds if r["first_error"]), "")
    out["rounds"] = rounds
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _meets(
    value: float | None, *, minimum: float | None = None, maximum: float | None = None
) -> bool | None:
    if value is None or math.isnan(value):
        return None
    return (minimum is None or value >= minimum) and (maximum is None or value <= maximum)


def build_report(
    args: argparse.Namespace, spec: LoadSpec, runs: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    targets = {name: summarize_target(rounds) for name, rounds in runs.items()}
    ng = targets["nginx"]
    vs = {
        name: {
            "tok_per_s_ratio": _ratio(t["tok_per_s"], ng["tok_per_s"]),
            "ttft_p50_delta_ms": _delta(t["ttft_p50_ms"], ng["ttft_p50_ms"]),
            "ttft_p99_delta_ms": _delta(t["ttft_p99_ms"], ng["ttft_p99_ms"]),
            "cpu_per_token_ratio": _ratio(
                t["relay_cpu_s_per_1k_tokens"], ng["relay_cpu_s_per_1k_tokens"]
            ),
        }
        for name, t in targets.items()
        if name != "nginx"
    }
    s = vs["sluice"]
    policy = bool(args.config or args.policy)
    tok_goal = GOAL_TOK_RATIO_POLICY if policy else GOAL_TOK_RATIO
    ttft_goal = GOAL_TTFT_P50_EXTRA_MS_POLICY if policy else GOAL_TTFT_P50_EXTRA_MS
    cpu_goal = GOAL_CPU_RATIO_POLICY if policy else GOAL_CPU_RATIO
    goals = {
        "issue": "stream safety (policy on)" if policy else "foundation (pass-through)",
        "tok_per_s_ratio_min": tok_goal,
        "ttft_p50_delta_ms_max": ttft_goal,
        "ttft_p99_delta_ms_max": GOAL_TTFT_P99_EXTRA_MS,
        "cpu_per_token_ratio_max": cpu_goal,
        # None: not measurable in this run (no tokens, or too little CPU for the clock tick).
        "met": {
            "tok_per_s": _meets(s["tok_per_s_ratio"], minimum=tok_goal),
            "ttft_p50": _meets(s["ttft_p50_delta_ms"], maximum=ttft_goal),
            "ttft_p99": _meets(s["ttft_p99_delta_ms"], maximum=GOAL_TTFT_P99_EXTRA_MS),
            "cpu_per_token": _meets(s["cpu_per_token_ratio"], maximum=cpu_goal),
        },
    }
    settings = {
        **_settings(spec),
        "rounds": args.rounds,
        "backend": args.url or "sluice sim",
        "sim_ttft_ms": None if args.url else args.ttft_ms,
        "sim_itl_ms": None if args.url else args.itl_ms,
        "sluice_config": args.config
        or (
            "--policy: 4 stop strings, 2 cut patterns, timeouts"
            if args.policy
            else "pass-through (--backend)"
        ),
        "stop_in_requests": list(spec.stop),
        "nginx": f"{nginx_version(find_nginx())}, 1 worker process",
        "sluice": "1 process",
    }
    return {"settings": settings, "targets": targets, "vs_nginx": vs, "goals": goals}


# -- output ------------------------------------------------------------------------------


def _settings(spec: LoadSpec) -> dict[str, Any]:
    return {
        "concurrency": spec.concurrency,
        "requests": spec.requests,
        "max_tokens": spec.max_tokens,
        "model": spec.model,
        "timeout_s": spec.timeout,
    }


def _as_dict(result: LoadResult) -> dict[str, Any]:
    """JSON has no NaN: a percentile of no samples is null."""
    return {
        k: None if isinstance(v, float) and math.isnan(v) else v
        for k, v in dataclasses.asdict(result).items()
    }


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec) + unit


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_single(spec: LoadSpec, r: LoadResult) -> str:
    head = (
        f"sluice bench {spec.url}: {spec.requests} requests x {spec.max_tokens} tokens, "
        f"{spec.concurrency} concurrent, model {spec.model}"
    )
    table = _table(
        ["", "ok", "errors", "tokens", "wall s", "tok/s", "TTFT p50", "TTFT p99",
         "ITL p50", "ITL p99", "client CPU s/1k tok"],
        [["result", str(r.ok), str(r.errors), str(r.tokens), _fmt(r.wall_s, ".2f"),
          _fmt(r.tok_per_s, ".0f"), _fmt(r.ttft_p50_ms, ".1f"), _fmt(r.ttft_p99_ms, ".1f"),
          _fmt(r.itl_p50_ms, ".1f"), _fmt(r.itl_p99_ms, ".1f"),
          _fmt(_per_1k(r.client_cpu_s, r.tokens), ".4f")]],
    )  # fmt: skip
    lines = [head, "(latencies in ms)", table]
    if r.errors:
        kinds = ", ".join(f"{k} {n}" for k, n in r.error_kinds.items())
        lines.append(f"errors: {kinds}; first: {r.first_error}")
    return "\n".join(lines)


def format_compare(report: dict[str, Any]) -> str:
    s = report["settings"]
    sim = (
        f"sim TTFT {s['sim_ttft_ms']:g} ms, ITL {s['sim_itl_ms']:g} ms"
        if s["sim_ttft_ms"] is not None
        else f"backend {s['backend']}"
    )
    lines = [
        f"sluice bench --compare: {s['concurrency']} streams, {s['requests']} requests x "
        f"{s['max_tokens']} tokens, {s['rounds']} interleaved rounds (medians); {sim}",
        f"nginx {s['nginx']}; sluice {s['sluice']}, config {s['sluice_config']}",
        "(latencies in ms; CPU = user+system seconds of the process tree per 1000 tokens)",
        "",
    ]
    rows = []
    for name, t in report["targets"].items():
        rows.append([
            name, _fmt(t["tok_per_s"], ".0f"), _fmt(t["ttft_p50_ms"], ".1f"),
            _fmt(t["ttft_p99_ms"], ".1f"), _fmt(t["itl_p50_ms"], ".1f"),
            _fmt(t["itl_p99_ms"], ".1f"), str(t["errors"]),
            _fmt(t["relay_cpu_s_per_1k_tokens"], ".4f"), _fmt(t["sim_cpu_s_per_1k_tokens"], ".4f"),
            _fmt(t["client_cpu_s_per_1k_tokens"], ".4f"),
        ])  # fmt: skip
    lines.append(_table(
        ["relay", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "errors",
         "relay CPU", "sim CPU", "loadgen CPU"], rows))  # fmt: skip
    lines += ["", "ratio to nginx:"]
    vs_rows = [
        [name, _fmt(v["tok_per_s_ratio"], ".3f", "x"),
         _fmt(v["ttft_p50_delta_ms"], "+.1f", " ms"), _fmt(v["ttft_p99_delta_ms"], "+.1f", " ms"),
         _fmt(v["cpu_per_token_ratio"], ".2f", "x")]
        for name, v in report["vs_nginx"].items()
    ]  # fmt: skip
    lines.append(_table(["relay", "tok/s", "TTFT p50", "TTFT p99", "CPU/token"], vs_rows))
    g = report["goals"]
    missed = [name for name, ok in g["met"].items() if ok is False]
    unknown = [name for name, ok in g["met"].items() if ok is None]
    verdict = "missed: " + ", ".join(missed) if missed else "met"
    if unknown:
        verdict += " (not measurable in this run: " + ", ".join(unknown) + ")"
    lines += [
        "",
        f"goal ({g['issue']} issue, at 256 streams): tok/s >= {g['tok_per_s_ratio_min']:.2f}x, "
        f"TTFT p50 <= +{g['ttft_p50_delta_ms_max']:g} ms, "
        f"p99 <= +{g['ttft_p99_delta_ms_max']:g} ms, CPU/token <= {g['cpu_per_token_ratio_max']:g}x"
        f": {verdict}",
    ]
    for name, t in report["targets"].items():
        if t["errors"]:
            lines.append(f"{name} errors: {t['first_error']}")
    return "\n".join(lines)
