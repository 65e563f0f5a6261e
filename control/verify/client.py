"""The probes' HTTP client: blocking httpx with a hard cap on requests sent."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from sluice.control.errors import CliError

# Every probe together stays under this; the bounded load is counted apart.
MAX_PROBE_REQUESTS = 80
GREEDY: dict[str, Any] = {"temperature": 0, "ignore_eos": True}
MESSAGES = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
PROMPT = "Once upon a time, in a lighthouse by the sea,"


@dataclass
class Answer:
    status: int
    body: bytes
    chunks: list[tuple[float, bytes]] = field(default_factory=list)  # (seconds, bytes) read

    def json(self) -> Any:
        return orjson.loads(self.body)


class ProbeClient:
    def __init__(self, timeout: float = 60.0) -> None:
        self.http = httpx.Client(timeout=timeout, headers={"user-agent": "sluice-verify"})
        self.sent = 0

    def _count(self) -> None:
        if self.sent >= MAX_PROBE_REQUESTS:
            raise CliError(f"verify would send more than {MAX_PROBE_REQUESTS} probe requests")
        self.sent += 1

    def get(self, url: str) -> Answer:
        self._count()
        resp = self.http.get(url)
        return Answer(resp.status_code, resp.content)

    def post(self, url: str, body: dict[str, Any]) -> Answer:
        self._count()
        resp = self.http.post(url, content=orjson.dumps(body),
                              headers={"content-type": "application/json"})  # fmt: skip
        return Answer(resp.status_code, resp.content)

    def stream(self, url: str, body: dict[str, Any]) -> Answer:
        """POST and read the body as it arrives, keeping each piece's arrival time."""
        self._count()
        start = time.perf_counter()
        chunks: list[tuple[float, bytes]] = []
        headers = {"content-type": "application/json", "accept": "text/event-stream"}
        with self.http.stream("POST", url, content=orjson.dumps(body), headers=headers) as resp:
            for piece in resp.iter_raw():
                chunks.append((time.perf_counter() - start, piece))
            status = resp.status_code
        return Answer(status, b"".join(c for _, c in chunks), chunks)

    def close(self) -> None:
        self.http.close()
