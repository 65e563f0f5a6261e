"""Hot reload of a real `sluice serve --config DIR`: every way editors save, invalid and
half-written files, SIGHUP and POST /admin/reload, and streams in flight across a swap.

What a reload applied is read from the process's own log: every applied snapshot logs
one `config_reloaded` line with its version, so "never applied" is checked exactly, not
by sampling responses.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sluice.control.config.build import load_config

from tests.fixtures import ProcessServer, StreamResult, sluice_cmd, stream_request
from tests.reload.fixtures import (
    MODES,
    SAVE_STYLES,
    ConfigDir,
    Gateway,
    StartGateway,
    auth,
    chat_body,
    is_valid,
    modes_with_temperature,
    sim_request,
)

NEW_MODES = modes_with_temperature(0.6)
INVALID_TEMPERATURE = MODES.replace("temperature: 0.3\n", "temperature: hot\n")
# The line `sluice check` prints for INVALID_TEMPERATURE (file path as the process shows it).
INVALID_LINE = re.compile(
    r"^\S*cfg/modes\.yaml:3:16: generation\.temperature: expected a number, "
    r'got the string "hot"$'
)


def sent_temperature(gateway: Gateway, sim: ProcessServer, request_id: str) -> Any:
    """Sends a small chat stream; returns the temperature the simulator received."""
    result = stream_request(
        gateway.url,
        chat_body(stream=True, max_tokens=4),
        headers=auth(**{"x-request-id": request_id}),
    )
    assert result.status == 200, result.body
    assert result.data()[-1] == "[DONE]"
    assert result.headers["x-sluice-config"] == gateway.served_version()
    return sim_request(sim.url, request_id)["body"]["temperature"]


def test_served_version_is_the_content_hash_of_the_directory(
    gateway: Gateway, config: ConfigDir, sim: ProcessServer
) -> None:
    version = config.version()
    assert len(version) == 12 and int(version, 16) >= 0
    assert gateway.served_version() == version
    assert gateway.admin_config()["version"] == version
    result = stream_request(
        gateway.url, chat_body(stream=True, max_tokens=4), headers=auth(**{"x-request-id": "v0"})
    )
    assert result.headers["x-sluice-config"] == version
    assert gateway.server.stdout_lines[0].rstrip().endswith(f"config={version}")


def test_version_covers_the_backend_override(
    config: ConfigDir, start_gateway: StartGateway, sim: ProcessServer
) -> None:
    """`--backend URL` replaces every backend URL, so it is part of what the version names."""
    gateway = start_gateway(config, "--backend", sim.url, watching=False)
    version = load_config(config.path, backend_override=sim.url).version
    assert version != config.version()
    assert gateway.served_version() == version


@pytest.mark.parametrize("style", list(SAVE_STYLES))
def test_every_save_style_is_applied(
    gateway: Gateway, config: ConfigDir, sim: ProcessServer, style: str
) -> None:
    before = config.version()
    expected = config.save("modes.yaml", NEW_MODES, SAVE_STYLES[style])
    assert expected != before
    gateway.wait_for_version(expected)
    assert sent_temperature(gateway, sim, f"save-{style}") == 0.6
    # The one apply is the complete file: no empty, missing or partial state went live.
    assert gateway.reloaded_versions(at_least=1) == [expected]
    state = gateway.admin_config()
    assert state["last_result"] == "ok" and state["last_error"] is None
    assert state["reloads"]["ok"] == 1


def test_file_deleted_for_a_while_then_recreated(
    gateway: Gateway, config: ConfigDir, sim: ProcessServer
) -> None:
    before = config.version()
    (config.path / "modes.yaml").unlink()  # the `chat` route's preset is gone: invalid
    state = gateway.wait_until(lambda s: s["last_result"] == "error", "the failed reload")
    assert state["last_result"] == "error"
    assert "unknown preset 'modes'" in state["last_error"]
    assert gateway.served_version() == before
    assert sent_temperature(gateway, sim, "deleted-meanwhile") == 0.3  # still serving

    expected = config.save("modes.yaml", NEW_MODES, lambda p, t: p.write_text(t))
    gateway.wait_for_version(expected)
    assert sent_temperature(gateway, sim, "recreated") == 0.6
    assert gateway.reloaded_versions(at_least=1) == [expected]
    state = gateway.admin_config()
    assert state["last_result"] == "ok" and state["last_error"] is None


def test_half_written_file_is_not_applied_half(
    gateway: Gateway, config: ConfigDir, sim: ProcessServer
) -> None:
    """A writer that pauses mid-file: every line-prefix of the preset is itself a valid
    preset (other values), so only waiting for the file to settle keeps a half out."""
    full = modes_with_temperature(0.6)
    half = full[: full.index("policy:")]  # no clamps, no force, no deny
    assert is_valid(config.with_file("modes.yaml", half))
    with (config.path / "modes.yaml").open("w") as f:
        f.write(half)
        f.flush()
        time.sleep(0.04)  # a writer's pause between two writes
        f.write(full[len(half) :])
    expected = config.save("modes.yaml", full, lambda p, t: None)
    gateway.wait_for_version(expected)
    time.sleep(0.3)  # a late apply of the half state would be logged by now
    assert gateway.reloaded_versions(at_least=1) == [expected]
    assert gateway.served_version() == expected


def test_half_written_broken_file_keeps_the_old_config_until_complete(
    gateway: Gateway, config: ConfigDir, sim: ProcessServer
) -> None:
    before = config.version()
    full = modes_with_temperature(0.6)
    half = full[: full.index("top_k:") + 4]  # "  top_k" with no colon: not YAML mapping
    with (config.path / "modes.yaml").open("w") as f:
        f.write(half)
        f.flush()
        # Long enough for the watcher to read it, settle and fail to build it.
        state = gateway.wait_until(lambda s: s["last_result"] == "error", "the failed build")
        assert gateway.served_version() == before
        assert "modes.yaml" in (state["last_error"] or ""), state
        f.write(full[len(half) :])
    config.files["modes.yaml"] = full
    expected = config.version()
    gateway.wait_for_version(expected)
    assert sent_temperature(gateway, sim, "half-then-complete") == 0.6
    assert gateway.reloaded_versions(at_least=1) == [expected]


def test_invalid_edit_keeps_serving_and_is_logged_shown_and_counted(
    gateway: Gateway, config: ConfigDir, sim: ProcessServer
) -> None:
    before = config.version()
    unchanged = gateway.admin_config()["reloads"]["unchanged"]  # the watch probe's
    assert gateway.reload_metric() == {"ok": 0, "error": 0, "unchanged": unchanged}
    config.save("modes.yaml", INVALID_TEMPERATURE, SAVE_STYLES["truncate-and-write"])
    state = gateway.wait_until(lambda s: s["last_result"] == "error", "the failed reload")

    # shown at GET /admin/config
    assert state["version"] == before
    assert state["last_result"] == "error"
    assert INVALID_LINE.match(state["last_error"]), state["last_error"]
    # counted in sluice_config_reload_total{result}
    assert gateway.reload_metric() == {
        "ok": 0,
        "error": state["reloads"]["error"],
        "unchanged": unchanged,
    }
    # logged, with the version that failed and the one kept
    (failed, *_) = gateway.wait_logged("config_reload_failed")
    assert failed["level"] == "error"
    assert failed["keeping"] == before
    assert failed["version"] not in (None, before)
    assert len(failed["errors"]) == 1 and INVALID_LINE.match(failed["errors"][0])
    # and the previous snapshot keeps serving
    assert gateway.served_version() == before
    assert sent_temperature(gateway, sim, "after-invalid") == 0.3
    assert gateway.reloaded_versions() == []

    # Reverting to what serves is "unchanged", and clears the error.
    config.save("modes.yaml", MODES, SAVE_STYLES["truncate-and-write"])
    state = gateway.wait_until(lambda s: s["last_result"] == "ok", "the revert")
    assert state["last_error"] is None and state["version"] == before
    assert gateway.reload_metric()["unchanged"] > unchanged
    assert gateway.reloaded_versions() == []

    # A valid edit after all that applies as usual.
    expected = config.save("modes.yaml", NEW_MODES, SAVE_STYLES["truncate-and-write"])
    gateway.wait_for_version(expected)
    assert gateway.reload_metric()["ok"] == 1


@pytest.mark.slow
def test_edit_right_after_startup_is_applied(
    config: ConfigDir, start_gateway: StartGateway
) -> None:
    """An edit made as soon as the server says it is serving must not be lost: the files
    on disk then differ from what serves, and no later event comes to fix it. Tried three
    times, since the window between loading the config and watching it is short."""
    for attempt, temperature in enumerate((0.6, 0.7, 0.4)):
        gateway = start_gateway(config, watching=False)
        expected = config.save(
            "modes.yaml", modes_with_temperature(temperature), SAVE_STYLES["truncate-and-write"]
        )
        try:
            gateway.wait_for_version(expected)
        except AssertionError as exc:
            raise AssertionError(
                f"attempt {attempt + 1}: the edit was never applied: {exc}"
            ) from None
        gateway.close()


def test_admin_config_needs_the_admin_token(gateway: Gateway) -> None:
    assert gateway.client.get("/admin/config").status_code == 401
    wrong = {"authorization": "Bearer not-the-token"}
    resp = gateway.client.get("/admin/config", headers=wrong)
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "invalid_admin_token"
    assert gateway.client.post("/admin/reload", headers=wrong).status_code == 401


@pytest.fixture
def linked_config(tmp_path: Path, config: ConfigDir) -> Path:
    """modes.yaml as a link to a file outside the directory: the watcher sees no event
    when the target changes, so only SIGHUP or POST /admin/reload can pick it up."""
    target = tmp_path / "outside-modes.yaml"
    target.write_text(MODES)
    (config.path / "modes.yaml").unlink()
    (config.path / "modes.yaml").symlink_to(target)
    return target


def edit_unseen(gateway: Gateway, target: Path, text: str, before: str) -> None:
    target.write_text(text)
    time.sleep(0.5)  # several watcher periods
    assert gateway.served_version() == before, "precondition: the watcher saw this edit"


def test_sighup_reloads(
    linked_config: Path, config: ConfigDir, start_gateway: StartGateway, sim: ProcessServer
) -> None:
    gateway = start_gateway(config)
    before = config.version()
    # No change: a reload still runs (and finds nothing to do).
    unchanged = gateway.admin_config()["reloads"]["unchanged"]
    gateway.sighup()
    gateway.wait_until(lambda s: s["reloads"]["unchanged"] > unchanged, "the SIGHUP reload")

    edit_unseen(gateway, linked_config, NEW_MODES, before)
    config.files["modes.yaml"] = NEW_MODES
    expected = config.version()
    gateway.sighup()
    gateway.wait_for_version(expected)
    assert sent_temperature(gateway, sim, "after-sighup") == 0.6

    edit_unseen(gateway, linked_config, INVALID_TEMPERATURE, expected)
    gateway.sighup()
    state = gateway.wait_until(lambda s: s["last_result"] == "error", "the failed SIGHUP reload")
    assert INVALID_LINE.match(state["last_error"]), state["last_error"]
    assert gateway.served_version() == expected
    assert gateway.reloaded_versions(at_least=1) == [expected]


def _ignores_sighup(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    return False


def test_sighup_during_startup_does_not_kill_the_server(config: ConfigDir, tmp_path: Path) -> None:
    """A reload request that comes while the server is still starting (systemd sends
    ExecReload as soon as a Type=simple unit has forked) is not a reason to exit."""
    argv = sluice_cmd("serve", "--config", str(config.path), "--port", "0")
    with (tmp_path / "stdout.log").open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        # Past the interpreter's own start-up (no Python code can guard those first
        # milliseconds): as soon as the process ignores SIGHUP (its /proc status says so),
        # while the server modules still import.
        deadline = time.monotonic() + 15.0
        while not _ignores_sighup(proc.pid):
            assert proc.poll() is None, f"the server exited at start-up: {proc.poll()}"
            assert time.monotonic() < deadline, "the server never ignored SIGHUP"
            time.sleep(0.002)
        proc.send_signal(signal.SIGHUP)
        assert "serving on" not in (tmp_path / "stdout.log").read_text()  # still starting
        deadline = time.monotonic() + 15.0
        while "serving on" not in (tmp_path / "stdout.log").read_text():
            assert proc.poll() is None, f"SIGHUP during start-up ended the server: {proc.poll()}"
            assert time.monotonic() < deadline, "the server never said it serves"
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_post_admin_reload(
    linked_config: Path, config: ConfigDir, start_gateway: StartGateway, sim: ProcessServer
) -> None:
    gateway = start_gateway(config)
    before = config.version()
    resp = gateway.post_reload()
    assert resp.status_code == 200
    assert resp.json() == {"result": "unchanged", "version": before, "errors": []}

    edit_unseen(gateway, linked_config, NEW_MODES, before)
    config.files["modes.yaml"] = NEW_MODES
    expected = config.version()
    resp = gateway.post_reload()
    assert resp.status_code == 200
    assert resp.json() == {"result": "ok", "version": expected, "errors": []}
    # Synchronous: the next request is served by the new snapshot, no polling.
    assert gateway.served_version() == expected
    assert sent_temperature(gateway, sim, "after-post") == 0.6

    edit_unseen(gateway, linked_config, INVALID_TEMPERATURE, expected)
    resp = gateway.post_reload()
    assert resp.status_code == 422
    body = resp.json()
    assert body["result"] == "error" and body["version"] == expected
    assert len(body["errors"]) == 1 and INVALID_LINE.match(body["errors"][0]), body
    assert gateway.served_version() == expected
    reloads = gateway.admin_config()["reloads"]
    assert reloads["ok"] == 1 and reloads["error"] == 1
    assert gateway.reload_metric() == reloads


@pytest.mark.slow
def test_in_flight_stream_finishes_on_the_snapshot_it_started_with(
    gateway: Gateway, config: ConfigDir, sim: ProcessServer
) -> None:
    """A slow stream started before an edit of its preset and its policy keeps the old
    preset's values, the old policy (the new one would cut it), and the old version."""
    before = config.version()
    script = [f"w{i} " for i in range(14)]
    script[11] = "FORBIDDEN "  # the new policy cuts at this word; the old one does not
    slow = chat_body(stream=True, max_tokens=len(script), sim={"script": script, "itl_ms": 150})
    results: list[StreamResult] = []
    started = time.monotonic()
    thread = threading.Thread(
        target=lambda: results.append(
            stream_request(gateway.url, slow, headers=auth(**{"x-request-id": "in-flight"}))
        ),
        daemon=True,
    )
    thread.start()
    assert sim_request(sim.url, "in-flight")["body"]["temperature"] == 0.3

    new_guard = 'kind: Policy\nstop: ["###"]\ncut_patterns: [{pattern: "FORBIDDEN"}]\n'
    config.save("modes.yaml", NEW_MODES, SAVE_STYLES["temp-and-mv"])
    expected = config.save("guard.yaml", new_guard, SAVE_STYLES["temp-and-mv"])
    gateway.wait_for_version(expected)
    swapped_at = time.monotonic() - started
    assert thread.is_alive(), "the stream ended before the swap: the test proves nothing"

    # A new request gets the new snapshot: new temperature, and the new policy cuts.
    fresh = stream_request(
        gateway.url,
        {**slow, "sim": {"script": script, "itl_ms": 0}},
        headers=auth(**{"x-request-id": "after-swap"}),
    )
    assert fresh.headers["x-sluice-config"] == expected
    assert sim_request(sim.url, "after-swap")["body"]["temperature"] == 0.6
    assert "FORBIDDEN" not in fresh.text()
    assert fresh.data()[-2]["choices"][0]["finish_reason"] == "content_filter"

    thread.join(timeout=15)
    assert not thread.is_alive()
    (old,) = results
    assert old.status == 200
    assert old.headers["x-sluice-config"] == before
    assert old.text() == "".join(script)  # not cut: the old policy had no cut pattern
    # The word reached the client after the new config was serving (the relay holds a
    # few characters back for stop strings, so look for its start).
    assert arrival_of(old, "FORBID") > swapped_at
    finish = [c["finish_reason"] for d in old.data()[:-1] for c in d["choices"]]
    assert finish[-1] == "length" and "content_filter" not in finish
    assert old.data()[-1] == "[DONE]"
    assert not any("error" in d for d in old.data() if isinstance(d, dict))


def arrival_of(result: StreamResult, text: str) -> float:
    """Seconds into the stream at which `text` had arrived."""
    seen = ""
    for at, event in result.events:
        if event.startswith(b"data: {"):
            for choice in json.loads(event[6:]).get("choices") or []:
                seen += (choice.get("delta") or {}).get("content") or ""
        if text in seen:
            return at
    raise AssertionError(f"{text!r} never arrived")
