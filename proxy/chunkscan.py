"""vLLM's common stream chunks, scanned whole: the relay's usual case without a guard.

A stream without a guard sends vLLM's chunks on unchanged; of its token chunks, its last
chunk and its usage chunk it records only a token, the finish reason and the usage counts
(`ChunkFilter.observe`, through `vllmshape`'s readers). `scan` finds, from a chunk's start
in a backend read, the whole HTTP chunks that each hold one of them in vLLM's literal
form and what they record, in one call: in C in the compiled build (proxy/_chunkscan.c:
no copy or decoding of each event), in Python in the pure one. Anything else ends the
scan, and the relay reads it as before. proxy/_chunkscan.c says which forms, exactly.
"""

from __future__ import annotations

from typing import Any, Final

from .native import c_function
from .stopwords import PASS_CHECK, PASS_NEVER, literal_start
from .vllmshape import (
    CHAT_FINISH_CLOSING,
    CHAT_FINISH_MIDDLE,
    CHAT_TEXT_OPEN,
    CHAT_TOKEN_END,
    TEXT_FINISH_CLOSING,
    TEXT_FINISH_MIDDLE,
    TEXT_TEXT_OPEN,
    TEXT_TOKEN_END,
    USAGE_OPEN,
)

_scan_in_c: Final[Any] = c_function("_chunkscan", "scan")
_scan_tokens_in_c: Final[Any] = c_function("_chunkscan", "scan_tokens")
_scan_passed_in_c: Final[Any] = c_function("_chunkscan", "scan_passed")
# Whether the scan runs in C (tests check it against the build).
SCAN_IN_C: Final = _scan_in_c is not None

_FINGERPRINT: Final = b',"system_fingerprint":"'
_OBJECT_END: Final = b"}\n\n"
_CHAT_OPEN: Final = CHAT_TEXT_OPEN.encode("latin-1")
_CHAT_CLOSE: Final = CHAT_TOKEN_END.encode("latin-1")
_CHAT_MIDDLE: Final = CHAT_FINISH_MIDDLE.encode("latin-1")
_CHAT_FINISH: Final = CHAT_FINISH_CLOSING.encode("latin-1")
_TEXT_OPEN: Final = TEXT_TEXT_OPEN.encode("latin-1")
_TEXT_CLOSE: Final = TEXT_TOKEN_END.encode("latin-1")
_TEXT_MIDDLE: Final = TEXT_FINISH_MIDDLE.encode("latin-1")
_TEXT_FINISH: Final = TEXT_FINISH_CLOSING.encode("latin-1")
_USAGE: Final = USAGE_OPEN.encode("latin-1")


def layout_of(head: str, chat: bool) -> tuple[bytes, ...]:
    """One stream's forms for `scan`, from what precedes its choices array (`head`, the
    same in each of its chunks): the token opening and closing, the finish middle and
    closing, the usage opening. A tuple of any length to the type checker: compiled, a
    fixed-length one would be unboxed and boxed anew for every call. The parts after the
    head are shared by every stream (a stream keeps its two openings: ~0.5 KiB)."""
    raw_head = head.encode("latin-1")
    if chat:
        return (raw_head + _CHAT_OPEN, _CHAT_CLOSE, _CHAT_MIDDLE, _CHAT_FINISH, raw_head + _USAGE)
    return (raw_head + _TEXT_OPEN, _TEXT_CLOSE, _TEXT_MIDDLE, _TEXT_FINISH, raw_head + _USAGE)


def event_chunk(data: bytes, pos: int) -> tuple[int, int]:
    """The HTTP chunk whose size line starts at `pos`, when it is whole in `data` and its
    data ends in a newline: the data's start and end. (-1, -1) otherwise: not a size line
    of 1-8 hex digits and CRLF, the last chunk (size 0), a chunk cut short by the read's
    end; those are the HTTP parser's. The relay's framing rules, and the scan's
    (_chunkscan.c has them in C). That the chunk holds one event as vLLM sends it (its
    only newline the first of its blank line, at end - 2) is for the caller to check: the
    relay searches the event as text, which it decodes anyway (a direct call compiled,
    where bytes.find is a method looked up by name)."""
    n = len(data)
    size = 0
    i = pos
    while i < n and i - pos < 9:
        c = data[i]
        if 48 <= c <= 57:
            size = size * 16 + c - 48
        elif 97 <= c <= 102:
            size = size * 16 + c - 87
        elif 65 <= c <= 70:
            size = size * 16 + c - 55
        else:
            break
        i += 1
    if i == pos or i - pos > 8 or size < 2 or i + 1 >= n or data[i] != 13 or data[i + 1] != 10:
        return -1, -1
    start = i + 2
    end = start + size
    if end + 2 > n or data[end] != 13 or data[end + 1] != 10 or data[end - 1] != 10:
        return -1, -1
    return start, end


def scan(data: bytes, pos: int, layout: tuple[bytes, ...]) -> tuple[int, int, int, int, int, int]:
    """From `pos`, the start of a chunk's size line: (the position after the chunks that
    hold vLLM's common events, how many of them carried a text, the finish reason's start
    and end in `data` (-1, 0: none), the usage chunk's prompt and completion counts (-1,
    0: none))."""
    if _scan_in_c is not None:
        found: tuple[int, int, int, int, int, int] = _scan_in_c(data, pos, layout)
        return found
    return scan_in_python(data, pos, layout)


# `scan_tokens`' answer: the position after the chunks below this shift, the tokens above.
PACK_SHIFT: Final = 24
PACK_MASK: Final = (1 << PACK_SHIFT) - 1


def scan_tokens(data: bytes, pos: int, layout: tuple[bytes, ...]) -> int:
    """`scan` for the relay's usual read, whose chunks hold tokens only, in one int: the
    position after them | how many carried a text << PACK_SHIFT. -1 where they held a
    finish reason or usage counts, or a figure does not fit: `scan` reads those (a
    stream's last read or two). Compiled, a 6-tuple built in C and taken apart again cost
    ~600 instructions a read, twice the scan's own."""
    if _scan_tokens_in_c is not None:
        packed: int = _scan_tokens_in_c(data, pos, layout)
        return packed
    end, tokens, reason_start, _, prompt, _ = scan_in_python(data, pos, layout)
    if reason_start >= 0 or prompt >= 0 or end > PACK_MASK or tokens > PACK_MASK:
        return -1
    return end | tokens << PACK_SHIFT


# `scan_passed`'s answer also holds the last text's last character, above this shift.
LAST_SHIFT: Final = 2 * PACK_SHIFT


def scan_passed(data: bytes, pos: int, layout: tuple[bytes, ...], table: bytes) -> int:
    """`scan_tokens` for a guarded stream whose guard holds nothing (`StreamGuard.idle`):
    from `pos`, the whole chunks that each hold a token chunk of choice 0 in `layout`'s
    form with a non-empty ASCII text, no escape in it, that the guard's `table`
    (`GuardSpec.pass_table`) passes. In one int: the position after them | how many <<
    PACK_SHIFT | the last text's last character << LAST_SHIFT (0: no chunk taken); -1
    where `pos` is past what that int holds (a read of over 16 MiB). The
    guard would send each of them on unchanged; anything else (an empty text, a text it
    may hold back or cut, a finish, usage) ends the scan, for `ChunkFilter.guarded`."""
    if _scan_passed_in_c is not None:
        packed: int = _scan_passed_in_c(data, pos, layout, table)
        return packed
    return scan_passed_in_python(data, pos, layout, table)


def scan_passed_in_python(data: bytes, pos: int, layout: tuple[bytes, ...], table: bytes) -> int:
    """`scan_passed` in Python: the pure build's, and what the C one is tested against."""
    if pos < 0:
        raise ValueError("scan_passed: pos must not be negative")
    if pos > PACK_MASK:
        return -1
    opening, closing = layout[0], layout[1]
    n = len(data)
    tokens = last = 0
    while pos < n and tokens < PACK_MASK:
        start, end = event_chunk(data, pos)
        if start < 0 or end + 2 > PACK_MASK or data.find(b"\n", start, end) != end - 2:
            break
        text_start = start + len(opening)
        quote = _text_end_after(data, start, end, opening)
        if (
            quote <= text_start
            or not _token_closes(data, quote, end, closing)
            or not text_passes(data[text_start:quote], table)
        ):
            break
        tokens += 1
        last = data[quote - 1]
        pos = end + 2
    return pos | tokens << PACK_SHIFT | last << LAST_SHIFT


def text_passes(text: bytes, table: bytes) -> bool:
    """Whether `GuardSpec.pass_table` passes `text`, a token's raw JSON string content."""
    check = False
    for c in text:
        if c >= 128 or c == 92:  # 92: a backslash, an escape
            return False
        kind = table[c]
        if kind == PASS_NEVER:
            return False
        check = check or kind == PASS_CHECK
    if not check:
        return True
    p = 128
    while p + 2 <= len(table):
        icase, size = table[p], table[p + 1]
        literal = table[p + 2 : p + 2 + size]
        p += 2 + size
        folded = text.lower() if icase else text
        if literal_start(folded.decode("ascii"), literal.decode("ascii")) != -1:
            return False  # a match (or the start of one) may begin here
    return True


def _text_end_after(data: bytes, start: int, end: int, opening: bytes) -> int:
    """Where the text after the token opening ends (at the next quote) in the event
    data[start:end]: -1 when it does not begin with `opening` or has no quote after it."""
    if not data.startswith(opening, start, end):
        return -1
    return data.find(b'"', start + len(opening), end)


def _token_closes(data: bytes, text_end: int, end: int, closing: bytes) -> bool:
    """Whether the rest of the event, from the text's end, is the token closing."""
    return text_end == end - len(closing) and data.startswith(closing, text_end, end)


def scan_in_python(
    data: bytes, pos: int, layout: tuple[bytes, ...]
) -> tuple[int, int, int, int, int, int]:
    """`scan` in Python: the pure build's, and what the C one is tested against."""
    if pos < 0:
        raise ValueError("scan: pos must not be negative")
    opening, closing, middle, finish_closing, usage_opening = layout
    n = len(data)
    tokens = 0
    reason_start, reason_end, prompt, completion = -1, 0, -1, 0
    while pos < n:
        start, end = event_chunk(data, pos)
        if start < 0 or data.find(b"\n", start, end) != end - 2:
            break
        # A token chunk, or the choice's last one.
        read = False
        text_start = start + len(opening)
        quote = _text_end_after(data, start, end, opening)
        if quote >= 0:
            if _token_closes(data, quote, end, closing):
                tokens += quote > text_start
                read = True
            elif reason_start < 0 and data.startswith(middle, quote, end):
                first = quote + len(middle)
                last = data.find(b'"', first, end)
                if (
                    last >= 0
                    and data.find(b"\\", first, last) < 0
                    and data.startswith(finish_closing, last, end)
                    and _object_ends(data, last + len(finish_closing), end)
                ):
                    tokens += quote > text_start
                    reason_start, reason_end = first, last
                    read = True
        # The usage chunk.
        if not read and prompt < 0 and data.startswith(usage_opening, start, end):
            counts = _usage_counts(data, start + len(usage_opening), end)
            if counts is not None:
                prompt, completion = counts
                read = True
        if not read:
            break
        pos = end + 2
    return pos, tokens, reason_start, reason_end, prompt, completion


def _usage_counts(data: bytes, p: int, end: int) -> tuple[int, int] | None:
    """The prompt and completion counts of vLLM's usage object from `p` (after its
    prompt_tokens key) to the event's `end`; None when it is not that form."""
    prompt, p = _count_at(data, p, end)
    if prompt < 0 or not data.startswith(b',"total_tokens":', p, end):
        return None
    total, p = _count_at(data, p + len(b',"total_tokens":'), end)
    if total < 0 or not data.startswith(b',"completion_tokens":', p, end):
        return None
    completion, p = _count_at(data, p + len(b',"completion_tokens":'), end)
    if completion < 0 or p >= end or data[p] != 125 or not _object_ends(data, p + 1, end):
        return None  # 125: "}"
    return prompt, completion


def _count_at(data: bytes, p: int, end: int) -> tuple[int, int]:
    """The count written at `p` (1-18 digits, as `vllmshape.digits_at`) and the position
    after it; (-1, p) when there is none."""
    i = p
    value = 0
    while i < end and 48 <= data[i] <= 57:
        if i - p == 18:
            return -1, p
        value = value * 10 + data[i] - 48
        i += 1
    return (value, i) if i > p else (-1, p)


def _object_ends(data: bytes, p: int, end: int) -> bool:
    """Whether the event's object ends at `p`: `}` and the blank line, with vLLM's system
    fingerprint (a value with no quote or backslash) before them or not."""
    if data.startswith(_FINGERPRINT, p, end):
        value = p + len(_FINGERPRINT)
        value_end = end - 1 - len(_OBJECT_END)
        if (
            value_end < value
            or data[value_end] != 34  # '"'
            or data.find(b'"', value, value_end) >= 0
            or data.find(b"\\", value, value_end) >= 0
        ):
            return False
        p = value_end + 1
    return p == end - len(_OBJECT_END) and data.startswith(_OBJECT_END, p, end)
