"""Hot reload with a real watcher on a tmp dir, for every way editors save a file."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from sluice.control.config.build import BuiltConfig
from sluice.control.runtime.reloader import ConfigReloader, ReloadResult
from structlog.testing import capture_logs

from tests.control.fixtures import GATEWAY, KEY_HASH, PRECISE, Writer

DEADLINE_S = 2.0
NEW = PRECISE.replace("temperature: 0.3", "temperature: 0.5")


def temperature(config: BuiltConfig) -> float:
    return float(config.snapshot.presets["precise"].defaults["temperature"])


async def until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def watching(reloader: ConfigReloader, probe: Path) -> None:
    """Rewrite a file unchanged until the watcher reports it: the watch is then live."""
    # Blocking file I/O on the loop is the point of these tests: they play the editor.
    data = probe.read_bytes()  # noqa: ASYNC240
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while reloader.reload_counts["unchanged"] == 0:
        assert loop.time() < deadline, "the watcher never reported a change"
        probe.write_bytes(data)  # noqa: ASYNC240
        await asyncio.sleep(0.05)


def run_watched(
    directory: Path,
    scenario: Callable[[ConfigReloader, list[BuiltConfig]], Awaitable[None]],
    *,
    settle_s: float = 0.05,
    probe: str = "chat.yaml",
) -> ConfigReloader:
    applied: list[BuiltConfig] = []
    reloader = ConfigReloader(directory, applied.append, debounce_s=0.03, settle_s=settle_s)

    async def main() -> None:
        task = asyncio.create_task(reloader.watch())
        try:
            await watching(reloader, directory / probe)
            await scenario(reloader, applied)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    return reloader


def edit_in_place(path: Path) -> None:
    with path.open("r+b") as f:  # same length: no truncation, bytes overwritten
        f.write(NEW.encode())


def truncate_and_write(path: Path) -> None:
    path.write_text(NEW)


def write_temp_and_rename(path: Path) -> None:  # vim, sed -i, mv
    temp = path.with_name("precise.yaml.tmp~")
    temp.write_text(NEW)
    os.replace(temp, path)


def delete_and_recreate(path: Path) -> None:
    path.unlink()
    path.write_text(NEW)


@pytest.mark.parametrize(
    "save", [edit_in_place, truncate_and_write, write_temp_and_rename, delete_and_recreate]
)
def test_every_save_style_is_applied(config_dir: Writer, save: Callable[[Path], None]) -> None:
    directory = config_dir()
    first = None

    async def scenario(reloader: ConfigReloader, applied: list[BuiltConfig]) -> None:
        nonlocal first
        first = reloader.current.version
        save(directory / "precise.yaml")
        await until(lambda: bool(applied), "the edit to be applied")

    reloader = run_watched(directory, scenario)
    assert temperature(reloader.current) == 0.5
    assert reloader.current.version != first
    assert reloader.reload_counts["ok"] == 1 and reloader.reload_counts["error"] == 0
    assert reloader.last_result == "ok" and reloader.last_error is None


def test_delete_with_a_pause_then_recreate(config_dir: Writer) -> None:
    directory = config_dir()

    async def scenario(reloader: ConfigReloader, applied: list[BuiltConfig]) -> None:
        (directory / "precise.yaml").unlink()  # the route's preset is gone: invalid
        await until(lambda: reloader.reload_counts["error"] > 0, "the failed reload")
        (directory / "precise.yaml").write_text(NEW)
        await until(lambda: bool(applied), "the re-created file")

    reloader = run_watched(directory, scenario)
    assert temperature(reloader.current) == 0.5
    assert reloader.last_result == "ok"


def test_half_written_file_is_never_applied(config_dir: Writer) -> None:
    directory = config_dir()
    # The first half is a valid config on its own (no policy: no clamp), so only waiting
    # for the file to settle keeps it from being applied.
    full = NEW + "  max_new_tokens: {clamp: [1, 1024]}\n"
    half = NEW.split("policy:")[0]

    async def scenario(reloader: ConfigReloader, applied: list[BuiltConfig]) -> None:
        with (directory / "precise.yaml").open("w") as f:
            f.write(half)
            f.flush()
            await asyncio.sleep(0.1)  # longer than the debounce, shorter than the settle
            f.write(full[len(half) :])
        await until(lambda: bool(applied), "the completed file")
        await asyncio.sleep(0.3)  # any late reload of the half state would show up here

    reloader = run_watched(directory, scenario, settle_s=0.25)
    assert reloader.reload_counts["ok"] == 1
    plan = reloader.current.snapshot.presets["precise"]
    assert plan.clamps == {"temperature": (0.0, 1.0), "max_tokens": (1, 1024)}


def test_invalid_edit_keeps_the_previous_snapshot(config_dir: Writer) -> None:
    directory = config_dir()
    versions: list[str] = []

    async def scenario(reloader: ConfigReloader, applied: list[BuiltConfig]) -> None:
        versions.append(reloader.current.version)
        (directory / "precise.yaml").write_text(PRECISE.replace("0.3", "hot"))
        await until(lambda: reloader.reload_counts["error"] == 1, "the failed reload")
        assert applied == []
        assert reloader.current.version == versions[0]
        assert reloader.last_result == "error"
        assert reloader.last_error == (
            "presets/precise.yaml:2:27: generation.temperature: expected a number, got the "
            'string "hot"'
        )
        unchanged = reloader.reload_counts["unchanged"]
        (directory / "precise.yaml").write_text(PRECISE)  # reverted: equals what serves
        await until(lambda: reloader.reload_counts["unchanged"] > unchanged, "the revert")
        assert reloader.last_result == "ok" and reloader.last_error is None

    with capture_logs() as logs:
        reloader = run_watched(directory, scenario)
    assert reloader.current.version == versions[0]
    failed = [e for e in logs if e["event"] == "config_reload_failed"]
    assert len(failed) == 1
    assert failed[0]["keeping"] == versions[0]
    assert failed[0]["version"] not in (None, versions[0])
    assert failed[0]["errors"] == [reloader_error_line()]


def reloader_error_line() -> str:
    return (
        'presets/precise.yaml:2:27: generation.temperature: expected a number, got the string "hot"'
    )


def test_unrelated_files_do_not_trigger_a_reload(config_dir: Writer) -> None:
    directory = config_dir()

    async def scenario(reloader: ConfigReloader, applied: list[BuiltConfig]) -> None:
        before = None
        while before != reloader.reload_counts:  # the probe's trailing events, if any
            before = reloader.reload_counts
            await asyncio.sleep(0.25)
        (directory / "notes.txt").write_text("x")
        (directory / ".precise.yaml.swp").write_text("x")
        await asyncio.sleep(0.3)
        assert reloader.reload_counts == before

    run_watched(directory, scenario)


def test_kubernetes_configmap_symlink_swap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.control.fixtures import BASE

    monkeypatch.chdir(tmp_path)
    directory = tmp_path / "presets"
    directory.mkdir()
    for generation, files in (("..v1", BASE), ("..v2", {**BASE, "precise.yaml": NEW})):
        (directory / generation).mkdir()
        for name, text in files.items():
            (directory / generation / name).write_text(text)
    (directory / "..data").symlink_to("..v1")
    for name in BASE:
        (directory / name).symlink_to(f"..data/{name}")
    # Writes through the links land in ..v1, which is not watched: probe with a plain file.
    (directory / "probe.yaml").write_text("kind: Policy\n")

    async def scenario(reloader: ConfigReloader, applied: list[BuiltConfig]) -> None:
        (directory / "..data_tmp").symlink_to("..v2")
        os.replace(directory / "..data_tmp", directory / "..data")
        await until(lambda: bool(applied), "the swapped config")

    reloader = run_watched(directory, scenario, probe="probe.yaml")
    assert temperature(reloader.current) == 0.5


def test_reload_now_outcomes_and_logs(config_dir: Writer) -> None:
    directory = config_dir()
    applied: list[BuiltConfig] = []
    reloader = ConfigReloader(directory, applied.append)
    assert reloader.last_reload_at is None
    with capture_logs() as logs:
        assert reloader.reload_now().result == "unchanged"
        (directory / "precise.yaml").write_text(NEW)
        result = reloader.reload_now()
    assert result.ok and result.result == "ok" and result.version == reloader.current.version
    assert applied == [reloader.current]
    assert reloader.reload_counts == {"ok": 1, "error": 0, "unchanged": 1}
    assert reloader.last_reload_at is not None
    (event,) = [e for e in logs if e["event"] == "config_reloaded"]
    assert event["version"] == result.version and event["log_level"] == "info"


def test_reload_now_is_thread_safe(config_dir: Writer) -> None:
    directory = config_dir()
    applied: list[BuiltConfig] = []
    reloader = ConfigReloader(directory, applied.append)
    (directory / "precise.yaml").write_text(NEW)
    threads = [threading.Thread(target=reloader.reload_now) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=DEADLINE_S)
    assert len(applied) == 1  # one build applied, seven saw the same version: unchanged
    assert reloader.reload_counts == {"ok": 1, "error": 0, "unchanged": 7}


def test_initial_config_is_used_without_loading(config_dir: Writer) -> None:
    directory = config_dir()
    first = ConfigReloader(directory, lambda _: None).current
    (directory / "x.yaml").write_text("")  # would fail to load
    reloader = ConfigReloader(directory, lambda _: None, initial=first)
    assert reloader.current is first
    assert not reloader.reload_now().ok
    assert reloader.current is first


def test_resolved_secrets_never_reach_the_logs(
    config_dir: Writer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BOT_KEY", "sk-very-secret")
    gateway = GATEWAY.replace(f'"{KEY_HASH}"', "env:BOT_KEY") + "admin: {token: env:BOT_KEY}\n"
    directory = config_dir({"gateway.yaml": gateway})
    reloader = ConfigReloader(directory, lambda _: None)
    with capture_logs() as logs:
        (directory / "precise.yaml").write_text(NEW)
        assert reloader.reload_now().ok
        (directory / "precise.yaml").write_text("kind: Preset\ngeneration: {top_k: x}\n")
        assert not reloader.reload_now().ok
    assert len(logs) == 2
    assert "sk-very-secret" not in repr(logs) + repr(reloader.current)


def test_listeners_hear_of_a_version_before_it_serves(config_dir: Writer) -> None:
    # The console's history is a listener: whoever sees a version serving (the applied
    # snapshot) must find it in the history, so the listeners run before the swap.
    directory = config_dir()
    applied: list[BuiltConfig] = []
    heard: list[tuple[str, str, int]] = []
    reloader = ConfigReloader(directory, applied.append)

    def listener(trigger: str, result: ReloadResult, files: object) -> None:
        heard.append((trigger, result.result, len(applied)))

    def broken(trigger: str, result: ReloadResult, files: object) -> None:
        raise RuntimeError("a listener's bug")

    reloader.listeners += [broken, listener]
    (directory / "precise.yaml").write_text(NEW)
    with capture_logs() as logs:
        result = reloader.reload_now(trigger="SIGHUP")
    assert result.ok
    assert heard == [("SIGHUP", "ok", 0)]  # heard while nothing was applied yet
    assert applied == [reloader.current]  # and applied all the same, past the broken one
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["config_listener_failed"]
    (directory / "precise.yaml").write_text("kind: Preset\ngeneration: {temperature: [}\n")
    assert not reloader.reload_now().ok
    assert heard[-1][1] == "error"


def test_a_gateway_added_by_reload_needs_a_restart_for_its_records(config_dir: Writer) -> None:
    """Without a Gateway at start-up no records writer (nor /v1/feedback) was started: a
    reload that adds one with records on says they wait for a restart."""
    directory = config_dir({"precise.yaml": PRECISE}, base=False)
    reloader = ConfigReloader(directory, lambda _: None)
    assert reloader.current.gateway is None
    (directory / "gateway.yaml").write_text(GATEWAY.replace(", policy: chat", ""))
    result = reloader.reload_now()
    assert result.result == "ok" and reloader.restart_required == ["records"]
    assert result.warnings[-1].endswith("changed but applied only at a restart: records")
    no_records = GATEWAY.replace(", policy: chat", "") + "records: {path: null}\n"
    (directory / "gateway.yaml").write_text(no_records)
    assert reloader.reload_now().result == "ok" and reloader.restart_required == []
