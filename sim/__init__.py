"""`sluice sim`: a vLLM 0.26 stand-in that speaks its OpenAI-compatible wire format.

Run it as `sluice sim --port 8100`, or in-process::

    server = await start_sim(SimConfig(port=0, itl_ms=5))
    ...  # talk to server.url; read server.stats
    await server.close()

Endpoints, as vLLM serves them: `POST /v1/chat/completions`, `POST /v1/completions`
(stream and non-stream, n, stop, logprobs, usage), `GET /v1/models`, `GET /health`,
`GET|POST /ping`, `GET /version`, `GET /metrics` (vLLM metric names); `/v1/embeddings`,
`/tokenize`, `/detokenize` and `/v1/audio/transcriptions` (a form; `stream=true` answers
vLLM's `transcription.chunk` events, a word each, at the server's TTFT and ITL).
`--keepalive-timeout 5` closes keep-alive connections idle for 5 s as vLLM's server
(uvicorn) does; the default keeps them 75 s. `--responses-store` keeps `/v1/responses`
answers as vLLM with VLLM_ENABLE_RESPONSES_API_STORE=1 does (in this process):
`GET /v1/responses/{id}`, `POST .../cancel` and `previous_response_id`. For tests:

- `GET /sim/stats`: `{"requests", "active", "waiting", "completed", "aborted", "closed",
  "stalled", "failed", "errors", "tokens", "prompt_tokens", "finished": {reason: n},
  "cpu_seconds", "loop_cpu_seconds", "uptime_seconds"}`. `aborted` counts requests whose
  client closed the connection before the end; it moves when the close is seen (the
  handler is cancelled at once, no polling).
- `GET /sim/requests`: the last 100 generation requests, oldest first, each
  `{"method", "path", "x_request_id", "authorization": bool, "headers": {...} (without
  authorization), "body": <the JSON as received, key order kept>}`; a body that is not
  JSON is `null` with `"body_text"`.
- `POST /sim/reset`: zeroes the counters and clears the request log (not the live
  gauges `active`/`waiting`); /health answers 200 again.
- `POST /sim/health` `{"status": 503}`: what /health answers from now on.

Generated text is deterministic: tokens are drawn from `text.VOCAB` with a seed derived
from the request's `seed` (else `--seed`), the prompt and the choice index; see
`text.sample_tokens` to predict it. Prompt tokens are estimated at ~4 bytes a token.

The request extension `"sim": {...}` (vLLM would ignore an unknown field; the proxy
passes it through). Every key is optional and overrides the server default for this
request; an unknown key or a wrong type is a 400 (param "sim"):

- `script`: list of strings, emitted exactly, one token each (all choices). Cut at
  max_tokens (finish "length"); if it runs out first the choice finishes "stop" with
  stop_reason null, as at an EOS token (not counted).
- `tokens_per_chunk`: int >= 1. The first token goes out alone, then chunks of this many
  tokens, as vLLM's stream_interval. Usage still counts tokens.
- `ttft_ms`, `itl_ms`: time to the first token, between tokens (0: all at once).
- `stall_after`: int N. After N tokens nothing more is sent, but the connection stays
  open until the client goes away (then `aborted` counts it). 0: right after the headers.
- `keepalive_comments_ms`: while stalled, write `: keep-alive\\n\\n` this often.
- `close_after`: int N. After N tokens the connection is closed without the chunked
  terminator and without `[DONE]` (non-stream: without a response).
- `error_after`: int N. After N tokens, a mid-stream error event
  `data: {"error": {..., "code": 500}}` then `data: [DONE]` (non-stream: a 500 body).
- `slow_first_byte_ms`: wait this long before the response headers (and before
  validation); counted in `waiting` / `vllm:num_requests_waiting`.
- `status`: answer with this HTTP status and a vLLM-shaped error body (e.g. 503),
  after `slow_first_byte_ms`. 200 means no fault.
- `retry_after`: int seconds, with `status`: sent as the `Retry-After` header.
- `empty_deltas`: true or an int k: after each token chunk, k chunks with empty content.
- `ignore_stop`: as `--ignore-stop` for this request: `stop` is not honoured.

Faults count tokens per choice; the earliest applies. A fault at or beyond the last token
never fires.

A server-wide drift, for `sluice verify`'s tests: `--drop-usage-chunk`
(`SimConfig.drop_usage_chunk`) never sends the usage chunk, whatever `stream_options` says.
"""

from .config import SimConfig, SimOptions
from .server import SimServer, start_sim
from .stats import Stats
from .text import chat_prompt_text, sample_tokens

__all__ = [
    "SimConfig",
    "SimOptions",
    "SimServer",
    "Stats",
    "chat_prompt_text",
    "sample_tokens",
    "start_sim",
]
