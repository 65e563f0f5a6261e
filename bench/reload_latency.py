"""Reload latency of a real `sluice serve`: a preset file written -> the first response
that carries the new version in x-sluice-config.

    .venv/bin/python -m bench.reload_latency --samples 20

starts `sluice sim` and `sluice serve --config <tmp copy>` on loopback, waits until the
watcher is live, then for each save style writes `samples` edits (alternating two
temperatures, so every edit is a new version). The clock starts when the save returned
(close, or rename, done) and stops when a response carries the new version: one
keep-alive client polls GET /v1/models back to back (~1 ms a request). After each sample
it waits 0.5 s so the next edit starts from a quiet watcher.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sluice.control.bench.loadgen import percentile

from tests.fixtures import start_sim
from tests.reload.fixtures import (
    ConfigDir,
    Gateway,
    base_files,
    modes_with_temperature,
    truncate_and_write,
    write_in_place,
)

QUIET_S = 0.5
TIMEOUT_S = 5.0


def write_temp_and_rename(path: Path, text: str) -> None:
    """What vim (writebackup), `sed -i` and `mv` end with: rename(2) over the file."""
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


STYLES: dict[str, Callable[[Path, str], None]] = {
    "in-place write": write_in_place,
    "truncate and write": truncate_and_write,
    "write temp + rename": write_temp_and_rename,
}


def measure(
    gateway: Gateway, config: ConfigDir, save: Callable[[Path, str], None], samples: int
) -> list[float]:
    """Seconds from each save to the first response carrying its version."""
    latencies = []
    for i in range(samples):
        text = modes_with_temperature(0.5 if i % 2 == 0 else 0.6)
        if config.files["modes.yaml"] == text:
            text = modes_with_temperature(0.7)
        files = config.with_file("modes.yaml", text)
        config.files = files
        expected = config.version()
        save(config.path / "modes.yaml", text)
        written = time.perf_counter()
        while gateway.served_version() != expected:
            if time.perf_counter() - written > TIMEOUT_S:
                raise AssertionError(f"sample {i}: {expected} not served in {TIMEOUT_S}s")
        latencies.append(time.perf_counter() - written)
        time.sleep(QUIET_S)
    return latencies


def summary(name: str, latencies: list[float]) -> str:
    ms = [x * 1000 for x in latencies]
    return (
        f"| {name} | {len(ms)} | {min(ms):.0f} | {percentile(ms, 50):.0f} | "
        f"{percentile(ms, 95):.0f} | {max(ms):.0f} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20)
    args = parser.parse_args()
    sim = start_sim()
    try:
        with tempfile.TemporaryDirectory(prefix="sluice-reload-") as tmp:
            root = Path(tmp)
            config = ConfigDir(root / "cfg", base_files(sim.url))
            gateway = Gateway(config, root)
            try:
                gateway.wait_watching()
                rows = [
                    summary(name, measure(gateway, config, save, args.samples))
                    for name, save in STYLES.items()
                ]
            finally:
                gateway.close()
    finally:
        sim.stop()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| save | samples | min ms | p50 ms | p95 ms | max ms |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
