"""The simulator as real clients see it: `sluice sim` as a process, the openai SDK, httpx."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

LISTENING = re.compile(r"^sluice sim listening on http://127\.0\.0\.1:(\d+) model=(\S+)$")


def sluice_command() -> list[str]:
    script = Path(sys.executable).parent / "sluice"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "sluice.control.cli"]


def wait_for_line(proc: subprocess.Popen[str], within: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], within)
    assert ready, "no listening line in time"
    return proc.stdout.readline().strip()


@pytest.fixture
def sim_process() -> Iterator[tuple[subprocess.Popen[str], int]]:
    command = [*sluice_command(), "sim", "--port", "0", "--model", "proc-model"]
    command += ["--ttft-ms", "1", "--itl-ms", "1", "--max-tokens", "5", "--seed", "3"]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        line = wait_for_line(proc, 15.0)
        match = LISTENING.match(line)
        assert match, line
        assert match.group(2) == "proc-model"
        yield proc, int(match.group(1))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_cli_serves_and_exits_cleanly_on_sigint(sim_process):
    proc, port = sim_process
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        body = {"messages": [{"role": "user", "content": "hi"}]}
        reply = client.post("/v1/chat/completions", json=body).json()
        assert reply["model"] == "proc-model"
        assert reply["usage"]["completion_tokens"] == 5  # --max-tokens
        stalled = {**body, "stream": True, "sim": {"stall_after": 1}}
        with client.stream("POST", "/v1/chat/completions", json=stalled) as stream:
            assert stream.status_code == 200
            # An open stream does not hold up the shutdown.
            proc.send_signal(signal.SIGINT)
            assert proc.wait(5) == 0
    assert proc.stderr is not None and proc.stderr.read() == ""


def test_cli_exits_cleanly_on_sigterm(sim_process):
    proc, port = sim_process
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    assert time.monotonic() - start < 3


def test_cli_reports_a_busy_port(sim_process):
    _, port = sim_process
    second = subprocess.run(
        [*sluice_command(), "sim", "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    assert second.returncode == 1
    assert second.stderr.startswith("sluice sim: cannot listen on 127.0.0.1:")


@pytest.fixture
def client(sim) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{sim.url}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


def test_openai_sdk_chat(client):
    stream = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 7
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and set(finals[:-1]) == {None}
    whole = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "Hello"}], max_tokens=7
    )
    assert whole.choices[0].message.content == text
    assert whole.usage is not None and whole.usage.completion_tokens == 7
    assert whole.system_fingerprint == "vllm-0.26.0-nohash"


def test_openai_sdk_completions(client):
    stream = client.completions.create(
        model="tiny-llama",
        prompt="Once upon",
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"sim": {"tokens_per_chunk": 2}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert len([c for c in chunks if c.choices]) == 4  # 1 + 2 + 2 + 1
    whole = client.completions.create(model="tiny-llama", prompt="Once upon", max_tokens=6)
    assert whole.choices[0].text == text
    assert whole.usage is not None and whole.usage.prompt_tokens > 0


def test_openai_sdk_errors(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert missing.value.status_code == 404
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "x"}], temperature=-1
        )
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": "x"}],
            extra_body={"sim": {"status": 503}},
        )
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]
