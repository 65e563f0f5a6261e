"""The fields of a multipart form that sluice reads as vLLM's server reads them.

A form (speech to text) is streamed to the backend unread but for two fields: `model`,
which picks the route and is checked against the app's routes, and `stream`. vLLM's
form parser (Starlette's, on python-multipart) finds a part by the `name` parameter of
its Content-Disposition header, quoted or not, in any case of the header's name, and
keeps a field's last value. So sluice finds parts the same way, at each boundary
delimiter, and a form where it could judge one `model` while vLLM serves another is
refused: two `model` fields, or one it cannot see in time (after the bytes it reads
before choosing the route).

`FormScan` is fed the body in pieces, with a bounded carry between them: each byte is
searched once for the delimiter (bytes.find), and each part's head is read once.
"""

from __future__ import annotations

import re
from typing import Final

# A part's head (its header lines) longer than this is not parsed: no real field has one.
MAX_PART_HEAD: Final = 8 * 1024
# A Content-Disposition parameter: name, then a quoted string or a token.
_PARAM: Final = re.compile(rb';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')
# The fields sluice reads; a form's other fields go upstream unread.
WATCHED: Final = (b"model", b"stream")


def form_boundary(content_type: bytes) -> bytes | None:
    """The `boundary` parameter of a multipart Content-Type; None when it has none."""
    for match in _PARAM.finditer(content_type):
        if match[1].lower() == b"boundary":
            return _unquoted(match[2]) or None
    return None


def part_name(head: bytes) -> bytes | None:
    """The `name` parameter of a part's Content-Disposition header (its header lines,
    without the blank line), or None."""
    for line in head.split(b"\r\n"):
        key, colon, value = line.partition(b":")
        if colon and key.strip().lower() == b"content-disposition":
            for match in _PARAM.finditer(value):
                if match[1].lower() == b"name":
                    return _unquoted(match[2])
    return None


def _unquoted(value: bytes) -> bytes:
    if len(value) >= 2 and value[:1] == b'"' and value[-1:] == b'"':
        return value[1:-1].replace(b'\\"', b'"').replace(b"\\\\", b"\\")
    return value


class FormField:
    """One watched field: its name and where its value lies in the body (end -1: longer
    than MAX_PART_HEAD, not read)."""

    __slots__ = ("end", "name", "start")

    def __init__(self, name: bytes, start: int, end: int) -> None:
        self.name = name
        self.start = start
        self.end = end


class FormScan:
    """Finds the watched fields of a multipart body fed in order, in pieces of any size."""

    __slots__ = ("_carry", "_delimiter", "_offset", "fields")

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"--" + boundary
        self._carry = b""
        self._offset = 0  # where `_carry` starts in the body
        self.fields: list[FormField] = []

    def feed(self, data: bytes) -> list[FormField]:
        """The watched fields whose part head ends in `data` (with what was carried)."""
        buf = self._carry + data if self._carry else data
        found: list[FormField] = []
        delimiter = self._delimiter
        at = 0
        while True:
            mark = buf.find(delimiter, at)
            if mark < 0:
                # A delimiter may begin in the last bytes: keep them for the next piece.
                at = max(at, len(buf) - len(delimiter) + 1)
                break
            head_start = mark + len(delimiter)
            if buf[head_start : head_start + 2] == b"--":  # the closing delimiter
                at = head_start + 2
                continue
            head_end = buf.find(b"\r\n\r\n", head_start, head_start + MAX_PART_HEAD)
            if head_end < 0:
                if len(buf) - head_start < MAX_PART_HEAD:
                    at = mark  # the head is still coming: scan it again with the rest
                    break
                at = head_start  # an endless head: not a part vLLM would read either
                continue
            name = part_name(buf[head_start:head_end])
            value_start = head_end + 4
            if name in WATCHED:
                assert name is not None
                value_end = buf.find(b"\r\n" + delimiter, value_start)
                if value_end < 0 and len(buf) - value_start < MAX_PART_HEAD:
                    at = mark  # a short value still coming: read the part again with it
                    break
                end = -1 if value_end < 0 else self._offset + value_end
                found.append(FormField(name, self._offset + value_start, end))
            at = value_start
        self._carry = buf[at:]
        self._offset += at
        self.fields.extend(found)
        return found
