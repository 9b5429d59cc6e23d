// The ComfyLB panel: one implementation, mounted by the ComfyUI sidebar tab (comfylb.js)
// and by the standalone management page (../standalone.html).
// ComfyUI imports every .js file in this folder, so this module has no side effects:
// it only exports.

export const STATUS_EVENT = "comfylb.status";

const STYLE_ID = "comfylb-panel-style";
const STYLES = `
.comfylb { font-size: 13px; color: var(--fg-color, #ddd); padding: 8px 10px 16px; line-height: 1.35;
  box-sizing: border-box; width: 100%; overflow-x: hidden; }
.comfylb * { box-sizing: border-box; }
.comfylb h3 { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; margin: 14px 0 6px;
  color: var(--descrip-text, #999); font-weight: 600; display: flex; align-items: center; gap: 6px; }
.comfylb .cl-bar { display: flex; gap: 6px; align-items: center; flex-wrap: wrap; }
.comfylb .cl-grow { flex: 1; }
.comfylb button { font: inherit; color: var(--input-text, #ddd); background: var(--comfy-input-bg, #222);
  border: 1px solid var(--border-color, #444); border-radius: 6px; padding: 3px 8px; cursor: pointer;
  display: inline-flex; align-items: center; gap: 4px; }
.comfylb button:hover { border-color: var(--p-primary-color, #5b8def); }
.comfylb button:focus-visible, .comfylb input:focus-visible, .comfylb select:focus-visible {
  outline: 2px solid var(--p-primary-color, #5b8def); outline-offset: 1px; }
.comfylb button.cl-danger:hover { border-color: var(--error-text, #e55); color: var(--error-text, #e55); }
.comfylb button[disabled] { opacity: .5; cursor: default; }
.comfylb input, .comfylb select { font: inherit; color: var(--input-text, #ddd); background: var(--comfy-input-bg, #222);
  border: 1px solid var(--border-color, #444); border-radius: 6px; padding: 3px 6px; min-width: 0; }
.comfylb .cl-totals { display: grid; grid-template-columns: repeat(3, 1fr); gap: 4px; }
.comfylb .cl-total { background: var(--comfy-input-bg, #222); border-radius: 6px; padding: 4px 6px; }
.comfylb .cl-total b { display: block; font-size: 15px; }
.comfylb .cl-total span { color: var(--descrip-text, #999); font-size: 11px; }
.comfylb .cl-peer { border: 1px solid var(--border-color, #444); border-radius: 8px; padding: 6px 8px; margin-bottom: 6px; }
.comfylb .cl-peer-head { display: flex; align-items: center; gap: 6px; }
.comfylb .cl-name { font-weight: 600; flex: 1; min-width: 0; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.comfylb .cl-url { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.comfylb .cl-dim { color: var(--descrip-text, #999); font-size: 11.5px; }
.comfylb .cl-dot { width: 9px; height: 9px; border-radius: 50%; flex: none; background: #888; }
.comfylb .cl-healthy .cl-dot { background: #3c3; }
.comfylb .cl-unhealthy .cl-dot, .comfylb .cl-down .cl-dot { background: var(--error-text, #e55); }
.comfylb .cl-disabled .cl-dot, .comfylb .cl-removed .cl-dot { background: #888; }
.comfylb .cl-unknown .cl-dot { background: #cb3; }
.comfylb .cl-reason { color: var(--error-text, #e55); font-size: 11.5px; overflow-wrap: anywhere; }
.comfylb .cl-progress { height: 4px; background: var(--comfy-input-bg, #222); border-radius: 2px; margin-top: 4px; overflow: hidden; }
.comfylb .cl-progress > div { height: 100%; background: var(--p-primary-color, #5b8def); }
.comfylb .cl-row { display: flex; gap: 6px; align-items: center; padding: 3px 0; border-bottom: 1px solid var(--border-color, #333); }
.comfylb .cl-row:last-child { border-bottom: none; }
.comfylb .cl-mono { font-family: ui-monospace, monospace; font-size: 11.5px; }
.comfylb form { display: grid; grid-template-columns: repeat(auto-fit, minmax(96px, 1fr)); gap: 6px; }
.comfylb form input { width: 100%; }
.comfylb select { width: 100%; }
.comfylb form label { display: flex; flex-direction: column; gap: 2px; font-size: 11.5px; color: var(--descrip-text, #999); }
.comfylb form .cl-wide { grid-column: 1 / -1; }
.comfylb .cl-error { color: var(--error-text, #e55); font-size: 11.5px; grid-column: 1 / -1; }
.comfylb .cl-empty { color: var(--descrip-text, #999); font-style: italic; padding: 4px 0; }
.comfylb .cl-banner { border: 1px solid var(--error-text, #e55); color: var(--error-text, #e55); border-radius: 6px; padding: 6px 8px; }
.comfylb button.cl-badge { font-size: 11px; padding: 0 7px; margin-right: 5px; border-radius: 9px; border-color: #cb3; white-space: nowrap;
  background: color-mix(in srgb, #cb3 22%, transparent); color: var(--fg-color, #ddd); }
.comfylb .cl-missing { margin-top: 4px; padding: 2px 0 2px 8px; border-left: 2px solid #cb3; font-size: 11.5px; overflow-wrap: anywhere; }
.comfylb .cl-missing b { font-weight: 600; }
.comfylb .cl-file { display: flex; align-items: center; gap: 6px; padding-left: 8px; }
.comfylb .cl-file > span { flex: 1; min-width: 0; overflow-wrap: anywhere; }
.comfylb button.cl-copy-btn { font-size: 11px; padding: 0 7px; border-radius: 9px; flex: none; }
.comfylb .cl-copy { margin-top: 4px; font-size: 11.5px; overflow-wrap: anywhere; }
.comfylb .cl-log { margin: 4px 0 0; max-height: 220px; overflow: auto; white-space: pre-wrap; overflow-wrap: anywhere;
  background: var(--comfy-input-bg, #222); border-radius: 6px; padding: 4px 6px; }
`;

export const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const gb = (bytes) => (bytes ? `${(bytes / 2 ** 30).toFixed(1)} GB` : "–");
export const secs = (s) => (s == null ? "–" : s < 10 ? `${s.toFixed(2)} s` : `${s.toFixed(0)} s`);
const SHOWN = 12;  // names per list in a peer's "missing" list; the rest are counted
export const FINISHED = new Set(["done", "failed"]);  // a copy in any other state is in progress
const LOG_LINES = 40;  // lines of a local worker's log the panel shows

// What a peer lacks (an entry of GET /lb/inventory) as [label, names, how many in all, the
// model folder (null on rows that are not one folder's model files)] rows.
export function missingRows(inv) {
  const rows = Object.entries(inv?.lacks?.models || {}).map(([folder, files]) => [folder, files, files.length, folder]);
  const listed = rows.reduce((n, r) => n + r[2], 0);
  if (inv?.missing?.models > listed) rows.push(["more model files", [], inv.missing.models - listed]);
  for (const [key, label] of [["nodes", "nodes"], ["packs", "custom node packs"]]) {
    const names = inv?.lacks?.[key] || [];
    if (names.length) rows.push([label, names, Math.max(names.length, inv.missing?.[key] || 0)]);
  }
  return rows;
}
export const missingCount = (inv) => Object.values(inv?.missing || {}).reduce((n, v) => n + (Number(v) || 0), 0);
export const namesText = (names, total) => (!names.length ? `${total}`
  : names.slice(0, SHOWN).join(", ") + (total > Math.min(names.length, SHOWN) ? ` … (${total} in all)` : ""));
// The whole list as plain text, a line a row (a title, shown on hover).
export const missingText = (inv) => missingRows(inv).map(([label, names, total]) => `${label}: ${namesText(names, total)}`)
  .concat(inv?.packs_hint ? [inv.packs_hint] : []).join("\n");
// Whether a peer has not yet told its node types or model files (its /object_info comes after its link).
export const untold = (inv) => (inv?.unknown || []).some((u) => u === "nodes" || u === "models");
const size = (n) => (n >= 2 ** 30 ? gb(n) : `${(n / 2 ** 20).toFixed(1)} MB`);

// Whether a peer's inventory entry says it has a model file: it told its files of that folder,
// and what it lacks is listed in full (the lists are capped), without this one.
function hasModel(inv, folder, file) {
  if (!inv || (inv.unknown || []).some((u) => u === "models" || u === `models/${folder}`)) return false;
  const lacks = inv.lacks?.models || {};
  const listed = Object.values(lacks).reduce((n, files) => n + files.length, 0);
  return listed >= (inv.missing?.models || 0) && !(lacks[folder] || []).includes(file);
}
// The copies of model files to peers (the pushes' `transfers`; none from a ComfyLB before them).
export const transfersOf = (snap) => (Array.isArray(snap?.transfers) ? snap.transfers : []).filter((t) => t && typeof t === "object");
// How far a copy is: bytes done, its size (null while unknown) and the percentage (null without a size).
export function copyProgress(t) {
  const done = Number(t.done) || 0;
  const total = Number(t.total) > 0 ? Number(t.total) : null;
  return {done, total, pct: total ? Math.max(0, Math.min(100, Math.floor((100 * done) / total))) : null};
}
// Why a peer takes no work (none while healthy or disabled), and its running prompt's percentage.
export const peerReason = (b) => (b.status === "healthy" || b.status === "disabled" ? "" : b.health?.last_error || "");
export const progressPct = (b) => (b.progress && b.progress.max ? Math.round((100 * b.progress.value) / b.progress.max) : null);

// The module's style sheet, added to the document once (by id) whichever view renders first.
export function addStyle(id, css) {
  if (document.getElementById(id)) return;
  const style = document.createElement("style");
  style.id = id;
  style.textContent = css;
  document.head.appendChild(style);
}

/**
 * host: {
 *   request(method, path, body?) -> Promise<Response>   (same-origin: the session cookie goes along)
 *   onStatus(callback)            comfylb.status snapshots pushed on the host's websocket
 *   clientId() -> string|null     that websocket's clientId, to subscribe it to the pushes
 *   toast({severity, summary, detail})
 *   askToken() -> Promise<string|null>   ask the user for the /lb token (never stored: it buys a cookie)
 *   confirm(message) -> Promise<boolean>
 * }
 * The host calls resubscribe() whenever its websocket (re)connects.
 */
export function createPanel(host) {
  const state = {
    snapshot: null,
    error: null,
    form: {name: "", host: "", port: "8188", weight: "1", max_queue: "2"},
    formError: null,
    pending: new Set(),
    roots: new Set(),
    detached: null,    // {reason, config}: ComfyLB is installed here but not attached
    session: undefined, // whether this browser holds a session cookie (HttpOnly: asked of /lb/state)
    declined: false,   // the user cancelled the token prompt or logged out: ask only on "Log in"
    subscribed: null,  // the clientId whose socket receives the pushes
    inventory: null,   // GET /lb/inventory's backends: what each peer lacks
    openMissing: new Set(),  // peers whose "missing" list is shown
    copiesDone: null,  // ids of the copies seen done: one more means a peer has a new model file
    logs: new Map(),   // local worker name → the last lines of its log, while shown
    watchers: new Set(),  // called with this state after every draw (watch(): the cluster view)
  };

  async function errorOf(r) {
    try { return (await r.json()).error || `HTTP ${r.status}`; } catch { return `HTTP ${r.status}`; }
  }

  // The token is sent once, for an HttpOnly cookie: no script (another page of this origin
  // included) can read it back.  One prompt at a time, however many requests were refused.
  let asking = null;
  function login() {
    asking ??= (async () => {
      const token = await host.askToken();
      if (!token) { state.declined = true; return false; }
      const r = await host.request("POST", "/lb/session", {token});
      if (!r.ok) {
        host.toast({severity: "error", summary: "ComfyLB", detail: `Log in: ${await errorOf(r)}`, life: 6000});
        return false;
      }
      state.session = true;
      state.declined = false;
      return true;
    })().finally(() => { asking = null; });
    return asking;
  }

  async function logout() {
    await host.request("DELETE", "/lb/session");
    Object.assign(state, {session: false, declined: true, snapshot: null, subscribed: null});
    await refresh();
  }

  async function call(method, path, body, ask = true) {
    let r = await host.request(method, path, body);
    if (r.status === 401 && ask && (await login())) r = await host.request(method, path, body);
    let data = null;
    try { data = await r.json(); } catch { /* empty body */ }
    if (!r.ok) {
      const message = (data && (data.error?.message || data.error)) || `HTTP ${r.status}`;
      const err = new Error(typeof message === "string" ? message : JSON.stringify(message));
      err.status = r.status;
      throw err;
    }
    return data;
  }

  async function refresh() {
    try {
      state.snapshot = await call("GET", "/lb/status", undefined, !state.declined);
      state.error = null;
      state.detached = null;
      if (state.session === undefined) state.session = Boolean((await lbState())?.session);
      subscribe();
      watchPeers();
      watchCopies();
    } catch (e) {
      state.snapshot = e.status === 401 ? null : state.snapshot;
      if (e.status === 404) state.detached = await detachedReason();
      state.error = e.status === 401 ? "A token is needed for /lb/* (auth.token in ComfyLB's config)." : `Cannot reach ComfyLB: ${e.message}`;
    }
    draw();
  }

  async function lbState() {
    try {
      const r = await host.request("GET", "/lb/state");
      return r.ok ? await r.json() : null;
    } catch { return null; }
  }

  async function detachedReason() {
    const s = await lbState();
    return s && s.attached === false ? s : {reason: "ComfyLB is installed but did not start here: see ComfyUI's log."};
  }

  // The pushes reach only sockets subscribed by someone allowed to read /lb/*.
  async function subscribe() {
    const id = host.clientId?.();
    if (!id || state.subscribed === id) return;
    try {
      await call("POST", "/lb/subscribe", {client_id: id}, false);
      state.subscribed = id;
    } catch { /* the socket is not open yet: the host calls resubscribe() once it is */ }
  }

  function resubscribe() {
    state.subscribed = null;
    if (state.snapshot) subscribe();
  }

  host.onStatus((snapshot) => {
    if (state.declined) return;  // logged out: this socket stays subscribed until it reconnects
    state.snapshot = snapshot;
    state.error = null;
    watchPeers();
    watchCopies();
    draw();
  });

  // What each peer lacks is asked for (GET /lb/inventory), not pushed: again whenever a
  // peer is added, removed, linked or changes state, and a few times more while a linked
  // peer has not yet told what it has (its /object_info comes after its link).
  let inventoryTimer = null;
  let inventoryKey = null;
  let inventoryTries = 0;
  function watchPeers() {
    const key = (state.snapshot?.backends || []).map((b) => `${b.name}:${b.linked}:${b.status}`).join("|");
    if (key === inventoryKey) return;
    inventoryKey = key;
    inventoryTries = 0;
    loadInventorySoon(state.inventory ? 1000 : 0);
  }
  function loadInventorySoon(delay) {
    clearTimeout(inventoryTimer);
    inventoryTimer = setTimeout(loadInventory, delay);
  }
  async function loadInventory() {
    if (state.declined) return;
    try {
      state.inventory = (await call("GET", "/lb/inventory", undefined, false))?.backends || {};
    } catch { return; }  // an older ComfyLB, or not allowed: no badges, nothing else changes
    draw();
    const linked = new Set((state.snapshot?.backends || []).filter((b) => b.linked).map((b) => b.name));
    const waiting = Object.entries(state.inventory).some(([name, e]) => linked.has(name) && untold(e));
    if (waiting && inventoryTries++ < 5) loadInventorySoon(3000);
  }

  // A copy that landed changes what its peer has: the inventory is asked again, a moment
  // later (once the copy is done the coordinator reads that peer's files again).
  function watchCopies() {
    const done = new Set(transfersOf(state.snapshot).filter((t) => t.state === "done").map((t) => t.id));
    const landed = state.copiesDone && [...done].some((id) => !state.copiesDone.has(id));
    state.copiesDone = done;
    if (landed) {
      inventoryTries = 0;
      loadInventorySoon(1000);
    }
  }

  async function act(key, fn, success) {
    if (state.pending.has(key)) return;
    state.pending.add(key);
    draw();
    try {
      const result = await fn();
      if (success) host.toast({severity: "success", summary: "ComfyLB", detail: success(result), life: 2500});
      return result;
    } catch (e) {
      host.toast({severity: "error", summary: "ComfyLB", detail: e.message, life: 6000});
      throw e;
    } finally {
      state.pending.delete(key);
      await refresh();
    }
  }

  const actions = {
    toggle: (name, enabled) => act(`toggle:${name}`, () => call("POST", `/lb/backends/${encodeURIComponent(name)}/${enabled ? "disable" : "enable"}`),
      () => `${name} ${enabled ? "disabled: it gets no new work" : "enabled"}`),
    remove: async (name) => {
      if (!(await host.confirm(`Remove peer “${name}”? Prompts already running there finish first.`))) return;
      return act(`remove:${name}`, () => call("DELETE", `/lb/backends/${encodeURIComponent(name)}`), () => `${name} removed`);
    },
    check: () => act("check", () => call("POST", "/lb/health-check"), (r) => {
      const bad = r.backends.filter((b) => !b.available).map((b) => b.name);
      return bad.length ? `Checked: not available: ${bad.join(", ")}` : `Checked ${r.backends.length} peer(s): all available`;
    }),
    strategy: (name) => act("strategy", () => call("POST", `/lb/scheduler/strategy/${encodeURIComponent(name)}`), () => `Strategy: ${name}`),
    order: (name) => act("order", () => call("POST", `/lb/scheduler/order/${encodeURIComponent(name)}`), () => `Order: ${name.replace("_", " ")}`),
    restart: (name) => act(`restart:${name}`, () => call("POST", `/lb/backends/${encodeURIComponent(name)}/restart`),
      () => `${name} restarting`),
    log: async (name) => {
      if (state.logs.delete(name)) { draw(); return; }
      try {
        const r = await call("GET", `/lb/backends/${encodeURIComponent(name)}/log?lines=${LOG_LINES}`);
        state.logs.set(name, r.lines);
      } catch (e) {
        host.toast({severity: "error", summary: "ComfyLB", detail: `${name} log: ${e.message}`, life: 6000});
      }
      draw();
    },
    copy: (dest, folder, file, from) => act(`copy:${dest}:${folder}/${file}`, async () => {
      try {
        return await call("POST", `/lb/backends/${encodeURIComponent(dest)}/models`, {folder, name: file, from});
      } catch (e) {
        throw Object.assign(new Error(`Copy of ${folder}/${file} to ${dest}: ${e.message}`), {status: e.status});
      }
    }, () => `Copying ${folder}/${file} to ${dest} from ${from}`),
    cancel: (id) => act(`cancel:${id}`, () => call("DELETE", `/lb/tasks/${encodeURIComponent(id)}`), () => `Cancelled ${id.slice(0, 8)}`),
    add: async () => {
      const f = state.form;
      const problem = validate(f);
      state.formError = problem;
      if (problem) { draw(); return; }
      const body = {name: f.name.trim(), host: f.host.trim(), port: Number(f.port), weight: Number(f.weight), max_queue: Number(f.max_queue)};
      try {
        await act("add", () => call("POST", "/lb/backends", body), () => `${body.name} added; it gets work once healthy`);
        state.form = {...state.form, name: "", host: ""};
        state.formError = null;
        for (const root of state.roots) root.querySelector("form")?.reset();
        syncForm();
      } catch (e) {
        state.formError = e.message;
        draw();
      }
    },
  };

  function validate(f) {
    if (!/^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/.test(f.name.trim())) return "Name: letters, digits, '-', '_' or '.'";
    const h = f.host.trim();
    if (!h) return "Host is required";
    if (/^[a-z]+:\/\//i.test(h) && !/^https?:\/\//i.test(h)) return "Only http:// and https:// peers";
    const port = Number(f.port);
    if (!Number.isInteger(port) || port < 1 || port > 65535) return "Port must be 1–65535";
    if (!(Number(f.weight) > 0)) return "Weight must be greater than 0";
    if (!Number.isInteger(Number(f.max_queue)) || Number(f.max_queue) < 1) return "Max queue must be at least 1";
    if (state.snapshot?.backends?.some((b) => b.name === f.name.trim() && !b.removed)) return `A peer named “${f.name.trim()}” exists`;
    return null;
  }

  function peerHtml(b) {
    const reason = peerReason(b);
    const prog = progressPct(b);
    const devices = (b.devices || []).map((d) => esc(d.name) + (d.vram_total ? ` · ${gb(d.vram_free)} free of ${gb(d.vram_total)}` : "")).join("<br>");
    const busy = (k) => (state.pending.has(k) ? "disabled" : "");
    return `<div class="cl-peer cl-${esc(b.status)}" data-peer="${esc(b.name)}">
      <div class="cl-peer-head">
        <span class="cl-dot" title="${esc(b.status)}"></span>
        <span class="cl-name" title="${esc(b.name)}">${esc(b.name)}</span>
        <button data-act="toggle" data-name="${esc(b.name)}" data-enabled="${b.enabled}" ${busy(`toggle:${b.name}`)}
          title="${b.enabled ? "Stop sending new work" : "Send work again"}" aria-label="${b.enabled ? "Disable" : "Enable"} ${esc(b.name)}">
          <i class="pi ${b.enabled ? "pi-pause" : "pi-play"}"></i>${b.enabled ? "Disable" : "Enable"}</button>
        ${b.worker ? "" : `<button class="cl-danger" data-act="remove" data-name="${esc(b.name)}" ${busy(`remove:${b.name}`)}
          title="Remove this peer" aria-label="Remove ${esc(b.name)}"><i class="pi pi-trash"></i></button>`}
      </div>
      <div class="cl-dim cl-mono cl-url" title="${esc(b.url)}">${esc(b.url)}</div>
      <div class="cl-dim">${missingBadge(b.name)}<span class="cl-status">${esc(b.status)}</span> · ${b.in_flight}/${b.max_queue} in flight ·
        ${b.jobs_done} done · mean ${secs(b.mean_job_time)} · weight ${esc(b.weight)}${b.tags?.length ? " · " + b.tags.map(esc).join(", ") : ""}</div>
      ${reason ? `<div class="cl-reason">${esc(reason)}</div>` : ""}
      ${b.running ? `<div class="cl-dim cl-mono" title="running prompt">▶ ${esc(b.running.slice(0, 8))}${prog != null ? ` · ${prog}%` : ""}</div>
        <div class="cl-progress" role="progressbar" aria-valuemin="0" aria-valuemax="100" aria-valuenow="${prog ?? 0}"><div style="width:${prog ?? 0}%"></div></div>` : ""}
      ${copiesTo(b.name).map(copyHtml).join("")}
      ${devices ? `<div class="cl-dim">${devices}</div>` : ""}
      ${b.worker ? workerHtml(b) : ""}
      ${state.openMissing.has(b.name) ? missingHtml(b.name) : ""}
    </div>`;
  }

  // The copies to a peer shown on its card: those in progress, and the newest one if it
  // failed (until another copy to that peer starts).
  function copiesTo(name) {
    const all = transfersOf(state.snapshot).filter((t) => t.peer === name);
    const shown = all.filter((t) => !FINISHED.has(t.state));
    if (all[all.length - 1]?.state === "failed") shown.push(all[all.length - 1]);
    return shown;
  }

  function copyHtml(t) {
    const what = `${t.folder}/${t.name}`;
    const from = t.source ? ` from ${t.source}` : "";
    if (t.state === "failed") {
      return `<div class="cl-copy cl-reason" data-transfer="${esc(t.id)}" data-state="failed">copy of <span class="cl-mono">${esc(what)}</span>${
        esc(from)} failed: ${esc(t.error || "no reason given")}</div>`;
    }
    const {done, total, pct} = copyProgress(t);
    const verb = {queued: "waiting to copy", preparing: "preparing to copy", copying: "copying"}[t.state] || String(t.state);
    const title = `${size(done)}${total ? ` of ${size(total)}` : ""}${t.reason === "on_demand" ? " · for a prompt that needs it" : ""}`;
    return `<div class="cl-copy" data-transfer="${esc(t.id)}" data-state="${esc(t.state)}" title="${esc(title)}">
        <div class="cl-dim">${esc(verb)} <span class="cl-mono">${esc(what)}</span>${esc(from)}${pct != null ? ` — ${pct}%` : ""}</div>
        <div class="cl-progress" role="progressbar" aria-valuemin="0" aria-valuemax="100" aria-valuenow="${pct ?? 0}"
          aria-label="Copy of ${esc(what)} to ${esc(t.peer)}"><div style="width:${pct ?? 0}%"></div></div></div>`;
  }

  // A local worker (workers: in the config): its process, a restart button and its log.
  function workerHtml(b) {
    const w = b.worker;
    const busy = state.pending.has(`restart:${b.name}`) ? "disabled" : "";
    const when = w.state === "waiting" && w.retry_at ? ` · again in ${Math.max(0, Math.round(w.retry_at - Date.now() / 1000))} s` : "";
    const lines = state.logs.get(b.name);
    return `<div class="cl-dim cl-bar cl-worker">
        <span class="cl-grow">worker · <span class="cl-worker-state">${esc(w.state)}</span>${w.pid ? ` · pid ${esc(w.pid)}` : ""}${when}
          · ${esc(w.restarts)} restart${w.restarts === 1 ? "" : "s"}${w.gpu != null ? ` · GPU ${esc(w.gpu)}` : ""}${w.last_exit != null ? ` · last exit ${esc(w.last_exit)}` : ""}</span>
        <button data-act="log" data-name="${esc(b.name)}" aria-expanded="${Boolean(lines)}" title="The last lines of its log"
          aria-label="Log of ${esc(b.name)}"><i class="pi pi-align-left"></i>Log</button>
        <button data-act="restart" data-name="${esc(b.name)}" ${busy} title="Stop this ComfyUI and start it again"
          aria-label="Restart ${esc(b.name)}"><i class="pi pi-replay"></i>Restart</button></div>
      ${w.last_error ? `<div class="cl-reason">${esc(w.last_error)}</div>` : ""}
      ${lines ? `<pre class="cl-log cl-mono" aria-label="Log of ${esc(b.name)}">${esc(lines.join("\n")) || "(empty)"}</pre>` : ""}`;
  }

  // A badge when the peer lacks what another peer has; its list on hover (title) and on click.
  function missingBadge(name) {
    const inv = state.inventory?.[name];
    const count = missingCount(inv);
    if (!count) return "";
    return `<button class="cl-badge" data-act="missing" data-name="${esc(name)}" aria-expanded="${state.openMissing.has(name)}"
      title="${esc(`${name} lacks what another peer has:\n${missingText(inv)}`)}" aria-label="${esc(name)} lacks ${count}: show the list">missing ${count}</button>`;
  }

  // A peer to copy a model file from that `dest` lacks: both run an agent that takes the
  // coordinator's secret, and the source has the file (an available one first).
  function copySource(dest, folder, file) {
    const backends = (state.snapshot?.backends || []).filter((b) => !b.removed);
    if (backends.find((b) => b.name === dest)?.agent !== true) return null;
    const from = backends.filter((b) => b.name !== dest && b.agent === true && hasModel(state.inventory?.[b.name], folder, file));
    return (from.find((b) => b.available) || from[0])?.name ?? null;
  }

  function copyButton(dest, folder, file, from) {
    const what = `${folder}/${file}`;
    const busy = state.pending.has(`copy:${dest}:${what}`) ||
      copiesTo(dest).some((t) => !FINISHED.has(t.state) && t.folder === folder && t.name === file);
    return `<button class="cl-copy-btn" data-act="copy" data-name="${esc(dest)}" data-folder="${esc(folder)}" data-file="${esc(file)}"
      data-from="${esc(from)}" ${busy ? "disabled" : ""} title="${esc(busy ? `${what} is being copied to ${dest}` : `Copy ${what} to ${dest} from ${from}`)}"
      aria-label="${esc(`Copy ${what} to ${dest} from ${from}`)}">copy</button>`;
  }

  function missingHtml(name) {
    const inv = state.inventory?.[name];
    if (!missingCount(inv)) return "";
    const rows = missingRows(inv).map(([label, names, total, folder]) => {
      const files = folder == null ? [] : names.slice(0, SHOWN).map((file) => [file, copySource(name, folder, file)]);
      if (!files.some(([, from]) => from)) return `<div><b>${esc(label)}</b>: <span class="cl-mono">${esc(namesText(names, total))}</span></div>`;
      // one line a file, with a button where another peer can send it
      return `<div><b>${esc(label)}</b>:</div>${files.map(([file, from]) => `<div class="cl-file" data-file="${esc(file)}">
          <span class="cl-mono">${esc(file)}</span>${from ? copyButton(name, folder, file, from) : ""}</div>`).join("")}${
        total > files.length ? `<div class="cl-file cl-dim">… (${total} in all)</div>` : ""}`;
    });
    const hint = inv.packs_hint ? `<div class="cl-dim cl-hint">${esc(inv.packs_hint.charAt(0).toUpperCase() + inv.packs_hint.slice(1))}. ComfyLB installs no code on peers.</div>` : "";
    return `<div class="cl-missing" role="region" aria-label="What ${esc(name)} lacks">${rows.join("")}${hint}</div>`;
  }

  function bodyHtml() {
    const s = state.snapshot;
    if (state.detached) {
      const where = state.detached.config ? `<div class="cl-dim">Config: <span class="cl-mono">${esc(state.detached.config)}</span></div>` : "";
      return `<div class="cl-banner cl-detached"><b>ComfyLB is installed but not attached.</b><br>${esc(state.detached.reason)}</div>${where}`;
    }
    const loginButton = `<button data-act="login"><i class="pi pi-sign-in"></i>Log in</button>`;
    if (state.error && !s) return `<div class="cl-banner">${esc(state.error)}</div>${state.error.startsWith("A token") ? loginButton : ""}`;
    if (!s) return `<div class="cl-empty">Loading…</div>`;
    const t = s.stats.totals;
    const totals = [["queued", t.queued], ["running", t.running], ["done", t.completed], ["failed", t.failed],
      ["cancelled", t.cancelled], ["retried", t.retried]]
      .map(([k, v]) => `<div class="cl-total"><b>${v}</b><span>${k}</span></div>`).join("");
    const options = (names, current) => names.map((n) => `<option value="${esc(n)}" ${n === current ? "selected" : ""}>${esc(n.replace("_", " "))}</option>`).join("");
    const strategies = options(s.scheduler.strategies, s.scheduler.strategy);
    const orders = options(s.scheduler.orders || [s.scheduler.order], s.scheduler.order);
    const peers = s.backends.length ? s.backends.map(peerHtml).join("") : `<div class="cl-empty">No peers yet: add one below.</div>`;
    const queue = s.queue.length ? s.queue.map((q) => `<div class="cl-row" data-task="${esc(q.task_id)}">
        <span class="cl-mono cl-grow" title="${esc(q.task_id)}">${esc(q.task_id.slice(0, 8))}</span>
        <span class="cl-dim">${esc(q.state)}${q.peer ? " · " + esc(q.peer) : ""}</span>
        <button class="cl-danger" data-act="cancel" data-id="${esc(q.task_id)}" ${state.pending.has(`cancel:${q.task_id}`) ? "disabled" : ""}
          aria-label="Cancel ${esc(q.task_id)}" title="Cancel"><i class="pi pi-times"></i></button></div>`).join("")
      : `<div class="cl-empty">Nothing queued.</div>`;
    return `${state.error ? `<div class="cl-banner">${esc(state.error)}</div>` : ""}
      ${state.session ? `<div class="cl-bar"><span class="cl-grow"></span><button data-act="logout" title="Forget this browser's ComfyLB session"><i class="pi pi-sign-out"></i>Log out</button></div>` : ""}
      ${s.stats.waiting ? `<div class="cl-banner cl-waiting" role="status">Prompts wait: ${esc(s.stats.waiting)}</div>` : ""}
      ${s.stats.storage && !s.stats.storage.ok ? `<div class="cl-banner cl-storage" role="alert">State database: ${esc(s.stats.storage.problem)} (kept in memory; written again as soon as the disk takes it)</div>` : ""}
      <div class="cl-totals">${totals}</div>
      <h3><i class="pi pi-sitemap"></i><span class="cl-grow">Peers</span>
        <button data-act="check" ${state.pending.has("check") ? "disabled" : ""} title="Check every peer now"><i class="pi pi-refresh"></i>Check now</button></h3>
      <label class="cl-dim" style="display:block;margin-bottom:6px">Strategy
        <select data-act="strategy" aria-label="Load-balancing strategy">${strategies}</select></label>
      <label class="cl-dim" style="display:block;margin-bottom:6px" title="longest first: prompts predicted to run longest go first, so a batch ends evenly">Order
        <select data-act="order" aria-label="Dispatch order">${orders}</select></label>
      <div class="cl-peers">${peers}</div>
      <h3><i class="pi pi-list"></i>Queue</h3><div class="cl-queue">${queue}</div>`;
  }

  function formHtml() {
    const f = state.form;
    const field = (key, label, attrs = "") => `<label>${label}<input name="${key}" value="${esc(f[key])}" ${attrs}></label>`;
    return `<h3><i class="pi pi-plus"></i>Add a peer</h3>
      <form novalidate>
        ${field("name", "Name", 'placeholder="gpu-3" autocomplete="off" required')}
        ${field("host", "Host", 'placeholder="192.168.1.23" autocomplete="off" required')}
        ${field("port", "Port", 'inputmode="numeric"')}
        ${field("max_queue", "Max queue", 'inputmode="numeric"')}
        ${field("weight", "Weight", 'inputmode="decimal"')}
        <label class="cl-wide"><button type="submit" ${state.pending.has("add") ? "disabled" : ""}><i class="pi pi-plus"></i>Add peer</button></label>
        <div class="cl-error" role="alert">${esc(state.formError || "")}</div>
      </form>`;
  }

  function draw() {
    for (const root of state.roots) {
      const body = root.querySelector(".cl-body");
      const focused = root.contains(document.activeElement) && body.contains(document.activeElement) ? focusKey(document.activeElement) : null;
      body.innerHTML = bodyHtml();
      if (focused) body.querySelector(focused)?.focus();
      const err = root.querySelector(".cl-error");
      if (err) err.textContent = state.formError || "";
      const submit = root.querySelector("form button[type=submit]");
      if (submit) submit.disabled = state.pending.has("add");
      // adding a peer needs a running ComfyLB, and the right to manage it
      root.querySelector(".cl-form").hidden = Boolean(state.detached) || !state.snapshot;
    }
    for (const watcher of state.watchers) {
      try { watcher(state); } catch (e) { console.error("ComfyLB: a view of the panel's state failed", e); }
    }
  }

  // Another view of the same state (cluster.js): told after every draw; returns its unwatch.
  function watch(callback) {
    state.watchers.add(callback);
    return () => state.watchers.delete(callback);
  }

  function syncForm() {
    for (const root of state.roots) {
      for (const [k, v] of Object.entries(state.form)) {
        const input = root.querySelector(`form input[name="${k}"]`);
        if (input && input.value !== v) input.value = v;
      }
    }
  }

  function focusKey(el) {
    const act = el.dataset?.act;
    if (!act) return null;
    const extra = (el.dataset.name ? `[data-name="${CSS.escape(el.dataset.name)}"]` : el.dataset.id ? `[data-id="${CSS.escape(el.dataset.id)}"]` : "")
      + (el.dataset.file ? `[data-file="${CSS.escape(el.dataset.file)}"]` : "");
    return `[data-act="${act}"]${extra}`;
  }

  function render(el) {
    addStyle(STYLE_ID, STYLES);
    el.innerHTML = `<div class="comfylb"><div class="cl-body"></div><div class="cl-form">${formHtml()}</div></div>`;
    const root = el.firstElementChild;
    state.roots.add(root);
    root.addEventListener("click", (ev) => {
      const b = ev.target.closest("button[data-act]");
      if (!b || b.disabled) return;
      const {act, name, id, enabled} = b.dataset;
      if (act === "toggle") actions.toggle(name, enabled === "true").catch(() => {});
      else if (act === "remove") actions.remove(name).catch(() => {});
      else if (act === "check") actions.check().catch(() => {});
      else if (act === "cancel") actions.cancel(id).catch(() => {});
      else if (act === "copy") actions.copy(name, b.dataset.folder, b.dataset.file, b.dataset.from).catch(() => {});
      else if (act === "restart") actions.restart(name).catch(() => {});
      else if (act === "log") actions.log(name);
      else if (act === "missing") {
        if (!state.openMissing.delete(name)) state.openMissing.add(name);
        draw();
      }
      else if (act === "login") login().then((ok) => ok && refresh());
      else if (act === "logout") logout();
    });
    root.addEventListener("change", (ev) => {
      if (ev.target.matches('select[data-act="strategy"]')) actions.strategy(ev.target.value).catch(() => {});
      if (ev.target.matches('select[data-act="order"]')) actions.order(ev.target.value).catch(() => {});
    });
    root.addEventListener("input", (ev) => {
      if (ev.target.form && ev.target.name in state.form) state.form[ev.target.name] = ev.target.value;
    });
    root.addEventListener("submit", (ev) => {
      ev.preventDefault();
      actions.add();
    });
    draw();
    refresh();
  }

  function destroy(el) {
    for (const root of [...state.roots]) if (!root.isConnected || el?.contains(root)) state.roots.delete(root);
  }

  return {render, destroy, refresh, resubscribe, watch, state, actions};
}
