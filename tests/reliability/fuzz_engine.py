"""Fuzz cases for the HTTP server and the request pipeline, and the concurrent raw client
that plays them: a mutation corpus (seeded, reproducible) and hypothesis-generated
requests. Each case ends in one outcome: the statuses answered, a silent close, or a hang
(no byte and no close before the deadline)."""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from tests.reliability.fixtures import STATUS_RE

SEEDS: list[bytes] = [
    b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    b'Content-Length: 71\r\n\r\n{"model":"chat","messages":[{"role":"user","content":"hi"}],"max_tokens":2}',
    b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\nGET /2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    b"POST /a HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nab",
    b"GET /a HTTP/1.0\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    # Request targets and methods llhttp reads otherwise: a tunnel, the asterisk, absolute form.
    b"CONNECT /a HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
    b"CONNECT t:443 HTTP/1.1\r\nHost: t:443\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET http://t/a?b HTTP/1.1\r\nHost: t\r\n\r\n",
]
TOKENS = [
    b"\r\n", b"\n", b"\r", b"\x00", b" ", b"\t", b":", b",", b";", b"0", b"-1", b"ff",
    b"99999999999999999999", b"chunked", b"Content-Length: ", b"Transfer-Encoding: chunked\r\n",
    b"Host: x\r\n", b"HTTP/1.1", b"HTTP/2.0", b"\r\n\r\n", b"\xff\xfe", b"%00", b"{", b"}",
    b"Expect: 100-continue\r\n", b"Connection: close\r\n", b"Upgrade: websocket\r\n",
    b"CONNECT ", b"PRI ", b"OPTIONS ", b"get ", b"Connection: upgrade\r\n",
]  # fmt: skip


def mutate(rng: random.Random, seed: bytes, corpus: list[bytes]) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:  # flip a bit
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert a token
            data[pos:pos] = rng.choice(TOKENS)
        elif op == 2 and data:  # delete a slice
            end = min(len(data), pos + rng.randint(1, 8))
            del data[pos:end]
        elif op == 3 and data:  # duplicate a slice
            end = min(len(data), pos + rng.randint(1, 32))
            data[pos:pos] = data[pos:end]
        elif op == 4:  # truncate
            del data[pos:]
        elif op == 5:  # splice another seed's tail
            other = rng.choice(corpus)
            data[pos:] = other[rng.randrange(len(other) + 1) :]
        else:  # random bytes
            data[pos:pos] = rng.randbytes(rng.randint(1, 8))
    return bytes(data)


def mutation_cases(n: int, seed: int = 12, extra: Iterable[bytes] = ()) -> list[bytes]:
    rng = random.Random(seed)
    corpus = SEEDS + list(extra)
    return [mutate(rng, rng.choice(corpus), corpus) for _ in range(n)]


@dataclass
class Outcomes:
    cases: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    silent_close: int = 0
    hangs: list[bytes] = field(default_factory=list)
    undefined: list[tuple[bytes, bytes]] = field(default_factory=list)

    def table(self) -> str:
        parts = [f"{k}:{v}" for k, v in sorted(self.by_status.items())]
        return (
            f"cases={self.cases} statuses {' '.join(parts)} silent_close={self.silent_close} "
            f"hangs={len(self.hangs)} undefined={len(self.undefined)}"
        )


async def _play(port: int, raw: bytes, deadline: float, quiet: float) -> tuple[bytes, bool]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = b""
    closed = False
    try:
        writer.write(raw)
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        while True:
            left = end - loop.time()
            if left <= 0:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(65536), quiet if data else left)
            except TimeoutError:
                break  # quiet after an answer: done (keep-alive)
            except ConnectionError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
    finally:
        writer.close()
    return data, closed


def play(
    port: int,
    cases: list[bytes],
    defined: frozenset[int],
    *,
    concurrency: int = 64,
    deadline: float = 6.0,
    quiet: float = 0.25,
) -> Outcomes:
    """Plays every case on its own connection, `concurrency` at a time, on a client loop
    of its own thread (the server runs on another)."""
    out = Outcomes()

    async def run_all() -> None:
        sem = asyncio.Semaphore(concurrency)

        async def one(raw: bytes) -> None:
            async with sem:
                data, closed = await _play(port, raw, deadline, quiet)
            out.cases += 1
            codes = [int(m) for m in STATUS_RE.findall(data)]
            for code in codes:
                out.by_status[str(code)] += 1
                if code not in defined:
                    out.undefined.append((raw, data[:300]))
            if not data:
                if closed:
                    out.silent_close += 1
                else:
                    out.hangs.append(raw)

        await asyncio.gather(*(one(raw) for raw in cases))

    result: list[BaseException] = []

    def thread() -> None:
        try:
            asyncio.run(run_all())
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=thread)
    t.start()
    t.join()
    if result:
        raise result[0]
    return out
