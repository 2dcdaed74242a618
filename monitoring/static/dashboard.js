// exitflow monitor dashboard: polls /api/summary every second and draws on canvas (no libraries).
"use strict";

const COLORS = { device: "#3fb68b", edge: "#e0a53b", cloud: "#8a7dff", line: "#4fa3ff", grid: "#2a3540",
                 text: "#8b98a5", drift: "#ff5c5c", swap: "#4fa3ff", epoch: "#ffd84f" };
const TIERS = ["device", "edge", "cloud"];
const $ = (id) => document.getElementById(id);

function fmt(x, digits = 2) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  return Number(x).toFixed(digits);
}
function fmtInt(x) { return x === null || x === undefined ? "–" : Math.round(x).toLocaleString("en-US"); }
function fmtPct(x) { return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%"; }
function fmtBytes(x) {
  if (!x) return "0 B";
  const units = ["B", "KB", "MB", "GB", "TB"];
  const i = Math.min(units.length - 1, Math.floor(Math.log(x) / Math.log(1024)));
  return (x / 1024 ** i).toFixed(i ? 1 : 0) + " " + units[i];
}
function clock(t) { return new Date(t * 1000).toTimeString().slice(0, 8); }
function setText(id, text, value) {
  const el = $(id);
  el.textContent = text;
  if (value !== undefined && value !== null) el.dataset.value = String(value);
}

function canvasContext(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px system-ui, sans-serif";
  return { ctx, w, h };
}

// Rolling ratio over the last `width` seconds: sum(num) / sum(den) per point.
function rolling(series, num, den, width) {
  const out = [];
  for (let i = 0; i < series.length; i++) {
    let a = 0, b = 0;
    for (let j = i; j >= 0 && series[i].t - series[j].t < width; j--) { a += num(series[j]); b += den(series[j]); }
    out.push({ t: series[i].t, v: b > 0 ? a / b : null });
  }
  return out;
}

// A time chart with drift events (red), policy swaps (blue, dashed) and new epochs of the policy state
// (yellow, dotted) marked on the time axis.
function lineChart(canvas, points, opts) {
  const { ctx, w, h } = canvasContext(canvas);
  const pad = { l: 44, r: 8, t: 8, b: 18 };
  const t1 = opts.t1, t0 = opts.t0;
  const vals = points.filter((p) => p.v !== null).map((p) => p.v);
  let lo = opts.min !== undefined ? opts.min : Math.min(...vals, 0);
  let hi = opts.max !== undefined ? opts.max : Math.max(...vals, 1e-9) * 1.1;
  if (hi <= lo) hi = lo + 1;
  const x = (t) => pad.l + ((t - t0) / Math.max(t1 - t0, 1)) * (w - pad.l - pad.r);
  const y = (v) => h - pad.b - ((v - lo) / (hi - lo)) * (h - pad.t - pad.b);
  ctx.strokeStyle = COLORS.grid; ctx.fillStyle = COLORS.text; ctx.lineWidth = 1;
  for (let k = 0; k <= 2; k++) {
    const v = lo + (k / 2) * (hi - lo), yy = y(v);
    ctx.beginPath(); ctx.moveTo(pad.l, yy); ctx.lineTo(w - pad.r, yy); ctx.stroke();
    ctx.fillText(opts.fmt ? opts.fmt(v) : fmt(v), 2, yy + 4);
  }
  for (let k = 0; k <= 2; k++) {
    const t = t0 + (k / 2) * (t1 - t0);
    const label = clock(t);
    ctx.fillText(label, Math.min(Math.max(x(t) - 22, pad.l), w - pad.r - 46), h - 4);
  }
  for (const s of opts.swaps || []) {
    if (s.time < t0 || s.time > t1) continue;
    ctx.save(); ctx.setLineDash([4, 3]); ctx.strokeStyle = COLORS.swap;
    ctx.beginPath(); ctx.moveTo(x(s.time), pad.t); ctx.lineTo(x(s.time), h - pad.b); ctx.stroke(); ctx.restore();
  }
  for (const e of opts.epochs || []) {
    if (e.time < t0 || e.time > t1) continue;
    ctx.save(); ctx.setLineDash([2, 2]); ctx.lineWidth = 2; ctx.strokeStyle = COLORS.epoch;
    ctx.beginPath(); ctx.moveTo(x(e.time), pad.t); ctx.lineTo(x(e.time), h - pad.b); ctx.stroke(); ctx.restore();
  }
  for (const e of opts.events || []) {
    if (e.time < t0 || e.time > t1) continue;
    ctx.strokeStyle = COLORS.drift; ctx.globalAlpha = 0.8;
    ctx.beginPath(); ctx.moveTo(x(e.time), pad.t); ctx.lineTo(x(e.time), h - pad.b); ctx.stroke();
    ctx.globalAlpha = 1;
  }
  ctx.strokeStyle = opts.color || COLORS.line; ctx.lineWidth = 1.8; ctx.beginPath();
  let open = false;
  for (const p of points) {
    if (p.v === null) { open = false; continue; }
    if (!open) { ctx.moveTo(x(p.t), y(p.v)); open = true; } else { ctx.lineTo(x(p.t), y(p.v)); }
  }
  ctx.stroke();
  if (!vals.length) { ctx.fillStyle = COLORS.text; ctx.fillText("no data yet", w / 2 - 30, h / 2); }
}

function stackedBars(canvas, exits) {
  const { ctx, w, h } = canvasContext(canvas);
  const layers = new Set();
  for (const t of TIERS) Object.keys(exits[t] || {}).forEach((l) => layers.add(l));
  const keys = [...layers].sort((a, b) => Number(a) - Number(b));
  const pad = { l: 44, r: 8, t: 8, b: 18 };
  const totals = keys.map((k) => TIERS.reduce((s, t) => s + ((exits[t] || {})[k] || 0), 0));
  const hi = Math.max(...totals, 1);
  const bw = (w - pad.l - pad.r) / Math.max(keys.length, 1);
  ctx.fillStyle = COLORS.text; ctx.strokeStyle = COLORS.grid;
  for (let k = 0; k <= 2; k++) {
    const v = (k / 2) * hi, yy = h - pad.b - (v / hi) * (h - pad.t - pad.b);
    ctx.beginPath(); ctx.moveTo(pad.l, yy); ctx.lineTo(w - pad.r, yy); ctx.stroke();
    ctx.fillText(fmtInt(v), 2, yy + 4);
  }
  keys.forEach((k, i) => {
    let base = h - pad.b;
    for (const t of TIERS) {
      const n = (exits[t] || {})[k] || 0;
      const bh = (n / hi) * (h - pad.t - pad.b);
      ctx.fillStyle = COLORS[t];
      ctx.fillRect(pad.l + i * bw + bw * 0.15, base - bh, bw * 0.7, bh);
      base -= bh;
    }
    ctx.fillStyle = COLORS.text;
    ctx.fillText("L" + k, pad.l + i * bw + bw / 2 - 7, h - 4);
  });
  if (!keys.length) ctx.fillText("no exits yet", w / 2 - 30, h / 2);
}

function armBars(canvas, arms) {
  const { ctx, w, h } = canvasContext(canvas);
  if (!arms.length) { ctx.fillStyle = COLORS.text; ctx.fillText("no arm state for this policy", 10, h / 2); return; }
  const pad = { l: 44, r: 8, t: 8, b: 18 };
  const hi = Math.max(...arms.map((a) => a.pulls), 1);
  const bw = (w - pad.l - pad.r) / arms.length;
  arms.forEach((a, i) => {
    const bh = (a.pulls / hi) * (h - pad.t - pad.b);
    ctx.fillStyle = COLORS.line;
    ctx.fillRect(pad.l + i * bw + bw * 0.2, h - pad.b - bh, bw * 0.6, bh);
    ctx.fillStyle = COLORS.text;
    ctx.fillText(a.arm, pad.l + i * bw + bw / 2 - 4, h - 4);
  });
  ctx.fillText(fmtInt(hi) + " pulls", 2, pad.t + 8);
}

function rows(tbody, data, cells) {
  const el = document.querySelector(tbody);
  el.replaceChildren(...data.map((d) => {
    const tr = document.createElement("tr");
    for (const c of cells(d)) {
      const td = document.createElement("td");
      if (typeof c === "object" && c !== null) { td.textContent = c.text; if (c.cls) td.className = c.cls; }
      else td.textContent = c;
      tr.appendChild(td);
    }
    return tr;
  }));
}

function render(s) {
  const n = s.samples;
  setText("kpi-samples", fmtInt(n), n);
  setText("kpi-samples-sub", `${fmtInt(s.tiers.device)} device · ${fmtInt(s.tiers.edge)} edge · ${fmtInt(s.tiers.cloud)} cloud`);
  setText("kpi-throughput", fmt(s.throughput, 1), s.throughput);
  setText("kpi-cost", fmt(s.cost_per_sample, 3), s.cost_per_sample);
  setText("kpi-cost-sub", `λ units · total ${fmt(s.cost.total, 1)} λ`);
  $("kpi-cost-sub").dataset.value = String(s.cost.total);
  setText("kpi-offload", fmtPct(s.offload_rate), s.offload_rate);
  setText("kpi-offload-sub", `${fmtInt(s.offloads)} offloaded`);
  $("kpi-offload-sub").dataset.value = String(s.offloads);
  const acc = s.accuracy;
  setText("kpi-accuracy", fmtPct(acc.last_1000), acc.last_1000);
  setText("kpi-accuracy-sub", `overall ${fmtPct(acc.overall)} of ${fmtInt(acc.labelled)} labelled · evaluation only`);
  setText("kpi-latency", `${fmt(s.latency_ms[50], 0)} / ${fmt(s.latency_ms[99], 0)}`);
  setText("kpi-bytes", fmtBytes(s.bytes_offloaded), s.bytes_offloaded);
  setText("kpi-bytes-sub", n ? `${fmtBytes(s.bytes_offloaded / Math.max(s.offloads, 1))} per offload` : "");
  setText("kpi-drift", fmtInt(s.drift.total), s.drift.total);
  const last = s.drift.events[s.drift.events.length - 1];
  setText("kpi-drift-sub", last ? `last: ${last.signal} (${last.detector}) at seq ${last.seq}` : "none so far");

  const epochs = (s.epochs && s.epochs.events) || [];
  setText("kpi-epochs", fmtInt(epochs.length), epochs.length);
  const lastEpoch = epochs[epochs.length - 1];
  setText("kpi-epochs-sub", lastEpoch ? `last: ${lastEpoch.policy} epoch ${lastEpoch.epoch} at seq ${lastEpoch.seq ?? "?"}`
    : "no reset so far");

  const kafka = s.kafka;
  $("status-dot").className = "dot " + (kafka.connected ? "ok" : "bad");
  setText("status-text", !kafka.connected ? `Kafka: ${kafka.error || "connecting"}`
    : kafka.error ? `Kafka ok · ${kafka.error}` : `Kafka ok · lag ${fmtInt(kafka.lag)}`);
  const active = s.policy.active;
  const seen = Object.keys(s.policy.results_by_policy);
  $("policy-badge").textContent = "policy: " + (active ? `${active.name} v${active.version}` : (seen[seen.length - 1] || "–"));
  setText("updated", `updated ${clock(s.time)} · ${s.topics.results}`);

  const series = s.series;
  const t1 = series.length ? series[series.length - 1].t : s.time;
  const t0 = Math.min(series.length ? series[0].t : t1 - 60, t1 - 10);
  const marks = { t0, t1, events: s.drift.events, swaps: s.policy.swaps, epochs };
  // The newest second is still filling: leave it out of the throughput line.
  const done = series.length > 1 ? series.slice(0, -1) : series;
  lineChart($("chart-throughput"), done.map((p) => ({ t: p.t, v: p.n })), { ...marks, min: 0, fmt: (v) => fmt(v, 0) });
  lineChart($("chart-cost"), rolling(series, (p) => p.cost, (p) => p.n, 5), { ...marks, min: 0 });
  lineChart($("chart-offload"), rolling(series, (p) => p.offloads, (p) => p.n, 5),
            { ...marks, min: 0, max: 1, fmt: (v) => fmtPct(v), color: COLORS.cloud });
  lineChart($("chart-accuracy"), rolling(series, (p) => p.correct, (p) => p.labelled, 10),
            { ...marks, min: 0, max: 1, fmt: (v) => fmtPct(v), color: COLORS.device });
  lineChart($("chart-confidence"), series.map((p) => ({ t: p.t, v: p.confidence })),
            { ...marks, min: 0.5, max: 1, color: COLORS.edge });
  stackedBars($("chart-exits"), s.exits);

  const pol = $("policy");
  pol.replaceChildren();
  const lines = active
    ? [`${active.name} — version ${active.version}`, `settings: ${JSON.stringify(active.params)}`, `cost model: ${active.cost_line || active.cost}`]
    : ["no active policy in Redis (pass --redis-url); from results: " + (seen.join(", ") || "–")];
  if (active && s.epochs && s.epochs.current[active.name] !== undefined) {
    const e = epochs.filter((x) => x.policy === active.name).pop();
    lines.push(`state epoch ${s.epochs.current[active.name]}` + (e ? ` since sample ${e.at} (${e.mode})` : ""));
  }
  for (const text of lines) { const div = document.createElement("div"); div.textContent = text; pol.appendChild(div); }
  // Swaps as the results show them (first sample decided by the new version) and as control set them.
  const swaps = s.policy.swaps.map((w) => ({ ...w, via: `results from seq ${w.seq ?? "?"}` }))
    .concat(s.policy.control_swaps.map((w) => ({ ...w, via: "set in Redis" })))
    .sort((a, b) => b.time - a.time).slice(0, 10);
  rows("#swaps tbody", swaps, (w) => [clock(w.time), w.name, w.version, w.via]);

  const arms = (s.arms && s.arms.arms) || [];
  setText("arms-ns", s.arms ? s.arms.ns : "");
  armBars($("chart-arms"), arms);
  rows("#arms tbody", arms, (a) => [a.arm, fmt(a.pulls, 0) + (a.pending ? ` (+${fmt(a.pending, 0)} pending)` : ""),
                                    fmt(a.value, 3)]);
  rows("#epochs tbody", epochs.slice(-12).reverse(),
       (e) => [clock(e.time), e.policy, { text: String(e.epoch), cls: "epoch" }, e.at ?? "–", e.seq ?? "–", e.source ?? "–",
               e.reason ?? "–", e.mode === "decay" ? `decay ×${e.factor}` : (e.mode || "–")]);
  rows("#drift tbody", s.drift.events.slice(-12).reverse(),
       (e) => [clock(e.time), { text: e.signal, cls: "drift" }, e.stratum ?? "–", e.detector, e.seq ?? "–", e.source ?? "–"]);
  rows("#sources tbody", Object.entries(s.sources), ([k, v]) => [k || "(none)", fmtInt(v)]);
  setText("join", `labels joined ${fmtInt(acc.labelled)} · waiting: ${fmtInt(acc.pending_results)} results, ` +
    `${fmtInt(acc.pending_labels)} labels · never labelled ${fmtInt(acc.unlabelled)} · labels without result ${fmtInt(acc.orphan_labels)}`);
}

function legend() {
  const el = $("legend-exits");
  for (const t of TIERS) {
    const span = document.createElement("span"), dot = document.createElement("i");
    dot.style.background = COLORS[t];
    span.append(dot, t);
    el.appendChild(span);
  }
}

let busy = false;
async function tick() {
  if (busy) return;
  busy = true;
  try {
    const res = await fetch("/api/summary", { cache: "no-store" });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    render(await res.json());
    document.body.dataset.loaded = "1";
  } catch (err) {
    $("status-dot").className = "dot bad";
    setText("status-text", "monitor unreachable: " + err.message);
  } finally {
    busy = false;
  }
}

legend();
tick();
setInterval(tick, 1000);
