"""The console in a real headless browser (Debian's chromium driven by Playwright): login,
live numbers, config history, A/B numbers equal to `sluice ab report --json`, and the
playground streaming coloured tokens incrementally. Screenshots go to
build/test-artifacts/console/."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.console.fixtures import ADMIN_TOKEN, APP_KEY, start_sluice, write_config
from tests.fixtures import ProcessServer, sluice_cmd, start_sim

CHROMIUM = os.environ.get("SLUICE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts" / "console"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists(),
    reason="chromium is installed by `make browser-deps` (part of `make test`)",
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProcessServer, Path]]:
    sim = start_sim("--ttft-ms", "5", "--itl-ms", "40")
    proxy = None
    try:
        tmp = tmp_path_factory.mktemp("console-browser")
        config = write_config(tmp / "config", sim.url, tmp / "records.sqlite")
        proxy = start_sluice(config)
        # Traffic for the live page, and rated requests for the A/B page.
        with httpx.Client(timeout=30) as client:
            for i in range(24):
                resp = client.post(
                    proxy.url + "/v1/chat/completions",
                    headers={"authorization": f"Bearer {APP_KEY}", "x-user-id": f"user-{i}"},
                    json={
                        "model": "chat",
                        "max_tokens": 3,
                        "stream": True,
                        "messages": [{"role": "user", "content": "Hi"}],
                    },
                )
                assert resp.status_code == 200, resp.text
                variant = resp.headers["x-sluice-variant"]
                score = 4.0 + (i % 3) * 0.5 if variant == "b" else 2.0 + (i % 4) * 0.5
                fb = client.post(
                    proxy.url + "/v1/feedback",
                    headers={"authorization": f"Bearer {APP_KEY}"},
                    json={"request_id": resp.headers["x-request-id"], "score": score},
                )
                assert fb.status_code in (200, 202, 204), fb.text
        yield proxy, config
    finally:
        if proxy is not None:
            proxy.stop()
        sim.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, stack):  # type: ignore[no-untyped-def]
    proxy, _ = stack
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.goto(proxy.url + "/console")
    pg.fill("#token", ADMIN_TOKEN)
    pg.click("#login")
    pg.wait_for_selector("#live-cards .card")
    yield pg
    context.close()


def _shot(pg, name: str) -> None:  # type: ignore[no-untyped-def]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_login_form_refuses_a_wrong_token_and_sets_a_strict_cookie(browser, stack) -> None:
    proxy, _ = stack
    context = browser.new_context()
    pg = context.new_page()
    pg.goto(proxy.url + "/console")
    pg.fill("#token", "wrong")
    pg.click("#login")
    assert pg.locator("#error").is_visible()
    pg.fill("#token", ADMIN_TOKEN)
    pg.click("#login")
    pg.wait_for_selector("nav")
    assert "token" not in pg.url and ADMIN_TOKEN not in pg.url
    (cookie,) = [c for c in context.cookies() if c["name"] == "sluice_console"]
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert pg.evaluate("document.cookie") == ""  # invisible to scripts
    context.close()


def test_live_page_shows_backends_and_route_latencies(page) -> None:
    page.wait_for_selector("#routes tbody tr")
    row = page.locator("#routes tbody tr", has_text="chat").first
    cells = row.locator("td").all_inner_texts()
    assert cells[0] == "chat" and int(cells[1]) >= 24
    assert cells[3].endswith("ms") and float(cells[3].split()[0]) > 0  # TTFT p50
    assert cells[6].endswith("ms")  # ITL p50
    backend = page.locator("#backends tbody tr").first.locator("td").all_inner_texts()
    assert backend[0] == "sim" and backend[2] == "yes"
    assert page.locator("#charts svg.chart path").count() >= 3
    _shot(page, "live")


def test_config_page_lists_the_served_version(page) -> None:
    page.click("a[data-tab=config]")
    page.wait_for_selector("#history tbody tr")
    serving = page.inner_text("#serving")
    assert len(serving) >= 12
    assert page.locator("#history tbody tr").first.locator("td").nth(2).inner_text() == "startup"
    assert "sha256:" not in page.content().replace("sha256:&lt;redacted&gt;", "")
    _shot(page, "config")


def test_ab_page_numbers_equal_the_cli_report(page, stack) -> None:
    _, config = stack
    # Records are flushed every 0.1 s; the CLI reads the same SQLite file.
    report = None
    for _ in range(50):
        out = subprocess.run(
            sluice_cmd("ab", "report", "temp-test", "--config", str(config), "--json"),
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode == 0:
            report = json.loads(out.stdout)
            if report["requests"] == 24:
                break
        page.wait_for_timeout(100)
    assert report is not None and report["requests"] == 24
    page.click("a[data-tab=ab]")
    page.wait_for_selector(".experiment[data-experiment=temp-test] tbody tr")
    box = page.locator(".experiment[data-experiment=temp-test]")
    for variant in report["variants"]:
        row = box.locator(f"tr[data-variant={variant['name']}]")
        assert int(row.locator("td.n").inner_text()) == variant["n"]
        if variant["score"] is not None:
            assert row.locator("td.mean-score").inner_text() == f"{variant['score']['mean']:.3f}"
    verdicts = box.locator(".verdict").all_inner_texts()
    assert len(verdicts) == len(report["comparisons"])
    for text, comparison in zip(verdicts, report["comparisons"], strict=True):
        assert comparison["verdict"] in text
        if comparison["test"] is not None:
            assert f"statistic {comparison['test']['statistic']:.3f}" in text
    _shot(page, "ab")


def test_playground_streams_tokens_incrementally_coloured_by_probability(page) -> None:
    page.click("a[data-tab=playground]")
    page.select_option("#play-route", "chat")
    page.fill("#play-max", "40")
    page.click("#play-send")
    # At 40 ms per token the stream lasts about 1.6 s: tokens must appear while it runs.
    page.wait_for_selector("#play-out.streaming .tok:nth-child(5)", timeout=10_000)
    seen_while_streaming = page.locator("#play-out .tok").count()
    assert page.locator("#play-out.streaming").count() == 1
    page.wait_for_selector("#play-out:not(.streaming)", timeout=20_000)
    total = page.locator("#play-out .tok").count()
    assert 5 <= seen_while_streaming < total
    probs = [
        float(p)
        for p in page.locator("#play-out .tok").evaluate_all("els => els.map(e => e.dataset.p)")
    ]
    assert all(0 < p <= 1 for p in probs)
    colours = set(
        page.locator("#play-out .tok").evaluate_all(
            "els => els.map(e => getComputedStyle(e).backgroundColor)"
        )
    )
    assert len(colours) > 1  # different probabilities, different colours
    sent = page.inner_text("#play-sent")
    assert "preset" in sent and "temperature" in sent
    assert "finish_reason: length" in page.inner_text("#play-end")
    page.locator("#play-out .tok").nth(2).hover()
    tip = page.locator("#play-tip")
    assert tip.is_visible() and tip.locator("tr").count() >= 2
    _shot(page, "playground")
