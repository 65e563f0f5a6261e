"""Random request ids, drawn from the OS 256 at a time.

An id names a resumable stream (`/v1/streams/{id}`), so it must not be guessable: it stays
12 bytes from `os.urandom`. Drawing them one by one cost a `getrandom` system call per
request; a batch costs one per 256. A forked worker starts with an empty batch, never
with its parent's.
"""

from __future__ import annotations

import os
from typing import Final

ID_BYTES: Final = 12
BATCH: Final = 256

_batch: list[str] = []


def random_request_id() -> str:
    """24 lowercase hex digits from the OS's random source; never returned twice by a
    process (nor by a forked child)."""
    if not _batch:
        pool = os.urandom(ID_BYTES * BATCH).hex()
        step = 2 * ID_BYTES
        _batch.extend([pool[i : i + step] for i in range(0, len(pool), step)])
    return _batch.pop()


def _forget_batch() -> None:
    _batch.clear()


os.register_at_fork(after_in_child=_forget_batch)
