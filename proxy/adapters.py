"""Endpoint adapters: what one generating endpoint adds to the shared pipeline.

Every endpoint that generates text (chat, completions, responses, messages, TGI) runs the
same stages in `ProxyApp`: parse, authenticate, route, request policy, limits, upstream,
response policy, records. An adapter says only what differs: the upstream path, how the
preset's fields are spelled in the endpoint's request ("vocabulary"), where the structured
output constraint sits, and which filter finds the text deltas of its stream and the text
of its complete response (so the route's Policy guards them). An endpoint whose text the
guard cannot find is refused under a guarding Policy, never served unguarded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final

import orjson
from mypy_extensions import mypyc_attr

from .chunks import ChunkFilter
from .errors import ApiError, bad_request, error_event, json_type, refusal_event
from .exchange import Exchange
from .http import Header, Request
from .nonstream import guard_completion, record_finish
from .response import JSON_HEADERS
from .routing import RouteChoice
from .sampling import apply_plan, merge_stop
from .snapshot import App, Route, SamplingPlan, StreamPolicy
from .structured import check_structured, find_constraint
from .timeouts import StreamWatchdog
from .upload import BodyStream

SSE_HEADERS: Final[list[Header]] = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def check_output_rules(body: dict[str, Any], policy: StreamPolicy, app: App | None) -> None:
    """The Policy's and the app's structured-output rules on a body in OpenAI's terms."""
    app_rule = app.structured if app is not None else None
    if policy.structured is not None or app_rule is not None:  # most requests: none
        found = find_constraint(body)
        check_structured(policy.structured, f"policy '{policy.name}'", found)
        if app is not None:
            check_structured(app_rule, f"app '{app.name}'", found)


# An endpoint may be adapted outside the compiled package (a test injects a fault
# through one): a Python subclass's overrides must be the ones called.
@mypyc_attr(allow_interpreted_subclasses=True)
class Adapter:
    """The OpenAI chat completions endpoint; subclasses override what differs."""

    name = "chat"
    upstream_path = b"/v1/chat/completions"
    chat = True  # which OpenAI chunk layout ChunkFilter reads
    sse_headers = SSE_HEADERS
    method = b"POST"
    # vLLM request field -> this endpoint's name for it; None: every vLLM field, same name.
    vocabulary: ClassVar[Mapping[str, str] | None] = None
    forwards = False  # True: the body is relayed as it is (tokenize, embeddings, ...)
    reads_fields = True  # False: a body not read as a JSON object (a form, a forward's bytes)
    takes_cache_salt = True  # the request runs the model: the app's cache_salt isolates it
    reshape_errors = False  # True: a backend's error is answered in error_response's shape
    model_optional = False  # True: without `model`, the app's only route serves it
    # Resumable streams (proxy/resume.py) number OpenAI chunk events; other layouts opt out.
    resumable = True
    body_stream: BodyStream | None = None  # the rest of a streamed upload, after payload()
    stream_length: int | None = None  # its whole length upstream; None: chunked

    def begin(self, body: dict[str, Any]) -> tuple[Adapter, dict[str, Any]]:
        """The adapter for this request and the body in vLLM's terms (the body to route
        on); an endpoint that translates its protocol does it here."""
        return self, body

    def names_stored_response(self, body: dict[str, Any]) -> bool:
        """The request reads a response vLLM stored (in one replica's memory): a replica
        that answers 404 may not be the one holding it (BackendPools.open_exchange)."""
        return False

    def prepare(
        self, body: dict[str, Any], choice: RouteChoice, app: App | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Applies the structured-output rule, the preset and the policy's stop strings
        to the request; returns the upstream body and whether it differs from the
        client's bytes."""
        policy = choice.policy
        check_output_rules(body, policy, app)
        plan = choice.plan
        modified = bool(plan.name) or bool(policy.stop)
        if self.vocabulary is None:
            if plan.name:
                apply_plan(body, plan, self.chat)
            merge_stop(body, policy.stop)
            return body, modified
        _check_vocabulary(plan, self.vocabulary, self.name)
        if policy.stop and "stop" not in self.vocabulary:
            raise _unguardable(self.name, policy, "its stop strings")
        renamed = {v: k for k, v in self.vocabulary.items() if k != v}
        for ours, theirs in renamed.items():
            if ours in body:
                body[theirs] = body.pop(ours)
        if plan.name:
            apply_plan(body, plan, False, self.vocabulary)
        merge_stop(body, policy.stop, self.vocabulary.get("stop", "stop"))
        for ours, theirs in renamed.items():
            if theirs in body:
                body[ours] = body.pop(theirs)
        return body, modified

    async def begin_forward(self, request: Request) -> tuple[Adapter, dict[str, Any]]:
        raise NotImplementedError  # only forwarding adapters relay bodies unread

    def payload(self, body: dict[str, Any], raw: bytes, modified: bool, route: Route) -> bytes:
        """The bytes sent upstream (the route's upstream model named in them)."""
        if route.upstream_model is not None and body.get("model") != route.upstream_model:
            body["model"] = route.upstream_model
            modified = True
        return orjson.dumps(body) if modified else raw

    def upstream_headers(self) -> list[Header]:
        return list(JSON_HEADERS)

    def is_stream(self, body: dict[str, Any]) -> bool:
        """`stream` as a JSON boolean (absent or null: false). vLLM reads "true", 1 or
        "yes" as true too and streams, but sluice would then relay the stream as one
        answer: no stream deadlines, and the policy's stop strings and cut patterns not
        applied. So anything else is refused, as OpenAI's API refuses it."""
        stream = body.get("stream")
        if stream is True:
            return True
        if stream is None or stream is False:
            return False
        raise bad_request(
            f"Invalid type for 'stream': expected a boolean, but got {json_type(stream)} instead.",
            param="stream",
            code="invalid_type",
        )

    def n_choices(self, body: dict[str, Any]) -> int:
        """The choices a stream carries: `n` for each prompt. A completions prompt that is
        a list of strings or of token lists is a batch (one of token ids is one prompt).
        vLLM reads `2.0` as 2 and so does this; a string it would read too ("2") is
        refused, as `stream`'s are: counted as one choice, a stream's others would be cut
        when the first ended."""
        n = body.get("n")
        if n is None or n is True:
            n = 1
        # `False` before any isinstance: compiled, a value narrowed to int is no bool.
        elif (
            n is False
            or not isinstance(n, int | float)
            or (isinstance(n, float) and not n.is_integer())
        ):
            raise bad_request(
                f"Invalid type for 'n': expected an integer, but got {json_type(n)} instead.",
                param="n",
                code="invalid_type",
            )
        else:
            n = int(n)  # vLLM reads 2.0 as 2
        if not self.chat:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
                n *= len(prompt)
        return n

    def chunk_filter(
        self, ex: Exchange, policy: StreamPolicy, n_choices: int, watchdog: StreamWatchdog | None
    ) -> ChunkFilter:
        return ChunkFilter(ex, self.chat, policy.guard, n_choices, watchdog)

    def rewrite_body(self, obj: Any, policy: StreamPolicy, ex: Exchange) -> Any | None:
        """A complete 200 response, recorded and guarded; None when unchanged."""
        if not isinstance(obj, dict):
            return None
        ex.record_usage(obj.get("usage"))
        record_finish(ex, obj)
        if policy.guard is not None and guard_completion(obj, policy.guard, self.chat, ex):
            return obj
        return None

    def error_response(self, exc: ApiError) -> tuple[list[Header], bytes]:
        return JSON_HEADERS + exc.headers, exc.body()

    def stream_error(
        self, message: str, type: str, code: str, chunk_filter: ChunkFilter | None = None
    ) -> bytes:
        """The terminal event of a stream sluice ends (a timeout, a backend stream that
        broke) in the endpoint's shape. `chunk_filter`: the stream's, once it has one (the
        Responses API numbers its events)."""
        return error_event(message, type, code)

    def stream_refusal(self, exc: ApiError, relayed: dict[str, object] | None = None) -> bytes:
        """A refusal (a limit, the backend's own error) after the SSE head went out early
        (a keep-alive): the stream's terminal error event in the endpoint's shape.
        `relayed`: the backend's OpenAI-shaped error object, which this shape passes on."""
        return refusal_event(exc, relayed)


class CompletionsAdapter(Adapter):
    name = "completions"
    upstream_path = b"/v1/completions"
    chat = False


def _check_vocabulary(plan: SamplingPlan, vocabulary: Mapping[str, str], endpoint: str) -> None:
    """A preset field the endpoint has no name for cannot be sent: refuse rather than
    sample differently from what the preset says."""
    missing = sorted(field for field in (*plan.defaults, *plan.forced) if field not in vocabulary)
    if missing:
        raise ApiError(
            400,
            f"preset '{plan.name}' sets {', '.join(missing)}, which {endpoint} cannot carry; "
            "use /v1/chat/completions or /v1/completions for this route",
            code="preset_not_expressible",
        )


def _unguardable(endpoint: str, policy: StreamPolicy, what: str) -> ApiError:
    return ApiError(
        400,
        f"policy '{policy.name}' cannot be enforced on {endpoint} ({what}); "
        "use /v1/chat/completions or /v1/completions for this route",
        code="policy_not_enforceable",
    )
