"""`sluice status`: a running proxy's /admin/status, printed for a person."""

from __future__ import annotations

import argparse
import datetime as dt
import os
from typing import Any

import httpx
from sluice.control.errors import CliError

TOKEN_ENV = "SLUICE_ADMIN_TOKEN"
TIMEOUT_S = 5.0


def run(args: argparse.Namespace) -> int:
    """One proxy (`sluice status`); `--all` is `replicas.run_all`, which uses this module."""
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        raise CliError(f"no admin token: pass --token or set {TOKEN_ENV}")
    print(format_status(args.url, fetch_status(args.url, token)))
    return 0


def fetch_status(url: str, token: str) -> dict[str, Any]:
    target = url.rstrip("/") + "/admin/status"
    try:
        resp = httpx.get(target, headers={"authorization": f"Bearer {token}"}, timeout=TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach {target}: {exc}") from None
    if resp.status_code != 200:
        raise CliError(f"{target} answered {resp.status_code}: {_error_message(resp)}")
    try:
        body = resp.json()
    except ValueError:
        body = None
    # Another server's 200 (a JSON object of its own) is not a sluice that is draining.
    if not isinstance(body, dict) or not {"ready", "pid", "config"} <= body.keys():
        raise CliError(f"{target} answered something other than sluice's status object")
    return body


def _error_message(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:200] or resp.reason_phrase


def format_status(url: str, s: dict[str, Any]) -> str:
    worker = f", worker {s['worker']}" if s.get("worker") is not None else ""
    state = "ready" if s.get("ready") else "DRAINING (not ready)"
    lines = [
        f"sluice at {url}: {state}; pid {s.get('pid')}{worker}, "
        f"up {_duration(s.get('uptime_s', 0))}, {s.get('active_streams', 0)} active streams",
    ]
    lines += _config_lines(s.get("config") or {})
    if not s.get("metrics", True) or not s.get("access_log", True):
        off = [name for name in ("metrics", "access_log") if not s.get(name, True)]
        lines.append(f"off:     {', '.join(off)}")
    backend_rows = [
        [
            b["name"],
            r["url"],
            _health(r),
            str(r["in_flight"]),
            f"{r['open_connections']}/{r['idle_connections']}",
        ]
        for b in s.get("backends") or []
        for r in b["replicas"]
    ]
    lines += _section(
        "backends", ["backend", "replica", "health", "in flight", "conns open/idle"], backend_rows
    )
    queue_rows = [
        [
            q["name"],
            f"{q['in_use']}/{q['limit']}",
            f"{q['queued']}/{q['max_queue']}",
            str(q["rejected"]),
        ]
        for q in s.get("queues") or []
    ]
    lines += _section("queues", ["limiter", "in use/limit", "queued/max", "rejected"], queue_rows)
    app_rows = [
        [
            a["name"] or "(no app)",
            str(a["requests"]),
            _statuses(a["by_status"]),
            str(a["tokens_in"]),
            str(a["tokens_out"]),
            "-" if a["in_flight"] is None else str(a["in_flight"]),
            "-" if a["queued"] is None else str(a["queued"]),
        ]
        for a in s.get("apps") or []
    ]
    lines += _section(
        "apps",
        ["app", "requests", "by status", "tokens in", "tokens out", "in flight", "queued"],
        app_rows,
    )
    if s.get("worker") is not None:
        lines.append(
            "\n(one worker's view: in flight and queued are this worker's own; the apps' "
            "requests and tokens cover every worker; run it again to reach another worker)"
        )
    return "\n".join(lines)


def _config_lines(c: dict[str, Any]) -> list[str]:
    lines = [f"config:  {c.get('version', '?')} from {c.get('source') or '?'}"]
    if "last_result" in c:
        counts = c.get("reloads") or {}
        at = c.get("last_reload_at")
        tally = ", ".join(f"{k} {v}" for k, v in counts.items())
        if at is None:
            lines.append("reload:  none since start")
        else:
            lines.append(f"reload:  last {c['last_result']} at {_clock(at)}; {tally}")
        if c.get("last_error"):
            lines.append("         last error:")
            lines += [f"           {line}" for line in str(c["last_error"]).splitlines()]
    return lines


def _section(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return ["", f"{title}: none"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = ["", f"{title}:"]
    for row in [header, *rows]:
        out.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    return [line.rstrip() for line in out]


def _health(replica: dict[str, Any]) -> str:
    if replica.get("ejected"):
        return "ejected"
    return "healthy" if replica.get("healthy") else "UNHEALTHY"


def _statuses(by_status: dict[str, int]) -> str:
    return " ".join(f"{code}:{n}" for code, n in sorted(by_status.items())) or "-"


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _clock(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
