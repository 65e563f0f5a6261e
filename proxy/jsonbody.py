"""Reading a request's JSON body: nesting depth checked before the parser runs.

orjson parses up to 1024 levels but encodes only 255, so a body nested 256-1024 levels
deep parsed fine and then failed when sluice re-encoded it for the backend (a 500). No API
body needs anything near MAX_DEPTH levels; deeper is a 400 before any other work.
"""

from __future__ import annotations

import re
from array import array
from itertools import accumulate
from typing import Any, Final

import orjson

from .errors import bad_request
from .native import c_function

# proxy/_jsondepth.c's `exceeds`: the same answer for any bytes, ~6x cheaper.
_exceeds_in_c: Final[Any] = c_function("_jsondepth", "exceeds")

# A final name: compiled, a call reads a C static rather than the module's
# attribute (~270 instructions a request; see clock.py).
_loads: Final = orjson.loads

# Far below orjson's encoder limit (255), so what sluice adds around a body never
# reaches it; deeper than any JSON schema a tool definition plausibly holds.
MAX_DEPTH: Final = 128

# A JSON string (unrolled loop: no backtracking per character). One left open runs to the
# end of the body (a lone backslash last included): a match that could fail there made
# the search start again at every quote inside it, quadratic in the body (a 64 KB body of
# escaped quotes after an opening one held the event loop for 13 s, before any key).
# Possessive (nothing here ever needs to be given back): the engine keeps no backtracking
# state per escape (270 MB for a 4 MiB body of them, 22 MB possessive).
_STRING: Final = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")
# Bodies up to this size are counted as text (a copy cheaper than two calls' overhead).
_TEXT_COUNT_BELOW: Final = 4096
# Opening brackets to +1, closing ones to -1 (0xff as a signed byte).
_STEP: Final = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def nesting_exceeds(raw: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether `raw` nests arrays/objects deeper than `limit` (brackets inside strings
    do not count). A body with at most `limit` brackets is answered by two counts;
    otherwise the text is reduced to its brackets as +1/-1 and the running sum's maximum
    is the depth (linear, in C: ~0.15 s for 4 MB of nothing but brackets). The compiled
    build asks proxy/_jsondepth.c, which says the same."""
    if _exceeds_in_c is not None:
        exceeds: bool = _exceeds_in_c(raw, limit)
        return exceeds
    if len(raw) <= _TEXT_COUNT_BELOW:
        # Counted as text: compiled, str.count is a direct call; bytes.count parses its
        # arguments from a tuple (~1,200 instructions each, against a 200-byte copy).
        text = raw.decode("latin-1")
        if text.count("[") + text.count("{") <= limit:
            return False
    elif raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    steps = _STRING.sub(b"", raw).translate(_STEP, _NOT_BRACKETS)
    return max(accumulate(array("b", steps), initial=0)) > limit


def check_nesting(raw: bytes) -> None:
    """An OpenAI-shaped 400 for a body nested deeper than MAX_DEPTH."""
    if nesting_exceeds(raw):
        raise bad_request(
            f"request body nests arrays or objects more than {MAX_DEPTH} levels deep",
            code="json_too_deep",
        )


def parse_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or an OpenAI-shaped 400."""
    check_nesting(raw)
    try:
        body = _loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    return body
