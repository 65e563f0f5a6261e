"""`sluice verify --backend URL`: run every probe in order and print the report.

Order matters: the greedy direct stream comes first (the stop probe takes its string from
that text and the in-process sluice is configured with it), the keep-alive measurement runs
on a thread meanwhile, and the load runs last so nothing else shares the backend with it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
from sluice.control.errors import CliError

from .backend_probes import KeepAliveProbe, LoadPlan, disconnect_abort, overhead
from .client import ProbeClient
from .harness import InProcessSluice, build_verify_config, load_user_config, pool_idle_expiry
from .probes import Probes, pick_stop
from .report import Check, Report

# The Policy's stop string when the greedy text was too short to pick one (the stop check
# then fails and says so): a string no model emits.
NO_STOP = "sluice-verify: no stop string"


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
    built = build_verify_config(backend, model, stop or NO_STOP)
    expiry_from = load_user_config(Path(config), backend) if config else built
    proxy = InProcessSluice(built)
    try:
        probes.sluice = proxy.url
        steps: list[tuple[str, Callable[[], Check]]] = [
            (f"{kind}_{mode}_equal", partial(probes.equal, chat=kind == "chat", stream=s))
            for kind in ("chat", "completions")
            for mode, s in (("stream", True), ("nonstream", False))
        ]
        steps += [
            ("wire_shapes", probes.wire_shapes),
            ("error_bodies", probes.errors),
            ("generation_config_fields", probes.generation_fields),
            ("stop_string_holdback", partial(probes.stop_strings, text, stop)),
            ("disconnect_aborts_backend",
             partial(disconnect_abort, client, backend, proxy.url, model)),
            ("keepalive_vs_pool_expiry",
             partial(keepalive.result, pool_idle_expiry(expiry_from))),
        ]  # fmt: skip
        for name, step in steps:
            report.checks.append(_guarded(name, step))
        report.requests_sent = client.sent
        report.checks.append(_guarded("overhead", partial(overhead, backend, proxy, model, plan)))
        report.load_requests = plan.total_requests
    finally:
        proxy.close()
    return report


def _guarded(name: str, step: Callable[[], Check]) -> Check:
    """A probe that broke on what the backend did (a dropped connection, a body that is not
    what vLLM sends) is a failed check with the reason, not a traceback."""
    try:
        return step()
    except (httpx.HTTPError, OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        return Check(name, problems=[f"the probe broke: {type(exc).__name__}: {exc}"[:300]])


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
