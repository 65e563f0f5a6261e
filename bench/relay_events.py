"""The relay's per-event path in-process: nanoseconds per event through the backend socket's
data callback, the chunk filter and the client's response, with many streams fed round-robin
(so each event finds its stream's objects as cold as under load) and no system call.

    PYTHONPATH=build/compiled python -m bench.relay_events
    PYTHONPATH=<another build> python -m bench.relay_events   # the same for a base build

Each event is one HTTP chunk holding one vLLM chat chunk, as the backend's reads hold them.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import orjson
from sluice.control.bench.processes import POLICY_STOP
from sluice.proxy.chunks import ChunkFilter
from sluice.proxy.exchange import Exchange
from sluice.proxy.relay import StreamRelay
from sluice.proxy.response import Response
from sluice.proxy.stopwords import CutPattern, GuardSpec
from sluice.proxy.upstream import UpstreamConnection
from sluice.proxy.upstream_pool import Origin, UpstreamPool
from sluice.sim.text import sample_tokens

# What `sluice bench --policy` enforces: 4 stop strings and 2 cut patterns.
POLICY = GuardSpec(
    stop=POLICY_STOP,
    cut_patterns=(
        CutPattern("(?i)ignore (all )?(the )?previous instructions", 64),
        CutPattern("BEGIN [A-Z ]*PRIVATE KEY", 40),
    ),
)
# The simulator's tokens (its vocabulary, seeded): text with the letters the cut
# patterns start with, as `sluice bench` streams it.
TOKENS = sample_tokens(0, "relay events", 0, 4096)
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


class Socket:
    """Both sockets of a stream: takes writes and counts them, never closes."""

    __slots__ = ("written",)

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def set_protocol(self, protocol: Any) -> None:
        pass

    def get_extra_info(self, name: str) -> Any:
        return None


def chunk(i: int) -> bytes:
    """The i-th event as one HTTP chunk; 0 is the first (the role and no text)."""
    obj = {
        "id": "chatcmpl-9e34503d82792a7f",
        "object": "chat.completion.chunk",
        "created": 1795635316,
        "model": "tiny-llama",
        "choices": [
            {
                "index": 0,
                "delta": {"content": TOKENS[i % len(TOKENS)]} if i else {"role": "assistant"},
                "logprobs": None,
                "finish_reason": None,
                "token_ids": None,
            }
        ],
    }
    event = b"data: " + orjson.dumps(obj) + b"\n\n"
    return b"%x\r\n%b\r\n" % (len(event), event)


def stream(pool: UpstreamPool, guarded: bool) -> tuple[Callable[[bytes], None], Socket]:
    """A stream past its first event, set up as relay_stream sets it up; returns the
    callback its backend's reads go to and its client's socket."""
    conn = UpstreamConnection(pool)
    conn.connection_made(Socket())  # type: ignore[arg-type]
    conn.send(b"", b"")
    conn.data_received(HEAD + chunk(0))  # the head and the first event, through the parser
    ex = Exchange("r", time.monotonic())
    client = Socket()
    connection = SimpleNamespace(
        transport=client, closing=False, write_paused=False, flow_listener=None
    )
    response = Response(connection, keep_alive=True, head_only=False)  # type: ignore[arg-type]
    response.start(200, [])
    guard = POLICY if guarded else None
    relay = StreamRelay(ChunkFilter(ex, True, guard, 1, None), conn, response)
    conn.set_consumer(relay)
    take = getattr(relay, "taking_reads", None)
    if take is None:  # a build before the relay took the socket's reads
        return conn.data_received, client
    conn.take_reads(relay)  # type: ignore[arg-type]
    take()
    # The socket's reads go to the connection, which hands them to the relay (a build
    # before that made the relay the socket's protocol: its own data_received).
    return getattr(relay, "data_received", conn.data_received), client


async def one_round(streams: int, events: int, guarded: bool) -> float:
    pool = UpstreamPool(Origin("http://127.0.0.1:9"), 1.0)
    made = [stream(pool, guarded) for _ in range(streams)]
    reads = [read for read, _ in made]
    before = [client.written for _, client in made]
    chunks = [chunk(i) for i in range(1, events + 1)]
    started = time.perf_counter()
    for data in chunks:
        for read in reads:
            read(data)
    elapsed = time.perf_counter() - started
    # Each client got every event (with a policy: the text the guard released), or the
    # figure means nothing.
    relayed = sum(len(c) for c in chunks)
    for (_, client), b in zip(made, before, strict=True):
        got = client.written - b
        if got != relayed if not guarded else not relayed // 2 < got <= relayed:
            raise SystemExit(f"a stream relayed {got} bytes of {relayed}")
    return elapsed / (streams * events) * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--events", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import sluice.proxy.relay as relay_module

    print(f"relay: {relay_module.__file__}")
    for guarded in (False, True):
        results = [
            asyncio.run(one_round(args.streams, args.events, guarded)) for _ in range(args.rounds)
        ]
        name = "policy (4 stop strings, 2 cut patterns)" if guarded else "pass-through"
        rounds = " ".join(f"{r:.0f}" for r in results)
        print(f"{name}: {sorted(results)[len(results) // 2]:.0f} ns per event (rounds {rounds})")


if __name__ == "__main__":
    main()
