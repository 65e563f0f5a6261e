"""`sluice serve`: load the config, run the data plane, reload, drain on SIGTERM.

With `--workers N` the supervisor (`supervisor.py`) starts N worker processes that share
the listening port through SO_REUSEPORT; each worker watches the config directory and
reloads itself (the `x-sluice-config` header shows that they agree).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import uvloop
from sluice.control.config.build import BuiltConfig, ConfigInvalid, build_config, passthrough_config
from sluice.control.config.issues import display_path
from sluice.control.config.loader import ConfigFiles, read_config_files
from sluice.control.errors import CliError
from sluice.proxy.app import ProxyApp
from sluice.proxy.budget import return_large_allocations_to_os
from sluice.proxy.build import build_kind
from sluice.proxy.errors import server_error_body
from sluice.proxy.http import DEFAULT_MAX_CONNECTIONS, ServerState
from sluice.proxy.metrics import Metrics
from sluice.proxy.observe import GAUGE_INTERVAL_S, Observer
from sluice.proxy.resume_redis import RedisStreamStore
from sluice.proxy.server import HttpServer
from sluice.proxy.snapshot import SnapshotRef
from sluice.proxy.timeouts import SHUTDOWN
from sluice.proxy.websocket import WebSocketUpgrade

from . import lastgood
from .admin import admin_routes, status_body
from .caveats import log_startup_caveats, worker_reload_caveats
from .console import attach_console
from .limits import start_limit_store, start_stream_store, store_url
from .logs import access_lines, configure_logging
from .plugins import attach_health, attach_load_scraper, attach_records, attach_shared_index
from .reloader import ConfigReloader, ReloadResult
from .saltkey import load_or_create_key
from .supervisor import (
    RESTARTED_ENV,
    SUPERVISOR_WATCH_S,
    WORKER_ENV,
    die_with_supervisor,
    report_serving,
    report_start_failure,
    supervise,
    supervisor_gone,
)

DEMO_SIM_PORT = 8100
# Longest a reload thread waits for the event loop to run the swap (a loop that busy is
# stopping anyway).
SWAP_WAIT_S = 5.0
# The collector's young-generation threshold under load (see where it is set).
GC_YOUNG_THRESHOLD = 50_000


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


@dataclass(frozen=True)
class ServeOptions:
    config_dir: Path | None
    backend: str | None
    host: str | None
    port: int | None
    workers: int
    drain_timeout: float
    log_level: str
    log_format: str
    drain_grace: float = 0.0
    metrics: bool = True
    access_log: bool = True
    forward_unknown_paths: bool = True
    max_connections: int = DEFAULT_MAX_CONNECTIONS


def _options(args: argparse.Namespace) -> ServeOptions:
    config_dir: Path | None
    if args.config is not None:
        config_dir = Path(args.config)
        if not config_dir.is_dir():
            raise CliError(f"config directory {config_dir} does not exist")
    elif args.backend is not None:
        config_dir = None
    else:
        config_dir = default_config_dir()
    if args.workers < 1:
        raise CliError("--workers must be at least 1")
    if args.drain_timeout < 0 or args.drain_grace < 0:
        raise CliError("--drain-timeout and --drain-grace must not be negative")
    if args.max_connections < 1:
        raise CliError("--max-connections must be at least 1")
    return ServeOptions(
        config_dir=config_dir,
        backend=args.backend,
        host=args.host,
        port=args.port,
        workers=args.workers,
        drain_timeout=args.drain_timeout,
        log_level=args.log_level,
        log_format=args.log_format,
        drain_grace=args.drain_grace,
        metrics=not args.no_metrics,
        access_log=not args.no_access_log,
        forward_unknown_paths=not getattr(args, "no_unknown_paths", False),
        max_connections=args.max_connections,
    )


def default_config_dir() -> Path:
    """./presets when it exists, else the example config shipped in the package."""
    local = Path("presets")
    if local.is_dir():
        return local
    spec = importlib.util.find_spec("sluice.examples")
    if spec is None or not spec.submodule_search_locations:
        raise CliError("no ./presets directory and no packaged example config; use --config")
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class Loaded:
    """The config a process starts with."""

    built: BuiltConfig
    # A worker the supervisor started again: `built` is what the first workers started
    # from; serve() then applies its siblings' last config and the directory as reloads.
    restarted: bool = False


def load(options: ServeOptions) -> Loaded:
    if options.config_dir is None:
        assert options.backend is not None
        try:
            return Loaded(
                passthrough_config(
                    options.backend, forward_unknown_paths=options.forward_unknown_paths
                )
            )
        except ConfigInvalid as exc:
            raise CliError(f"invalid config, not starting:\n{exc}") from None
    state = lastgood.state_dir() if os.environ.get(WORKER_ENV) is not None else None
    if state is not None and os.environ.get(RESTARTED_ENV, "0") != "0":
        started = _build_saved(state / lastgood.STARTED, options.config_dir, options.backend)
        if started is not None:
            return Loaded(started, restarted=True)
    try:
        files = read_config_files(options.config_dir)
        built = build_config(files, backend_override=options.backend)
    except ConfigInvalid as exc:
        raise CliError(f"invalid config, not starting:\n{exc}") from None
    if state is not None:  # one of the first workers
        if not (state / lastgood.STARTED).exists():
            lastgood.save(state / lastgood.STARTED, files)
        lastgood.save(state / lastgood.LAST_GOOD, files)
    return Loaded(built)


def _build_saved(path: Path, directory: Path, backend: str | None) -> BuiltConfig | None:
    """The config saved in `path` (lastgood.py), when there is one and it builds."""
    files = lastgood.load(path, directory, display_path(directory))
    if files is None:
        return None
    try:
        return build_config(files, backend_override=backend)
    except ConfigInvalid:
        return None


def _catch_up(reloader: ConfigReloader, state: Path, directory: Path, log: Any) -> None:
    """A worker started again from the first workers' start-up config: applies the last
    config its siblings applied, then the directory, each as a reload (its checks, its
    errors, its `restart_required`), so it serves and reports what they do."""
    siblings = lastgood.load(state / lastgood.LAST_GOOD, directory, display_path(directory))
    if siblings is not None:
        reloader.reload_now(siblings, trigger="start-up: the other workers' config")
    result = reloader.reload_now(trigger="start-up")
    log.info(
        "worker_caught_up",
        version=result.version,
        directory=result.result,
        errors=list(result.errors),
    )


def run(args: argparse.Namespace) -> int:
    # A reload request during start-up must not kill the process (cli.main ignores SIGHUP
    # before importing this module; so it stays until the loop's handler exists). Workers
    # inherit the ignore across exec.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    options = _options(args)
    configure_logging(options.log_level, options.log_format)
    watch_supervisor = False
    if os.environ.get(WORKER_ENV) is not None:
        watch_supervisor = not die_with_supervisor()
        if supervisor_gone():  # it died before the kernel was asked: no signal comes
            structlog.get_logger("sluice").warning("supervisor_gone", pid=os.getpid())
            return 1
    demo = None
    if args.demo:
        demo = _start_demo_sim()
    try:
        loaded = load(options)
        built = loaded.built
        if built.warnings and os.environ.get(WORKER_ENV) is None:  # once, not per worker
            warnings = [str(w) for w in built.warnings]
            structlog.get_logger("sluice").warning("config_warnings", warnings=warnings)
        if options.workers > 1 and os.environ.get(WORKER_ENV) is None:
            log_startup_caveats(built)
            host = options.host or built.snapshot.listen_host
            port = options.port if options.port is not None else built.snapshot.listen_port
            return supervise(
                options.workers,
                host,
                port,
                metrics=options.metrics,
                permit_server=store_url(built) is None,
            )
        return uvloop.run(
            serve(options, loaded, demo=demo is not None, watch_supervisor=watch_supervisor)
        )
    except CliError as exc:
        if report_start_failure(str(exc)):
            return 1  # the supervisor prints it, once for all the workers
        raise
    finally:
        if demo is not None:
            demo.terminate()
            demo.wait(timeout=10)


def _saver(path: Path) -> Callable[[str, ReloadResult, ConfigFiles | None], None]:
    """A reload listener that keeps each config applied as the last good one."""

    def save(_trigger: str, result: ReloadResult, files: ConfigFiles | None) -> None:
        if result.result == "ok" and files is not None:
            lastgood.save(path, files)

    return save


def _start_demo_sim() -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluice.control.cli", "sim", "--port", str(DEMO_SIM_PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening" not in line:
        proc.terminate()
        raise CliError(f"the demo simulator did not start on port {DEMO_SIM_PORT}")
    return proc


async def _sample_gauges(observer: Observer, app: ProxyApp) -> None:
    """The gauges from the app's live state, every GAUGE_INTERVAL_S (metrics on)."""
    while True:
        observer.sample(app)
        await asyncio.sleep(GAUGE_INTERVAL_S)


async def _watch_supervisor(stop: asyncio.Event, log: Any) -> None:
    """Where the kernel cannot signal a worker when its supervisor dies (no prctl): looks
    every SUPERVISOR_WATCH_S, then drains as on SIGTERM."""
    # Nothing but the kernel's PR_SET_PDEATHSIG tells of a re-parenting, and that is what
    # is missing here; one getppid() a second costs nothing.
    while not supervisor_gone():  # noqa: ASYNC110
        await asyncio.sleep(SUPERVISOR_WATCH_S)
    log.warning("supervisor_gone", pid=os.getpid())
    stop.set()


async def serve(
    options: ServeOptions, loaded: Loaded, *, demo: bool = False, watch_supervisor: bool = False
) -> int:
    """`watch_supervisor`: a worker that polls for its supervisor's death (see
    supervisor.die_with_supervisor)."""
    log = structlog.get_logger("sluice")
    built = loaded.built
    return_large_allocations_to_os()  # large request bodies leave no RSS behind
    snapshot = built.snapshot
    ref = SnapshotRef(snapshot)
    observer = Observer(
        ref,
        Metrics() if options.metrics else None,
        access_log=options.access_log,
        json_lines=access_lines(options.log_level, options.log_format),
    )
    reloader: ConfigReloader | None = None

    loop = asyncio.get_running_loop()
    salt_key_file: Path | None = None  # where app.salt_key came from, once it is read

    def apply(new: BuiltConfig) -> None:
        # The one assignment (infallible: everything ran in build) and the reconcile of
        # limits, pools and probes, in one step on the event loop; the reload thread waits
        # for it, so a reload reported done is in force.
        key = _salt_key_for(new, starting=False) if salt_key_file is None else None
        if _on_loop(loop):
            _swap(new, key)
            return
        done = threading.Event()

        def swap() -> None:
            try:
                _swap(new, key)
            finally:
                done.set()

        loop.call_soon_threadsafe(swap)
        done.wait(SWAP_WAIT_S)

    worker_state: Path | None = None  # lastgood.py's directory, in a worker of --workers N
    if options.config_dir is not None:
        # A worker without a store shares no resumable stream: an edit may add one.
        alone = os.environ.get(WORKER_ENV) is not None and store_url(built) is None
        reloader = ConfigReloader(
            options.config_dir,
            apply,
            backend_override=options.backend,
            initial=built,
            on_result=observer.on_reload,
            caveats=worker_reload_caveats if alone else None,
        )
        worker_state = lastgood.state_dir() if os.environ.get(WORKER_ENV) is not None else None
        if worker_state is not None:
            reloader.listeners.append(_saver(worker_state / lastgood.LAST_GOOD))
    limits = await start_limit_store(built, options.workers, observer.metrics)
    app = ProxyApp(
        ref,
        limiters=limits.registry,
        on_complete=[observer.on_complete] if observer.enabled else [],
    )

    def _salt_key_for(new: BuiltConfig, *, starting: bool) -> bytes | None:
        """The key file's key, read (or created) the first time a config salts per app:
        at start-up, or at the reload that adds the first apps (each worker would salt
        with a random key of its own meanwhile). Read off the loop, in the reload thread.
        The file is the start-up config's (`secret_file` changes only at a restart)."""
        nonlocal salt_key_file
        gateway = new.gateway
        if gateway is None or not gateway.apps or gateway.cache_isolation.mode != "per_app":
            return None
        path = Path((built.gateway or gateway).cache_isolation.secret_file)
        try:
            key = load_or_create_key(path)
        except CliError as exc:
            if starting:
                raise  # not starting, as before
            log.error("cache_salt_key_unreadable", error=str(exc), fallback="process key")
            return None
        salt_key_file = path
        return key

    def _swap(new: BuiltConfig, key: bytes | None) -> None:
        if key is not None:
            app.salt_key = key  # before the snapshot that salts with it serves
        app.swap(new.snapshot)

    start_key = _salt_key_for(built, starting=True)
    if start_key is not None:
        app.salt_key = start_key
    if limits.kind == "redis" and limits.redis is not None:
        # The same `limits.store` carries a copy of every resumable stream (docs/STREAMS.md).
        app.streams = await start_stream_store(limits.redis, built)
    app.extra_routes.update(
        admin_routes(ref, app, reloader, observer, worker=os.environ.get(WORKER_ENV))
    )
    worker = os.environ.get(WORKER_ENV)
    started = time.time()
    attach_console(
        app,
        observer,
        built,
        reloader,
        options.config_dir,
        options.backend,
        lambda: status_body(ref, app, observer, {"version": ref.current.version}, started, worker),
    )
    registry = observer.metrics.registry if observer.metrics is not None else None
    records = attach_records(built, app, registry=registry)
    health = attach_health(app, registry=registry)
    load_scraper = attach_load_scraper(app)
    shared_index = attach_shared_index(built, app)
    if loaded.restarted and reloader is not None and worker_state is not None:
        assert options.config_dir is not None
        _catch_up(reloader, worker_state, options.config_dir, log)  # everything is attached
        snapshot = ref.current
    state = ServerState(
        app,
        app.max_body_bytes,
        on_error=lambda exc: log.error("handler_error", exc_info=exc),
        error_body=server_error_body,
        stream_body=app.wants_body_stream,
        max_connections=options.max_connections,
    )
    state.upgrade = WebSocketUpgrade(app)  # WebSocket on the two completion paths
    server = HttpServer(state)
    host = options.host or snapshot.listen_host
    port = options.port if options.port is not None else snapshot.listen_port
    try:
        bound = await server.listen(host, port, reuse_port=options.workers > 1)
    except OSError as exc:
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    url = f"http://[{host}]:{bound}" if ":" in host else f"http://{host}:{bound}"
    report_serving()
    # Start-up objects (modules, config) move out of the collector's reach, so collections
    # under load only walk what requests allocate.
    gc.collect()
    gc.freeze()
    # A request allocates a few hundred container objects (task, futures, dicts), so the
    # default young-generation threshold (700) ran a collection every few requests: 10,000
    # measured -6.6% CPU per 2-token request (8 interleaved rounds); 50,000 took the
    # collector from ~2,700 instructions a 2-token request to under 200 (callgrind). What
    # waits for it is only cyclic garbage, and little: a closed connection frees its
    # parser and its last head at once (RequestReader.close), leaving ~8 small objects.
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    build = build_kind()
    print(f"sluice serving on {url} build={build} config={snapshot.version}", flush=True)
    log.info("serving", url=url, config_version=snapshot.version, pid=os.getpid(), build=build)
    if demo:
        _print_demo_help(url, snapshot.requires_auth)

    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    watch_task: asyncio.Task[None] | None = None
    if reloader is not None:
        reloader_ = reloader
        loop.add_signal_handler(
            signal.SIGHUP,
            lambda: loop.create_task(asyncio.to_thread(reloader_.reload_now, trigger="SIGHUP")),
        )
        watch_task = loop.create_task(reloader.watch())
    gauge_task = loop.create_task(_sample_gauges(observer, app)) if observer.metrics else None
    supervisor_task = loop.create_task(_watch_supervisor(stop, log)) if watch_supervisor else None

    await stop.wait()
    await drain(app, server, options.drain_timeout, log, grace=options.drain_grace)
    await health.aclose()
    await load_scraper.aclose()
    await shared_index.aclose()
    await records.aclose()  # after the drain, so the last requests' records are written too
    if isinstance(app.streams, RedisStreamStore):
        await app.streams.aclose()
    await limits.aclose()
    for task in (watch_task, gauge_task, supervisor_task):
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
    if observer.metrics is not None:
        # The last requests' counts into the values (a worker's file outlives it).
        observer.metrics.flush()
    return 0


async def drain(
    app: ProxyApp,
    server: HttpServer,
    deadline: float,
    log: structlog.BoundLogger,
    *,
    grace: float = 0.0,
) -> None:
    """Readiness off at once; after `grace` seconds (default 0) no new connections and idle
    keep-alive ones closed; in-flight requests get `deadline` seconds more, then the
    streams left end with the terminal SSE error event (code "shutdown")."""
    app.ready = False
    log.info(
        "draining",
        in_flight=server.active_connections,
        active_streams=app.active_streams,
        grace_s=grace,
        deadline_s=deadline,
    )
    if grace > 0:
        await asyncio.sleep(grace)  # still serving; /readyz answers 503
    server.stop_accepting()
    end = time.monotonic() + deadline
    # Polling is bounded by the deadline and runs once per shutdown.
    while server.active_connections and time.monotonic() < end:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    interrupted = app.interrupt_all(SHUTDOWN)
    if interrupted:
        log.warning("drain_deadline_passed", interrupted=interrupted)
        settle = time.monotonic() + 2.0
        while app.watchdogs and time.monotonic() < settle:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    await server.close()
    app.pools.close()
    log.info("stopped")


def _print_demo_help(url: str, auth: bool) -> None:
    key = ' -H "Authorization: Bearer sk-demo-support"' if auth else ""
    print(
        "\nTry it:\n"
        f"  curl -N {url}/v1/chat/completions{key} -H 'Content-Type: application/json' \\\n"
        '    -d \'{"model": "chat", "stream": true, '
        '"messages": [{"role": "user", "content": "Hello!"}]}\'\n',
        flush=True,
    )
