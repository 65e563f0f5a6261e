"""The console's pure parts: session signing, redaction, history diffs, live summaries."""

from __future__ import annotations

import hashlib

from sluice.control.console import session
from sluice.control.console.history import ConfigHistory, redact
from sluice.control.console.live import LiveSeries
from sluice.proxy.exchange import Exchange

KEY = hashlib.sha256(b"admin").digest()


def test_a_session_cookie_is_valid_until_it_expires_and_only_for_its_token() -> None:
    cookie = session.issue_cookie(KEY, now=1000.0)
    assert session.session_valid(KEY, cookie, now=1001.0)
    assert not session.session_valid(KEY, cookie, now=1000.0 + session.SESSION_SECONDS + 1)
    assert not session.session_valid(hashlib.sha256(b"rotated").digest(), cookie, now=1001.0)
    expires, _, mac = cookie.partition(".")
    assert not session.session_valid(KEY, f"{int(expires) + 1}.{mac}", now=1001.0)
    assert not session.session_valid(KEY, "garbage", now=1001.0)
    # A cookie is read as latin-1; compare_digest refuses non-ASCII str (was a 500).
    assert not session.session_valid(KEY, "123." + "\u00e9" * 64, now=1001.0)


def test_csrf_token_is_bound_to_the_session() -> None:
    a, b = session.issue_cookie(KEY, now=1.0), session.issue_cookie(KEY, now=2.0)
    token = session.csrf_token(KEY, a)
    assert session.csrf_valid(KEY, a, token)
    assert not session.csrf_valid(KEY, b, token)
    assert not session.csrf_valid(KEY, a, "")
    assert not session.csrf_valid(KEY, a, "\u00e9\u00e9")


def test_redact_hides_digests_literal_secrets_and_url_passwords_but_keeps_env_names() -> None:
    digest = "sha256:" + "ab" * 32
    text = (
        f'apps:\n  - {{name: web, keys: ["{digest}"]}}\n'
        "admin: {token: hunter2}\n"
        "edge: {cloudflare: {origin_secret: env:ORIGIN}}\n"
        "limits: {store: redis://user:pa55@127.0.0.1:6379/0}\n"
    )
    out = redact(text)
    assert "ab" * 32 not in out and "sha256:<redacted>" in out
    assert "hunter2" not in out and "token: <redacted>" in out
    assert "origin_secret: env:ORIGIN" in out
    assert "pa55" not in out and "redis://user:<redacted>@127.0.0.1" in out


def test_history_diffs_two_versions_file_by_file() -> None:
    history = ConfigHistory(max_versions=3)
    history.served("v1", "startup", {"a.yaml": b"x: 1\ny: 2\n"})
    history.served("v2", "file change", {"a.yaml": b"x: 1\ny: 3\n", "b.yaml": b"z: 0\n"})
    diff = history.diff("v1", "v2")
    assert diff is not None
    assert "-y: 2\n" in diff and "+y: 3\n" in diff and "+z: 0\n" in diff
    assert history.diff("v1", "nope") is None
    for n in range(3, 6):
        history.served(f"v{n}", "SIGHUP", {})
    assert [v.version for v in history.versions()] == ["v3", "v4", "v5"]


def _exchange(route: str, ttft: float, gaps: list[float], tokens: int) -> Exchange:
    ex = Exchange("r", 100.0)
    ex.route = route
    ex.status = 200
    ex.first_token_at = 100.0 + ttft
    for gap in gaps:
        ex.add_gap(gap)
    ex.content_chunks = tokens
    ex.ended_at = 101.0
    return ex


def test_live_summary_gives_per_route_percentiles_and_rates() -> None:
    live = LiveSeries()
    for i in range(10):
        live.on_complete(_exchange("chat", 0.01 * (i + 1), [0.02] * 5, 6))
    live.on_complete(_exchange("other", 0.5, [], 1))
    summary = live.summary(window=60.0)
    routes = {r["route"]: r for r in summary["routes"]}
    chat = routes["chat"]
    assert chat["requests"] == 10
    assert abs(chat["ttft"]["p50"] - 0.055) < 1e-9
    assert chat["itl"]["p50"] == 0.02  # the bucket holding every gap
    assert abs(chat["tokens_per_s"] - 60 / 60.0) < 1e-9
    assert routes["other"]["itl"] is None
    assert summary["requests"] == 11
