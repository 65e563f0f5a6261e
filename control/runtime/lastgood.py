"""The last config that validated, for a worker the supervisor starts again.

Under `--workers N` each worker reads the config directory when it starts. One that died
while an invalid edit sat in the directory refused to start, again and again with
back-off, and the host served on fewer workers until someone fixed the file, although its
siblings kept serving the last good config. Each worker now writes the files of every
config it serves into one file the supervisor names (LAST_GOOD_ENV); a worker that finds
the directory invalid when it starts serves those files instead, reports the directory's
errors as its last reload, and watches the directory like the others.

The file holds the files' names and bytes (JSON, base64), so the config built from it has
the version its siblings serve. It is replaced whole (a temporary file renamed over it).
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

LAST_GOOD_ENV: Final = "SLUICE_LAST_GOOD_CONFIG"

_log = structlog.get_logger("sluice.config")


def last_good_path() -> Path | None:
    """The file the supervisor named for this worker, or None (a single process)."""
    value = os.environ.get(LAST_GOOD_ENV)
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
