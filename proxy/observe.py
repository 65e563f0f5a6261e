"""What happens once per request after it ends: metrics and the access log line."""

from __future__ import annotations

from typing import Any

import structlog

from .exchange import Exchange
from .metrics import Metrics
from .snapshot import SnapshotRef

_log = structlog.get_logger("sluice.access")


class Observer:
    """Turns each finished `Exchange` into metric updates and one structured log line."""

    def __init__(
        self, ref: SnapshotRef, metrics: Metrics | None = None, *, access_log: bool = True
    ) -> None:
        self.ref = ref
        self.metrics = metrics or Metrics()
        self.access_log = access_log
        self.extra_hooks: list[Any] = []
        self._config_version = ""

    def on_complete(self, ex: Exchange) -> None:
        self.metrics.observe(ex)
        if self.access_log:
            log_exchange(ex)

    def refresh_gauges(self, active_streams: int, queues: dict[str, int]) -> None:
        m = self.metrics
        m.active_streams.set(active_streams)
        for name, depth in queues.items():
            m.queue_depth.labels(name).set(depth)
        version = self.ref.current.version
        if version != self._config_version:
            if self._config_version:
                m.config_info.remove(self._config_version)
            m.config_info.labels(version).set(1)
            self._config_version = version


def log_exchange(ex: Exchange) -> None:
    ttft = ex.ttft
    _log.info(
        "request",
        request_id=ex.request_id,
        app=ex.app,
        route=ex.route,
        backend=ex.backend,
        preset=ex.preset,
        experiment=ex.experiment or None,
        variant=ex.variant or None,
        config_version=ex.config_version,
        status=ex.status,
        stream=ex.stream,
        ttft_ms=None if ttft is None else round(ttft * 1000, 1),
        tokens_in=ex.prompt_tokens,
        tokens_out=ex.output_tokens,
        finish_reason=ex.finish_reason,
        cut=ex.cut,
        timeout=ex.timeout,
        upstream_error=ex.upstream_error,
        error=ex.error_code,
        client_disconnected=ex.client_disconnected or None,
        queue_ms=round(ex.queue_wait * 1000, 1) if ex.queue_wait else None,
        duration_ms=round(ex.duration * 1000, 1),
    )
