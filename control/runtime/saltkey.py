"""The generated key behind per-app `cache_salt` values, kept in a file so that restarts and
`--workers N` processes derive the same salt for an app (a different salt would only cost
cache hits, never isolation). Several replicas on different hosts should share a key
through `cache_isolation.secret: env:VAR` instead.

Created once with O_EXCL through a temporary file and a hard link, so workers racing at
start-up all end up reading the one key that won; mode 0600.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from sluice.control.errors import CliError

KEY_BYTES = 32


def load_or_create_key(path: Path) -> bytes:
    """The key in `path`, created (random, 32 bytes, hex) if the file does not exist."""
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(KEY_BYTES) + "\n")
        with contextlib.suppress(FileExistsError):  # another worker won: read its key
            os.link(tmp, path)
        return _read(path)
    except OSError as exc:
        raise CliError(f"cannot create the cache-salt key file {path}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _read(path: Path) -> bytes:
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise CliError(f"{path}: not a cache-salt key (expected at least 32 hex digits)")
    return key
