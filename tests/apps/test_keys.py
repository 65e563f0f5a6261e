"""`sluice key new APP`, and keys in files: hashes only, `sluice check` refuses plaintext."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import httpx

from tests.apps.fixtures import AppsProxy, build, chat, write_config
from tests.fixtures import ProcessServer, sluice_cmd

KEY_RE = re.compile(r"^  (sk-sluice-[A-Za-z0-9_-]{43})$", re.MULTILINE)
HASH_RE = re.compile(r'^  - "(sha256:[0-9a-f]{64})"  # support-bot$', re.MULTILINE)


def sluice(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sluice_cmd(*args), capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


def new_key() -> tuple[str, str, str]:
    done = sluice("key", "new", "support-bot")
    assert done.returncode == 0, done.stderr
    key, line = KEY_RE.search(done.stdout), HASH_RE.search(done.stdout)
    assert key is not None and line is not None, done.stdout
    return key.group(1), line.group(1), done.stdout


def test_key_new_prints_a_key_once_with_its_hash_line() -> None:
    key, digest, out = new_key()
    assert digest == "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    assert out.count(key) == 1
    assert "shown only now" in out
    other, _, _ = new_key()
    assert other != key


def test_key_new_refuses_a_bad_app_name() -> None:
    done = sluice("key", "new", "no spaces")
    assert done.returncode == 1
    assert done.stderr.startswith("sluice key: app name:")
    assert "sk-" not in done.stdout


def test_the_pasted_line_lets_the_key_in(tmp_path: Path, sim: ProcessServer) -> None:
    key, digest, _ = new_key()
    gateway = f"""\
        kind: Gateway
        backends: [{{name: sim, urls: ["{sim.url}"]}}]
        routes: [{{model: chat, backend: sim, upstream_model: sim-model}}]
        apps:
          - name: support-bot
            keys:
              - "{digest}"  # support-bot
        records: {{path: null}}
        """
    proxy = AppsProxy(build(write_config(tmp_path / "presets", gateway)))
    try:
        with httpx.Client(timeout=10) as client:
            assert chat(client, proxy.url, key, max_tokens=1).status_code == 200
            assert chat(client, proxy.url, digest, max_tokens=1).status_code == 401
    finally:
        proxy.close()


def test_check_refuses_a_plaintext_key_without_echoing_it(tmp_path: Path) -> None:
    write_config(
        tmp_path / "presets",
        """\
        kind: Gateway
        backends: [{name: sim, urls: ["http://127.0.0.1:8100"]}]
        routes: [{model: chat, backend: sim}]
        apps:
          - {name: bot, keys: ["sk-live-plaintext-123"]}
        """,
    )
    done = sluice("check", "presets", cwd=tmp_path)
    assert done.returncode == 1
    assert "presets/gateway.yaml:5:" in done.stdout + done.stderr
    assert "plaintext secret" in done.stdout + done.stderr
    assert "sk-live-plaintext-123" not in done.stdout + done.stderr
