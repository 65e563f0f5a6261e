"""An in-process sluice for `sluice verify`: the real data plane (ProxyApp + HttpServer) on
its own event loop thread, in front of the backend under test, with a generated config.

In-process so verify needs nothing but the backend, and so sluice's CPU is the serving
thread's own CPU time (`time.thread_time` read on that thread), apart from the load client
that runs on the caller's thread.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import orjson
import uvloop
from sluice.control.config.build import BuiltConfig, ConfigInvalid, load_config
from sluice.control.config.presets import MAPPING
from sluice.control.errors import CliError
from sluice.proxy.app import ProxyApp
from sluice.proxy.errors import server_error_body
from sluice.proxy.http import ServerState
from sluice.proxy.server import HttpServer
from sluice.proxy.snapshot import SnapshotRef

T = TypeVar("T")
BACKEND = "verify"
STOP_ROUTE = "verify-stop"
ALL_FIELDS_ROUTE = "verify-gc-all"
# One value per GenerationConfig field of the mapping table: each is sent alone on its own
# route, then all together. Small and valid for any model (token id 2 exists in every vocab
# of more than two tokens).
FIELD_VALUES: dict[str, Any] = {
    "max_new_tokens": 4,
    "min_new_tokens": 2,
    "do_sample": False,
    "temperature": 0.5,
    "top_p": 0.9,
    "top_k": 20,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "presence_penalty": 0.1,
    "frequency_penalty": 0.1,
    "num_return_sequences": 2,
    "seed": 7,
    "stop_strings": ["\n\n\n\n"],
    "stop_token_ids": [2],
}


def field_route(name: str) -> str:
    return "verify-gc-" + name.replace("_", "-")


def config_documents(backend_url: str, model: str, stop: str) -> dict[str, dict[str, Any]]:
    """File name -> document: a route per mapped field, one with all, one with a stop Policy,
    and `model` itself unchanged (the pass-through route the equality probes use)."""
    missing = [m.name for m in MAPPING if m.name not in FIELD_VALUES]
    if missing:  # a new row in the mapping table must get a probe value here
        raise CliError(f"verify has no probe value for GenerationConfig fields {missing}")
    routes: list[dict[str, Any]] = [{"model": model, "backend": BACKEND, "upstream_model": model}]
    docs: dict[str, dict[str, Any]] = {}
    for mapping in MAPPING:
        name = field_route(mapping.name)
        routes.append({"model": name, "backend": BACKEND, "upstream_model": model, "preset": name})
        docs[f"preset-{name}.yaml"] = {
            "kind": "Preset",
            "name": name,
            "generation": {mapping.name: FIELD_VALUES[mapping.name]},
        }
    docs["preset-all.yaml"] = {"kind": "Preset", "name": ALL_FIELDS_ROUTE, "generation": {
        k: v for k, v in FIELD_VALUES.items() if k != "do_sample"  # temperature is set
    }}  # fmt: skip
    routes.append(
        {"model": ALL_FIELDS_ROUTE, "backend": BACKEND, "upstream_model": model,
         "preset": ALL_FIELDS_ROUTE}
    )  # fmt: skip
    docs["policy.yaml"] = {"kind": "Policy", "name": STOP_ROUTE, "stop": [stop]}
    routes.append(
        {"model": STOP_ROUTE, "backend": BACKEND, "upstream_model": model, "policy": STOP_ROUTE}
    )
    docs["gateway.yaml"] = {
        "kind": "Gateway",
        "backends": [
            {"name": BACKEND, "urls": [backend_url], "max_concurrency": 512,
             "queue": {"max": 1024, "max_wait": "30s"}}
        ],
        "routes": routes,
    }  # fmt: skip
    return docs


def build_verify_config(backend_url: str, model: str, stop: str) -> BuiltConfig:
    """The generated config, through the same loader `sluice serve` uses (JSON is YAML)."""
    with tempfile.TemporaryDirectory(prefix="sluice-verify-") as tmp:
        for name, doc in config_documents(backend_url, model, stop).items():
            (Path(tmp) / name).write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        try:
            return load_config(Path(tmp))
        except ConfigInvalid as exc:
            raise CliError(f"verify's generated config is invalid:\n{exc}") from None


def load_user_config(directory: Path, backend_url: str) -> BuiltConfig:
    try:
        return load_config(directory, backend_override=backend_url)
    except ConfigInvalid as exc:
        raise CliError(f"invalid config {directory}:\n{exc}") from None


def pool_idle_expiry(built: BuiltConfig) -> float | None:
    """The seconds sluice keeps an idle upstream connection; None: this sluice has no
    expiry (connections stay until the backend closes them)."""
    values = [getattr(b, "idle_timeout", None) for b in built.snapshot.backends.values()]
    present = [float(v) for v in values if v is not None]
    return min(present) if present else None


class InProcessSluice:
    """sluice's data plane on a uvloop thread; `url` is where it listens."""

    def __init__(self, built: BuiltConfig) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.ref = SnapshotRef(built.snapshot)
        self.app = ProxyApp(self.ref, on_complete=[])
        self.server = HttpServer(
            ServerState(self.app, self.app.max_body_bytes, error_body=server_error_body)
        )
        port = self._run(self.server.listen("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{port}"

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()

        return self._run(wrapper())

    def cpu_seconds(self) -> float:
        """CPU time of the serving thread so far (sluice's own work, not the client's)."""
        return self.call(time.thread_time)

    def close(self) -> None:
        try:
            self._run(self.server.close(), timeout=10)
            self.call(self.app.pools.close)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
            self.loop.close()
