"""The supervisor's permit server under a reload (`--workers N`, no `limits.store`): each
request carries its worker's numbers and when they were set; the shared limiter takes the
numbers set last, so a reload reaches it with the first request of a worker that has
reloaded, and a worker that has not reloaded yet cannot set the old numbers back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sluice.proxy.limit_store import StoreLimiter
from sluice.proxy.limits import LimitExceeded, Permit
from sluice.proxy.permit_socket import PermitServer, SocketPermitStore
from sluice.proxy.snapshot import QueueLimits

NO_QUEUE = QueueLimits(max_len=0, max_wait=1.0)
NAME = "app:a"


async def _admitted(limiters: list[StoreLimiter], tries: int) -> int:
    """How many of `tries` requests, round-robin over `limiters`, get a permit at once."""
    permits: list[Permit] = []
    for i in range(tries):
        try:
            permits.append(await limiters[i % len(limiters)].acquire())
        except LimitExceeded:
            pass
    for permit in permits:
        permit.release()
    await asyncio.sleep(0.05)  # the give-backs reach the server
    return len(permits)


async def _scenario(path: Path) -> None:
    server = PermitServer(path)
    await server.start()
    stores = [SocketPermitStore(str(path), 2), SocketPermitStore(str(path), 2)]
    for store in stores:
        await store.start()
    try:
        old, new = (StoreLimiter(store, NAME, 2, NO_QUEUE) for store in stores)
        assert await _admitted([old, new], 6) == 2

        new.configure(4, NO_QUEUE)  # one worker reloads: 2 -> 4
        assert await _admitted([new], 1) == 1
        shared = server.limiter(NAME)
        assert shared is not None and shared.max_concurrency == 4
        # The other worker, not reloaded yet, asks with its older numbers: they stay 4.
        assert await _admitted([old, new], 6) == 4
        assert shared.max_concurrency == 4

        old.configure(4, NO_QUEUE)  # it reloads too; then an edit lowers the limit to 1
        old.configure(1, QueueLimits(max_len=0, max_wait=2.0))
        assert await _admitted([old], 1) == 1
        assert shared.max_concurrency == 1 and shared.queue.max_wait == 2.0
        assert await _admitted([new, old], 6) == 1  # `new` still says 4: not taken
        assert shared.max_concurrency == 1
    finally:
        for store in stores:
            await store.aclose()
        await server.close()


@pytest.mark.timeout(30)
def test_the_shared_limiter_takes_the_numbers_set_last(tmp_path: Path) -> None:
    asyncio.run(_scenario(tmp_path / "permits.sock"))


async def _short_wait(path: Path) -> tuple[bytes, float]:
    server = PermitServer(path)
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
        # The limiter's own max_wait is 5 s; the second request has 0.3 s of it left.
        writer.write(b"A 1 1 4 5.0 1.0 5.0 app:a\nA 2 1 4 5.0 1.0 0.3 app:a\n")
        granted = await reader.readline()
        assert granted.startswith(b"G 1 "), granted
        started = asyncio.get_running_loop().time()
        refused = await asyncio.wait_for(reader.readline(), 4.0)
        writer.close()
        return refused, asyncio.get_running_loop().time() - started
    finally:
        await server.close()


@pytest.mark.timeout(30)
def test_a_request_waits_at_the_server_only_what_is_left_of_its_max_wait(
    tmp_path: Path,
) -> None:
    """A request that waited for its worker's local share first (the server was out of
    reach) has only the rest of its max_wait left; the server's queue keeps it no longer."""
    refused, waited = asyncio.run(_short_wait(tmp_path / "permits.sock"))
    assert refused.startswith(b"X 2 queue_timeout "), refused
    assert 0.25 <= waited < 2.0
