"""Fixtures for the control-plane tests: real config directories in tmp dirs."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.control.fixtures import BASE, Writer


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Writer]:
    """write(files, base=True) -> a `presets` directory under tmp_path (the cwd)."""
    monkeypatch.chdir(tmp_path)
    directory = tmp_path / "presets"

    def write(files: dict[str, str] | None = None, *, base: bool = True) -> Path:
        directory.mkdir(exist_ok=True)
        merged = {**(BASE if base else {}), **(files or {})}
        for name, text in merged.items():
            (directory / name).write_text(textwrap.dedent(text), encoding="utf-8")
        return directory

    yield write
