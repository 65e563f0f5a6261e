"""`sluice verify` end to end: passes against the simulator, fails with the reason against a
backend that drifts, and measures a backend's idle keep-alive close."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sluice.control.verify.backend_probes import KeepAliveProbe
from sluice.control.verify.wire import CHAT_CONTENT, check_stream, diff

from tests.fixtures import ProcessServer, sluice_cmd, start_sim

# Small bounded load so the whole run stays a few seconds on the shared machine.
QUICK = ["--keepalive-window", "1", "--load-concurrency", "4", "--load-requests", "8",
         "--load-tokens", "8"]  # fmt: skip
CHECKS = {
    "chat_stream_equal", "chat_nonstream_equal", "completions_stream_equal",
    "completions_nonstream_equal", "wire_shapes", "error_bodies", "generation_config_fields",
    "stop_string_holdback", "disconnect_aborts_backend", "keepalive_vs_pool_expiry", "overhead",
}  # fmt: skip


def verify(url: str, *extra: str) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        sluice_cmd("verify", "--backend", url, "--json", *QUICK, *extra),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    return proc.returncode, json.loads(proc.stdout) if proc.stdout else {}, proc.stderr


@pytest.fixture
def sim_tiny() -> Iterator[ProcessServer]:
    server = start_sim("--model", "tiny-llama", "--ttft-ms", "5", "--itl-ms", "2")
    yield server
    server.stop()


@pytest.fixture
def drifting_sim() -> Iterator[ProcessServer]:
    server = start_sim("--model", "tiny-llama", "--ttft-ms", "5", "--itl-ms", "2",
                       "--drop-usage-chunk")  # fmt: skip
    yield server
    server.stop()


def test_verify_passes_against_the_simulator(sim_tiny: ProcessServer) -> None:
    rc, report, stderr = verify(sim_tiny.url)
    assert rc == 0, (report.get("failed"), stderr)
    assert report["ok"] is True and report["model"] == "tiny-llama"
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == CHECKS
    assert all(c["ok"] for c in checks.values())
    # The simulator is vLLM 0.26's wire: no drift to report.
    assert checks["wire_shapes"]["warnings"] == []
    assert checks["generation_config_fields"]["data"]["accepted"][-1] == "all"
    assert len(checks["generation_config_fields"]["data"]["accepted"]) == 15
    assert checks["disconnect_aborts_backend"]["data"]["running_after"] == 0
    assert checks["disconnect_aborts_backend"]["data"]["back_to_zero_ms"] < 2000
    overhead = checks["overhead"]["data"]
    assert overhead["sluice_tokens"] == 2 * 8 * 8 and overhead["sluice_cpu_us_per_token"] > 0
    # The probes are bounded: well under the client's cap.
    # 4 warm-up streams to each target, then 2 rounds of 8 to each.
    assert report["requests_sent"] == {"probes": report["requests_sent"]["probes"], "load": 40}
    assert report["requests_sent"]["probes"] <= 80


def test_verify_fails_with_the_reason_on_a_backend_that_drops_usage(
    drifting_sim: ProcessServer,
) -> None:
    rc, report, _ = verify(drifting_sim.url)
    assert rc == 1 and report["ok"] is False
    assert report["failed"] == ["wire_shapes"]
    shapes = next(c for c in report["checks"] if c["name"] == "wire_shapes")
    assert any("(backend): no usage chunk" in p for p in shapes["problems"]), shapes
    text = subprocess.run(
        sluice_cmd("verify", "--backend", drifting_sim.url, *QUICK),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert text.returncode == 1
    assert "FAIL wire_shapes" in text.stdout
    assert "sluice cannot serve this backend correctly: wire_shapes" in text.stdout


def test_unreachable_backend_is_one_line_and_exit_1() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        proc = subprocess.run(
            sluice_cmd("verify", "--backend", f"http://127.0.0.1:{port}", *QUICK),
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.startswith("sluice verify: cannot talk to http://127.0.0.1:")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    bad = subprocess.run(sluice_cmd("verify", "--backend", "localhost:1"), capture_output=True,
                         text=True, timeout=60, check=False)  # fmt: skip
    assert bad.returncode == 1 and "--backend must be http://host:port" in bad.stderr


class ClosingServer:
    """Answers one keep-alive request per connection, then closes it after `idle_s`."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            time.sleep(self.idle_s)

    def close(self) -> None:
        self.sock.close()


def test_keepalive_probe_measures_the_backends_idle_close() -> None:
    server = ClosingServer(0.5)
    try:
        probe = KeepAliveProbe(server.url, window=5.0)
        probe.thread.join(10)
    finally:
        server.close()
    assert probe.closed_after is not None and 0.4 <= probe.closed_after <= 3.0
    too_long = probe.result(expiry=4.0)
    assert not too_long.ok and "longer than the backend's" in too_long.problems[0]
    assert probe.result(expiry=0.2).ok
    none = probe.result(expiry=None)
    assert none.ok and "no pool idle expiry" in none.warnings[0]


def test_field_diff_names_missing_extra_reordered_and_retyped_fields() -> None:
    event = {
        "id": "x", "created": 1, "object": "chat.completion.chunk", "model": "m",
        "choices": [{"index": "0", "delta": {"content": "a"}, "finish_reason": None,
                     "token_ids": None, "new_field": 1}],
    }  # fmt: skip
    lines = diff(CHAT_CONTENT, event)
    assert "(top): key order ['id', 'created', 'object', 'model', 'choices'] " in lines[0]
    assert "choices[0]: missing key 'logprobs'" in lines
    assert "choices[0]: extra key 'new_field'" in lines
    assert "choices[0].index: type str (vLLM 0.26: int)" in lines


def test_stream_without_done_or_role_is_a_problem() -> None:
    raw = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
           b'"choices":[{"index":0,"delta":{"content":"a"},"logprobs":null,'
           b'"finish_reason":"stop","stop_reason":null,"token_ids":null}]}\n\n')  # fmt: skip
    problems = check_stream(raw, chat=True, usage=False).problems
    assert "the stream does not end with `data: [DONE]`" in problems
    assert any("role chunk" in p for p in problems)


class NotVllm(BaseHTTPRequestHandler):
    """Lists a model, then answers every other request with a 200 that is not JSON."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        body = b'{"data":[{"id":"m"}]}' if self.path == "/v1/models" else b"oops"
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


def test_a_backend_that_is_not_vllm_fails_each_check_with_a_reason() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), NotVllm)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rc, report, stderr = verify(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    assert rc == 1 and "Traceback" not in stderr
    assert report["model"] == "m"
    failed = set(report["failed"])
    assert {"chat_stream_equal", "wire_shapes", "error_bodies", "stop_string_holdback",
            "disconnect_aborts_backend", "overhead"} <= failed  # fmt: skip
    checks = {c["name"]: c for c in report["checks"]}
    assert all(checks[name]["problems"] for name in failed)
    assert "no vllm:num_requests_running" in checks["disconnect_aborts_backend"]["problems"][0]
