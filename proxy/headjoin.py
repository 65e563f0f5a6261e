"""An HTTP/1.1 message head joined from its parts: responses and the backend's requests.

The compiled build joins in C (proxy/_headjoin.c: each part copied once into one buffer);
the pure build appends the parts to a list and joins it. The same bytes either way.
"""

from __future__ import annotations

from typing import Any, Final

from .native import c_function

_join_in_c: Final[Any] = c_function("_headjoin", "join")
# Whether heads are joined in C (tests check it against the build).
HEADS_JOINED_IN_C: Final = _join_in_c is not None


def join_head(
    leading: tuple[bytes, ...],
    headers: list[tuple[bytes, bytes]],
    content_length: int,
    trailing: bytes,
) -> bytes:
    """`leading` (a status or request line, fixed headers), `name: value` CRLF for each
    header, `content-length: N` CRLF when `content_length` >= 0, then `trailing` and the
    blank line's CRLF."""
    if _join_in_c is not None:
        head: bytes = _join_in_c(leading, headers, content_length, trailing)
        return head
    return join_in_python(leading, headers, content_length, trailing)


def join_in_python(
    leading: tuple[bytes, ...],
    headers: list[tuple[bytes, bytes]],
    content_length: int,
    trailing: bytes,
) -> bytes:
    """`join_head` in Python: the pure build's, and what the C one is tested against."""
    parts = list(leading)
    for name, value in headers:
        # Four parts, not one concatenation: each `+` allocates a bytes object the join
        # copies again (~2,000 instructions for a stream's five headers).
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")
    if content_length >= 0:
        parts.append(b"content-length: %d\r\n" % content_length)
    parts.append(trailing)
    parts.append(b"\r\n")
    return b"".join(parts)
