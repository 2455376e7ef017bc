// markco's operator page. Every value from the gateway (route names, user ids, upstream answers)
// is data: it reaches the page through textContent and attributes only, never as markup.
"use strict";

const KEY = "markco_admin_token";
const REFRESH_MS = 5000;
const CERT_WARN_DAYS = 14;
let previous = null; // the last metrics sample, for rates

// The token: from ?token= (then kept for this tab and removed from the address bar), or from
// this tab's storage.
function takeToken() {
  const url = new URL(window.location.href);
  const fromUrl = url.searchParams.get("token");
  if (fromUrl) {
    sessionStorage.setItem(KEY, fromUrl);
    url.searchParams.delete("token");
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
  return sessionStorage.getItem(KEY);
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    tr.appendChild(c instanceof Node ? wrap(c) : el("td", c === undefined || c === null ? "-" : c));
  }
  return tr;
}

function wrap(node) {
  if (node.tagName === "TD") return node;
  const td = document.createElement("td");
  td.appendChild(node);
  return td;
}

function fill(id, rows, emptyText) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren();
  if (rows.length === 0) {
    const td = el("td", emptyText, "empty");
    td.colSpan = document.querySelectorAll("#" + id + " th").length;
    const tr = document.createElement("tr");
    tr.appendChild(td);
    body.appendChild(tr);
    return;
  }
  for (const r of rows) body.appendChild(r);
}

function span(secs) {
  const s = Math.abs(Math.round(secs));
  if (s < 120) return s + "s";
  if (s < 7200) return Math.floor(s / 60) + "m";
  if (s < 172800) return Math.floor(s / 3600) + "h";
  return Math.floor(s / 86400) + "d";
}

class Unauthorized extends Error {}

async function api(path, options) {
  const token = sessionStorage.getItem(KEY);
  const resp = await fetch(path, {
    ...options,
    headers: { Authorization: "Bearer " + token },
    cache: "no-store",
  });
  if (resp.status === 401 || resp.status === 403) throw new Unauthorized("the gateway refused this token");
  return resp;
}

async function json(path) {
  const resp = await api(path);
  let body = null;
  try {
    body = await resp.json();
  } catch (e) {
    body = null;
  }
  if (!resp.ok) {
    const why = body && typeof body.error === "string" ? body.error : "HTTP " + resp.status;
    throw new Error(path + ": " + why);
  }
  return body;
}

// Prometheus text: the value of each series of `name`, with its labels.
function series(text, name) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line.startsWith(name + "{") && !line.startsWith(name + " ")) continue;
    const m = line.match(/^([a-z_:]+)(?:\{(.*)\})? ([0-9.eE+-]+|NaN)$/);
    if (!m || m[1] !== name) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(/([a-zA-Z_]+)="((?:[^"\\]|\\.)*)"/g)) {
      // Label values escape backslash, quote and newline.
      labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    out.push({ labels, value: Number(m[3]) });
  }
  return out;
}

function traffic(text) {
  const now = Date.now() / 1000;
  const byRoute = new Map();
  const get = (r) => {
    if (!byRoute.has(r)) byRoute.set(r, { requests: 0, errors: 0, ws: 0 });
    return byRoute.get(r);
  };
  for (const s of series(text, "markco_http_requests_total")) {
    const t = get(s.labels.route || "-");
    t.requests += s.value;
    if (s.labels.status_class === "5xx") t.errors += s.value;
  }
  for (const s of series(text, "markco_websockets_open")) get(s.labels.route || "-").ws += s.value;
  const rows = [];
  for (const [route, t] of [...byRoute.entries()].sort()) {
    const before = previous && previous.byRoute.get(route);
    const dt = previous ? now - previous.at : 0;
    const rate = (a, b) => (before && dt > 0 ? ((a - b) / dt).toFixed(1) : "…");
    rows.push(row([route, t.requests, el("td", t.errors, t.errors > 0 ? "bad" : ""),
      rate(t.requests, before ? before.requests : 0), rate(t.errors, before ? before.errors : 0), t.ws]));
  }
  document.getElementById("traffic-note").textContent = previous ? "" : "(rates after the next refresh)";
  previous = { at: now, byRoute };
  fill("traffic", rows, "no requests yet");
}

function button(label, action, attrs) {
  const b = el("button", label);
  b.type = "button";
  b.dataset.action = action;
  for (const [k, v] of Object.entries(attrs)) b.dataset[k] = v;
  return b;
}

async function render() {
  const [status, routes, workspaces, certs, metrics] = await Promise.all([
    json("/status"),
    json("/routes"),
    json("/api/admin/workspaces"),
    json("/certs"),
    api("/metrics").then((r) => r.text()),
  ]);
  const healthy = status.status === "ok";
  document.getElementById("summary").textContent =
    "v" + status.version + " · pid " + status.pid + " · " + (healthy ? "healthy" : "DEGRADED");

  fill("health", (status.health_checks || []).map((c) => row([
    c.name, c.url, el("td", c.passing ? "ok" : "FAILING", c.passing ? "good" : "bad"), c.disables_route,
  ])), "no health checks configured");

  traffic(metrics);

  document.getElementById("generation").textContent = "(generation " + routes.generation + ")";
  const routeRows = [];
  for (const site of routes.sites || []) {
    for (const r of site.routes || []) {
      const holders = Array.isArray(r.holders) ? r.holders.join(", ") : (r.disabled ? "admin or health check" : "");
      const target = r.target !== undefined ? r.target : (r.status !== undefined ? "status " + r.status : "-");
      const toggle = r.disabled
        ? button("Enable", "enable", { route: r.name })
        : button("Disable", "disable", { route: r.name });
      routeRows.push(row([(site.hosts || []).join(", "), r.name, (r.match || []).join(" "), r.action, target,
        el("td", r.disabled ? "OFF" : "on", r.disabled ? "off" : "on"), holders, toggle]));
    }
  }
  fill("routes", routeRows, "no routes");

  const now = Date.now() / 1000;
  fill("workspaces", (workspaces.workspaces || []).map((w) => {
    const idleSince = w.last_activity || w.last_request_at || null;
    return row([w.user_id, w.state, w.plan || "-",
      w.editor_host + ":" + w.editor_port, w.runtime_host + ":" + w.runtime_port,
      idleSince ? span(now - idleSince) : "-",
      w.state === "running" ? button("Stop", "stop", { user: w.user_id }) : ""]);
  }), "no workspaces");

  // Runtime moves: shown when this gateway's admin API lists them.
  let moves = null;
  try {
    moves = await json("/api/admin/moves");
  } catch (e) {
    if (e instanceof Unauthorized) throw e;
  }
  fill("moves", moves && Array.isArray(moves.moves) ? moves.moves.slice(0, 20).map((m) => row([
    m.at ? new Date(m.at * 1000).toISOString() : "-", m.user_id || m.user, m.from, m.to,
  ])) : [], moves ? "no runtime moves yet" : "this gateway does not list runtime moves");

  fill("certs", (certs.certificates || []).map((c) => {
    const left = c.not_after - now;
    const cls = left < 0 ? "bad" : left < CERT_WARN_DAYS * 86400 ? "soon" : "";
    return row([c.host, c.source, c.issuer,
      el("td", (left < 0 ? "EXPIRED " + span(-left) + " ago" : "in " + span(left)), cls)]);
  }), "no certificates");
}

function showLogin(message) {
  document.getElementById("data").hidden = true;
  document.getElementById("logout").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("summary").textContent = "";
  document.getElementById("error").textContent = message || "";
}

let timer = null;
async function refresh() {
  try {
    await render();
    document.getElementById("error").textContent = "";
    document.getElementById("data").hidden = false;
    document.getElementById("logout").hidden = false;
    document.getElementById("login").hidden = true;
  } catch (e) {
    if (e instanceof Unauthorized) {
      sessionStorage.removeItem(KEY);
      clearInterval(timer);
      showLogin("The gateway refused this token.");
      return;
    }
    document.getElementById("error").textContent = "Cannot load: " + e.message;
  }
}

function start() {
  clearInterval(timer);
  refresh();
  timer = setInterval(refresh, REFRESH_MS);
}

document.addEventListener("click", async (ev) => {
  const b = ev.target.closest("button[data-action]");
  if (!b) return;
  const paths = {
    disable: () => "/api/admin/routes/" + encodeURIComponent(b.dataset.route) + "/disable",
    enable: () => "/api/admin/routes/" + encodeURIComponent(b.dataset.route) + "/enable",
    stop: () => "/api/admin/workspaces/" + encodeURIComponent(b.dataset.user) + "/stop",
  };
  const path = paths[b.dataset.action];
  if (!path) return;
  b.disabled = true;
  let refused = null;
  try {
    const resp = await api(path(), { method: "POST" });
    if (!resp.ok) {
      refused = "HTTP " + resp.status;
      try { refused = (await resp.json()).error || refused; } catch (e) { /* not JSON */ }
    }
  } catch (e) {
    refused = e.message;
  }
  await refresh();
  // After the refresh, which clears old messages.
  if (refused) document.getElementById("error").textContent = "Refused: " + refused;
});

document.getElementById("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const t = document.getElementById("token").value.trim();
  if (!t) return;
  sessionStorage.setItem(KEY, t);
  document.getElementById("token").value = "";
  start();
});

document.getElementById("logout").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  clearInterval(timer);
  showLogin("");
});

if (takeToken()) start(); else showLogin("");
