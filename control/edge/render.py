"""`sluice render nginx|cloudflare`: edge configs from the Gateway document.

Both renderers take the `BuiltConfig` of `load_config`, the code path that `serve` and
`check` run, so an edge config is only ever rendered from a config sluice would serve.
With `--out DIR` the files are replaced whole (write, then rename); without, they go to
stdout (several as `==> NAME <==` sections).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from sluice.control.config.build import BuiltConfig, ConfigInvalid, load_config
from sluice.control.config.gateway_schema import GatewayFile
from sluice.control.errors import CliError

from .cloudflare import render_cloudflare
from .nginx import render_nginx
from .templates import RenderedFiles, RenderError

RENDERERS = {"nginx": render_nginx, "cloudflare": render_cloudflare}


def _gateway(built: BuiltConfig, directory: Path) -> GatewayFile:
    if built.gateway is None:
        raise CliError(f"{directory}: no Gateway document, nothing to render")
    return built.gateway


def _write(directory: Path, files: Mapping[str, str]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        target = directory / name
        # Whole or not at all: a reloading nginx never reads half a file.
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        written.append(target)
    return written


def render(kind: str, built: BuiltConfig, gateway: GatewayFile) -> RenderedFiles:
    return RENDERERS[kind](built, gateway)


def run(args: argparse.Namespace) -> int:
    directory = Path(args.config)
    if not directory.is_dir():
        raise CliError(f"config directory {directory} does not exist")
    try:
        built = load_config(directory)
    except ConfigInvalid as exc:
        raise CliError(f"invalid config, nothing rendered:\n{exc}") from None
    try:
        rendered = render(args.target_kind, built, _gateway(built, directory))
    except RenderError as exc:
        raise CliError(str(exc)) from None
    # The config's own warnings, as `sluice check` prints them: some say what an edge in
    # front of several replicas breaks (resume, limits without a shared store).
    for issue in built.warnings:
        print(issue, file=sys.stderr)
    for warning in rendered.warnings:
        print(f"sluice render: warning: {warning}", file=sys.stderr)
    if args.out is None:
        several = len(rendered.files) > 1
        for name, text in rendered.files.items():
            if several:
                sys.stdout.write(f"==> {name} <==\n")
            sys.stdout.write(text)
        return 0
    for path in _write(Path(args.out), rendered.files):
        print(f"wrote {path}")
    return 0
