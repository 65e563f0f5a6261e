"""The floor of a Python relay: the least an asyncio (uvloop) HTTP/1.1 proxy can do per
request and per token, to measure sluice and nginx against (`python -m bench.floor`).

    python -m bench.floor_proxy --backend http://127.0.0.1:8000 --port 8100

Not a product and not correct HTTP: a request is its head and Content-Length body, sent to
a pooled backend connection as it came; the response's bytes go back as they came, and a
chunked response ends at its terminator. No routing, JSON, limits, timeouts, metrics or log
line: what is left is the event loop, one Python call per read and the system calls.
"""

from __future__ import annotations

import argparse
import asyncio
from urllib.parse import urlsplit

import uvloop

READY = "floor proxy ready on"
_TERMINATOR = b"0\r\n\r\n"


class Backend(asyncio.Protocol):
    """One pooled backend connection; relays to `client` until the terminator."""

    def __init__(self, idle: list[Backend]) -> None:
        self.idle = idle
        self.client: asyncio.Transport | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.client is not None:
            self.client.write(data)
        if data.endswith(_TERMINATOR):
            self.client = None
            self.idle.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        # A backend closes idle keep-alive connections (uvicorn after 5 s): out of the
        # pool, and a response it cut ends its client's connection.
        if self in self.idle:
            self.idle.remove(self)
        if self.client is not None:
            self.client.close()
            self.client = None


class Client(asyncio.Protocol):
    def __init__(self, host: str, port: int, idle: list[Backend]) -> None:
        self.host, self.port, self.idle = host, port, idle
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        head_end = buffer.find(b"\r\n\r\n")
        if head_end < 0:
            self.buffer = buffer
            return
        at = buffer.lower().find(b"content-length:", 0, head_end)
        length = int(buffer[at + 15 : buffer.find(b"\r\n", at)]) if at >= 0 else 0
        end = head_end + 4 + length
        if len(buffer) < end:
            self.buffer = buffer
            return
        self.buffer = buffer[end:]
        if self.idle:
            self._send(self.idle.pop(), buffer[:end])
        else:
            asyncio.get_running_loop().create_task(self._open(buffer[:end]))

    def _send(self, backend: Backend, request: bytes) -> None:
        backend.client = self.transport
        assert backend.transport is not None
        backend.transport.write(request)

    async def _open(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, backend = await loop.create_connection(lambda: Backend(self.idle), self.host, self.port)
        self._send(backend, request)


async def serve(backend: str, host: str, port: int) -> None:
    url = urlsplit(backend)
    idle: list[Backend] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Client(url.hostname or "127.0.0.1", url.port or 80, idle),
        host,
        port,
        backlog=2048,
    )
    bound = server.sockets[0].getsockname()
    print(f"{READY} http://{bound[0]}:{bound[1]}", flush=True)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    uvloop.run(serve(args.backend, args.host, args.port))


if __name__ == "__main__":
    main()
