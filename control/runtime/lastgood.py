"""The config a worker of `--workers N` starts from when the supervisor starts it again.

Each worker read the config directory when it started. One that died while an invalid
edit sat in the directory refused to start, again and again with back-off; one that died
after an edit a reload refuses (every app removed: API keys off) or cannot apply (a
field read only at start-up, such as `limits.store`) served that edit, beside siblings
that do not. Now, in the directory the supervisor names (STATE_DIR_ENV):

- `started.json`: the files the first workers started from. A worker started again
  starts from them too, so what is read only at start-up (the limit store, the records
  writer, the cache-salt key file) is its siblings', and a change to it still says
  "restart required";
- `last-good.json`: the files of the last config a worker applied. The worker started
  again then applies it as a reload, then reloads from the directory, through the
  reload's checks like its siblings: it serves what they serve and reports what they
  report.

Each file holds the files' names and bytes (JSON, base64), so a config built from it has
the version its siblings report. It is replaced whole (a temporary file renamed over it).
"""

from __future__ import annotations

import base64
import contextlib
import os
from pathlib import Path
from typing import Final

import orjson
import structlog
from sluice.control.config.loader import ConfigFiles, SourceFile

STATE_DIR_ENV: Final = "SLUICE_CONFIG_STATE_DIR"
STARTED: Final = "started.json"
LAST_GOOD: Final = "last-good.json"

_log = structlog.get_logger("sluice.config")


def state_dir() -> Path | None:
    """The directory the supervisor named for its workers, or None (a single process)."""
    value = os.environ.get(STATE_DIR_ENV)
    return Path(value) if value else None


def save(path: Path, files: ConfigFiles) -> None:
    """Writes `files` as the last good config; a failure is logged, never raised (the
    config serves either way)."""
    record = [
        {"name": f.name, "display": f.display, "data": base64.b64encode(f.data).decode()}
        for f in files.files
    ]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(orjson.dumps(record))
        os.replace(tmp, path)
    except OSError as exc:
        _log.warning("last_good_config_not_saved", path=str(path), error=str(exc))
        with contextlib.suppress(OSError):
            tmp.unlink()


def load(path: Path, directory: Path, display: str) -> ConfigFiles | None:
    """The last good config's files as if read from `directory`; None when there is none
    (no worker has served yet) or it cannot be read."""
    try:
        record = orjson.loads(path.read_bytes())
        files = tuple(
            SourceFile(str(f["name"]), str(f["display"]), base64.b64decode(f["data"]))
            for f in record
        )
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return ConfigFiles(Path(directory), display, files)
