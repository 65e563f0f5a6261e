"""`limits.store` holding a Redis URL that the client cannot use (a port that is not one, a
broken IPv6 address, a query option it cannot read) is a config error at `sluice check`,
at start and at reload, with its file and line; in an env:VAR it is a one-line error at
start, before any worker starts (it used to crash `sluice serve` with a traceback, and
the supervisor restarted the crashing workers forever)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sluice.control.config.build import BuiltConfig
from sluice.control.errors import CliError
from sluice.control.runtime.limits import store_url
from sluice.control.runtime.reloader import ConfigReloader

from tests.control.fixtures import GATEWAY, Writer, built, issues_of

BAD = [
    ("redis://127.0.0.1:notaport/0", "expected a port, 0 to 65535"),
    ("redis://127.0.0.1:99999/0", "expected a port, 0 to 65535"),
    ("redis://[::1/0", "invalid IPv6 address"),
    (
        "redis://127.0.0.1:6379/0?socket_timeout=abc",
        "Invalid value for 'socket_timeout' in connection URL",
    ),
    ("redis://127.0.0.1:6379/0?colour=blue", "unknown option 'colour' for redis://"),
    ("unix://", "expected the socket's path: unix:///path/to/redis.sock"),
]


def _with_store(store: str) -> str:
    return GATEWAY + f'limits: {{store: "{store}"}}\n'


@pytest.mark.parametrize(("url", "why"), BAD)
def test_an_unusable_store_url_is_a_config_error(config_dir: Writer, url: str, why: str) -> None:
    assert issues_of(config_dir({"gateway.yaml": _with_store(url)})) == [
        f"presets/gateway.yaml:8:17: limits.store: not a usable Redis URL: {why}"
    ]


def test_usable_store_urls_pass(config_dir: Writer) -> None:
    for url in ("redis://127.0.0.1:6379/0", "rediss://:pw@[::1]:6380/1", "unix:///run/r.sock"):
        config = built(config_dir({"gateway.yaml": _with_store(url)}))
        assert config.gateway is not None and config.gateway.limits.store == url


def test_sluice_check_names_the_line(config_dir: Writer) -> None:
    directory = config_dir({"gateway.yaml": _with_store("redis://127.0.0.1:99999/0")})
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    result = subprocess.run(
        [sys.executable, "-m", "sluice.control.cli", "check", "presets"],
        cwd=directory.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "presets/gateway.yaml:8:17: limits.store: not a usable Redis URL: "
        "expected a port, 0 to 65535",
        "FAILED presets: 1 error",
    ]


def test_a_reload_to_an_unusable_store_url_is_refused(config_dir: Writer) -> None:
    directory = config_dir({"gateway.yaml": _with_store("redis://127.0.0.1:6379/0")})
    applied: list[BuiltConfig] = []
    reloader = ConfigReloader(directory, applied.append)
    (directory / "gateway.yaml").write_text(_with_store("redis://[::1/0"))
    result = reloader.reload_now()
    assert result.result == "error" and applied == []
    assert reloader.last_error is not None
    assert "presets/gateway.yaml:8:17: limits.store: not a usable Redis URL: " in (
        reloader.last_error
    )


def test_an_unusable_url_in_the_variable_is_a_cli_error(config_dir: Writer) -> None:
    config = built(config_dir({"gateway.yaml": _with_store("env:REDIS_URL")}))
    with pytest.raises(CliError) as info:
        store_url(config, {"REDIS_URL": "redis://127.0.0.1:notaport/0"})
    assert str(info.value) == (
        "limits.store is env:REDIS_URL but $REDIS_URL is not a usable Redis URL: "
        "expected a port, 0 to 65535"
    )
    assert store_url(config, {"REDIS_URL": "redis://127.0.0.1:6379/0"}) == (
        "redis://127.0.0.1:6379/0"
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_stops_with_one_line(config_dir: Writer, workers: str) -> None:
    directory = config_dir({"gateway.yaml": _with_store("env:SLUICE_TEST_STORE")})
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env["SLUICE_TEST_STORE"] = "redis://127.0.0.1:6379/0?socket_timeout=abc"
    argv = ["serve", "--config", "presets", "--host", "127.0.0.1", "--port", "0"]
    result = subprocess.run(
        [sys.executable, "-m", "sluice.control.cli", *argv, "--workers", workers],
        cwd=directory.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.splitlines()[-1] == (
        "sluice serve: limits.store is env:SLUICE_TEST_STORE but $SLUICE_TEST_STORE is not a "
        "usable Redis URL: Invalid value for 'socket_timeout' in connection URL"
    )
