"""The simulator's HTTP surface on Sluice's own HTTP/1.1 server (`sluice.proxy.http`).

Routes as vLLM 0.26 serves them (a wrong method is FastAPI's 405 with `allow`, an unknown
path FastAPI's 404), plus `/sim/*` for tests. `start_sim(config)` runs one in-process.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import replace

import orjson
from sluice.proxy.http import ClientGone, Handler, Request, Response, ServerState
from sluice.proxy.response import JSON_HEADERS
from sluice.proxy.server import HttpServer
from sluice.proxy.sse import DONE_EVENT

from .chunks import KEEPALIVE_COMMENT, ChatFormat, ChunkFormat, CompletionFormat, error_event
from .config import SimConfig, SimOptions, parse_sim_options
from .errors import (
    ApiError,
    api_error,
    detail_error,
    error_type,
    http_error_body,
    simulated_status,
    unauthorized,
)
from .generation import Generation, Outcome
from .params import GenerationParams, Kind, check_content_type, parse_generation, parse_json
from .prefixcache import Admission, PrefixCache
from .routes_text import TextRoutes
from .scheduler import Scheduler
from .stats import Stats

MAX_BODY_BYTES = 32 * 1024 * 1024
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8")]
METRICS_HEADERS = [(b"content-type", b"text/plain; version=1.0.0; charset=utf-8")]
VLLM_VERSION = "0.26.0"


class SimApp:
    """Request handling; one per server. Everything runs on the server's event loop."""

    def __init__(self, config: SimConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.stats = Stats(config.request_log_size)
        self.scheduler = Scheduler(loop)
        self.health_status = 200
        self.prefix_cache = (
            PrefixCache(config.prefix_cache_blocks, config.prefill_ms_per_block / 1000.0)
            if config.prefix_cache_blocks or config.prefill_ms_per_block
            else None
        )
        self.tasks: set[asyncio.Task[object]] = set()
        self.routes: dict[str, dict[str, Handler]] = {
            "/v1/chat/completions": {"POST": self.chat},
            "/v1/completions": {"POST": self.completions},
            "/v1/models": {"GET": self.models},
            "/health": {"GET": self.health},
            "/ping": {"GET": self.health, "POST": self.health},
            "/version": {"GET": self.version},
            "/metrics": {"GET": self.metrics},
            "/sim/stats": {"GET": self.sim_stats},
            "/sim/requests": {"GET": self.sim_requests},
            "/sim/reset": {"POST": self.sim_reset},
            "/sim/health": {"POST": self.sim_health},
        }
        self.text_routes = TextRoutes(self)
        self.routes.update(self.text_routes.table())

    async def handle(self, request: Request, response: Response) -> None:
        methods = self.routes.get(request.path) or self.text_routes.stored_routes(request.path)
        try:
            if methods is None:
                raise detail_error(404, "Not Found")
            endpoint = methods.get(request.method)
            if endpoint is None:
                raise detail_error(405, "Method Not Allowed", ", ".join(methods))
            if self.config.api_key is not None and request.path.startswith("/v1/"):
                expected = f"Bearer {self.config.api_key}"
                if request.header(b"authorization") != expected:
                    raise unauthorized()
        except ApiError as error:
            response.send(error.status, error.headers, error.body)
            return
        await endpoint(request, response)

    # -- generation ------------------------------------------------------------------

    async def chat(self, request: Request, response: Response) -> None:
        await self._generate("chat", request, response)

    async def completions(self, request: Request, response: Response) -> None:
        await self._generate("completion", request, response)

    def _read(self, request: Request) -> tuple[object, SimOptions]:
        """Logs the request and returns its JSON body and sim options (or raises)."""
        body: object = None
        failure: ApiError | None = None
        try:
            body = parse_json(request.body)
        except ApiError as exc:
            failure = exc
        text = None if failure is None else request.body.decode("utf-8", "replace")[:4096]
        self.stats.log_request(request, body, text)
        check_content_type(request.header(b"content-type"))
        if failure is not None:
            raise failure
        raw_sim = body.get("sim") if isinstance(body, dict) else None
        return body, parse_sim_options(raw_sim, self.config)

    async def _generate(self, kind: Kind, request: Request, response: Response) -> None:
        stats = self.stats
        stats.requests += 1
        task = asyncio.current_task()
        try:
            body, sim = self._read(request)
        except ApiError as error:
            self._send_error(response, error)
            return
        stats.active += 1
        stats.max_active = max(stats.max_active, stats.active)
        admission: Admission | None = None
        if task is not None:
            self.tasks.add(task)
        try:
            if sim.slow_first_byte_s > 0:
                stats.waiting += 1
                try:
                    await asyncio.sleep(sim.slow_first_byte_s)
                finally:
                    stats.waiting -= 1
            if sim.status is not None:
                raise simulated_status(sim.status, sim.retry_after)
            params = parse_generation(kind, body, self.config, sim)
            stats.prompt_tokens += sum(params.prompt_tokens)
            if self.prefix_cache is not None:
                admission = self._admit(params, body)
                params = replace(params, sim=replace(sim, ttft_s=sim.ttft_s + admission.delay_s))
            fmt = self._format(params, request)
            if params.stream:
                await self._stream(params, fmt, response)
            else:
                await self._complete(params, fmt, response)
        except ApiError as error:
            self._send_error(response, error)
        except (asyncio.CancelledError, ClientGone):
            stats.aborted += 1
            raise
        finally:
            stats.active -= 1
            if admission is not None and self.prefix_cache is not None:
                self.prefix_cache.release(admission)
            if task is not None:
                self.tasks.discard(task)

    def _admit(self, params: GenerationParams, body: object) -> Admission:
        assert self.prefix_cache is not None
        salt = body.get("cache_salt") if isinstance(body, dict) else None
        return self.prefix_cache.admit(
            params.prompts, salt if isinstance(salt, str) and salt else None, self.loop.time()
        )

    def _format(self, params: GenerationParams, request: Request) -> ChunkFormat:
        # vLLM: the X-Request-Id header, else the body's request_id, else random.
        base = request.header(b"x-request-id") or params.request_id or secrets.token_hex(8)
        choices = len(params.prompts) * params.n
        top = params.logprobs or 0
        created = int(time.time())
        if params.kind == "chat":
            return ChatFormat(f"chatcmpl-{base}", created, params.model, choices, top)
        return CompletionFormat(f"cmpl-{base}", created, params.model, choices, top)

    def _send_error(self, response: Response, error: ApiError) -> None:
        self.stats.errors += 1
        response.send(error.status, error.headers, error.body)

    async def _run(self, gen: Generation) -> Outcome:
        self.scheduler.start(gen)
        try:
            return await gen.done
        finally:
            self.scheduler.cancel(gen)

    async def _stream(self, params: GenerationParams, fmt: ChunkFormat, response: Response) -> None:
        response.start(200, SSE_HEADERS)
        gen = Generation(params, fmt, response, self.stats, self.loop)
        outcome = await self._run(gen)
        await gen.drain_backlog()
        if outcome is Outcome.DONE:
            self.stats.completed += 1
            response.end()
        elif outcome is Outcome.CLOSE:
            self.stats.closed += 1
            response.abort()
        elif outcome is Outcome.ERROR:
            self.stats.failed += 1
            message = f"simulated mid-stream error (sim.error_after={params.sim.error_after})"
            response.write(error_event(500, message, error_type(500)))
            response.write(DONE_EVENT)
            response.end()
        else:
            self.stats.stalled += 1
            await self._hold(response, params.sim.keepalive_s)

    async def _complete(
        self, params: GenerationParams, fmt: ChunkFormat, response: Response
    ) -> None:
        gen = Generation(params, fmt, None, self.stats, self.loop)
        outcome = await self._run(gen)
        if outcome is Outcome.DONE:
            self.stats.completed += 1
            body = fmt.body(gen.choices, gen.prompt_tokens, gen.completion_tokens)
            response.send(200, JSON_HEADERS, body)
        elif outcome is Outcome.CLOSE:
            self.stats.closed += 1
            response.abort()
        elif outcome is Outcome.ERROR:
            self.stats.failed += 1
            message = f"simulated error (sim.error_after={params.sim.error_after})"
            raise api_error(500, message)
        else:
            self.stats.stalled += 1
            await self._hold(response, None)

    async def _hold(self, response: Response, keepalive_s: float | None) -> None:
        """A stalled request: open until the client goes away (which cancels us)."""
        if keepalive_s is None:
            await self.loop.create_future()
            return
        while True:
            await asyncio.sleep(keepalive_s)
            if response.must_drain:
                await response.drain()
            response.write(KEEPALIVE_COMMENT)

    # -- the rest of vLLM's surface --------------------------------------------------

    async def models(self, request: Request, response: Response) -> None:
        created = int(time.time())
        card = {
            "id": self.config.model,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": self.config.model,
            "parent": None,
            "max_model_len": self.config.max_model_len,
            "permission": [
                {
                    "id": f"modelperm-{secrets.token_hex(8)}",
                    "object": "model_permission",
                    "created": created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }
        response.send(200, JSON_HEADERS, orjson.dumps({"object": "list", "data": [card]}))

    async def health(self, request: Request, response: Response) -> None:
        response.send(self.health_status, [], b"")

    async def version(self, request: Request, response: Response) -> None:
        response.send(200, JSON_HEADERS, orjson.dumps({"version": VLLM_VERSION}))

    async def metrics(self, request: Request, response: Response) -> None:
        cache = self.prefix_cache
        if cache is None:
            body = self.stats.render_metrics(self.config.model)
        else:
            body = self.stats.render_metrics(
                self.config.model,
                prefill_waiting=cache.waiting(self.loop.time()),
                kv_usage=cache.kv_usage(),
                cache_queries=cache.query_tokens,
                cache_hits=cache.hit_tokens,
            )
        response.send(200, METRICS_HEADERS, body)

    # -- /sim/* ----------------------------------------------------------------------

    async def sim_stats(self, request: Request, response: Response) -> None:
        response.send(200, JSON_HEADERS, orjson.dumps(self.stats.snapshot()))

    async def sim_requests(self, request: Request, response: Response) -> None:
        response.send(200, JSON_HEADERS, orjson.dumps(self.stats.requests_log()))

    async def sim_reset(self, request: Request, response: Response) -> None:
        self.stats.reset()
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        self.health_status = 200
        response.send(200, JSON_HEADERS, orjson.dumps(self.stats.snapshot()))

    async def sim_health(self, request: Request, response: Response) -> None:
        """`{"status": 503}` makes /health answer 503 (until reset), as a dead engine."""
        try:
            body = orjson.loads(request.body)
            status = body["status"]
            if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
                raise ValueError(status)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            error = api_error(400, 'expected {"status": <HTTP status>}', "status")
            response.send(error.status, error.headers, error.body)
            return
        self.health_status = status
        response.send(200, JSON_HEADERS, orjson.dumps({"status": status}))


class SimServer:
    """A running simulator: `.port`, `.url`, `.stats`, `await .close()`."""

    def __init__(self, app: SimApp, http: HttpServer, port: int) -> None:
        self.app = app
        self.http = http
        self.port = port
        self.config = app.config

    @property
    def stats(self) -> Stats:
        return self.app.stats

    @property
    def url(self) -> str:
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        """Stops listening, drops every connection (open streams count as aborted) and
        waits for their handlers to finish."""
        await self.http.close()
        tasks = list(self.app.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        self.app.scheduler.close()


UNCAPPED_CONNECTIONS = 1 << 20


async def start_sim(config: SimConfig | None = None) -> SimServer:
    """Starts a simulator on the running loop; returns once it is listening."""
    config = config or SimConfig()
    loop = asyncio.get_running_loop()
    app = SimApp(config, loop)
    # vLLM's server (uvicorn) caps no connections: the descriptor limit is the only bound.
    state = ServerState(
        app.handle,
        lambda: MAX_BODY_BYTES,
        error_body=http_error_body,
        max_connections=UNCAPPED_CONNECTIONS,
    )
    if config.keepalive_timeout_s is not None:
        # Before HttpServer: its sweep interval follows this timeout.
        state.keepalive_timeout = config.keepalive_timeout_s
    http = HttpServer(state)
    port = await http.listen(config.host, config.port)
    return SimServer(app, http, port)
