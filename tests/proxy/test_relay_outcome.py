"""The relay's outcome: a stream that is over within the read that starts it (a short
answer the backend sent at once) is relayed with no future made; one that goes on makes
exactly one to wait on, and an error that breaks it reaches the waiting handler."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sluice.proxy.exchange import Exchange
from sluice.proxy.relay_stream import relay_stream
from sluice.proxy.snapshot import StreamPolicy
from sluice.proxy.upstream import UpstreamError

from tests.proxy.test_relay_properties import CollectingResponse, FakeUpstream, chat_events


class CountingLoop:
    """The running loop, counting the futures made on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.futures = 0

    def create_future(self) -> asyncio.Future[Any]:
        self.futures += 1
        return self.loop.create_future()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loop, name)


class AtOnceUpstream(FakeUpstream):
    """The whole response was read with its head: fed as one read when the relay starts."""

    def set_consumer(self, consumer: Any) -> None:
        self.consumer = consumer
        if consumer is not None:
            consumer.feed(b"".join(self.pieces))
            consumer.read_done()
            self.complete = True
            consumer.complete()


class BrokenUpstream(FakeUpstream):
    """Sends its pieces, then the connection breaks."""

    def _next(self) -> None:
        if self.consumer is not None and not self.pieces:
            self.consumer.error(UpstreamError("reset", "backend closed mid-response", False))
            return
        super()._next()


def _relay(upstream_type: type[FakeUpstream], pieces: list[bytes]) -> tuple[bool, int, bytes]:
    async def main() -> tuple[bool, int, bytes]:
        upstream = upstream_type(pieces)
        counting = CountingLoop(upstream.loop)
        upstream.loop = counting  # type: ignore[assignment]
        response = CollectingResponse()
        ex = Exchange("r", asyncio.get_running_loop().time())
        policy = StreamPolicy(name="")
        clean = await relay_stream(ex, upstream, response, policy, None, 1)  # type: ignore[arg-type]
        return clean, counting.futures, b"".join(response.writes)

    return asyncio.run(main())


def test_a_stream_over_within_its_first_read_makes_no_future() -> None:
    data = chat_events(["Hel", "lo"])
    clean, futures, written = _relay(AtOnceUpstream, [data])
    assert (clean, futures) == (True, 0)
    assert b'"content":"Hel"' in written and written.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("reads", [2, 5])
def test_a_stream_that_goes_on_waits_on_one_future(reads: int) -> None:
    data = chat_events(["a", "b", "c", "d"])
    step = len(data) // reads + 1
    pieces = [data[i : i + step] for i in range(0, len(data), step)]
    clean, futures, written = _relay(FakeUpstream, pieces)
    assert (clean, futures) == (True, 1)
    assert written.endswith(b"data: [DONE]\n\n")


def test_a_stream_broken_after_it_began_ends_with_an_error_event() -> None:
    data = chat_events(["a", "b"])
    clean, futures, written = _relay(BrokenUpstream, [data[:100]])
    assert (clean, futures) == (False, 1)
    assert b"backend stream broke" in written and b"upstream_reset" in written
