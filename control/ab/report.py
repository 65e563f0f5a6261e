"""`sluice ab report EXPERIMENT [--since] [--json]`: per-variant statistics from the records.

Per variant: requests and their share (against the configured weights), TTFT p50/p95,
mean output tokens, output tokens per second of request time, finish reasons, and the
feedback: mean score and good-rate, each with a 95% confidence interval. Then each variant
is tested against the first (the control, in the config's order): Welch's t-test on
scores, the two-proportion z-test on labels, two-sided, at ALPHA split over the
comparisons (Bonferroni). Higher scores and more "good" labels count as better. The
verdict says which variant is better and the p-value, or how many more ratings per
variant would detect the difference seen so far (80% power).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from sluice.control.ab.database import DB_ERRORS, records_location, redact
from sluice.control.ab.records import StoredRecord, experiments_recorded, read_experiment
from sluice.control.config.build import ConfigInvalid, load_config
from sluice.control.config.gateway_schema import RecordsSection
from sluice.control.config.values import parse_duration
from sluice.control.errors import CliError
from sluice.proxy.snapshot import Experiment

from .stats import (
    ALPHA,
    MeanEstimate,
    RateEstimate,
    TestResult,
    estimate_mean,
    estimate_rate,
    n_for_means,
    n_for_rates,
    normal_approximation_holds,
    quantile,
    two_proportion_z_test,
    welch_t_test,
)

TABLE_HEADER = (
    "variant",
    "preset",
    "n",
    "share",
    "weight",
    "TTFT p50",
    "TTFT p95",
    "tokens out",
    "tok/s",
    "finish",
)
DEFAULT_DB = str(RecordsSection.model_fields["path"].default)


@dataclass(frozen=True, slots=True)
class VariantStats:
    name: str
    preset: str  # the preset most of its requests ran with
    weight: float | None  # configured share (0-1); None when not in the config
    n: int
    share: float
    ttft_p50: float | None
    ttft_p95: float | None
    mean_tokens_out: float | None
    tokens_per_second: float | None
    finish: dict[str, int]
    score: MeanEstimate | None
    label: RateEstimate | None


@dataclass(frozen=True, slots=True)
class Comparison:
    variant: str
    control: str
    metric: Literal["score", "label"]
    test: TestResult | None
    alpha: float
    better: str | None  # None: no difference shown (yet)
    more_needed: int | None  # ratings per variant still needed, when that can be estimated
    verdict: str


@dataclass(frozen=True, slots=True)
class Report:
    experiment: str
    db: str
    since: float | None
    requests: int
    variants: list[VariantStats]
    comparisons: list[Comparison] = field(default_factory=list)


def _outcome(r: StoredRecord) -> str:
    if r.finish_reason:
        return r.finish_reason
    if r.status == 499 or r.error == "client_gone":
        return "client_gone"
    if r.error:
        return r.error
    return f"http_{r.status}" if r.status >= 400 else "none"


def _succeeded(r: StoredRecord) -> bool:
    """Generation that ended as the backend ended it: a 200 with a finish reason and no
    error (a stream cut by a timeout, an upstream error or the client's leaving is a 200
    too, and its tokens and time would skew the means)."""
    return r.status == 200 and bool(r.finish_reason) and not r.error


def _variant_stats(
    name: str, rows: Sequence[StoredRecord], total: int, weight: float | None
) -> VariantStats:
    ttfts = [r.ttft for r in rows if r.ttft is not None]
    ok = [r for r in rows if _succeeded(r)]
    duration = math.fsum(r.duration for r in ok)
    tokens = sum(r.tokens_out or 0 for r in ok)
    good = sum(1 for r in rows if r.label == "good")
    labelled = sum(1 for r in rows if r.label is not None)
    presets = Counter(r.preset for r in rows)
    return VariantStats(
        name=name,
        preset=presets.most_common(1)[0][0] if presets else "",
        weight=weight,
        n=len(rows),
        share=len(rows) / total if total else 0.0,
        ttft_p50=quantile(ttfts, 0.5) if ttfts else None,
        ttft_p95=quantile(ttfts, 0.95) if ttfts else None,
        mean_tokens_out=tokens / len(ok) if ok else None,
        tokens_per_second=tokens / duration if duration > 0 else None,
        finish=dict(Counter(_outcome(r) for r in rows).most_common()),
        score=estimate_mean([r.score for r in rows if r.score is not None]),
        label=estimate_rate(good, labelled),
    )


def _approx(n: int) -> int:
    """Two significant digits: "need ~1,200 more" claims no false precision."""
    if n < 100:
        return n
    scale = 10 ** (len(str(n)) - 2)
    return int(math.ceil(n / scale) * scale)


def format_p(p: float) -> str:
    return f"{p:.1e}" if p < 0.001 else f"{p:.2g}"


def _verdict(
    metric: Literal["score", "label"], v: VariantStats, c: VariantStats, alpha: float
) -> Comparison:
    test: TestResult | None = None
    needed: int | None = None
    n = 0
    problem = "not enough feedback yet"
    if metric == "score" and v.score is not None and c.score is not None:
        test = welch_t_test(c.score, v.score)
        needed = n_for_means(c.score, v.score, alpha)
        n = min(c.score.n, v.score.n)
        problem = "not enough scores yet (2 per variant at least)"
    elif metric == "label" and v.label is not None and c.label is not None:
        if normal_approximation_holds(c.label, v.label):
            test = two_proportion_z_test(c.label, v.label)
        else:
            problem = "too few labels yet (5 good and 5 bad expected per variant)"
        needed = n_for_rates(c.label, v.label, alpha)
        n = min(c.label.n, v.label.n)
    if test is None:
        return Comparison(v.name, c.name, metric, None, alpha, None, None, problem)
    if test.p_value < alpha:
        better = v.name if test.difference > 0 else c.name
        text = f"{better} better, p={format_p(test.p_value)}"
        return Comparison(v.name, c.name, metric, test, alpha, better, None, text)
    more = None if needed is None else max(0, needed - n)
    text = "no difference yet"
    if more:
        text += f", need ~{_approx(more):,} more per variant"
    return Comparison(v.name, c.name, metric, test, alpha, None, more, text)


def build_report(
    experiment: str,
    records: Sequence[StoredRecord],
    *,
    config: Experiment | None = None,
    db: str = "",
    since: float | None = None,
    alpha: float = ALPHA,
) -> Report:
    """The report of `records` (one experiment's); `config` gives the variants' order
    (the first is the control) and weights."""
    by_variant: dict[str, list[StoredRecord]] = {}
    weights: dict[str, float] = {}
    if config is not None:
        total_weight = sum(v.weight for v in config.variants)
        for v in config.variants:
            by_variant[v.name] = []
            weights[v.name] = v.weight / total_weight
    for name in sorted({r.variant for r in records} - set(by_variant)):
        by_variant[name] = []
    for r in records:
        by_variant[r.variant].append(r)
    total = len(records)
    variants = [
        _variant_stats(name, rows, total, weights.get(name)) for name, rows in by_variant.items()
    ]
    report = Report(experiment, db, since, total, variants)
    compared = [v for v in variants if v.n]
    if len(compared) < 2:
        return report
    control, others = compared[0], compared[1:]
    each = alpha / len(others)
    for metric in ("score", "label"):
        if any(getattr(v, metric) is not None for v in compared):
            report.comparisons.extend(_verdict(metric, v, control, each) for v in others)
    return report


# -- output --------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}ms"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def _finish(counts: dict[str, int], n: int) -> str:
    return ", ".join(f"{reason} {count / n:.0%}" for reason, count in counts.items()) or "-"


def _score(e: MeanEstimate | None) -> str:
    if e is None:
        return "-"
    ci = f" [{e.ci[0]:.2f}, {e.ci[1]:.2f}]" if e.ci else ""
    return f"{e.mean:.2f}{ci}"


def _rate(e: RateEstimate | None) -> str:
    if e is None:
        return "-"
    return f"{e.rate:.1%} [{e.ci[0]:.1%}, {e.ci[1]:.1%}]"


def _test(t: TestResult | None, metric: str) -> str:
    if t is None:
        return "-"
    if metric == "score":
        return f"{t.difference:+.2f}, Welch t={t.statistic:.2f} df={t.df:.0f}"
    return f"{t.difference * 100:+.1f} pts, z={t.statistic:.2f}"


def render_text(report: Report) -> str:
    since = (
        "all time"
        if report.since is None
        else "since " + datetime.fromtimestamp(report.since).astimezone().isoformat("T", "seconds")
    )
    lines = [f"experiment {report.experiment}: {report.requests:,} requests, {since}", ""]
    lines += _table(
        TABLE_HEADER,
        [
            [
                v.name,
                v.preset or "-",
                f"{v.n:,}",
                f"{v.share:.1%}",
                "-" if v.weight is None else f"{v.weight:.0%}",
                _ms(v.ttft_p50),
                _ms(v.ttft_p95),
                _num(v.mean_tokens_out),
                _num(v.tokens_per_second),
                _finish(v.finish, v.n),
            ]
            for v in report.variants
        ],
    )
    lines += ["", "feedback (95% confidence intervals)"]
    lines += _table(
        ["variant", "scores", "mean score", "labels", "good rate"],
        [
            [
                v.name,
                f"{v.score.n:,}" if v.score else "0",
                _score(v.score),
                f"{v.label.n:,}" if v.label else "0",
                _rate(v.label),
            ]
            for v in report.variants
        ],
    )
    if report.comparisons:
        alpha = report.comparisons[0].alpha
        lines += ["", f"against {report.comparisons[0].control} (two-sided, alpha {alpha:g})"]
        lines += _table(
            ["variant", "feedback", "difference", "p", "verdict"],
            [
                [
                    c.variant,
                    c.metric,
                    _test(c.test, c.metric),
                    "-" if c.test is None else format_p(c.test.p_value),
                    c.verdict,
                ]
                for c in report.comparisons
            ],
        )
    return "\n".join(lines) + "\n"


def render_json(report: Report) -> str:
    def clean(value: Any) -> Any:
        # JSON has no infinity: a t of +-inf (two constant groups) is written as null.
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(asdict(report)), indent=2) + "\n"


# -- the command ---------------------------------------------------------------------------


def parse_since(value: str, now: float | None = None) -> float:
    """An age like 24h or 30m, or an ISO time (local time unless it has an offset)."""
    try:
        age = float(parse_duration(value))
    except ValueError:
        pass
    else:
        since = (time.time() if now is None else now) - age
        if since < 0:  # before 1970: printing it as a date fails, and no record is older
            raise CliError(f"--since {value!r}: goes back before 1970")
        return since
    try:
        since = datetime.fromisoformat(value).timestamp()
    except (ValueError, OverflowError, OSError) as exc:
        raise CliError(
            f"--since {value!r}: expected an age like 24h or 30m, or an ISO time "
            f"from 1970 on ({exc})"
        ) from None
    if since < 0:
        raise CliError(f"--since {value!r}: goes back before 1970")
    return since


def _config_and_db(args: argparse.Namespace) -> tuple[Experiment | None, str]:
    directory = Path(args.config)
    built = None
    if directory.is_dir():
        try:
            built = load_config(directory)
        except ConfigInvalid as exc:
            if args.db is None:
                raise CliError(
                    f"the config in {directory} is invalid (or pass --db):\n{exc}"
                ) from None
    experiment = built.snapshot.experiments.get(args.experiment) if built else None
    if args.db is not None:
        return experiment, str(args.db)
    if built is None or built.gateway is None:
        return experiment, DEFAULT_DB
    path = records_location(built.gateway.records)
    if path is None:
        raise CliError(f"records are off in {directory} (records.path: null); pass --db")
    return experiment, path


def run(args: argparse.Namespace) -> int:
    config, db = _config_and_db(args)
    since = parse_since(args.since) if args.since else None
    try:
        records = read_experiment(db, args.experiment, since)
        if not records:
            known = experiments_recorded(db)
            raise CliError(
                f"no records of experiment {args.experiment!r} in {redact(db)}"
                + (" in that period" if since is not None else "")
                + f"; experiments with records: {', '.join(known) or 'none'}"
            )
    except FileNotFoundError as exc:
        raise CliError(str(exc)) from None
    except DB_ERRORS as exc:
        raise CliError(f"cannot read the records database {redact(db)}: {exc}") from None
    try:
        report = build_report(args.experiment, records, config=config, db=redact(db), since=since)
    except ArithmeticError as exc:  # scores recorded before they were bounded
        raise CliError(f"the recorded scores are out of range for the statistics: {exc}") from None
    print(render_json(report) if args.json else render_text(report), end="")
    return 0


__all__ = ["Comparison", "Report", "VariantStats", "build_report", "render_json", "render_text"]
