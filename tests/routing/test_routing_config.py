"""The Gateway's `routing:` section: defaults, every field reaching the snapshot, a clear
file:line error for a bad value, and `sluice bench routing` end to end (tiny and bounded)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from sluice.control.config.build import build_config
from sluice.control.config.issues import ConfigInvalid
from sluice.control.config.loader import read_config_files
from sluice.proxy.snapshot import RoutingPolicy

from tests.fixtures import sluice_cmd

GATEWAY = """\
kind: Gateway
records: {{path: null}}
backends:
  - name: pool
    urls: ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
{routing}
routes:
  - {{model: chat, backend: pool}}
"""


def build(tmp_path: Path, routing: str) -> RoutingPolicy:
    (tmp_path / "gateway.yaml").write_text(GATEWAY.format(routing=routing))
    built = build_config(read_config_files(tmp_path), environ={})
    return built.snapshot.backends["pool"].routing


def test_default_is_score(tmp_path: Path) -> None:
    assert build(tmp_path, "") == RoutingPolicy()
    assert RoutingPolicy().strategy == "score"


def test_every_field_reaches_the_snapshot(tmp_path: Path) -> None:
    routing = build(
        tmp_path,
        "    routing: {strategy: least_outstanding, block_chars: 128, index_blocks: 1000,\n"
        "      prefix_weight: 5, load_weight: 1.5, kv_weight: 0, session_header: X-Session-ID,\n"
        "      session_weight: 3, max_waiting: 2, max_kv_usage: 0.8, max_imbalance: 4,\n"
        "      scrape_interval: 250ms, scrape_path: /vllm/metrics, shared_index: false,\n"
        "      shared_index_timeout: 5ms}",
    )
    assert routing == RoutingPolicy(
        strategy="least_outstanding",
        block_chars=128,
        index_blocks=1000,
        prefix_weight=5.0,
        load_weight=1.5,
        kv_weight=0.0,
        session_header="x-session-id",
        session_weight=3.0,
        max_waiting=2,
        max_kv_usage=0.8,
        max_imbalance=4,
        scrape_interval=0.25,
        scrape_path="/vllm/metrics",
        shared_index=False,
        shared_index_timeout=0.005,
    )
    assert build(tmp_path, "    routing: {scrape_interval: null}").scrape_interval is None


@pytest.mark.parametrize(
    ("routing", "expected"),
    [
        ("    routing: {strategy: round_robin}", "strategy"),
        ("    routing: {max_kv_usage: 1.5}", "max_kv_usage"),
        ("    routing: {session_header: 'bad header'}", "session_header"),
        ("    routing: {block_size: 16}", "block_size"),
        ("    routing: {shared_index_timeout: 2s}", "shared_index_timeout"),
    ],
)
def test_bad_value_is_a_config_error_with_its_line(
    tmp_path: Path, routing: str, expected: str
) -> None:
    with pytest.raises(ConfigInvalid) as caught:
        build(tmp_path, routing)
    text = str(caught.value)
    assert "gateway.yaml:6:" in text and expected in text, text


def test_bench_routing_runs_end_to_end() -> None:
    result = subprocess.run(
        sluice_cmd(
            "bench",
            "routing",
            "--replicas",
            "2",
            "--tenants",
            "4",
            "--requests",
            "24",
            "--concurrency",
            "4",
            "--max-tokens",
            "2",
            "--ttft-ms",
            "2",
            "--itl-ms",
            "1",
            "--prefill-ms-per-block",
            "0.2",
            "--timeout",
            "30",
            "--json",
        ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    targets = [(r["workload"], r["target"]) for r in data["runs"]]
    assert len(targets) == 6 and ("unique", "sluice default") in targets
    assert all(r["ok"] == 24 and not r["errors"] for r in data["runs"]), data["runs"]
    assert set(data["verdicts"]) == {"shared", "unique"}


def test_bench_routing_refuses_bad_input() -> None:
    result = subprocess.run(
        sluice_cmd("bench", "routing", "--urls", "http://127.0.0.1:1"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "--urls needs at least two replicas" in result.stderr
    assert "Traceback" not in result.stderr
