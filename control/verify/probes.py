"""Probes through the in-process sluice, compared with the backend answered directly:
greedy answers equal, wire shapes, error bodies, every mapped GenerationConfig field, stop
strings. Each returns one `Check`; none raises for what the backend answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from sluice.control.config.presets import MAPPING

from .client import GREEDY, MESSAGES, PROMPT, Answer, ProbeClient
from .harness import ALL_FIELDS_ROUTE, FIELD_VALUES, STOP_ROUTE, field_route
from .report import Check
from .wire import check_error_body, check_stream, parse_events

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
STREAM_TOKENS = 48
USAGE_OPTION = {"stream_options": {"include_usage": True}}


@dataclass
class Streamed:
    """One stream's text (choice 0), finish reason and usage, read off its events."""

    text: str
    finish: str | None
    completion_tokens: int | None
    events: int


def read_stream(answer: Answer, *, chat: bool) -> Streamed:
    text, finish, tokens, count = [], None, None, 0
    for payload in parse_events(answer.body):
        if payload == "[DONE]":
            continue
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        count += 1
        usage = event.get("usage") if isinstance(event, dict) else None
        if isinstance(usage, dict):
            tokens = usage.get("completion_tokens")
        for choice in event.get("choices") or () if isinstance(event, dict) else ():
            if choice.get("index") != 0:
                continue
            piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            text.append(piece or "")
            finish = choice.get("finish_reason") or finish
    return Streamed("".join(text), finish, tokens, count)


def read_body(answer: Answer, *, chat: bool) -> Streamed:
    body = answer.json()
    choice = body["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    return Streamed(text or "", choice.get("finish_reason"),
                    body.get("usage", {}).get("completion_tokens"), 1)  # fmt: skip


def _request(model: str, *, chat: bool, stream: bool, tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": tokens, **GREEDY}
    body.update({"messages": MESSAGES} if chat else {"prompt": PROMPT})
    if stream:
        body.update(stream=True, **USAGE_OPTION)
    return body


class Probes:
    """The probes that compare sluice's answers with the backend's."""

    def __init__(self, client: ProbeClient, backend: str, model: str) -> None:
        self.client = client
        self.backend = backend
        self.model = model
        self.sluice = ""  # set once the in-process sluice listens
        self.direct_streams: dict[bool, Answer] = {}  # chat? -> direct stream answer

    def _call(self, base: str, body: dict[str, Any], *, chat: bool) -> Answer:
        url = base + (CHAT if chat else COMPLETIONS)
        return self.client.stream(url, body) if body.get("stream") else self.client.post(url, body)

    def direct_greedy_text(self) -> str:
        """The backend's greedy chat stream (kept for the shape and stop probes)."""
        body = _request(self.model, chat=True, stream=True, tokens=STREAM_TOKENS)
        answer = self.direct_streams[True] = self._call(self.backend, body, chat=True)
        if answer.status != 200:
            return ""
        return read_stream(answer, chat=True).text

    def equal(self, *, chat: bool, stream: bool) -> Check:
        kind = ("chat" if chat else "completions") + ("_stream" if stream else "_nonstream")
        check = Check(f"{kind}_equal")
        body = _request(self.model, chat=chat, stream=stream, tokens=STREAM_TOKENS)
        if stream and chat in self.direct_streams:
            direct = self.direct_streams[chat]
        else:
            direct = self._call(self.backend, body, chat=chat)
            if stream:
                self.direct_streams[chat] = direct
        relayed = self._call(self.sluice, body, chat=chat)
        if direct.status != 200 or relayed.status != 200:
            check.problems.append(
                f"HTTP {direct.status} direct, {relayed.status} through sluice: "
                f"{(relayed.body if relayed.status != 200 else direct.body)[:200]!r}"
            )
            return check
        read = read_stream if stream else read_body
        a, b = read(direct, chat=chat), read(relayed, chat=chat)
        check.data = {"chars": len(a.text), "completion_tokens": a.completion_tokens,
                      "direct_events": a.events, "sluice_events": b.events}  # fmt: skip
        check.detail = f"{a.completion_tokens} tokens, {len(a.text)} chars"
        if a.text != b.text:
            at = _first_difference(a.text, b.text)
            check.problems.append(f"text differs at char {at}: direct "
                                  f"{a.text[:60]!r}..., sluice {b.text[:60]!r}...")  # fmt: skip
        if (a.finish, a.completion_tokens) != (b.finish, b.completion_tokens):
            check.problems.append(
                f"finish/usage differ: direct {a.finish}/{a.completion_tokens}, "
                f"sluice {b.finish}/{b.completion_tokens}"
            )
        if not a.text:
            check.problems.append("the backend generated no text (ignore_eos was sent)")
        return check

    def wire_shapes(self) -> Check:
        """The backend's stream shapes (direct), then sluice's (relayed) of the same kind."""
        check = Check("wire_shapes")
        for chat in (True, False):
            label = "chat" if chat else "completions"
            direct = self.direct_streams.get(chat)
            if direct is None or direct.status != 200:
                check.problems.append(f"no direct {label} stream to inspect")
                continue
            found = check_stream(direct.body, chat=chat, usage=True)
            check.problems += [f"{label} (backend): {p}" for p in found.problems]
            check.warnings += [f"{label} drift from vLLM 0.26: {d}" for d in found.drift]
            if found.fast_path_misses:
                check.warnings.append(
                    f"{label}: {found.fast_path_misses} of {found.content_chunks} token chunks "
                    "miss the filter's fast path (parsed instead: correct, more CPU with a Policy)"
                )
            relayed = self._call(
                self.sluice, _request(self.model, chat=chat, stream=True, tokens=8), chat=chat
            )
            mine = check_stream(relayed.body, chat=chat, usage=True)
            check.problems += [f"{label} (through sluice): {p}" for p in mine.problems]
        check.detail = "role/content/finish/usage chunks and [DONE] as sluice's filter reads them"
        if check.warnings:
            check.detail += f"; {len(check.warnings)} field differences from vLLM 0.26"
        return check

    def errors(self) -> Check:
        """vLLM's 400 and 404 bodies, direct and relayed: same status, OpenAI error shape."""
        check = Check("error_bodies")
        cases = [
            ("temperature -1", {**_request(self.model, chat=True, stream=False, tokens=4),
                                "temperature": -1}),
            ("temperature -1, stream", {**_request(self.model, chat=True, stream=True, tokens=4),
                                        "temperature": -1}),
            ("unknown model", {**_request("no-such-model-verify", chat=True, stream=False,
                                          tokens=4)}),
        ]  # fmt: skip
        statuses = []
        for label, body in cases:
            direct = self.client.post(self.backend + CHAT, body)
            relayed = self.client.post(self.sluice + CHAT, body)
            statuses.append(f"{label}: {direct.status}/{relayed.status}")
            if direct.status < 400:
                check.problems.append(
                    f"{label}: the backend answered {direct.status}, not an error"
                )
                continue
            problems, drift = check_error_body(direct.status, direct.body)
            check.problems += [f"{label} (backend): {p}" for p in problems]
            check.warnings += [f"{label}: {d}" for d in drift]
            own = label == "unknown model"  # sluice answers it: no route
            mine, _ = check_error_body(relayed.status, relayed.body, code_is_status=not own)
            check.problems += [f"{label} (through sluice): {p}" for p in mine]
            if not own and relayed.status != direct.status:
                check.problems.append(f"{label}: sluice answered {relayed.status}, "
                                      f"the backend {direct.status}")  # fmt: skip
        check.detail = "direct/sluice status: " + "; ".join(statuses)
        return check

    def generation_fields(self) -> Check:
        """Each GenerationConfig field of the mapping table alone, then all together, sent
        by a preset through sluice: the backend accepts each and honours the countable ones."""
        check = Check("generation_config_fields")
        accepted = []
        for name in [m.name for m in MAPPING] + ["all"]:
            route = ALL_FIELDS_ROUTE if name == "all" else field_route(name)
            body: dict[str, Any] = {"model": route, "messages": MESSAGES}
            if name not in ("max_new_tokens", "all"):
                body["max_tokens"] = 8
            answer = self.client.post(self.sluice + CHAT, body)
            if answer.status != 200:
                check.problems.append(f"{name}={FIELD_VALUES.get(name, '...')!r}: HTTP "
                                      f"{answer.status} {answer.body[:200]!r}")  # fmt: skip
                continue
            value = answer.json()
            tokens = value.get("usage", {}).get("completion_tokens", 0)
            choices = len(value.get("choices", []))
            limit = FIELD_VALUES["max_new_tokens"]
            if name in ("max_new_tokens", "all") and tokens > limit * (2 if name == "all" else 1):
                check.problems.append(f"{name}: {tokens} tokens generated, limit {limit}")
            if name == "min_new_tokens" and tokens < FIELD_VALUES["min_new_tokens"]:
                check.problems.append(f"min_new_tokens: only {tokens} tokens generated")
            if name in ("num_return_sequences", "all") and choices != 2:
                check.problems.append(f"{name}: {choices} choices, expected 2")
            accepted.append(name)
        check.detail = f"{len(accepted)} of {len(MAPPING) + 1} presets accepted"
        check.data = {"accepted": accepted, "values": FIELD_VALUES}
        return check

    def stop_strings(self, text: str, stop: str) -> Check:
        """A stop string taken from the greedy text: the Policy (sluice's hold-back) alone,
        with the same `stop` in the request (vLLM's hold-back too), and non-stream; each must
        end exactly before the string, with finish_reason stop."""
        check = Check("stop_string_holdback")
        if not stop:
            check.problems.append("the greedy text is too short to pick a stop string from")
            return check
        expected = text[: text.find(stop)]
        check.data = {"stop": stop, "cut_at": len(expected)}
        check.detail = f"stop {stop!r} cut at char {len(expected)}"
        base = _request(STOP_ROUTE, chat=True, stream=True, tokens=STREAM_TOKENS)
        cases = [
            ("policy, stream", self.sluice, base, True),
            ("policy + request stop, stream", self.sluice, {**base, "stop": [stop]}, True),
            ("policy, non-stream",
             self.sluice, {**base, "stream": False, "stream_options": None}, False),
            ("backend's own stop, stream",
             self.backend, {**base, "model": self.model, "stop": [stop]}, True),
        ]  # fmt: skip
        for label, url, raw_body, stream in cases:
            body = {k: v for k, v in raw_body.items() if v is not None}
            answer = self._call(url, body, chat=True)
            if answer.status != 200:
                check.problems.append(f"{label}: HTTP {answer.status} {answer.body[:160]!r}")
                continue
            got = read_stream(answer, chat=True) if stream else read_body(answer, chat=True)
            wrong = got.text != expected or got.finish != "stop"
            if wrong and url == self.backend:  # vLLM's own matching: reported, not sluice's
                check.warnings.append(f"{label}: {len(got.text)} chars, finish {got.finish}")
            elif wrong:
                check.problems.append(
                    f"{label}: got {len(got.text)} chars ending {got.text[-20:]!r}, finish "
                    f"{got.finish}; expected {len(expected)} chars ending {expected[-20:]!r}"
                )
            if stream and stop in got.text:
                check.problems.append(f"{label}: the stop string reached the client")
        return check


def pick_stop(text: str, length: int = 5) -> str:
    """A stop string from the middle of `text` with a visible character in it."""
    for start in range(len(text) // 2, len(text) - length):
        candidate = text[start : start + length]
        if candidate.strip() and text.find(candidate) >= 8:
            return candidate
    return ""


def _first_difference(a: str, b: str) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))
