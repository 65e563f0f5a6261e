"""Every request the real vLLM 0.26 transcripts hold, replayed against the simulator: the
same status, and each JSON body and each SSE event the same field by field, in key order,
with the same value types (`shape`); streams with the same sequence of event kinds. A new
transcript section fails `test_every_section_is_replayed` until it is compared or exempted
here with its reason, so the simulator cannot drift from what was recorded unnoticed."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from tests.sim.fixtures import CurlRequest, Transcripts, parse_curl, shape

# Sections with no request the simulator can answer like vLLM, and why.
EXEMPT = {
    "07b": "a non-stream request the client closed before any byte came back: nothing on the "
    "wire to compare (test_sim_faults covers the abort)",
}
# Where the answer depends on the model's text (stop strings), the simulator is given the
# tokens tiny-llama generated (read off 02b's logprobs) as its script.
TINY_LLAMA_TOKENS = [" u", "lo", " ru", "ious", "s,", "fuse", "#", " ambiguity,", " re", ".\n0"]
SCRIPTED = {"02a", "02b", "02c", "02d", "02e"}
# The client closed these streams early: vLLM's events are a prefix of the simulator's.
TRUNCATED = {"07"}
_PLAIN = re.compile(r"^(?:\(raw socket\) )?(GET|POST|HEAD) (\S+)(?: (?:body=)?(.*))?$")
_STATUS = re.compile(r"^(?:HTTP/1\.1 |-> HTTP )(\d{3})", re.M)
_RAW_EVENT = re.compile(rb"data: (.*?)\n\n", re.S)


@dataclass
class Exchange:
    """One recorded request and what vLLM answered."""

    request: CurlRequest
    status: int | None
    bodies: list[Any] = field(default_factory=list)  # JSON bodies
    events: list[Any] = field(default_factory=list)  # SSE payloads ("[DONE]" or JSON)


def exchanges(transcripts: Transcripts, ident: str) -> list[Exchange]:
    text = transcripts.sections[ident]
    out = []
    for segment in text.split("\n$ ")[1:]:
        first, _, rest = segment.partition("\n")
        request = parse_curl(first) if first.startswith("curl ") else _plain_request(first)
        status = _STATUS.search(rest)
        ex = Exchange(request, int(status.group(1)) if status else None)
        raw = [ast.literal_eval(m) for m in re.findall(r"^\[t=[\d.]+\] (b'.*')$", rest, re.M)]
        if raw:
            joined = b"".join(raw)
            ex.status = int(joined[9:12]) if joined.startswith(b"HTTP/1.1 ") else ex.status
            ex.events = [_payload(m) for m in _RAW_EVENT.findall(joined.split(b"\r\n\r\n", 1)[1])]
        for line in rest.splitlines():
            if line.startswith("data: "):
                ex.events.append(_payload(line[6:].encode()))
            elif line.startswith("{"):
                ex.bodies.append(orjson.loads(line))
        out.append(ex)
    return out


def _plain_request(line: str) -> CurlRequest:
    match = _PLAIN.match(line)
    assert match, f"unparsed request line: {line[:120]}"
    method, path, body = match.groups()
    headers = {"content-type": "application/json"} if body else {}
    return CurlRequest(method, path, headers, body.encode() if body else None)


def _payload(data: bytes) -> Any:
    data = data.strip()
    return "[DONE]" if data == b"[DONE]" else orjson.loads(data)


def kind(event: Any) -> str:
    if event == "[DONE]":
        return "done"
    if "error" in event:
        return "error"
    choices = event["choices"]
    if not choices:
        return "usage"
    choice = choices[0]
    if "role" in choice.get("delta", {}):
        return "role"
    return "final" if choice.get("finish_reason") is not None else "content"


def collapsed(events: list[Any]) -> list[str]:
    """The kinds in order, runs of one kind as one (vLLM merges tokens into fewer chunks)."""
    out: list[str] = []
    for event in events:
        if not out or out[-1] != kind(event):
            out.append(kind(event))
    return out


def replayed_sections(transcripts: Transcripts) -> list[str]:
    return [ident for ident in transcripts.sections if ident not in EXEMPT]


def test_every_section_is_replayed(transcripts: Transcripts) -> None:
    assert set(EXEMPT) <= set(transcripts.sections)
    for ident in replayed_sections(transcripts):
        assert exchanges(transcripts, ident), f"section {ident} holds no request to replay"


def _sections() -> list[str]:
    from tests.sim.fixtures import TRANSCRIPTS

    if not TRANSCRIPTS.is_dir():
        return []
    return [i for i in Transcripts(TRANSCRIPTS).sections if i not in EXEMPT]


@pytest.mark.parametrize("ident", _sections())
def test_simulator_answers_like_the_transcript(make_sim, transcripts, ident: str) -> None:
    sim = make_sim(max_model_len=512)
    real_metrics = transcripts.files["08_server.txt"] + transcripts.sections.get("06f", "")
    for ex in exchanges(transcripts, ident):
        req = ex.request
        body = req.body
        if ident in SCRIPTED and body is not None:
            body = orjson.dumps({**orjson.loads(body), "sim": {"script": TINY_LLAMA_TOKENS}})
        resp = sim.request(req.method, req.path, body, req.headers)
        where = f"{ident} {req.method} {req.path}"
        if ex.status is not None:
            assert resp.status == ex.status, where
        if ex.events:
            mine = resp.json_events() + (["[DONE]"] if resp.body.endswith(b"[DONE]\n\n") else [])
            kinds = collapsed(mine)
            if ident in TRUNCATED:
                assert kinds[: len(collapsed(ex.events))] == collapsed(ex.events), where
            else:
                assert kinds == collapsed(ex.events), where
            real_shape = {kind(e): shape(e) for e in ex.events if e != "[DONE]"}
            for event in mine:
                if event != "[DONE]" and kind(event) in real_shape:
                    assert shape(event) == real_shape[kind(event)], (where, kind(event))
            for key in ("object", "model"):
                real = {e[key] for e in ex.events if isinstance(e, dict) and key in e}
                assert {e[key] for e in mine if isinstance(e, dict) and key in e} == real, where
        elif ex.bodies:
            mine_body = resp.json()
            assert shape(mine_body) == shape(ex.bodies[0]), where
            for key in ("object", "model"):
                if isinstance(ex.bodies[0], dict) and key in ex.bodies[0]:
                    assert mine_body[key] == ex.bodies[0][key], (where, key)
        elif req.path == "/metrics":
            samples = [ln for ln in resp.body.decode().splitlines() if ln.startswith("vllm:")]
            assert samples, where
            for line in samples:  # every series the simulator serves, vLLM serves alike
                assert line.rsplit(" ", 1)[0] + " " in real_metrics, line
        else:
            assert resp.body == b"", where  # /health, /ping: empty answers
