"""docs/CONFIG.md, generated: the schema's fields and defaults, the mapping table, and
`sluice check`'s output for ten typical mistakes, run for real.

A test regenerates the document and compares, so the reference cannot drift from the code.
Regenerate with `python -m sluice.control.config.reference --write docs/CONFIG.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .check import run_check
from .gateway_schema import GatewayFile
from .presets import UNSUPPORTED, mapping_table
from .schema import FieldPolicy, PolicyFile, PresetFile
from .values import TypeLabel

DEMO_KEY_HASH = "sha256:15b184c4c9b35a2f9a98a5d7c9120c45b6d2e759ed8bc2adc2ed744378a3e983"


# --- field tables ---------------------------------------------------------------------------


def _label(annotation: Any) -> str:
    """A type as docs name it: "number", "list of duration", "mapping (below)"."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        for meta in typing.get_args(annotation)[1:]:
            if isinstance(meta, TypeLabel):
                return meta.label
        return _label(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        text = " or ".join(_label(a) for a in args)
        return f"{text} or null" if len(args) < len(typing.get_args(annotation)) else text
    if origin is tuple:
        return f"list of {_label(typing.get_args(annotation)[0])}"
    if origin is dict:
        return f"mapping of {_label(typing.get_args(annotation)[1])}"
    if origin is typing.Literal:
        return " or ".join(str(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    names = {int: "integer", float: "number", str: "string", bool: "boolean"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _constraints(metadata: Sequence[Any]) -> str:
    ops = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "items >="))
    parts = [
        f"{op} {getattr(meta, attr)}"
        for meta in metadata
        for attr, op in ops
        if getattr(meta, attr, None) is not None
    ]
    return f", {', '.join(parts)}" if parts else ""


def _field_label(info: FieldInfo) -> str:
    # pydantic moves a field's own Annotated metadata into info.metadata.
    labels = [meta.label for meta in info.metadata if isinstance(meta, TypeLabel)]
    return (labels[0] if labels else _label(info.annotation)) + _constraints(info.metadata)


def _default(info: FieldInfo) -> str:
    extra = info.json_schema_extra
    if isinstance(extra, dict) and "doc_default" in extra:
        return str(extra["doc_default"])
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(below)"
    if value is None:
        return "null"
    if value == "":
        return '`""`'
    if value in ((), {}):
        return "`[]`" if value == () else "`{}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and _field_label(info).startswith("duration"):
        return f"`{value:g}s`"
    return f"`{value}`"


def _nested(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, directly or in a list, mapping or Optional."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        inner = _nested(arg)
        if inner is not None:
            return inner
    return None


def _tables(model: type[BaseModel], path: str, seen: dict[type[BaseModel], str]) -> list[str]:
    lines = [f"#### `{path}`" if path else "#### Top level", ""]
    doc = (model.__doc__ or "").strip()
    if doc and model.__module__.startswith("sluice.control") and not doc.startswith("`kind"):
        lines += [" ".join(doc.split()), ""]
    lines += ["| Field | Type | Default | Description |", "|---|---|---|---|"]
    children: list[tuple[type[BaseModel], str]] = []
    for name, info in model.model_fields.items():
        label = _field_label(info)
        child = _nested(info.annotation)
        if child is FieldPolicy:
            label = "mapping: generation field -> mode (below)"
        elif child is not None:
            suffix = "[]" if label.startswith("list of") else ""
            child_path = f"{path}.{name}{suffix}" if path else f"{name}{suffix}"
            if child in seen:
                label += f" (as `{seen[child]}`)"
            else:
                seen[child] = child_path
                children.append((child, child_path))
        # Markdown would take `<hex>` for an HTML tag and hide it.
        description = (info.description or "").replace("|", "\\|").replace("<", "&lt;")
        lines.append(f"| `{name}` | {label} | {_default(info)} | {description} |")
    lines.append("")
    for child, child_path in children:
        lines += _tables(child, child_path, seen)
    return lines


def _kind_section(model: type[BaseModel]) -> list[str]:
    kind = typing.get_args(model.model_fields["kind"].annotation)[0]
    doc = " ".join((model.__doc__ or "").split())
    lines = [f"## kind: {kind}", "", doc, ""]
    return lines + _tables(model, "", {})


# --- ten typical mistakes -------------------------------------------------------------------

BASE_FILES = {
    "gateway.yaml": f"""\
kind: Gateway
backends:
  - {{name: vllm, urls: ["http://127.0.0.1:8100"]}}
routes:
  - {{model: chat, backend: vllm, preset: precise, policy: chat}}
apps:
  - {{name: support-bot, keys: ["{DEMO_KEY_HASH}"]}}
""",
    "precise.yaml": """\
kind: Preset
generation: {temperature: 0.3, top_p: 0.9, max_new_tokens: 512}
policy:
  temperature: {clamp: [0.0, 1.0]}
""",
    "chat.yaml": """\
kind: Policy
stop: ["\\n\\nUser:"]
""",
}

# (title, files that replace or join the base files, a sentence on the fix)
MISTAKES: tuple[tuple[str, dict[str, str], str], ...] = (
    (
        "A typo in a key",
        {"precise.yaml": "kind: Preset\ngeneration:\n  temprature: 0.3\n"},
        "Unknown keys are errors, never ignored; the nearest known key is suggested.",
    ),
    (
        "A string where a number goes",
        {"precise.yaml": 'kind: Preset\ngeneration:\n  temperature: "0.3"\n'},
        "Quoted numbers are strings: sluice does not guess.",
    ),
    (
        "clamp with min > max",
        {
            "precise.yaml": "kind: Preset\ngeneration: {temperature: 0.3}\n"
            "policy:\n  temperature: {clamp: [2.0, 1.0]}\n"
        },
        "A clamp is [min, max]; null leaves a side open.",
    ),
    (
        "An unknown parent preset",
        {"creative.yaml": "kind: Preset\nextends: precis\ngeneration: {temperature: 0.9}\n"},
        "`extends` must name a preset in the directory.",
    ),
    (
        "A cycle of extends",
        {
            "creative.yaml": "kind: Preset\nextends: playful\n",
            "playful.yaml": "kind: Preset\nextends: creative\n",
        },
        "The cycle is reported once, at the first preset in it.",
    ),
    (
        "An unknown policy in a route",
        {
            "gateway.yaml": BASE_FILES["gateway.yaml"].replace(
                "policy: chat}", "policy: chat-transcript}"
            )
        },
        "Every reference (backend, preset, policy, route) is checked before anything serves.",
    ),
    (
        "The same name twice",
        {"tuned.yaml": "kind: Preset\nname: precise\ngeneration: {temperature: 0.2}\n"},
        "Names are unique per kind across all files; the message points at both places.",
    ),
    (
        "Tab-indented YAML",
        {"precise.yaml": "kind: Preset\ngeneration:\n\ttemperature: 0.3\n"},
        "YAML indents with spaces only (the line above starts with a tab).",
    ),
    (
        "An empty file",
        {"draft.yaml": ""},
        "Every *.yaml file in the directory is read; an empty one is a mistake, not a no-op.",
    ),
    (
        "A plaintext secret",
        {"gateway.yaml": BASE_FILES["gateway.yaml"].replace(DEMO_KEY_HASH, "sk-live-4f9a2c7d1e8b")},
        "Keys and tokens are `sha256:<hex>` of the key or `env:VAR`; the value is never echoed.",
    ),
)


def check_output(files: dict[str, str]) -> str:
    """What `sluice check presets` prints for the base files changed by `files`."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "presets"
        directory.mkdir()
        for name, text in {**BASE_FILES, **files}.items():
            (directory / name).write_text(text, encoding="utf-8")
        out = io.StringIO()
        with contextlib.chdir(tmp), contextlib.redirect_stdout(out):
            run_check(argparse.Namespace(dir="presets"))
        return out.getvalue()


def _fence(text: str, lang: str = "") -> list[str]:
    return [f"```{lang}", text.rstrip("\n"), "```", ""]


def _mistakes_section() -> list[str]:
    lines = [
        "## Ten typical mistakes",
        "",
        "Each example starts from this directory, which `sluice check presets` accepts:",
        "",
    ]
    for name, text in BASE_FILES.items():
        lines += [f"`presets/{name}`:", "", *_fence(text, "yaml")]
    for number, (title, files, note) in enumerate(MISTAKES, start=1):
        lines += [f"### {number}. {title}", "", note, ""]
        for name, text in files.items():
            lines += [f"`presets/{name}`:", "", *_fence(text or "", "yaml")]
        lines += _fence("$ sluice check presets\n" + check_output(files), "console")
    return lines


# --- the document ---------------------------------------------------------------------------

INTRO = """\
# Config reference

<!-- Generated by `python -m sluice.control.config.reference --write docs/CONFIG.md`; a test
     fails when this file differs from what the code generates. Edit control/ instead. -->

Sluice reads every `*.yaml` file directly in its config directory (default `presets/`,
`sluice serve --config DIR`). A file holds one or more YAML documents separated by `---`,
each with a `kind`: `Preset`, `Policy` or `Gateway`. Files named `.*` are ignored, and so
are `*.yml` files (with a warning).

- Unknown keys and wrong types are errors. `sluice check DIR` prints every error at once,
  as `file:line:column: field.path: message`, and exits 1; warnings do not fail it.
- A running `sluice serve` reloads on every change; an edit that does not validate is
  not applied, and the previous config keeps serving (see `GET /admin/config`).
- Names (presets, policies, backends, apps, experiments, variants) are 1-64 letters,
  digits, `.`, `_` or `-`, starting with a letter or digit; route model names may also
  hold `/` and `:`.
- Durations are seconds as a number, or a string with a unit: `250ms`, `5s`, `2m`, `1h`.
- Integers fit in 64 bits and numbers are finite (`.inf` and `.nan` are errors),
  durations and forced request-field values included: what a JSON request to vLLM can
  carry.
- Secrets (app keys, the admin token, the origin secret) are never written in a file:
  `sha256:<64 hex digits>` of the secret, or `env:VAR` to read it from the environment
  (an unset variable is a warning). `sluice key new APP` prints a fresh key and its line.
- `sluice config show` prints the presets after `extends`, with the vLLM fields they send.
"""

POLICY_MODES = """\
### Per-field policy

`policy:` maps a generation field to what a request may do with it:

| Mode | Written | A request that sets the field |
|---|---|---|
| default | `default` (or no entry) | overrides the preset's value |
| force | `force` | gets the preset's value instead (set here or in a parent) |
| deny | `deny` | is rejected with 400 naming the field |
| clamp | `{clamp: [min, max]}` | is clamped (`null`: an open side); numeric fields only |

The preset's own value must lie inside its clamp. With `extends`, a child's value and
policy replace the parent's field by field; `do_sample` and `temperature` both govern
vLLM's `temperature`, and the one set nearer the child wins. The policy of
`max_new_tokens` also governs chat's `max_completion_tokens` (vLLM reads that name in
chat requests only). A clamp on `max_new_tokens` also bounds a request that sets no
limit, or `null`: it is sent the clamp's maximum, since vLLM's own limit is the whole
context. A clamp on any other field bounds only what a request sends.

vLLM's beam search (the request field `use_beam_search`) builds its parameters from `n`,
`max_tokens`, `temperature`, `ignore_eos` and `length_penalty` alone. Under a preset that
sets any other field (`stop_strings` and `top_k` included), a request that asks for it
is refused with 400 `field_denied`, since it would undo the preset.
"""


def _unsupported_list() -> list[str]:
    lines = ["Fields of GenerationConfig that vLLM cannot honour are errors:", ""]
    lines += [f"- `{name}`: {entry.reason}" for name, entry in sorted(UNSUPPORTED.items())]
    lines += [
        "",
        "`sluice preset import` drops model metadata (`bos_token_id`, `eos_token_id`,",
        "`pad_token_id`, `decoder_start_token_id`, `transformers_version`,",
        "`_from_model_config`) and values of these fields that change nothing (such as",
        "`num_beams: 1`) with a note, and fails on anything else.",
        "",
    ]
    return lines


def render_reference() -> str:
    lines = [INTRO]
    lines += _kind_section(PresetFile)
    lines += [POLICY_MODES, "### Mapping to vLLM", "", mapping_table(), ""]
    lines += _unsupported_list()
    lines += _kind_section(PolicyFile)
    lines += _kind_section(GatewayFile)
    lines += _mistakes_section()
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    text = render_reference()
    if args[:1] == ["--write"] and len(args) == 2:
        Path(args[1]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
