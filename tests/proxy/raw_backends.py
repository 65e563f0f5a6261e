"""Tiny raw-socket backends for faults the simulator cannot script: a backend that accepts
and never answers, and one that closes a reused keep-alive connection at a chosen moment.
Each runs on its own threads on 127.0.0.1:0 and records what it received."""

from __future__ import annotations

import socket
import threading
from typing import Literal

CHAT_RESPONSE = (
    b'{"id":"x","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)


def _read_request(conn: socket.socket, buffer: bytearray) -> bytes | None:
    """One request (head + Content-Length body) from the connection; None at EOF."""
    while b"\r\n\r\n" not in buffer:
        data = conn.recv(65536)
        if not data:
            return None
        buffer += data
    head_end = buffer.index(b"\r\n\r\n") + 4
    length = 0
    for line in bytes(buffer[:head_end]).split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    while len(buffer) < head_end + length:
        data = conn.recv(65536)
        if not data:
            return None
        buffer += data
    request = bytes(buffer[: head_end + length])
    del buffer[: head_end + length]
    return request


Mode = Literal["silent", "close_reused", "break_reused"]


class RawBackend:
    """mode "silent": reads requests, never answers. "close_reused": answers the first
    request of a connection, closes the connection when a second one arrives on it (the
    keep-alive race, deterministic). "break_reused": like it, but sends a status line first
    (a response that began: must never be resent)."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests_per_connection: list[int] = []
        self.lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def requests(self) -> int:
        with self.lock:
            return sum(self.requests_per_connection)

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self._conns.append(conn)
                self.requests_per_connection.append(0)
                index = len(self.requests_per_connection) - 1
            threading.Thread(target=self._serve, args=(conn, index), daemon=True).start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        buffer = bytearray()
        served = 0
        try:
            while True:
                request = _read_request(conn, buffer)
                if request is None:
                    return
                with self.lock:
                    self.requests_per_connection[index] += 1
                if self.mode == "silent":
                    continue
                if served >= 1:
                    if self.mode == "break_reused":
                        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
                    return  # close: the reused connection fails
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(CHAT_RESPONSE), CHAT_RESPONSE)
                )
                served += 1
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        self._closing = True
        self.listener.close()
        with self.lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()


class OneConnectionBackend:
    """Reads one request on one connection, then `answer(conn)` writes what it likes.
    A subclass sets its own fields before calling `__init__` (the thread starts there)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            if _read_request(conn, bytearray()) is not None:
                self.answer(conn)

    def answer(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.listener.close()
