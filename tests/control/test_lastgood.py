"""The last good config's file (control/runtime/lastgood.py): what a worker saves is what
a worker started again reads, and a file it cannot read is no config at all."""

from __future__ import annotations

from pathlib import Path

from sluice.control.config.build import build_config
from sluice.control.config.loader import read_config_files
from sluice.control.runtime import lastgood

from tests.fixtures import REPO


def test_saved_files_load_as_the_same_config(tmp_path: Path) -> None:
    files = read_config_files(REPO / "presets")
    path = tmp_path / "last-good.json"
    lastgood.save(path, files)
    loaded = lastgood.load(path, files.directory, files.display)
    assert loaded is not None and loaded.files == files.files
    assert build_config(loaded).version == build_config(files).version
    assert [p.name for p in tmp_path.iterdir()] == ["last-good.json"]  # no temporary left


def test_a_missing_or_damaged_file_is_no_config(tmp_path: Path) -> None:
    path = tmp_path / "last-good.json"
    assert lastgood.load(path, tmp_path, "cfg") is None
    for damaged in (b"", b"{", b'{"name": "x"}', b'[{"name": "a.yaml"}]', b'[{"data": 1}]'):
        path.write_bytes(damaged)
        assert lastgood.load(path, tmp_path, "cfg") is None, damaged


def test_a_file_that_cannot_be_written_is_logged_not_raised(tmp_path: Path) -> None:
    files = read_config_files(REPO / "presets")
    lastgood.save(tmp_path / "gone" / "last-good.json", files)  # no such directory
    assert not (tmp_path / "gone").exists()
