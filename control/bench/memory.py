"""Memory per open stream: `python -m sluice.control.bench.memory [--streams 1000,10000]`.

Starts the simulator with a long inter-token latency (a token every 30 s, so streams stay
open and idle-ish), sluice in pass-through mode, and opens streams in steps; after each
step it reads sluice's resident memory (VmRSS). The per-stream figure is the growth from
a warm baseline (100 open streams) divided by the streams added. Loopback only; every
stream is closed at the end, and the run is bounded by `--timeout`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import sys
import tempfile
import time
from pathlib import Path

from .processes import SERVE_READY, SIM_READY, Child, free_port, sluice_argv

BASELINE_STREAMS = 100
FD_LIMIT = 65536  # each stream holds two sockets in sluice (client and backend)
GATEWAY = """\
kind: Gateway
backends:
  - {{name: sim, urls: ["{url}"], max_concurrency: 30000, queue: {{max: 10, max_wait: 1s}}}}
routes:
  - {{model: sim-model, backend: sim}}
"""


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, FD_LIMIT), max(hard, FD_LIMIT)))
    except (ValueError, OSError):  # not root: the soft limit up to the hard one
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def open_stream(port: int, model: str) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = (
        b'{"model":"' + model.encode() + b'","stream":true,"max_tokens":4,'
        b'"messages":[{"role":"user","content":"Hi"}]}'
    )
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        rest = await reader.read(600)
        raise RuntimeError(f"stream refused: {head[:40]!r} {rest!r}")
    await reader.readuntil(b"\n\n")  # the role chunk: the stream is open end to end
    return writer


async def measure(port: int, pid: int, steps: list[int], model: str) -> list[tuple[int, int]]:
    writers: list[asyncio.StreamWriter] = []
    points: list[tuple[int, int]] = []
    for target in [BASELINE_STREAMS, *steps]:
        while len(writers) < target:
            batch = min(200, target - len(writers))
            writers += await asyncio.gather(*(open_stream(port, model) for _ in range(batch)))
        await asyncio.sleep(1.0)  # let sluice settle (buffers, gc)
        points.append((len(writers), rss_kib(pid)))
        print(
            f"{len(writers):>6} open streams: sluice RSS {points[-1][1] / 1024:.1f} MiB", flush=True
        )
    for w in writers:
        w.close()
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sluice.control.bench.memory")
    parser.add_argument("--streams", default="1000,10000", help="comma-separated steps")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    steps = sorted(int(s) for s in args.streams.split(","))
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="sluice-memory-"))
    sim_port, proxy_port = free_port(), free_port()
    sim = Child(
        "sim",
        sluice_argv("sim", "--port", str(sim_port), "--ttft-ms", "5", "--itl-ms", "30000"),
        workdir,
    )
    proxy = None
    try:
        sim.wait_line(SIM_READY)
        config = workdir / "config"
        config.mkdir()
        (config / "gateway.yaml").write_text(GATEWAY.format(url=f"http://127.0.0.1:{sim_port}"))
        proxy = Child(
            "sluice",
            sluice_argv(
                *("serve", "--config", str(config), "--port", str(proxy_port)),
                *("--no-access-log", "--max-connections", str(max(steps) + 100)),
            ),
            workdir,
        )
        proxy.wait_line(SERVE_READY)
        started = time.monotonic()
        points = asyncio.run(
            asyncio.wait_for(measure(proxy_port, proxy.pid, steps, "sim-model"), args.timeout)
        )
    finally:
        if proxy is not None:
            proxy.stop()
        sim.stop()
    base_n, base_rss = points[0]
    for n, rss in points[1:]:
        per = (rss - base_rss) * 1024 / (n - base_n)
        print(f"{n} streams: {per / 1024:.1f} KiB per open stream over the {base_n}-stream base")
    print(f"({time.monotonic() - started:.0f} s)")
    gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
