"""Item 6 of issue 13 (and the permit side of item 1): the supervisor starts a worker
that dies again, with back-off, and says so in its log; the permits the dead worker held
return at once (its socket closed), so the limit is whole again for the new worker."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from tests.scale.fixtures import burst, statuses, stream, wait_until, worker_pids, write_gateway

WORKERS = 2


def test_dead_worker_is_restarted_and_its_permits_return(
    start, slow_sim, sim_stats, tmp_path: Path
) -> None:
    config = write_gateway(tmp_path / "cfg", slow_sim.url, limit=2, queue_max=0)
    server = start(config, "--workers", str(WORKERS))
    pids = worker_pids(server, WORKERS)
    # Long streams hold both permits; which worker holds them does not matter: kill both.
    holders = [threading.Thread(target=stream, args=(server.url, 2000), daemon=True)]
    holders.append(threading.Thread(target=stream, args=(server.url, 2000), daemon=True))
    for thread in holders:
        thread.start()
    wait_until("both permits in use", lambda: sim_stats.stats()["active"] == 2)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)

    def restarted() -> bool:
        events = [e for e in server.json_logs() if e.get("event") == "worker_restarted"]
        return len(events) == WORKERS

    wait_until("both workers restarted", restarted)
    died = [e for e in server.json_logs() if e.get("event") == "worker_died"]
    assert sorted(e["pid"] for e in died) == sorted(pids)
    assert all(e["code"] == -signal.SIGKILL and e["restart_in_s"] == 0.5 for e in died)
    new = worker_pids(server, WORKERS)
    assert not new & pids
    # The dead workers' permits are back: two new streams are admitted at once (no queue).
    sim_stats.reset()
    assert statuses(burst([server.url], 2, 5)) == {200: 2}
    assert server.stop() == 0
