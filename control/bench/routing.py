"""`sluice bench routing`: TTFT of round-robin (nginx), least-outstanding and sluice's
default replica choice on a multi-tenant workload (docs/ROUTING.md).

Starts REPLICAS simulators with the prefix cache model (or uses `--urls`, e.g. real vLLM
replicas with prefix caching on), nginx round-robin over them, and one `sluice serve` with
two routes over the same replicas: `lo` (least_outstanding) and `score` (the default).
Two workloads: `shared` (TENANTS tenants, each with its own SYSTEM_CHARS-character system
prompt, and a random question per request) and `unique` (a fresh system prompt per
request: nothing to share, the never-worse-than-load case). Each run uses prompts no run
before it used and the replicas' caches are reset before it (the simulator's
/sim/reset; vLLM's POST /reset_prefix_cache where the server allows it). With `--workers`,
sluice's default also runs with that many worker processes on the shared workload: each
process with its own index (no store), each its own index beside a Redis store for the
limits (`routing.shared_index: false`), and the index shared through that Redis (a
redis-server the bench starts; skipped when none is installed). Every run is bounded by
`--timeout`; every child is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvloop
from sluice.control.errors import CliError

from .loadgen import percentile
from .processes import SERVE_READY, SIM_READY, Child, find_nginx, free_port, sluice_argv
from .tenants import RoutingSpec, Workload, run_requests

GOAL_SHARED_P90_RATIO = 1 / 3  # sluice's p90 TTFT at most a third of round-robin's
GOAL_UNIQUE_P90_RATIO = 1.2  # and within 1.2x of it with nothing to share
_SERVING_LINE = re.compile(r"sluice serving on ")
WORKERS_START_TIMEOUT = 90.0


def _cache_counters(urls: tuple[str, ...]) -> tuple[float, float]:
    """(queried tokens, hit tokens) summed over the replicas' /metrics (0, 0 if absent)."""
    queries = hits = 0.0
    for url in urls:
        try:
            text = httpx.get(url + "/metrics", timeout=5).text
        except httpx.HTTPError:
            continue
        for line in text.splitlines():
            if line.startswith(("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total")):
                value = float(line.rsplit(" ", 1)[1])
                if line.startswith("vllm:prefix_cache_queries_total"):
                    queries += value
                else:
                    hits += value
    return queries, hits


def _reset_caches(urls: tuple[str, ...], simulated: bool) -> bool:
    ok = True
    for url in urls:
        path = "/sim/reset" if simulated else "/reset_prefix_cache"
        try:
            response = httpx.post(url + path, timeout=10)
            ok = ok and response.status_code < 300
        except httpx.HTTPError:
            ok = False
    return ok


@dataclass
class RunResult:
    target: str
    workload: str
    ok: int
    errors: dict[str, int]
    first_error: str
    wall_s: float
    ttft_ms: dict[str, float]
    hit_rate: float | None
    cache_reset: bool
    extra: dict[str, Any] = field(default_factory=dict)


def measure(
    runner: asyncio.Runner,
    spec: RoutingSpec,
    target: str,
    url: str,
    model: str,
    kind: str,
    urls: tuple[str, ...],
    simulated: bool,
) -> RunResult:
    reset = _reset_caches(urls, simulated)
    workload = Workload(spec, kind, f"{target}-{time.monotonic_ns()}")
    before = _cache_counters(urls)
    samples, wall = runner.run(run_requests(url, model, workload, spec))
    after = _cache_counters(urls)
    queried = after[0] - before[0]
    ttfts = samples.ttfts
    return RunResult(
        target=target,
        workload=kind,
        ok=samples.ok,
        errors=dict(samples.errors),
        first_error=samples.first_error,
        wall_s=round(wall, 2),
        ttft_ms={q: round(percentile(ttfts, int(q[1:])) * 1000, 1) for q in ("p50", "p90", "p99")},
        hit_rate=round((after[1] - before[1]) / queried, 3) if queried > 0 else None,
        cache_reset=reset,
    )


def _nginx_conf(workdir: Path, port: int, urls: tuple[str, ...]) -> str:
    servers = "\n".join(f"    server {u.removeprefix('http://').rstrip('/')};" for u in urls)
    temp = "\n".join(
        f"  {kind}_temp_path {workdir}/nginx-{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
master_process on;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
{temp}
  upstream backend {{
{servers}
    keepalive 256;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 300s;
    }}
  }}
}}
"""


def _sluice_config(
    workdir: Path,
    urls: tuple[str, ...],
    model: str,
    store: str | None = None,
    shared: bool = True,
    shared_timeout: float = 0.002,
) -> Path:
    config = workdir / f"routing-config-{'redis' if store else 'local'}-{int(shared)}"
    config.mkdir(exist_ok=True)
    listed = json.dumps(list(urls))
    common = f"urls: {listed}, max_concurrency: 4096, queue: {{max: 4096, max_wait: 60s}}"
    limits = f"limits: {{store: {json.dumps(store)}}}\n" if store else ""
    (config / "gateway.yaml").write_text(
        f"kind: Gateway\nrecords: {{path: null}}\n{limits}backends:\n"
        f"  - {{name: lo, {common}, routing: {{strategy: least_outstanding}}}}\n"
        f"  - {{name: score, {common}, routing: {{shared_index: {str(shared).lower()}, "
        f"shared_index_timeout: {shared_timeout * 1000:g}ms}}}}\n"
        "routes:\n"
        f"  - {{model: lo, backend: lo, upstream_model: {json.dumps(model)}}}\n"
        f"  - {{model: score, backend: score, upstream_model: {json.dumps(model)}}}\n"
    )
    return config


def _start_sluice(workdir: Path, config: Path, workers: int) -> tuple[Child, str]:
    child = Child(
        f"sluice-w{workers}",
        sluice_argv(
            "serve",
            *("--config", str(config), "--host", "127.0.0.1", "--port", str(free_port())),
            *("--workers", str(workers), "--no-access-log"),
        ),
        workdir,
    )
    # Generous: N workers importing at once on a busy 2-core machine take a while.
    url = child.wait_line(SERVE_READY, timeout=WORKERS_START_TIMEOUT)
    deadline = time.monotonic() + WORKERS_START_TIMEOUT
    while len(_SERVING_LINE.findall(child.out_path.read_text(errors="replace"))) < workers:
        if time.monotonic() > deadline or child.proc.poll() is not None:
            child.stop()
            raise CliError(f"sluice --workers {workers}: not every worker started")
        time.sleep(0.05)
    return child, url


def _start_redis(workdir: Path) -> tuple[Child, int] | None:
    """A redis-server for the shared-index runs; None when none is installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    child = Child("redis", argv, workdir)
    child.wait_port(port)
    return child, port


def _shared_index_stats(log: str) -> tuple[int, int]:
    """(late reads, reads) summed over the workers' `shared_index_stats` lines."""
    late = reads = 0
    for line in log.splitlines():
        if "shared_index_stats" not in line:
            continue
        with contextlib.suppress(ValueError, AttributeError):
            event = json.loads(line[line.index("{") :])
            late += int(event.get("late_reads", 0))
            reads += int(event.get("reads", 0))
    return late, reads


def _flush_redis(port: int) -> None:
    """Forgets the previous run's shared index (the replicas' caches are reset too)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"FLUSHALL\r\n")
        conn.recv(64)


@contextlib.contextmanager
def _replicas(spec: RoutingSpec, workdir: Path) -> Iterator[tuple[tuple[str, ...], list[Child]]]:
    children: list[Child] = []
    try:
        if spec.urls:
            yield tuple(u.rstrip("/") for u in spec.urls), children
            return
        urls = []
        for i in range(spec.replicas):
            sim = Child(
                f"sim{i}",
                sluice_argv(
                    "sim",
                    *("--host", "127.0.0.1", "--port", "0", "--model", spec.model),
                    *("--ttft-ms", f"{spec.ttft_ms:g}", "--itl-ms", f"{spec.itl_ms:g}"),
                    *("--prefix-cache", str(spec.prefix_cache)),
                    *("--prefill-ms-per-block", f"{spec.prefill_ms_per_block:g}"),
                ),
                workdir,
            )
            children.append(sim)
            urls.append(sim.wait_line(SIM_READY))
        yield tuple(urls), children
    finally:
        for child in reversed(children):
            child.stop()


def run_bench(spec: RoutingSpec, workloads: tuple[str, ...]) -> dict[str, Any]:
    simulated = not spec.urls
    results: list[RunResult] = []
    with (
        tempfile.TemporaryDirectory(prefix="sluice-bench-routing-") as tmp,
        _replicas(spec, Path(tmp)) as (urls, _),
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
    ):
        workdir = Path(tmp)
        nginx_port = free_port()
        conf = workdir / "nginx.conf"
        conf.write_text(_nginx_conf(workdir, nginx_port, urls))
        nginx = Child(
            "nginx",
            [
                find_nginx(),
                "-p",
                str(workdir),
                "-e",
                str(workdir / "nginx-error.log"),
                "-c",
                str(conf),
            ],
            workdir,
        )
        config = _sluice_config(workdir, urls, spec.model)
        sluice: Child | None = None
        redis: tuple[Child, int] | None = None
        try:
            nginx.wait_port(nginx_port)
            sluice, sluice_url = _start_sluice(workdir, config, 1)
            nginx_url = f"http://127.0.0.1:{nginx_port}"
            for kind in workloads:
                for target, url, model in (
                    ("round-robin (nginx)", nginx_url, spec.model),
                    ("least-outstanding (sluice)", sluice_url, "lo"),
                    ("sluice default", sluice_url, "score"),
                ):
                    results.append(measure(runner, spec, target, url, model, kind, urls, simulated))
            sluice.stop()
            sluice = None
            if spec.workers and "shared" in workloads:
                redis = _start_redis(workdir)
            variants: list[tuple[str, Path, int | None]] = [("local index", config, None)]
            if redis is not None:
                store = f"redis://127.0.0.1:{redis[1]}/0"
                for label, shared in (("local index, Redis limits", False), ("shared index", True)):
                    variants.append(
                        (
                            label,
                            _sluice_config(
                                workdir, urls, spec.model, store, shared, spec.shared_index_timeout
                            ),
                            redis[1],
                        )
                    )
            for workers in spec.workers:
                if "shared" not in workloads:
                    break
                for label, variant_config, redis_port in variants:
                    if redis_port is not None:
                        _flush_redis(redis_port)
                    sluice, url = _start_sluice(workdir, variant_config, workers)
                    name = f"sluice default, --workers {workers}, {label}"
                    result = measure(runner, spec, name, url, "score", "shared", urls, simulated)
                    sluice.stop()
                    if redis_port is not None:
                        # Each fallback to the local index is one line (and a second off).
                        log = sluice.out_path.read_text(errors="replace")
                        result.extra["shared_index_down"] = log.count("shared_index_down")
                        late, reads = _shared_index_stats(log)
                        result.extra["shared_index_late"] = late
                        result.extra["shared_index_reads"] = reads
                    results.append(result)
                    sluice = None
        finally:
            if sluice is not None:
                sluice.stop()
            if redis is not None:
                redis[0].stop()
            nginx.stop()
    return report(spec, results)


def report(spec: RoutingSpec, results: list[RunResult]) -> dict[str, Any]:
    verdicts: dict[str, Any] = {}
    for kind, goal in (("shared", GOAL_SHARED_P90_RATIO), ("unique", GOAL_UNIQUE_P90_RATIO)):
        rr = next((r for r in results if r.workload == kind and r.target.startswith("round")), None)
        ours = next(
            (r for r in results if r.workload == kind and r.target == "sluice default"), None
        )
        if rr is None or ours is None or not rr.ttft_ms["p90"]:
            continue
        ratio = ours.ttft_ms["p90"] / rr.ttft_ms["p90"]
        verdicts[kind] = {
            "p90_ratio": round(ratio, 3),
            "goal": round(goal, 3),
            "met": ratio <= goal,
        }
    settings = {k: v for k, v in spec.__dict__.items() if k not in ("urls",) or spec.urls}
    return {"settings": settings, "runs": [r.__dict__ for r in results], "verdicts": verdicts}


def format_report(data: dict[str, Any]) -> str:
    lines = []
    s = data["settings"]
    where = (
        f"replicas {', '.join(s['urls'])}"
        if s.get("urls")
        else (
            f"{s['replicas']} simulated replicas (--prefix-cache {s['prefix_cache']}, "
            f"--prefill-ms-per-block {s['prefill_ms_per_block']:g}, --ttft-ms {s['ttft_ms']:g}, "
            f"--itl-ms {s['itl_ms']:g})"
        )
    )
    lines.append(
        f"{where}; {s['tenants']} tenants x {s['system_chars']}-char system prompts, "
        f"{s['requests']} requests, {s['concurrency']} concurrent, {s['max_tokens']} tokens"
    )
    header = ["workload", "target", "TTFT p50 ms", "p90", "p99", "cache hits", "ok", "errors"]
    rows = [header]
    for r in data["runs"]:
        hit = "-" if r["hit_rate"] is None else f"{r['hit_rate'] * 100:.0f}%"
        errors = sum(r["errors"].values())
        rows.append(
            [
                r["workload"],
                r["target"],
                f"{r['ttft_ms']['p50']:.1f}",
                f"{r['ttft_ms']['p90']:.1f}",
                f"{r['ttft_ms']['p99']:.1f}",
                hit,
                str(r["ok"]),
                str(errors),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for kind, v in data["verdicts"].items():
        mark = "met" if v["met"] else "NOT met"
        lines.append(
            f"{kind}: sluice default p90 / round-robin p90 = {v['p90_ratio']:.2f} "
            f"(goal <= {v['goal']:.2f}): {mark}"
        )
    for r in data["runs"]:
        if "shared_index_down" in r["extra"]:
            # The read counts come from the workers' exit lines, when they exit in time.
            late = (
                f"; {r['extra']['shared_index_late']} of {r['extra']['shared_index_reads']} "
                "reads came too late"
                if r["extra"]["shared_index_reads"]
                else ""
            )
            lines.append(
                f"{r['target']}: fell back to the local index "
                f"{r['extra']['shared_index_down']} times (1 s each){late}"
            )
        if r["first_error"]:
            lines.append(f"{r['target']} ({r['workload']}): first error: {r['first_error']}")
        if not r["cache_reset"]:
            lines.append(f"{r['target']} ({r['workload']}): could not reset the replicas' caches")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        spec = RoutingSpec(
            replicas=args.replicas,
            tenants=args.tenants,
            system_chars=args.system_chars,
            concurrency=args.concurrency,
            requests=args.requests,
            max_tokens=args.max_tokens,
            ttft_ms=args.ttft_ms,
            itl_ms=args.itl_ms,
            prefix_cache=args.prefix_cache,
            prefill_ms_per_block=args.prefill_ms_per_block,
            workers=tuple(int(w) for w in args.workers.split(",") if w) if args.workers else (),
            urls=tuple(u for u in args.urls.split(",") if u) if args.urls else (),
            model=args.model,
            timeout=args.timeout,
            seed=args.seed,
            shared_index_timeout=args.shared_index_timeout / 1000,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    workloads = ("shared", "unique") if args.workload == "both" else (args.workload,)
    data = run_bench(spec, workloads)
    print(json.dumps(data, indent=2) if args.json else format_report(data), flush=True)
    return 0
