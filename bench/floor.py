"""sluice against nginx and against the floor of a Python relay, in one run (issue 19).

    PYTHONPATH=build/compiled .venv/bin/python -m bench.floor \\
        [--backend URL] [--ttft-ms 20] [--itl-ms 10] [--concurrency 256] \\
        [--requests 1024] [--max-tokens 64] [--rounds 4] [--model M]

Starts the simulator (or uses `--backend`, a real vLLM say) and three relays in front of
it: `sluice serve --backend` (the sluice this Python imports), nginx (as `sluice bench
--compare` configures it) and `bench/floor_proxy.py` (an asyncio relay that does nothing
but move bytes). Each gets the
same bounded load in interleaved rounds; the report gives each one's median CPU per token
and per request (user + system of its process tree, /proc). The floor says how much of
sluice's distance to nginx a Python relay on uvloop must pay, and how much is sluice's own
work.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

from sluice.control.bench.processes import (
    SERVE_READY,
    Child,
    find_nginx,
    free_port,
    render_nginx_conf,
    sluice_argv,
)

from bench.floor_proxy import READY as FLOOR_READY
from bench.rounds import (
    Round,
    add_backend_options,
    add_load_options,
    interleaved,
    load_spec,
    start_sim,
    summary,
)


def run(args: argparse.Namespace) -> dict[str, list[Round]]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        children: list[Child] = []
        try:
            backend = args.backend or start_sim(workdir, children, args.ttft_ms, args.itl_ms)
            targets: dict[str, tuple[str, int]] = {}

            serve = Child(
                "sluice",
                sluice_argv("serve", "--host", "127.0.0.1", "--port", "0", "--backend", backend),
                workdir,
            )
            children.append(serve)
            targets["sluice"] = (serve.wait_line(SERVE_READY), serve.pid)

            port = free_port()
            conf = workdir / "nginx.conf"
            conf.write_text(render_nginx_conf(workdir, port, backend))
            nginx = Child("nginx", [find_nginx(), "-p", str(workdir), "-c", str(conf)], workdir)
            children.append(nginx)
            nginx.wait_port(port)
            targets["nginx"] = (f"http://127.0.0.1:{port}", nginx.pid)

            floor_argv = [sys.executable, "-m", "bench.floor_proxy", "--backend", backend]
            floor = Child("floor", floor_argv, workdir)
            children.append(floor)
            ready = re.compile(re.escape(FLOOR_READY) + r" (http://\S+)")
            targets["floor"] = (floor.wait_line(ready), floor.pid)

            spec = load_spec(args, backend)
            return interleaved(targets, spec, args.rounds)
        finally:
            for child in reversed(children):
                child.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_backend_options(parser)
    add_load_options(parser, rounds=4)
    args = parser.parse_args()
    runs = run(args)
    nginx = statistics.median(r["cpu_s_per_1k"] for r in runs["nginx"])
    for name, rounds in runs.items():
        cpu = statistics.median(r["cpu_s_per_1k"] for r in rounds)
        tokens_per_request = statistics.median(r["tokens"] for r in rounds) / args.requests
        print(
            f"{name}: {cpu / nginx:.2f}x nginx, {cpu * 1000 * tokens_per_request:.0f} us per "
            f"request, {summary(rounds)}"
        )


if __name__ == "__main__":
    main()
