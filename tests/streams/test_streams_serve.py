"""The stream features from a config directory through `sluice serve` (a real process):
the Policy fields parse into the snapshot, the WebSocket hook is wired, a guarded
resumable route resumes byte for byte, and a bad value is a file:line error."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets

from tests.fixtures import ProcessServer, sluice_cmd
from tests.streams.fixtures import raw_stream, text_of

GATEWAY = """kind: Gateway
listen: {{host: 127.0.0.1, port: 8000}}
backends:
  - {{name: sim, urls: ["{sim}"], max_concurrency: 8}}
routes:
  - {{model: chat, backend: sim, upstream_model: sim-model, policy: resumable}}
"""
POLICY = """kind: Policy
name: resumable
stop: ["zebra"]
keepalive_interval: 1s
resume_window: 5s
resume_buffer: {buffer}
"""
BODY = {
    "model": "chat",
    "messages": [{"role": "user", "content": "A long story"}],
    "stream": True,
    "max_tokens": 50,
    "seed": 5,
}


def write(directory: Path, sim_url: str, buffer: int = 65536) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "gateway.yaml").write_text(GATEWAY.format(sim=sim_url))
    (directory / "policies.yaml").write_text(POLICY.format(buffer=buffer))
    return directory


@pytest.fixture
def served(sim: ProcessServer, tmp_path: Path) -> Iterator[ProcessServer]:
    config = write(tmp_path / "config", sim.url)
    server = ProcessServer(sluice_cmd("serve", "--config", str(config), "--port", "0"))
    yield server
    server.stop()


def test_resume_and_websocket_through_sluice_serve(served: ProcessServer) -> None:
    full = raw_stream(served.url, "POST", "/v1/chat/completions", BODY)
    assert full.complete and full.data_events()[0].id is not None
    first = raw_stream(served.url, "POST", "/v1/chat/completions", BODY, stop_after=7)
    rid = first.headers["x-request-id"]
    rest = raw_stream(
        served.url, "GET", f"/v1/streams/{rid}", None, {"last-event-id": first.last_id or ""}
    )
    assert rest.status == 200 and rest.complete
    assert text_of(first.data_events() + rest.data_events()) == full.text()

    async def over_websocket() -> list[str]:
        url = served.url.replace("http://", "ws://") + "/v1/chat/completions"
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({k: v for k, v in BODY.items() if k != "stream"}))
            return [str(m) async for m in ws]

    messages = asyncio.run(over_websocket())
    assert messages[-1] == "[DONE]"
    assert len(messages) == len(full.data_events())


def test_a_bad_resume_buffer_is_a_config_error(sim: ProcessServer, tmp_path: Path) -> None:
    config = write(tmp_path / "config", sim.url, buffer=10)
    result = subprocess.run(
        sluice_cmd("check", str(config)), capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert "policies.yaml:6" in result.stdout + result.stderr
    assert "resume_buffer" in result.stdout + result.stderr
