"""vLLM's stream chunks read by their literal layout, without parsing them.

vLLM 0.26 writes every chunk of a stream as compact JSON with its keys in one order: the
keys before `"choices":[` (id, object, created, model) are the same bytes in every chunk
of one stream, and a choice's keys follow a fixed order (../shared/vllm-transcripts).
These readers compare those literal parts at their place and search only inside a text
or a finish reason, where a full-event search costs ~600 instructions and a parse ~15,000.
Whatever they do not recognise (another layout, one byte different) they leave to the
caller's general path (searches, a regular expression, parsing), so they never decide
what that path would decide differently; tests/proxy/test_chunk_bookkeeping.py holds the
two to the same records on every event it generates.

Every reader takes the event (bytes, with its blank line) and its latin-1 decoding
(`text`, one character per byte, so positions agree): compiled, `str.find` and a slice
comparison are direct calls, where `bytes.find` goes through a method lookup and an
argument tuple.
"""

from __future__ import annotations

from typing import Final

CHOICES: Final = '"choices":['
_INDEX: Final = '{"index":'
_CHAT_BEFORE: Final = ',"delta":{"content":"'
_TEXT_BEFORE: Final = ',"text":"'
_CHAT_AFTER: Final = '"},"logprobs":null,"finish_reason":'
_TEXT_AFTER: Final = '","logprobs":null,"finish_reason":'
_NULL: Final = "null"
# The rest of vLLM's role chunk after its index: no text, no finish.
_ROLE_REST: Final = (
    ',"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]'
)
_ROLE_AT_0: Final = _INDEX + "0" + _ROLE_REST
_ROLE_HINT: Final = _INDEX + '0,"delta":{"'  # then "role"
_R: Final = ord("r")
# The optional fields after the finish reason: chat has stop_reason (with a finish) and
# token_ids, completions stop_reason, prompt_token_ids and token_ids, in this order.
_STOP_REASON: Final = ',"stop_reason":'
_PROMPT_TOKEN_IDS: Final = ',"prompt_token_ids":null'
_TOKEN_IDS: Final = ',"token_ids":null'
_CHOICE_END: Final = "}]"
# What follows a token's text in vLLM 0.26's token chunks, whole: one comparison, usually.
_CHAT_TAIL: Final = _CHAT_AFTER + _NULL + _TOKEN_IDS + _CHOICE_END
_TEXT_TAIL: Final = (
    _TEXT_AFTER + _NULL + _STOP_REASON + _NULL + _PROMPT_TOKEN_IDS + _TOKEN_IDS + _CHOICE_END
)
# What follows a finish reason in vLLM's last chunk of a choice, to the choices' end.
_CHAT_FINISH_REST: Final = _STOP_REASON + _NULL + _TOKEN_IDS + _CHOICE_END
_TEXT_FINISH_REST: Final = _STOP_REASON + _NULL + _PROMPT_TOKEN_IDS + _TOKEN_IDS + _CHOICE_END
# The first choice's text opens right after these in a token chunk (index 0, vLLM's order).
CHAT_TEXT_OPEN: Final = _INDEX + "0" + _CHAT_BEFORE
TEXT_TEXT_OPEN: Final = _INDEX + "0" + _TEXT_BEFORE
# A token chunk's end after its text, the chunk's object and blank line included.
CHAT_TOKEN_END: Final = _CHAT_TAIL + "}\n\n"
TEXT_TOKEN_END: Final = _TEXT_TAIL + "}\n\n"
# vLLM's usage chunk after `"choices":[`, its three counts in this order.
_USAGE_START: Final = '],"usage":{"prompt_tokens":'
# A choice's last chunk around its finish reason, and the usage chunk's start after
# `"choices":[` (what `chunkscan` compares; the reason's closing quote begins the closing).
CHAT_FINISH_MIDDLE: Final = _CHAT_AFTER + '"'
TEXT_FINISH_MIDDLE: Final = _TEXT_AFTER + '"'
CHAT_FINISH_CLOSING: Final = '"' + _CHAT_FINISH_REST
TEXT_FINISH_CLOSING: Final = '"' + _TEXT_FINISH_REST
USAGE_OPEN: Final = _USAGE_START
_TOTAL: Final = ',"total_tokens":'
_COMPLETION: Final = ',"completion_tokens":'
USAGE_KEY: Final = '"usage":{'
FINISH_KEY: Final = '"finish_reason":"'  # a string value follows
_QUOTE: Final = ord('"')
_BRACE_CLOSE: Final = ord("}")

NOT_READ: Final = (-1, 0, 0, -1, 0, 0)


def _at(text: str, part: str, pos: int) -> bool:
    """`text.startswith(part, pos)`: compiled, a slice and a comparison (a bounded find
    sets its search up per call; startswith with a position parses its arguments)."""
    return text[pos : pos + len(part)] == part


def digits_at(event: bytes, pos: int) -> tuple[int, int]:
    """The non-negative integer written at `pos` and the position after its digits;
    (-1, 0) when there are no digits or more than 18 (within int64, as `\\d+` reads)."""
    size = len(event)
    value = 0
    end = pos
    while end < size and 48 <= event[end] <= 57:  # b"0" to b"9"
        value = value * 10 + event[end] - 48
        end += 1
    if end == pos or end - pos > 18:
        return -1, 0
    return value, end


def token_span(text: str, opening: str, end_part: str) -> tuple[int, int]:
    """vLLM's token chunk in its commonest form, whole: `opening` (what precedes the text:
    the stream's head and CHAT_TEXT_OPEN or TEXT_TEXT_OPEN), a text (empty while vLLM holds
    back what may begin a stop string), `end_part` (CHAT_TOKEN_END or TEXT_TOKEN_END),
    nothing else. (start, end) of the raw text; (-1, 0) when the event is not that. Two
    memory comparisons (startswith and endswith, direct calls compiled, where a slice
    compared in place allocates) and one search inside the text: a quote only where the
    text ends, so the text holds no escaped quote."""
    if not (text.startswith(opening) and text.endswith(end_part)):
        return -1, 0
    start = len(opening)
    end = len(text) - len(end_part)
    if end < start or text.find('"', start) != end:
        return -1, 0
    return start, end


def read_choice(
    event: bytes, text: str, chat: bool, pos: int
) -> tuple[int, int, int, int, int, int]:
    """The one choice of a chunk in vLLM's layout, `pos` where its `{"index":` begins
    (right after `"choices":[`): (index, start, end, reason_start, reason_end, after).
    text[start:end] is its raw text (JSON escapes kept; empty when start == end),
    text[reason_start:reason_end] its finish reason (reason_start -1: null), `after` the
    position after the choices array. NOT_READ (index -1): not in that layout, or more
    than one choice, or a text or reason this cannot delimit.

    A JSON string escapes its quotes, so the first quote after the text's start either
    ends the text or is part of an escaped one (`\\"`), and then what follows it cannot
    be the literal, unescaped keys compared next: a read is the parse's reading."""
    opening = CHAT_TEXT_OPEN if chat else TEXT_TEXT_OPEN
    if _at(text, opening, pos):  # index 0: one comparison
        index, start = 0, pos + len(opening)
    else:
        if not _at(text, _INDEX, pos):
            return NOT_READ
        index, p = digits_at(event, pos + len(_INDEX))
        before = _CHAT_BEFORE if chat else _TEXT_BEFORE
        if index < 0 or not _at(text, before, p):
            return NOT_READ
        start = p + len(before)
    end = text.find('"', start)
    if end < 0:
        return NOT_READ
    if chat:
        if _at(text, _CHAT_TAIL, end):
            return index, start, end, -1, 0, end + len(_CHAT_TAIL)
    elif _at(text, _TEXT_TAIL, end):
        return index, start, end, -1, 0, end + len(_TEXT_TAIL)
    after = _CHAT_AFTER if chat else _TEXT_AFTER
    if not _at(text, after, end):
        return NOT_READ
    p = end + len(after)
    reason_start = reason_end = -1
    if p < len(event) and event[p] == _QUOTE:
        reason_start = p + 1
        reason_end = text.find('"', reason_start)
        if reason_end < 0 or text.find("\\", reason_start, reason_end) >= 0:
            return NOT_READ
        p = reason_end + 1
        # vLLM's last chunk of a choice, whole after its reason: one comparison.
        rest = _CHAT_FINISH_REST if chat else _TEXT_FINISH_REST
        if _at(text, rest, p):
            return index, start, end, reason_start, reason_end, p + len(rest)
    elif _at(text, _NULL, p):
        p += len(_NULL)
    else:
        return NOT_READ
    if _at(text, _STOP_REASON, p):
        p = _value_end(event, text, p + len(_STOP_REASON))
        if p < 0:
            return NOT_READ
    if not chat and _at(text, _PROMPT_TOKEN_IDS, p):
        p += len(_PROMPT_TOKEN_IDS)
    if _at(text, _TOKEN_IDS, p):
        p += len(_TOKEN_IDS)
    if not _at(text, _CHOICE_END, p):
        return NOT_READ
    return index, start, end, reason_start, reason_end, p + len(_CHOICE_END)


def _value_end(event: bytes, text: str, pos: int) -> int:
    """The end of a stop_reason's value at `pos`: null, a number's digits, or a string
    without escapes; -1 for anything else."""
    if _at(text, _NULL, pos):
        return pos + len(_NULL)
    if pos < len(event) and event[pos] == _QUOTE:
        end = text.find('"', pos + 1)
        if end < 0 or text.find("\\", pos + 1, end) >= 0:
            return -1
        return end + 1
    value, end = digits_at(event, pos)
    return end if value >= 0 else -1


def role_end(event: bytes, text: str, pos: int) -> int:
    """vLLM's role chunk (a choice's first: the role, an empty text, no finish) with its
    `{"index":` at `pos`: the position after its choices array; -1 when it is not one."""
    if _at(text, _ROLE_AT_0, pos):  # index 0: one comparison
        return pos + len(_ROLE_AT_0)
    if not _at(text, _INDEX, pos):
        return -1
    index, p = digits_at(event, pos + len(_INDEX))
    if index <= 0 or not _at(text, _ROLE_REST, p):
        return -1
    return p + len(_ROLE_REST)


def maybe_role(event: bytes, pos: int) -> bool:
    """False when the choice at `pos` is surely no role chunk at index 0 (one byte looked
    at): where the role key would begin; a text delta has its content key there."""
    at_r = pos + len(_ROLE_HINT)
    return at_r < len(event) and event[at_r] == _R


def usage_counts(event: bytes, text: str, pos: int) -> tuple[int, int, int]:
    """vLLM's usage chunk (no choices, then the usage object, its three counts in vLLM's
    order and nothing else in it), `pos` right after `"choices":[`: (prompt tokens,
    completion tokens, the position after the usage object); prompt -1: not that form."""
    if not _at(text, _USAGE_START, pos):
        return -1, 0, 0
    prompt, p = digits_at(event, pos + len(_USAGE_START))
    if prompt < 0 or not _at(text, _TOTAL, p):
        return -1, 0, 0
    total, p = digits_at(event, p + len(_TOTAL))
    if total < 0 or not _at(text, _COMPLETION, p):
        return -1, 0, 0
    completion, p = digits_at(event, p + len(_COMPLETION))
    if completion < 0 or p >= len(event) or event[p] != _BRACE_CLOSE:
        return -1, 0, 0
    return prompt, completion, p + 1


def ends_at(event: bytes, pos: int) -> bool:
    """True when the chunk's object closes at `pos` and only its blank line follows."""
    return pos == len(event) - 3 and event[pos] == _BRACE_CLOSE


__all__ = [
    "CHAT_FINISH_CLOSING",
    "CHAT_FINISH_MIDDLE",
    "CHAT_TEXT_OPEN",
    "CHAT_TOKEN_END",
    "CHOICES",
    "FINISH_KEY",
    "NOT_READ",
    "TEXT_FINISH_CLOSING",
    "TEXT_FINISH_MIDDLE",
    "TEXT_TEXT_OPEN",
    "TEXT_TOKEN_END",
    "USAGE_KEY",
    "USAGE_OPEN",
    "digits_at",
    "ends_at",
    "maybe_role",
    "read_choice",
    "role_end",
    "token_span",
    "usage_counts",
]
