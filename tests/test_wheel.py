"""The built wheel installs into a fresh virtualenv and its `sluice` runs: the package
layout (folders mapped into the `sluice` namespace) and the package data are proven from
an installed wheel, not only from the editable install the other tests use."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures import REPO, ProcessServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _only_the_wheel() -> Iterator[None]:
    """Every process here (pip, the wheel's venv, its `sluice`) runs without the build
    `make test-compiled` puts on PYTHONPATH: pip would take that one for the installed
    sluice-gateway and skip the install, and the wheel's processes would import it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("PYTHONPATH", raising=False)
        yield


@pytest.fixture(scope="module")
def wheel_venv(_only_the_wheel: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    # Pure Python (SLUICE_COMPILE=0): this checks the layout and the package data; the
    # compiled wheel is the one `make test-compiled` runs the whole suite against.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-build-isolation",
            "--no-deps",
            "-w",
            str(dist),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
        env={**os.environ, "SLUICE_COMPILE": "0"},
    )
    (wheel,) = dist.glob("sluice_gateway-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/", 1)[0] for n in names if not n.startswith("sluice_gateway-")}
    assert top_level == {"sluice"}, top_level  # no generic `proxy` / `control` packages
    assert any(n.startswith("sluice/examples/") and n.endswith(".yaml") for n in names)
    assert any(n.startswith("sluice/edge/nginx/") for n in names)
    assert "sluice/client/__init__.py" in names  # the app developers' helper

    venv = root / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--quiet",
            "--no-deps",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # Dependencies come from the test environment's site-packages (added as a plain path:
    # its .pth files, including the editable install's finder, are not processed).
    site = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_wheel_layout_and_cli(wheel_venv: Path, tmp_path: Path) -> None:
    python = wheel_venv / "bin" / "python"
    where = subprocess.run(
        [
            str(python),
            "-c",
            "import sluice.proxy.http, sluice.control.cli, sluice.sim, sluice.client; print(sluice.proxy.http.__file__)",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout.strip()
    assert where.startswith(str(wheel_venv)), where
    out = subprocess.run(
        [str(wheel_venv / "bin" / "sluice"), "--help"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    for command in ("serve", "sim", "bench", "check", "render"):
        assert command in out.stdout


def test_wheel_sim_and_serve(wheel_venv: Path, tmp_path: Path) -> None:
    sluice = str(wheel_venv / "bin" / "sluice")
    sim = ProcessServer([sluice, "sim", "--port", "0"], cwd=tmp_path)
    try:
        # --backend and no config: every model goes to the backend unchanged.
        proxy = ProcessServer([sluice, "serve", "--port", "0", "--backend", sim.url], cwd=tmp_path)
        try:
            r = httpx.post(
                proxy.url + "/v1/chat/completions",
                json={
                    "model": "sim-model",
                    "max_tokens": 3,
                    "messages": [{"role": "user", "content": "hi"}],
                },
                timeout=10,
            )
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"]
        finally:
            assert proxy.stop() == 0
    finally:
        sim.stop()


def test_wheel_serves_the_packaged_example_config(wheel_venv: Path, tmp_path: Path) -> None:
    sluice = str(wheel_venv / "bin" / "sluice")
    # No ./presets here: `serve` falls back to the example config inside the wheel, whose
    # backend (the demo simulator on :8100) is not running in this test.
    proxy = ProcessServer([sluice, "serve", "--port", "0"], cwd=tmp_path)
    try:
        body = {"model": "chat", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=10)
        assert r.status_code == 401  # the example's apps are loaded: a key is required
        r = httpx.get(
            proxy.url + "/v1/models",
            headers={"authorization": "Bearer sk-demo-support"},
            timeout=10,
        )
        assert [m["id"] for m in r.json()["data"]] == ["chat"]  # support-bot may use chat only
    finally:
        assert proxy.stop() == 0


def test_wheel_renders_the_committed_edge_examples(wheel_venv: Path, tmp_path: Path) -> None:
    """The templates are package data: the installed wheel reproduces the examples."""
    site = subprocess.run(
        [
            str(wheel_venv / "bin" / "python"),
            "-c",
            "import importlib.util as u; print(list(u.find_spec('sluice.examples').submodule_search_locations)[0])",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    sluice = str(wheel_venv / "bin" / "sluice")
    out = tmp_path / "out"
    subprocess.run(
        [sluice, "render", "nginx", "--config", site, "--out", str(out)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    assert (out / "sluice.conf").read_text() == (
        REPO / "nginx" / "example" / "sluice.conf"
    ).read_text()
