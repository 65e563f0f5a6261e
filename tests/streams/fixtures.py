"""SSE as the stream tests read it: what arrived, with its `id:` lines, through the raw
client (`sluice.sim.client`), with a way to drop the connection after any number of events;
and a relay that cuts connections."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sluice.sim.client import RawStream as ClientStream


@dataclass
class SseEvent:
    id: str | None
    data: str | None
    comment: bool = False


@dataclass
class RawStream:
    status: int
    headers: dict[str, str]
    events: list[SseEvent] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False  # the chunked body ended (not cut by us)

    def data_events(self) -> list[SseEvent]:
        return [e for e in self.events if e.data is not None]

    def text(self) -> str:
        return text_of(self.data_events())

    @property
    def last_id(self) -> str | None:
        ids = [e.id for e in self.events if e.id is not None]
        return ids[-1] if ids else None


def text_of(events: list[SseEvent]) -> str:
    parts = []
    for event in events:
        if event.data is None or event.data == "[DONE]":
            continue
        obj = json.loads(event.data)
        for choice in obj.get("choices") or []:
            parts.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
    return "".join(parts)


def parse_event(raw: bytes) -> SseEvent:
    event_id = None
    data = None
    comment = False
    for line in raw.decode().split("\n"):
        if line.startswith(":"):
            comment = True
        elif line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data = line[6:] if data is None else data + "\n" + line[6:]
    return SseEvent(event_id, data, comment and data is None)


def raw_stream(
    url: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    *,
    stop_after: int | None = None,
    timeout: float = 20.0,
) -> RawStream:
    """One HTTP/1.1 request on a fresh connection (the project's raw client,
    `sluice.sim.client`, on a loop of its own); with `stop_after`, the socket is closed (a
    plain close) after that many data events."""
    return asyncio.run(_raw_stream(url, method, path, body, headers, stop_after, timeout))


async def _raw_stream(
    url: str,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    headers: dict[str, str] | None,
    stop_after: int | None,
    timeout: float,
) -> RawStream:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    stream = await ClientStream.open(parts.hostname, parts.port, method, path, body, headers)
    try:
        async with asyncio.timeout(timeout):
            head = await stream.read_head()
            result = RawStream(head.status, dict(head.headers))
            chunked = "chunked" in (head.header("transfer-encoding") or "")
            buffer = b""
            while (chunk := await stream.read_chunk()) is not None:
                if not chunked:
                    continue
                buffer += chunk
                while b"\n\n" in buffer:
                    raw, buffer = buffer.split(b"\n\n", 1)
                    result.events.append(parse_event(raw))
                    if stop_after is not None and len(result.data_events()) >= stop_after:
                        return result
            if not chunked:
                result.body = stream.response.body
            result.complete = stream.response.complete
            return result
    finally:
        stream.close()


class CuttingRelay:
    """A TCP relay on loopback that cuts its Nth connection after `cuts[N]` bytes from the
    server (a flaky network for a real client); later connections pass untouched."""

    def __init__(self, target_port: int, cuts: list[int]) -> None:
        self.target_port = target_port
        self.cuts = list(cuts)
        self.connections = 0
        self.cut = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            limit = self.cuts[self.connections] if self.connections < len(self.cuts) else None
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, limit), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[: max(0, limit - sent)])
                    self.cut += 1
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.listener.close()
