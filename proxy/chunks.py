"""Filtering one stream's SSE events: token timing for the timers and metrics, and the
stream guard per choice index.

`ChunkFilter.guarded` (with a guard) or `ChunkFilter.observe` (without) takes one event
(with its trailing blank line) and returns the bytes to send, rewriting a chunk only when
the guard changed its text. It does no I/O, so the
property tests drive the exact code the relay runs. vLLM's common chunks (a token, the
role chunk, the last token with its finish reason, the usage chunk) are read by their
literal layout (`vllmshape`). Without a guard no event is parsed (searches find what the
timers need in any other layout); with one, a token chunk in another layout is matched by
one regular expression, and only what neither reads is parsed.
"""

from __future__ import annotations

import re
from typing import Any, Final

import orjson

from . import lenientjson
from .chunkscan import LAST_SHIFT, PACK_MASK, PACK_SHIFT, layout_of, scan, scan_passed, scan_tokens
from .clock import monotonic
from .exchange import Exchange
from .sse import DONE_EVENT, SEPARATOR, data_of, event_data, is_done
from .stopwords import GuardSpec, StreamGuard
from .timeouts import StreamWatchdog
from .tokendetails import DetailHold, drop_token_details, has_token_details, take_token_details
from .vllmshape import (
    CHAT_TEXT_OPEN,
    CHAT_TOKEN_END,
    CHOICES,
    FINISH_KEY,
    NOT_READ,
    TEXT_TEXT_OPEN,
    TEXT_TOKEN_END,
    USAGE_KEY,
    digits_at,
    ends_at,
    maybe_role,
    read_choice,
    role_end,
    token_span,
    usage_counts,
)

# The keys observe looks for, as text: an event is searched as its latin-1 decoding (one
# character per byte, so positions are the bytes'). Compiled, `str.find` and `in` are direct
# calls into CPython's search; `bytes.find` goes through a method lookup, an argument tuple
# and its parsing each time, ~3x the cost of a search over a 250-byte event.
_CONTENT_KEY: Final = '"content":"'
_TEXT_KEY: Final = '"text":"'
_QUOTE: Final = ord('"')
_ERROR_PREFIX: Final = b'data: {"error"'
_COUNT_ENDS: Final = b",}"
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


# One-character strings of ASCII by code: indexed, where chr() is a builtin looked up and
# called through the interpreter compiled (~400 instructions).
_ASCII: Final = tuple(map(chr, range(128)))


def _count_after(event: bytes, text: str, key: str, start: int) -> int:
    """The non-negative integer right after `key` (its first match from `start`); -1 when
    the key is absent or not followed by digits. `text` is `event` decoded as latin-1."""
    found = text.find(key, start)
    if found < 0:
        return -1
    value, end = digits_at(event, found + len(key))
    # A count ends at the next key or the object's end (not 1.5 or 1e3).
    if value < 0 or end == len(event) or event[end] not in _COUNT_ENDS:
        return -1
    return value


def _quiet_after(event: bytes, text: str, after: int) -> bool:
    """Nothing after a chunk's choices array (ending at `after`) that the general path
    would record: the chunk ends there (vLLM's token chunks), or what follows has no usage
    and no finish reason (vLLM's `system_fingerprint`, the role chunk's prompt fields)."""
    return ends_at(event, after) or (
        text.find(USAGE_KEY, after) < 0 and text.find(FINISH_KEY, after) < 0
    )


class ChunkFilter:
    """Per-stream state: which choices finished, their guards, token timing."""

    __slots__ = (
        "_head",
        "_last_event",
        "_layout",
        "_pass_table",
        "_template",
        "_token_end",
        "_token_opening",
        "chat",
        "detail_holds",
        "done",
        "ex",
        "finished",
        "guard_spec",
        "guards",
        "n_choices",
        "reasoning_guards",
        "skips_common",
        "tool_guards",
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
        # A chat choice's reasoning (`delta.reasoning`, or vLLM's older `reasoning_content`)
        # has a guard of its own while it lasts: its held tail goes out, as reasoning, when
        # the choice's content, a tool call or its finish begins.
        self.reasoning_guards: dict[int, tuple[StreamGuard, str]] = {}
        # Each tool call's arguments, by (choice, tool call) index, likewise: what they hold
        # back goes out when the choice finishes.
        self.tool_guards: dict[tuple[int, int], StreamGuard] = {}
        # A choice's logprobs and token ids while its text is held back (`tokendetails`).
        self.detail_holds: dict[int, DetailHold] = {}
        self.finished: set[int] = set()  # choices the guard ended
        self.done = False  # the client has its [DONE]: stop reading the backend
        self.upstream_error = False
        self._template: dict[str, Any] | None = None
        self._last_event = b""  # an event whose id/model a synthesized chunk can copy
        self._head = ""  # what precedes the choices array in this stream's chunks
        # vLLM's token chunk of this stream, before and after its text (`token_span`)
        self._token_opening = ""
        self._token_end = CHAT_TOKEN_END if chat else TEXT_TOKEN_END
        # This stream's chunk forms for `skip_common` (chunkscan.layout_of), once its
        # head is known; () until then.
        self._layout: tuple[bytes, ...] = ()
        # Whether the relay may hand whole chunks to `skip_common` (no guard) or
        # `skip_passed` (a guard whose pass_table tells what it passes): only where
        # `observe` and `guarded` are this class's (an endpoint's filter reads its own).
        self._pass_table = b"" if guard_spec is None else guard_spec.pass_table or b""
        self.skips_common = type(self) is ChunkFilter and (
            guard_spec is None or bool(self._pass_table)
        )

    def _parse_event(self, event: bytes) -> bytes | None:
        """The full path: parse the chunk, guard each choice, rewrite when changed."""
        if not event.startswith(b"data:") or event.find(b"\n") < len(event) - 2:
            # Other fields (`event:`, `id:`, comments) or data over several lines: what a
            # client reads is the data, so that is what is guarded, as one `data:` line;
            # the other lines go out before it as they came.
            other, data = data_of(event)
            if data is None:
                return event  # comments (keep-alives) and other fields pass through untouched
            single = b"data: " + data + SEPARATOR
            read = self._parse_data(single, data)
            if read is single:
                return event
            return None if read is None else other + read
        return self._parse_data(event, event[6:-2] if event.startswith(b"data: ") else event[5:-2])

    def _parse_data(self, event: bytes, payload: bytes) -> bytes | None:
        """`_parse_event` of an event whose data is `payload`."""
        if payload == b"[DONE]":
            self.done = True
            return self.flush_held() + DONE_EVENT
        obj = lenientjson.read(payload)  # a lone surrogate escape too: read, not passed
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
        if not isinstance(choices, list):
            return event  # not a chunk's shape: relayed as it came, nothing to guard
        for choice in choices:
            index = choice.get("index", 0) if isinstance(choice, dict) else None
            if type(index) is not int:
                kept.append(choice)  # a choice of another shape: relayed as it came
                continue
            if index in self.finished:
                modified = True  # the guard already ended this choice: drop its late chunks
                continue
            kept.append(choice)
            if self.chat:
                delta = choice.get("delta")
                if delta is None:
                    delta = choice["delta"] = {}  # where released text goes, if any
                elif not isinstance(delta, dict):
                    continue
                text = delta.get("content")
                if not text and (
                    delta.get("reasoning")
                    or delta.get("reasoning_content")
                    or delta.get("tool_calls")
                ):
                    self._token()
                if guard_spec is not None and self._guard_reasoning(choice, delta, index, text):
                    modified = True
                    if index in self.finished:
                        continue  # the reasoning matched: nothing after it is sent
                if (
                    guard_spec is not None
                    and (self.tool_guards or delta.get("tool_calls"))
                    and self._guard_tool_calls(choice, delta, index)
                ):
                    modified = True
                    if index in self.finished:
                        continue
            else:
                delta = choice
                text = choice.get("text")
            if not isinstance(text, str):
                text = None
            if text:
                self._token()
            finish = choice.get("finish_reason")
            if not isinstance(finish, str):
                finish = None  # a backend's number or object is relayed, not recorded
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
                hold = self.detail_holds.get(index)
                if hold is not None:  # released text that waited goes out before the cut
                    out = hold.drain(out, cut=True)[0]
                self._end_choice(choice, guard)
                modified = True
            elif index in self.detail_holds or self._holds_details(choice, index, guard):
                out = self._hold_details(choice, index, text or "", out, guard)
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
        out_event = b"data: " + lenientjson.write(obj) + SEPARATOR
        if len(self.finished) >= self.n_choices:
            self.done = True
            return out_event + DONE_EVENT
        return out_event

    def _choices(self, text: str) -> int:
        """Where the event's choices array begins (after `"choices":[`), for the layout
        readers; -1 for none, or when a usage or error key precedes it (which they would
        not see). vLLM writes the same bytes before it in every chunk of a stream (id,
        object, created, model): compared whole, they take the place of a search."""
        head = self._head
        if head and text.startswith(head):
            return len(head)
        found = text.find(CHOICES)
        if found < 0:
            return -1
        end = found + len(CHOICES)
        head = text[:end]
        if USAGE_KEY in head or '"error"' in head:
            return -1
        self._head = head
        self._token_opening = head + (CHAT_TEXT_OPEN if self.chat else TEXT_TEXT_OPEN)
        self._layout = layout_of(head, self.chat)
        return end

    def guarded(self, event: bytes, text: str = "") -> bytes | None:
        """A guarded stream's event. The common ones, in vLLM's layout (one choice, one
        text, no logprobs), are read by `vllmshape.read_choice` (another layout with a
        token by one regular expression over the bytes): the text is decoded without
        parsing the chunk, and the event goes out unchanged when the guard passes the
        text through. Anything else is parsed. `text`: the event decoded as latin-1, when
        the caller has it ("": not yet), as for `observe`."""
        if not text:
            text = event.decode("latin-1")
        if (
            not event.startswith(b"data:")
            or text.find("\n") < len(text) - 2
            or self.reasoning_guards  # a reasoning tail held: parsed, it goes out first
            or self.tool_guards
            or self.detail_holds
        ):
            return self._parse_event(event)  # other fields or lines: the parse reads them
        if self._token_opening and 0 not in self.finished:
            start, end = token_span(text, self._token_opening, self._token_end)
            if start >= 0:
                if end == start:
                    return self._nothing_to_feed(event)
                return self._guard_text(event, text, 0, start, end, None)
        pos = self._choices(text)
        index, start, end, reason_start, reason_end, after = (
            read_choice(event, text, self.chat, pos) if pos >= 0 else NOT_READ
        )
        if index < 0:
            if self._nothing_to_guard(event, text, pos):
                return event
            match = (_CHAT_TEXT if self.chat else _COMPLETION_TEXT).search(event)
            if match is None:
                return self._parse_event(event)
            index, start, end, after = int(match[1]), match.start(2), match.end(2), match.end()
        if index in self.finished or not self._quiet_or_usage(event, text, after):
            return self._parse_event(event)
        if reason_start >= 0:  # the choice's last text, with its finish reason
            finish = event[reason_start:reason_end].decode("utf-8", "replace")
            return self._guard_text(event, text, index, start, end, finish)
        if end == start:
            return self._nothing_to_feed(event)
        return self._guard_text(event, text, index, start, end, None)

    def _nothing_to_feed(self, event: bytes) -> bytes:
        """A token chunk with an empty text and no finish (vLLM sends them while it holds
        back what may begin a stop string): what `_parse_event` leaves, unchanged. (The
        choice's guard is made with its first text; an empty one would hold nothing.)"""
        self._last_event = event
        return event

    def _guard_text(
        self, event: bytes, text: str, index: int, start: int, end: int, finish: str | None
    ) -> bytes | None:
        """Guards the text event[start:end] (raw JSON string content) of choice `index`
        and the finish reason that came with it, as `_parse_event` would: the event
        unchanged when the guard passes the text through, the released text spliced in
        when it held some back, rewritten when it ended the choice."""
        raw = event[start:end]
        try:
            if text.find("\\", start, end) >= 0:
                token: str = orjson.loads(b'"' + raw + b'"')
            else:
                token = raw.decode("utf-8")
        except ValueError:  # not JSON's escapes, or not UTF-8: as the parse leaves it
            return self._parse_event(event)
        if token:
            self._token()
        guard = self.guards.get(index)
        if guard is None:
            assert self.guard_spec is not None
            guard = self.guards[index] = self.guard_spec.start()
        out = guard.feed(token)
        if finish is not None:
            self.ex.finish_reason = finish
            self._last_event = event
            if guard.finish_reason is None:
                out += guard.finish()
        if guard.finish_reason is None:
            if out is token or (finish is not None and out == token):
                return event
            # Held back (part of) the text: splice the released part into the bytes.
            self._last_event = event
            return event[:start] + orjson.dumps(out)[1:-1] + event[end:]
        return self._rewrite(event, index, out, guard)

    def _nothing_to_guard(self, event: bytes, text: str, pos: int) -> bool:
        """vLLM's role chunk (a choice's first: no text, no finish) and its usage chunk
        (no choices), known by their literal form (`vllmshape`): what `_parse_event` does
        with them, without parsing them (~19,000 instructions each, twice per stream).
        False: not one of them, or not in that form; the event is parsed as before.
        `pos`: where the choices array begins (`_choices`)."""
        if pos < 0:
            return False
        if self._read_usage(event, text, pos):
            return True
        if not self.chat:
            return False
        after = role_end(event, text, pos)
        if after < 0 or digits_at(event, pos + len('{"index":'))[0] in self.finished:
            return False
        if not self._quiet_or_usage(event, text, after):
            return False
        # As _parse_event: the chunk a synthesized one copies its id and model from. The
        # choice's guard is made with its first text (an empty one would hold nothing).
        self._last_event = event
        return True

    def _quiet_or_usage(self, event: bytes, text: str, after: int) -> bool:
        """Nothing after the choices array (ending at `after`) that parsing would record
        (`_quiet_after`), or vLLM's usage object there (continuous usage stats), recorded.
        False: something else, nothing recorded."""
        return _quiet_after(event, text, after) or self._read_usage(event, text, after - 1)

    def _read_usage(self, event: bytes, text: str, pos: int) -> bool:
        """vLLM's usage object (`usage_counts`) right after `pos` (the end of the choices
        array, or its `]`), its counts recorded; False: not in that form, or an error, a
        finish reason or another usage after it (which the parse reads), nothing recorded."""
        prompt, completion, after = usage_counts(event, text, pos)
        if prompt < 0 or not (
            ends_at(event, after)
            or (_quiet_after(event, text, after) and text.find('"error"', after) < 0)
        ):
            return False
        self.ex.prompt_tokens = prompt
        self.ex.completion_tokens = completion
        return True

    def _rewrite(self, event: bytes, index: int, out: str, guard: StreamGuard) -> bytes | None:
        """The event with its text replaced by what the guard released (and the choice
        finished when the guard matched)."""
        obj = lenientjson.read(event[6:] if event.startswith(b"data: ") else event[5:])
        if not isinstance(obj, dict):  # JSON to neither parser: as the parse leaves it
            return self._parse_event(event)
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
        out_event = b"data: " + lenientjson.write(obj) + SEPARATOR
        if len(self.finished) >= self.n_choices:
            self.done = True
            return out_event + DONE_EVENT
        return out_event

    def skip_common(self, data: bytes, pos: int) -> int:
        """From `pos`, a chunk's start in a backend read: the whole chunks that hold vLLM's
        token chunks, a choice's last chunk or the usage chunk in their literal form
        (`chunkscan`), recorded as `observe` records each and sent on unchanged. Returns
        the position after them; `pos` where the first is something else, or where this
        stream's head is not known yet. Only where `skips_common`."""
        layout = self._layout
        if not layout:
            return pos
        packed = scan_tokens(data, pos, layout)
        if packed >= 0:
            tokens = packed >> PACK_SHIFT
            if tokens:
                self._tokens(tokens)
            return packed & PACK_MASK
        end, tokens, reason_start, reason_end, prompt, completion = scan(data, pos, layout)
        if tokens:
            self._tokens(tokens)
        if reason_start >= 0:
            self.ex.finish_reason = data[reason_start:reason_end].decode("utf-8", "replace")
        if prompt >= 0:
            self.ex.prompt_tokens = prompt
            self.ex.completion_tokens = completion
        return end

    def skip_passed(self, data: bytes, pos: int) -> int:
        """`skip_common` of a guarded stream: from `pos`, the whole chunks that hold choice
        0's token chunks in vLLM's literal form, with texts its guard passes unchanged
        (`chunkscan.scan_passed`), recorded as `guarded` records each and sent on
        unchanged. Only while the guard holds nothing and no other guard or hold is open
        (then `guarded` parses or holds); returns `pos` otherwise, or where the first chunk
        is something else."""
        layout = self._layout
        if not layout or self.reasoning_guards or self.tool_guards or self.detail_holds:
            return pos
        guard = self.guards.get(0)
        if guard is None or not guard.idle() or 0 in self.finished:
            return pos
        packed = scan_passed(data, pos, layout, self._pass_table)
        if packed < 0:
            return pos
        tokens = packed >> PACK_SHIFT & PACK_MASK
        if tokens:
            self._tokens(tokens)
            guard.passed(_ASCII[packed >> LAST_SHIFT])
        return packed & PACK_MASK

    def observe(self, event: bytes, text: str = "") -> bytes:
        """No guard: the event goes out unchanged. vLLM's common chunks are read by their
        layout (`_observed`); in any other, a few searches find what the timers and metrics
        need, without parsing the JSON of every token.

        The event is searched as text (its latin-1 decoding, see `_CONTENT_KEY`): one copy
        of the event, then each search a direct call. (As bytes, `find` rather than `in`:
        CPython 3.11's `bytes.__contains__` first tries its argument as an integer and
        builds, then drops, a TypeError each time.)"""
        # A byte looked at is cheaper than a method called: only 'data: {"e' may be an
        # error (is_done looks at one byte too).
        if is_done(event):
            self.done = True
            return event
        if not text:  # the relay passes the text it searched for the event's newline
            text = event.decode("latin-1")
        if self._token_opening:
            start, end = token_span(text, self._token_opening, self._token_end)
            if start >= 0:
                if end > start:
                    self._token()
                return event
        pos = self._choices(text)
        if pos >= 0:
            if self._observed(event, text, pos):
                return event
        elif '"choices"' in text:
            # Not vLLM's compact JSON (`"choices": [` with a space, as Python's json
            # writes it): the searches below would find no key, so no token would reach
            # the timers and the first-token deadline would cut a healthy stream. Parsed.
            return self._parse_event(event) or event
        key = _CONTENT_KEY if self.chat else _TEXT_KEY
        at = text.find(key)
        if (at >= 0 and event[at + len(key)] != _QUOTE) or (
            self.chat and ('"reasoning' in text or '"tool_calls":[' in text)
        ):
            self._token()  # reasoning and tool-call deltas count for the timers too
        if (
            FINISH_KEY in text
            or USAGE_KEY in text
            or (len(event) > 8 and event[8] == _E and event.startswith(_ERROR_PREFIX))
        ):
            self._bookkeep(event, text)
        return event

    def _observed(self, event: bytes, text: str, pos: int) -> bool:
        """observe's reading of vLLM's common chunks by their layout (`vllmshape`): a
        token, the role chunk, the last token with its finish reason, the usage chunk.
        Records what the general path below records for them, with no search over the
        whole event; False (nothing recorded): not one of them."""
        if self.chat and maybe_role(event, pos):
            after = role_end(event, text, pos)
            if after >= 0:
                return self._quiet_or_usage(event, text, after)
        index, start, end, reason_start, reason_end, after = read_choice(
            event, text, self.chat, pos
        )
        if index >= 0:
            if not self._quiet_or_usage(event, text, after):
                return False
            if end > start:
                self._token()
            if reason_start >= 0:
                self.ex.finish_reason = event[reason_start:reason_end].decode("utf-8", "replace")
            return True
        return self._read_usage(event, text, pos)

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
        at = text.find(USAGE_KEY)
        finish = text.rfind(FINISH_KEY)  # the last choice's, as the parsed path
        if at < 0 and finish < 0:
            return False
        if at >= 0:
            prompt = _count_after(event, text, '"prompt_tokens":', at)
            completion = _count_after(event, text, '"completion_tokens":', at)
            if prompt < 0 or completion < 0:
                return False
        reason: str | None = None
        if finish >= 0:
            start = finish + len(FINISH_KEY)
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
        payload = event_data(event)  # other fields or several data lines: as a client reads
        obj = None if payload is None else lenientjson.read(payload)
        if not isinstance(obj, dict):
            return
        usage = obj.get("usage")
        if usage:
            self.ex.record_usage(usage)
        if "error" in obj and not obj.get("choices"):
            self.upstream_error = True
            self.ex.upstream_error = "stream_error"
        choices = obj.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, dict):
                finish = choice.get("finish_reason")
                if isinstance(finish, str):
                    self.ex.finish_reason = finish

    def _token(self) -> None:
        self._tokens(1)

    def _tokens(self, count: int) -> None:
        """`count` (>= 1) tokens that came in one read: one clock reading for all of them,
        so the gaps after the first are 0 (they were microseconds when each token read
        the clock; ~180 instructions a reading compiled)."""
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
        if count > 1:
            ex.add_zero_gaps(count - 1)
        ex.last_token_at = now
        ex.content_chunks += count

    def _holds_details(self, choice: dict[str, Any], index: int, guard: StreamGuard) -> bool:
        """Whether the choice's token details must wait (`tokendetails`): it has some,
        and one of its guards holds text back."""
        return has_token_details(choice) and (
            guard.held_length > 0 or self._other_guard_holds(index)
        )

    def _other_guard_holds(self, index: int) -> bool:
        """Whether the choice's reasoning or one of its tool calls holds text back."""
        reasoning = self.reasoning_guards.get(index)
        if reasoning is not None and reasoning[0].held_length:
            return True
        return any(g.held_length for (i, _), g in self.tool_guards.items() if i == index)

    def _hold_details(
        self, choice: dict[str, Any], index: int, text: str, out: str, guard: StreamGuard
    ) -> str:
        """The chunk's details set aside until all of its text goes out, and those that
        waited for the text now released put on it; returns the text it carries."""
        hold = self.detail_holds.get(index)
        if hold is None:
            # `out` may begin with text an earlier chunk left held: its offsets come first.
            hold = DetailHold(len(out) + guard.held_length - len(text))
            self.detail_holds[index] = hold
        hold.add(text, take_token_details(choice))
        sent, details = hold.release(out, self._other_guard_holds(index))
        choice.update(details)
        if hold.idle:
            del self.detail_holds[index]
        return sent

    def _guard_reasoning(
        self, choice: dict[str, Any], delta: dict[str, Any], index: int, text: Any
    ) -> bool:
        """Guards the choice's reasoning delta, as its content is: a stop string or cut
        pattern in the reasoning ends the choice there (vLLM's own stop strings read the
        reasoning too). True when the chunk changed."""
        key = "reasoning" if "reasoning" in delta else "reasoning_content"
        piece = delta.get(key)
        held = self.reasoning_guards.get(index)
        changed = False
        if isinstance(piece, str) and piece:
            if held is None:
                assert self.guard_spec is not None
                held = self.reasoning_guards[index] = (self.guard_spec.start(), key)
            guard = held[0]
            out = guard.feed(piece)
            if guard.finish_reason is not None:
                return self._end_in_reasoning(choice, index, delta, key, out, guard)
            if out is not piece:
                delta[key] = out
                changed = True
        if held is not None and (
            text or delta.get("tool_calls") or choice.get("finish_reason") is not None
        ):
            # The reasoning is over: what its guard held back goes out before the rest.
            guard, key = held
            del self.reasoning_guards[index]
            tail = guard.finish()
            released = (delta.get(key) or "") + tail
            if guard.finish_reason is not None:
                return self._end_in_reasoning(choice, index, delta, key, released, guard)
            if tail:
                delta[key] = released
                changed = True
        return changed

    def _guard_tool_calls(self, choice: dict[str, Any], delta: dict[str, Any], index: int) -> bool:
        """Guards each tool call's arguments as text: a stop string or cut pattern in them
        ends the choice there. True when the chunk changed."""
        calls = delta.get("tool_calls")
        changed = False
        if isinstance(calls, list):
            for position, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(call, dict):
                    continue
                arguments = function.get("arguments")
                tool = call.get("index", 0)
                if not isinstance(arguments, str) or not arguments or type(tool) is not int:
                    continue
                guard = self.tool_guards.get((index, tool))
                if guard is None:
                    assert self.guard_spec is not None
                    guard = self.tool_guards[(index, tool)] = self.guard_spec.start()
                out = guard.feed(arguments)
                if guard.finish_reason is not None:
                    function["arguments"] = out
                    del calls[position + 1 :]
                    delta.pop("content", None)
                    return self._end_in_tool_call(choice, index, guard)
                if out is not arguments:
                    function["arguments"] = out
                    changed = True
        if choice.get("finish_reason") is not None:
            for tool, tail, guard in self._tool_tails(index):
                if tail:
                    if not isinstance(delta.get("tool_calls"), list):
                        delta["tool_calls"] = []
                    delta["tool_calls"].append({"index": tool, "function": {"arguments": tail}})
                    changed = True
                if guard.finish_reason is not None:
                    return self._end_in_tool_call(choice, index, guard)
        return changed

    def _tool_tails(self, index: int) -> list[tuple[int, str, StreamGuard]]:
        """What the choice's tool-call guards still hold, by tool call; the guards go."""
        tails = []
        for key in sorted(k for k in self.tool_guards if k[0] == index):
            guard = self.tool_guards.pop(key)
            tails.append((key[1], guard.finish(), guard))
            if guard.finish_reason is not None:
                break
        return tails

    def _end_in_tool_call(self, choice: dict[str, Any], index: int, guard: StreamGuard) -> bool:
        for key in [k for k in self.tool_guards if k[0] == index]:
            del self.tool_guards[key]
        self._end_choice(choice, guard)
        return True

    def _end_in_reasoning(
        self,
        choice: dict[str, Any],
        index: int,
        delta: dict[str, Any],
        key: str,
        out: str,
        guard: StreamGuard,
    ) -> bool:
        delta[key] = out
        delta.pop("content", None)
        delta.pop("tool_calls", None)
        self.reasoning_guards.pop(index, None)
        self._end_choice(choice, guard)
        return True

    def _end_choice(self, choice: dict[str, Any], guard: StreamGuard) -> None:
        index = choice.get("index", 0)
        self.finished.add(index)
        choice["finish_reason"] = guard.finish_reason
        choice["stop_reason"] = guard.matched
        drop_token_details(choice)
        self.detail_holds.pop(index, None)  # the details that waited name cut text
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

    def _flush_reasoning(self) -> bytes:
        """Reasoning, and tool-call arguments, still held back when the backend ended."""
        out = b""
        for index in sorted(self.reasoning_guards):
            if index in self.finished:
                continue
            guard, key = self.reasoning_guards[index]
            tail = guard.finish()
            if not tail and guard.finish_reason is None:
                continue
            out += self._held_chunk({"index": index, "delta": {key: tail}}, guard)
        self.reasoning_guards.clear()
        for index in sorted({key[0] for key in self.tool_guards}):
            if index in self.finished:
                continue
            calls = []
            last: StreamGuard | None = None
            for tool, tail, guard in self._tool_tails(index):
                if tail:
                    calls.append({"index": tool, "function": {"arguments": tail}})
                last = guard  # the one that matched, if any: _tool_tails stops there
            if last is not None and (calls or last.finish_reason is not None):
                out += self._held_chunk({"index": index, "delta": {"tool_calls": calls}}, last)
        self.tool_guards.clear()
        return out

    def flush_held(self) -> bytes:
        """Text still held back when the backend ended without a finish chunk, by choice
        index (the guards' own order is whichever choice came first, which depends on
        which of its chunks were read by their layout and which were parsed)."""
        out = self._flush_reasoning()
        guards = self.guards
        for index in sorted(guards):
            guard = guards[index]
            if index in self.finished:
                continue
            tail = guard.finish()
            hold = self.detail_holds.pop(index, None)
            details: dict[str, Any] = {}
            if hold is not None:  # the text released but not sent goes out before the tail
                tail, details = hold.drain(tail, cut=guard.finish_reason is not None)
            if not tail and not details and guard.finish_reason is None:
                continue
            choice: dict[str, Any] = {"index": index}
            if self.chat:
                choice["delta"] = {"content": tail}
            else:
                choice["text"] = tail
            out += self._held_chunk(choice, guard, details)
        return out

    def _held_chunk(
        self, choice: dict[str, Any], guard: StreamGuard, details: dict[str, Any] | None = None
    ) -> bytes:
        """A chunk of sluice's with what `guard` still held at the stream's end (`choice`,
        its index and text, and the token `details` of that text when they waited with
        it); the choice ends there when the guard matched."""
        choice["logprobs"] = None
        if details:
            choice.update(details)
        choice["finish_reason"] = guard.finish_reason
        if guard.finish_reason is not None:
            self.finished.add(choice["index"])
            choice["stop_reason"] = guard.matched
        obj = dict(self._chunk_template())
        obj["choices"] = [choice]
        return b"data: " + orjson.dumps(obj) + SEPARATOR
