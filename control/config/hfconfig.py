"""`sluice preset import|export`: Hugging Face generation_config.json <-> preset.

Import keeps the fields of the mapping table, drops model metadata (token ids vLLM reads
from the model itself) and values that change nothing, each with a note on stderr, and
fails on anything else: a preset that silently lost `num_beams: 4` would not be what the
model card promised. Export writes the resolved preset (after `extends`) as JSON that
`GenerationConfig.from_pretrained` loads; the per-field policy has no place there.
Neither needs transformers installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from sluice.control.errors import CliError

from .build import ConfigInvalid, load_config
from .issues import display_path
from .loader import describe_error
from .presets import MAPPING, MAPPING_BY_NAME, METADATA_KEYS, UNSUPPORTED, preset_document_issues
from .schema import GenerationSection, PresetFile
from .values import NAME_RE

FILE_NAME = "generation_config.json"
# The GenerationConfig fields that only act when do_sample is true.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "typical_p")


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def _same(value: Any, neutral: Any) -> bool:
    # True == 1 in Python; a boolean is only neutral where the neutral value is one.
    return type(value) is type(neutral) or (
        not isinstance(value, bool) and not isinstance(neutral, bool) and value == neutral
    )


def read_generation_config(path: Path) -> tuple[dict[str, Any], Path]:
    file = path / FILE_NAME if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CliError(f"{display_path(file)}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"{display_path(file)}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise CliError(f"{display_path(file)}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise CliError(f"{display_path(file)}: expected a JSON object")
    return data, file


def generation_from_hf(data: dict[str, Any]) -> dict[str, Any]:
    """The preset's `generation` mapping for a generation_config.json object."""
    kept: dict[str, Any] = {}
    metadata: list[str] = []
    errors: list[str] = []
    for key, value in data.items():
        if key in METADATA_KEYS:
            metadata.append(key)
        elif value is None:
            continue  # null is GenerationConfig's "unset"
        elif key in MAPPING_BY_NAME:
            if key == "top_k" and value == 0:
                _note("dropped top_k: 0 (no top-k filtering is what omitting it means)")
            else:
                kept[key] = value
        elif key in UNSUPPORTED:
            entry = UNSUPPORTED[key]
            if any(value == n and _same(value, n) for n in entry.neutral):
                _note(f"dropped {key}: {json.dumps(value)} (no effect)")
            else:
                errors.append(f"{key}: {json.dumps(value)}: {entry.reason}")
        else:
            errors.append(f"{key}: not a GenerationConfig field sluice knows")
    if metadata:
        _note(f"dropped model metadata (vLLM reads it from the model): {', '.join(metadata)}")
    if kept.get("do_sample") is False and "temperature" in kept:
        # transformers ignores a temperature when do_sample is false; so does the preset.
        _note(f"dropped temperature: {kept.pop('temperature')} (no effect with do_sample: false)")
    try:
        GenerationSection.model_validate(kept)
    except ValidationError as exc:
        for err in exc.errors():
            errors.append(f"{err['loc'][0]}: {describe_error(err, GenerationSection)}")
    if errors:
        raise CliError("cannot import: " + "; ".join(errors))
    return {m.name: kept[m.name] for m in MAPPING if m.name in kept}


def _preset_name(args: argparse.Namespace, file: Path) -> str:
    if args.name is not None:
        candidate = str(args.name)
    else:
        source = file.parent if file.name == FILE_NAME else file.with_suffix("")
        candidate = source.resolve().name
    if not NAME_RE.fullmatch(candidate):
        raise CliError(f"{candidate!r} is not a valid preset name; pass --name NAME")
    return candidate


class _Dumper(yaml.SafeDumper):
    """Strings with line breaks as "a\\nb", as ops write stop strings, not folded blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = '"' if any(c in value for c in "\n\r\t") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def render_preset(name: str, generation: dict[str, Any], source: str) -> str:
    header = f"# Imported by `sluice preset import` from {source}.\n"
    document = {"kind": "Preset", "name": name, "generation": generation}
    text = header + yaml.dump(
        document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100
    )
    # The text must load as the preset it claims to be; a failure here is a bug of ours.
    model = PresetFile.model_validate(yaml.safe_load(text))
    assert not preset_document_issues(model), preset_document_issues(model)
    return text


def _write_new(path: Path, text: str) -> None:
    """Create `path` in one step: a watched config directory never sees half a file."""
    if path.exists():
        raise CliError(f"{display_path(path)} already exists; remove it or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def run_import(args: argparse.Namespace) -> int:
    data, file = read_generation_config(Path(args.path))
    name = _preset_name(args, file)
    text = render_preset(name, generation_from_hf(data), display_path(file))
    if args.out is None:
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    if out.is_dir():
        out = out / f"{name}.yaml"
    _write_new(out, text)
    print(f"wrote {display_path(out)} (preset {name})", file=sys.stderr)
    return 0


def transformers_view(data: dict[str, Any]) -> dict[str, Any]:
    """The preset as transformers must read it to sample the same way: `do_sample: true`
    when sampling fields are set (without it transformers decodes greedily and warns that
    they "may be ignored"); for greedy decoding (do_sample false, or temperature 0 as vLLM
    reads it) `do_sample: false` and no sampling fields, which would have no effect."""
    out = dict(data)
    if out.get("do_sample") is False or out.get("temperature") == 0:
        out["do_sample"] = False
        for field in SAMPLING_FIELDS:
            if field in out:
                _note(f"left out {field}: {out.pop(field)} (no effect with greedy decoding)")
    elif any(field in out for field in SAMPLING_FIELDS):
        out["do_sample"] = True
    return out


def run_export(args: argparse.Namespace) -> int:
    config = Path(args.config)
    try:
        built = load_config(config)
    except ConfigInvalid as exc:
        count = len(exc.issues)
        raise CliError(
            f"{display_path(config)} is not valid ({count} error{'s' if count != 1 else ''}): "
            f"run `sluice check {display_path(config)}`"
        ) from None
    preset = built.presets.get(args.name)
    if preset is None:
        known = ", ".join(sorted(built.presets)) or "none"
        raise CliError(f"unknown preset {args.name!r} (known: {known})")
    data = transformers_view(
        {k: list(v) if isinstance(v, tuple) else v for k, v in preset.generation.items()}
    )
    out = Path(args.dir) / FILE_NAME
    _write_new(out, json.dumps(data, indent=2, sort_keys=True) + "\n")
    if preset.policy:
        _note("the per-field policy (force, deny, clamp) has no place in " + FILE_NAME)
    print(f"wrote {display_path(out)} (preset {preset.name})", file=sys.stderr)
    return 0
