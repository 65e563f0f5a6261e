// The Sluice console: four views over the console's JSON endpoints, no dependencies.
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...kids) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const kid of kids) node.append(kid);
  return node;
};
const ms = (s) => (s === null || s === undefined ? "–" : (s * 1000).toFixed(s < 0.1 ? 1 : 0) + " ms");
const num = (x, d = 1) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));
const when = (t) => new Date(t * 1000).toLocaleTimeString();

let session = null;
let liveTimer = null;

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (options.method === "POST") headers["x-csrf-token"] = session ? session.csrf : "";
  const resp = await fetch("/console/api/" + path, Object.assign({}, options, { headers, credentials: "same-origin" }));
  if (resp.status === 401) { location.reload(); throw new Error("logged out"); }
  return resp;
}

// -- tabs ------------------------------------------------------------------------------
function show(tab) {
  for (const section of document.querySelectorAll(".tab")) section.hidden = section.id !== "tab-" + tab;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("on", a.dataset.tab === tab);
  clearInterval(liveTimer);
  if (tab === "live") { refreshLive(); liveTimer = setInterval(refreshLive, 2000); }
  if (tab === "config") refreshConfig();
  if (tab === "ab") refreshAB();
}

// -- live ------------------------------------------------------------------------------
function card(label, value, id) {
  return el("div", { class: "card", id }, el("div", { class: "value", text: String(value) }), el("div", { class: "label", text: label }));
}

function fillRows(table, rows) {
  const body = table.querySelector("tbody");
  body.replaceChildren(...rows.map((cells) => el("tr", {}, ...cells.map((c) => el("td", { text: String(c) })))));
}

function lineChart(title, points, fmt) {
  const w = 420, h = 110, pad = 4;
  const values = points.map((p) => p[1]).filter((v) => v !== null);
  const max = Math.max(1e-9, ...values);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("class", "chart");
  let d = "";
  points.forEach(([_, v], i) => {
    if (v === null) return;
    const x = pad + (i * (w - 2 * pad)) / Math.max(1, points.length - 1);
    const y = h - pad - (v / max) * (h - 2 * pad);
    d += (d ? " L" : "M") + x.toFixed(1) + " " + y.toFixed(1);
  });
  const axis = document.createElementNS("http://www.w3.org/2000/svg", "line");
  axis.setAttribute("x1", pad); axis.setAttribute("x2", w - pad);
  axis.setAttribute("y1", h - pad); axis.setAttribute("y2", h - pad);
  axis.setAttribute("class", "axis");
  const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
  path.setAttribute("d", d || "M0 0");
  svg.append(axis, path);
  // A dot per bin with data: a single busy bin still shows.
  points.forEach(([_, v], i) => {
    if (v === null) return;
    const dot = document.createElementNS("http://www.w3.org/2000/svg", "circle");
    dot.setAttribute("cx", (pad + (i * (w - 2 * pad)) / Math.max(1, points.length - 1)).toFixed(1));
    dot.setAttribute("cy", (h - pad - (v / max) * (h - 2 * pad)).toFixed(1));
    dot.setAttribute("r", "2.5");
    svg.append(dot);
  });
  return el("figure", { class: "chart-box" }, el("figcaption", { text: `${title} (max ${fmt(max)})` }), svg);
}

async function refreshLive() {
  const data = await (await api("live")).json();
  const st = data.status, live = data.live;
  $("#live-cards").replaceChildren(
    card("ready", st.ready ? "yes" : "draining", "card-ready"),
    card("active streams", st.active_streams, "card-active"),
    card("requests (window)", live.requests, "card-requests"),
    card("timeouts", Object.values(live.timeouts).reduce((a, b) => a + b, 0), "card-timeouts"),
    card("disconnects", live.disconnects, "card-disconnects"),
  );
  const backends = [];
  for (const b of st.backends) for (const r of b.replicas) backends.push([b.name, r.url, r.healthy ? "yes" : "NO", r.in_flight, r.open_connections]);
  fillRows($("#backends"), backends);
  fillRows($("#queues"), st.queues.map((q) => [q.name, q.in_use, q.limit, q.queued, q.max_queue, q.rejected]));
  $("#window").textContent = Math.round(live.window_s / 60) + " min";
  fillRows($("#routes"), live.routes.map((r) => [
    r.route, r.requests, r.errors,
    ms(r.ttft && r.ttft.p50), ms(r.ttft && r.ttft.p90), ms(r.ttft && r.ttft.p99),
    ms(r.itl && r.itl.p50), ms(r.itl && r.itl.p90), ms(r.itl && r.itl.p99),
    num(r.tokens_per_s),
  ]));
  const charts = [];
  for (const r of live.routes) {
    charts.push(el("h4", { text: r.route }));
    const row = el("div", { class: "chart-row" });
    row.append(lineChart("TTFT p50", r.series.map((s) => [s.t, s.ttft_p50]), ms));
    row.append(lineChart("inter-token p50", r.series.map((s) => [s.t, s.itl_p50]), ms));
    row.append(lineChart("tokens/s", r.series.map((s) => [s.t, s.tokens_per_s]), (v) => num(v)));
    charts.push(row);
  }
  $("#charts").replaceChildren(...charts);
  $("#live-updated").textContent = "updated " + when(live.now);
}

// -- config ----------------------------------------------------------------------------
async function refreshConfig() {
  const data = await (await api("config")).json();
  $("#serving").textContent = data.serving;
  const err = data.last_error;
  $("#reload-error").hidden = !err;
  if (err) {
    $("#reload-error-text").textContent = err.message;
    $("#reload-error-at").textContent = `${when(err.at)} (${err.trigger})`;
  }
  const versions = data.versions;
  const body = $("#history tbody");
  body.replaceChildren(...versions.slice().reverse().map((v, i, all) => {
    const prev = all[i + 1];
    const link = prev ? el("button", { type: "button", class: "link", text: "vs previous" }) : el("span", { class: "muted", text: "first" });
    if (prev) link.addEventListener("click", () => showDiff(prev.version, v.version));
    return el("tr", { class: v.version === data.serving ? "serving" : "" },
      el("td", {}, el("code", { text: v.version.slice(0, 16) })), el("td", { text: when(v.at) }),
      el("td", { text: v.trigger }), el("td", { text: v.files.join(", ") }), el("td", {}, link));
  }));
  for (const sel of [$("#diff-from"), $("#diff-to")]) {
    sel.replaceChildren(...versions.map((v) => el("option", { value: v.version, text: `${v.version.slice(0, 12)} · ${when(v.at)}` })));
  }
  if (versions.length > 1) $("#diff-from").value = versions[versions.length - 2].version;
  if (versions.length) $("#diff-to").value = versions[versions.length - 1].version;
}

async function showDiff(from, to) {
  const resp = await api(`config/diff?from=${encodeURIComponent(from)}&to=${encodeURIComponent(to)}`);
  const data = await resp.json();
  const pre = $("#diff");
  pre.replaceChildren();
  const text = resp.ok ? data.diff || "(no difference)" : data.error.message;
  for (const line of text.split("\n")) {
    const cls = line.startsWith("+") && !line.startsWith("+++") ? "add" : line.startsWith("-") && !line.startsWith("---") ? "del" : "";
    pre.append(el("span", { class: cls, text: line + "\n" }));
  }
}

// -- A/B -------------------------------------------------------------------------------
function ciBar(estimate, lo, hi, value) {
  const w = 160, h = 14;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("class", "ci");
  if (!estimate || !estimate.ci) return svg;
  const x = (v) => (w * (v - lo)) / Math.max(1e-9, hi - lo);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "rect");
  line.setAttribute("x", x(estimate.ci[0]).toFixed(1));
  line.setAttribute("width", Math.max(1, x(estimate.ci[1]) - x(estimate.ci[0])).toFixed(1));
  line.setAttribute("y", "5"); line.setAttribute("height", "4");
  const dot = document.createElementNS("http://www.w3.org/2000/svg", "circle");
  dot.setAttribute("cx", x(value).toFixed(1)); dot.setAttribute("cy", "7"); dot.setAttribute("r", "4");
  svg.append(line, dot);
  return svg;
}

async function refreshAB() {
  const data = await (await api("ab")).json();
  const blocks = [];
  for (const rep of data.experiments) {
    const box = el("div", { class: "experiment", "data-experiment": rep.experiment });
    box.append(el("h3", { text: rep.experiment }));
    if (rep.error) { box.append(el("p", { class: "muted", text: rep.error })); blocks.push(box); continue; }
    const scores = rep.variants.flatMap((v) => (v.score && v.score.ci ? v.score.ci : []));
    const lo = Math.min(0, ...scores), hi = Math.max(1, ...scores);
    const table = el("table", { class: "ab" }, el("thead", {}, el("tr", {}, ...["variant", "preset", "n", "share", "weight", "mean score", "95% CI", "", "good rate", "95% CI", ""].map((t) => el("th", { text: t })))));
    const body = el("tbody");
    for (const v of rep.variants) {
      const s = v.score, l = v.label;
      body.append(el("tr", { "data-variant": v.name },
        el("td", { text: v.name }), el("td", { text: v.preset }), el("td", { class: "n", text: String(v.n) }),
        el("td", { text: num(v.share * 100) + "%" }), el("td", { text: v.weight === null ? "–" : num(v.weight * 100) + "%" }),
        el("td", { class: "mean-score", text: s ? num(s.mean, 3) : "–" }),
        el("td", { text: s && s.ci ? `${num(s.ci[0], 3)} – ${num(s.ci[1], 3)}` : "–" }),
        el("td", {}, ciBar(s, lo, hi, s ? s.mean : 0)),
        el("td", { class: "good-rate", text: l ? num(l.rate * 100) + "%" : "–" }),
        el("td", { text: l ? `${num(l.ci[0] * 100)}% – ${num(l.ci[1] * 100)}%` : "–" }),
        el("td", {}, ciBar(l, 0, 1, l ? l.rate : 0))));
    }
    table.append(body);
    box.append(el("p", { class: "muted", text: `${rep.requests} requests` }), table);
    for (const c of rep.comparisons) {
      const t = c.test;
      const stat = t ? `${t.test} statistic ${num(t.statistic, 3)}, p = ${t.p_value.toExponential(2)}` : "no test yet";
      box.append(el("p", { class: "verdict", "data-metric": c.metric }, el("strong", { text: `${c.variant} vs ${c.control} (${c.metric}): ` }), `${stat}. ${c.verdict}`));
    }
    blocks.push(box);
  }
  if (!blocks.length) blocks.push(el("p", { class: "muted", text: "No experiments configured." }));
  $("#ab").replaceChildren(...blocks);
}

// -- playground ------------------------------------------------------------------------
function tokenSpan(entry) {
  const p = Math.exp(entry.logprob);
  const span = el("span", { class: "tok", text: entry.token });
  span.dataset.p = p.toFixed(4);
  span.style.setProperty("--p", p.toFixed(3));
  span.alternatives = entry.top_logprobs || [];
  return span;
}

function showTip(event) {
  const span = event.target.closest(".tok");
  const tip = $("#play-tip");
  if (!span) { tip.hidden = true; return; }
  const rows = span.alternatives.map((a) => el("tr", {}, el("td", {}, el("code", { text: JSON.stringify(a.token) })), el("td", { text: (Math.exp(a.logprob) * 100).toFixed(1) + "%" })));
  tip.replaceChildren(el("div", { text: `p = ${(Number(span.dataset.p) * 100).toFixed(1)}%` }), el("table", {}, ...rows));
  tip.hidden = false;
  tip.style.left = event.pageX + 12 + "px";
  tip.style.top = event.pageY + 12 + "px";
}

async function play(event) {
  event.preventDefault();
  const out = $("#play-out");
  out.replaceChildren();
  $("#play-end").textContent = "";
  const request = {
    route: $("#play-route").value, preset: $("#play-preset").value,
    prompt: $("#play-prompt").value, max_tokens: Number($("#play-max").value),
  };
  const body = JSON.stringify(request);
  const opts = { method: "POST", body, headers: { "content-type": "application/json" } };
  const plan = await api("playground/plan", opts);
  const planData = await plan.json();
  if (!plan.ok) { $("#play-end").textContent = planData.error.message; return; }
  const sent = $("#play-sent");
  sent.replaceChildren(el("strong", { text: `preset ${planData.preset || "(none)"}${planData.variant ? " · variant " + planData.variant : ""}, policy ${planData.policy || "(none)"}: ` }),
    el("code", { text: JSON.stringify(planData.fields) }));
  $("#play-state").textContent = "streaming…";
  out.classList.add("streaming");
  const resp = await api("playground", opts);
  if (!resp.ok || !resp.body) {
    const err = await resp.json().catch(() => null);
    $("#play-end").textContent = err ? err.error.message : `HTTP ${resp.status}`;
    $("#play-state").textContent = "";
    out.classList.remove("streaming");
    return;
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", finish = null, stopReason = null, usage = null, failure = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) { failure = chunk.error; continue; }
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const entries = choice.logprobs && choice.logprobs.content;
          if (entries) for (const entry of entries) out.append(tokenSpan(entry));
          else if (choice.delta && choice.delta.content) out.append(el("span", { class: "tok unknown", text: choice.delta.content }));
          if (choice.finish_reason) { finish = choice.finish_reason; stopReason = choice.stop_reason; }
        }
      }
    }
  }
  out.classList.remove("streaming");
  $("#play-state").textContent = "done";
  const parts = [];
  if (failure) parts.push(`ended by ${failure.code}: ${failure.message}`);
  if (finish) parts.push(`finish_reason: ${finish}`);
  if (stopReason !== null && stopReason !== undefined) parts.push(`rule: ${JSON.stringify(stopReason)}`);
  if (usage) parts.push(`${usage.completion_tokens} tokens`);
  $("#play-end").textContent = parts.join(" · ");
  $("#play-end").dataset.finish = finish || "";
}

// -- start -----------------------------------------------------------------------------
async function start() {
  const resp = await fetch("/console/api/session", { credentials: "same-origin" });
  if (!resp.ok) { location.reload(); return; }
  session = await resp.json();
  $("#version").textContent = "config " + session.version.slice(0, 12);
  $("#play-route").replaceChildren(...session.routes.map((r) => el("option", { value: r, text: r })));
  $("#play-preset").append(...session.presets.map((p) => el("option", { value: p, text: p })));
  $("#diff-show").addEventListener("click", () => showDiff($("#diff-from").value, $("#diff-to").value));
  $("#play").addEventListener("submit", play);
  $("#play-out").addEventListener("mousemove", showTip);
  $("#play-out").addEventListener("mouseleave", () => { $("#play-tip").hidden = true; });
  $("#logout").addEventListener("click", async () => { await fetch("/console/logout", { method: "POST", headers: { "x-csrf-token": session.csrf } }); location.reload(); });
  window.addEventListener("hashchange", () => show(location.hash.slice(1) || "live"));
  show(location.hash.slice(1) || "live");
}

start();
