"""The config versions this process has served: when, from what trigger, and their files.

Each entry keeps the text of the config files with secrets and key hashes redacted, so
the console can show a diff between any two versions without ever showing a key, a hash
or a literal token. Bounded: the oldest entries drop out after `MAX_VERSIONS`.
"""

from __future__ import annotations

import difflib
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field

MAX_VERSIONS = 50
REDACTED = "<redacted>"

# `sha256:<hex>` key digests, wherever they appear.
_DIGEST = re.compile(r"sha256:[0-9A-Fa-f]{6,}")
# A literal value of a secret-bearing key (`env:VAR` references are kept: they name, not hold).
_SECRET_KEY = re.compile(
    r"""(?P<head>(?:^|[\s{,\-])["']?(?:token|secret|origin_secret|password|salt|cache_salt|api_key|key)["']?\s*:\s*)
        (?P<value>(?!env:)(?!["']env:)[^\s,}\]#]+)""",
    re.VERBOSE | re.IGNORECASE,
)
# user:password@ in URLs (redis://, postgresql://).
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^:/@\s]*):[^@/\s]+@", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with key digests, literal secrets and URL passwords replaced."""
    text = _DIGEST.sub("sha256:" + REDACTED, text)
    text = _URL_PASSWORD.sub(lambda m: f"{m.group('scheme')}:{REDACTED}@", text)
    return _SECRET_KEY.sub(lambda m: m.group("head") + REDACTED, text)


@dataclass(frozen=True, slots=True)
class ConfigVersion:
    version: str
    at: float  # unix time it started serving
    trigger: str  # "startup", "file change", "SIGHUP", "admin API"
    files: dict[str, str] = field(default_factory=dict)  # name -> redacted text


@dataclass(frozen=True, slots=True)
class ReloadError:
    at: float
    trigger: str
    message: str  # `file:line:col: path: message` lines, as `sluice check` prints them


class ConfigHistory:
    """Appended from the reloader's thread, read from the event loop: a lock guards it."""

    def __init__(self, max_versions: int = MAX_VERSIONS) -> None:
        self._versions: deque[ConfigVersion] = deque(maxlen=max_versions)
        self._errors: deque[ReloadError] = deque(maxlen=max_versions)
        self._lock = threading.Lock()

    def served(self, version: str, trigger: str, files: dict[str, bytes] | None) -> None:
        texts = {
            name: redact(data.decode("utf-8", "replace")) for name, data in (files or {}).items()
        }
        with self._lock:
            self._versions.append(ConfigVersion(version, time.time(), trigger, texts))

    def failed(self, trigger: str, message: str) -> None:
        with self._lock:
            self._errors.append(ReloadError(time.time(), trigger, message))

    def versions(self) -> list[ConfigVersion]:
        with self._lock:
            return list(self._versions)

    def last_error(self) -> ReloadError | None:
        with self._lock:
            return self._errors[-1] if self._errors else None

    def find(self, version: str) -> ConfigVersion | None:
        with self._lock:
            for entry in reversed(self._versions):
                if entry.version == version:
                    return entry
        return None

    def diff(self, old: str, new: str) -> str | None:
        """A unified diff of the two versions' (redacted) files; None if either is unknown."""
        a, b = self.find(old), self.find(new)
        if a is None or b is None:
            return None
        lines: list[str] = []
        for name in sorted(set(a.files) | set(b.files)):
            before = a.files.get(name, "").splitlines(keepends=True)
            after = b.files.get(name, "").splitlines(keepends=True)
            lines.extend(
                difflib.unified_diff(
                    before,
                    after,
                    fromfile=f"{name} @ {old[:12]}",
                    tofile=f"{name} @ {new[:12]}",
                )
            )
        return "".join(line if line.endswith("\n") else line + "\n" for line in lines)
