"""The README's first command: `make demo` runs `sluice serve --demo` in the checkout (the
example config in ./presets and the simulator on :8100), and the README's curl line,
pointed at it, streams an answer (the precise or the creative preset: up to 512 or 1,024
tokens at the simulator's 10 ms apart)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.fixtures import REPO, ProcessServer, sluice_cmd

DEMO_SIM_PORT = 8100


def _readme_curl() -> str:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```sh\n(curl -N [^`]*?)```", readme)
    assert block is not None, "the README has no curl example"
    return block.group(1)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_make_demo_runs_the_demo() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:.*\n\t.*sluice serve --demo$", makefile, re.M)


def test_the_readme_curl_streams_from_the_demo(tmp_path: Path) -> None:
    assert not _port_open(DEMO_SIM_PORT), "something else listens on the demo's port 8100"
    # A copy of the checkout's ./presets: the demo writes its records database beside it.
    shutil.copytree(REPO / "presets", tmp_path / "presets")
    demo = ProcessServer(sluice_cmd("serve", "--demo", "--port", "0"), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 10
        while not any("curl -N" in line for line in demo.stdout_lines):
            assert time.monotonic() < deadline, "the demo printed no curl line"
            time.sleep(0.05)
        printed = "".join(demo.stdout_lines)
        assert f"curl -N {demo.url}/v1/chat/completions" in printed
        # The README's line as written, but for the port (the test asks for any free one).
        command = _readme_curl().replace("http://127.0.0.1:8000", demo.url)
        assert demo.url in command
        out = subprocess.run(
            ["bash", "-c", command.rstrip() + " --silent --show-error --max-time 60"],
            check=False,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert out.returncode == 0, out.stderr
        events = [line for line in out.stdout.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]", out.stdout[-500:]
        assert any('"content":"' in e and '"content":""' not in e for e in events), out.stdout
    finally:
        assert demo.stop() == 0
    # The simulator the demo started went with it.
    deadline = time.monotonic() + 10
    while _port_open(DEMO_SIM_PORT):
        assert time.monotonic() < deadline, "the demo's simulator outlived the proxy"
        time.sleep(0.1)
