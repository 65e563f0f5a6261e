"""`sluice sim`: the simulator (`sluice.sim`) as a process, until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop
from sluice.control.errors import CliError
from sluice.sim import SimConfig, start_sim


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """The CLI's flags; options the parser may not declare keep their SimConfig default."""
    defaults = SimConfig()
    try:
        return SimConfig(
            host=args.host,
            port=args.port,
            ttft_ms=args.ttft_ms,
            itl_ms=args.itl_ms,
            model=args.model,
            max_tokens=args.max_tokens,
            tokens_per_chunk=args.tokens_per_chunk,
            ignore_stop=args.ignore_stop,
            seed=args.seed,
            max_model_len=getattr(args, "max_model_len", None) or defaults.max_model_len,
            api_key=getattr(args, "api_key", None),
            drop_usage_chunk=getattr(args, "drop_usage_chunk", False),
            prefix_cache_blocks=getattr(args, "prefix_cache", None) or 0,
            prefill_ms_per_block=getattr(args, "prefill_ms_per_block", None) or 0.0,
            keepalive_timeout_s=getattr(args, "keepalive_timeout", None),
            responses_store=getattr(args, "responses_store", False),
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None


async def serve(config: SimConfig) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        server = await start_sim(config)
    except OSError as exc:
        raise CliError(f"cannot listen on {config.host}:{config.port}: {exc}") from None
    print(f"sluice sim listening on {server.url} model={config.model}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.close()
    return 0


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(config))
