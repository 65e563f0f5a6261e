"""The server-wide budget of request-body bytes held in memory at once.

Each body is capped on its own (`max_body_bytes`), but many large bodies arriving together
add up: 20 concurrent 3.6 MB bodies raised the process's RSS by ~200 MB for good (freed
memory stays in the allocator's arenas). A request reserves its declared Content-Length
when its head arrives (chunked bodies reserve as they arrive) and gives it back when its
handler ends; a reservation that does not fit is answered 503 before the body is read.
"""

from __future__ import annotations

import ctypes
from typing import Final

# Room for ~17 bodies at a 4 MiB limit, or hundreds of long-context chats (128k tokens are
# ~0.5 MB of JSON).
DEFAULT_MAX_INFLIGHT_BODY_BYTES: Final = 64 * 1024 * 1024


class BodyBudget:
    __slots__ = ("limit", "used")

    def __init__(self, limit: int = DEFAULT_MAX_INFLIGHT_BODY_BYTES) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self, n: int) -> bool:
        """Takes n bytes if they fit; a single body larger than the whole budget fits
        only when nothing else is held (the per-body limit caps it anyway)."""
        if n <= 0:
            return True
        if self.used + n > self.limit and self.used > 0:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used -= n


# glibc's mallopt parameter number (malloc.h).
_M_MMAP_THRESHOLD: Final = -3
# Allocations at least this large get their own mapping, unmapped when freed.
MMAP_THRESHOLD: Final = 256 * 1024


def return_large_allocations_to_os(threshold: int = MMAP_THRESHOLD) -> bool:
    """Pins glibc's mmap threshold so that large buffers (request bodies, their joined
    copy, the decoded JSON's long strings, the re-encoded payload) are mapped on their own
    and go back to the OS when freed. By default glibc raises the threshold each time such
    a buffer is freed, after which the next ones come from the heap and stay in it:
    20 concurrent 3.6 MB bodies then left 66-103 MB of RSS behind; with the pin, 1.5 MB
    (docs/RELIABILITY.md). Small allocations (per-token work) are unaffected. Returns
    False where there is no glibc (the call is skipped)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
