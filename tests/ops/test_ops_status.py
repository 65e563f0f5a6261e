"""GET /admin/status and `sluice status`, against a real `sluice serve` under load."""

from __future__ import annotations

import http.server
import subprocess
import threading

import httpx

from tests.fixtures import ProcessServer, free_port, sluice_cmd
from tests.ops.fixtures import ADMIN, ADMIN_TOKEN, Streams, auth, chat, scrape, wait_until


def sluice_status(*args: str, token: str | None = ADMIN_TOKEN) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin"}
    if token is not None:
        env["SLUICE_ADMIN_TOKEN"] = token
    return subprocess.run(
        sluice_cmd("status", *args),
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


def test_admin_status_needs_the_token(gateway: ProcessServer) -> None:
    assert httpx.get(gateway.url + "/admin/status").status_code == 401
    wrong = httpx.get(gateway.url + "/admin/status", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_admin_token"


def test_status_under_load(gateway: ProcessServer) -> None:
    url = gateway.url
    whole = {k: v for k, v in chat("tuned", 3).items() if k != "stream_options"}
    done = httpx.post(
        url + "/v1/chat/completions", json=whole | {"stream": False}, headers=auth("beta")
    )
    assert done.status_code == 200
    streams = Streams()
    try:
        # Long enough for `sluice status` (a fresh Python process) to see it in flight.
        streams.start(url, chat("plain", 100, sim={"itl_ms": 40}), auth("solo"))
        wait_until("the stream", lambda: scrape(url).get("sluice_active_streams") == 1)
        streams.start(url, chat("plain", 2), auth("solo"))
        wait_until(
            "the queued request",
            lambda: scrape(url).get("sluice_queue_depth", limiter="app:solo") == 1,
        )
        status = httpx.get(url + "/admin/status", headers=ADMIN).json()
        cli = sluice_status("--url", url)
        streams.results()
    finally:
        streams.close()

    assert status["ready"] is True and status["worker"] is None
    assert status["active_streams"] == 1
    assert status["config"]["version"] == done.headers["x-sluice-config"]
    assert status["config"]["last_result"] == "ok"
    (backend,) = status["backends"]
    assert backend["name"] == "sim" and backend["in_flight"] == 1
    (replica,) = backend["replicas"]
    assert replica["healthy"] is True and replica["ejected"] is False
    assert replica["in_flight"] == 1
    queues = {q["name"]: q for q in status["queues"]}
    assert (queues["app:solo"]["in_use"], queues["app:solo"]["queued"]) == (1, 1)
    assert queues["app:solo"]["limit"] == 1 and queues["app:solo"]["max_queue"] == 8
    apps = {a["name"]: a for a in status["apps"]}
    assert set(apps) >= {"alpha", "beta", "solo"}
    assert (apps["solo"]["in_flight"], apps["solo"]["queued"]) == (1, 1)
    assert apps["alpha"]["in_flight"] is None  # no limit, no limiter: not tracked
    assert apps["beta"]["requests"] >= 1 and apps["beta"]["by_status"]["200"] >= 1
    assert apps["beta"]["tokens_out"] >= 3

    assert cli.returncode == 0, cli.stderr
    out = cli.stdout
    assert f"sluice at {url}: ready" in out
    assert status["config"]["version"] in out
    assert "http://" in out and "healthy" in out
    solo = next(line for line in out.splitlines() if line.strip().startswith("solo"))
    assert solo.split()[-2:] == ["1", "1"]  # in flight, queued
    assert "app:solo" in out and "1/1" in out


def test_status_cli_errors(gateway: ProcessServer) -> None:
    no_token = sluice_status("--url", gateway.url, token=None)
    assert no_token.returncode == 1 and "no admin token" in no_token.stderr
    wrong = sluice_status("--url", gateway.url, "--token", "nope")
    assert wrong.returncode == 1 and "401" in wrong.stderr and "admin token" in wrong.stderr
    down = sluice_status("--url", f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 1 and "cannot reach" in down.stderr
    for result in (no_token, wrong, down):
        assert "Traceback" not in result.stderr


def test_status_against_another_server_is_an_error() -> None:
    """A server that answers 200 with JSON of its own (or with text) is not a draining
    sluice: `sluice status` said 'DRAINING (not ready); pid None' and exited 0."""
    answers = iter([b'{"object":"list","data":[]}', b"<h1>hello</h1>"])

    class Other(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = next(answers)
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Other)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for _ in range(2):
            cli = sluice_status("--url", f"http://127.0.0.1:{server.server_port}")
            assert cli.returncode == 1, cli.stdout
            assert "something other than sluice's status object" in cli.stderr
            assert "Traceback" not in cli.stderr and len(cli.stderr.strip().splitlines()) == 1
    finally:
        server.shutdown()
        server.server_close()
