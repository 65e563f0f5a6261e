"""Helpers of tests/apps: real config directories built by the control plane, served by the
data plane on a loop thread (ProxyHarness) with the records writer and feedback attached."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from sluice.control.config.build import BuiltConfig, build_config
from sluice.control.config.loader import read_config_files
from sluice.control.runtime.plugins import Closer, attach_health, attach_records

from tests.fixtures import ProxyHarness, key_line

PRESETS = {
    "precise.yaml": "kind: Preset\ngeneration: {temperature: 0.3, max_new_tokens: 3}\n",
    "creative.yaml": "kind: Preset\ngeneration: {temperature: 0.9, max_new_tokens: 6}\n",
    "batchy.yaml": "kind: Preset\ngeneration: {temperature: 0.0, max_new_tokens: 2}\n",
}

# Plaintext keys live only in the tests; the config holds their digests (or env: names).
SUPPORT_KEY = "sk-test-support"
BATCH_KEY = "sk-test-batch"
ANALYTICS_KEY = "sk-test-analytics"


digest = key_line  # the Gateway document's line for an API key


def write_config(directory: Path, gateway: str, extra: Mapping[str, str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    files = {**PRESETS, "gateway.yaml": textwrap.dedent(gateway), **(extra or {})}
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def build(directory: Path, environ: Mapping[str, str] | None = None) -> BuiltConfig:
    return build_config(read_config_files(directory), environ=dict(environ or {}))


class AppsProxy:
    """ProxyHarness on a built config, with records (+ /v1/feedback) and health attached."""

    def __init__(self, built: BuiltConfig, *, health: bool = False) -> None:
        self.built = built
        self.harness = ProxyHarness(built.snapshot)
        self.url = self.harness.url
        self.records: Closer = attach_records(built, self.harness.app)
        self.health: Closer | None = None
        if health:
            self.health = self.harness.lt.call(lambda: attach_health(self.harness.app))

    def swap(self, built: BuiltConfig) -> None:
        self.harness.swap(built.snapshot)

    def close_records(self) -> None:
        self.harness.lt.run(self.records.aclose())

    def close(self) -> None:
        if self.health is not None:
            self.harness.lt.run(self.health.aclose())
        self.close_records()
        self.harness.close()


def chat(
    client: httpx.Client,
    url: str,
    key: str | None,
    *,
    model: str = "chat",
    stream: bool = True,
    headers: Mapping[str, str] | None = None,
    **body: Any,
) -> httpx.Response:
    """One completion; the whole (SSE) body is read."""
    sent = {"Authorization": f"Bearer {key}"} if key else {}
    sent.update(headers or {})
    payload = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "stream": stream}
    payload.update(body)
    return client.post(url + "/v1/chat/completions", json=payload, headers=sent)
