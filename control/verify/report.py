"""The outcome of `sluice verify`: one `Check` per probe, printed as lines or JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Check:
    """One probe's verdict. `problems` make it fail; `warnings` (drift, figures outside the
    usual range) are reported and do not."""

    name: str
    detail: str = ""
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "detail": self.detail,
            "problems": self.problems,
            "warnings": self.warnings,
            "data": self.data,
        }


@dataclass
class Report:
    backend: str
    model: str
    checks: list[Check] = field(default_factory=list)
    requests_sent: int = 0
    load_requests: int = 0

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "backend": self.backend,
            "model": self.model,
            "failed": [c.name for c in self.checks if not c.ok],
            "requests_sent": {"probes": self.requests_sent, "load": self.load_requests},
            "checks": [c.as_dict() for c in self.checks],
        }

    def format(self) -> str:
        lines = [f"sluice verify {self.backend} (model {self.model})"]
        for check in self.checks:
            verdict = "PASS" if check.ok else "FAIL"
            lines.append(f"{verdict} {check.name}: {check.detail}".rstrip(": "))
            lines += [f"     problem: {p}" for p in check.problems]
            lines += [f"     warning: {w}" for w in check.warnings]
        failed = [c.name for c in self.checks if not c.ok]
        lines.append(
            f"{len(self.checks) - len(failed)}/{len(self.checks)} checks passed; "
            f"{self.requests_sent} probe requests + {self.load_requests} load requests sent"
        )
        if failed:
            lines.append("sluice cannot serve this backend correctly: " + ", ".join(failed))
        return "\n".join(lines)
