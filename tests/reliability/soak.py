"""`make soak`: the long runs of the reliability suite, with the figures docs/RELIABILITY.md
quotes. Real processes on loopback: `sluice serve` (routed config: preset, policy with a
stop string and deadlines) in front of `sluice sim`; a raw keep-alive client.

    python -m tests.reliability.soak [--requests 100000] [--concurrency 32] [--bodies]

1. Mixed load: N requests, 10% faulty (bad JSON, nesting past the limit, backend 503,
   backend error mid-stream, backend closing mid-stream, client leaving mid-stream), each
   with its expected outcome. RSS of the proxy after a warm-up (10% of N) and at the end:
   growth must stay <= 20 MB. Exit status 1 on any unexpected outcome or a larger growth.
2. `--bodies`: 20 concurrent 3.6 MB request bodies; RSS before and after.
The 50 reloads under 200 streams run as tests/reload/test_reload_under_load.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httptools

from tests.fixtures import ProcessServer, sluice_cmd, start_sim

GATEWAY = """\
kind: Gateway
backends:
  - {{name: sim, urls: ["{sim}"], max_concurrency: 256, queue: {{max: 4096, max_wait: 30s}}}}
routes:
  - {{model: chat, backend: sim, upstream_model: sim-model, preset: soak, policy: soak}}
"""
PRESET = """\
kind: Preset
name: soak
generation: {temperature: 0.7, top_p: 0.9}
"""
POLICY = """\
kind: Policy
name: soak
stop: ["###"]
timeouts: {first_token: 10s, inter_token: 5s, total: 60s}
"""
MSG = [{"role": "user", "content": "Hello there"}]
FAST = {"ttft_ms": 0, "itl_ms": 0}


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def make_case(rng: random.Random) -> tuple[str, bytes]:
    """(kind, body). Kinds ending in `!` are the faulty 10%."""
    r = rng.random()
    base = {"model": "chat", "messages": MSG, "max_tokens": 4, "sim": dict(FAST)}
    if r < 0.03:
        return "bad-json!", b'{"model": "chat", "messages": ['
    if r < 0.04:
        return "too-deep!", b'{"model":"chat","x":' + b"[" * 300 + b"]" * 300 + b"}"
    if r < 0.06:
        return "backend-503!", json.dumps({**base, "sim": {"status": 503}}).encode()
    if r < 0.08:
        body = {**base, "stream": True, "sim": {**FAST, "error_after": 1}}
        return "midstream-error!", json.dumps(body).encode()
    if r < 0.09:
        body = {**base, "stream": True, "sim": {**FAST, "close_after": 2}}
        return "backend-closes!", json.dumps(body).encode()
    if r < 0.10:
        body = {**base, "stream": True, "sim": {"itl_ms": 20}, "max_tokens": 50}
        return "client-leaves!", json.dumps(body).encode()
    if r < 0.55:
        return "stream", json.dumps({**base, "stream": True}).encode()
    return "whole", json.dumps(base).encode()


EXPECTED = {
    "bad-json!": 400,
    "too-deep!": 400,
    "backend-503!": 503,
    "midstream-error!": 200,
    "backend-closes!": 200,
    "stream": 200,
    "whole": 200,
}


class _Reply:
    def __init__(self) -> None:
        self.done = False
        self.body = bytearray()
        self.headers_done = False

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_message_complete(self) -> None:
        self.done = True


async def one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, kind: str, body: bytes
) -> tuple[int, bytes] | None:
    """One request on a kept-alive connection; None when the client left on purpose."""
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    reply = _Reply()
    parser = httptools.HttpResponseParser(reply)
    while not reply.done:
        data = await asyncio.wait_for(reader.read(65536), 60)
        if not data:
            raise ConnectionError("server closed the connection")
        parser.feed_data(data)
        if kind == "client-leaves!" and reply.headers_done and reply.body:
            return None
    return parser.get_status_code(), bytes(reply.body)


async def run_mixed(port: int, n: int, concurrency: int, pid: int) -> dict[str, object]:
    rng = random.Random(12)
    cases = [make_case(rng) for _ in range(n)]
    kinds: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    wrong: list[str] = []
    next_index = 0
    done = 0
    warm_at = max(1, n // 10)
    rss = {"start": rss_kb(pid), "warm": 0, "end": 0}
    started = time.monotonic()

    async def worker() -> None:
        nonlocal next_index, done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while next_index < n:
            kind, body = cases[next_index]
            next_index += 1
            kinds[kind] += 1
            try:
                got = await one(reader, writer, kind, body)
            except (ConnectionError, TimeoutError, httptools.HttpParserError) as exc:
                wrong.append(f"{kind}: {type(exc).__name__} {exc}")
                got = None
                kind = "client-leaves!"  # reconnect below
            if got is None:
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            else:
                status, reply = got
                statuses[status] += 1
                if status != EXPECTED[kind]:
                    wrong.append(f"{kind}: status {status} {reply[:200]!r}")
                elif kind in ("stream", "midstream-error!", "backend-closes!"):
                    ended = reply.endswith(b"data: [DONE]\n\n")
                    has_error = b'data: {"error"' in reply
                    if not ended or has_error != kind.endswith("!"):
                        wrong.append(f"{kind}: stream {reply[-200:]!r}")
            done += 1
            if done == warm_at:
                rss["warm"] = rss_kb(pid)
        writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    rss["end"] = rss_kb(pid)
    wall = time.monotonic() - started
    return {
        "requests": n,
        "wall_s": round(wall, 1),
        "rps": round(n / wall, 1),
        "kinds": dict(sorted(kinds.items())),
        "statuses": dict(sorted(statuses.items())),
        "unexpected": len(wrong),
        "unexpected_samples": wrong[:10],
        "rss_kb": rss,
        "rss_growth_after_warmup_mb": round((rss["end"] - rss["warm"]) / 1024, 1),
    }


async def run_bodies(
    port: int, pid: int, count: int = 20, size: int = 3_600_000
) -> dict[str, object]:
    content = "x" * size
    body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": content}],
                       "max_tokens": 1, "sim": FAST}).encode()  # fmt: skip
    before = rss_kb(pid)

    async def post() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            got = await one(reader, writer, "whole", body)
            return got[0] if got else 0
        finally:
            writer.close()

    statuses = Counter(await asyncio.gather(*(post() for _ in range(count))))
    peak = rss_kb(pid)
    await asyncio.sleep(2.0)
    after = rss_kb(pid)
    return {
        "bodies": count,
        "body_bytes": len(body),
        "statuses": dict(statuses),
        "rss_kb": {"before": before, "after_all_answered": peak, "after_2s": after},
        "rss_growth_mb": round((after - before) / 1024, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--bodies", action="store_true", help="also the 20 x 3.6 MB bodies run")
    ap.add_argument("--sluice", default=None, help="python of another checkout (comparison)")
    args = ap.parse_args()
    sim = start_sim("--ttft-ms", "0", "--itl-ms", "0")
    workdir = Path(tempfile.mkdtemp(prefix="sluice-soak-"))
    (workdir / "gateway.yaml").write_text(GATEWAY.format(sim=sim.url))
    (workdir / "preset.yaml").write_text(PRESET)
    (workdir / "policy.yaml").write_text(POLICY)
    cmd = sluice_cmd("serve", "--config", str(workdir), "--port", "0", "--no-access-log")
    if args.sluice:
        cmd[0] = args.sluice
    proxy = ProcessServer(cmd)
    figures: dict[str, object] = {}
    try:
        if args.bodies:
            figures["bodies"] = asyncio.run(run_bodies(proxy.port, proxy.proc.pid))
        if args.requests:
            figures["mixed"] = asyncio.run(
                run_mixed(proxy.port, args.requests, args.concurrency, proxy.proc.pid)
            )
    finally:
        proxy.stop()
        sim.stop()
    print(json.dumps(figures, indent=2))
    mixed = figures.get("mixed")
    if isinstance(mixed, dict) and (
        mixed["unexpected"] or float(mixed["rss_growth_after_warmup_mb"]) > 20  # type: ignore[arg-type]
    ):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
