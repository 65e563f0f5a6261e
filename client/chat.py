"""Streaming chat completions from sluice (or any OpenAI-compatible server) that survive
the network: refusals with Retry-After are retried after that delay, and a stream cut
mid-way resumes where it stopped (GET /v1/streams/<request id> with Last-Event-ID) on
routes whose Policy sets `resume_window`, so the text is neither lost nor repeated.

    with SluiceClient("http://127.0.0.1:8000", api_key="sk-...") as client:
        for text in client.stream_chat(model="chat", messages=[...]):
            print(text, end="", flush=True)

`AsyncSluiceClient` is the same with `async for`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson

from .sse import EventReader, StreamError, StreamState

CHAT_PATH = "/v1/chat/completions"
RETRYABLE = (429, 502, 503, 504)
DEFAULT_TIMEOUT = httpx.Timeout(10.0, read=120.0)  # reads: keep-alives come every 15 s


class _Policy:
    """What to do after an attempt that did not finish the stream (shared by both clients)."""

    def __init__(self, retries: int, max_wait: float) -> None:
        self.retries = retries
        self.max_wait = max_wait

    def next_wait(self, state: StreamState, attempt: int, why: str) -> tuple[float, StreamState]:
        """Seconds to wait before the next attempt, and the state it starts from; raises
        StreamError when it must not or cannot go on."""
        state.errors.append(why)
        if attempt >= self.retries:
            raise StreamError(f"gave up after {attempt + 1} attempts: {'; '.join(state.errors)}")
        backoff = min(self.max_wait, 0.25 * 2**attempt)
        if state.retry_after is not None:
            wait = min(self.max_wait, state.retry_after)
            return wait, StreamState(errors=state.errors)  # refused: a new request
        if state.resumable:
            return backoff, state  # the same generation, from the last event received
        if state.delivered:
            raise StreamError(
                "the stream broke after text was delivered and the route is not resumable "
                f"(no event ids): {why}"
            )
        return backoff, StreamState(errors=state.errors)

    @staticmethod
    def refusal(state: StreamState, status: int, headers: httpx.Headers, body: bytes) -> str:
        """A non-200 answer: sets `retry_after` when it may be retried, else raises."""
        error: dict[str, Any] = {}
        try:
            parsed = orjson.loads(body)
            if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
                error = parsed["error"]
        except orjson.JSONDecodeError:
            pass
        message = str(error.get("message") or f"HTTP {status}")
        if status in RETRYABLE:
            retry = headers.get("retry-after", "")
            state.retry_after = float(retry) if retry.isdigit() else 1.0
            return f"HTTP {status}: {message}"
        if status in (404, 410) and state.resumable and not state.delivered:
            state.retry_after = 0.0  # nothing shown yet: a fresh request is safe
            return f"HTTP {status}: {message}"
        raise StreamError(f"HTTP {status}: {message}", error)


class SluiceClient:
    """A synchronous streaming client (httpx)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        retries: int = 4,
        max_retry_wait: float = 30.0,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    ) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)
        self._api_key = api_key
        self._policy = _Policy(retries, max_retry_wait)

    def __enter__(self) -> SluiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def stream_chat(self, **request: Any) -> Iterator[str]:
        """Yields the text deltas of choice 0..n as they arrive; returns at `[DONE]`."""
        body = orjson.dumps({**request, "stream": True})
        state = StreamState()
        attempt = 0
        while True:
            why = "the connection ended before [DONE]"
            try:
                with self._open(state, body) as resp:
                    if resp.status_code != 200:
                        why = _Policy.refusal(state, resp.status_code, resp.headers, resp.read())
                    else:
                        state.request_id = resp.headers.get("x-request-id", state.request_id)
                        reader = EventReader()
                        for line in resp.iter_lines():
                            event = reader.line(line)
                            if event is None:
                                continue
                            deltas = state.take(event)
                            if deltas:
                                yield from deltas
                            if state.done:
                                return
                            if state.retry_after is not None:
                                why = "refused after the stream began"
                                break
            except httpx.TransportError as exc:
                why = f"{type(exc).__name__}: {exc}"
            wait, state = self._policy.next_wait(state, attempt, why)
            attempt += 1
            time.sleep(wait)

    def _open(self, state: StreamState, body: bytes) -> Any:
        headers = _headers(self._api_key, state)
        if state.resumable:
            return self._http.stream("GET", f"/v1/streams/{state.request_id}", headers=headers)
        return self._http.stream("POST", CHAT_PATH, content=body, headers=headers)


class AsyncSluiceClient:
    """The asyncio twin of `SluiceClient`."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        retries: int = 4,
        max_retry_wait: float = 30.0,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    ) -> None:
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout)
        self._api_key = api_key
        self._policy = _Policy(retries, max_retry_wait)

    async def __aenter__(self) -> AsyncSluiceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def stream_chat(self, **request: Any) -> AsyncIterator[str]:
        """Yields the text deltas as they arrive; returns at `[DONE]`."""
        body = orjson.dumps({**request, "stream": True})
        state = StreamState()
        attempt = 0
        while True:
            why = "the connection ended before [DONE]"
            try:
                async with self._open(state, body) as resp:
                    if resp.status_code != 200:
                        raw = await resp.aread()
                        why = _Policy.refusal(state, resp.status_code, resp.headers, raw)
                    else:
                        state.request_id = resp.headers.get("x-request-id", state.request_id)
                        reader = EventReader()
                        async for line in resp.aiter_lines():
                            event = reader.line(line)
                            if event is None:
                                continue
                            for delta in state.take(event) or ():
                                yield delta
                            if state.done:
                                return
                            if state.retry_after is not None:
                                why = "refused after the stream began"
                                break
            except httpx.TransportError as exc:
                why = f"{type(exc).__name__}: {exc}"
            wait, state = self._policy.next_wait(state, attempt, why)
            attempt += 1
            await asyncio.sleep(wait)

    def _open(self, state: StreamState, body: bytes) -> Any:
        headers = _headers(self._api_key, state)
        if state.resumable:
            return self._http.stream("GET", f"/v1/streams/{state.request_id}", headers=headers)
        return self._http.stream("POST", CHAT_PATH, content=body, headers=headers)


def _headers(api_key: str | None, state: StreamState) -> dict[str, str]:
    headers = {"accept": "text/event-stream"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    if state.resumable and state.last_event_id is not None:
        headers["last-event-id"] = state.last_event_id
    else:
        headers["content-type"] = "application/json"
    return headers
