"""Shared helpers of the control-plane tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sluice.control.config.build import BuiltConfig, ConfigInvalid, load_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "presets"
KEY_HASH = "sha256:" + "ab" * 32

GATEWAY = f"""\
kind: Gateway
backends:
  - {{name: vllm, urls: ["http://127.0.0.1:8100"]}}
routes:
  - {{model: chat, backend: vllm, preset: precise, policy: chat}}
apps:
  - {{name: bot, keys: ["{KEY_HASH}"]}}
"""
PRECISE = """\
kind: Preset
generation: {temperature: 0.3, top_p: 0.9, max_new_tokens: 512}
policy:
  temperature: {clamp: [0.0, 1.0]}
"""
CHAT = """\
kind: Policy
stop: ["\\n\\nUser:"]
"""
BASE = {"gateway.yaml": GATEWAY, "precise.yaml": PRECISE, "chat.yaml": CHAT}

Writer = Callable[..., Path]  # the config_dir fixture: write(files, base=True) -> directory


def issues_of(directory: Path, *, backend_override: str | None = None) -> list[str]:
    """The issue lines load_config raises for `directory` (fails if it loads)."""
    with pytest.raises(ConfigInvalid) as info:
        load_config(directory, backend_override=backend_override)
    return [str(issue) for issue in info.value.issues]


def built(directory: Path, *, backend_override: str | None = None) -> BuiltConfig:
    return load_config(directory, backend_override=backend_override)
