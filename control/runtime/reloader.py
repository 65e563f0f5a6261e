"""Hot reload: watch the config directory, build a new snapshot, hand it over whole.

A reload reads every `*.yaml` file once, and if the bytes hash to the version already
serving it is "unchanged" and nothing else happens. Otherwise it builds through the one
code path (`build_config`); only a config that validates completely reaches `apply`, the
caller's single assignment into `SnapshotRef`. An invalid edit is logged and kept in
`last_error`, and the previous snapshot keeps serving.

The watcher watches the directory rather than the files, because editors replace files:
vim and `sed -i` write a temporary file and rename it over the original, some tools delete
and re-create, others truncate and write in several steps. After the events go quiet for
`debounce_s` the files are read until two reads `settle_s` apart are identical, so a file
caught half-written is not applied, and then the reload runs off the event loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog
from sluice.control.config.build import BuiltConfig, build_config, config_version, load_config
from sluice.control.config.gateway_schema import GatewayFile, RecordsSection
from sluice.control.config.issues import ConfigInvalid
from sluice.control.config.loader import CONFIG_SUFFIX, ConfigFiles, read_config_files
from watchfiles import Change, awatch

ReloadOutcome = Literal["ok", "error", "unchanged"]
# Read once at start-up (the listening socket, the records writer, the cache-salt key, the
# limit store's connection): a reload cannot apply a change to them, so it says so instead
# of ignoring it silently.
RESTART_FIELDS: tuple[tuple[str, ...], ...] = (
    ("listen", "host"),
    ("listen", "port"),
    ("records",),
    ("cache_isolation", "secret_file"),
    ("limits", "store"),
    ("limits", "lease"),
    ("limits", "store_timeout"),
    ("limits", "keep_idle"),
)
# What a process that started without a Gateway wired: the defaults, but no records writer
# (plugins.attach_records), so a reload that adds a Gateway with records says "restart".
_NO_GATEWAY = GatewayFile(kind="Gateway", records=RecordsSection(path=None))


def restart_required(running: BuiltConfig, new: BuiltConfig) -> list[str]:
    """Dotted names of the fields that differ from the config the process started with
    and take effect only at a restart."""
    changed = []
    for path in RESTART_FIELDS:
        old_value: object = running.gateway or _NO_GATEWAY
        new_value: object = new.gateway or _NO_GATEWAY
        for key in path:
            old_value, new_value = getattr(old_value, key), getattr(new_value, key)
        if old_value != new_value:
            changed.append(".".join(path))
    return changed


# A directory whose files keep changing is built anyway after this long; if it was caught
# mid-write the build most likely fails, and the next event reloads again.
MAX_SETTLE_S = 2.0
# Kubernetes ConfigMap volumes swap a `..data` symlink instead of touching the files.
K8S_DATA_LINK = "..data"


@dataclass(frozen=True, slots=True)
class ReloadResult:
    result: ReloadOutcome
    version: str  # the version serving after this reload
    errors: tuple[str, ...] = ()  # one line per issue, as `sluice check` prints them
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.result != "error"


def _relevant(change: Change, path: str) -> bool:
    name = os.path.basename(path)
    return name == K8S_DATA_LINK or (name.endswith(CONFIG_SUFFIX) and not name.startswith("."))


# How long the watcher waits for an event before yielding an empty set (its "I am live").
WATCH_LIVE_PROBE_MS = 500


class ConfigReloader:
    """Rebuilds the config on demand (`reload_now`) or on file changes (`watch`).

    `initial` is the config already serving; without it the constructor loads the
    directory (raising ConfigInvalid) and does not call `apply`.
    """

    def __init__(
        self,
        config_dir: Path | str,
        apply: Callable[[BuiltConfig], None],
        *,
        backend_override: str | None = None,
        debounce_s: float = 0.05,
        settle_s: float = 0.1,
        log: Any = None,
        initial: BuiltConfig | None = None,
        on_result: Callable[[str], None] | None = None,
        caveats: Callable[[BuiltConfig], list[str]] | None = None,
    ) -> None:
        self._dir = Path(config_dir)
        # Warnings of the running process's own, beyond the config's (serve.py: a worker).
        self._caveats = caveats
        self._on_result = on_result  # e.g. the sluice_config_reload_total counter
        self._apply = apply
        self._override = backend_override
        self._debounce_s = debounce_s
        self._settle_s = settle_s
        self._log = log if log is not None else structlog.get_logger("sluice.config")
        self._lock = threading.Lock()
        self._current = (
            initial
            if initial is not None
            else load_config(self._dir, backend_override=backend_override)
        )
        self._started_with = self._current
        self._restart_required: list[str] = []
        self._last_result: Literal["ok", "error"] = "ok"
        self._last_error: str | None = None
        self._last_reload_at: float | None = None
        self._counts: dict[str, int] = {"ok": 0, "error": 0, "unchanged": 0}
        # Called for each reload that changed something (before the new version serves, so
        # whoever sees it serving finds it here too: the console's history) or failed, with
        # what triggered it, the result and the files that serve (None when it failed).
        self.listeners: list[Callable[[str, ReloadResult, ConfigFiles | None], None]] = []

    @property
    def current(self) -> BuiltConfig:
        return self._current

    @property
    def last_result(self) -> Literal["ok", "error"]:
        return self._last_result

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def last_reload_at(self) -> float | None:
        """Unix time of the last reload attempt; None before the first."""
        return self._last_reload_at

    @property
    def restart_required(self) -> list[str]:
        """Fields changed since start-up that only a restart applies (e.g. listen.port)."""
        return list(self._restart_required)

    @property
    def reload_counts(self) -> dict[str, int]:
        return dict(self._counts)

    def reload_now(
        self, files: ConfigFiles | None = None, *, trigger: str = "admin API"
    ) -> ReloadResult:
        """Read (or take the settled `files`), build, and apply if valid and changed.
        Thread-safe; blocks while building. `trigger` names the cause for the listeners."""
        # Read under the lock: two overlapping reloads must not apply an older read last.
        with self._lock:
            result, served = self._reload(files, trigger)
            if result.result == "error":  # an applied one was announced before its swap
                self._announce(trigger, result, served)
            return result

    def _announce(self, trigger: str, result: ReloadResult, files: ConfigFiles | None) -> None:
        for listener in self.listeners:
            try:
                listener(trigger, result, files)
            except Exception:  # a listener's bug must not stop (or half-apply) a reload
                self._log.exception("config_listener_failed", version=result.version)

    def _reload(
        self, files: ConfigFiles | None, trigger: str
    ) -> tuple[ReloadResult, ConfigFiles | None]:
        self._last_reload_at = time.time()
        version: str | None = None
        try:
            if files is None:
                files = read_config_files(self._dir)
            version = config_version(files, self._override)
            if version == self._current.version:
                return self._unchanged(), files
            built = build_config(files, backend_override=self._override)
            opened = self._opens(built)
            if opened is not None:
                return self._failed(version, [opened], []), None
        except ConfigInvalid as exc:
            errors = [str(i) for i in exc.issues]
            return self._failed(version, errors, [str(w) for w in exc.warnings]), None
        except Exception as exc:  # a bug in a builder must not stop the watcher
            self._log.exception("config_reload_crashed", version=version)
            return self._failed(version, [f"{self._dir}: internal error: {exc!r}"], []), None
        previous = self._current.version
        # Recorded before the swap: whoever sees the new version also sees its count and
        # what it needs a restart for.
        self._current = built
        self._count("ok", None)
        self._restart_required = restart_required(self._started_with, built)
        warnings = tuple(str(w) for w in built.warnings)
        if self._caveats is not None:
            warnings += tuple(self._caveats(built))
        if self._restart_required:
            fields = ", ".join(self._restart_required)
            warnings += (f"{self._dir}: changed but applied only at a restart: {fields}",)
            self._log.warning(
                "config_needs_restart", version=built.version, fields=self._restart_required
            )
        result = ReloadResult("ok", built.version, (), warnings)
        self._announce(trigger, result, files)
        self._apply(built)
        self._log.info(
            "config_reloaded",
            version=built.version,
            previous=previous,
            files=len(built.files),
            warnings=list(warnings),
        )
        return result, files

    def _opens(self, new: BuiltConfig) -> str | None:
        """Why `new` may not replace what serves, when it drops a check on who may call:
        every app (API keys off) or the edge's origin secret. Fail closed: such an edit
        reads the same as a gateway.yaml caught half-written before its `apps:` or `edge:`,
        and applying it would open the gateway to anyone. A restart applies it."""
        running = self._current.snapshot
        if running.requires_auth and not new.snapshot.requires_auth:
            return (
                f"{self._dir}: apps: the edit removes every app, which would turn API keys "
                "off; a reload never does that: restart sluice to serve without keys"
            )
        if running.origin_secret_hash is not None and new.snapshot.origin_secret_hash is None:
            return (
                f"{self._dir}: edge.origin_secret: the edit removes it, which would let "
                "requests skip the edge; a reload never does that: restart sluice to serve "
                "without it"
            )
        return None

    def _count(self, outcome: ReloadOutcome, error: str | None) -> None:
        self._counts[outcome] += 1
        if self._on_result is not None:
            self._on_result(outcome)
        self._last_result = "error" if outcome == "error" else "ok"
        self._last_error = error

    def _unchanged(self) -> ReloadResult:
        # The files equal what is serving: a previous bad edit has been reverted, if any.
        self._count("unchanged", None)
        self._log.debug("config_unchanged", version=self._current.version)
        return ReloadResult("unchanged", self._current.version)

    def _failed(self, version: str | None, errors: list[str], warnings: list[str]) -> ReloadResult:
        self._count("error", "\n".join(errors))
        self._log.error(
            "config_reload_failed",
            version=version,  # of the files that failed; None when they could not be read
            keeping=self._current.version,
            error_count=len(errors),
            errors=errors,
            warnings=warnings,
        )
        return ReloadResult("error", self._current.version, tuple(errors), tuple(warnings))

    def _read(self) -> ConfigFiles | None:
        try:
            return read_config_files(self._dir)
        except ConfigInvalid:
            return None  # directory gone for now; reload_now reports it

    async def _settle(self) -> ConfigFiles | None:
        """The files once two reads, settle_s apart, are identical: exactly those bytes are
        built, so a write that starts after the settling is never built half-written.
        None when they did not settle in time (or could not be read): reload_now reads."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MAX_SETTLE_S
        previous = await asyncio.to_thread(self._read)
        while loop.time() < deadline:
            await asyncio.sleep(self._settle_s)
            current = await asyncio.to_thread(self._read)
            if current == previous:
                return current
            previous = current
        return None

    async def watch(self, stop_event: asyncio.Event | None = None) -> None:
        """Reload on every settled change in the directory, until cancelled or stopped."""
        step_ms = max(1, int(self._debounce_s * 1000))
        self._log.info("config_watch_started", directory=str(self._dir))
        live = False
        async for changes in awatch(
            self._dir,
            watch_filter=_relevant,
            step=step_ms,
            debounce=max(1000, step_ms),
            stop_event=stop_event,
            recursive=False,
            # An empty yield after rust_timeout tells that the watcher is live.
            yield_on_timeout=True,
            rust_timeout=WATCH_LIVE_PROBE_MS,
        ):
            if not changes:
                if live:
                    continue
                # The watch began only now: an edit made since start-up raised no event,
                # so look once (it counts as "unchanged" when nothing moved).
                live = True
                self._log.info("config_watch_live", directory=str(self._dir))
            files = await self._settle()
            await asyncio.to_thread(self.reload_now, files, trigger="file change")
