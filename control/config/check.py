"""`sluice check DIR` and `sluice config show`: the build, offline, for people and CI.

`check` exits 0 when the directory would load in `sluice serve` and 1 otherwise, printing
every issue as `file:line:column: path: message`. Warnings (a variable an `env:` secret
names is unset here, an unused backend) do not fail it, so CI can run it without the
production secrets.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sluice.proxy.snapshot import StreamTimeouts

from .build import BuiltConfig, ConfigInvalid, load_config
from .issues import ConfigIssue, display_path
from .presets import MAPPING, ResolvedPreset
from .schema import PolicyFile

COMMENT_COLUMN = 34
PLAIN_RE = re.compile(r"[A-Za-z][A-Za-z0-9._/-]*")
YAML_WORDS = frozenset({"true", "false", "null", "yes", "no", "on", "off", "y", "n"})


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def _print_all(issues: Iterable[ConfigIssue]) -> None:
    for issue in issues:
        print(issue)


def run_check(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    shown = display_path(directory)
    try:
        built = load_config(directory)
    except ConfigInvalid as exc:
        _print_all(exc.issues)
        _print_all(exc.warnings)
        summary = _plural(len(exc.issues), "error")
        if exc.warnings:
            summary += ", " + _plural(len(exc.warnings), "warning")
        print(f"FAILED {shown}: {summary}")
        return 1
    _print_all(built.warnings)
    print(f"OK {shown}: {_summary(built)}")
    return 0


def _summary(built: BuiltConfig) -> str:
    snap = built.snapshot
    parts = [
        f"version {snap.version}",
        _plural(len(built.presets), "preset"),
        _plural(len(built.policies), "policy", "policies"),
        _plural(len(snap.routes), "route"),
        _plural(len(snap.apps), "app"),
        _plural(len(snap.experiments), "experiment"),
    ]
    if built.warnings:
        parts.append(_plural(len(built.warnings), "warning"))
    return ", ".join(parts)


# --- config show ----------------------------------------------------------------------------


def _yaml(value: Any) -> str:
    """A value as YAML flow text (JSON is YAML; strings keep their escapes visible)."""
    if value is None:
        return "~"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        plain = PLAIN_RE.fullmatch(value) and value.lower() not in YAML_WORDS
        return value if plain else json.dumps(value)
    return str(value)


def _line(text: str, comment: str) -> str:
    return f"{text.ljust(COMMENT_COLUMN)}  # {comment}" if comment else text


def _mode(preset: ResolvedPreset, vllm: str) -> str:
    plan = preset.plan
    if vllm in plan.denied:
        return "deny"
    if vllm in plan.forced:
        return "force"
    if vllm in plan.clamps:
        low, high = plan.clamps[vllm]
        return f"clamp [{_yaml(low)}, {_yaml(high)}]"
    return "default"


def _show_preset(preset: ResolvedPreset) -> list[str]:
    lines = [f"  {preset.name}:"]
    if preset.description:
        lines.append(f"    description: {_yaml(preset.description)}")
    if len(preset.chain) > 1:
        lines.append(
            _line(f"    extends: {preset.chain[1]}", "chain: " + " <- ".join(preset.chain))
        )
    lines.append(_line("    generation:", "GenerationConfig -> vLLM request field, policy"))
    plan = preset.plan
    shown_vllm: set[str] = set()
    for mapping in MAPPING:
        name = mapping.name
        if name not in preset.generation and name not in preset.policy:
            continue
        value = preset.generation.get(name)
        sent = plan.forced.get(mapping.vllm, plan.defaults.get(mapping.vllm))
        if mapping.vllm in shown_vllm and value is None:
            continue  # a policy on do_sample/temperature already shown on the other row
        shown_vllm.add(mapping.vllm)
        target = mapping.vllm if sent is None else f"{mapping.vllm}: {_yaml(sent)}"
        if value is not None and mapping.to_vllm(value) is None:
            target = f"{mapping.vllm} (nothing sent)"
        comment = f"-> {target}, {_mode(preset, mapping.vllm)}"
        origin = preset.origins.get(name, preset.name)
        if origin != preset.name:
            comment += f" (from {origin})"
        lines.append(_line(f"      {name}: {_yaml(value)}", comment))
    return lines


def _timeouts_text(t: StreamTimeouts) -> str:
    """The deadlines in force (a policy's own, the Gateway's for the rest)."""
    parts = [
        f"{name}: " + ("none" if value is None else f"{value:g}s")
        for name, value in (
            ("first_token", t.first_token),
            ("inter_token", t.inter_token),
            ("total", t.total),
            ("response_head", t.response_head),
        )
    ]
    return "{" + ", ".join(parts) + "}"


def _show_policy(policy: PolicyFile, timeouts: StreamTimeouts) -> list[str]:
    lines = [f"  {policy.name}:"]
    if policy.description:
        lines.append(f"    description: {_yaml(policy.description)}")
    if policy.stop:
        lines.append(f"    stop: {_yaml(policy.stop)}")
    if policy.cut_patterns:
        cuts = [{"pattern": c.pattern, "max_len": c.max_len} for c in policy.cut_patterns]
        lines.append(f"    cut_patterns: {_yaml(cuts)}")
    if policy.repetition_guard is not None:
        guard = policy.repetition_guard
        lines.append(
            f"    repetition_guard: {_yaml({'ngram': guard.ngram, 'repeats': guard.repeats})}"
        )
    lines.append(f"    timeouts: {_timeouts_text(timeouts)}")
    return lines


def _show_routes(built: BuiltConfig) -> list[str]:
    lines = ["routes:"]
    for model, route in built.snapshot.routes.items():
        fields = {
            "backend": route.backend.name,
            "upstream_model": route.upstream_model,
            "preset": route.preset.name or None,
            "policy": route.policy.name or None,
        }
        if route.experiment is not None:
            variants = ", ".join(
                f"{v.name}={v.preset.name}:{v.weight}" for v in route.experiment.variants
            )
            fields["experiment"] = f"{route.experiment.name} ({variants})"
        if not route.policy.name:
            fields["timeouts"] = _timeouts_text(route.policy.timeouts)
        raw = ("experiment", "timeouts")
        text = ", ".join(f"{k}: {v if k in raw else _yaml(v)}" for k, v in fields.items())
        lines.append(f"  {_yaml(model)}: {{{text}}}")
    if built.snapshot.fallback_route is not None:
        lines.append(f"  '*': {{backend: {built.snapshot.fallback_route.backend.name}}}")
    return lines if len(lines) > 1 else ["routes: {}"]


def render_show(built: BuiltConfig) -> str:
    lines = [f"# {built.snapshot.source} (version {built.version})"]
    lines.append("presets:" if built.presets else "presets: {}")
    for name in sorted(built.presets):
        lines += _show_preset(built.presets[name])
    lines.append("policies:" if built.policies else "policies: {}")
    for name in sorted(built.policies):
        lines += _show_policy(built.policies[name], built.snapshot.policies[name].timeouts)
    lines += _show_routes(built)
    return "\n".join(lines) + "\n"


def run_show(args: argparse.Namespace) -> int:
    directory = Path(args.config)
    try:
        built = load_config(directory)
    except ConfigInvalid as exc:
        _print_all(exc.issues)
        print(f"FAILED {display_path(directory)}: {_plural(len(exc.issues), 'error')}")
        return 1
    for warning in built.warnings:
        print(warning, file=sys.stderr)
    print(render_show(built), end="")
    return 0
