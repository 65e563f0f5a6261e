"""`sluice check` (as a subprocess: exit status and output) and `sluice config show`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sluice.control.cli import main

from tests.control.fixtures import EXAMPLES, REPO, Writer


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
