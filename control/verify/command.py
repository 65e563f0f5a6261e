"""`sluice verify --backend URL`: run every probe in order and print the report.

Order matters: the greedy direct stream comes first (the stop probe takes its string from
that text and the in-process sluice is configured with it), the keep-alive measurement runs
on a thread meanwhile, and the load runs last so nothing else shares the backend with it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
from sluice.control.errors import CliError

from .backend_probes import KeepAliveProbe, LoadPlan, disconnect_abort, overhead
from .client import ProbeClient
from .harness import InProcessSluice, build_verify_config, load_user_config, pool_idle_expiry
from .probes import Probes, pick_stop
from .report import Report


def run(args: argparse.Namespace) -> int:
    backend = str(args.backend).rstrip("/")
    if not backend.startswith("http://"):
        raise CliError(f"--backend must be http://host:port, got {args.backend!r}")
    if args.config is not None and not Path(args.config).is_dir():
        raise CliError(f"config directory {args.config} does not exist")
    plan = LoadPlan(concurrency=args.load_concurrency, requests=args.load_requests,
                    max_tokens=args.load_tokens, rounds=2)  # fmt: skip
    if min(plan.concurrency, plan.requests, plan.max_tokens) < 1:
        raise CliError("--load-concurrency, --load-requests and --load-tokens must be >= 1")
    if plan.concurrency > 256 or plan.requests > 1024 or plan.max_tokens > 512:
        raise CliError("verify's load is bounded: --load-concurrency <= 256, "
                       "--load-requests <= 1024, --load-tokens <= 512")  # fmt: skip
    client = ProbeClient()
    try:
        report = verify(client, backend, args.model, args.config, args.keepalive_window, plan)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot talk to {backend}: {type(exc).__name__}: {exc}") from None
    finally:
        client.close()
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.format())
    return 0 if report.ok else 1


def verify(
    client: ProbeClient,
    backend: str,
    model: str | None,
    config: str | None,
    keepalive_window: float,
    plan: LoadPlan,
) -> Report:
    model = model or _first_model(client, backend)
    report = Report(backend, model)
    keepalive = KeepAliveProbe(backend, keepalive_window)
    probes = Probes(client, backend, model)
    text = probes.direct_greedy_text()
    stop = pick_stop(text)
    built = build_verify_config(backend, model, stop or "\x00never\x00")
    expiry_from = load_user_config(Path(config), backend) if config else built
    proxy = InProcessSluice(built)
    try:
        probes.sluice = proxy.url
        for chat in (True, False):
            for stream in (True, False):
                report.checks.append(probes.equal(chat=chat, stream=stream))
        report.checks.append(probes.wire_shapes())
        report.checks.append(probes.errors())
        report.checks.append(probes.generation_fields())
        report.checks.append(probes.stop_strings(text, stop))
        report.checks.append(disconnect_abort(client, backend, proxy.url, model))
        report.checks.append(keepalive.result(pool_idle_expiry(expiry_from)))
        report.requests_sent = client.sent
        report.checks.append(overhead(backend, proxy, model, plan))
        report.load_requests = plan.total_requests
    finally:
        proxy.close()
    return report


def _first_model(client: ProbeClient, backend: str) -> str:
    answer = client.get(backend + "/v1/models")
    try:
        models = [m["id"] for m in answer.json()["data"]]
    except (ValueError, KeyError, TypeError):
        models = []
    if answer.status != 200 or not models:
        raise CliError(f"{backend}/v1/models answered {answer.status} without a model; "
                       "give --model")  # fmt: skip
    return str(models[0])
