"""`sluice status --all`: every replica's config version and last reload, one line each,
and whether they agree.

The replicas are the URLs given, or the Gateway's `edge.nginx.replicas` (read from
--config). A replica's line is the view of whichever worker answers; its /metrics adds the
versions that any of its workers serves (`sluice_config_info`), so workers of one replica
that disagree show too. Exit status 0 when every replica answered and all serve one
version, else 1 (for deployment scripts).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sluice.control.config.build import ConfigInvalid, load_config
from sluice.control.errors import CliError

from . import status
from .status import TIMEOUT_S, TOKEN_ENV, fetch_status


@dataclass
class ReplicaState:
    url: str
    status: dict[str, Any] | None = None
    error: str = ""
    versions: list[str] = field(default_factory=list)  # served by any of its workers

    @property
    def version(self) -> str | None:
        if self.status is None:
            return None
        return str((self.status.get("config") or {}).get("version"))


def replica_urls(urls: list[str], config: str | None) -> list[str]:
    if urls:
        return urls
    directory = Path(config) if config else Path("presets")
    try:
        built = load_config(directory)
    except ConfigInvalid as exc:
        raise CliError(f"invalid config in {directory}, cannot list the replicas:\n{exc}") from None
    except OSError as exc:
        raise CliError(f"cannot read the config in {directory}: {exc}") from None
    gateway = built.gateway
    if gateway is None or gateway.edge is None or gateway.edge.nginx is None:
        raise CliError("no replica URLs given and the Gateway has no edge.nginx.replicas")
    return [f"http://{hostport}" for hostport in gateway.edge.nginx.replicas]


def collect(url: str, token: str) -> ReplicaState:
    state = ReplicaState(url.rstrip("/"))
    try:
        state.status = fetch_status(url, token)
    except CliError as exc:
        state.error = str(exc)
        return state
    try:
        resp = httpx.get(
            state.url + "/metrics",
            headers={"authorization": f"Bearer {token}"},
            timeout=TIMEOUT_S,
        )
        if resp.status_code == 200:
            state.versions = served_versions(resp.text)
    except httpx.HTTPError:
        pass  # the status line still says what one worker serves
    return state


def served_versions(metrics: str) -> list[str]:
    """The versions whose sluice_config_info is 1 (in multiprocess mode: any live worker)."""
    found = []
    for line in metrics.splitlines():
        if line.startswith('sluice_config_info{version="'):
            label, _, value = line.rpartition(" ")
            if float(value) >= 1:
                found.append(label.split('"')[1])
    return sorted(set(found))


def format_states(states: list[ReplicaState]) -> tuple[str, bool]:
    """The table and whether every replica answered and all agree."""
    lines = []
    for s in states:
        if s.status is None:
            lines.append(f"{s.url}  UNREACHABLE  {s.error}")
            continue
        c = s.status.get("config") or {}
        store = s.status.get("limit_store") or {}
        worker = s.status.get("worker")
        reload_ = c.get("last_result") or "none"
        if c.get("last_error"):
            reload_ += " (" + str(c["last_error"]).splitlines()[0][:80] + ")"
        mixed = f"  workers serve {', '.join(s.versions)}" if len(s.versions) > 1 else ""
        limits = store.get("store", "?") + ("" if store.get("up", True) else " DOWN (share)")
        lines.append(
            f"{s.url}  {'ready' if s.status.get('ready') else 'draining'}  "
            f"config {s.version}  last reload {reload_}  "
            f"pid {s.status.get('pid')}{'' if worker is None else f' worker {worker}'}  "
            f"limits {limits}{mixed}"
        )
    versions = {v for s in states for v in ([s.version] if s.version else []) + s.versions}
    answered = all(s.status is not None for s in states)
    agree = answered and len(versions) == 1
    if agree:
        lines.append(f"all {len(states)} replicas serve config {versions.pop()}")
    elif not answered:
        down = sum(s.status is None for s in states)
        lines.append(f"{down} of {len(states)} replicas did not answer")
    else:
        lines.append(
            f"replicas DISAGREE: {len(versions)} config versions ({', '.join(sorted(versions))})"
        )
    return "\n".join(lines), agree


def run_all(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        raise CliError(f"no admin token: pass --token or set {TOKEN_ENV}")
    urls = replica_urls(list(args.urls), args.config)
    text, agree = format_states([collect(url, token) for url in urls])
    print(text)
    return 0 if agree else 1


def run(args: argparse.Namespace) -> int:
    """`sluice status`: every replica with `--all`, else the one proxy."""
    if getattr(args, "urls", None) is not None:
        return run_all(args)
    return status.run(args)
