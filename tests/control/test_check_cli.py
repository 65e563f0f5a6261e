"""`sluice check` (as a subprocess: exit status and output) and `sluice config show`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sluice.control.cli import main

from tests.control.fixtures import EXAMPLES, GATEWAY, REPO, Writer


def sluice(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return subprocess.run(
        [sys.executable, "-m", "sluice.control.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_valid_directory_exits_0(config_dir: Writer) -> None:
    directory = config_dir()
    result = sluice("check", "presets", cwd=directory.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith("OK presets: version ")
    assert line.endswith(", 1 preset, 1 policy, 1 route, 1 app, 0 experiments")
    assert result.stderr == ""


def test_check_invalid_directory_exits_1_with_every_error(config_dir: Writer) -> None:
    directory = config_dir(
        {
            "precise.yaml": "kind: Preset\ngeneration:\n  temprature: 0.3\n",
            "chat.yaml": "kind: Policy\ntimeouts: {total: -1}\n",
        }
    )
    result = sluice("check", "presets", cwd=directory.parent)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "presets/chat.yaml:2:19: timeouts.total: a duration must be > 0, got -1",
        "presets/precise.yaml:3:3: generation.temprature: unknown key 'temprature' "
        "(did you mean 'temperature'?)",
        "FAILED presets: 2 errors",
    ]


def test_check_prints_warnings_and_still_passes() -> None:
    result = sluice("check", "presets", cwd=REPO)
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "presets/gateway.yaml:8:16: admin.token: warning: env:SLUICE_ADMIN_TOKEN is unset or "
        "empty in this environment; the admin API is disabled"
    )
    assert lines[-1].startswith("OK presets: version ")
    assert lines[-1].endswith("4 presets, 2 policies, 2 routes, 2 apps, 1 experiment, 2 warnings")


def test_check_missing_directory(tmp_path: Path) -> None:
    result = sluice("check", "nope", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["nope: no such directory", "FAILED nope: 1 error"]


def test_config_show_prints_resolved_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--config", str(EXAMPLES)]) == 0
    out = capsys.readouterr().out
    assert "  deterministic:\n" in out
    assert "    extends: precise                # chain: deterministic <- precise\n" in out
    assert "      do_sample: false              # -> temperature: 0.0, force\n" in out
    assert (
        "      max_new_tokens: 512           # -> max_tokens: 512, clamp [1, 1024] (from precise)"
        in out
    )
    assert '    stop: ["###", "\\n\\nUser:", "\\n\\nHuman:"]\n' in out
    assert (
        "    timeouts: {first_token: 30s, inter_token: 5s, total: 300s, response_head: 60s}\n"
        in out
    )
    assert "  chat: {backend: sim, upstream_model: sim-model, preset: precise" in out


def test_config_show_invalid(config_dir: Writer, capsys: pytest.CaptureFixture[str]) -> None:
    config_dir({"x.yaml": ""})
    assert main(["config", "show", "--config", "presets"]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "FAILED presets: 1 error"


REPLICAS = """\
edge:
  nginx:
    server_name: api.example.com
    replicas: ["10.0.0.1:8000", "10.0.0.2:8000"]
"""
SHARED = """\
limits: {store: "redis://127.0.0.1:6379/0"}
cache_isolation: {secret: env:SLUICE_SALT}
records: {url: env:SLUICE_RECORDS_URL}
"""


def test_check_warns_when_replicas_share_nothing(config_dir: Writer) -> None:
    """Two replicas behind nginx, each with its own limits, cache-salt key and SQLite
    records: warnings at the replicas list (not errors: one host may list several
    replicas in a test), none once the three are shared."""
    directory = config_dir({"gateway.yaml": GATEWAY + REPLICAS})
    result = sluice("check", "presets", cwd=directory.parent)
    assert result.returncode == 0, result.stdout
    at = "presets/gateway.yaml:11:15: edge.nginx.replicas: warning: 2 replicas"
    replica_lines = [line for line in result.stdout.splitlines() if line.startswith(at)]
    assert len(replica_lines) == 3, result.stdout
    store, salt, records = replica_lines
    assert "no limits.store" in store and "set limits.store" in store
    assert "no cache_isolation.secret" in salt and "set cache_isolation.secret" in salt
    assert "records.path" in records and "set records.url" in records

    config_dir({"gateway.yaml": GATEWAY + REPLICAS + SHARED})
    shared = sluice("check", "presets", cwd=directory.parent)
    assert shared.returncode == 0, shared.stdout
    assert "edge.nginx.replicas" not in shared.stdout
    one = REPLICAS.replace(', "10.0.0.2:8000"', "")
    config_dir({"gateway.yaml": GATEWAY + one})
    assert "edge.nginx.replicas" not in sluice("check", "presets", cwd=directory.parent).stdout
