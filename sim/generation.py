"""One request's generation: a plain object the scheduler advances one token per tick.

Streams are state, not coroutines: `step()` produces the next token of every unfinished
choice, applies stop strings, and writes the chunks that are due straight to the
transport. The request's handler coroutine only waits on `done` and wakes once, at the end.

Chunking follows vLLM's `stream_interval`: the first token goes out at once, then a chunk
every `tokens_per_chunk` tokens, and the final chunk with the remainder. When the client
reads slower than we write (transport paused), tokens are merged into the next chunk
instead of queueing chunks, as vLLM's output queue merges deltas under load.
"""

from __future__ import annotations

import asyncio
import enum
import sys
from collections.abc import Sequence

import orjson
from sluice.proxy.http import Response
from sluice.proxy.sse import DONE_EVENT

from .chunks import ChunkFormat, usage_json
from .params import GenerationParams
from .stats import Stats
from .text import sample_logprobs, sample_tokens


class Outcome(enum.Enum):
    DONE = "done"  # every choice finished; the stream's tail ([DONE]) is written or queued
    STALL = "stall"  # sim.stall_after: no more tokens; hold the connection open
    CLOSE = "close"  # sim.close_after: drop the connection without finishing
    ERROR = "error"  # sim.error_after: a mid-stream error event, then [DONE]


class Choice:
    """One choice's progress. `tokens` is the whole planned output, known up front."""

    __slots__ = (
        "closed",
        "finish_reason",
        "flushed",
        "index",
        "logprob_values",
        "offset",
        "pos",
        "prompt_tokens",
        "sent",
        "stop_reason",
        "text",
        "tokens",
    )

    def __init__(
        self,
        index: int,
        tokens: list[str],
        prompt_tokens: int,
        logprob_values: list[float] | None,
        track_text: bool,
    ) -> None:
        self.index = index
        self.tokens = tokens
        self.prompt_tokens = prompt_tokens
        self.logprob_values = logprob_values
        self.pos = 0  # tokens generated
        self.flushed = 0  # tokens already in a written chunk
        self.offset = 0  # characters of token text flushed (completions' text_offset)
        # With stop strings the emitted text can lag the tokens (hold-back) and be cut.
        self.text: str | None = "" if track_text else None
        self.sent = 0  # characters of `text` written
        self.finish_reason: str | None = None
        self.stop_reason: str | None = None
        self.closed = False  # final chunk written (streams) or finished (non-stream)

    def final_text(self) -> str:
        return self.text if self.text is not None else "".join(self.tokens[: self.pos])

    def all_logprobs(self) -> tuple[list[str], list[float]] | None:
        if self.logprob_values is None:
            return None
        return self.tokens[: self.pos], self.logprob_values[: self.pos]


def _first_fault(params: GenerationParams) -> tuple[Outcome, int] | None:
    sim = params.sim
    candidates = [
        (after, order, outcome)
        for order, (after, outcome) in enumerate(
            (
                (sim.error_after, Outcome.ERROR),
                (sim.close_after, Outcome.CLOSE),
                (sim.stall_after, Outcome.STALL),
            )
        )
        if after is not None
    ]
    if not candidates:
        return None
    after, _, outcome = min(candidates)
    return outcome, after


class Generation:
    """Advanced by the scheduler; `response` is None for a non-stream request."""

    def __init__(
        self,
        params: GenerationParams,
        fmt: ChunkFormat,
        response: Response | None,
        stats: Stats,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.params = params
        self.fmt = fmt
        self.response = response
        self.stats = stats
        self.done: asyncio.Future[Outcome] = loop.create_future()
        self.backlog: list[bytes] = []  # chunks that met a paused transport, in order
        self.steps = 0
        self.completion_tokens = 0
        self.fault = _first_fault(params)
        self._fault_step = sys.maxsize if self.fault is None else self.fault[1]
        self.tokens_per_chunk = params.sim.tokens_per_chunk
        self.empty_deltas = params.sim.empty_deltas
        self.stops = params.stop
        self.holdback = (
            0 if not self.stops or params.include_stop_str else max(map(len, self.stops)) - 1
        )
        self.choices = self._plan_choices(params)
        self.live = list(self.choices)
        self._closed_some = False
        # The common stream (one choice, plain chunks, one token each) has a fast path.
        self._plain = (
            response is not None
            and len(self.choices) == 1
            and not self.stops
            and params.logprobs is None
            and not params.continuous_usage
            and self.tokens_per_chunk == 1
            and not self.empty_deltas
        )
        # Scheduler state.
        self.next_due = 0.0
        self.timer: asyncio.TimerHandle | None = None

    @staticmethod
    def _plan_choices(params: GenerationParams) -> list[Choice]:
        script = params.sim.script
        choices = []
        for prompt_index, prompt in enumerate(params.prompts):
            for sample in range(params.n):
                if script is not None:
                    tokens = list(script[: params.max_tokens])
                else:
                    tokens = sample_tokens(params.seed, prompt, sample, params.max_tokens)
                values = (
                    None
                    if params.logprobs is None
                    else sample_logprobs(params.seed, prompt, sample, len(tokens))
                )
                choices.append(
                    Choice(
                        prompt_index * params.n + sample,
                        tokens,
                        params.prompt_tokens[prompt_index],
                        values,
                        bool(params.stop),
                    )
                )
        return choices

    @property
    def prompt_tokens(self) -> int:
        return sum(self.params.prompt_tokens)

    def fault_now(self) -> Outcome | None:
        """The fault due before any token (`*_after: 0`), if any."""
        if self.fault is not None and self.fault[1] == 0:
            return self.fault[0]
        return None

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    # -- the tick --------------------------------------------------------------------

    def step(self) -> bool:
        """Generates one token per unfinished choice and writes what is due. Returns True
        when the generation needs no more ticks (finished or faulted)."""
        if self._plain and self.steps:
            # Hot path: a middle token of a plain stream is one template and one write.
            choice = self.choices[0]
            pos = choice.pos
            response = self.response
            assert response is not None
            if (
                pos + 1 < len(choice.tokens)
                and self.steps + 1 < self._fault_step
                and not self.backlog
                and not response.must_drain
            ):
                self.steps += 1
                choice.pos = choice.flushed = pos + 1
                self.completion_tokens += 1
                self.stats.tokens += 1
                response.write(self.fmt.content(0, choice.tokens[pos], None, None))
                return False
        first = self.steps == 0
        self.steps += 1
        produced = 0
        max_tokens = self.params.max_tokens
        for choice in self.live:
            if choice.finish_reason is not None:
                continue
            tokens = choice.tokens
            if choice.pos < len(tokens):
                token = tokens[choice.pos]
                choice.pos += 1
                produced += 1
                if choice.text is not None:
                    self._append(choice, token)
            if choice.finish_reason is None and choice.pos >= len(tokens):
                # Out of planned tokens: max_tokens reached, or a script ended (as at EOS).
                choice.finish_reason = "length" if choice.pos >= max_tokens else "stop"
        self.completion_tokens += produced
        self.stats.tokens += produced

        fault = self.fault
        faulted = self.steps >= self._fault_step
        if self.response is not None:
            self._write_step(first, faulted)
        else:
            for choice in self.live:
                if choice.finish_reason is not None:
                    choice.closed = self._closed_some = True
        if self._closed_some:
            self._closed_some = False
            self.live = [choice for choice in self.live if not choice.closed]
        if not self.live:
            self._finish()
            return True
        if faulted and fault is not None:
            self.done.set_result(fault[0])
            return True
        return False

    def _append(self, choice: Choice, token: str) -> None:
        """Adds a token to the text and cuts at the first stop string it completes
        (vLLM searches only where the new characters could complete one, in list order)."""
        text = choice.text
        assert text is not None
        previous = len(text)
        text += token
        for stop in self.stops:
            where = text.find(stop, max(0, previous - len(stop) + 1))
            if where >= 0:
                end = where + len(stop) if self.params.include_stop_str else where
                text = text[:end]
                choice.finish_reason = "stop"
                choice.stop_reason = stop
                break
        choice.text = text

    def _write_step(self, first: bool, force: bool) -> None:
        response = self.response
        assert response is not None
        if self.backlog and not response.must_drain:
            self.write_backlog_now()
        fmt = self.fmt
        continuous = self.params.continuous_usage
        if first and fmt.has_role_chunk:
            for choice in self.live:
                usage = usage_json(choice.prompt_tokens, 0) if continuous else None
                self._emit(fmt.role(choice.index, usage))
        paused = response.must_drain
        per_chunk = self.tokens_per_chunk
        for choice in self.live:
            pending = choice.pos - choice.flushed
            if choice.finish_reason is not None:
                self._flush(choice, final=True)
            elif first or (force and pending) or (pending >= per_chunk and not paused):
                self._flush(choice, final=False)

    def _flush(self, choice: Choice, final: bool) -> None:
        fmt = self.fmt
        start, end = choice.flushed, choice.pos
        choice.flushed = end
        tokens = choice.tokens
        if choice.text is None:
            text = tokens[start] if end - start == 1 else "".join(tokens[start:end])
        else:
            # Hold back what could still become a stop string (vLLM never sends a part).
            full = choice.text
            limit = len(full) if final else max(choice.sent, len(full) - self.holdback)
            text = full[choice.sent : limit]
            choice.sent = limit
        logprobs = None
        if choice.logprob_values is not None:
            piece = tokens[start:end]
            logprobs = orjson.dumps(
                fmt.logprobs(piece, choice.logprob_values[start:end], choice.offset)
            )
            choice.offset += sum(map(len, piece))
        usage = (
            usage_json(choice.prompt_tokens, choice.pos) if self.params.continuous_usage else None
        )
        if final:
            finish = choice.finish_reason
            assert finish is not None
            fingerprint = not self.params.include_usage
            self._emit(
                fmt.final(
                    choice.index, text, logprobs, finish, choice.stop_reason, usage, fingerprint
                )
            )
            choice.closed = self._closed_some = True
            return
        self._emit(fmt.content(choice.index, text, logprobs, usage))
        for _ in range(self.empty_deltas):
            self._emit(fmt.content(choice.index, "", None, usage))

    def _finish(self) -> None:
        if self.response is not None:
            if self.params.include_usage and not self.params.sim.drop_usage_chunk:
                self._emit(
                    self.fmt.usage_chunk(usage_json(self.prompt_tokens, self.completion_tokens))
                )
            self._emit(DONE_EVENT)
        for choice in self.choices:
            self.stats.record_finish(choice.finish_reason or "length")
        self.done.set_result(Outcome.DONE)

    # -- writing ---------------------------------------------------------------------

    def _emit(self, data: bytes) -> None:
        response = self.response
        assert response is not None
        if self.backlog or response.must_drain:
            self.backlog.append(data)
        else:
            response.write(data)

    def write_backlog_now(self) -> None:
        response = self.response
        assert response is not None
        backlog, self.backlog = self.backlog, []
        for data in backlog:
            response.write(data)

    async def drain_backlog(self) -> None:
        """Writes the queued chunks, waiting for the client between them as needed."""
        response = self.response
        assert response is not None
        while self.backlog:
            if response.must_drain:
                await response.drain()
            data: Sequence[bytes] = self.backlog
            self.backlog = []
            for chunk in data:
                response.write(chunk)
