"""`attach_console`: what `sluice serve` calls to plug the console (`sluice.control.console`)
into a ProxyApp. It lives here, with the runtime it wires, so that the console package
needs nothing of the runtime (no import cycle between the two)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sluice.control.ab.database import records_location
from sluice.control.config.build import BuiltConfig, config_version
from sluice.control.config.issues import ConfigInvalid
from sluice.control.config.loader import ConfigFiles, read_config_files
from sluice.control.console.history import ConfigHistory
from sluice.control.console.live import LiveSeries
from sluice.control.console.routes import ConsoleServices, console_routes
from sluice.proxy.app import ProxyApp
from sluice.proxy.observe import Observer

from .reloader import ConfigReloader, ReloadResult


def _texts(files: ConfigFiles | None) -> dict[str, bytes] | None:
    return None if files is None else {f.name: f.data for f in files.files}


def attach_console(
    app: ProxyApp,
    observer: Observer,
    built: BuiltConfig,
    reloader: ConfigReloader | None,
    config_dir: Path | None,
    backend_override: str | None,
    status: Callable[[], dict[str, Any]],
) -> ConsoleServices:
    """Routes /console on `app`, feeds the live series from its completion hook and the
    history from the reloader. Call before serving. Raises CliError when `records.url`
    names an unset variable (as the records writer would)."""
    history = ConfigHistory()
    startup: ConfigFiles | None = None
    if config_dir is not None:
        try:
            files = read_config_files(config_dir)
        except ConfigInvalid:  # the directory moved since the load: no text for this one
            files = None
        if files is not None and config_version(files, backend_override) == built.version:
            startup = files
    history.served(built.version, "startup", _texts(startup))
    live = LiveSeries()
    app.on_complete.append(live.on_complete)

    def on_reload(trigger: str, result: ReloadResult, files: ConfigFiles | None) -> None:
        if result.ok:
            history.served(result.version, trigger, _texts(files))
        else:
            history.failed(trigger, "\n".join(result.errors))

    if reloader is not None:
        reloader.listeners.append(on_reload)
    # Where the records writer writes (plugins.attach_records), read at start-up like it.
    records = built.gateway.records if built.gateway is not None else None
    services = ConsoleServices(
        ref=app.ref,
        app=app,
        observer=observer,
        history=history,
        live=live,
        status=status,
        records_db=None if records is None else records_location(records),
    )
    app.extra_routes.update(console_routes(services))
    return services
