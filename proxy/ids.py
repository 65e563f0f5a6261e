"""Request ids laid out as UUIDv7's: the time in milliseconds, then random digits drawn
from the OS 256 ids at a time.

An id names a resumable stream (`/v1/streams/{id}`), so it must not be guessable: 10
bytes of it (80 bits; UUIDv7 has 74) come from `os.urandom`. Drawing them one by one cost
a `getrandom` system call per request; a batch costs one per 256. A forked worker starts
with an empty batch, never with its parent's.

The time prefix (of the moment the batch was drawn, 12 hex digits) makes a process's ids
ascend from batch to batch. The records store indexes them (feedback finds its request by
id): a B-tree takes ascending keys at its right edge, random ones anywhere in it, which
cost 3x as much a row in a 50,000-row table and more as it grows (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import os
import time
from typing import Final

from .http import Request

ID_BYTES: Final = 10  # random bytes in an id
MAX_REQUEST_ID: Final = 128  # a client's own x-request-id, longest kept
BATCH: Final = 256

_batch: Final[list[str]] = []  # Final: a C static when compiled, not a globals lookup


def random_request_id() -> str:
    """32 lowercase hex digits: milliseconds since the epoch when its batch was drawn, then
    20 from the OS's random source; never returned twice by a process (nor by a forked
    child)."""
    if not _batch:
        prefix = "%012x" % (time.time_ns() // 1_000_000)
        pool = os.urandom(ID_BYTES * BATCH).hex()
        step = 2 * ID_BYTES
        # Not sorted: a batch lasts well over a millisecond, so its prefix is above every
        # earlier batch's, and its ids land at the index's right edge in any order (a sort
        # cost ~800 instructions an id).
        _batch.extend([prefix + pool[i : i + step] for i in range(0, len(pool), step)])
    return _batch.pop()


def _forget_batch() -> None:
    _batch.clear()


os.register_at_fork(after_in_child=_forget_batch)


def request_id(request: Request) -> str:
    """The client's x-request-id when it is sane (printable ASCII, no surrounding space, at
    most MAX_REQUEST_ID characters), else a random one."""
    given = request.headers.get(b"x-request-id")
    if given and len(given) <= MAX_REQUEST_ID and given.isascii() and given.strip() == given:
        text = given.decode("ascii")
        if text.isprintable():
            return text
    return random_request_id()
