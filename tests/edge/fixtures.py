"""The real edge programs for the edge tests: nginx and workerd as child processes on
loopback, run from what `sluice render` wrote.

The binaries come from the project's setup (`make edge-deps`: Debian's nginx, workerd from
npm in cloudflare/node_modules). Locally a missing one skips its tests; in CI (CI set) it
fails them, so the edge tests cannot silently stop running there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
import yaml

from tests.fixtures import REPO, ProcessServer, sluice_cmd

NGINX_PATHS = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
WORKERD = REPO / "cloudflare" / "node_modules" / ".bin" / "workerd"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
ORIGIN_SECRET = "edge-test-origin-secret"


def missing(what: str, fix: str) -> None:
    message = f"{what} is missing ({fix})"
    if os.environ.get("CI"):
        pytest.fail(message + ": the edge tests must run in CI")
    pytest.skip(message)


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in NGINX_PATHS if os.access(p, os.X_OK)), None)
    if found is None:
        missing("nginx", "make edge-deps, or apt-get install nginx")
    assert found is not None
    return found


def workerd_binary() -> str:
    if not os.access(WORKERD, os.X_OK):
        missing("workerd", "make edge-deps, or cd cloudflare && npm ci")
    return str(WORKERD)


def openssl_binary() -> str:
    found = shutil.which("openssl")
    if found is None:
        missing("openssl", "apt-get install openssl")
    assert found is not None
    return found


def write_config(
    directory: Path, gateway: Mapping[str, Any], files: Mapping[str, str] | None = None
) -> Path:
    """A config directory: gateway.yaml from `gateway` (a dict), plus other files verbatim."""
    directory.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump({"kind": "Gateway", **gateway}, sort_keys=False)
    (directory / "gateway.yaml").write_text(text, encoding="utf-8")
    for name, content in (files or {}).items():
        (directory / name).write_text(content, encoding="utf-8")
    return directory


def render(kind: str, config: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """`sluice render KIND --config CONFIG --out OUT`, the command ops run."""
    argv = sluice_cmd("render", kind, "--config", str(config), "--out", str(out))
    result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result


def start_sluice(
    config: Path, env: Mapping[str, str] | None = None, backend: str | None = None
) -> ProcessServer:
    argv = sluice_cmd("serve", "--port", "0", "--config", str(config), "--log-level", "warning")
    return ProcessServer(argv + (["--backend", backend] if backend else []), env=env)


def wait_until_listening(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.02)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port}: {tail}")


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT)


class Nginx:
    """nginx in the foreground with a temp prefix, running the rendered `sluice.conf` from
    an nginx.conf that only adds what a distribution's main config would (events, temp
    paths), the way Debian includes conf.d/*.conf."""

    def __init__(self, rendered: Path, port: int) -> None:
        self.binary = nginx_binary()
        self.prefix = rendered
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.error_log = rendered / "error.log"
        # Workers run as root when the tests do, since pytest's temp dirs are 0700.
        user = "user root;\n" if os.geteuid() == 0 else ""
        temp = "\n".join(
            f"    {kind}_temp_path {rendered / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        self.conf = rendered / "nginx.conf"
        self.conf.write_text(
            f"{user}worker_processes 1;\nevents {{ worker_connections 1024; }}\n"
            f"http {{\n{temp}\n    include {rendered / 'sluice.conf'};\n}}\n"
        )
        self.globals = f"pid {rendered / 'nginx.pid'}; error_log {self.error_log} info;"
        self.proc: subprocess.Popen[bytes] | None = None

    def test_config(self) -> subprocess.CompletedProcess[str]:
        """`nginx -t` on the rendered config."""
        argv = [self.binary, "-t", "-p", str(self.prefix), "-c", str(self.conf)]
        return subprocess.run(
            [*argv, "-g", self.globals], check=False, capture_output=True, text=True, timeout=30
        )

    def start(self) -> Nginx:
        argv = [self.binary, "-p", str(self.prefix), "-c", str(self.conf)]
        output = self.prefix / "nginx.out"
        with output.open("wb") as out:
            self.proc = subprocess.Popen(
                [*argv, "-g", "daemon off; master_process on; " + self.globals],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        wait_until_listening(self.port, self.proc, "nginx", output)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM)  # fast shutdown: drops open streams

    def access_log(self, containing: str = "", timeout: float = 2.0) -> str:
        """The access log, once it holds `containing` (nginx writes a request's line after
        the client may already have read the response)."""
        path = self.prefix / "access.log"
        deadline = time.monotonic() + timeout
        while True:
            text = path.read_text() if path.exists() else ""
            if containing in text or time.monotonic() > deadline:
                return text
            time.sleep(0.02)


def nginx_stack_gateway(
    sim_url: str, sluice_port: int, nginx_port: int, prefix: Path, **nginx: Any
) -> dict[str, Any]:
    """A Gateway document whose edge.nginx points at one sluice replica on loopback."""
    return {
        "listen": {"host": "127.0.0.1", "port": sluice_port},
        "limits": {"max_body_bytes": 65536},
        "backends": [{"name": "sim", "urls": [sim_url]}],
        "routes": [{"model": "chat", "backend": "sim", "upstream_model": "sim-model"}],
        "edge": {
            "nginx": {
                "server_name": "localhost",
                "listen": nginx_port,
                "replicas": [f"127.0.0.1:{sluice_port}"],
                "access_log": str(prefix / "access.log"),
                **nginx,
            }
        },
    }


class Workerd:
    """The rendered worker.js in workerd, listening on a socket bound here (so its port is
    known before it starts), with the bindings wrangler.toml and `wrangler secret` give."""

    def __init__(self, rendered: Path, bindings: Mapping[str, str]) -> None:
        self.binary = workerd_binary()
        self.dir = rendered
        self.log = rendered / "workerd.log"
        compat = _compatibility_date(rendered / "wrangler.toml")
        text_bindings = ", ".join(
            f'(name = "{name}", text = "{value}")' for name, value in bindings.items()
        )
        (rendered / "config.capnp").write_text(
            'using Workerd = import "/workerd/workerd.capnp";\n'
            "const config :Workerd.Config = (\n"
            "  services = [\n"
            '    (name = "main", worker = .worker),\n'
            '    (name = "internet", network = (allow = ["public", "private", "local"])),\n'
            "  ],\n"
            '  sockets = [(name = "http", address = "127.0.0.1:0", http = (), service = "main")],\n'
            ");\n"
            "const worker :Workerd.Worker = (\n"
            '  modules = [(name = "worker.js", esModule = embed "worker.js")],\n'
            f'  compatibilityDate = "{compat}",\n'
            f"  bindings = [{text_bindings}],\n"
            '  globalOutbound = "internet",\n'
            ");\n"
        )
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Workerd:
        fd = self.sock.fileno()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, "serve", "config.capnp", "--socket-fd", f"http={fd}"],
                cwd=self.dir,
                pass_fds=(fd,),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.sock.close()  # the child holds it
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self.proc.poll() is None:
            # The socket accepts at once (backlog); an answer means the worker is loaded.
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(self.url + "/ready-probe", timeout=2.0)
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"workerd did not start: {self.log.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def _compatibility_date(wrangler: Path) -> str:
    return str(tomllib.loads(wrangler.read_text())["compatibility_date"])


async def websocket_exchange(url: str, path: str, request: dict[str, Any]) -> tuple[list[str], int]:
    """One completion over a WebSocket at `url` + `path`: its messages and close code."""
    messages: list[str] = []
    async with websockets.connect(url.replace("http://", "ws://") + path) as ws:
        await ws.send(json.dumps(request))
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                message = await ws.recv()
                assert isinstance(message, str)
                messages.append(message)
    assert ws.protocol.close_rcvd is not None
    return messages, ws.protocol.close_rcvd.code
