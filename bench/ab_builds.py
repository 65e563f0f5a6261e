"""Two builds of sluice behind one backend, measured in interleaved rounds (issue 19's A/Bs).

    git worktree add /tmp/base <commit> && make -C /tmp/base link-tree
    .venv/bin/python -m bench.ab_builds --base /tmp/base/build/typecheck \\
        [--new PATH] [--backend URL] [--ttft-ms 20] [--itl-ms 10] \\
        [--concurrency 256] [--requests 1024] [--max-tokens 64] [--rounds 6] [--model M] \\
        [--policy]

Starts the simulator (or uses `--backend`, a real vLLM say) and two `sluice serve
--backend` processes: "base" imports sluice from `--base` (a tree holding the `sluice`
package, such as a checkout's `build/typecheck` link tree, or a folder a wheel was installed
into) and "new" from `--new` (default: the sluice this Python imports). Both get one
warm-up, then the same bounded load in each round, the order alternating, and the report
gives each one's median CPU per token (user + system of the process, /proc, as `sluice
bench --compare` counts it), every round's value, TTFT p50 and tok/s. Each pair of figures
comes from one run: on a shared machine the absolute values move between runs, the pair
does not. `--policy`: both serve `sluice bench --policy`'s config (its guard and timeouts)
and the load sends its stop strings, as `sluice bench --compare --policy` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path

from sluice.control.bench.processes import (
    POLICY_STOP,
    SERVE_READY,
    Child,
    sluice_argv,
    write_policy_config,
)

from bench.rounds import (
    Round,
    add_backend_options,
    add_load_options,
    interleaved,
    load_spec,
    start_sim,
    summary,
)


def _serve(
    name: str, pythonpath: str | None, backend: str, workdir: Path, config: Path | None
) -> Child:
    saved = os.environ.get("PYTHONPATH")
    if pythonpath is not None:  # Child passes this process's environment on
        os.environ["PYTHONPATH"] = pythonpath
    try:
        argv = sluice_argv("serve", "--host", "127.0.0.1", "--port", "0", "--backend", backend)
        if config is not None:
            argv += ["--config", str(config)]
        return Child(name, argv, workdir)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def run(args: argparse.Namespace) -> dict[str, list[Round]]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        children: list[Child] = []
        try:
            backend = args.backend or start_sim(workdir, children, args.ttft_ms, args.itl_ms)
            config = write_policy_config(workdir, args.model) if args.policy else None
            targets = {}
            for name, path in (("base", args.base), ("new", args.new)):
                child = _serve(name, path, backend, workdir, config)
                children.append(child)
                targets[name] = (child.wait_line(SERVE_READY), child.pid)
            spec = load_spec(args, backend)
            if args.policy:
                spec = dataclasses.replace(spec, stop=POLICY_STOP)
            runs = interleaved(targets, spec, args.rounds)
        finally:
            for child in reversed(children):
                child.stop()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="PYTHONPATH holding the base sluice")
    parser.add_argument("--new", default=None, help="PYTHONPATH of the new one (default: ours)")
    parser.add_argument("--policy", action="store_true", help="sluice bench --policy's guard")
    add_backend_options(parser)
    add_load_options(parser, rounds=6)
    runs = run(parser.parse_args())
    for name, rounds in runs.items():
        print(f"{name}: {summary(rounds)}")


if __name__ == "__main__":
    main()
