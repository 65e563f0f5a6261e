"""Helpers of the end-to-end reload tests: a config directory the test edits the way
editors save, a real `sluice serve` process, and the versions each edit must produce.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx
from sluice.control.config.build import ConfigInvalid, load_config

from tests.fixtures import ProcessServer, key_line, sluice_cmd

ADMIN_TOKEN = "adm-reload-e2e-token"
PICKER_KEY = "sk-reload-picker"  # may choose a preset with x-sluice-preset
FIXED_KEY = "sk-reload-fixed"  # may not; gets `alt` where a route names no preset
DEADLINE_S = 3.0  # a reload that takes longer than this is a failure, not a slow machine
POLL_S = 0.005


GATEWAY = """\
kind: Gateway
admin: {{token: env:SLUICE_ADMIN_TOKEN}}
backends:
  - {{name: sim, urls: ["{sim_url}"], max_concurrency: 512, queue: {{max: 1024, max_wait: 10s}}}}
routes:
  - {{model: chat, backend: sim, upstream_model: sim-model, preset: modes, policy: guard}}
  - {{model: ab, backend: sim, upstream_model: sim-model, policy: guard}}
  - {{model: bare, backend: sim, upstream_model: sim-model}}
apps:
  - {{name: picker, keys: ["{picker}"], allow_preset_header: true}}
  - {{name: fixed, keys: ["{fixed}"], default_preset: alt}}
experiments:
  - name: split
    route: ab
    sticky: header:x-user-id
    variants:
      - {{name: a, preset: modes, weight: 1}}
      - {{name: b, preset: alt, weight: 1}}
"""

# One field per policy mode: defaults (top_p, top_k), force (repetition_penalty), clamp at
# both bounds (temperature, max_new_tokens -> max_tokens and max_completion_tokens), deny
# (num_return_sequences -> n, seed). Block style: one setting per line, so editors and
# `sed` change one line and every line-prefix of the file is itself a valid preset.
MODES = """\
kind: Preset
generation:
  temperature: 0.3
  top_p: 0.9
  top_k: 40
  repetition_penalty: 1.1
  max_new_tokens: 16
policy:
  temperature: {clamp: [0.2, 0.8]}
  repetition_penalty: force
  max_new_tokens: {clamp: [4, 32]}
  num_return_sequences: deny
  seed: deny
"""

ALT = """\
kind: Preset
generation:
  do_sample: false
  top_p: 0.5
  max_new_tokens: 8
policy:
  do_sample: force
"""

GUARD = """\
kind: Policy
stop: ["###"]
"""

MODES_TEMPERATURE = 0.3  # what MODES sends as `temperature` when the request sets none


def base_files(sim_url: str) -> dict[str, str]:
    gateway = GATEWAY.format(
        sim_url=sim_url, picker=key_line(PICKER_KEY), fixed=key_line(FIXED_KEY)
    )
    return {"gateway.yaml": gateway, "modes.yaml": MODES, "alt.yaml": ALT, "guard.yaml": GUARD}


def modes_with_temperature(temperature: float) -> str:
    text = MODES.replace("temperature: 0.3\n", f"temperature: {temperature}\n")
    assert text != MODES or temperature == MODES_TEMPERATURE
    return text


def expected_version(files: Mapping[str, str]) -> str:
    """The version `sluice serve` must report for a directory holding exactly `files`,
    computed by the one loader on a scratch copy (the hash covers names and bytes only)."""
    with tempfile.TemporaryDirectory(prefix="sluice-expect-") as scratch:
        for name, text in files.items():
            (Path(scratch) / name).write_text(text, encoding="utf-8")
        return load_config(Path(scratch)).version


def is_valid(files: Mapping[str, str]) -> bool:
    try:
        expected_version(files)
    except ConfigInvalid:
        return False
    return True


class ConfigDir:
    """The directory `sluice serve --config` watches, and what the test last wrote to it."""

    def __init__(self, path: Path, files: Mapping[str, str]) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.files = dict(files)
        for name, text in self.files.items():
            (path / name).write_text(text, encoding="utf-8")

    def version(self) -> str:
        return expected_version(self.files)

    def with_file(self, name: str, text: str) -> dict[str, str]:
        return {**self.files, name: text}

    def save(self, name: str, text: str, style: Callable[[Path, str], None]) -> str | None:
        """Saves `name` the way `style` does; returns the version the result must have
        (None: the directory is now invalid)."""
        style(self.path / name, text)
        self.files[name] = text
        return self.version() if is_valid(self.files) else None


# -- the ways editors and tools save a file ---------------------------------------------------


def write_in_place(path: Path, text: str) -> None:
    """The same inode rewritten from offset 0, no O_TRUNC at open (editors with
    backupcopy=yes, `cat new > file` through an open fd)."""
    with path.open("r+b") as f:
        f.write(text.encode())
        f.truncate()


def truncate_and_write(path: Path, text: str) -> None:
    """open(O_TRUNC) then write: the file is empty for a moment."""
    with path.open("wb") as f:
        f.write(text.encode())


def write_temp_and_mv(path: Path, text: str) -> None:
    """A temporary file in the same directory renamed over the original by `mv`."""
    temp = path.with_name(path.name + ".new")
    temp.write_text(text, encoding="utf-8")
    subprocess.run(["mv", "-f", str(temp), str(path)], check=True, timeout=10)


def mv_from_another_dir(path: Path, text: str) -> None:
    """Written elsewhere on the same file system, then moved in: the directory sees only
    the rename's arrival (IN_MOVED_TO), no write."""
    outside = path.parent.parent / f"{path.name}.outside"
    outside.write_text(text, encoding="utf-8")
    subprocess.run(["mv", "-f", str(outside), str(path)], check=True, timeout=10)


def vim_style(path: Path, text: str) -> None:
    """vim's default (backupcopy=auto on a plain file): rename the original to `name~`,
    write a new file under the name, delete the backup."""
    backup = path.with_name(path.name + "~")
    os.rename(path, backup)
    path.write_text(text, encoding="utf-8")
    backup.unlink()


def sed_in_place(path: Path, text: str) -> None:
    """The real `sed -i` (it writes ./sedXXXXXX and renames it over the file), changing
    the one line that differs."""
    old = path.read_text(encoding="utf-8").splitlines()
    new = text.splitlines()
    changed = [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b]
    assert len(old) == len(new) and len(changed) == 1, "sed_in_place edits exactly one line"
    line = changed[0]
    replacement = re.sub(r"([\\/&])", r"\\\1", new[line])
    script = f"{line + 1}s/.*/{replacement}/"
    subprocess.run(["sed", "-i", script, str(path)], check=True, timeout=10)
    assert path.read_text(encoding="utf-8") == text


def delete_and_recreate(path: Path, text: str) -> None:
    path.unlink()
    path.write_text(text, encoding="utf-8")


SAVE_STYLES: dict[str, Callable[[Path, str], None]] = {
    "in-place": write_in_place,
    "truncate-and-write": truncate_and_write,
    "temp-and-mv": write_temp_and_mv,
    "mv-from-another-dir": mv_from_another_dir,
    "vim": vim_style,
    "sed-i": sed_in_place,
    "delete-and-recreate": delete_and_recreate,
}


# -- the gateway process ------------------------------------------------------------------------


class Gateway:
    """`sluice serve --config DIR --port 0` as a child process, and what tests ask of it."""

    def __init__(self, config: ConfigDir, cwd: Path, *extra: str) -> None:
        self.config = config
        self.cwd = cwd
        argv = sluice_cmd("serve", "--config", str(config.path), "--port", "0", *extra)
        self.server = ProcessServer(argv, env={"SLUICE_ADMIN_TOKEN": ADMIN_TOKEN}, cwd=cwd)
        self.url = self.server.url
        self.client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(10.0))
        self.admin_headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}

    def cache_salt(self, app: str) -> str:
        """The cache_salt sluice sends for `app`: HMAC-SHA256 of the app name under the key
        it generated into its working directory."""
        key = bytes.fromhex((self.cwd / "sluice-cache-salt.key").read_text().strip())
        return hmac.new(key, app.encode(), hashlib.sha256).hexdigest()

    def wait_watching(self) -> None:
        """Waits until the watcher is live: the reloader then checks the files once (edits
        made since start-up are applied by that check; later ones raise events)."""
        self.wait_logged("config_watch_live")
        self.wait_until(lambda s: sum(s["reloads"].values()) >= 1, "the live watcher's check")

    # versions

    def served_version(self, client: httpx.Client | None = None) -> str:
        """The x-sluice-config of a cheap authenticated request (no backend involved)."""
        resp = (client or self.client).get(
            "/v1/models", headers={"authorization": f"Bearer {PICKER_KEY}"}
        )
        assert resp.status_code == 200, resp.text
        return resp.headers["x-sluice-config"]

    def wait_for_version(self, expected: str, timeout: float = DEADLINE_S) -> float:
        """Polls until `expected` is served; returns the seconds it took."""
        start = time.monotonic()
        seen: list[str] = []
        while True:
            version = self.served_version()
            if version == expected:
                return time.monotonic() - start
            if not seen or seen[-1] != version:
                seen.append(version)
            if time.monotonic() - start > timeout:
                raise AssertionError(
                    f"version {expected} not served within {timeout}s; served {seen}; "
                    f"admin: {self.admin_config()}"
                )
            time.sleep(POLL_S)

    def wait_until(self, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """Polls GET /admin/config until `predicate` holds; returns the state."""
        deadline = time.monotonic() + DEADLINE_S
        while True:
            state = self.admin_config()
            if predicate(state):
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {state}")
            time.sleep(0.02)

    # admin API and metrics

    def admin_config(self) -> dict[str, Any]:
        resp = self.client.get("/admin/config", headers=self.admin_headers)
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    def post_reload(self) -> httpx.Response:
        return self.client.post("/admin/reload", headers=self.admin_headers)

    def reload_metric(self) -> dict[str, float]:
        """sluice_config_reload_total by result label (0 for results never counted)."""
        text = self.client.get("/metrics").text
        counts = {"ok": 0.0, "error": 0.0, "unchanged": 0.0}
        for match in re.finditer(
            r'^sluice_config_reload_total\{result="(\w+)"\} (\S+)$', text, re.M
        ):
            counts[match.group(1)] = float(match.group(2))
        return counts

    def sighup(self) -> None:
        self.server.proc.send_signal(signal.SIGHUP)

    # logs (JSON lines on stderr)

    def log_events(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.server.json_logs() if e.get("event") == event]

    def wait_logged(self, event: str, count: int = 1) -> list[dict[str, Any]]:
        """The `event` lines once there are at least `count` (a line is written just after
        the state that admin and the served version show, and read by a drain thread)."""
        deadline = time.monotonic() + DEADLINE_S
        while len(found := self.log_events(event)) < count:
            assert time.monotonic() < deadline, f"{count} {event} lines never came: {found}"
            time.sleep(0.01)
        return found

    def reloaded_versions(self, at_least: int = 0) -> list[str]:
        """Every version a reload applied, in order (one config_reloaded line per apply)."""
        return [e["version"] for e in self.wait_logged("config_reloaded", at_least)]

    def close(self) -> None:
        self.client.close()
        self.server.stop()


StartGateway = Callable[..., Gateway]  # the start_gateway fixture


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": "chat", "messages": [{"role": "user", "content": "Hello"}], **fields}


def auth(key: str = PICKER_KEY, **headers: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", **headers}


def sim_request(sim_url: str, request_id: str, timeout: float = DEADLINE_S) -> dict[str, Any]:
    """The request the simulator logged with this x-request-id (polls: it logs on arrival)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [
            r
            for r in httpx.get(sim_url + "/sim/requests", timeout=5).json()
            if r["x_request_id"] == request_id
        ]
        if found:
            assert len(found) == 1, found
            return dict(found[0])
        if time.monotonic() > deadline:
            raise AssertionError(f"the simulator never received request {request_id}")
        time.sleep(0.01)


def sim_request_ids(sim_url: str) -> set[str]:
    return {r["x_request_id"] for r in httpx.get(sim_url + "/sim/requests", timeout=5).json()}


# -- which worker process holds a connection (--workers N shares the port) ----------------------


def connection_owner(client_port: int, server_port: int, pids: Iterable[int]) -> int | None:
    """The pid among `pids` holding the server side of the loopback TCP connection from
    `client_port` to `server_port` (found through /proc/net/tcp and /proc/PID/fd)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if (
                int(local.rsplit(":", 1)[1], 16) == server_port
                and int(remote.rsplit(":", 1)[1], 16) == client_port
                and inode != "0"
            ):
                inodes.add(f"socket:[{inode}]")
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return pid
            except OSError:
                continue
    return None


class PinnedClient:
    """One keep-alive connection, so one worker; `pid` is the worker that accepted it."""

    def __init__(self, url: str, worker_pids: Iterable[int]) -> None:
        self.client = httpx.Client(
            base_url=url,
            timeout=httpx.Timeout(10.0),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )
        resp = self.client.get("/v1/models", headers={"authorization": f"Bearer {PICKER_KEY}"})
        assert resp.status_code == 200, resp.text
        _, client_port = resp.extensions["network_stream"].get_extra_info("client_addr")
        server_port = int(url.rsplit(":", 1)[1])
        self.pid = connection_owner(client_port, server_port, worker_pids)
        self.port = client_port

    def version(self) -> str:
        resp = self.client.get("/v1/models", headers={"authorization": f"Bearer {PICKER_KEY}"})
        assert resp.status_code == 200, resp.text
        _, port = resp.extensions["network_stream"].get_extra_info("client_addr")
        assert port == self.port, "the pinned connection was replaced"
        return resp.headers["x-sluice-config"]

    def admin_config(self) -> dict[str, Any]:
        resp = self.client.get("/admin/config", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    def close(self) -> None:
        self.client.close()
