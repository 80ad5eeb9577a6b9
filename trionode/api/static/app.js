// trionode's page: plain JavaScript, no framework, nothing loaded from elsewhere.
// Every piece of text from the node goes into the DOM as text (never as HTML), so data
// written by a peer can't run script here. Errors from the API are shown as sentences.
"use strict";

// -- small helpers ------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, String(value));
  }
  for (const child of children) node.append(child);
  return node;
}

function short(id, n = 10) {
  return id && id.length > n ? `${id.slice(0, n)}…` : id || "";
}

function ago(seconds) {
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
  if (seconds < 86400) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86400).toFixed(1)} days`;
}

function pretty(value) {
  return value === undefined ? "(nothing)" : JSON.stringify(value, null, 2);
}

function card(title, ...children) {
  const id = `h-${title.toLowerCase().replace(/[^a-z0-9]+/g, "-")}`;
  return el("section", { class: "card", "aria-labelledby": id }, el("h2", { id, text: title }), ...children);
}

function field(label, input, hint) {
  if (!input.id) input.id = `f-${Math.random().toString(36).slice(2)}`;
  return el("div", { class: "field" }, el("label", { for: input.id }, label, hint ? el("span", { class: "hint", text: ` ${hint}` }) : null), input);
}

function table(headers, rows, empty) {
  if (!rows.length) return el("p", { class: "empty", text: empty });
  return el("div", { class: "table-wrap" }, el("table", {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col", class: h.optional ? "optional" : null, text: h.label || h })))),
    el("tbody", {}, rows)));
}

// -- talking to the node ------------------------------------------------------------------

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

function readableError(body, response) {
  const error = body && body.error;
  if (error && typeof error.message === "string") return error.message;
  return `${response.status} ${response.statusText || "error"}`;
}

async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError("The node can't be reached. Is it still running?", 0);
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (response.status === 401 && path !== "/admin/session") {
    showSignIn();
    throw new ApiError("Your session has ended: sign in again.", 401);
  }
  if (!response.ok) throw new ApiError(readableError(data, response), response.status);
  return data;
}

let rpcId = 0;
function rpcMessage(error) {
  let text = error.message || "the call failed";
  const data = error.data;
  if (data && typeof data === "object" && "type" in data) {
    text = `${data.type}: ${text}`;
    if (data.detail !== null && data.detail !== undefined) text += ` (${JSON.stringify(data.detail)})`;
  } else if (data !== undefined && data !== null) {
    text += ` (${typeof data === "string" ? data : JSON.stringify(data)})`;
  }
  return `${text} [code ${error.code}]`;
}

async function rpc(contextId, method, args) {
  rpcId += 1;
  const body = await api("POST", "/jsonrpc", {
    jsonrpc: "2.0", id: rpcId, method: "execute", params: { contextId, method, argsJson: args },
  });
  if (body.error) throw new ApiError(rpcMessage(body.error), body.error.code);
  return body.result;
}

// -- transfers with progress ----------------------------------------------------------------

function bytesText(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1048576) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1073741824) return `${(n / 1048576).toFixed(1)} MiB`;
  return `${(n / 1073741824).toFixed(2)} GiB`;
}

// A <progress> with its text, for one upload or download at a time.
function progressBar(label) {
  const bar = el("progress", { max: 1, value: 0, "aria-label": label });
  const text = el("span", { class: "hint", role: "status", "aria-live": "polite" });
  const box = el("div", { class: "progress", hidden: true }, bar, text);
  return {
    box,
    show(done, total, what) {
      box.hidden = false;
      bar.max = total || 1;
      bar.value = Math.min(done, total || 1);
      text.textContent = `${what} ${bytesText(done)}${total ? ` of ${bytesText(total)}` : ""}`;
    },
    hide() { box.hidden = true; },
  };
}

// Sends a File as the request body (streamed by the browser, not read into memory here);
// XHR because fetch() has no upload progress. Resolves with the JSON answer.
function uploadFile(url, file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.addEventListener("progress", (e) => onProgress(e.loaded, e.lengthComputable ? e.total : file.size));
    xhr.addEventListener("error", () => reject(new ApiError("The upload failed: the node can't be reached or closed the connection.", 0)));
    xhr.addEventListener("load", () => {
      let data = null;
      try {
        data = JSON.parse(xhr.responseText);
      } catch {
        data = null;
      }
      if (xhr.status === 401) showSignIn();
      if (xhr.status >= 200 && xhr.status < 300) resolve(data);
      else reject(new ApiError(readableError(data, { status: xhr.status, statusText: xhr.statusText }), xhr.status));
    });
    xhr.send(file);
  });
}

// Reads a response body with progress, then hands it to the browser as a download.
async function downloadWithProgress(path, filename, size, onProgress) {
  let response;
  try {
    response = await fetch(path, { credentials: "same-origin" });
  } catch {
    throw new ApiError("The node can't be reached. Is it still running?", 0);
  }
  if (!response.ok) {
    const data = await response.json().catch(() => null);
    throw new ApiError(readableError(data, response), response.status);
  }
  const reader = response.body.getReader();
  const parts = [];
  let done = 0;
  for (;;) {
    const { value, done: finished } = await reader.read();
    if (finished) break;
    parts.push(value);
    done += value.length;
    onProgress(done, size);
  }
  if (done !== size) throw new ApiError(`The download stopped after ${bytesText(done)} of ${bytesText(size)}.`, 0);
  const url = URL.createObjectURL(new Blob(parts, { type: "application/octet-stream" }));
  const link = el("a", { href: url, download: filename, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

// -- notices ------------------------------------------------------------------------------

function notify(message, kind = "error") {
  const box = document.getElementById("notice");
  box.replaceChildren(
    el("span", { text: message }),
    el("button", { type: "button", class: "secondary", "aria-label": "Dismiss", onclick: () => { box.hidden = true; } }, "×"),
  );
  box.className = kind === "error" ? "" : "info";
  box.hidden = false;
}

function clearNotice() {
  document.getElementById("notice").hidden = true;
}

// Runs an action from a button or form: disables it meanwhile and shows any error readably.
async function act(control, action) {
  if (control) control.disabled = true;
  try {
    clearNotice();
    return await action();
  } catch (error) {
    notify(error instanceof ApiError ? error.message : `Unexpected problem: ${error.message}`);
    return undefined;
  } finally {
    if (control) control.disabled = false;
  }
}

function onSubmit(form, action) {
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    act(form.querySelector("button[type=submit]"), () => action(new FormData(form)));
  });
  return form;
}

// -- sign in ------------------------------------------------------------------------------

function showSignIn() {
  leaveView();
  document.getElementById("sign-in").hidden = false;
  document.getElementById("view").hidden = true;
  document.getElementById("nav").hidden = true;
  document.getElementById("sign-out").hidden = true;
  document.getElementById("token").focus();
}

function showApp() {
  document.getElementById("sign-in").hidden = true;
  document.getElementById("view").hidden = false;
  document.getElementById("nav").hidden = false;
  document.getElementById("sign-out").hidden = false;
}

async function signIn(form) {
  const token = form.get("token").trim();
  await api("POST", "/admin/session", { token });
  document.getElementById("token").value = "";
  showApp();
  if (!location.hash || location.hash === "#") location.hash = "#/node";
  else route();
}

async function signOut() {
  await api("DELETE", "/admin/session");
  showSignIn();
}

// -- views --------------------------------------------------------------------------------

let cleanups = [];
function leaveView() {
  for (const fn of cleanups) fn();
  cleanups = [];
}

// Set by route(): the next render() of the view it opened moves focus to the main region.
// Focus moves when the view appears, not when its last request ends: a view may keep loading
// after it is shown (the contexts view fetches each context's peers), and a keyboard user who
// has started tabbing through it must not be sent back to the top when that load finishes.
let focusOnRender = false;

function render(title, ...children) {
  const view = document.getElementById("view");
  view.replaceChildren(el("h1", { text: title }), ...children);
  document.title = `${title} · trionode`;
  if (focusOnRender) {
    focusOnRender = false;
    document.getElementById("main").focus({ preventScroll: true });
  }
}

// The few samples of the Prometheus text the node view shows: {name: {labels: value}}.
function parseMetrics(text) {
  const out = {};
  for (const line of text.split("\n")) {
    const match = /^([a-z_:][a-z0-9_:]*)(\{[^}]*\})?\s+(\S+)/i.exec(line);
    if (!match) continue;
    (out[match[1]] = out[match[1]] || {})[match[2] || ""] = Number(match[3]);
  }
  return out;
}

function metricSum(metrics, name) {
  return Object.values(metrics[name] || {}).reduce((a, b) => a + b, 0);
}

function metricByLabel(metrics, name, label) {
  return Object.entries(metrics[name] || {})
    .map(([labels, value]) => [(new RegExp(`${label}="([^"]*)"`).exec(labels) || [])[1], value])
    .filter(([key, value]) => key && value)
    .map(([key, value]) => `${key} ${value}`)
    .join(", ");
}

async function metricsText() {
  const response = await fetch("/metrics", { credentials: "same-origin" });
  return response.ok ? response.text() : "";
}

// AutoNAT's verdict: {"status": "public" | "private" | "unknown" | "disabled", …}.
function reachabilityText(reachability) {
  if (typeof reachability !== "object") return String(reachability);
  const details = Object.entries(reachability)
    .filter(([key, value]) => key !== "status" && value !== null && value !== undefined && value !== "" && !(Array.isArray(value) && !value.length))
    .map(([key, value]) => `${key}: ${Array.isArray(value) ? value.join(", ") : JSON.stringify(value)}`);
  return [reachability.status || "unknown", ...details].join(" · ");
}

async function nodeView() {
  const [info, peers, contexts, apps, ready, text] = await Promise.all([
    api("GET", "/admin-api/node"),
    api("GET", "/admin-api/peers"),
    api("GET", "/admin-api/contexts"),
    api("GET", "/admin-api/applications"),
    api("GET", "/admin-api/ready").catch((error) => ({ ready: false, reason: error.message })),
    metricsText().catch(() => ""),
  ]);
  const metrics = parseMetrics(text);
  const mib = (bytes) => `${(bytes / 1048576).toFixed(1)} MiB`;
  const addresses = info.addresses || peers.listenAddrs || [];
  render("Node",
    card("This node", el("dl", { class: "facts" },
      el("dt", { text: "Peer id" }), el("dd", { class: "mono", id: "peer-id", text: info.peerId }),
      el("dt", { text: "Version" }), el("dd", { text: info.version }),
      el("dt", { text: "State" }), el("dd", { text: ready.ready ? "ready" : `not ready (${ready.reason || "starting or stopping"})` }),
      el("dt", { text: "Addresses" }), el("dd", {}, addresses.length
        ? el("ul", {}, addresses.map((a) => el("li", { class: "mono", text: a })))
        : el("span", { class: "empty", text: "none" })),
      info.reachability ? [el("dt", { text: "Reachability" }), el("dd", { id: "reachability", text: reachabilityText(info.reachability) })] : null,
      el("dt", { text: "Connected peers" }), el("dd", { text: String(peers.peers.length) }),
      el("dt", { text: "Contexts" }), el("dd", { text: String(contexts.contexts.length) }),
      el("dt", { text: "Applications" }), el("dd", { text: String(apps.applications.length) }),
    )),
    card("Key metrics", el("dl", { class: "facts", id: "metrics" },
      el("dt", { text: "Uptime" }), el("dd", { id: "uptime", text: ago(metricSum(metrics, "trionode_uptime_seconds")) }),
      el("dt", { text: "Deltas" }), el("dd", { text: metricByLabel(metrics, "trionode_deltas_total", "outcome") || "none yet" }),
      el("dt", { text: "Pending deltas" }), el("dd", { text: String(metricSum(metrics, "trionode_deltas_pending")) }),
      el("dt", { text: "Store used" }), el("dd", { text: mib(metricSum(metrics, "trionode_store_used_bytes")) }),
      el("dt", { text: "HTTP requests" }), el("dd", { text: String(metricSum(metrics, "trionode_http_requests_total")) }),
    ), el("p", { class: "hint" }, "All of them: ", el("a", { href: "/metrics", text: "/metrics" }), ".")),
    card("Maintenance", el("p", {},
      el("button", { type: "button", class: "secondary", onclick: (e) => act(e.currentTarget, async () => {
        const result = await api("POST", "/admin-api/gc");
        const parts = Object.entries(result).map(([key, value]) => `${key} ${value}`);
        notify(`Garbage collection done${parts.length ? `: ${parts.join(", ")}` : ""}.`, "info");
      }) }, "Collect garbage now"))));
}

function peerRows(peers) {
  return peers.map((p) => el("tr", {},
    el("td", { class: "mono", title: p.peer_id, text: short(p.peer_id, 16) }),
    el("td", { class: "mono optional", text: p.address || "" }),
    el("td", { text: p.direction }),
    el("td", { text: p.ping_rtt_ms === null || p.ping_rtt_ms === undefined ? "–" : `${p.ping_rtt_ms.toFixed(1)} ms` }),
    el("td", { class: "optional", title: (p.protocols || []).join("\n"), text: `${(p.protocols || []).length} protocols` }),
    el("td", { class: "optional", text: ago(p.connected_for || 0) }),
  ));
}

async function peersView() {
  const body = el("div", {});
  const headers = ["Peer", { label: "Address", optional: true }, "Direction", "Latency",
    { label: "Protocols", optional: true }, { label: "Connected", optional: true }];
  async function refresh() {
    const peers = await api("GET", "/admin-api/peers");
    body.replaceChildren(table(headers, peerRows(peers.peers), "No peers connected."));
  }
  const address = el("input", { name: "address", required: true, placeholder: "/ip4/192.0.2.1/tcp/2428/p2p/12D3KooW…", autocomplete: "off" });
  const form = onSubmit(el("form", { class: "inline" }, field("Multiaddr", address), el("button", { type: "submit" }, "Connect")),
    async (data) => {
      const result = await api("POST", "/admin-api/peers", { address: data.get("address").trim() });
      notify(`Connected to ${result.peerId}.`, "info");
      address.value = "";
      await refresh();
    });
  render("Peers", card("Connect", form), card("Connected peers", body));
  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), 5000);
  cleanups.push(() => clearInterval(timer));
}

// Methods and views from `GET /admin-api/applications/ID` (the app's own metadata).
function callableEntries(app) {
  return (app.entryPoints || []).filter((m) => m.kind === "method" || m.kind === "view");
}

function describeParams(params) {
  if (!params.length) return "no parameters";
  return params.map((p) => `${p.name}: ${baseType(p.type)}${p.required ? "" : " (optional)"}`).join(", ");
}

async function appsView() {
  const apps = await api("GET", "/admin-api/applications");
  const path = el("input", { name: "path", required: true, placeholder: "/path/to/app bundle (directory or .tar.gz)", autocomplete: "off" });
  const install = onSubmit(el("form", { class: "inline" }, field("Bundle path on the node's machine", path), el("button", { type: "submit" }, "Install")),
    async (data) => {
      const app = await api("POST", "/admin-api/applications", { path: data.get("path").trim() });
      notify(`Installed ${app.name} ${app.version}.`, "info");
      await appsView();
    });
  // A bundle archive from this computer: sent as the request body, with progress.
  const bundle = el("input", { name: "bundle", type: "file", required: true, accept: ".tar.gz,.tgz,.tar,.zip" });
  const progress = progressBar("Bundle upload progress");
  const upload = onSubmit(el("form", { class: "inline" }, field("Bundle file", bundle, "(.tar.gz, .tar or .zip)"),
    el("button", { type: "submit" }, "Upload bundle"), progress.box),
  async () => {
    const chosen = bundle.files[0];
    progress.show(0, chosen.size, "Uploaded");
    const app = await uploadFile(`/admin-api/applications/bundle?${new URLSearchParams({ name: chosen.name })}`, chosen,
      (done, total) => progress.show(done, total, "Uploaded"));
    await appsView();
    notify(`Installed ${app.name} ${app.version} from ${chosen.name}.`, "info");
  });
  const rows = apps.applications.map((a) => {
    const details = el("td", { colspan: 4, hidden: true });
    const row = el("tr", {},
      el("td", { text: a.name }),
      el("td", { text: a.version }),
      el("td", { class: "mono", title: a.applicationId, text: short(a.applicationId, 14) }),
      el("td", {}, el("button", {
        type: "button", class: "secondary", "aria-expanded": "false",
        onclick: (event) => act(event.currentTarget, async () => {
          const button = event.currentTarget || row.querySelector("button");
          if (!details.hidden) {
            details.hidden = true;
            button.setAttribute("aria-expanded", "false");
            return;
          }
          const described = await api("GET", `/admin-api/applications/${a.applicationId}`);
          details.replaceChildren(el("ul", {}, callableEntries(described).map((m) => el("li", {},
            el("strong", { text: m.name }), ` (${m.kind}) — ${describeParams(m.params)} → ${baseType(m.returns)}`,
            m.doc ? el("div", { class: "hint", text: m.doc }) : null)))); 
          details.hidden = false;
          button.setAttribute("aria-expanded", "true");
        }),
      }, "Methods"), " ",
      confirmButton("Uninstall", async () => {
        await api("DELETE", `/admin-api/applications/${a.applicationId}`);
        await appsView();
        notify(`Uninstalled ${a.name} ${a.version}.`, "info");
      })));
    return [row, el("tr", {}, details)];
  });
  render("Apps", card("Install", install, el("h3", { text: "Or upload a bundle from this computer" }), upload),
    card("Installed", table(["Name", "Version", "Application id", ""], rows.flat(), "No applications installed yet.")));
}

async function contextsView() {
  const [contexts, apps] = await Promise.all([api("GET", "/admin-api/contexts"), api("GET", "/admin-api/applications")]);
  const names = Object.fromEntries(apps.applications.map((a) => [a.applicationId, `${a.name} ${a.version}`]));
  const appSelect = el("select", { name: "applicationId", required: true },
    apps.applications.map((a) => el("option", { value: a.applicationId, text: `${a.name} ${a.version}` })));
  const initArgs = el("textarea", { name: "initArgs", class: "mono", placeholder: "{}", rows: 2 });
  const create = onSubmit(el("form", {},
    field("Application", appSelect),
    field("Init arguments", initArgs, "(JSON, optional)"),
    el("button", { type: "submit", disabled: apps.applications.length ? null : true }, "Create context")),
  async (data) => {
    const text = data.get("initArgs").trim();
    let args;
    if (text) {
      try {
        args = JSON.parse(text);
      } catch {
        throw new ApiError("Init arguments are not valid JSON.", 0);
      }
    }
    const record = await api("POST", "/admin-api/contexts", { applicationId: data.get("applicationId"), initArgs: args });
    location.hash = `#/context/${record.contextId}`;
  });
  const invitation = el("textarea", { name: "invitation", class: "mono", required: true, rows: 3, placeholder: "trinv1…" });
  const join = onSubmit(el("form", {}, field("Invitation", invitation), el("button", { type: "submit" }, "Join")),
    async (data) => {
      const record = await api("POST", "/admin-api/contexts/join", { invitation: data.get("invitation").trim() });
      location.hash = `#/context/${record.contextId}`;
    });
  const syncCells = [];
  const rows = contexts.contexts.map((c) => {
    const syncCell = el("td", { class: "sync-summary", text: "…" });
    syncCells.push([c.contextId, syncCell]);
    return el("tr", { "data-context-id": c.contextId },
      el("td", { class: "mono" }, el("a", { href: `#/context/${c.contextId}`, title: c.contextId, text: short(c.contextId, 16) })),
      el("td", { text: names[c.applicationId] || short(c.applicationId) }),
      el("td", { text: String(c.members.length) }),
      el("td", { class: "optional", text: String(c.heads.length) }),
      syncCell,
      el("td", {}, deleteButton(c.contextId, () => contextsView())));
  });
  render("Contexts",
    el("div", { class: "grid" },
      card("Create", apps.applications.length ? create : el("p", { class: "empty" }, "Install an app first (", el("a", { href: "#/apps", text: "Apps" }), ").")),
      card("Join", join)),
    card("Contexts on this node", table(["Context", "App", "Members", { label: "Heads", optional: true }, "Sync", ""], rows, "No contexts yet.")));
  // Each context's peers, after the table is up (one small request per context).
  await Promise.all(syncCells.map(async ([contextId, cell]) => {
    try {
      cell.textContent = syncSummary(await api("GET", `/admin-api/contexts/${contextId}/sync`));
    } catch {
      cell.textContent = "unknown";
    }
  }));
}

// "2 of 3 peers connected · last sync 4 s ago" for the contexts list.
function syncSummary(status) {
  const connected = status.peers.filter((p) => p.connected).length;
  const last = Math.max(0, ...status.peers.map((p) => (p.lastSync ? p.lastSync.at : 0)));
  const peers = status.peers.length ? `${connected} of ${status.peers.length} peer(s) connected` : "no peers yet";
  return `${peers} · ${last ? `last sync ${since(last)}` : "never synced"}`;
}

// A destructive action needs a second, deliberate press (keyboard-friendly, no modal dialog).
function confirmButton(label, action) {
  const button = el("button", { type: "button", class: "danger" }, label);
  let armed = false;
  button.addEventListener("click", () => {
    if (!armed) {
      armed = true;
      button.textContent = `Really ${label.toLowerCase()}?`;
      return;
    }
    act(button, action);
  });
  button.addEventListener("blur", () => {
    armed = false;
    button.textContent = label;
  });
  return button;
}

function deleteButton(contextId, after) {
  return confirmButton("Delete", async () => {
    await api("DELETE", `/admin-api/contexts/${contextId}`);
    notify(`Deleted context ${short(contextId, 16)} from this node.`, "info");
    await after();
  });
}

// -- blobs ----------------------------------------------------------------------------------

async function blobsView() {
  const contexts = await api("GET", "/admin-api/contexts");
  const listing = el("div", {});
  const downProgress = progressBar("Download progress");
  async function refresh() {
    const blobs = await api("GET", "/admin-api/blobs");
    const rows = blobs.blobs.map((b) => el("tr", { "data-blob-id": b.blobId },
      el("td", { text: b.name || "(no name)" }),
      el("td", { class: "mono", title: b.blobId, text: short(b.blobId, 14) }),
      el("td", { text: bytesText(b.size) }),
      el("td", { text: b.pinned ? "pinned" : "no" }),
      el("td", { class: "optional mono" }, b.contexts.length
        ? b.contexts.map((c, i) => [i ? ", " : "", el("a", { href: `#/context/${c}`, title: c, text: short(c, 10) })])
        : "–"),
      el("td", { class: "actions" },
        el("button", { type: "button", class: "secondary", onclick: (e) => act(e.currentTarget, async () => {
          await downloadWithProgress(`/admin-api/blobs/${b.blobId}/content`, b.name || b.blobId, b.size,
            (done, total) => downProgress.show(done, total, "Downloaded"));
        }) }, "Download"), " ",
        el("button", { type: "button", class: "secondary", onclick: (e) => act(e.currentTarget, async () => {
          await api(b.pinned ? "DELETE" : "PUT", `/admin-api/blobs/${b.blobId}/pin`);
          await refresh();
        }) }, b.pinned ? "Unpin" : "Pin"), " ",
        confirmButton("Delete", async () => {
          await api("DELETE", `/admin-api/blobs/${b.blobId}`);
          notify(`Deleted blob ${short(b.blobId, 16)} from this node.`, "info");
          await refresh();
        }))));
    listing.replaceChildren(table(["Name", "Blob id", "Size", "Pinned", { label: "Contexts", optional: true }, ""], rows, "No blobs yet."));
  }
  const file = el("input", { name: "file", type: "file", required: true });
  const context = el("select", { name: "context" },
    el("option", { value: "", text: "(none: only this node)" }),
    contexts.contexts.map((c) => el("option", { value: c.contextId, text: short(c.contextId, 16) })));
  const upProgress = progressBar("Upload progress");
  const upload = onSubmit(el("form", { class: "inline" },
    field("File", file), field("Share with context", context, "(its members may fetch it)"),
    el("button", { type: "submit" }, "Upload"), upProgress.box),
  async (data) => {
    const chosen = file.files[0];
    const query = new URLSearchParams({ name: chosen.name });
    if (data.get("context")) query.set("context", data.get("context"));
    upProgress.show(0, chosen.size, "Uploaded");
    const info = await uploadFile(`/admin-api/blobs?${query}`, chosen, (done, total) => upProgress.show(done, total, "Uploaded"));
    notify(`Uploaded ${chosen.name} (${bytesText(info.size)}) as blob ${short(info.blobId, 16)}.`, "info");
    file.value = "";
    await refresh();
  });
  const fetchForm = onSubmit(el("form", { class: "inline" },
    field("Blob id", el("input", { name: "blobId", required: true, autocomplete: "off", class: "mono" })),
    field("From the members of", el("select", { name: "contextId", required: true },
      contexts.contexts.map((c) => el("option", { value: c.contextId, text: short(c.contextId, 16) })))),
    el("button", { type: "submit", class: "secondary" }, "Fetch")),
  async (data) => {
    const blobId = data.get("blobId").trim();
    const info = await api("POST", `/admin-api/blobs/${encodeURIComponent(blobId)}/fetch`, { contextId: data.get("contextId") });
    notify(`Fetched blob ${short(info.blobId, 16)} (${bytesText(info.size)}) from the context's members.`, "info");
    await refresh();
  });
  render("Blobs",
    el("div", { class: "grid" },
      card("Upload", upload),
      card("Fetch from a context's members", contexts.contexts.length ? fetchForm : el("p", { class: "empty", text: "Join or create a context first." }))),
    card("Blobs on this node", listing, downProgress.box,
      el("p", { class: "hint", text: "Pinned blobs are kept by garbage collection even when no context refers to them." })));
  await refresh();
}

// -- one context ----------------------------------------------------------------------------

// "Annotated[str, msgspec.Meta(...)]" is a str with limits the node checks: show its base type.
function baseType(text) {
  const type = text.replace(/\s/g, "");
  if (!type.startsWith("Annotated[")) return type;
  let depth = 0;
  for (let i = "Annotated[".length; i < type.length; i += 1) {
    const c = type[i];
    if (c === "[" || c === "(") depth += 1;
    else if (c === "]" || c === ")") depth -= 1;
    else if (c === "," && depth === 0) return baseType(type.slice("Annotated[".length, i));
  }
  return type;
}

function inputFor(param) {
  const type = baseType(param.type);
  const base = { name: param.name, "data-param": param.name, "data-type": type };
  if (type === "bool") return el("input", { ...base, type: "checkbox" });
  if (type === "int" || type === "float") return el("input", { ...base, type: "number", step: type === "int" ? "1" : "any", required: param.required });
  if (type === "str" || type === "str|None") return el("input", { ...base, type: "text", required: param.required, autocomplete: "off" });
  return el("textarea", { ...base, class: "mono", rows: 2, required: param.required, placeholder: "JSON" });
}

function readArgs(form) {
  const args = {};
  for (const input of form.querySelectorAll("[data-param]")) {
    const name = input.dataset.param;
    const type = input.dataset.type;
    if (type === "bool") {
      args[name] = input.checked;
    } else if (input.value === "") {
      continue;
    } else if (type === "int" || type === "float") {
      args[name] = Number(input.value);
    } else if (type === "str" || type === "str|None") {
      args[name] = input.value;
    } else {
      try {
        args[name] = JSON.parse(input.value);
      } catch {
        throw new ApiError(`${name} must be JSON (for example "text", 3, [1, 2] or {"a": 1}).`, 0);
      }
    }
  }
  return args;
}

function methodForm(contextId, method) {
  const output = el("div", { class: "result", role: "status", "aria-live": "polite", hidden: true });
  const form = el("form", { class: "method", "data-method": method.name },
    el("h3", {}, method.name, " ", el("span", { class: "pill", text: method.kind })),
    method.doc ? el("p", { class: "hint", text: method.doc }) : null,
    method.params.map((p) => field(p.name, inputFor(p), `(${baseType(p.type)}${p.required ? "" : ", optional"})`)),
    el("button", { type: "submit" }, method.kind === "view" ? "Read" : "Call"),
    output);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    (async () => {
      try {
        const result = await rpc(contextId, method.name, readArgs(form));
        output.className = "result";
        output.textContent = `Result: ${pretty(result.output)}${result.deltaId ? `\nNew delta ${short(result.deltaId, 16)}` : ""}`;
      } catch (error) {
        output.className = "result error";
        output.textContent = `Error: ${error.message}`;
      } finally {
        output.hidden = false;
        button.disabled = false;
      }
    })();
  });
  return form;
}

function dagView(dag) {
  const nodes = dag.nodes;
  if (!nodes.length) return el("p", { class: "empty", text: "No deltas yet." });
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const heads = new Set(dag.heads);
  const depth = new Map();
  function depthOf(node, seen = new Set()) {
    if (depth.has(node.id)) return depth.get(node.id);
    if (seen.has(node.id)) return 0;
    seen.add(node.id);
    const parents = node.parents.filter((p) => byId.has(p));
    const d = parents.length ? 1 + Math.max(...parents.map((p) => depthOf(byId.get(p), seen))) : 0;
    depth.set(node.id, d);
    return d;
  }
  const columns = [];
  for (const node of [...nodes].sort((a, b) => (a.hlc || 0) - (b.hlc || 0))) {
    const d = depthOf(node);
    (columns[d] = columns[d] || []).push(node);
  }
  const colW = 76;
  const rowH = 46;
  const rows = Math.max(...columns.map((c) => (c ? c.length : 0)));
  const width = Math.max(columns.length * colW + 40, 200);
  const height = rows * rowH + 30;
  const position = new Map();
  columns.forEach((column, x) => (column || []).forEach((node, y) => position.set(node.id, [30 + x * colW, 22 + y * rowH])));
  const edges = [];
  for (const node of nodes) {
    const [cx, cy] = position.get(node.id);
    for (const parent of node.parents) {
      if (!position.has(parent)) continue;
      const [px, py] = position.get(parent);
      edges.push(svg("path", { class: "edge", d: `M${px},${py} C${px + colW / 2},${py} ${cx - colW / 2},${cy} ${cx},${cy}` }));
    }
  }
  const circles = nodes.map((node) => {
    const [x, y] = position.get(node.id);
    const kinds = ["dag-node", heads.has(node.id) ? "head" : "", node.pending ? "pending" : "", node.checkpoint ? "checkpoint" : ""];
    const label = `${node.id}${heads.has(node.id) ? " (head)" : ""}${node.pending ? " (pending: waiting for parents)" : ""}${node.author ? `\nby ${node.author}` : ""}`;
    return svg("g", { class: kinds.join(" ").trim(), "data-delta-id": node.id },
      svg("title", { text: label }),
      svg("circle", { cx: x, cy: y, r: 9 }),
      svg("text", { x: x - 18, y: y + 22, text: node.id.slice(0, 6) }));
  });
  const picture = svg("svg", {
    width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `Causal graph of the ${nodes.length} most recent deltas; ${heads.size} head(s)`,
  }, ...edges, ...circles);
  const pendingCount = nodes.filter((n) => n.pending).length;
  return el("div", {},
    el("div", { class: "dag" }, picture),
    el("div", { class: "legend" },
      el("span", {}, el("i", { class: "head" }), "head"),
      el("span", {}, el("i", {}), "applied"),
      el("span", {}, el("i", { class: "pending" }), `pending (${pendingCount})`)),
    el("p", { class: "hint" }, "Heads: ", el("span", { class: "mono", id: "dag-heads", text: dag.heads.map((h) => h.slice(0, 12)).join(", ") })));
}

function eventItem(event) {
  const names = event.events.map((e) => `${e.name} ${JSON.stringify(e.payload)}`);
  return el("li", { "data-delta-id": event.deltaId },
    el("div", {}, names.length ? names.join("; ") : "state change"),
    el("div", { class: "meta" }, `#${event.seq} · ${event.origin} · delta ${short(event.deltaId, 12)} · ${new Date().toLocaleTimeString()}`));
}

function memberRows(contextId, record) {
  return record.members.map((m) => {
    const me = m.publicKey === record.memberPublicKey;
    const role = el("select", { "aria-label": `Role of ${short(m.publicKey, 12)}` },
      ["admin", "member", "read-only"].map((r) => el("option", { value: r, selected: r === m.role, text: r })));
    return el("tr", {},
      el("td", { class: "mono", title: m.publicKey }, short(m.publicKey, 16), me ? " (this node)" : ""),
      el("td", {}, me ? m.role : role),
      el("td", {}, me ? null : [
        el("button", { type: "button", class: "secondary", onclick: (e) => act(e.currentTarget, async () => {
          await api("POST", `/admin-api/contexts/${contextId}/members/${m.publicKey}/role`, { role: role.value });
          notify(`${short(m.publicKey, 12)} is now ${role.value}.`, "info");
        }) }, "Set role"),
        " ",
        el("button", { type: "button", class: "danger", onclick: (e) => act(e.currentTarget, async () => {
          await api("DELETE", `/admin-api/contexts/${contextId}/members/${m.publicKey}`);
          notify(`Removed ${short(m.publicKey, 12)}; the context key was rotated.`, "info");
        }) }, "Remove"),
      ]));
  });
}

const PROTOCOLS = { none: "already in sync", delta: "deltas", snapshot: "snapshot", tree: "tree comparison" };

function since(unixSeconds) {
  return `${ago(Math.max(0, Date.now() / 1000 - unixSeconds))} ago`;
}

function syncRows(contextId, status, refresh) {
  return status.peers.map((p) => el("tr", { "data-peer-id": p.peerId },
    el("td", { class: "mono", title: p.peerId, text: short(p.peerId, 16) }),
    el("td", { text: p.connected ? "connected" : "not connected" }),
    el("td", { class: "last-sync" }, p.lastSync
      ? [el("time", { datetime: new Date(p.lastSync.at * 1000).toISOString(), title: new Date(p.lastSync.at * 1000).toLocaleString(), text: since(p.lastSync.at) }),
        el("div", { class: "hint", text: `${PROTOCOLS[p.lastSync.protocol] || p.lastSync.protocol}, ${p.lastSync.deltas} delta(s) applied` })]
      : el("span", { class: "empty", text: "never" })),
    el("td", { class: "last-error" }, p.lastError
      ? [el("span", { class: "bad", text: p.lastError.message }), el("div", { class: "hint", text: since(p.lastError.at) })]
      : "–"),
    el("td", {}, el("button", { type: "button", class: "secondary", "aria-label": `Sync now with ${short(p.peerId, 16)}`, onclick: (e) => act(e.currentTarget, async () => {
      try {
        const result = await api("POST", `/admin-api/contexts/${contextId}/sync?peer=${encodeURIComponent(p.peerId)}`);
        notify(`Synced with ${short(p.peerId, 16)}: ${result.applied} delta(s) applied, ${result.pending} pending.`, "info");
      } finally {
        await refresh();
      }
    }) }, "Sync now"))));
}

async function contextView(contextId) {
  const record = await api("GET", `/admin-api/contexts/${contextId}`);
  const app = await api("GET", `/admin-api/applications/${record.applicationId}`);
  const facts = el("dl", { class: "facts" });
  const members = el("div", {});
  const dagBox = el("div", { id: "dag" });
  const syncBox = el("div", { id: "sync-status" });
  const events = el("ol", { class: "events", id: "events", "aria-live": "polite" });
  const liveState = el("span", { class: "pill", id: "live-state", text: "connecting" });

  function showFacts(r) {
    facts.replaceChildren(
      el("dt", { text: "Context id" }), el("dd", { class: "mono", text: r.contextId }),
      el("dt", { text: "App" }), el("dd", { text: `${app.name} ${app.version}` }),
      el("dt", { text: "Root hash" }), el("dd", { class: "mono", id: "root-hash", text: r.rootHash }),
      el("dt", { text: "Heads" }), el("dd", { class: "mono", text: r.heads.map((h) => short(h, 12)).join(", ") }),
      el("dt", { text: "This node's member key" }), el("dd", { class: "mono", text: r.memberPublicKey }));
    members.replaceChildren(table(["Member", "Role", ""], memberRows(contextId, r), "No members."));
  }
  async function refreshSync() {
    const status = await api("GET", `/admin-api/contexts/${contextId}/sync`);
    syncBox.replaceChildren(table(["Peer", "Connection", "Last sync", "Last error", ""],
      syncRows(contextId, status, refreshSync), "No member peer is connected, and none was synced with yet."));
  }
  async function refresh() {
    const [r, dag] = await Promise.all([
      api("GET", `/admin-api/contexts/${contextId}`),
      api("GET", `/admin-api/contexts/${contextId}/dag?limit=60`),
      refreshSync(),
    ]);
    showFacts(r);
    dagBox.replaceChildren(dagView(dag));
  }

  const inviteOut = el("div", { hidden: true });
  const invite = onSubmit(el("form", { class: "inline" },
    field("Role", el("select", { name: "role" }, ["member", "read-only", "admin"].map((r) => el("option", { value: r, text: r })))),
    field("Valid for (hours)", el("input", { name: "hours", type: "number", min: "1", max: "8760", value: "168", required: true })),
    el("button", { type: "submit" }, "Invite")),
  async (data) => {
    const body = await api("POST", `/admin-api/contexts/${contextId}/invitations`,
      { role: data.get("role"), expiresIn: Number(data.get("hours")) * 3600 });
    const text = el("textarea", { class: "mono", id: "invitation", readonly: true, rows: 4, "aria-label": "Invitation" });
    text.value = body.invitation;
    const copy = el("button", { type: "button", class: "secondary", onclick: async () => {
      text.select();
      try {
        await navigator.clipboard.writeText(body.invitation);
        notify("Invitation copied. Send it to the person who should join.", "info");
      } catch {
        notify("Select the invitation and copy it (the browser did not allow copying).", "info");
      }
    } }, "Copy invitation");
    const revoke = confirmButton("Revoke", async () => {
      await api("POST", `/admin-api/contexts/${contextId}/invitations/revoke`, { invitation: body.invitation });
      notify("Invitation revoked: nobody can join with it now.", "info");
    });
    inviteOut.replaceChildren(el("p", { class: "hint", text: "One-time invitation: paste it into the joining node's page (Contexts → Join)." }), text, copy, " ", revoke);
    inviteOut.hidden = false;
    text.focus();
    text.select();
  });

  const revokeForm = onSubmit(el("form", {},
    field("Invitation to revoke", el("textarea", { name: "invitation", class: "mono", rows: 2, required: true, placeholder: "trinv1…" })),
    el("button", { type: "submit", class: "secondary" }, "Revoke invitation")),
  async (data) => {
    await api("POST", `/admin-api/contexts/${contextId}/invitations/revoke`, { invitation: data.get("invitation").trim() });
    notify("Invitation revoked: nobody can join with it now.", "info");
  });

  const actions = el("p", {},
    el("button", { type: "button", class: "secondary", onclick: (e) => act(e.currentTarget, async () => {
      const result = await api("POST", `/admin-api/contexts/${contextId}/sync`);
      notify(`Synced: ${result.applied} delta(s) applied, ${result.pending} pending.`, "info");
      await refresh();
    }) }, "Sync now"), " ",
    confirmButton("Leave", async () => {
      await api("POST", `/admin-api/contexts/${contextId}/leave`);
      notify(`Left context ${short(contextId, 16)}: the other members no longer share new writes with this node.`, "info");
      await refresh();
    }), " ",
    deleteButton(contextId, () => { location.hash = "#/contexts"; }));

  const callable = callableEntries(app);
  render(`Context ${short(contextId, 12)}`,
    el("div", { class: "grid" },
      card("Context", facts, actions),
      card("Members", members, el("h3", { text: "Invite" }), invite, inviteOut,
        el("details", {}, el("summary", { text: "Revoke an invitation sent earlier" }), revokeForm))),
    card("Sync with member peers", syncBox),
    el("div", { class: "grid" },
      card("Live events", el("p", { class: "hint" }, "Stream: ", liveState), events),
      card("Causal DAG (recent deltas)", dagBox)),
    card("Methods", el("div", { class: "methods" },
      callable.length ? callable.map((m) => methodForm(contextId, m)) : el("p", { class: "empty", text: "This app has no methods." }))));
  showFacts(record);
  await refresh();

  // Same-origin EventSource: the session cookie authenticates it; it resumes by itself
  // (Last-Event-ID) after a drop.
  const source = new EventSource(`/events?context=${encodeURIComponent(contextId)}`);
  let pendingRefresh = null;
  source.addEventListener("open", () => { liveState.textContent = "live"; });
  source.addEventListener("error", () => { liveState.textContent = source.readyState === EventSource.CLOSED ? "closed" : "reconnecting"; });
  source.addEventListener("delta", (message) => {
    const event = JSON.parse(message.data);
    events.prepend(eventItem(event));
    while (events.children.length > 200) events.lastChild.remove();
    clearTimeout(pendingRefresh);
    pendingRefresh = setTimeout(() => act(null, refresh), 150);
  });
  // Quietly: a failed background refresh must not replace the notice the user is reading.
  const syncTimer = setInterval(() => refreshSync().catch(() => {}), 5000);
  cleanups.push(() => {
    source.close();
    clearTimeout(pendingRefresh);
    clearInterval(syncTimer);
  });
}

// -- routing ------------------------------------------------------------------------------

const ROUTES = [
  [/^#\/node$/, nodeView, "#/node"],
  [/^#\/peers$/, peersView, "#/peers"],
  [/^#\/apps$/, appsView, "#/apps"],
  [/^#\/contexts$/, contextsView, "#/contexts"],
  [/^#\/blobs$/, blobsView, "#/blobs"],
  [/^#\/context\/([1-9A-HJ-NP-Za-km-z]+)$/, contextView, "#/contexts"],
];

async function route() {
  leaveView();
  const hash = location.hash || "#/node";
  for (const [pattern, view, nav] of ROUTES) {
    const match = pattern.exec(hash);
    if (!match) continue;
    for (const link of document.querySelectorAll("#nav a")) {
      if (link.getAttribute("href") === nav) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    focusOnRender = true;
    await act(null, () => view(...match.slice(1)));
    if (focusOnRender) {  // the view failed before it rendered: focus the main region anyway
      focusOnRender = false;
      document.getElementById("main").focus({ preventScroll: true });
    }
    return;
  }
  location.hash = "#/node";
}

window.addEventListener("hashchange", () => {
  if (!document.getElementById("view").hidden) route();
});

document.addEventListener("DOMContentLoaded", async () => {
  onSubmit(document.getElementById("sign-in-form"), signIn);
  document.getElementById("sign-out").addEventListener("click", (e) => act(e.currentTarget, signOut));
  // Already signed in (a session cookie from earlier)? Any admin route tells.
  try {
    await api("GET", "/admin-api/node");
    showApp();
    await route();
  } catch {
    showSignIn();
  }
});
