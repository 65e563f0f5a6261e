"""Helpers of the simulator tests: a simulator served in-process on a loop thread with
blocking helpers bound to it, streams driven from the test thread, and the real vLLM
transcripts, parsed."""

from __future__ import annotations

import ast
import asyncio
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from sluice.sim import SimServer
from sluice.sim.client import RawResponse, RawStream, fetch

from tests.fixtures import LoopThread

TRANSCRIPTS = Path("/work/shared/vllm-transcripts")
# Fast defaults for tests; timing tests set their own.
FAST = {"ttft_ms": 2.0, "itl_ms": 1.0, "model": "tiny-llama"}


class SyncStream:
    """A RawStream driven from the test thread."""

    def __init__(self, loops: LoopThread, stream: RawStream) -> None:
        self.loops = loops
        self.stream = stream
        self.response = stream.response

    def head(self) -> RawResponse:
        return self.loops.run(self.stream.read_head())

    def chunk(self, timeout: float = 5.0) -> bytes | None:
        """The next chunk; None at the end; raises TimeoutError if none comes in time."""
        return self.loops.run(asyncio.wait_for(self.stream.read_chunk(), timeout))

    def quiet_for(self, seconds: float) -> bool:
        """True if no chunk arrives within `seconds` (a chunk that does is kept)."""
        try:
            self.chunk(seconds)
        except TimeoutError:
            return True
        return False

    def read_all(self, timeout: float = 10.0) -> RawResponse:
        return self.loops.run(asyncio.wait_for(self.stream.read_all(), timeout))

    def close(self) -> None:
        self.loops.loop.call_soon_threadsafe(self.stream.close)


@dataclass
class Sim:
    """A running simulator plus blocking helpers bound to it."""

    server: SimServer
    loops: LoopThread
    host: str = "127.0.0.1"
    default_headers: dict[str, str] = field(default_factory=dict)
    streams: list[SyncStream] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> RawResponse:
        merged = {**self.default_headers, **(headers or {})}
        return self.loops.run(fetch(self.host, self.port, method, path, body, merged, **kwargs))

    def open_stream(self, path: str, body: object, headers: dict[str, str] | None = None):
        stream = self.loops.run(RawStream.open(self.host, self.port, "POST", path, body, headers))
        self.streams.append(SyncStream(self.loops, stream))
        return self.streams[-1]

    def post(self, path: str, body: object, **kwargs: Any) -> RawResponse:
        return self.request("POST", path, body, **kwargs)

    def chat(self, **body: Any) -> RawResponse:
        body.setdefault("messages", [{"role": "user", "content": "Hello there, how are you?"}])
        return self.post("/v1/chat/completions", body)

    def completion(self, **body: Any) -> RawResponse:
        body.setdefault("prompt", "The quick brown fox")
        return self.post("/v1/completions", body)

    def stats(self) -> dict[str, Any]:
        result = self.request("GET", "/sim/stats").json()
        assert isinstance(result, dict)
        return result

    def wait_stats(self, predicate: Callable[[dict[str, Any]], bool], within: float) -> float:
        """Polls /sim/stats until `predicate` holds; returns the seconds it took."""
        start = time.monotonic()
        while True:
            if predicate(self.stats()):
                return time.monotonic() - start
            if time.monotonic() - start > within:
                raise AssertionError(f"stats never matched within {within} s: {self.stats()}")
            time.sleep(0.01)


# -- transcripts -------------------------------------------------------------------------


class Transcripts:
    """Sections of the real vLLM 0.26 transcripts: SSE events and JSON bodies by id."""

    def __init__(self, root: Path) -> None:
        self.sections: dict[str, str] = {}
        self.files: dict[str, str] = {}
        for path in sorted(root.glob("0*.txt")):
            self.files[path.name] = path.read_text()
            parts = re.split(r"^### (\S+)", path.read_text(), flags=re.M)
            for ident, text in zip(parts[1::2], parts[2::2], strict=True):
                self.sections[ident] = text

    def events(self, ident: str) -> list[dict[str, Any]]:
        """The JSON SSE events of a curl section (the first request in it)."""
        text = self.sections[ident].split("\n$ ")[1]
        return [orjson.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]

    def raw_chunks(self, ident: str) -> list[bytes]:
        """The exact bytes of each recv() of a RAW SOCKET section."""
        found = re.findall(r"^\[t=[\d.]+\] (b'.*')$", self.sections[ident], flags=re.M)
        return [ast.literal_eval(item) for item in found]

    def bodies(self, ident: str) -> list[dict[str, Any]]:
        """The JSON bodies (non-stream responses and errors) of a section, in order."""
        return [
            orjson.loads(line) for line in self.sections[ident].splitlines() if line.startswith("{")
        ]

    def curl_requests(self, ident: str) -> list[CurlRequest]:
        lines = self.sections[ident].splitlines()
        return [parse_curl(line[2:]) for line in lines if line.startswith("$ curl ")]

    def headers(self, ident: str) -> list[str]:
        """The lower-case header names of the first response of a section, in order."""
        text = self.sections[ident].split("\nHTTP/1.1 ", 1)[1].split("\n\n", 1)[0]
        return [line.split(":", 1)[0].lower() for line in text.splitlines()[1:] if ":" in line]


@dataclass
class CurlRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None


def parse_curl(line: str) -> CurlRequest:
    """A `$ curl ...` line of a transcript, as the request it sent."""
    words = shlex.split(line)
    method, headers, body, url = "GET", {}, None, ""
    position = 1
    while position < len(words):
        word = words[position]
        if word in ("-X", "-H", "--data-binary", "--max-time"):
            value = words[position + 1]
            if word == "-X":
                method = value
            elif word == "-H":
                name, _, header_value = value.partition(":")
                headers[name.strip().lower()] = header_value.strip()
            elif word == "--data-binary":
                body = value.encode()
            position += 2
            continue
        if word.startswith("http://"):
            url = word
        position += 1
    path = "/" + url.split("/", 3)[3]
    return CurlRequest(method, path, headers, body)


def shape(value: Any) -> Any:
    """Keys in order and value types, recursively; lists by their first item. A dict of
    floats (completions' token -> logprob maps) is a map: its size, not its keys."""
    if isinstance(value, dict):
        if value and all(isinstance(item, float) for item in value.values()):
            return ["map", len(value)]
        return [(key, shape(item)) for key, item in value.items()]
    if isinstance(value, list):
        return ["list", shape(value[0])] if value else ["list"]
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return type(value).__name__
