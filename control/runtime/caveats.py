"""What `sluice serve --workers N` does not share between its workers without a
`limits.store`: checked at start-up (the supervisor logs it) and at every reload of a
worker (a reload warning), since an edit can add it to a config that started without.
"""

from __future__ import annotations

import structlog
from sluice.control.config.build import BuiltConfig

from .limits import store_url

RESUME_DETAIL = (
    "with --workers N a resume reaches the generation's worker only by chance "
    "(404 stream_not_found otherwise); set limits.store (docs/STREAMS.md)"
)


def resumable_policies(built: BuiltConfig) -> list[str]:
    """The policies whose streams a client may resume: their replay buffers live in the
    process that runs the generation, unless a store holds a copy."""
    return sorted(name for name, p in built.snapshot.policies.items() if p.resume_window)


def worker_reload_caveats(built: BuiltConfig) -> list[str]:
    """The reload warnings of a worker that runs without a store (the store is read at
    start-up: a reload that adds one still needs a restart, and warns of that itself)."""
    resumable = resumable_policies(built)
    if not resumable:
        return []
    names = ", ".join(resumable)
    return [f"{built.snapshot.source}: resume_window in policies {names}: {RESUME_DETAIL}"]


def log_startup_caveats(built: BuiltConfig) -> None:
    """Logged once by the supervisor of `--workers N`."""
    if store_url(built) is not None:
        return
    resumable = resumable_policies(built)
    if resumable:
        structlog.get_logger("sluice").warning(
            "resume_is_per_process", policies=resumable, detail=RESUME_DETAIL
        )
