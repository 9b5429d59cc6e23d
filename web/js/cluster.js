// The cluster at a glance, for the standalone page's full width (../standalone.html mounts
// it beside the panel): a table of the peers — state, a local worker's restarts, what each
// lacks, copies in progress — and a timeline of the last minutes drawn from the
// comfylb.status pushes: one lane per peer with its jobs as bars, and the queue's depth, so
// idle GPUs and stragglers show without reading numbers.
// The panel (panel.js) fetches and keeps the data; this view watches its state.
// ComfyUI imports every .js file in this folder, so this module has no side effects:
// it only exports.

import { esc, secs, missingRows, missingCount, missingText, untold, transfersOf, copyProgress, peerReason, progressPct,
  addStyle, FINISHED } from "./panel.js";

export const HISTORY_MS = 10 * 60 * 1000;  // how far back the timeline keeps jobs and samples
export const MAX_JOBS = 1000;     // bars kept at most (the oldest ended ones go first)
export const MAX_SAMPLES = 2000;  // queue-depth samples kept at most (one per change)
export const SPANS = [[1, "last minute"], [5, "last 5 minutes"], [10, "last 10 minutes"]];
const TICK_MS = 500;              // running bars grow and the timeline slides this often

const STYLE_ID = "comfylb-cluster-style";
const STYLES = `
.cc-cluster { font-size: 13px; color: var(--fg-color, #ddd); padding: 8px 14px 16px; line-height: 1.35;
  box-sizing: border-box; width: 100%; min-width: 0; }
.cc-cluster * { box-sizing: border-box; }
.cc-cluster h3 { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; margin: 14px 0 6px;
  color: var(--descrip-text, #999); font-weight: 600; display: flex; align-items: center; gap: 8px; }
.cc-cluster .cc-grow { flex: 1; }
.cc-cluster .cc-dim { color: var(--descrip-text, #999); font-size: 11.5px; }
.cc-cluster .cc-mono { font-family: ui-monospace, monospace; font-size: 11.5px; }
.cc-cluster .cc-empty { color: var(--descrip-text, #999); font-style: italic; padding: 4px 0; }
.cc-cluster select { font: inherit; font-size: 12px; text-transform: none; letter-spacing: normal; font-weight: normal;
  color: var(--input-text, #ddd); background: var(--comfy-input-bg, #222);
  border: 1px solid var(--border-color, #444); border-radius: 6px; padding: 2px 6px; }
.cc-cluster select:focus-visible { outline: 2px solid var(--p-primary-color, #5b8def); outline-offset: 1px; }
.cc-cluster .cc-scroll { overflow-x: auto; }
.cc-cluster table { border-collapse: collapse; width: 100%; }
.cc-cluster th { text-align: left; font-weight: 600; font-size: 11px; color: var(--descrip-text, #999);
  border-bottom: 1px solid var(--border-color, #444); padding: 3px 8px 3px 0; white-space: nowrap; }
.cc-cluster td { padding: 5px 8px 5px 0; border-bottom: 1px solid var(--border-color, #333); vertical-align: top; }
.cc-cluster tbody tr:last-child td { border-bottom: none; }
.cc-cluster .cc-name { font-weight: 600; white-space: nowrap; display: flex; align-items: center; gap: 6px; }
.cc-cluster .cc-url { max-width: 190px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.cc-cluster .cc-dot { width: 9px; height: 9px; border-radius: 50%; flex: none; background: #888; display: inline-block; }
.cc-cluster .cc-healthy .cc-dot { background: #3c3; }
.cc-cluster .cc-unhealthy .cc-dot, .cc-cluster .cc-down .cc-dot { background: var(--error-text, #e55); }
.cc-cluster .cc-unknown .cc-dot { background: #cb3; }
.cc-cluster .cc-reason { color: var(--error-text, #e55); font-size: 11.5px; max-width: 220px; overflow: hidden;
  text-overflow: ellipsis; white-space: nowrap; }
.cc-cluster .cc-lacks div, .cc-cluster .cc-what { white-space: nowrap; max-width: 260px; overflow: hidden; text-overflow: ellipsis; }
.cc-cluster .cc-what { display: block; }
.cc-cluster .cc-copy + .cc-copy { margin-top: 4px; }
.cc-cluster .cc-lacks { border-left: 2px solid #cb3; padding-left: 6px; }
.cc-cluster .cc-running { white-space: nowrap; }
.cc-cluster .cc-meter { height: 4px; background: var(--comfy-input-bg, #222); border-radius: 2px; margin-top: 2px; overflow: hidden; min-width: 60px; }
.cc-cluster .cc-meter > div { height: 100%; background: var(--p-primary-color, #5b8def); }
.cc-cluster .cc-timeline { position: relative; }
.cc-cluster svg { display: block; }
.cc-cluster svg text { font-size: 10.5px; fill: var(--descrip-text, #999); font-family: system-ui, sans-serif; }
.cc-cluster svg text.cc-lane-name { fill: var(--fg-color, #ddd); font-size: 11.5px; }
.cc-cluster .cc-lane-dot { fill: #888; }
.cc-cluster .cc-lane.cc-healthy .cc-lane-dot { fill: #3c3; }
.cc-cluster .cc-lane.cc-unhealthy .cc-lane-dot, .cc-cluster .cc-lane.cc-down .cc-lane-dot { fill: var(--error-text, #e55); }
.cc-cluster .cc-lane.cc-unknown .cc-lane-dot { fill: #cb3; }
.cc-cluster .cc-lane-bg { fill: color-mix(in srgb, var(--fg-color, #ddd) 7%, transparent); }
.cc-cluster .cc-grid { stroke: var(--border-color, #444); stroke-width: 1; }
.cc-cluster .cc-now { stroke: var(--descrip-text, #999); stroke-width: 1; stroke-dasharray: 2 3; }
.cc-cluster .cc-job { fill: var(--p-primary-color, #5b8def); fill-opacity: .5; stroke: var(--comfy-menu-bg, #353535); stroke-width: 1; }
.cc-cluster .cc-job.cc-running { fill-opacity: 1; }
.cc-cluster .cc-job.cc-failed { fill: var(--error-text, #e55); fill-opacity: .75; }
.cc-cluster .cc-depth-area { fill: var(--p-primary-color, #5b8def); fill-opacity: .28; stroke: var(--p-primary-color, #5b8def); stroke-width: 1.5; }
.cc-cluster .cc-depth-line { fill: none; stroke: var(--fg-color, #ddd); stroke-opacity: .7; stroke-width: 1.2; stroke-dasharray: 4 2; }
.cc-cluster .cc-legend { display: flex; gap: 12px; flex-wrap: wrap; margin-top: 4px; }
.cc-cluster .cc-legend i { display: inline-block; width: 14px; height: 8px; border-radius: 2px; margin-right: 4px; vertical-align: middle;
  background: var(--p-primary-color, #5b8def); }
.cc-cluster .cc-legend i.cc-k-done { opacity: .5; }
.cc-cluster .cc-legend i.cc-k-failed { background: var(--error-text, #e55); opacity: .75; }
.cc-cluster .cc-legend i.cc-k-queued { opacity: .35; border-top: 2px solid var(--p-primary-color, #5b8def); }
.cc-cluster .cc-legend i.cc-k-flight { background: none; border-top: 2px dashed var(--fg-color, #ddd); height: 0; opacity: .7; }
.cc-cluster .cc-tip { position: absolute; pointer-events: none; background: var(--comfy-menu-bg, #353535); color: var(--fg-color, #ddd);
  border: 1px solid var(--border-color, #444); border-radius: 6px; padding: 3px 7px; font-size: 11.5px; white-space: nowrap; z-index: 2; }
`;

const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : 0);
const short = (id) => String(id ?? "").slice(0, 8);
const ago = (ms) => (ms < 60000 ? `−${Math.round(ms / 1000)} s` : `−${+(ms / 60000).toFixed(1)} min`);

function bytes(n) {
  if (typeof n !== "number" || !Number.isFinite(n)) return "?";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

// -- history: what the pushes said, kept for the timeline -----------------------------------

export function createHistory() {
  // jobs: "task\npeer\nattempt" → {id, peer, start, end (null while running), failed} (ms, this clock)
  // samples: [{t, queued, inflight}], one per change of either
  return {jobs: new Map(), samples: [], seen: null, skew: 0, failedCounts: new Map()};
}

/** One snapshot (a push, or GET /lb/status) into the history at `now` (ms, this browser's
 *  clock).  A job's bar starts when its task started running on its peer (the coordinator's
 *  started_at, moved onto this clock) and ends with the first snapshot that no longer shows it
 *  running there.  Returns whether the snapshot was new. */
export function record(h, snap, now = Date.now()) {
  if (!snap || snap === h.seen) return false;
  h.seen = snap;
  const backends = Array.isArray(snap.backends) ? snap.backends : [];
  const ats = backends.map((b) => b?.at).filter((t) => typeof t === "number" && Number.isFinite(t));
  if (ats.length) h.skew = Math.max(...ats) * 1000 - now;  // the coordinator's clock minus ours
  const running = new Map();
  for (const q of Array.isArray(snap.queue) ? snap.queue : []) {
    if (q?.state === "running" && q.peer && q.task_id) running.set(`${q.task_id}\n${q.peer}\n${q.attempts ?? 0}`, q);
  }
  const ended = new Map();  // peer → its bars that ended with this snapshot
  for (const [key, job] of h.jobs) {
    if (job.end == null && !running.has(key)) {
      job.end = Math.max(now, job.start);
      ended.set(job.peer, [...(ended.get(job.peer) || []), job]);
    }
  }
  for (const [key, q] of running) {
    if (h.jobs.has(key)) continue;
    const started = typeof q.started_at === "number" && Number.isFinite(q.started_at) ? q.started_at * 1000 - h.skew : now;
    h.jobs.set(key, {id: String(q.task_id), peer: String(q.peer), start: Math.min(now, started), end: null, failed: false});
  }
  // a peer's failed count rose with this snapshot: as many of its bars that just ended failed
  for (const b of backends) {
    if (!b?.name) continue;
    const before = h.failedCounts.get(b.name);
    const rose = before == null ? 0 : num(b.jobs_failed) - before;
    h.failedCounts.set(b.name, num(b.jobs_failed));
    if (rose > 0) for (const job of (ended.get(b.name) || []).slice(-rose)) job.failed = true;
  }
  const stats = snap.stats || {};
  const sample = {t: now, queued: num(stats.queue_depth), inflight: num(stats.in_flight)};
  const last = h.samples[h.samples.length - 1];
  if (!last || last.queued !== sample.queued || last.inflight !== sample.inflight) h.samples.push(sample);
  prune(h, now);
  return true;
}

/** Forget what is older than HISTORY_MS, and keep at most MAX_SAMPLES samples and MAX_JOBS bars. */
export function prune(h, now = Date.now()) {
  const cutoff = now - HISTORY_MS;
  let drop = 0;  // the last sample before the cutoff stays: it is the value at the cutoff
  while (drop + 1 < h.samples.length && h.samples[drop + 1].t <= cutoff) drop++;
  drop = Math.max(drop, h.samples.length - MAX_SAMPLES);
  if (drop > 0) h.samples.splice(0, drop);
  for (const [key, job] of h.jobs) if (job.end != null && job.end < cutoff) h.jobs.delete(key);
  for (const [key, job] of h.jobs) {
    if (h.jobs.size <= MAX_JOBS) break;
    if (job.end != null) h.jobs.delete(key);
  }
}

// -- the peer table ---------------------------------------------------------------------------

function lacksHtml(inv) {
  if (!inv) return `<span class="cc-dim">–</span>`;
  if (!missingCount(inv)) return `<span class="cc-dim">${untold(inv) ? "not known yet" : "nothing"}</span>`;
  const lines = missingRows(inv).map(([label, names, total]) => {
    const shown = names.slice(0, 2);
    const more = total - shown.length;
    return `<div><span class="cc-dim">${esc(label)}</span> ${shown.length ? esc(shown.join(", ")) : ""}${
      more > 0 ? `<span class="cc-dim">${shown.length ? ` +${more}` : more}</span>` : ""}</div>`;
  });
  return `<div class="cc-lacks" title="${esc(missingText(inv))}">${lines.join("")}</div>`;
}

function copyHtml(t) {
  const {done, total, pct} = copyProgress(t);
  const what = [t.folder, t.name].filter(Boolean).join("/") || t.id;
  const title = `${what}${t.source ? ` from ${t.source}` : ""}: ${t.state}, ${bytes(done)}${total != null ? ` of ${bytes(total)}` : ""}`;
  return `<div class="cc-copy" data-transfer="${esc(t.id)}" data-state="${esc(t.state)}" title="${esc(title)}">
      <span class="cc-mono cc-what">${esc(what)}</span><span class="cc-dim">${esc(t.state)}</span>
      <b class="cc-pct">${pct != null ? `${pct}%` : t.state === "queued" ? "" : esc(bytes(done))}</b>
      <div class="cc-meter" role="progressbar" aria-valuemin="0" aria-valuemax="100" aria-valuenow="${pct ?? 0}"
        aria-label="Copy of ${esc(what)}"><div style="width:${pct ?? 0}%"></div></div></div>`;
}

function rowHtml(b, snap, inventory, copies) {
  const w = b.worker;
  const reason = peerReason(b);
  const running = (snap.queue || []).filter((q) => q?.state === "running" && q.peer === b.name);
  const prog = progressPct(b);
  const runningHtml = running.length
    ? running.map((q) => `<span class="cc-mono" title="${esc(q.task_id)}">▶ ${esc(short(q.task_id))}</span>`).join(" ")
      + (prog != null ? ` <span class="cc-dim">${prog}%</span>` : "")
    : `<span class="cc-dim">idle</span>`;
  const restarts = w ? `<span title="${esc([w.last_exit != null ? `last exit ${w.last_exit}` : "", w.last_error || ""].filter(Boolean).join("; "))}">${esc(w.restarts)}</span>`
    : `<span class="cc-dim" title="not a local worker">–</span>`;
  return `<tr class="cc-${esc(b.status)}" data-peer="${esc(b.name)}">
    <td><div class="cc-name"><span class="cc-dot"></span>${esc(b.name)}</div>
      <div class="cc-dim cc-mono cc-url" title="${esc(b.url)}">${esc(b.url)}</div></td>
    <td class="cc-state"><span class="cc-status">${esc(b.status)}</span>${w ? `<div class="cc-dim">worker <span class="cc-worker-state">${esc(w.state)}</span></div>` : ""}
      ${reason ? `<div class="cc-reason" title="${esc(reason)}">${esc(reason)}</div>` : ""}</td>
    <td class="cc-load">${num(b.in_flight)}/${esc(b.max_queue)}</td>
    <td class="cc-running">${runningHtml}</td>
    <td class="cc-jobs">${num(b.jobs_done)}${b.jobs_failed ? ` <span class="cc-dim">· ${num(b.jobs_failed)} failed</span>` : ""}</td>
    <td class="cc-mean">${secs(b.mean_job_time)}</td>
    <td class="cc-restarts">${restarts}</td>
    <td class="cc-lacks-cell">${lacksHtml(inventory?.[b.name])}</td>
    <td class="cc-copies">${copies.length ? copies.map(copyHtml).join("") : `<span class="cc-dim">–</span>`}</td>
  </tr>`;
}

/** The copies in progress (the push's `transfers`, absent before ComfyLB had them) by peer. */
export function copiesByPeer(snap) {
  const byPeer = new Map();
  for (const t of transfersOf(snap)) {
    if (typeof t.peer !== "string" || FINISHED.has(t.state)) continue;
    byPeer.set(t.peer, [...(byPeer.get(t.peer) || []), t]);
  }
  return byPeer;
}

function tableHtml(state) {
  const snap = state.snapshot;
  if (!snap) return `<div class="cc-empty">${state.error ? esc(state.error) : "Loading…"}</div>`;
  const backends = Array.isArray(snap.backends) ? snap.backends : [];
  if (!backends.length) return `<div class="cc-empty">No peers yet.</div>`;
  const copies = copiesByPeer(snap);
  return `<div class="cc-scroll"><table aria-label="Peers">
    <thead><tr><th>Peer</th><th>State</th><th title="prompts on the peer / max_queue">Load</th><th>Running</th>
      <th title="jobs ended on the peer">Jobs</th><th>Mean</th><th title="a local worker's restarts">Restarts</th>
      <th title="what another peer has and this one lacks">Lacks</th><th>Copies</th></tr></thead>
    <tbody>${backends.map((b) => rowHtml(b, snap, state.inventory, copies.get(b.name) || [])).join("")}</tbody></table></div>`;
}

// -- the timeline -----------------------------------------------------------------------------

const LABEL_W = 116, RIGHT = 10, TOP = 18, LANE_H = 18, LANE_GAP = 5, DEPTH_H = 64, DEPTH_GAP = 16;

/** The timeline's SVG: one lane per peer (those shown by the snapshot, then any with bars in
 *  the span), its jobs as bars, and under them the coordinator's queue over time. */
export function timelineSvg(h, snap, spanMin, width, now) {
  const span = spanMin * 60000;
  const t0 = now - span;
  const plotW = Math.max(60, width - LABEL_W - RIGHT);
  const x = (t) => LABEL_W + ((t - t0) / span) * plotW;
  const px = (v) => v.toFixed(1);
  const backends = Array.isArray(snap?.backends) ? snap.backends : [];
  const lanes = backends.map((b) => ({name: b.name, status: b.status}));
  const jobs = [...h.jobs.values()].filter((j) => (j.end ?? now) >= t0);
  for (const j of jobs) if (!lanes.some((l) => l.name === j.peer)) lanes.push({name: j.peer, status: "removed"});
  const depthTop = TOP + lanes.length * (LANE_H + LANE_GAP) + DEPTH_GAP;
  const base = depthTop + DEPTH_H;
  const height = base + 4;
  const laneY = (i) => TOP + i * (LANE_H + LANE_GAP);

  // under everything: the lanes (a name, a dot for its state, a background) and the chart's background
  const backs = lanes.map((lane, i) => {
    const y = laneY(i);
    const label = lane.name.length > 15 ? `${lane.name.slice(0, 14)}…` : lane.name;
    return `<g class="cc-lane cc-${esc(lane.status)}" data-peer="${esc(lane.name)}">
      <circle cx="6" cy="${y + LANE_H / 2}" r="4" class="cc-lane-dot"/>
      <text class="cc-lane-name" x="16" y="${y + LANE_H / 2 + 4}" data-tip="${esc(`${lane.name}: ${lane.status}`)}">${esc(label)}</text>
      <rect class="cc-lane-bg" x="${LABEL_W}" y="${y}" width="${px(plotW)}" height="${LANE_H}" rx="3"/></g>`;
  });
  backs.push(`<rect class="cc-lane-bg cc-depth-bg" x="${LABEL_W}" y="${depthTop}" width="${px(plotW)}" height="${DEPTH_H}" rx="3"/>`);

  // the time axis: grid lines and how long ago
  const grid = [];
  const step = spanMin <= 1 ? 10000 : spanMin <= 5 ? 60000 : 120000;
  for (let k = 1; k * step <= span; k++) {
    const gx = px(x(now - k * step));
    grid.push(`<line class="cc-grid" x1="${gx}" x2="${gx}" y1="${TOP - 4}" y2="${base}"/>`,
      `<text x="${gx}" y="${TOP - 7}" text-anchor="middle">${ago(k * step)}</text>`);
  }
  grid.push(`<text x="${px(x(now))}" y="${TOP - 7}" text-anchor="end">now</text>`);

  // each peer's jobs as bars in its lane: from when it started running there to when it ended
  const bars = lanes.map((lane, i) => {
    const y = laneY(i);
    const rects = jobs.filter((j) => j.peer === lane.name).map((j) => {
      const end = j.end ?? now;
      const from = Math.max(j.start, t0);
      const w = Math.max(2, ((end - from) / span) * plotW);  // from the duration: an ended bar keeps its width
      const state = j.end == null ? "running" : j.failed ? "failed" : "done";
      const tip = `${short(j.id)} on ${j.peer}: ${secs((end - j.start) / 1000)}${
        state === "running" ? ", running" : state === "failed" ? ", ended without success" : ""}`;
      return `<rect class="cc-job cc-${state}" data-task="${esc(j.id)}" data-peer="${esc(j.peer)}" data-state="${state}"
        data-tip="${esc(tip)}" x="${px(x(from))}" y="${y + 2}" width="${px(w)}" height="${LANE_H - 4}" rx="2"/>`;
    });
    return `<g class="cc-jobs" data-peer="${esc(lane.name)}">${rects.join("")}</g>`;
  });

  // the queue's depth: an area for prompts waiting in the coordinator, a line for those on peers
  const before = h.samples.filter((s) => s.t <= t0).pop();
  const points = [...(before ? [{...before, t: t0}] : []), ...h.samples.filter((s) => s.t > t0)];
  const peak = points.reduce((m, s) => Math.max(m, s.queued), 0);
  const top = Math.max(1, peak, ...points.map((s) => s.inflight));
  const y = (v) => base - (v / top) * DEPTH_H;
  const steps = (key) => points.map((s, i) => (i ? `H${px(x(s.t))} V${px(y(s[key]))}` : `M${px(x(s.t))} ${px(y(s[key]))}`))
    .join(" ") + ` H${px(x(now))}`;
  const last = points[points.length - 1];
  const queuedNow = last?.queued ?? 0, flightNow = last?.inflight ?? 0;
  const depth = `<g class="cc-depth" data-now="${queuedNow}" data-peak="${peak}" data-top="${top}">
    <text x="16" y="${depthTop + 12}" class="cc-lane-name">queue</text>
    <text x="16" y="${depthTop + 27}">${queuedNow} waiting</text>
    <text x="16" y="${depthTop + 41}">${flightNow} on peers</text>
    <text x="${LABEL_W - 4}" y="${depthTop + 9}" text-anchor="end">${top}</text>
    <text x="${LABEL_W - 4}" y="${base}" text-anchor="end">0</text>
    ${points.length ? `<path class="cc-depth-area" data-tip="${esc(`waiting in the coordinator: ${queuedNow} now, at most ${peak}`)}"
      d="${steps("queued")} V${px(base)} H${px(x(points[0].t))} Z"/>
    <path class="cc-depth-line" d="${steps("inflight")}"/>` : ""}</g>`;

  const nowLine = `<line class="cc-now" x1="${px(x(now))}" x2="${px(x(now))}" y1="${TOP - 4}" y2="${base}"/>`;
  const running = jobs.filter((j) => j.end == null).length;
  const label = `Timeline of the ${SPANS.find(([m]) => m === spanMin)?.[1] || `last ${spanMin} minutes`}: ${lanes.length} peer(s), `
    + `${running} prompt(s) running, ${queuedNow} waiting in the queue (at most ${peak})`;
  return `<svg width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" role="img" aria-label="${esc(label)}">${
    backs.join("")}${grid.join("")}${bars.join("")}${depth}${nowLine}</svg>`;
}

// -- the view ---------------------------------------------------------------------------------

/**
 * panel: what createPanel() (panel.js) returns; its state is shown, and watched for changes.
 * Returns {render(el), destroy(), history, view}.
 */
export function createClusterView(panel) {
  const history = createHistory();
  const view = {span: 5, root: null, timer: null, unwatch: null, ticks: 0, table: null, svg: null};

  function drawTable(state) {
    const el = view.root?.querySelector(".cc-table");
    if (!el) return;
    const html = tableHtml(state);
    if (html !== view.table) {  // unchanged rows stay as they are (a hovered title stays open)
      view.table = html;
      el.innerHTML = html;
    }
  }

  function drawTimeline() {
    const el = view.root?.querySelector(".cc-timeline");
    if (!el || !el.isConnected) return;
    const now = Date.now();
    prune(history, now);
    const snap = panel.state.snapshot;
    const svg = timelineSvg(history, snap, view.span, Math.max(320, el.clientWidth), now);
    if (svg !== view.svg) {  // an idle cluster draws the same timeline every tick: the DOM stays
      view.svg = svg;
      const tip = el.querySelector(".cc-tip");
      el.innerHTML = svg;
      if (tip) el.appendChild(tip);
    }
    view.ticks++;
    el.dataset.ticks = String(view.ticks);
  }

  function onPanel(state) {
    const fresh = record(history, state.snapshot);
    drawTable(state);
    if (fresh) drawTimeline();
  }

  function showTip(ev) {
    const box = view.root?.querySelector(".cc-timeline");
    if (!box) return;
    const text = ev.target?.dataset?.tip;
    let tip = box.querySelector(".cc-tip");
    if (!text) { tip?.remove(); return; }
    if (!tip) {
      tip = document.createElement("div");
      tip.className = "cc-tip";
      box.appendChild(tip);
    }
    tip.textContent = text;
    const r = box.getBoundingClientRect();
    tip.style.left = `${Math.min(ev.clientX - r.left + 12, r.width - tip.offsetWidth - 4)}px`;
    tip.style.top = `${ev.clientY - r.top + 14}px`;
  }

  function render(el) {
    addStyle(STYLE_ID, STYLES);
    el.innerHTML = `<div class="cc-cluster">
      <h3 class="cc-heading"><span class="cc-grow">Peers at a glance</span></h3>
      <div class="cc-table"></div>
      <h3><span class="cc-grow">Timeline</span>
        <select class="cc-span" aria-label="Timeline span">${SPANS.map(([m, label]) =>
          `<option value="${m}" ${m === view.span ? "selected" : ""}>${label}</option>`).join("")}</select></h3>
      <div class="cc-timeline"></div>
      <div class="cc-legend cc-dim"><span><i></i>running</span><span><i class="cc-k-done"></i>ended</span>
        <span><i class="cc-k-failed"></i>ended without success</span><span><i class="cc-k-queued"></i>waiting in the queue</span>
        <span><i class="cc-k-flight"></i>on peers</span></div>
    </div>`;
    view.root = el.firstElementChild;
    view.table = view.svg = null;
    view.root.querySelector(".cc-span").addEventListener("change", (ev) => {
      view.span = Number(ev.target.value) || 5;
      drawTimeline();
    });
    const box = view.root.querySelector(".cc-timeline");
    box.addEventListener("pointermove", showTip);
    box.addEventListener("pointerleave", () => box.querySelector(".cc-tip")?.remove());
    view.unwatch?.();
    view.unwatch = panel.watch(onPanel);
    onPanel(panel.state);
    drawTimeline();
    clearInterval(view.timer);
    view.timer = setInterval(() => {
      if (!view.root?.isConnected) return;
      drawTimeline();
    }, TICK_MS);
  }

  function destroy() {
    clearInterval(view.timer);
    view.unwatch?.();
    view.timer = view.unwatch = view.root = null;
  }

  return {render, destroy, history, view};
}
