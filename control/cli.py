"""The `sluice` command line.

Each subcommand's arguments are declared here, in one place, so `sluice --help` documents
the whole interface; the work is done by a function in the module that owns the concept,
imported lazily so `sluice check` does not import the server and `sluice sim` not the schema.
Errors the user can fix end in one line on stderr and exit status 1 (`CliError`).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Sequence

from .errors import CliError

DEFAULT_CONFIG_DIR = "presets"


def _add_sim(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("sim", help="run the built-in vLLM-compatible simulator (no GPU)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--ttft-ms", type=float, default=20.0, help="time to first token (default 20)")
    p.add_argument("--itl-ms", type=float, default=10.0, help="inter-token latency (default 10)")
    p.add_argument("--model", default="sim-model", help="served model name (default sim-model)")
    p.add_argument(
        "--max-tokens", type=int, default=64, help="tokens when the request sets no max_tokens"
    )
    p.add_argument(
        "--tokens-per-chunk", type=int, default=1, help="tokens merged into one SSE chunk"
    )
    p.add_argument(
        "--ignore-stop", action="store_true", help="do not honour `stop` (tests the proxy's)"
    )
    p.add_argument("--seed", type=int, default=0, help="base seed for the generated text")
    p.add_argument(
        "--drop-usage-chunk",
        action="store_true",
        help="never send the usage chunk (a drifting backend, to test `sluice verify`)",
    )
    p.add_argument(
        "--prefix-cache",
        type=int,
        default=0,
        metavar="BLOCKS",
        help="model vLLM's prefix cache: KV cache of BLOCKS 16-token blocks, LRU (default off)",
    )
    p.add_argument(
        "--prefill-ms-per-block",
        type=float,
        default=0.0,
        metavar="MS",
        help="prefill time of each uncached prompt block, serialized per replica (default 0)",
    )
    p.add_argument(
        "--keepalive-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="close keep-alive connections idle this long, like vLLM's server (5); default: 75",
    )
    p.add_argument(
        "--responses-store",
        action="store_true",
        help="keep /v1/responses answers for GET /v1/responses/{id} and previous_response_id, "
        "as vLLM with VLLM_ENABLE_RESPONSES_API_STORE=1 (in memory, per replica)",
    )
    p.set_defaults(target="sluice.control.runtime.simulator:run")


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the proxy")
    p.add_argument("--config", default=None, help="config directory (default ./presets)")
    p.add_argument("--backend", default=None, help="route every model to this backend URL")
    p.add_argument(
        "--no-unknown-paths",
        action="store_true",
        help="with --backend and no config: answer 404 for paths sluice does not know "
        "instead of relaying them (a Gateway says limits.forward_unknown_paths: false)",
    )
    p.add_argument("--host", default=None, help="listen address (default: Gateway or 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="listen port (default: Gateway or 8000)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (SO_REUSEPORT)")
    p.add_argument("--demo", action="store_true", help="also start the simulator; print a curl")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="json", choices=["json", "console"])
    p.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds in-flight streams get on SIGTERM"
    )
    p.add_argument(
        "--drain-grace",
        type=float,
        default=0.0,
        help="seconds to keep accepting after SIGTERM with /readyz at 503, so load balancers "
        "that poll readiness stop routing here before the listener closes (default 0)",
    )
    p.add_argument(
        "--no-metrics", action="store_true", help="no Prometheus metrics (and no /metrics)"
    )
    p.add_argument("--no-access-log", action="store_true", help="no log line per request")
    p.add_argument(
        "--max-connections",
        type=int,
        default=4096,
        help="open client connections per process; beyond them a new one gets 503 and is "
        "closed (default 4096; each also needs a backend connection and two descriptors)",
    )
    p.set_defaults(target="sluice.control.runtime.serve:run")


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="bounded streaming load generator")
    p.add_argument("--url", default=None, help="base URL to load (e.g. http://127.0.0.1:8000)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--model", default="sim-model")
    p.add_argument("--api-key", default=None)
    p.add_argument("--compare", action="store_true", help="sim vs nginx vs sluice, interleaved")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds with --compare")
    p.add_argument("--ttft-ms", type=float, default=20.0, help="simulator TTFT with --compare")
    p.add_argument("--itl-ms", type=float, default=10.0, help="simulator ITL with --compare")
    p.add_argument("--config", default=None, help="sluice config directory with --compare")
    p.add_argument(
        "--policy",
        action="store_true",
        help="with --compare: sluice enforces 4 stop strings, 2 cut patterns and timeouts; "
        "every target's requests carry the same stop list",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="wall-clock bound per run, s")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(target="sluice.control.bench.bench:run")
    _add_bench_routing(p.add_subparsers(dest="bench_command", required=False))


def _add_bench_routing(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "routing", help="TTFT of round-robin, least-outstanding and sluice's replica choice"
    )
    p.add_argument("--urls", default=None, help="comma-separated replica URLs (default: sims)")
    p.add_argument("--model", default="sim-model", help="model the replicas serve")
    p.add_argument("--replicas", type=int, default=4, help="simulated replicas (default 4)")
    p.add_argument("--tenants", type=int, default=40)
    p.add_argument("--system-chars", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=1200, help="per run (default 1200)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--ttft-ms", type=float, default=20.0, help="simulator TTFT before prefill")
    p.add_argument("--itl-ms", type=float, default=20.0)
    p.add_argument("--prefix-cache", type=int, default=1200, help="simulator KV blocks")
    p.add_argument("--prefill-ms-per-block", type=float, default=1.5)
    p.add_argument(
        "--workload", choices=("shared", "unique", "both"), default="both", help="default both"
    )
    p.add_argument(
        "--workers", default="", help="also run sluice's default with these worker counts: 2,4"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--shared-index-timeout",
        type=float,
        default=2.0,
        help="routing.shared_index_timeout of the shared-index runs, ms (default 2)",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="wall-clock bound per run, s")
    p.add_argument("--json", action="store_true")
    p.set_defaults(target="sluice.control.bench.routing:run")


def _add_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", help="validate a config directory (exit 0/1)")
    p.add_argument("dir", nargs="?", default=DEFAULT_CONFIG_DIR)
    p.set_defaults(target="sluice.control.config.check:run_check")


def _add_config(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("config", help="inspect a config directory")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print resolved presets and policies")
    show.add_argument("--config", default=DEFAULT_CONFIG_DIR)
    show.set_defaults(target="sluice.control.config.check:run_show")


def _add_preset(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("preset", help="import/export Hugging Face generation_config.json")
    psub = p.add_subparsers(dest="preset_command", required=True)
    imp = psub.add_parser("import", help="generation_config.json (or its directory) -> preset")
    imp.add_argument("path")
    imp.add_argument("--name", default=None, help="preset name (default: from the path)")
    imp.add_argument("--out", default=None, help="write the preset YAML here (default stdout)")
    imp.set_defaults(target="sluice.control.config.hfconfig:run_import")
    exp = psub.add_parser("export", help="preset -> DIR/generation_config.json")
    exp.add_argument("name")
    exp.add_argument("dir")
    exp.add_argument("--config", default=DEFAULT_CONFIG_DIR)
    exp.set_defaults(target="sluice.control.config.hfconfig:run_export")


def _add_render(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("render", help="render edge configs from the Gateway document")
    p.add_argument("target_kind", choices=["nginx", "cloudflare"])
    p.add_argument("--config", default=DEFAULT_CONFIG_DIR)
    p.add_argument("--out", default=None, help="output directory (default stdout)")
    p.set_defaults(target="sluice.control.edge.render:run")


def _add_key(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("key", help="API keys")
    ksub = p.add_subparsers(dest="key_command", required=True)
    new = ksub.add_parser("new", help="print a fresh key once, and the hash line to paste")
    new.add_argument("app")
    new.set_defaults(target="sluice.control.config.keys:run_new")


def _add_ab(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ab", help="A/B experiments")
    asub = p.add_subparsers(dest="ab_command", required=True)
    rep = asub.add_parser("report", help="per-variant statistics")
    rep.add_argument("experiment")
    rep.add_argument("--since", default=None, help="ISO time or age like 24h")
    rep.add_argument("--json", action="store_true")
    rep.add_argument(
        "--db",
        default=None,
        help="records database: a SQLite file or a postgresql:// URL (default from the config)",
    )
    rep.add_argument("--config", default=DEFAULT_CONFIG_DIR)
    rep.set_defaults(target="sluice.control.ab.report:run")


def _add_status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="print a running proxy's /admin/status")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--token", default=None, help="admin token (default $SLUICE_ADMIN_TOKEN)")
    p.add_argument(
        "--all",
        dest="urls",
        nargs="*",
        default=None,
        metavar="URL",
        help="one line per replica and whether they serve one config version; the replicas "
        "are the URLs given, else the Gateway's edge.nginx.replicas (--config)",
    )
    p.add_argument("--config", default=None, help="config directory for --all (default ./presets)")
    p.set_defaults(target="sluice.control.runtime.replicas:run")


def _add_verify(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "verify", help="probe a live backend: can sluice serve it correctly? (exit 0/1)"
    )
    p.add_argument("--backend", required=True, help="backend base URL, e.g. http://127.0.0.1:8100")
    p.add_argument("--model", default=None, help="model to probe (default: the first listed)")
    p.add_argument("--config", default=None, help="sluice config whose pool expiry to compare")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--keepalive-window", type=float, default=10.0,
        help="seconds to wait for the backend to close an idle connection (default 10)",
    )  # fmt: skip
    p.add_argument("--load-concurrency", type=int, default=16, help="overhead load streams")
    p.add_argument("--load-requests", type=int, default=64, help="requests per load run")
    p.add_argument("--load-tokens", type=int, default=32, help="max_tokens per load request")
    p.set_defaults(target="sluice.control.verify.command:run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluice", description="Edge proxy and config control plane for LLM serving."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_serve,
        _add_sim,
        _add_bench,
        _add_check,
        _add_config,
        _add_preset,
        _add_render,
        _add_key,
        _add_ab,
        _add_status,
        _add_verify,
    ):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        # serve reloads on SIGHUP: one that arrives while the server modules still import
        # must not end the process (start-up reads the current files anyway). A worker of
        # `--workers N` is born with it blocked (supervisor.py): ignored first, then
        # unblocked, one that came meanwhile is dropped rather than delivered.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    module_name, _, func_name = str(args.target).partition(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(args) or 0)
    except CliError as exc:
        print(f"sluice {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
