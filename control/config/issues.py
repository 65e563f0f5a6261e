"""Config errors and warnings, each naming file:line:column and the field path.

`str(issue)` is the exact line `sluice check` prints and the reloader logs:
`presets/chat.yaml:7:5: policy.temperature.clamp: min 2.0 > max 1.0`. Messages never
contain a secret's value (see `values.check_secret`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Severity = Literal["error", "warning"]
PathItem = str | int


def format_path(path: Sequence[PathItem]) -> str:
    """('backends', 0, 'queue', 'max') -> 'backends[0].queue.max'."""
    text = ""
    for item in path:
        if isinstance(item, int):
            text += f"[{item}]"
        else:
            text += f".{item}" if text else item
    return text


def display_path(path: Path) -> str:
    """A path relative to the current directory when it lies below it, else absolute."""
    absolute = path.absolute()
    try:
        return str(absolute.relative_to(Path(os.getcwd())))
    except ValueError:
        return str(absolute)


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in the config. line/column are 1-based; None when not from a file."""

    file: str
    line: int | None
    column: int | None
    path: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        parts = [where]
        if self.path:
            parts.append(self.path)
        if self.severity == "warning":
            parts.append("warning")
        parts.append(self.message)
        return ": ".join(parts)

    @property
    def sort_key(self) -> tuple[str, int, int]:
        return (self.file, self.line or 0, self.column or 0)


def sorted_issues(issues: Iterable[ConfigIssue]) -> tuple[ConfigIssue, ...]:
    """In file order, duplicates (one mistake seen through several presets) once."""
    return tuple(sorted(dict.fromkeys(issues), key=lambda issue: issue.sort_key))


class ConfigInvalid(Exception):
    """The config directory does not validate; nothing of it may be applied."""

    def __init__(self, issues: Iterable[ConfigIssue], warnings: Iterable[ConfigIssue] = ()) -> None:
        self.issues = sorted_issues(issues)
        self.warnings = sorted_issues(warnings)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)
