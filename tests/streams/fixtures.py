"""Raw SSE clients for the stream tests: what arrived, with its `id:` lines, and a way to
drop the connection after any number of events."""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


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
    """One HTTP/1.1 request on a fresh socket; with `stop_after`, the socket is closed
    (RST-free, a plain close) after that many data events."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    payload = json.dumps(body).encode() if body is not None else b""
    head = [f"{method} {path} HTTP/1.1", f"host: {parts.netloc}", "connection: close"]
    for name, value in (headers or {}).items():
        head.append(f"{name}: {value}")
    if body is not None:
        head += ["content-type: application/json", f"content-length: {len(payload)}"]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
    reader = sock.makefile("rb")
    try:
        status_line = reader.readline().decode()
        status = int(status_line.split()[1])
        hdrs: dict[str, str] = {}
        while True:
            line = reader.readline().decode().strip()
            if not line:
                break
            name, _, value = line.partition(":")
            hdrs[name.strip().lower()] = value.strip()
        result = RawStream(status, hdrs)
        if "chunked" not in hdrs.get("transfer-encoding", ""):
            length = int(hdrs.get("content-length", "0"))
            result.body = reader.read(length)
            result.complete = True
            return result
        buffer = b""
        while True:
            size_line = reader.readline()
            if not size_line:
                return result
            size = int(size_line.strip(), 16)
            if size == 0:
                result.complete = True
                return result
            buffer += reader.read(size)
            reader.readline()
            while b"\n\n" in buffer:
                raw, buffer = buffer.split(b"\n\n", 1)
                result.events.append(parse_event(raw))
                if stop_after is not None and len(result.data_events()) >= stop_after:
                    return result
    finally:
        reader.close()
        sock.close()


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
