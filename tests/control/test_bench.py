"""`sluice bench`: the load generator against real servers, and `--compare` end to end."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, cast

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st
from sluice.control.bench import bench
from sluice.control.bench import processes as benchprocs
from sluice.control.bench.loadgen import LoadSpec, Samples, StreamConnection, percentile, run_load
from sluice.control.cli import main
from sluice.control.errors import CliError

# -- a tiny SSE server that breaks streams on purpose ----------------------------------------

Handler = Callable[[int, asyncio.StreamWriter], Awaitable[None]]
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def token_event(text: str) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"%s"}}]}\n\n' % text.encode()


USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":%d}}\n\n'
DONE = b"data: [DONE]\n\n"


async def stream_ok(writer: asyncio.StreamWriter, tokens: int, *, usage: bool = True) -> None:
    writer.write(
        HEAD + chunk(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n')
    )
    for i in range(tokens):
        await asyncio.sleep(0.002)
        writer.write(chunk(token_event(f"t{i}")))
    tail = (USAGE % tokens if usage else b"") + DONE
    writer.write(chunk(tail) + b"0\r\n\r\n")
    await writer.drain()


async def serve(handler: Handler) -> tuple[asyncio.Server, str]:
    count = 0

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                count += 1
                await handler(count, writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


def load_against(handler: Handler, **spec: Any) -> Any:
    async def go() -> Any:
        server, url = await serve(handler)
        try:
            return await run_load(LoadSpec(url=url, **spec))
        finally:
            server.close()

    return uvloop.run(go())


# -- the load generator ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The simulator (TTFT 20 ms, ITL 10 ms), started the way `--compare` starts it."""
    argv = benchprocs.sluice_argv("sim", "--port", "0", "--ttft-ms", "20", "--itl-ms", "10")
    child = benchprocs.Child("sim", argv, tmp_path_factory.mktemp("sim"))
    try:
        yield child.wait_line(benchprocs.SIM_READY)
    finally:
        child.stop()


def test_counts_tokens_and_timing_against_the_simulator(sim_url):
    result = uvloop.run(
        run_load(LoadSpec(url=sim_url, concurrency=8, requests=16, max_tokens=8, timeout=30))
    )
    assert (result.ok, result.errors, result.tokens) == (16, 0, 16 * 8)
    # The simulator waits 20 ms before the first token and 10 ms between tokens.
    assert 18.0 <= result.ttft_p50_ms <= 200.0
    assert 8.0 <= result.itl_p50_ms <= 60.0
    assert result.itl_p99_ms >= result.itl_p50_ms
    assert result.tok_per_s > 0


def test_the_floor_proxy_relays_streams_whole_over_reused_connections(sim_url, tmp_path):
    # bench/floor.py measures sluice against it: it must relay every token and end every
    # stream, or its CPU per token would be a floor of nothing.
    from bench.floor_proxy import READY

    argv = [sys.executable, "-m", "bench.floor_proxy", "--backend", sim_url]
    child = benchprocs.Child("floor", argv, tmp_path)
    try:
        url = child.wait_line(re.compile(re.escape(READY) + r" (http://\S+)"))
        spec = LoadSpec(url=url, concurrency=4, requests=24, max_tokens=6, timeout=30)
        result = uvloop.run(run_load(spec))
        assert (result.ok, result.errors, result.tokens) == (24, 0, 24 * 6)
        assert 18.0 <= result.ttft_p50_ms <= 200.0  # relayed as it came, not buffered
    finally:
        child.stop()


def test_counts_content_chunks_when_the_stream_has_no_usage():
    async def handler(n: int, writer: asyncio.StreamWriter) -> None:
        await stream_ok(writer, 5, usage=False)

    result = load_against(handler, concurrency=3, requests=7, max_tokens=5)
    assert (result.ok, result.errors, result.tokens) == (7, 0, 35)


def test_broken_streams_are_errors_and_the_run_goes_on():
    async def handler(n: int, writer: asyncio.StreamWriter) -> None:
        mode = n % 5
        if mode == 0:
            await stream_ok(writer, 4)
        elif mode == 1:  # cut mid-stream
            writer.write(HEAD + chunk(token_event("a")))
            await writer.drain()
            writer.close()
        elif mode == 2:
            body = b'{"error":{"message":"boom"}}'
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(body), body))  # fmt: skip
        elif mode == 3:  # an error event inside a 200 stream
            writer.write(HEAD + chunk(b'data: {"error":{"message":"overloaded"}}\n\n')
                         + chunk(DONE) + b"0\r\n\r\n")  # fmt: skip
        else:  # the body ends cleanly but without [DONE]
            writer.write(HEAD + chunk(token_event("a")) + b"0\r\n\r\n")

    result = load_against(handler, concurrency=4, requests=20, max_tokens=4)
    assert result.ok == 4
    assert result.tokens == 16
    assert result.error_kinds == {"error_event": 4, "http_500": 4, "truncated": 8}
    assert result.ok + result.errors == 20
    assert result.first_error


def test_connection_refused_is_counted_not_raised():
    port = benchprocs.free_port()  # nothing listens there any more
    result = uvloop.run(run_load(LoadSpec(url=f"http://127.0.0.1:{port}", requests=5)))
    assert (result.ok, result.errors, result.error_kinds) == (0, 5, {"connect": 5})


def test_the_wall_clock_bound_ends_a_stalled_run():
    async def handler(n: int, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + chunk(token_event("a")))
        await asyncio.sleep(30)

    started = time.monotonic()
    result = load_against(handler, concurrency=2, requests=6, max_tokens=4, timeout=0.5)
    assert time.monotonic() - started < 5
    assert result.error_kinds == {"timeout": 6}
    assert result.ok == 0


class FakeTransport:
    def __init__(self) -> None:
        self.closing = False

    def write(self, data: bytes) -> None:
        pass

    def get_extra_info(self, name: str) -> None:
        return None

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True


RESPONSE = (
    HEAD
    + chunk(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\r\n\r\n')
    + chunk(b": keep-alive\n\n" + token_event("a") + token_event('\\"quoted\\"'))
    + chunk(b'data: {"choices":[{"text":"legacy"}]}\n\ndata: {"choices":[{"text":""}]}\n\n')
    + chunk(USAGE % 42 + DONE)
    + b"0\r\n\r\n"
)


def feed(pieces: list[bytes]) -> Samples:
    async def go() -> Samples:
        samples = Samples()
        conn = StreamConnection(samples)
        conn.connection_made(cast(asyncio.Transport, FakeTransport()))
        task = asyncio.ensure_future(conn.exchange(b"request"))
        await asyncio.sleep(0)
        for piece in pieces:
            conn.data_received(piece)
        await asyncio.wait_for(task, 5)
        return samples

    return asyncio.run(go())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(RESPONSE) - 1), max_size=12))
def test_token_detection_does_not_depend_on_chunking(cuts: list[int]):
    bounds = [0, *sorted(set(cuts)), len(RESPONSE)]
    samples = feed([RESPONSE[a:b] for a, b in zip(bounds, bounds[1:], strict=False)])
    assert samples.ok == 1 and not samples.errors
    assert samples.tokens == 42  # usage wins over the 3 content chunks
    assert len(samples.ttfts) == 1
    assert len(samples.gaps) == 2  # 3 non-empty tokens; "" and keep-alives are not tokens


def test_a_process_cpu_time_is_read_finer_than_clock_ticks():
    burn = "import time\nend = time.process_time() + 0.25\nwhile time.process_time() < end: pass\n"
    child = subprocess.Popen([sys.executable, "-c", burn + "time.sleep(5)"])
    try:
        readings = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            cpu = benchprocs.process_cpu_seconds(child.pid)
            assert cpu is not None
            readings.append(cpu)
            if cpu >= 0.25 and len(readings) > 1 and readings[-1] == readings[-2]:
                break  # burnt and asleep: the clock stands still
            time.sleep(0.1)
        cpu = readings[-1]
        with open(f"/proc/{child.pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        ticks = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        assert 0.25 <= cpu < 1.0
        assert abs(cpu - ticks) <= 0.03  # the same time /proc counts in ticks
        assert round(cpu * 100) != cpu * 100  # finer than a 10 ms tick
        assert benchprocs.tree_cpu_seconds(child.pid) == pytest.approx(cpu, abs=0.001)
    finally:
        child.kill()
        child.wait()
    assert benchprocs.process_cpu_seconds(child.pid) is None  # reaped: gone


def test_percentile_interpolates_like_numpy():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile(list(map(float, range(101))), 99) == 99.0


def test_tree_cpu_counts_descendants():
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
    code = f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {burn!r}])\ntime.sleep(5)"
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 10
        while benchprocs.tree_cpu_seconds(parent.pid) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert benchprocs.tree_cpu_seconds(parent.pid) >= 0.3
    finally:
        parent.kill()
        parent.wait()


# -- the command ---------------------------------------------------------------------------------


def test_cli_prints_one_json_object(sim_url, capsys):
    argv = ["bench", "--url", sim_url, "--concurrency", "4", "--requests", "8",
            "--max-tokens", "4", "--json"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["ok"], report["tokens"], report["errors"]) == (8, 32, 0)
    assert report["settings"]["concurrency"] == 4


def test_cli_table_names_the_errors(capsys):
    port = benchprocs.free_port()
    assert main(["bench", "--url", f"http://127.0.0.1:{port}", "--requests", "3"]) == 0
    out = capsys.readouterr().out
    assert "TTFT p50" in out
    assert "errors: connect 3" in out


def test_cli_rejects_bad_arguments(capsys):
    assert main(["bench"]) == 1
    assert "--url is required" in capsys.readouterr().err
    assert main(["bench", "--url", "http://127.0.0.1:1", "--concurrency", "0"]) == 1


def test_missing_nginx_is_one_line_with_the_fix(monkeypatch, capsys):
    monkeypatch.setattr(benchprocs, "NGINX_PATHS", ())
    monkeypatch.setenv("PATH", "/nonexistent")
    assert main(["bench", "--compare"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "apt-get install nginx" in err
    with pytest.raises(CliError):
        benchprocs.find_nginx()


def descendants(root: int) -> set[int]:
    """Live (non-zombie) processes under `root`, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()
            if fields[0] != b"Z":
                parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        children = {c for c, p in parents.items() if p == pid} - found
        found |= children
        frontier.extend(children)
    return found


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if stat[stat.rfind(b")") + 2 :].split()[0] != b"Z":
            out.add(pid)
    return out


@pytest.mark.slow
@pytest.mark.edge
def test_compare_reports_three_relays_and_ratios_to_nginx(capsys):
    before = descendants(os.getpid())
    argv = ["bench", "--compare", "--concurrency", "8", "--requests", "16", "--max-tokens", "8",
            "--rounds", "2", "--timeout", "30", "--json"]  # fmt: skip
    assert main(argv) == 0
    assert descendants(os.getpid()) <= before  # sim, nginx (master and worker), sluice: gone
    report = json.loads(capsys.readouterr().out)
    targets = report["targets"]
    assert list(targets) == ["direct", "nginx", "sluice"]
    for name, t in targets.items():
        assert (t["tokens"], t["errors"]) == (2 * 16 * 8, 0), name
        assert len(t["rounds"]) == 2
        assert t["ttft_p50_ms"] >= 18.0
        assert t["sim_cpu_s_per_1k_tokens"] is not None
    assert targets["direct"]["relay_cpu_s_per_1k_tokens"] is None
    assert targets["nginx"]["rounds"][0]["relay_cpu_s"] is not None
    assert set(report["vs_nginx"]) == {"direct", "sluice"}
    assert report["vs_nginx"]["sluice"]["tok_per_s_ratio"] > 0.5
    assert "1 worker process" in report["settings"]["nginx"]

    table = bench.format_compare(report)
    for row in ("direct", "nginx", "sluice", "ratio to nginx", "goal"):
        assert row in table


@pytest.mark.slow
@pytest.mark.edge
def test_sigterm_mid_run_stops_every_child():
    argv = [sys.executable, "-m", "sluice.control.cli", "bench", "--compare", "--concurrency",
            "16", "--requests", "100000", "--max-tokens", "64", "--rounds", "1", "--timeout", "60"]  # fmt: skip
    bench_proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        children: set[int] = set()
        while len(children) < 4 and time.monotonic() < deadline:  # sim, nginx x2, sluice
            time.sleep(0.1)
            children = descendants(bench_proc.pid)
        assert len(children) >= 4, children
        time.sleep(1.0)  # into the measured load
        bench_proc.terminate()
        assert bench_proc.wait(timeout=30) == 130
        deadline = time.monotonic() + 5
        while alive(children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(children)
    finally:
        if bench_proc.poll() is None:
            bench_proc.kill()
            bench_proc.wait()


def test_the_relay_events_bench_relays_every_event_and_reports_both_paths():
    # bench/relay_events.py checks that each stream's client got every event before it
    # reports a figure (exit 1 otherwise): run it small on this build.
    argv = [sys.executable, "-m", "bench.relay_events", "--streams", "8", "--events", "16"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("relay: ")
    assert re.fullmatch(r"pass-through: \d+ ns per event \(rounds( \d+){3}\)", lines[1])
    assert re.fullmatch(
        r"policy \(4 stop strings, 2 cut patterns\): \d+ ns per event \(rounds( \d+){3}\)", lines[2]
    )
