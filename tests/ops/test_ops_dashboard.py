"""dashboards/sluice.json: a Grafana dashboard whose every query names a metric sluice
exports, with the panels the issue lists."""

from __future__ import annotations

import json
import re
from typing import Any

from sluice.proxy.metrics import Metrics

from tests.fixtures import REPO

DASHBOARD = REPO / "dashboards" / "sluice.json"
OPERATIONS = REPO / "docs" / "OPERATIONS.md"
METRIC = re.compile(r"\bsluice_[a-z_]+")
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def load() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text(encoding="utf-8")))


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def family(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_every_query_names_an_exported_metric() -> None:
    exported = {f.name for f in Metrics().registry.collect()}
    used = {family(m) for _, expr in queries(load()) for m in METRIC.findall(expr)}
    assert used - exported == set()  # no query for a metric that does not exist
    assert exported - used == set()  # and every metric sluice exports is on a panel


def test_queries_are_well_formed() -> None:
    for title, expr in queries(load()):
        assert expr.count("(") == expr.count(")"), title
        assert expr.count("{") == expr.count("}"), title
        for window in re.findall(r"\[([^\]]+)\]", expr):
            assert window == "$__rate_interval", (title, expr)


def test_layout_and_variables() -> None:
    dashboard = load()
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names == ["datasource", "route", "variant", "app"]


def test_latency_percentiles_per_route_and_variant() -> None:
    for metric in ("sluice_ttft_seconds", "sluice_inter_token_seconds"):
        exprs = [e for _, e in queries(load()) if f"{metric}_bucket" in e]
        quantiles = {q for e in exprs for q in re.findall(r"histogram_quantile\(([0-9.]+)", e)}
        assert quantiles == {"0.5", "0.9", "0.99"}
        assert all("by (le, route, variant)" in e for e in exprs)
    titles = " | ".join(p["title"] for p in load()["panels"])
    for needed in ("TTFT", "Inter-token", "Active streams", "Queue depth", "Queue wait",
                   "Upstream errors", "Timeouts", "Stream cuts", "Client disconnects"):  # fmt: skip
        assert needed in titles


def test_operations_doc_lists_every_metric() -> None:
    table = re.findall(r"^\| `(sluice_[a-z_]+)` \|", OPERATIONS.read_text(encoding="utf-8"), re.M)
    exported = {f.name for f in Metrics().registry.collect()}
    assert {family(name) for name in table} == exported
