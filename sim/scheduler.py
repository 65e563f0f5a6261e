"""When generations advance: one timer per request for the first token, then one shared
ticker per distinct inter-token latency.

Why: at 256 streams x 100 tokens/s a timer (or an `asyncio.sleep`) per token per stream
costs more CPU than the proxy under test. A ticker wakes once per ITL and steps every
stream on it, so the timer cost is per ITL, not per stream. Each stream keeps its own
nominal schedule (`next_due`, advanced by one ITL per token) and is stepped at the tick
nearest to it, so its tokens are spaced by the ITL on average, off by at most half an ITL.
A tick never steps a stream twice: when the loop lags, streams slow down rather than burst.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sluice.proxy.http import ClientGone

from .generation import Generation


class Ticker:
    """Steps every registered generation once per period."""

    __slots__ = ("_gens", "_half", "_handle", "_loop", "_next", "_on_idle", "period")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        period: float,
        on_idle: Callable[[Ticker], None],
    ) -> None:
        self._loop = loop
        self.period = period
        self._half = period / 2.0
        self._on_idle = on_idle
        self._gens: dict[int, Generation] = {}  # insertion order: first come, first written
        self._handle: asyncio.TimerHandle | None = None
        self._next = 0.0

    def __len__(self) -> int:
        return len(self._gens)

    def add(self, gen: Generation, due: float) -> None:
        gen.next_due = due
        self._gens[id(gen)] = gen
        if self._handle is None:
            self._next = due
            self._handle = self._loop.call_at(due, self._tick)

    def remove(self, gen: Generation) -> None:
        if self._gens.pop(id(gen), None) is not None and not self._gens:
            self.stop()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._gens.clear()
        self._on_idle(self)

    def _tick(self) -> None:
        self._handle = None
        gens = self._gens
        horizon = self._next + self._half
        period = self.period
        for key, gen in list(gens.items()):
            if gen.next_due > horizon:
                continue  # joined since the last tick; its first step is at the next one
            gen.next_due += period
            try:
                leave = gen.step()
            except ClientGone:
                leave = True  # the handler is being cancelled; it does the accounting
            except Exception as exc:
                gen.fail(exc)
                leave = True
            if leave:
                del gens[key]
        if not gens:
            self._on_idle(self)
            return
        self._next = max(self._next + period, self._loop.time())
        self._handle = self._loop.call_at(self._next, self._tick)


class Scheduler:
    """Starts generations after their TTFT and hands them to the ticker of their ITL."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._tickers: dict[float, Ticker] = {}

    @property
    def tickers(self) -> int:
        return len(self._tickers)

    def start(self, gen: Generation) -> None:
        """Schedules the first token, or resolves `done` at once for a fault at token 0."""
        fault = gen.fault_now()
        if fault is not None:
            gen.done.set_result(fault)
            return
        sim = gen.params.sim
        first_at = self._loop.time() + sim.ttft_s
        gen.timer = self._loop.call_at(first_at, self._first_token, gen, first_at)

    def cancel(self, gen: Generation) -> None:
        """Stops a generation wherever it is (idempotent); the handler's `finally` calls it."""
        if gen.timer is not None:
            gen.timer.cancel()
            gen.timer = None
        # A generation's ticker is the one of its ITL (params are frozen), so the scheduler's
        # own map finds it: Generation need not know about tickers.
        ticker = self._tickers.get(gen.params.sim.itl_s)
        if ticker is not None:
            ticker.remove(gen)

    def close(self) -> None:
        for ticker in list(self._tickers.values()):
            ticker.stop()

    def _first_token(self, gen: Generation, first_at: float) -> None:
        gen.timer = None
        itl = gen.params.sim.itl_s
        try:
            if gen.step():
                return
            if itl <= 0:
                # No inter-token latency: everything now (merged if the client is slow).
                while not gen.step():
                    pass
                return
        except ClientGone:
            return
        except Exception as exc:
            gen.fail(exc)
            return
        ticker = self._tickers.get(itl)
        if ticker is None:
            ticker = self._tickers[itl] = Ticker(self._loop, itl, self._forget)
        ticker.add(gen, first_at + itl)

    def _forget(self, ticker: Ticker) -> None:
        if self._tickers.get(ticker.period) is ticker:
            del self._tickers[ticker.period]
