"""Services `sluice serve` wires around the ProxyApp, each with what to close on shutdown.

- `attach_records`: the per-request records (an `on_complete` hook feeding the SQLite
  writer thread) and `POST /v1/feedback`. The `records` section is read at start-up: a
  reload that changes it takes effect at the next restart. No Gateway document (the
  `--backend URL` pass-through) or `records.path: null`: no records and no feedback route.
- `attach_health`: the active health probes of the backends that set `health`; these
  follow reloads.
- `attach_load_scraper`: vLLM's load figures for replica choice by score; these follow
  reloads too.
- `attach_shared_index`: with `limits.store` (Redis), the prefix index shared by every
  worker and replica; each backend's `routing.shared_index` decides whether it uses it
  (read per request, so a reload that flips it applies at once). The store is read at
  start-up, like the limits' store.
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry
from sluice.control.ab.database import OPEN_ERRORS, records_location, redact
from sluice.control.ab.feedback import FEEDBACK_PATH, feedback_handler
from sluice.control.ab.records import RecordMetrics, RecordWriter
from sluice.control.config.build import BuiltConfig
from sluice.control.errors import CliError
from sluice.proxy.app import ProxyApp
from sluice.proxy.health import HealthMetrics, HealthProber
from sluice.proxy.loadscrape import LoadScraper
from sluice.proxy.sharedindex import SharedIndex

from .limits import store_url


class Closer(Protocol):
    async def aclose(self) -> None: ...


class _Nothing:
    async def aclose(self) -> None:
        return None


def attach_records(
    built: BuiltConfig, app: ProxyApp, *, registry: CollectorRegistry | None = None
) -> Closer:
    """Starts the records writer and routes /v1/feedback; close it after the drain so the
    last requests' records are written. Raises CliError when the database cannot be opened."""
    section = built.gateway.records if built.gateway is not None else None
    if section is None or (section.path is None and section.url is None):
        return _Nothing()
    location = records_location(section)
    assert location is not None
    try:
        writer = RecordWriter(
            location,
            batch_size=section.batch_size,
            flush_interval=section.flush_interval,
            max_buffer=section.max_buffer,
            metrics=RecordMetrics(registry),
        )
    except OPEN_ERRORS as exc:
        raise CliError(f"cannot open the records database {redact(location)}: {exc}") from None
    app.on_complete.append(writer.submit)
    app.extra_routes[FEEDBACK_PATH] = feedback_handler(
        app.ref, writer, recheck_after=section.flush_interval
    )
    return writer


def attach_health(app: ProxyApp, *, registry: CollectorRegistry | None = None) -> Closer:
    """Starts the health probes (call it with the event loop running)."""
    prober = HealthProber(app.ref, app.pools, HealthMetrics(registry))
    app.on_swap.append(prober.reconcile)  # probes follow a reload at the swap
    prober.start()
    return prober


def attach_load_scraper(app: ProxyApp) -> Closer:
    """Starts reading vLLM's /metrics on the replicas of backends that route by score (call
    it with the event loop running); these follow reloads."""
    scraper = LoadScraper(app.ref, app.pools)
    scraper.start()
    return scraper


def attach_shared_index(built: BuiltConfig, app: ProxyApp) -> Closer:
    """Shares the prefix index through the Redis of `limits.store` when one is set (call it
    with the event loop running). Raises CliError when an env:VAR store is unset."""
    url = store_url(built)
    if url is None:
        return _Nothing()
    shared = SharedIndex(url)
    shared.start()
    app.pools.router.shared = shared
    return shared


__all__ = [
    "Closer",
    "attach_health",
    "attach_load_scraper",
    "attach_records",
    "attach_shared_index",
]
