// Rendered by `sluice render cloudflare` from the Gateway document (edge.cloudflare).
// Do not edit: change the Gateway document and render again.
//
// Forwards /v1/* to the origin (env.SLUICE_ORIGIN, a [vars] entry of wrangler.toml) with
// the origin secret (env.SLUICE_ORIGIN_SECRET, a Worker secret), and streams the response
// straight through: the body is piped, never read whole. While an event stream is idle,
// SSE comments keep it under Cloudflare's 100 s idle limit. Nothing here logs a header.

const SETTINGS = {
  "allowedOrigins": [
    "https://app.example.com"
  ],
  "clientSluiceHeaders": [
    "x-sluice-preset"
  ],
  "corsAllowHeaders": [
    "authorization",
    "content-type",
    "x-api-key",
    "x-request-id",
    "x-sluice-preset",
    "x-user-id"
  ],
  "corsExposeHeaders": [
    "retry-after",
    "x-request-id",
    "x-sluice-config",
    "x-sluice-preset",
    "x-sluice-variant"
  ],
  "corsMaxAge": 86400,
  "keepaliveMs": 30000,
  "originSecretRequired": true,
  "pathPrefix": "/v1/",
  "rootPaths": [
    "/",
    "/classify",
    "/detokenize",
    "/generate",
    "/generate_stream",
    "/generative_scoring",
    "/health",
    "/inference/v1/generate",
    "/invocations",
    "/ping",
    "/pooling",
    "/rerank",
    "/score",
    "/tokenize",
    "/v2/rerank",
    "/version"
  ]
};

const ORIGIN_SECRET_HEADER = "x-sluice-origin-secret";
const CLIENT_IP_HEADER = "x-sluice-client-ip";
const REQUEST_ID_HEADER = "x-request-id";
const MAX_REQUEST_ID = 128;
const KEEPALIVE_EVENT = new TextEncoder().encode(": keep-alive\n\n");
const TICK = Symbol("tick");
const NULL_BODY_STATUS = new Set([101, 204, 205, 304]);
// Connection-level headers of the client's hop, and the host, which is the origin's.
const HOP_HEADERS = new Set([
  "connection",
  "host",
  "keep-alive",
  "proxy-connection",
  "te",
  "trailer",
  "transfer-encoding",
  "upgrade",
]);

export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    const requestId = clientRequestId(request.headers) ?? crypto.randomUUID();
    if (!url.pathname.startsWith(SETTINGS.pathPrefix) && !SETTINGS.rootPaths.includes(url.pathname)) {
      return errorResponse(404, "not found", "invalid_request_error", "not_found", requestId);
    }
    const allowOrigin = corsOrigin(request.headers.get("origin"));
    if (request.method === "OPTIONS" && request.headers.has("access-control-request-method")) {
      return preflight(allowOrigin);
    }
    const origin = originBase(env.SLUICE_ORIGIN);
    const secret = env.SLUICE_ORIGIN_SECRET;
    if (origin === null || (SETTINGS.originSecretRequired && !secret)) {
      // Fail closed: the deployment lacks SLUICE_ORIGIN or the secret sluice requires.
      return errorResponse(500, "edge misconfigured", "server_error", "edge_misconfigured", requestId);
    }

    const headers = forwardHeaders(request.headers);
    const websocket = (request.headers.get("upgrade") ?? "").toLowerCase() === "websocket";
    // A WebSocket (sluice takes it on the completion paths): the runtime makes the
    // origin's handshake itself when the request passed to fetch() asks for the upgrade.
    if (websocket) headers.set("upgrade", "websocket");
    headers.set(REQUEST_ID_HEADER, requestId);
    const clientIp = request.headers.get("cf-connecting-ip");
    if (clientIp) headers.set(CLIENT_IP_HEADER, clientIp);
    if (secret) headers.set(ORIGIN_SECRET_HEADER, secret);

    let response;
    try {
      // The path starts with the prefix ("/v1/") or is one of rootPaths, so it cannot name
      // another host.
      response = await fetch(origin + url.pathname + url.search, {
        method: request.method,
        headers,
        body: request.body,
        redirect: "manual",
      });
    } catch {
      return errorResponse(502, "origin unreachable", "server_error", "origin_unreachable", requestId);
    }

    const outHeaders = new Headers(response.headers);
    if (allowOrigin !== null) addCorsHeaders(outHeaders, allowOrigin);
    if (response.webSocket) {
      // 101: the client's socket is the origin's, relayed message by message.
      return new Response(null, { status: 101, webSocket: response.webSocket, headers: outHeaders });
    }
    let body = NULL_BODY_STATUS.has(response.status) ? null : response.body;
    const type = outHeaders.get("content-type") ?? "";
    if (body !== null && type.toLowerCase().startsWith("text/event-stream")) {
      body = withKeepAlive(body, SETTINGS.keepaliveMs);
    }
    return new Response(body, {
      status: response.status,
      statusText: response.statusText,
      headers: outHeaders,
    });
  },
};

// The origin's scheme://host[:port], or null unless SLUICE_ORIGIN is exactly that.
function originBase(value) {
  if (typeof value !== "string") return null;
  let parsed;
  try {
    parsed = new URL(value);
  } catch {
    return null;
  }
  const bare = parsed.pathname === "/" && !parsed.search && !parsed.hash;
  const http = parsed.protocol === "https:" || parsed.protocol === "http:";
  if (!bare || !http || parsed.username || parsed.password) return null;
  return parsed.origin;
}

function clientRequestId(headers) {
  const given = headers.get(REQUEST_ID_HEADER);
  if (given === null || given.length === 0 || given.length > MAX_REQUEST_ID) return null;
  return /^[\x21-\x7e]+$/.test(given) ? given : null;
}

// The client's end-to-end headers, less every x-sluice-* header that only the edge may set
// (the origin secret, the client address) and Cloudflare's own.
function forwardHeaders(incoming) {
  const headers = new Headers();
  for (const [name, value] of incoming) {
    const lower = name.toLowerCase();
    if (lower.startsWith("x-sluice-") && !SETTINGS.clientSluiceHeaders.includes(lower)) continue;
    if (lower.startsWith("cf-") || HOP_HEADERS.has(lower)) continue;
    headers.append(name, value);
  }
  return headers;
}

function corsOrigin(origin) {
  if (origin === null || SETTINGS.allowedOrigins.length === 0) return null;
  if (SETTINGS.allowedOrigins.includes("*")) return "*";
  return SETTINGS.allowedOrigins.includes(origin) ? origin : null;
}

function addCorsHeaders(headers, allowOrigin) {
  headers.set("access-control-allow-origin", allowOrigin);
  headers.set("access-control-expose-headers", SETTINGS.corsExposeHeaders.join(", "));
  if (allowOrigin !== "*") headers.append("vary", "Origin");
}

function preflight(allowOrigin) {
  if (allowOrigin === null) {
    return new Response(null, { status: 403, headers: { vary: "Origin" } });
  }
  const headers = new Headers({
    "access-control-allow-origin": allowOrigin,
    "access-control-allow-methods": "GET, POST, OPTIONS",
    "access-control-allow-headers": SETTINGS.corsAllowHeaders.join(", "),
    "access-control-max-age": String(SETTINGS.corsMaxAge),
  });
  if (allowOrigin !== "*") headers.set("vary", "Origin");
  return new Response(null, { status: 204, headers });
}

function errorResponse(status, message, type, code, requestId) {
  const body = JSON.stringify({ error: { message, type, param: null, code } });
  return new Response(body, {
    status,
    headers: { "content-type": "application/json", [REQUEST_ID_HEADER]: requestId },
  });
}

// The origin's event stream, chunk by chunk as it arrives, with a `: keep-alive` comment
// whenever it has been silent for intervalMs. A comment goes only between events (after a
// blank line), never inside one. Pull-based: nothing is read from the origin before the
// client asks for more, and cancelling (the client went away) cancels the origin's body.
function withKeepAlive(body, intervalMs) {
  const reader = body.getReader();
  let pending = null;
  let tail = [];
  return new ReadableStream(
    {
      async pull(controller) {
        for (;;) {
          pending ??= reader.read();
          let timer;
          const tick = new Promise((resolve) => {
            timer = setTimeout(resolve, intervalMs, TICK);
          });
          let result;
          try {
            result = await Promise.race([pending, tick]);
          } finally {
            clearTimeout(timer);
          }
          if (result === TICK) {
            if (atEventBoundary(tail)) {
              controller.enqueue(KEEPALIVE_EVENT);
              return;
            }
            continue;
          }
          pending = null;
          if (result.done) {
            controller.close();
            return;
          }
          const chunk = result.value;
          if (chunk.byteLength === 0) continue;
          tail = [...tail, ...chunk.subarray(Math.max(0, chunk.byteLength - 4))].slice(-4);
          controller.enqueue(chunk);
          return;
        }
      },
      cancel(reason) {
        return reader.cancel(reason);
      },
    },
    { highWaterMark: 0 },
  );
}

function atEventBoundary(tail) {
  if (tail.length === 0) return true;
  const text = String.fromCharCode(...tail);
  return text.endsWith("\n\n") || text.endsWith("\r\r") || text.endsWith("\r\n\r\n");
}
