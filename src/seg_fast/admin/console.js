// The seg-fast console: vanilla JS, served by the admin listener, no build step.
// Authentication is an HttpOnly session cookie; every state-changing call carries the
// session's CSRF token in X-CSRF-Token. Text from the server is always set as text.
"use strict";

const $ = (id) => document.getElementById(id);
let csrf = "";
const state = { sort: "last_seen", order: "desc", offset: 0, total: 0, detail: null, historyAt: 0 };
const LEVELS = ["all", "trace", "debug", "info", "warn", "error", "off"];

async function api(method, path, body) {
  const headers = {};
  if (method !== "GET") headers["X-CSRF-Token"] = csrf;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, credentials: "same-origin",
                                body: body === undefined ? undefined : JSON.stringify(body) });
  const type = r.headers.get("content-type") || "";
  const data = type.startsWith("application/json") ? await r.json() : await r.text();
  if (r.status === 401 && path !== "/seg/session") { showLogin(); }
  if (!r.ok) {
    const msg = (data && data.error) || (r.status + " " + path);
    $("error").textContent = msg;
    throw new Error(msg);
  }
  $("error").textContent = "";
  return data;
}

function showLogin() {
  $("app").hidden = true; $("tabs").hidden = true; $("logout").hidden = true;
  $("login-view").hidden = false; $("who").textContent = "";
}

function showApp(session) {
  csrf = session.csrf;
  $("login-view").hidden = true; $("app").hidden = false; $("tabs").hidden = false; $("logout").hidden = false;
  $("who").textContent = session.name;
  tab("dashboard");
}

async function login(ev) {
  ev.preventDefault();
  $("login-error").textContent = "";
  try {
    const s = await api("POST", "/seg/session", { token: $("token").value, name: $("name").value });
    $("token").value = "";
    showApp(s);
  } catch (e) { $("login-error").textContent = e.message; }
}

async function logout() {
  try { await api("DELETE", "/seg/session"); } finally { csrf = ""; showLogin(); }
}

function tab(name) {
  document.querySelectorAll("#tabs button").forEach(b => b.classList.toggle("on", b.dataset.tab === name));
  document.querySelectorAll("section.tab").forEach(s => { s.hidden = s.id !== name; });
  if (name === "dashboard") dashboard();
  if (name === "devices") devices();
  if (name === "audit") audit();
  if (name === "settings") settings();
}

// -- dashboard ---------------------------------------------------------------------
function bars(id, counts, blockedKeys) {
  const el = $(id);
  el.replaceChildren();
  const entries = Object.entries(counts || {}).sort((a, b) => b[1] - a[1]);
  const max = Math.max(1, ...entries.map(e => e[1]));
  for (const [k, n] of entries) {
    const row = document.createElement("div"); row.className = "bar";
    const label = document.createElement("span"); label.className = "label"; label.textContent = k; label.title = k;
    const fill = document.createElement("span"); fill.className = "fill";
    if (blockedKeys && blockedKeys(k)) fill.classList.add("blocked");
    fill.style.width = (12 * n / max).toFixed(2) + "em";
    const num = document.createElement("span"); num.className = "n"; num.textContent = n;
    row.append(label, fill, num);
    el.append(row);
  }
  if (!entries.length) el.textContent = "none yet";
}

async function dashboard() {
  const d = await api("GET", "/seg/console/dashboard");
  const s = d.by_status || {};
  $("dash-devices").textContent = d.devices;
  $("dash-allowed").textContent = s.allowed || 0;
  $("dash-blocked").textContent = s.blocked || 0;
  $("dash-testmode-devices").textContent = s.test_mode || 0;
  let requests = 0; const perCommand = {}, perStatus = {};
  for (const [cmd, byStatus] of Object.entries(d.requests || {})) {
    for (const [st, n] of Object.entries(byStatus)) {
      requests += n; perCommand[cmd] = (perCommand[cmd] || 0) + n; perStatus[st] = (perStatus[st] || 0) + n;
    }
  }
  $("dash-requests").textContent = requests;
  $("dash-parked").textContent = d.parked_pings;
  $("dash-errors").textContent = d.mail_server_errors;
  $("dash-workers").textContent = d.workers;
  $("dash-testmode").textContent = d.test_mode ? "ON" : "off";
  $("dash-policies").textContent = d.policies_loaded ? "yes" : "NO (every device is blocked)";
  $("dash-version").textContent = d.snapshot_version;
  $("dash-dx").textContent = d.dx_targets;
  const isBlocked = k => k.startsWith("blocked") || k === "blocked";
  bars("chart-status", d.by_status, isBlocked);
  bars("chart-24h", d.seen_last_24h_by_status, isBlocked);
  bars("chart-reason", d.by_reason, isBlocked);
  bars("chart-commands", perCommand);
  bars("chart-answers", perStatus, k => k >= "400");
  bars("chart-decisions", d.decisions, isBlocked);
  bars("chart-gw", d.gateway_answers);
  bars("chart-platform", d.by_platform);
  const att = d.attachments || {};
  $("dash-att-encrypt").textContent = att.encrypt || 0;
  $("dash-att-block").textContent = att.block || 0;
  $("dash-att-allow").textContent = att.allow || 0;
  $("dash-links").textContent = d.links_rewritten || 0;
  // The history moves in 5-minute steps: redrawn every 30 s, not at every 5 s refresh.
  if (Date.now() - state.historyAt > 30000) await history();
}

// -- the last 24 h: line charts drawn as SVG (no library; colours from the style sheet) --------
const SVG = "http://www.w3.org/2000/svg";
const SHOWN = 7;      // lines per chart; the rest drawn summed as "(other)"

function svg(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  return el;
}

function total(values) { return values.reduce((a, v) => a + (v || 0), 0); }

function lines(id, family, view) {
  const el = $(id);
  el.replaceChildren();
  const all = Object.entries(family || {});
  let entries = all.filter(([, vs]) => vs.some(v => v));
  entries.sort((a, b) => total(b[1]) - total(a[1]));
  if (entries.length > SHOWN) {
    const rest = entries.slice(SHOWN - 1);
    const other = rest[0][1].map((_, i) => {
      const got = rest.map(([, vs]) => vs[i]).filter(v => v !== null && v !== undefined);
      return got.length ? got.reduce((a, v) => a + v, 0) : null;
    });
    entries = entries.slice(0, SHOWN - 1).concat([["(other)", other]]);
  }
  if (!entries.length) { el.textContent = all.length ? "0 throughout" : "none yet"; return; }
  const W = 300, H = 100, n = view.buckets;
  const max = Math.max(1, ...entries.flatMap(([, vs]) => vs.map(v => v || 0)));
  const chart = svg("svg", { viewBox: `0 0 ${W + 40} ${H + 16}`, preserveAspectRatio: "none", role: "img" });
  chart.append(svg("path", { class: "axis", d: `M40 0 V${H} H${W + 40}` }));
  const top = svg("text", { class: "tick", x: 0, y: 10 }); top.textContent = String(max);
  const zero = svg("text", { class: "tick", x: 0, y: H }); zero.textContent = "0";
  const hours = Math.round(n * view.step / 3600);
  const left = svg("text", { class: "tick", x: 40, y: H + 13 }); left.textContent = `-${hours} h`;
  const right = svg("text", { class: "tick", x: W + 40, y: H + 13, "text-anchor": "end" }); right.textContent = "now";
  chart.append(top, zero, left, right);
  const x = i => 40 + (n === 1 ? W : W * i / (n - 1));
  const y = v => H - H * v / max;
  entries.forEach(([key, vs], k) => {
    // Gauges have no value where nothing was sampled: the line breaks there.
    let run = [];
    const flush = () => {
      if (run.length === 1) {
        // One sampled interval alone: a dot (a one-point line would not show).
        const [cx, cy] = run[0].split(",");
        const dot = svg("circle", { class: "k" + k + " dot", cx, cy, r: 2 });
        dot.dataset.key = key;
        chart.append(dot);
      }
      if (run.length > 1) {
        const line = svg("polyline", { class: "k" + k, points: run.join(" ") });
        line.dataset.key = key;
        const t = svg("title"); t.textContent = key; line.append(t);
        chart.append(line);
      }
      run = [];
    };
    vs.forEach((v, i) => {
      if (v === null || v === undefined) { flush(); return; }
      run.push(`${x(i).toFixed(1)},${y(v).toFixed(1)}`);
    });
    flush();
  });
  const legend = document.createElement("div"); legend.className = "legend";
  entries.forEach(([key, vs], k) => {
    const item = document.createElement("span");
    const sw = document.createElement("span"); sw.className = "sw k" + k;
    item.append(sw, document.createTextNode(`${key} ${total(vs)}`));
    item.dataset.key = key;
    legend.append(item);
  });
  el.append(chart, legend);
}

async function history() {
  state.historyAt = Date.now();
  const view = await api("GET", "/seg/console/series?hours=" + encodeURIComponent($("series-hours").value));
  $("series-step").textContent = `(per ${Math.round(view.step / 60)} minutes; counts are per interval, ` +
    "devices and parked Pings the interval's highest)";
  for (const [family, values] of Object.entries(view.series)) {
    if ($("series-" + family)) lines("series-" + family, values, view);
  }
}

// -- list view ---------------------------------------------------------------------
const COLS = [["device_id", "device id"], ["user", "user"], ["mail_client", "mail client"],
  ["device_type", "device type"], ["platform", "platform"], ["model", "model"], ["os", "OS"],
  ["managed", "managed"], ["compliant", "compliant"], ["override", "override"], ["last_seen", "last seen"],
  ["status", "status"], ["reason", "reason"], ["first_seen", "first seen"], ["node", "gateway node"]];

function filterParams() {
  const p = {};
  for (const el of $("filters").elements) if (el.name && el.value !== "") p[el.name] = el.value;
  return p;
}

function when(t) { return t ? new Date(t * 1000).toLocaleString() : "never"; }

function cell(row, key) {
  const v = row[key];
  if (key === "last_seen" || key === "first_seen") return when(v);
  if (v === null || v === undefined) return "–";
  if (typeof v === "boolean") return v ? "yes" : "no";
  return String(v);
}

function head() {
  const tr = $("device-head"); tr.replaceChildren();
  for (const [key, label] of COLS) {
    const th = document.createElement("th");
    th.textContent = label + (state.sort === key ? (state.order === "desc" ? " ▾" : " ▴") : "");
    th.dataset.sort = key;
    if (state.sort === key) th.classList.add("sorted");
    th.onclick = () => {
      if (state.sort === key) state.order = state.order === "desc" ? "asc" : "desc";
      else { state.sort = key; state.order = "asc"; }
      state.offset = 0; devices();
    };
    tr.append(th);
  }
}

async function devices() {
  head();
  const limit = Number($("page-size").value);
  const q = new URLSearchParams({ ...filterParams(), sort: state.sort, order: state.order,
                                  offset: state.offset, limit });
  const d = await api("GET", "/seg/console/devices?" + q);
  state.total = d.total;
  $("count").textContent = d.total + " devices";
  $("page").textContent = d.total ? `${d.offset + 1}–${d.offset + d.devices.length} of ${d.total}` : "";
  $("prev").disabled = d.offset === 0;
  $("next").disabled = d.offset + d.devices.length >= d.total;
  const body = $("device-rows"); body.replaceChildren();
  for (const row of d.devices) {
    const tr = document.createElement("tr");
    tr.dataset.device = row.device_id;
    for (const [key] of COLS) {
      const td = document.createElement("td");
      td.textContent = cell(row, key);
      if (key === "status") td.className = row.status;
      tr.append(td);
    }
    tr.onclick = () => detail(row.device_id);
    body.append(tr);
  }
}

function kv(tableId, obj) {
  const t = $(tableId); t.replaceChildren();
  if (!obj) { t.textContent = "none"; return; }
  for (const [k, v] of Object.entries(obj)) {
    const tr = t.insertRow();
    tr.insertCell().textContent = k;
    tr.insertCell().textContent = (k.endsWith("seen") || k === "last_checkin") && typeof v === "number" ? when(v)
      : (v !== null && typeof v === "object" ? JSON.stringify(v) : String(v));
  }
}

async function detail(id) {
  const d = await api("GET", "/seg/console/device/" + encodeURIComponent(id));
  state.detail = id;
  $("detail").hidden = false;
  $("d-id").textContent = id;
  const t = $("d-trace"); t.replaceChildren();
  for (const step of d.trace) {
    const tr = t.insertRow();
    tr.insertCell().textContent = step.step;
    tr.insertCell().textContent = String(step.result);
  }
  kv("d-seen", d.seen);
  const ident = $("d-identity"); ident.replaceChildren();
  // The protocol version comes with every transaction record; the headers only from Dx.
  const version = ident.insertRow();
  version.insertCell().textContent = "protocol version";
  version.insertCell().textContent = d.protocol_version || "(not seen)";
  if (d.identity && d.identity.headers) {
    for (const [k, v] of d.identity.headers) {
      const row = ident.insertRow();
      row.insertCell().textContent = k; row.insertCell().textContent = v;
    }
  } else {
    const row = ident.insertRow();
    row.insertCell().textContent = "headers";
    row.insertCell().textContent = "none: start Dx logging for this device to see them";
  }
  const recent = $("d-recent-rows"); recent.replaceChildren();
  for (const r of d.recent || []) {
    const tr = recent.insertRow();
    for (const v of [when(r.ts), r.command || "", r.status, r.decision || "", r.total_ms ?? "", r.upstream || ""])
      tr.insertCell().textContent = String(v);
    tr.dataset.command = r.command || "";
  }
  kv("d-record", d.record ? { ...d.record, key_id: d.key_id } : null);
  $("d-keygen").textContent = d.key_generation;
  const link = $("d-dx-download");
  link.href = "/seg/dx/device/" + encodeURIComponent(id) + "/log";
  await dxState();
}

async function dxState() {
  if (!state.detail) return;
  const list = await api("GET", "/seg/dx");
  const mine = (list.targets || []).find(t => t.kind === "device" && t.target.toLowerCase() === state.detail.toLowerCase());
  $("d-dx-state").textContent = mine ? "on until " + when(mine.until) : "off";
}

async function override(ov) {
  const id = state.detail;
  if (ov === "blacklist" && !confirm(`Blacklist device ${id}? It is refused from its next request.`)) return;
  await api("POST", "/seg/device/" + encodeURIComponent(id) + "/override", { override: ov });
  await detail(id); await devices();
}

async function bulk(ov) {
  const filter = filterParams();
  const n = state.total;
  if (!Object.keys(filter).length) { $("error").textContent = "set a filter first: a bulk action never runs over every device by accident"; return; }
  if (!confirm(`Set ${ov} on the ${n} devices this filter selects?`)) return;
  await api("POST", "/seg/console/override/" + ov, { filter, expected: n });
  await devices();
}

// Bulk actions over the filter (never over every device by accident), confirmed by their count.
async function bulkAction(path, question, extra) {
  const filter = filterParams();
  const n = state.total;
  if (!Object.keys(filter).length) { $("error").textContent = "set a filter first: a bulk action never runs over every device by accident"; return; }
  if (!confirm(question(n))) return;
  await api("POST", path, { filter, expected: n, ...(extra || {}) });
  await devices();
}

async function compliance() {
  if (!Object.keys(filterParams()).length) {
    if (!confirm("Run compliance for every device seen?")) return;
    await api("POST", "/seg/compliance/run");
    return devices();
  }
  await bulkAction("/seg/console/compliance", n => `Run compliance for the ${n} devices this filter selects?`);
}

async function deleteUnmanaged() {
  const days = $("del-days").value;
  const q = new URLSearchParams({ managed: "false", not_seen_days: days, limit: 1 });
  const d = await api("GET", "/seg/console/devices?" + q);
  if (!confirm(`Delete ${d.total} unmanaged devices not seen for ${days} days from the list?`)) return;
  await api("POST", "/seg/console/delete-unmanaged/" + encodeURIComponent(days), { expected: d.total });
  await devices();
}

// -- audit, settings, Dx ---------------------------------------------------------------
async function audit() {
  const d = await api("GET", "/seg/console/audit");
  const body = $("audit-rows"); body.replaceChildren();
  for (const e of d.entries) {
    const tr = body.insertRow();
    tr.insertCell().textContent = when(e.ts);
    tr.insertCell().textContent = e.who;
    tr.insertCell().textContent = e.action;
    const rest = { ...e }; delete rest.ts; delete rest.who; delete rest.action;
    tr.insertCell().textContent = JSON.stringify(rest);
  }
}

async function settings() {
  const levels = await api("GET", "/seg/logging");
  const table = $("levels"); table.replaceChildren();
  for (const [area, level] of Object.entries(levels)) {
    const row = table.insertRow();
    row.insertCell().textContent = area;
    const sel = document.createElement("select");
    for (const l of LEVELS) sel.add(new Option(l, l, false, l === level));
    sel.onchange = () => api("PUT", "/seg/logging", { [area]: sel.value });
    row.insertCell().append(sel);
  }
  await dxList();
}

async function dxList() {
  const d = await api("GET", "/seg/dx");
  const body = $("dx-rows"); body.replaceChildren();
  for (const t of d.targets) {
    const tr = body.insertRow();
    tr.insertCell().textContent = t.kind + " " + t.target;
    tr.insertCell().textContent = when(t.until);
    const a = document.createElement("a");
    a.href = `/seg/dx/${t.kind}/${encodeURIComponent(t.target)}/log`; a.textContent = "download";
    a.setAttribute("download", "");
    tr.insertCell().append(a);
    const stop = document.createElement("button"); stop.textContent = "stop";
    stop.onclick = async () => { await api("DELETE", `/seg/dx/${t.kind}/${encodeURIComponent(t.target)}`); dxList(); };
    tr.insertCell().append(stop);
  }
}

async function dxStart(kind, target, minutes) {
  await api("POST", "/seg/dx", { kind, target, minutes: Number(minutes) });
}

function init() {
  $("login-form").onsubmit = login;
  $("logout").onclick = logout;
  document.querySelectorAll("#tabs button").forEach(b => b.onclick = () => tab(b.dataset.tab));
  $("filters").onsubmit = (ev) => { ev.preventDefault(); state.offset = 0; devices(); };
  $("filters").onreset = () => setTimeout(() => { state.offset = 0; devices(); }, 0);
  $("prev").onclick = () => { state.offset = Math.max(0, state.offset - Number($("page-size").value)); devices(); };
  $("next").onclick = () => { state.offset += Number($("page-size").value); devices(); };
  $("page-size").onchange = () => { state.offset = 0; devices(); };
  document.querySelectorAll("[data-bulk]").forEach(b => b.onclick = () => bulk(b.dataset.bulk));
  document.querySelectorAll("[data-ov]").forEach(b => b.onclick = () => override(b.dataset.ov));
  $("d-close").onclick = () => { $("detail").hidden = true; state.detail = null; };
  $("d-dx-start").onclick = async () => { await dxStart("device", state.detail, 60); await dxState(); };
  $("d-dx-stop").onclick = async () => {
    await api("DELETE", "/seg/dx/device/" + encodeURIComponent(state.detail)); await dxState(); };
  $("d-compliance").onclick = async () => {
    await api("POST", "/seg/console/compliance", { ids: [state.detail], expected: 1 });
    await detail(state.detail); await devices();
  };
  $("d-rotate").onclick = async () => {
    if (!confirm(`New attachment key for ${state.detail}? Attachments sealed from now on use it.`)) return;
    await api("POST", "/seg/console/device/" + encodeURIComponent(state.detail) + "/rotate-key");
    await detail(state.detail);
  };
  $("series-hours").onchange = () => history().catch(() => {});
  $("compliance").onclick = compliance;
  $("bulk-rotate").onclick = () => bulkAction("/seg/console/rotate-key",
    n => `New attachment keys for the ${n} devices this filter selects? Attachments sealed from now on use them.`);
  $("bulk-dx-start").onclick = () => bulkAction("/seg/console/dx/start",
    n => `Start Dx logging (60 min) for the ${n} devices this filter selects?`, { minutes: 60 });
  $("bulk-dx-stop").onclick = () => bulkAction("/seg/console/dx/stop",
    n => `Stop Dx logging for the ${n} devices this filter selects?`);
  $("delete-unmanaged").onclick = deleteUnmanaged;
  $("tm-on").onclick = () => confirm("Turn test mode on? Nothing is blocked while it is on.") &&
    api("POST", "/seg/testmode", { enabled: true });
  $("tm-off").onclick = () => api("POST", "/seg/testmode", { enabled: false });
  $("dx-start").onclick = async () => { await dxStart($("dx-kind").value, $("dx-target").value, $("dx-minutes").value); dxList(); };
  setInterval(() => { if (!$("app").hidden && !$("dashboard").hidden) dashboard().catch(() => {}); }, 5000);
  fetch("/seg/session", { credentials: "same-origin" }).then(async r => {
    if (r.ok) showApp(await r.json()); else showLogin();
  }).catch(showLogin);
}

document.addEventListener("DOMContentLoaded", init);
