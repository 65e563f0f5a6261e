"""Fuzz of raw requests and request bodies: zero 500s, zero hangs, every answer a defined
status. Quick mode (in `make test`): a few thousand cases; `make soak` sets
SLUICE_SOAK=1 for 10,000+ of each kind (figures in docs/RELIABILITY.md)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sluice.proxy.snapshot import SamplingPlan

from tests.fixtures import ProcessServer, SimClient, routed_snapshot
from tests.reliability.fixtures import (
    DEFINED,
    RecordingServer,
    TunedHarness,
    assert_no_leaks,
    census,
)
from tests.reliability.fuzz_engine import mutation_cases, play

SOAK = os.environ.get("SLUICE_SOAK") == "1"
RAW_CASES = 12_000 if SOAK else 3_000
BODY_CASES = 10_000 if SOAK else 1_000
HYPOTHESIS_CASES = 2_000 if SOAK else 200
# 100 Continue is an interim answer; everything else must be a final, defined status.
RAW_DEFINED = DEFINED | {100}
LONG = pytest.mark.timeout(1200 if SOAK else 120)


@pytest.fixture(scope="module")
def server() -> Iterator[RecordingServer]:
    srv = RecordingServer(max_body=4096)
    yield srv
    srv.close()


def _report(kind: str, outcomes: object) -> None:
    print(f"\nfuzz {kind}: {outcomes.table()}")  # type: ignore[attr-defined]


@LONG
def test_raw_request_mutations(server: RecordingServer) -> None:
    outcomes = play(server.port, mutation_cases(RAW_CASES), RAW_DEFINED)
    _report("raw-mutations", outcomes)
    assert outcomes.cases == RAW_CASES
    assert outcomes.hangs == []
    assert outcomes.undefined == []
    assert "500" not in outcomes.by_status
    assert server.loop_errors == []  # no exception escaped a protocol callback
    # The server is back to nothing open once the clients are gone.
    assert server.open_connections() == 0 or _settles(server)


def _settles(server: RecordingServer) -> bool:
    import time

    deadline = time.monotonic() + 5
    while server.open_connections() and time.monotonic() < deadline:
        time.sleep(0.05)
    return server.open_connections() == 0


_header_name = st.binary(min_size=1, max_size=12)
_header_value = st.binary(max_size=24)


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"X"]))
    target = draw(st.one_of(st.just(b"/a"), st.binary(max_size=16)))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"", b"HTTP/1.x"]))
    headers = draw(st.lists(st.tuples(_header_name, _header_value), max_size=6))
    framing = draw(st.sampled_from(["none", "cl", "chunked", "both", "wrong-cl"]))
    body = draw(st.binary(max_size=64))
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
    lines = [method + b" " + target + (b" " + version if version else b"")]
    if draw(st.booleans()):
        lines.append(b"Host: t")
    lines += [n + b": " + v for n, v in headers]
    if framing in ("cl", "both"):
        lines.append(b"Content-Length: %d" % len(body))
    if framing == "wrong-cl":
        lines.append(b"Content-Length: %d" % max(0, len(body) - 1))
    if framing in ("chunked", "both"):
        lines.append(b"Transfer-Encoding: chunked")
        body = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    return eol.join(lines) + eol + eol + body


@LONG
def test_raw_requests_from_hypothesis(server: RecordingServer) -> None:
    cases: list[bytes] = []

    @settings(
        max_examples=HYPOTHESIS_CASES,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        deadline=None,
    )
    @given(raw_requests())
    def collect(raw: bytes) -> None:
        cases.append(raw)

    collect()
    outcomes = play(server.port, cases, RAW_DEFINED)
    _report("raw-hypothesis", outcomes)
    assert outcomes.hangs == [] and outcomes.undefined == []
    assert "500" not in outcomes.by_status


# -- request bodies through the whole pipeline (preset, re-encoding, the simulator) ------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
FIELDS = [
    "model", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "stream",
    "stop", "seed", "logprobs", "stream_options", "sim", "max_completion_tokens", "tools",
]  # fmt: skip
VALID = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def body_cases(n: int, seed: int = 7) -> list[bytes]:
    """Valid bodies with one field replaced by random JSON, byte-mutated bodies, and
    pathological ones (deep, wide, huge numbers, invalid UTF-8)."""
    rng = random.Random(seed)
    values = [
        None, True, -1, 0, 2**64, -(2**63), 1e308, -0.0, "", "x" * 300, [], {}, [[[]]],
        {"role": "user"}, [{"role": "user", "content": None}], "\ud7ff", 3.5, [1] * 50,
    ]  # fmt: skip
    out: list[bytes] = []
    for i in range(n):
        kind = i % 4
        body = dict(VALID)
        if kind == 0:
            _set_field(body, rng.choice(FIELDS), rng.choice(values))
            raw = _dumps(body)
        elif kind == 1:
            body["stream"] = rng.random() < 0.5
            _set_field(body, rng.choice(FIELDS), rng.choice(values))
            raw = bytearray(_dumps(body))
            for _ in range(rng.randint(1, 3)):
                pos = rng.randrange(len(raw))
                raw[pos] = rng.randrange(256)
            raw = bytes(raw)
        elif kind == 2:
            depth = rng.choice([1, 50, 127, 128, 129, 255, 256, 1023, 1024, 2000])
            body["x"] = "@"
            raw = _dumps(body).replace(b'"@"', b"[" * depth + b"]" * depth)
        else:
            raw = rng.choice(
                [
                    b"", b"null", b"[]", b"{", b"\xff\xfe{}", b'{"model": "chat"}', b"1e999999",
                    b'{"model":"chat","messages":"' + b"\\ud800" * 10 + b'"}',
                    b'{"a":' * 200 + b"1" + b"}" * 200,
                ]
            )  # fmt: skip
        out.append(raw)
    return out


def _set_field(body: dict[str, object], name: str, value: object) -> None:
    # A huge `n` makes the simulator (like vLLM) generate that many choices: the backend
    # hangs, which is defect 6's subject (default deadlines), not this fuzz's.
    if name == "n" and isinstance(value, (int, float)) and value > 4:
        value = 3
    body[name] = value


def _dumps(body: object) -> bytes:
    # The standard library's encoder: it writes what orjson refuses (integers beyond 64
    # bits), which a client may send.
    return json.dumps(body, separators=(",", ":")).encode()


def _post(raw: bytes) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(raw), raw)
    )


@pytest.fixture(scope="module")
def proxy(sim: ProcessServer) -> Iterator[TunedHarness]:
    plan = SamplingPlan(name="p", defaults={"temperature": 0.5}, clamps={"top_p": (0.1, 0.9)})
    h = TunedHarness(routed_snapshot(sim.url, {"chat": {"preset": plan}}))
    yield h
    h.close()


@LONG
def test_request_bodies_through_the_pipeline(proxy: TunedHarness, sim: ProcessServer) -> None:
    SimClient(sim.url).reset()
    before = census(proxy)
    outcomes = play(
        proxy.port,
        [_post(b) for b in body_cases(BODY_CASES)],
        DEFINED,
        concurrency=32,
        deadline=12.0,
    )
    _report("bodies", outcomes)
    assert outcomes.hangs == [] and outcomes.undefined == [], outcomes.table()
    assert "500" not in outcomes.by_status
    # Every answer recorded with its real status: nothing recorded as 0 or 500.
    recorded = proxy.requests_by_status()
    assert "0" not in recorded and "500" not in recorded
    assert_no_leaks(proxy, before)


# -- every generating endpoint: each field of a valid body replaced or removed ------------

# A valid body of each endpoint whose adapter translates it (tools, content parts, TGI's
# parameters): what a field of the wrong type may break is the translation.
ENDPOINT_BODIES: dict[str, dict[str, object]] = {
    "/v1/chat/completions": {
        "model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
        "stop": ["x"], "response_format": {"type": "json_object"},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    },
    "/v1/completions": {"model": "chat", "prompt": "hi", "max_tokens": 3, "stop": "x"},
    "/v1/responses": {
        "model": "chat", "instructions": "be", "max_output_tokens": 3,
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
        "text": {"format": {"type": "text"}}, "reasoning": {"effort": "low"},
    },
    "/v1/messages": {
        "model": "chat", "max_tokens": 3, "system": [{"type": "text", "text": "s"}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "stop_sequences": ["x"], "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "auto"}, "metadata": {"user_id": "u"},
    },
    "/generate": {"inputs": "hi", "parameters": {"max_new_tokens": 3, "details": True}},
    "/generate_stream": {"inputs": "hi", "parameters": {"max_new_tokens": 3, "top_n_tokens": 2}},
}  # fmt: skip
CONFUSED = [None, -1, 1.5, "x", [], {}, [None], {"type": None}, True, 10**30, [{}]]


def _field_paths(value: object, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    paths = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            paths += _field_paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            paths += _field_paths(item, (*path, index))
    return paths


def _replaced(body: object, path: tuple[str | int, ...], value: object, *, remove: bool) -> object:
    if not path:
        return value
    copy = json.loads(json.dumps(body))
    parent = copy
    for step in path[:-1]:
        parent = parent[step]
    if remove:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return copy


def endpoint_cases() -> list[bytes]:
    """Every field (and the body itself) of each endpoint's body set to each value of
    CONFUSED, and every field removed; streamed and not."""
    cases = []
    for path, body in ENDPOINT_BODIES.items():
        bodies = []
        for field in _field_paths(body):
            bodies += [_replaced(body, field, value, remove=False) for value in CONFUSED]
            if field:
                bodies.append(_replaced(body, field, None, remove=True))
        for variant in bodies:
            for stream in (False, True):
                sent = variant
                if isinstance(variant, dict) and not path.startswith("/generate"):
                    sent = {**variant, "stream": stream}
                raw = _dumps(sent)
                cases.append(
                    b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%b" % (path.encode(), len(raw), raw)
                )
    return cases


@LONG
def test_every_generating_endpoint_takes_confused_bodies(
    proxy: TunedHarness, sim: ProcessServer
) -> None:
    """Each adapter translates its body for vLLM: a field of another type than it expects
    is a 4xx from sluice or the backend, never a 500 or a hang (the simulator hung on
    TGI's top_n_tokens = 10**30 until it checked max_logprobs)."""
    SimClient(sim.url).reset()
    before = census(proxy)
    cases = endpoint_cases()
    outcomes = play(proxy.port, cases, DEFINED, concurrency=32, deadline=12.0)
    _report("endpoint-bodies", outcomes)
    assert outcomes.cases == len(cases) > 1500
    assert outcomes.hangs == [] and outcomes.undefined == [], outcomes.table()
    assert "500" not in outcomes.by_status
    assert outcomes.by_status["200"] > 500  # most replacements are still valid requests
    assert_no_leaks(proxy, before)
