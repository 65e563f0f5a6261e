"""Header names in lower case, each distinct name lowered once.

httptools hands over each header's name as sent. `bytes.lower()` is a method call per
header (compiled code looks it up and builds its arguments each time); the names a proxy
sees are few and repeat on every request, so a dictionary remembers them. Bounded: once
it holds MAX_KNOWN_NAMES, a new name is lowered every time it comes.
"""

from __future__ import annotations

from typing import Final

MAX_KNOWN_NAMES: Final = 256
_lowered: Final[dict[bytes, bytes]] = {}


def lower_name(name: bytes) -> bytes:
    """`name.lower()`."""
    known = _lowered.get(name)
    if known is not None:
        return known
    lowered = name.lower()
    if len(_lowered) < MAX_KNOWN_NAMES:
        _lowered[name] = lowered
    return lowered
