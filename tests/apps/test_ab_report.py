"""Acceptance: an A/B test of two presets over 2,000 simulated requests, with synthetic
feedback favouring b. The report names b with p < 0.01 for labels and for scores, and the
split matches the weights within 3 points. Then `sluice ab report` itself, text and JSON."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
from sluice.control.ab.records import StoredRecord, read_experiment
from sluice.control.ab.report import build_report, parse_since, render_text
from sluice.control.errors import CliError
from sluice.proxy.exchange import Exchange
from sluice.proxy.recordrow import RECORD_COLUMNS, record_row

from tests.apps.fixtures import SUPPORT_KEY, AppsProxy, build, chat, digest, write_config
from tests.fixtures import ProcessServer, sluice_cmd

GATEWAY = """\
kind: Gateway
backends:
  - {{name: sim, urls: ["{sim}"]}}
routes:
  - {{model: chat, backend: sim, upstream_model: sim-model, preset: precise}}
apps:
  - {{name: support, keys: ["{key}"]}}
experiments:
  - name: temp-test
    route: chat
    sticky: header:x-user-id
    variants:
      - {{name: a, preset: precise, weight: 70}}
      - {{name: b, preset: creative, weight: 30}}
records: {{path: records.sqlite, batch_size: 256, flush_interval: 200ms}}
"""
N = 2_000
# Synthetic users: b's answers are liked more (good-rate and score).
GOOD_RATE = {"a": 0.5, "b": 0.7}
MEAN_SCORE = {"a": 3.5, "b": 3.75}


@dataclass(frozen=True)
class Experiment:
    config_dir: Path
    db: Path
    variants: dict[str, str]  # request id -> variant
    feedback: Counter[str]


@pytest.fixture(scope="module")
def experiment(
    tmp_path_factory: pytest.TempPathFactory, fast_sim: ProcessServer
) -> Iterator[Experiment]:
    root = tmp_path_factory.mktemp("ab")
    cwd = os.getcwd()
    os.chdir(root)  # records.path is relative to the working directory
    try:
        text = GATEWAY.format(sim=fast_sim.url, key=digest(SUPPORT_KEY))
        config_dir = write_config(root / "presets", text)
        proxy = AppsProxy(build(config_dir))
        try:
            yield run_experiment(proxy, config_dir, root / "records.sqlite")
        finally:
            proxy.close()
    finally:
        os.chdir(cwd)


def run_experiment(proxy: AppsProxy, config_dir: Path, db: Path) -> Experiment:
    variants: dict[str, str] = {}
    sent: Counter[str] = Counter()
    lock = threading.Lock()
    auth = {"Authorization": f"Bearer {SUPPORT_KEY}"}

    def user(i: int) -> None:
        rng = random.Random(i)  # per user: the same feedback whatever the thread order
        resp = chat(client, proxy.url, SUPPORT_KEY, headers={"x-user-id": f"user-{i}"})
        assert resp.status_code == 200, resp.text
        assert resp.text.endswith("data: [DONE]\n\n")
        request_id, variant = resp.headers["x-request-id"], resp.headers["x-sluice-variant"]
        with lock:
            variants[request_id] = variant
        if rng.random() < 0.6:
            label = "good" if rng.random() < GOOD_RATE[variant] else "bad"
            body: dict[str, object] = {"request_id": request_id, "label": label}
            answer = client.post(proxy.url + "/v1/feedback", json=body, headers=auth)
            assert answer.status_code == 200, answer.text
            with lock:
                sent["label"] += 1
        if rng.random() < 0.4:
            score = round(min(5.0, max(1.0, rng.gauss(MEAN_SCORE[variant], 1.0))), 1)
            body = {"request_id": request_id, "score": score}
            answer = client.post(proxy.url + "/v1/feedback", json=body, headers=auth)
            assert answer.status_code == 200, answer.text
            with lock:
                sent["score"] += 1

    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(16) as pool:
        list(pool.map(user, range(N)))
    proxy.close_records()  # what shutdown does: everything buffered is written
    return Experiment(config_dir, db, variants, sent)


def test_every_request_was_recorded_with_its_variant(experiment: Experiment) -> None:
    records = read_experiment(experiment.db, "temp-test")
    assert len(records) == N
    assert {r.request_id: r.variant for r in records} == experiment.variants
    assert {(r.variant, r.preset) for r in records} == {("a", "precise"), ("b", "creative")}
    assert all(r.status == 200 and r.finish_reason == "length" for r in records)
    assert all(r.ttft is not None and r.ttft > 0 for r in records)
    tokens = {v: {r.tokens_out for r in records if r.variant == v} for v in "ab"}
    assert tokens == {"a": {3}, "b": {6}}  # the presets' max_new_tokens
    assert sum(r.label is not None for r in records) == experiment.feedback["label"]
    assert sum(r.score is not None for r in records) == experiment.feedback["score"]


def test_the_split_matches_the_weights_within_3_points(experiment: Experiment) -> None:
    report = build_report("temp-test", read_experiment(experiment.db, "temp-test"))
    shares = {v.name: v.share for v in report.variants}
    assert abs(shares["a"] - 0.70) < 0.03, shares
    assert abs(shares["b"] - 0.30) < 0.03, shares


def test_the_report_names_b_with_p_below_001(experiment: Experiment) -> None:
    built = build(experiment.config_dir)
    report = build_report(
        "temp-test",
        read_experiment(experiment.db, "temp-test"),
        config=built.snapshot.experiments["temp-test"],
    )
    verdicts = {c.metric: c for c in report.comparisons}
    assert set(verdicts) == {"label", "score"}
    for comparison in verdicts.values():
        assert (comparison.control, comparison.variant) == ("a", "b")
        assert comparison.better == "b"
        assert comparison.test is not None and comparison.test.p_value < 0.01
        assert comparison.verdict.startswith("b better, p=")
    assert verdicts["label"].test is not None and verdicts["label"].test.test == "two_proportion_z"
    assert verdicts["score"].test is not None and verdicts["score"].test.test == "welch_t"
    text = render_text(report)
    assert "b better, p=" in text
    by_name = {v.name: v for v in report.variants}
    assert by_name["a"].weight == pytest.approx(0.7)
    assert by_name["a"].mean_tokens_out == 3.0 and by_name["b"].mean_tokens_out == 6.0
    assert by_name["a"].finish == {"length": by_name["a"].n}
    label_a, label_b = by_name["a"].label, by_name["b"].label
    assert label_a is not None and label_b is not None
    for estimate in (label_a, label_b):
        assert estimate.ci[0] < estimate.rate < estimate.ci[1]
        assert estimate.ci[1] - estimate.ci[0] < 0.12  # hundreds of labels: a few points


def run_report(experiment: Experiment, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sluice_cmd("ab", "report", *args),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=experiment.db.parent,
        check=False,
    )


def test_sluice_ab_report_prints_the_verdicts(experiment: Experiment) -> None:
    # The database path comes from the config's records section (relative to the cwd).
    done = run_report(experiment, "temp-test", "--config", "presets")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith(f"experiment temp-test: {N:,} requests, all time")
    assert "feedback (95% confidence intervals)" in out
    lines = [line for line in out.splitlines() if line.startswith("b ") and "better" in line]
    assert len(lines) == 2 and all("b better, p=" in line for line in lines), out
    if os.environ.get("SLUICE_PRINT_REPORT"):
        print("\n" + out)


def test_sluice_ab_report_json(experiment: Experiment) -> None:
    done = run_report(
        experiment, "temp-test", "--db", str(experiment.db), "--json", "--since", "1h"
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["experiment"] == "temp-test" and data["requests"] == N
    assert [v["name"] for v in data["variants"]] == ["a", "b"]
    assert {c["metric"]: c["better"] for c in data["comparisons"]} == {"label": "b", "score": "b"}
    assert all(c["test"]["p_value"] < 0.01 for c in data["comparisons"])


def test_sluice_ab_report_errors(experiment: Experiment) -> None:
    unknown = run_report(experiment, "nope", "--db", str(experiment.db))
    assert unknown.returncode == 1
    assert "no records of experiment 'nope'" in unknown.stderr
    assert "experiments with records: temp-test" in unknown.stderr
    future = run_report(
        experiment, "temp-test", "--db", str(experiment.db), "--since", "2999-01-01"
    )
    assert future.returncode == 1 and "in that period" in future.stderr
    missing = run_report(experiment, "temp-test", "--db", "nowhere.sqlite")
    assert missing.returncode == 1 and "no records database at nowhere.sqlite" in missing.stderr
    bad_since = run_report(experiment, "temp-test", "--db", str(experiment.db), "--since", "soon")
    assert bad_since.returncode == 1 and "--since 'soon'" in bad_since.stderr


def _records(variant: str, n: int, good: int) -> list[StoredRecord]:
    base = StoredRecord(
        request_id="",
        time=0.0,
        app="app",
        variant=variant,
        preset="p",
        config_version="v",
        status=200,
        finish_reason="stop",
        error=None,
        ttft=0.02,
        mean_itl=0.01,
        tokens_in=5,
        tokens_out=10,
        duration=0.5,
        stream=True,
        score=None,
        label=None,
    )
    return [
        replace(base, request_id=f"{variant}{i}", label="good" if i < good else "bad")
        for i in range(n)
    ]


def test_no_difference_yet_says_how_many_more_are_needed() -> None:
    records = _records("a", 200, 100) + _records("b", 200, 110)
    (comparison,) = build_report("e", records).comparisons
    assert comparison.better is None
    assert comparison.test is not None and comparison.test.p_value > 0.05
    # 50% vs 55%: ~1,565 per group for 80% power -> ~1,365 more each.
    assert comparison.more_needed == 1365
    assert comparison.verdict == "no difference yet, need ~1,400 more per variant"


def test_too_few_labels_for_the_z_test() -> None:
    records = _records("a", 4, 1) + _records("b", 4, 3)
    (comparison,) = build_report("e", records).comparisons
    assert comparison.test is None
    assert comparison.verdict.startswith("too few labels yet")


def test_three_variants_are_each_tested_against_the_first_with_bonferroni() -> None:
    records = _records("a", 500, 250) + _records("b", 500, 330) + _records("c", 500, 255)
    report = build_report("e", records)
    assert [(c.control, c.variant) for c in report.comparisons] == [("a", "b"), ("a", "c")]
    assert all(c.alpha == 0.025 for c in report.comparisons)
    assert report.comparisons[0].better == "b"
    assert report.comparisons[1].better is None


def test_cut_short_streams_count_in_the_outcomes_not_in_the_means() -> None:
    """A stream that timed out or whose client left is a 200 with no finish reason: it
    counts as such in the finish column, and its tokens and time stay out of the means
    (they were counted as successes: 6.2 mean tokens for 8-token answers)."""
    done = [replace(r, tokens_out=8, duration=0.5) for r in _records("a", 10, 5)]
    timed_out = [
        replace(r, finish_reason=None, error="first_token_timeout", tokens_out=0, duration=2.0)
        for r in _records("a", 2, 0)
    ]
    left = replace(_records("a", 1, 0)[0], finish_reason=None, error="client_gone", tokens_out=1)
    (stats,) = build_report("e", [*done, *timed_out, left]).variants
    assert stats.mean_tokens_out == 8.0
    assert stats.tokens_per_second == 16.0
    assert stats.finish == {"stop": 10, "first_token_timeout": 2, "client_gone": 1}


@pytest.mark.parametrize("since", ["1000000000h", "0001-01-01", "1900-01-01T00:00:00+00:00"])
def test_a_since_before_1970_is_a_one_line_error(since: str) -> None:
    with pytest.raises(CliError, match=f"--since '{re.escape(since)}'"):
        parse_since(since)


def test_a_client_gone_mid_stream_is_recorded_as_such() -> None:
    """A stream whose client left is a 200 with no finish reason; its record says why."""
    ex = Exchange("r1", 0.0)
    ex.status = 200
    ex.client_disconnected = True
    row = dict(zip(RECORD_COLUMNS, record_row(ex), strict=True))
    assert row["error"] == "client_gone"
    ex.timeout = "inter_token_timeout"  # what ended it first is named
    assert dict(zip(RECORD_COLUMNS, record_row(ex), strict=True))["error"] == ex.timeout
