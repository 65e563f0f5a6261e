"""`sluice serve --workers 2`: each worker watches and reloads the config itself; an edit
is served by both within 2 s. Which worker answered a connection is read from /proc (the
worker whose file descriptors hold the accepted socket), not guessed."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures import ProcessServer, sluice_cmd
from tests.reload.fixtures import (
    ADMIN_TOKEN,
    DEADLINE_S,
    GUARD,
    MODES,
    ConfigDir,
    Gateway,
    PinnedClient,
    StartGateway,
    auth,
    chat_body,
    connection_owner,
    modes_with_temperature,
    sim_request,
    truncate_and_write,
    write_in_place,
)

WORKERS = 2
BOTH_WITHIN_S = 2.0
WORKER_START_S = 15.0
pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")


def worker_pids(gateway: Gateway) -> set[int]:
    """The pids of the workers, from their `serving` log lines (each logs its own)."""
    deadline = time.monotonic() + 10.0
    while True:
        pids = {e["pid"] for e in gateway.log_events("serving")}
        if len(pids) == WORKERS:
            break
        assert time.monotonic() < deadline, f"workers that said they serve: {pids}"
        time.sleep(0.05)
    supervisor = gateway.server.proc.pid
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    assert pids <= {int(pid) for pid in children}, (pids, children)
    return pids


@pytest.fixture
def pinned(
    config: ConfigDir, start_gateway: StartGateway
) -> Iterator[tuple[Gateway, dict[int, PinnedClient]]]:
    """A 2-worker gateway, one keep-alive connection to each worker, both watchers live."""
    gateway = start_gateway(config, "--workers", str(WORKERS), watching=False)
    clients = pin_workers(gateway, config)
    yield gateway, clients
    for client in clients.values():
        client.close()


def pin_workers(gateway: Gateway, config: ConfigDir) -> dict[int, PinnedClient]:
    """One keep-alive connection to each worker, once both watchers are live."""
    pids = worker_pids(gateway)
    clients: dict[int, PinnedClient] = {}
    for _ in range(200):  # SO_REUSEPORT hashes each new connection to one worker
        client = PinnedClient(gateway.url, pids)
        assert client.pid in pids, f"connection owned by {client.pid}, workers {pids}"
        if client.pid in clients:
            client.close()
        else:
            clients[client.pid] = client
        if len(clients) == WORKERS:
            break
    assert len(clients) == WORKERS, f"200 connections all went to {set(clients)}"
    # Each worker's watcher is live once it reports a no-op reload of a rewritten file.
    probe = config.path / "gateway.yaml"
    data = probe.read_bytes()
    deadline = time.monotonic() + DEADLINE_S
    while not all(c.admin_config()["reloads"]["unchanged"] for c in clients.values()):
        assert time.monotonic() < deadline, "a worker's watcher never reported a change"
        write_in_place(probe, data.decode())
        time.sleep(0.1)
    time.sleep(0.3)
    return clients


@pytest.mark.slow
def test_both_workers_serve_an_edit_within_2s(
    pinned: tuple[Gateway, dict[int, PinnedClient]], config: ConfigDir, sim: ProcessServer
) -> None:
    gateway, clients = pinned
    before = config.version()
    assert {c.version() for c in clients.values()} == {before}

    written = time.monotonic()
    expected = config.save("modes.yaml", modes_with_temperature(0.6), truncate_and_write)
    assert expected is not None
    first_new: dict[int, float] = {}
    while len(first_new) < WORKERS:
        for pid, client in clients.items():
            if pid not in first_new and client.version() == expected:
                first_new[pid] = time.monotonic() - written
        elapsed = time.monotonic() - written
        assert elapsed < BOTH_WITHIN_S, (
            f"after {elapsed:.2f}s only workers {sorted(first_new)} serve {expected}; "
            f"{[c.admin_config() for c in clients.values()]}"
        )
        time.sleep(0.005)

    # Every new connection, whichever worker takes it, gets the new version and preset.
    owners: list[int] = []
    server_port = int(gateway.url.rsplit(":", 1)[1])
    for i in range(30):
        with httpx.Client(base_url=gateway.url, timeout=10) as fresh:
            request_id = f"workers-{i}"
            resp = fresh.post(
                "/v1/chat/completions",
                json=chat_body(max_tokens=4),
                headers=auth(**{"x-request-id": request_id}),
            )
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-sluice-config"] == expected
            _, port = resp.extensions["network_stream"].get_extra_info("client_addr")
            owner = connection_owner(port, server_port, clients)
            assert owner is not None
            owners.append(owner)
        assert sim_request(sim.url, request_id)["body"]["temperature"] == 0.6
    assert set(owners) == set(clients), f"30 new connections all went to {set(owners)}"

    # One apply per worker, each logged.
    assert gateway.reloaded_versions(at_least=WORKERS) == [expected] * WORKERS


@pytest.mark.slow
def test_both_workers_keep_serving_through_an_invalid_edit_and_reload_on_sighup(
    pinned: tuple[Gateway, dict[int, PinnedClient]], config: ConfigDir
) -> None:
    gateway, clients = pinned
    before = config.version()
    invalid = MODES.replace("top_k: 40\n", "top_k: many\n")
    assert config.save("modes.yaml", invalid, truncate_and_write) is None
    deadline = time.monotonic() + DEADLINE_S
    while not all(c.admin_config()["last_result"] == "error" for c in clients.values()):
        assert time.monotonic() < deadline, [c.admin_config() for c in clients.values()]
        time.sleep(0.02)
    for client in clients.values():
        state = client.admin_config()
        assert state["version"] == before
        assert "modes.yaml:5:10: generation.top_k" in state["last_error"], state
        assert client.version() == before
    gateway.wait_logged("config_reload_failed", WORKERS)

    # SIGHUP to the supervisor reaches every worker: each runs one more reload.
    errors = {pid: c.admin_config()["reloads"]["error"] for pid, c in clients.items()}
    gateway.server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + DEADLINE_S
    while not all(c.admin_config()["reloads"]["error"] > errors[p] for p, c in clients.items()):
        assert time.monotonic() < deadline, [c.admin_config() for c in clients.values()]
        time.sleep(0.02)
    assert gateway.server.proc.poll() is None  # the supervisor forwarded it, did not die of it
    assert {c.version() for c in clients.values()} == {before}
    assert gateway.served_version() == before


@pytest.mark.slow
def test_an_admin_reload_of_one_worker_reloads_every_worker(
    pinned: tuple[Gateway, dict[int, PinnedClient]],
) -> None:
    """`POST /admin/reload`, answered by one worker, runs a reload in every worker (the
    supervisor forwards SIGHUP), as a SIGHUP to the supervisor does: an edit the watchers
    missed (a network filesystem, a file linked from elsewhere) reaches them all."""
    _, clients = pinned

    def counts() -> dict[int, int]:
        return {pid: sum(c.admin_config()["reloads"].values()) for pid, c in clients.items()}

    # Once the fixture's probes are all counted (no reload of theirs comes late): the
    # counts unchanged over 1.5 s, since under the suite's parallel load a watcher has
    # reported a probe's write later than 0.5 s after the one before it.
    before, steady = counts(), 0
    deadline = time.monotonic() + 4 * DEADLINE_S
    while steady < 3:
        time.sleep(0.5)
        now = counts()
        steady = steady + 1 if now == before else 0
        before = now
        assert time.monotonic() < deadline, "the workers' reload counts never settled"
    asked_pid, asked = next(iter(clients.items()))
    reply = asked.client.post("/admin/reload", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["result"] == "unchanged" and body["all_workers"] is True, body
    deadline = time.monotonic() + DEADLINE_S
    for pid, client in clients.items():
        wanted = before[pid] + (2 if pid == asked_pid else 1)  # its own, then the signal's
        while sum(client.admin_config()["reloads"].values()) < wanted:
            assert time.monotonic() < deadline, (pid, client.admin_config())
            time.sleep(0.02)
    time.sleep(0.5)
    assert counts() == {p: before[p] + (2 if p == asked_pid else 1) for p in clients}


def children_of(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_sighup_while_workers_start_does_not_kill_them(config: ConfigDir, tmp_path: Path) -> None:
    """A reload request (systemctl reload, a config agent) right after `sluice serve
    --workers 2` was started must not stop anything: the workers load the current config
    when they start anyway."""
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    argv = sluice_cmd("serve", "--config", str(config.path), "--port", "0", "--workers", "2")
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            argv,
            stdout=stdout,
            stderr=stderr,
            cwd=tmp_path,
            env={**os.environ, "SLUICE_ADMIN_TOKEN": ADMIN_TOKEN},
        )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 10.0
        while len(workers := children_of(proc.pid)) < WORKERS:
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.005)
        proc.send_signal(signal.SIGHUP)  # the workers are still importing

        deadline = time.monotonic() + 15.0
        while out.read_text().count("serving on") < WORKERS:
            dead = [pid for pid in workers if not is_alive(pid)]
            assert not dead and proc.poll() is None, (
                f"SIGHUP during start-up: workers {dead} of {workers} died, supervisor "
                f"exit code {proc.poll()}; stderr: {err.read_text()[-1500:]}"
            )
            assert time.monotonic() < deadline, "the workers never said they serve"
            time.sleep(0.05)
        assert all(is_alive(pid) for pid in workers) and proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.terminate()
        for pid in workers:  # orphans, if the supervisor died first
            if is_alive(pid):
                os.kill(pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_sighup_while_a_worker_restarts_does_not_kill_it(
    config: ConfigDir, start_gateway: StartGateway
) -> None:
    """The replacement of a dead worker is as safe from a reload request as the first
    workers: SIGHUPs sent to the supervisor all through its restart kill nobody."""
    gateway = start_gateway(config, "--workers", str(WORKERS), watching=False)
    pids = worker_pids(gateway)
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    supervisor = gateway.server.proc
    deadline = time.monotonic() + 3.0  # the restart comes 0.5 s after the death
    while time.monotonic() < deadline:
        supervisor.send_signal(signal.SIGHUP)
        time.sleep(0.01)
    time.sleep(1.0)
    died = gateway.log_events("worker_died")
    assert [(e["pid"], e["code"]) for e in died] == [(victim, -signal.SIGKILL)], died
    restarted = gateway.log_events("worker_restarted")
    assert [e["replaced"] for e in restarted] == [victim]
    alive = children_of(supervisor.pid)
    assert len(alive) == WORKERS and all(is_alive(pid) for pid in alive), alive
    assert restarted[0]["pid"] in alive


@pytest.mark.slow
def test_a_worker_restarted_after_a_listen_edit_joins_its_siblings_address(
    config: ConfigDir, start_gateway: StartGateway
) -> None:
    """`listen` changes only at a restart of the whole server: a worker that dies after
    an edit of it is started again on the address the others serve."""
    gateway = start_gateway(config, "--workers", str(WORKERS), watching=False)
    pids = worker_pids(gateway)
    text = (config.path / "gateway.yaml").read_text()
    edited = text.replace("kind: Gateway\n", "kind: Gateway\nlisten: {host: 127.0.0.2}\n", 1)
    assert config.save("gateway.yaml", edited, write_in_place) is not None
    deadline = time.monotonic() + DEADLINE_S
    while len(gateway.log_events("config_needs_restart")) < WORKERS:
        assert time.monotonic() < deadline, gateway.log_events("config_reloaded")
        time.sleep(0.05)
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    restarted = gateway.wait_logged("worker_restarted")[0]["pid"]
    deadline = time.monotonic() + DEADLINE_S
    while not (serving := [e for e in gateway.log_events("serving") if e["pid"] == restarted]):
        assert time.monotonic() < deadline, "the restarted worker never said it serves"
        time.sleep(0.05)
    assert serving[0]["url"] == gateway.url


@pytest.mark.slow
def test_a_worker_restarted_during_an_invalid_edit_serves_the_last_good_config(
    pinned: tuple[Gateway, dict[int, PinnedClient]], config: ConfigDir
) -> None:
    """A worker that dies while an invalid edit sits in the directory comes back at once
    on the config its sibling serves (not refusing to start, again and again), says the
    directory's error like its sibling, and applies the fix like its sibling."""
    gateway, clients = pinned
    before = config.version()
    invalid = MODES.replace("top_k: 40\n", "top_k: many\n")
    assert config.save("modes.yaml", invalid, truncate_and_write) is None
    deadline = time.monotonic() + DEADLINE_S
    while not all(c.admin_config()["last_result"] == "error" for c in clients.values()):
        assert time.monotonic() < deadline, [c.admin_config() for c in clients.values()]
        time.sleep(0.02)
    victim = min(clients)
    os.kill(victim, signal.SIGKILL)
    client = _pin_new_worker(gateway, clients)
    assert [e["code"] for e in gateway.log_events("worker_died")] == [-signal.SIGKILL]
    events = gateway.wait_logged("worker_caught_up")
    assert len(events) == 1, (events, gateway.log_events("worker_died"))
    (event,) = events
    assert event["version"] == before and event["directory"] == "error", event
    assert "modes.yaml:5:10" in event["errors"][0], event
    clients[victim].close()
    state = client.admin_config()
    assert state["version"] == before and state["last_result"] == "error", state
    assert "modes.yaml:5:10: generation.top_k" in state["last_error"], state
    assert client.version() == before

    fixed = config.save("modes.yaml", modes_with_temperature(0.6), truncate_and_write)
    assert fixed is not None
    survivor = clients[max(clients)]
    deadline = time.monotonic() + DEADLINE_S
    while {client.version(), survivor.version()} != {fixed}:
        assert time.monotonic() < deadline, (client.admin_config(), survivor.admin_config())
        time.sleep(0.02)
    client.close()


def _pin_new_worker(gateway: Gateway, clients: dict[int, PinnedClient]) -> PinnedClient:
    """A connection to the worker started again after one of `clients`' workers died."""
    new_pid = gateway.wait_logged("worker_restarted")[0]["pid"]
    # A process's start-up (imports, the config read), not a reload: the compiled build
    # under the suite's parallel load took 3.04 s once.
    deadline = time.monotonic() + WORKER_START_S
    while not [e for e in gateway.log_events("serving") if e["pid"] == new_pid]:
        assert time.monotonic() < deadline, gateway.log_events("worker_died")
        time.sleep(0.05)
    for _ in range(200):
        client = PinnedClient(gateway.url, {new_pid, *clients})
        if client.pid == new_pid:
            return client
        client.close()
    raise AssertionError("200 connections never reached the new worker")


@pytest.mark.slow
def test_a_worker_restarted_after_a_refused_edit_refuses_it_too(
    pinned: tuple[Gateway, dict[int, PinnedClient]], config: ConfigDir
) -> None:
    """An edit that removes every app is refused by a reload (keys stay required); a
    worker started again afterwards goes through the same reload, not around it, and an
    edit of a field read only at start-up is still "restart required" there."""
    gateway, clients = pinned
    before = config.version()
    text = config.files["gateway.yaml"]
    no_apps = text.replace(text[text.index("apps:\n") : text.index("experiments:\n")], "")
    assert config.save("gateway.yaml", no_apps, write_in_place) is not None
    deadline = time.monotonic() + DEADLINE_S
    while not all(c.admin_config()["last_result"] == "error" for c in clients.values()):
        assert time.monotonic() < deadline, [c.admin_config() for c in clients.values()]
        time.sleep(0.02)
    victim = min(clients)
    os.kill(victim, signal.SIGKILL)
    clients.pop(victim).close()
    new = _pin_new_worker(gateway, clients)
    state = new.admin_config()
    assert state["version"] == before and state["last_result"] == "error", state
    assert "turn API keys off" in state["last_error"]
    body = chat_body(max_tokens=2)
    for _ in range(5):
        assert new.client.post("/v1/chat/completions", json=body).status_code == 401

    # A field read only at start-up: the new worker keeps its siblings' and says so.
    edited = text + "records: {path: null}\n"
    version = config.save("gateway.yaml", edited, write_in_place)
    assert version is not None
    survivor = next(iter(clients.values()))
    deadline = time.monotonic() + DEADLINE_S
    while {new.version(), survivor.version()} != {version}:
        assert time.monotonic() < deadline, (new.admin_config(), survivor.admin_config())
        time.sleep(0.02)
    assert new.admin_config()["restart_required"] == ["records"]
    assert survivor.admin_config()["restart_required"] == ["records"]
    new.close()


@pytest.mark.slow
def test_a_reload_that_adds_resume_without_a_store_warns_in_every_worker(
    config: ConfigDir, start_gateway: StartGateway
) -> None:
    """Start-up warns when a Policy sets resume_window and no limits.store is set (a resume
    reaches the generation's worker only by chance); an edit that adds one warns the same,
    in each worker's reload."""
    gateway = start_gateway(config, "--workers", str(WORKERS), watching=False)
    gateway.wait_logged("config_watch_live", WORKERS)
    assert gateway.log_events("resume_is_per_process") == []
    version = config.save("guard.yaml", GUARD + "resume_window: 30s\n", write_in_place)
    assert version is not None
    deadline = time.monotonic() + DEADLINE_S
    while len(applied := _reloads_to(gateway, version)) < WORKERS:
        assert time.monotonic() < deadline, gateway.log_events("config_reloaded")
        time.sleep(0.02)
    for event in applied:
        (caveat,) = [w for w in event["warnings"] if "resume_window" in w]
        assert "policies guard" in caveat and "set limits.store" in caveat


def _reloads_to(gateway: Gateway, version: str) -> list[dict[str, Any]]:
    return [e for e in gateway.log_events("config_reloaded") if e["version"] == version]
