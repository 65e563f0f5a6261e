"""Which path is which kind of endpoint: vLLM 0.26's routes, as its server lists them at
start-up ("Available routes are: ..." in vllm-transcripts/08_server.txt) plus the routes a
pooling or speech-to-text model adds (`vllm/entrypoints/pooling/`, `.../speech_to_text/`).

* generating: an adapter maps the request and guards the response (chat, completions,
  responses, messages, TGI);
* local: answered by sluice itself (`/health`, `/ping`, `/version`, `GET /`);
* forwarded: relayed to the route's backend with the same authentication, route rules,
  limits, deadlines, metrics and access log (tokenize, embeddings, pooling, score, ...);
* generating without an adapter (`/invocations`, `/inference/v1/generate`,
  `/v1/chat/completions/batch`, speech to text, stored responses): forwarded only when the
  route has no preset and no guarding Policy, refused with a 400 naming them otherwise.

A forwarded JSON body gets the request-field rules as a generating one does, the app's
cache_salt where the endpoint runs the model, and the structured-output rules where it
generates text.

In pass-through mode (`--backend URL`) any other path is forwarded too, unless the
snapshot says `forward_unknown_paths: false`.
"""

from __future__ import annotations

from typing import Final

from .adapters import Adapter, CompletionsAdapter
from .messages import MessagesAdapter
from .responses_api import ResponsesAdapter
from .routing import STORED_RESPONSE_PREFIX
from .snapshot import Snapshot
from .tgi import TGI_PATHS, TgiAdapter

GENERATING: Final[dict[str, Adapter]] = {
    "/v1/chat/completions": Adapter(),
    "/v1/completions": CompletionsAdapter(),
    "/v1/responses": ResponsesAdapter(),
    "/v1/messages": MessagesAdapter(),
    **{path: TgiAdapter(path) for path in TGI_PATHS},
}

LOCAL_PATHS: Final = frozenset(("/health", "/ping", "/version"))

# Forwarded routes that only tokenize or render a template: no model runs, so no prefix
# cache to isolate (vLLM would log the cache_salt it ignores).
RUNS_NO_MODEL: Final = frozenset(
    (
        "/tokenize",
        "/detokenize",
        "/v1/messages/count_tokens",
        "/v1/chat/completions/render",
        "/v1/completions/render",
        "/v1/chat/completions/derender",
        "/v1/completions/derender",
    )
)

FORWARDED: Final = RUNS_NO_MODEL | frozenset(
    (
        "/v1/embeddings",
        "/pooling",
        "/classify",
        "/score",
        "/v1/score",
        "/rerank",
        "/v1/rerank",
        "/v2/rerank",
        "/generative_scoring",
    )
)

# They generate text in a shape no adapter reads (or return text generated earlier).
UNGUARDED_GENERATING: Final = frozenset(
    (
        "/invocations",
        "/inference/v1/generate",
        "/v1/chat/completions/batch",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
    )
)
UNGUARDED_PREFIXES: Final = (STORED_RESPONSE_PREFIX,)


# vLLM's operator routes (elastic scaling, sleep, cache resets, profiling, LoRA loading,
# weight updates, RPC to its workers): never forwarded, not even in pass-through, where an
# API key (or, without apps, anybody) could otherwise put the GPU to sleep. Ops call the
# backend directly.
OPERATOR_PATHS: Final = frozenset(
    (
        "/scale_elastic_ep",
        "/sleep",
        "/wake_up",
        "/reset_prefix_cache",
        "/reset_mm_cache",
        "/reset_encoder_cache",
        "/collective_rpc",
        "/start_profile",
        "/stop_profile",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/pause",
        "/resume",
        "/update_weights",
        "/init_weight_transfer_engine",
    )
)


def forwarded_path(path: str, snap: Snapshot) -> bool:
    if path in FORWARDED or path in UNGUARDED_GENERATING or path.startswith(UNGUARDED_PREFIXES):
        return True
    return not snap.routes and snap.fallback_route is not None and snap.forward_unknown_paths


def runs_model(path: str) -> bool:
    """A known forwarded route whose request runs the model (and so its prefix cache)."""
    return (path in FORWARDED and path not in RUNS_NO_MODEL) or path in UNGUARDED_GENERATING
