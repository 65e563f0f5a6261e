"""What a shared limit store costs per request: sluice with `limits.store: redis://...`
against sluice with local limits, the same backend limit in both.

    .venv/bin/python -m bench.limit_store [--concurrency 256] [--requests 1024]
        [--max-tokens 64] [--rounds 3]

Starts a redis-server (no persistence), the simulator (TTFT 20 ms, ITL 10 ms) and two
`sluice serve --config` processes whose only difference is the store, warms both up, then
runs the same bounded load against each in interleaved rounds, the order alternating, and
reports the medians: TTFT p50/p99, tok/s, CPU seconds of the sluice process per 1000 tokens
and the Redis script calls per request (Redis's own count). The bar (issue 13): TTFT p50 within
+3 ms of local limits at 256 streams.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from sluice.control.bench.processes import SERVE_READY, Child, sluice_argv

from bench.rounds import Round, add_load_options, interleaved, load_spec, start_sim

GOAL_TTFT_P50_EXTRA_MS = 3.0
SCRIPT_COMMANDS = {"cmdstat_evalsha", "cmdstat_eval"}

GATEWAY = """\
kind: Gateway
{limits}
backends:
  - name: sim
    urls: ["{backend}"]
    max_concurrency: {limit}
    queue: {{max: 1024, max_wait: 30s}}
routes:
  - {{model: sim-model, backend: sim, upstream_model: sim-model}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
            "--save", "", "--appendonly", "no"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server did not start on port {port}")


def script_calls(redis_url: str) -> int:
    """Lua script calls Redis has run so far (each take, give back or renewal is one)."""
    client = redis.Redis.from_url(redis_url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return sum(int(v["calls"]) for k, v in stats.items() if k in SCRIPT_COMMANDS)


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sluice-store-bench-") as tmp:
        workdir = Path(tmp)
        children: list[Child] = []
        redis, redis_url = start_redis(workdir)
        try:
            backend = start_sim(workdir, children)
            targets: dict[str, tuple[str, int]] = {}
            store = f"limits: {{store: {redis_url}, keep_idle: {args.keep_idle}}}"
            for name, limits in (("local", ""), ("redis", store)):
                config = workdir / f"cfg-{name}"
                config.mkdir()
                text = GATEWAY.format(limits=limits, backend=backend, limit=args.limit)
                (config / "gateway.yaml").write_text(text, encoding="utf-8")
                argv = ["serve", "--config", str(config), "--host", "127.0.0.1", "--port", "0"]
                child = Child(f"sluice-{name}", sluice_argv(*argv), workdir)
                children.append(child)
                targets[name] = (child.wait_line(SERVE_READY), child.pid)
            spec = load_spec(args, backend)
            calls: list[float] = []

            def count_calls(name: str, run: Callable[[], Round]) -> Round:
                before = script_calls(redis_url)
                result = run()
                if name == "redis":
                    calls.append((script_calls(redis_url) - before) / args.requests)
                return result

            runs = interleaved(targets, spec, args.rounds, count_calls)
        finally:
            for child in reversed(children):
                child.stop()
            redis.kill()
            redis.wait()
    med = {
        name: {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        for name, rounds in runs.items()
    }
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rounds": runs,
        "median": med,
        "script_calls_per_request": statistics.median(calls),
        "ttft_p50_delta_ms": med["redis"]["ttft_p50_ms"] - med["local"]["ttft_p50_ms"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_load_options(parser, rounds=3)
    parser.add_argument("--limit", type=int, default=4096, help="backend max_concurrency")
    parser.add_argument("--keep-idle", default="100ms", help="limits.keep_idle (0: keep none)")
    args = parser.parse_args()
    report = run(args)
    m = report["median"]
    print(f"{report['date']}: {args.concurrency} streams, {args.requests} requests x "
          f"{args.max_tokens} tokens, backend limit {args.limit}, keep_idle {args.keep_idle}, "
          f"{args.rounds} rounds (medians)")  # fmt: skip
    print("limits   tok/s  TTFT p50  TTFT p99  CPU s/1k tok  errors")
    for name in ("local", "redis"):
        r = m[name]
        print(f"{name:<7} {r['tok_per_s']:6.0f}  {r['ttft_p50_ms']:8.1f}  {r['ttft_p99_ms']:8.1f}  "
              f"{r['cpu_s_per_1k']:12.4f}  {sum(x['errors'] for x in report['rounds'][name]):6d}")  # fmt: skip
        ttfts = " / ".join(f"{x['ttft_p50_ms']:.1f}" for x in report["rounds"][name])
        print(f"  TTFT p50 per round: {ttfts}")
    delta = report["ttft_p50_delta_ms"]
    print(f"Redis script calls per request: {report['script_calls_per_request']:.3f}; "
          f"TTFT p50 {delta:+.1f} ms (goal <= +{GOAL_TTFT_P50_EXTRA_MS:g}: "
          f"{'met' if delta <= GOAL_TTFT_P50_EXTRA_MS else 'MISSED'})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
