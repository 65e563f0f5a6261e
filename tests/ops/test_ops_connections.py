"""`sluice serve --max-connections`: the open client connections one process takes."""

from __future__ import annotations

import socket
import subprocess
import time

from tests.fixtures import ProcessServer, sluice_cmd


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def _answer(sock: socket.socket) -> bytes:
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_connections_beyond_max_connections_get_503() -> None:
    # No backend is reached: /healthz is sluice's own.
    argv = ["serve", "--host", "127.0.0.1", "--port", "0", "--backend", "http://127.0.0.1:9"]
    server = ProcessServer(sluice_cmd(*argv, "--max-connections", "2"))
    try:
        held = [_connect(server.port) for _ in range(2)]
        time.sleep(0.2)  # both accepted before the third
        with _connect(server.port) as third:
            refused = _answer(third)
        assert refused.startswith(b"HTTP/1.1 503") and b"too_many_connections" in refused
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 5
        while True:  # room again once the server has seen them close
            with _connect(server.port) as again:
                answer = _answer(again)
            if answer.startswith(b"HTTP/1.1 200") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    finally:
        server.stop()


def test_max_connections_below_one_is_refused() -> None:
    argv = sluice_cmd("serve", "--backend", "http://127.0.0.1:9", "--max-connections", "0")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 1
    assert out.stderr.strip().endswith("--max-connections must be at least 1")
