"""Filtering one stream's SSE events: token timing for the timers and metrics, and the
stream guard per choice index.

`ChunkFilter.guarded` (with a guard) or `ChunkFilter.observe` (without) takes one event
(with its trailing blank line) and returns the bytes to send, rewriting a chunk only when
the guard changed its text. It does no I/O, so the
property tests drive the exact code the relay runs. Without a guard an event is never
parsed (byte searches find what the timers need); with one, vLLM's token chunks are
matched by one regular expression and only finish chunks and other layouts are parsed.
"""

from __future__ import annotations

import re
from time import monotonic
from typing import Any, Final

import orjson

from .exchange import Exchange
from .sse import DONE_EVENT, SEPARATOR
from .stopwords import GuardSpec, StreamGuard
from .timeouts import StreamWatchdog

# The keys observe looks for, as text: an event is searched as its latin-1 decoding (one
# character per byte, so positions are the bytes'). Compiled, `str.find` and `in` are direct
# calls into CPython's search; `bytes.find` goes through a method lookup, an argument tuple
# and its parsing each time, ~3x the cost of a search over a 250-byte event.
_CONTENT_KEY: Final = '"content":"'
_TEXT_KEY: Final = '"text":"'
_QUOTE: Final = ord('"')
_ERROR_PREFIX: Final = b'data: {"error"'
_FINISH_KEY: Final = '"finish_reason":"'  # a string value follows
_USAGE_KEY: Final = '"usage":{'
_COUNT_ENDS: Final = b",}"
_BRACKET: Final = ord("[")  # DONE_EVENT[6]
_E: Final = ord("e")  # _ERROR_PREFIX[8]
# vLLM's token chunks, one choice with non-empty text and nothing else that needs a parse.
_CHAT_TEXT: Final = re.compile(
    rb'"choices":\[\{"index":(\d+),"delta":\{"content":"([^"\\]+(?:\\.[^"\\]*)*|(?:\\.[^"\\]*)+)"\},'
    rb'"logprobs":null,"finish_reason":null(?:,"token_ids":null)?\}\]'
)
_COMPLETION_TEXT: Final = re.compile(
    rb'"choices":\[\{"index":(\d+),"text":"([^"\\]+(?:\\.[^"\\]*)*|(?:\\.[^"\\]*)+)","logprobs":null,'
    rb'"finish_reason":null(?:,"stop_reason":null)?(?:,"prompt_token_ids":null)?'
    rb'(?:,"token_ids":null)?\}\]'
)


# The literal parts of those token chunks, for `_token_text` (as text: see _CONTENT_KEY).
_CHOICE_START: Final = '"choices":[{"index":'
_CHAT_BEFORE: Final = ',"delta":{"content":"'
_TEXT_BEFORE: Final = ',"text":"'
_CHAT_AFTER: Final = '"},"logprobs":null,"finish_reason":null'
_TEXT_AFTER: Final = '","logprobs":null,"finish_reason":null'
# The rest of vLLM's role chunk after its index: no text, no finish.
_ROLE_REST: Final = (
    ',"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]'
)
# The optional fields after it: chat has the last one, completions all three in order.
_STOP_REASON: Final = ',"stop_reason":null'
_PROMPT_TOKEN_IDS: Final = ',"prompt_token_ids":null'
_TOKEN_IDS: Final = ',"token_ids":null'
_CHOICE_END: Final = "}]"
NO_TOKEN_TEXT: Final = (-1, 0, 0)


# What follows the text in vLLM 0.26's token chunks, whole: one comparison, usually.
_CHAT_TAIL: Final = _CHAT_AFTER + _TOKEN_IDS + _CHOICE_END
_TEXT_TAIL: Final = _TEXT_AFTER + _STOP_REASON + _PROMPT_TOKEN_IDS + _TOKEN_IDS + _CHOICE_END


def _at(text: str, part: str, pos: int) -> bool:
    """`text.startswith(part, pos)`: compiled, a slice and a comparison (a bounded find
    sets its search up per call; startswith with a position parses its arguments)."""
    return text[pos : pos + len(part)] == part


def _choice_index(event: bytes, text: str) -> tuple[int, int]:
    """The index of the first `"choices":[{"index":N` in `event` (`text` its latin-1
    decoding) and the position after its digits; (-1, 0) when there is none, or no digits,
    or more than 18 (the regular expressions' `\\d+` reads those)."""
    at = text.find(_CHOICE_START)
    if at < 0:
        return -1, 0
    pos = at + len(_CHOICE_START)
    size = len(event)
    index = 0
    digits = pos
    while pos < size and 48 <= event[pos] <= 57:
        index = index * 10 + event[pos] - 48
        pos += 1
    if pos == digits or pos - digits > 18:
        return -1, 0
    return index, pos


def _token_text(event: bytes, chat: bool, text: str = "") -> tuple[int, int, int]:
    """What `_CHAT_TEXT` (chat) or `_COMPLETION_TEXT` finds in `event`, read without the
    regular expression for a text without escapes (the common token): (the choice's
    index, the start and end of its raw text). NO_TOKEN_TEXT (index -1): not read here;
    the caller asks the expression, as before. A regular expression's search over a
    250-byte event costs ~5,000 instructions, this ~1,000.

    The first `"choices":[{"index":` is the only place the expression can match (a key
    in JSON text cannot occur inside a string, whose quotes are escaped), so a match
    found there is the expression's leftmost match. `text`: `event` decoded as latin-1,
    when the caller has it."""
    if not text:
        text = event.decode("latin-1")
    index, pos = _choice_index(event, text)
    if index < 0:
        return NO_TOKEN_TEXT
    before = _CHAT_BEFORE if chat else _TEXT_BEFORE
    if not _at(text, before, pos):
        return NO_TOKEN_TEXT
    start = pos + len(before)
    end = text.find('"', start)
    if end <= start or text.find("\\", start, end) >= 0:
        return NO_TOKEN_TEXT  # empty, or escapes: the expression decides
    if _at(text, _CHAT_TAIL if chat else _TEXT_TAIL, end):
        return index, start, end
    after = _CHAT_AFTER if chat else _TEXT_AFTER
    pos = end
    if not _at(text, after, pos):
        return NO_TOKEN_TEXT
    pos += len(after)
    if chat:
        if _at(text, _TOKEN_IDS, pos):
            pos += len(_TOKEN_IDS)
    else:  # each optional, in this order
        if _at(text, _STOP_REASON, pos):
            pos += len(_STOP_REASON)
        if _at(text, _PROMPT_TOKEN_IDS, pos):
            pos += len(_PROMPT_TOKEN_IDS)
        if _at(text, _TOKEN_IDS, pos):
            pos += len(_TOKEN_IDS)
    if not _at(text, _CHOICE_END, pos):
        return NO_TOKEN_TEXT
    return index, start, end


def _count_after(event: bytes, text: str, key: str, start: int) -> int:
    """The non-negative integer right after `key` (its first match from `start`); -1 when
    the key is absent or not followed by digits. `text` is `event` decoded as latin-1."""
    at = text.find(key, start)
    if at < 0:
        return -1
    begin = end = at + len(key)
    size = len(event)
    value = 0  # summed here: no slice and int() of it
    while end < size and 48 <= event[end] <= 57:  # b"0" to b"9"
        value = value * 10 + event[end] - 48
        end += 1
    # A count ends at the next key or the object's end (not 1.5 or 1e3), within int64.
    if end in (begin, size) or end - begin > 18 or event[end] not in _COUNT_ENDS:
        return -1
    return value


class ChunkFilter:
    """Per-stream state: which choices finished, their guards, token timing."""

    __slots__ = (
        "_last_event",
        "_template",
        "chat",
        "done",
        "ex",
        "finished",
        "guard_spec",
        "guards",
        "n_choices",
        "upstream_error",
        "watchdog",
    )

    def __init__(
        self,
        ex: Exchange,
        chat: bool,
        guard_spec: GuardSpec | None,
        n_choices: int,
        watchdog: StreamWatchdog | None = None,
    ) -> None:
        self.ex = ex
        self.chat = chat
        self.guard_spec = guard_spec
        self.n_choices = max(1, n_choices)
        self.watchdog = watchdog
        self.guards: dict[int, StreamGuard] = {}
        self.finished: set[int] = set()  # choices the guard ended
        self.done = False  # the client has its [DONE]: stop reading the backend
        self.upstream_error = False
        self._template: dict[str, Any] | None = None
        self._last_event = b""  # an event whose id/model a synthesized chunk can copy

    def _parse_event(self, event: bytes) -> bytes | None:
        """The full path: parse the chunk, guard each choice, rewrite when changed."""
        if not event.startswith(b"data:"):
            return event  # comments (keep-alives) and other fields pass through untouched
        payload = event[6:-2] if event.startswith(b"data: ") else event[5:-2]
        if payload == b"[DONE]":
            self.done = True
            return self.flush_held() + DONE_EVENT
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event
        if not isinstance(obj, dict):
            return event
        choices = obj.get("choices")
        usage = obj.get("usage")
        if usage:
            self.ex.record_usage(usage)
        if not choices:
            if "error" in obj:
                self.upstream_error = True
                self.ex.upstream_error = "stream_error"
            return event
        self._last_event = event
        guard_spec = self.guard_spec
        modified = False
        kept: list[Any] = []
        for choice in choices:
            index = choice.get("index", 0)
            if index in self.finished:
                modified = True  # the guard already ended this choice: drop its late chunks
                continue
            kept.append(choice)
            if self.chat:
                delta = choice.get("delta") or {}
                text = delta.get("content")
                if not text and (
                    delta.get("reasoning")
                    or delta.get("reasoning_content")
                    or delta.get("tool_calls")
                ):
                    self._token()
            else:
                delta = choice
                text = choice.get("text")
            if text:
                self._token()
            finish = choice.get("finish_reason")
            if finish is not None and index not in self.finished:
                self.ex.finish_reason = finish
            if guard_spec is None:
                continue
            guard = self.guards.get(index)
            if guard is None:
                guard = self.guards[index] = guard_spec.start()
            out = guard.feed(text) if text else ""
            if guard.finish_reason is None and finish is not None:
                out += guard.finish()
            if guard.finish_reason is not None:
                self._end_choice(choice, guard)
                modified = True
            if text is not None and out is not text:
                if self.chat:
                    delta["content"] = out
                else:
                    choice["text"] = out
                modified = True
            elif text is None and out:
                delta["content" if self.chat else "text"] = out
                modified = True
        if not modified:
            return event
        if not kept:
            return None
        obj["choices"] = kept
        out_event = b"data: " + orjson.dumps(obj) + SEPARATOR
        if len(self.finished) >= self.n_choices:
            self.done = True
            return out_event + DONE_EVENT
        return out_event

    def guarded(self, event: bytes, text: str = "") -> bytes | None:
        """A guarded stream's event. The common one (vLLM's layout: one choice, one text
        delta, no finish and no logprobs) is read by `_token_text` (a text with escapes
        by one regular expression over the bytes): the text is decoded without parsing
        the chunk, and the event goes out unchanged when the guard passes the text
        through. Anything else is parsed. `text`: the event decoded as latin-1, when the
        caller has it ("": not yet), as for `observe`."""
        if not text:
            text = event.decode("latin-1")
        index, start, end = _token_text(event, self.chat, text)
        escaped = False
        if index < 0:
            if self._nothing_to_guard(event, text):
                return event
            match = (_CHAT_TEXT if self.chat else _COMPLETION_TEXT).search(event)
            if match is None:
                return self._parse_event(event)
            index, start, end = int(match[1]), match.start(2), match.end(2)
            escaped = event.find(b"\\", start, end) >= 0  # find, not `in`: see observe
        if index in self.finished:
            return self._parse_event(event)
        raw = event[start:end]
        token: str = orjson.loads(b'"' + raw + b'"') if escaped else raw.decode("utf-8")
        self._token()
        guard = self.guards.get(index)
        if guard is None:
            assert self.guard_spec is not None
            guard = self.guards[index] = self.guard_spec.start()
        out = guard.feed(token)
        if guard.finish_reason is None:
            if out is token:
                return event
            # Held back (part of) the text: splice the released part into the bytes.
            self._last_event = event
            return event[:start] + orjson.dumps(out)[1:-1] + event[end:]
        return self._rewrite(event, index, out, guard)

    def _nothing_to_guard(self, event: bytes, text: str) -> bool:
        """vLLM's role chunk (a choice's first: no text, no finish) and its usage chunk
        (no choices), known by their literal form: what `_parse_event` does with them,
        without parsing them (~19,000 instructions each, twice per stream). False: not
        one of them, or not in that form; the event is parsed as before. `text`: `event`
        decoded as latin-1."""
        if _USAGE_KEY in text:
            # The usage chunk: its counts read as observe reads them. (A role chunk with
            # usage in it, as continuous usage stats send, is parsed.)
            return (
                '"choices":[]' in text
                and _CHOICE_START not in text
                and _FINISH_KEY not in text
                and '"error"' not in text
                and self._compact(event, text)
            )
        if not self.chat:
            return False
        index, pos = _choice_index(event, text)
        if index < 0 or index in self.finished:
            return False
        if not _at(text, _ROLE_REST, pos) or '"error"' in text:
            return False
        # As _parse_event: the chunk a synthesized one copies its id and model from. The
        # choice's guard is made with its first text (an empty one would hold nothing).
        self._last_event = event
        return True

    def _rewrite(self, event: bytes, index: int, out: str, guard: StreamGuard) -> bytes:
        """The event with its text replaced by what the guard released (and the choice
        finished when the guard matched)."""
        obj = orjson.loads(event[6:] if event.startswith(b"data: ") else event[5:])
        self._last_event = event
        for choice in obj["choices"]:
            if choice.get("index", 0) != index:
                continue
            if self.chat:
                choice["delta"]["content"] = out
            else:
                choice["text"] = out
            if guard.finish_reason is not None:
                self._end_choice(choice, guard)
        out_event = b"data: " + orjson.dumps(obj) + SEPARATOR
        if len(self.finished) >= self.n_choices:
            self.done = True
            return out_event + DONE_EVENT
        return out_event

    def observe(self, event: bytes, text: str = "") -> bytes:
        """No guard: the event goes out unchanged, and a few searches find what the timers
        and metrics need, without parsing the JSON of every token.

        The event is searched as text (its latin-1 decoding, see `_CONTENT_KEY`): one copy
        of the event, then each search a direct call. (As bytes, `find` rather than `in`:
        CPython 3.11's `bytes.__contains__` first tries its argument as an integer and
        builds, then drops, a TypeError each time.)"""
        # A byte looked at is cheaper than a method called: "data: [" may be [DONE], and
        # only 'data: {"e' may be an error.
        if len(event) > 8 and event[6] == _BRACKET and event.startswith(DONE_EVENT):
            self.done = True
            return event
        if not text:  # the relay passes the text it searched for the event's newline
            text = event.decode("latin-1")
        key = _CONTENT_KEY if self.chat else _TEXT_KEY
        at = text.find(key)
        if (at >= 0 and event[at + len(key)] != _QUOTE) or (
            self.chat and ('"reasoning' in text or '"tool_calls":[' in text)
        ):
            self._token()  # reasoning and tool-call deltas count for the timers too
        if (
            _FINISH_KEY in text
            or _USAGE_KEY in text
            or (len(event) > 8 and event[8] == _E and event.startswith(_ERROR_PREFIX))
        ):
            self._bookkeep(event, text)
        return event

    def _bookkeep(self, event: bytes, text: str = "") -> None:
        """The finish reason and usage of an event that has them. The compact JSON vLLM
        writes is read by searches (`_bookkeep_compact`); anything else (an error key,
        spaces, an escaped finish reason, a null count) by parsing the event. `text`:
        `event` decoded as latin-1, when the caller has it."""
        if not text:
            text = event.decode("latin-1")
        if '"error"' not in text and self._compact(event, text):
            return
        self._bookkeep_parsed(event)

    def _bookkeep_compact(self, event: bytes) -> bool:
        """`_compact` of an event (for tests)."""
        return self._compact(event, event.decode("latin-1"))

    def _compact(self, event: bytes, text: str) -> bool:
        """What `_bookkeep_parsed` records, found without building the event's objects
        (2 of the 4 events of a short stream come here: ~1.5 us of parsing each). A JSON
        string escapes its quotes, so `"finish_reason":"` and `"prompt_tokens":` match
        keys only, never text. False (nothing recorded): the event is not in that form.
        `text` is `event` decoded as latin-1."""
        prompt = completion = -1
        at = text.find(_USAGE_KEY)
        finish = text.rfind(_FINISH_KEY)  # the last choice's, as the parsed path
        if at < 0 and finish < 0:
            return False
        if at >= 0:
            prompt = _count_after(event, text, '"prompt_tokens":', at)
            completion = _count_after(event, text, '"completion_tokens":', at)
            if prompt < 0 or completion < 0:
                return False
        reason: str | None = None
        if finish >= 0:
            start = finish + len(_FINISH_KEY)
            end = text.find('"', start)
            if end < 0 or text.find("\\", start, end) >= 0:
                return False
            reason = event[start:end].decode("utf-8", "replace")
        if prompt >= 0:
            self.ex.prompt_tokens = prompt
            self.ex.completion_tokens = completion
        if reason is not None:
            self.ex.finish_reason = reason
        return True

    def _bookkeep_parsed(self, event: bytes) -> None:
        try:
            obj = orjson.loads(event[6:] if event.startswith(b"data: ") else event[5:])
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict):
            return
        usage = obj.get("usage")
        if usage:
            self.ex.record_usage(usage)
        if "error" in obj and not obj.get("choices"):
            self.upstream_error = True
            self.ex.upstream_error = "stream_error"
        for choice in obj.get("choices") or ():
            if isinstance(choice, dict) and choice.get("finish_reason") is not None:
                self.ex.finish_reason = choice["finish_reason"]

    def _token(self) -> None:
        now = monotonic()
        ex = self.ex
        watchdog = self.watchdog
        if ex.first_token_at is None:
            ex.first_token_at = now
            if watchdog is not None:
                watchdog.first_token(now)
        else:
            ex.add_gap(now - ex.last_token_at)
            if watchdog is not None:
                watchdog.last_token = now
        ex.last_token_at = now
        ex.content_chunks += 1

    def _end_choice(self, choice: dict[str, Any], guard: StreamGuard) -> None:
        index = choice.get("index", 0)
        self.finished.add(index)
        choice["finish_reason"] = guard.finish_reason
        choice["stop_reason"] = guard.matched
        if "logprobs" in choice:
            choice["logprobs"] = None  # they may describe tokens of the removed text
        self.ex.finish_reason = guard.finish_reason
        self.ex.cut = guard.matched

    def _chunk_template(self) -> dict[str, Any]:
        event = self._last_event
        if self._template is None and event:
            try:
                last = orjson.loads(event[6:] if event.startswith(b"data: ") else event[5:])
            except orjson.JSONDecodeError:
                last = {}
            self._template = {k: last[k] for k in ("id", "object", "created", "model") if k in last}
        return self._template or {}

    def eof_tail(self) -> bytes:
        """What the client gets when the backend ended without [DONE]."""
        return self.flush_held() + DONE_EVENT

    def flush_held(self) -> bytes:
        """Text still held back when the backend ended without a finish chunk."""
        out = b""
        for index, guard in self.guards.items():
            if index in self.finished:
                continue
            tail = guard.finish()
            if not tail and guard.finish_reason is None:
                continue
            choice: dict[str, Any] = {"index": index}
            if self.chat:
                choice["delta"] = {"content": tail}
            else:
                choice["text"] = tail
            choice["logprobs"] = None
            choice["finish_reason"] = guard.finish_reason
            if guard.finish_reason is not None:
                self.finished.add(index)
                choice["stop_reason"] = guard.matched
            obj = dict(self._chunk_template())
            obj["choices"] = [choice]
            out += b"data: " + orjson.dumps(obj) + SEPARATOR
        return out
