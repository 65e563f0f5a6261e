"""Helpers of tests/console: a real `sluice serve` with a config directory, an admin token,
two apps, an experiment with records, in front of a real simulator."""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests.fixtures import ProcessServer, key_line, sluice_cmd

ADMIN_TOKEN = "console-test-admin-token"
APP_KEY = "sk-console-app"

PRESETS = {
    "precise.yaml": "kind: Preset\ngeneration: {temperature: 0.3, top_p: 0.9, max_new_tokens: 24}\n",
    "creative.yaml": "kind: Preset\ngeneration: {temperature: 0.9, max_new_tokens: 24}\n",
    "policies.yaml": textwrap.dedent(
        """\
        kind: Policy
        name: guarded
        stop: ["ZZQX"]
        cut_patterns: [{pattern: "never-said-[0-9]+", max_len: 24}]
        ---
        kind: Policy
        name: cutting
        stop: ["e"]
        """
    ),
}


def gateway(sim_url: str, records: Path) -> str:
    return textwrap.dedent(
        f"""\
        kind: Gateway
        listen: {{host: 127.0.0.1, port: 8000}}
        admin: {{token: env:SLUICE_ADMIN_TOKEN}}
        backends:
          - {{name: sim, urls: ["{sim_url}"], max_concurrency: 16}}
        routes:
          - {{model: chat, backend: sim, upstream_model: sim-model, preset: precise, policy: guarded}}
          - {{model: other, backend: sim, upstream_model: sim-model, preset: creative}}
          - {{model: cut, backend: sim, upstream_model: sim-model, preset: precise, policy: cutting}}
        apps:
          - {{name: web, keys: ["{key_line(APP_KEY)}"]}}
        experiments:
          - {{name: temp-test, route: chat, sticky: header:x-user-id,
             variants: [{{name: a, preset: precise, weight: 50}}, {{name: b, preset: creative, weight: 50}}]}}
        records: {{path: "{records}", flush_interval: 0.1s}}
        """
    )


def write_config(directory: Path, sim_url: str, records: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in {**PRESETS, "gateway.yaml": gateway(sim_url, records)}.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def start_sluice(config: Path, *extra: str) -> ProcessServer:
    return ProcessServer(
        sluice_cmd("serve", "--config", str(config), "--port", "0", *extra),
        env={"SLUICE_ADMIN_TOKEN": ADMIN_TOKEN},
    )
