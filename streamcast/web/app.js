// streamcast live page: one chart per symbol from the /events server-sent event stream, each with
// a price scale, a time axis and the symbol's 1-step skill, and the prediction intervals shaded
// where the daemon publishes them (`bands`: 80 % and 95 % by default, the wider lighter); the
// header shows the replica's throughput, lag, p99 latency and model version (the server's
// `status` events). A `forecast` event is a tick's (a price and its 1-step forecast); a `path`
// event is the multi-step path from an earlier tick, published apart and later (no `next`, no new
// price): the chart draws it from that tick. No libraries.
"use strict";

const KEEP = 200; // points per chart
const AHEAD = 50; // room to the right of the last price for the newest path
const charts = new Map(); // symbol -> {symbol, prices, nexts, nextBands, times, ids, path, ...}
// what the page shows, for a reader (and the tests): counts, the last skill and status events,
// each chart's axis labels, each symbol's skill, the bands drawn, the prices drawn (how many)
// and the path drawn (the tick it starts from, that tick's index among the prices, its steps; by
// symbol, in objects without a prototype: a symbol may be named __proto__)
const bySymbol = () => Object.create(null);
window.streamcast = {
  events: 0, forecasts: 0, paths: 0, skill: null, status: null,
  axes: bySymbol(), symbolSkill: bySymbol(), bands: bySymbol(), prices: bySymbol(), path: bySymbol(),
};

function chart(symbol) {
  let c = charts.get(symbol);
  if (c) return c;
  const figure = document.createElement("figure");
  const caption = document.createElement("figcaption");
  caption.textContent = symbol;
  const canvas = document.createElement("canvas");
  figure.append(caption, canvas);
  document.getElementById("charts").append(figure);
  // ids: each price's tick id (a path starts from one of them); pathAt: the index of the newest
  // path's origin among the prices
  c = {
    symbol, prices: [], nexts: [], nextBands: [], times: [], ids: [], scored: [], path: null,
    pathBands: null, pathAt: 0, canvas, caption, model: "",
  };
  charts.set(symbol, c);
  return c;
}

// A number to draw, or null: the server sends null for a non-finite value, and a forecast whose
// model output was not finite comes without `next` (with a `reason`), a path without `path`.
const finite = (v) => (Number.isFinite(v) ? v : null);
const fmt = (v, digits) => (Number.isFinite(v) ? v.toFixed(digits) : "-");
const signed = (v) => (Number.isFinite(v) ? (v >= 0 ? "+" : "") + v.toFixed(3) : "-");

// Prediction intervals. A forecast's `bands` is {"80": {"next": [lo, hi]}, "95": ...}, a path's
// {"80": {"path": [[lo, hi], ...]}, ...}; an older entry has none. A band is kept only whole:
// finite, lo <= hi, and a path band as long as the path it bounds (anything else, e.g. a null the
// server sent for a non-finite number, is not drawn). Returns {next, path}, each {level: ...} or
// null.
const pair = (p) =>
  Array.isArray(p) && p.length === 2 && Number.isFinite(p[0]) && Number.isFinite(p[1]) && p[0] <= p[1]
    ? [p[0], p[1]] : null;
function bandsOf(f) {
  const next = Object.create(null), path = Object.create(null);
  const bands = f.bands && typeof f.bands === "object" ? f.bands : {};
  for (const [level, band] of Object.entries(bands)) {
    if (!band || typeof band !== "object" || !(Number(level) > 0 && Number(level) < 100)) continue;
    const n = pair(band.next);
    if (n && finite(f.next) !== null) next[level] = n;
    if (Array.isArray(band.path) && Array.isArray(f.path) && band.path.length === f.path.length) {
      const pairs = band.path.map(pair);
      if (pairs.every(Boolean)) path[level] = pairs;
    }
  }
  const some = (o) => (Object.keys(o).length ? o : null);
  return { next: some(next), path: some(path) };
}
// the levels of some bands, widest first (drawn first, so that a narrower one shades over it)
const levelsOf = (...bands) =>
  [...new Set(bands.flatMap((b) => (b ? Object.keys(b) : [])))].sort((a, b) => Number(b) - Number(a));
// the band the caption shows: 80 % when published, else the narrowest
const captionLevel = (next) => (next ? ("80" in next ? "80" : levelsOf(next).pop()) : null);

// The id of the entry's tick (the entry's own id: the daemon publishes it so).
const tickId = (f) => String(f.tick_id || f.id || "");

// When the price was observed: the tick's event time (ts) when it had one, else its arrival in
// Redis (the milliseconds of its stream id).
function tickTime(f) {
  if (Number.isFinite(f.tick_ts)) return f.tick_ts;
  const ms = parseInt(tickId(f).split("-")[0], 10);
  return Number.isFinite(ms) ? ms : null;
}

// The previous point's 1-step forecast meets its truth, this price: squared errors relative to
// the origin price for the model and for the naive forecast (no change), as the daemon scores.
function score(c, price) {
  const k = c.prices.length - 1;
  if (k < 0 || price === null || c.prices[k] === null || c.nexts[k] === null) return;
  const origin = c.prices[k];
  const scale = Math.abs(origin) + (origin === 0 ? 1 : 0);
  const model = (c.nexts[k] - price) / scale, naive = (origin - price) / scale;
  c.scored.push([model * model, naive * naive]);
  if (c.scored.length > KEEP) c.scored.shift();
}

// 1 - MSE model / MSE naive over the forecasts on the chart (null while naive's MSE is 0).
function symbolSkill(c) {
  let model = 0, naive = 0;
  for (const [m, n] of c.scored) { model += m; naive += n; }
  return { skill: naive > 0 ? 1 - model / naive : null, n: c.scored.length };
}

function onForecast(f) {
  if (!f || typeof f.symbol !== "string") return;
  const c = chart(f.symbol);
  const price = finite(f.price);
  score(c, price);
  c.prices.push(price);
  c.nexts.push(finite(f.next)); // the forecast of the value after this price
  const bands = bandsOf(f);
  c.nextBands.push(bands.next);
  c.times.push(tickTime(f));
  c.ids.push(tickId(f));
  if (c.prices.length > KEEP) {
    for (const kept of [c.prices, c.nexts, c.nextBands, c.times, c.ids]) kept.shift();
    // the path's origin moved left with the prices; once it is off the chart, so is the path
    if (c.path && --c.pathAt < 0) { c.path = null; c.pathBands = null; c.pathAt = 0; }
  }
  // a forecast entry of a daemon from before the paths stream carried its path itself
  if (Array.isArray(f.path)) setPath(c, f, bands.path, c.prices.length - 1);
  c.model = typeof f.model === "string" ? f.model : "";
  const s = (window.streamcast.symbolSkill[f.symbol] = symbolSkill(c));
  const level = captionLevel(bands.next);
  const band = level ? ` ${level}% [${fmt(bands.next[level][0], 2)}, ${fmt(bands.next[level][1], 2)}]` : "";
  const next = fmt(f.next, 2) + band + (f.reason ? ` (${f.reason})` : "");
  c.caption.textContent =
    `${f.symbol}  price ${fmt(f.price, 2)}  next ${next}  skill h1 ${signed(s.skill)} (n=${s.n})  model ${c.model}`;
  c.dirty = true;
}

function setPath(c, f, bands, at) {
  c.path = f.path.map(finite); c.pathBands = bands; c.pathAt = at;
}

// A path entry: the newest path of the symbol, from the tick with its tick_id. It moves no price
// and adds no forecast: it is drawn from that tick where the chart has it (the path comes after
// its tick's forecast); one whose tick the chart does not have (scrolled off, or never shown) or
// that is withheld (no `path`: the reason says why) leaves the path shown as it is.
function onPath(f) {
  if (!f || typeof f.symbol !== "string" || !Array.isArray(f.path)) return;
  const c = charts.get(f.symbol);
  const at = c ? c.ids.lastIndexOf(tickId(f)) : -1;
  if (at < 0 || (c.path && at < c.pathAt)) return; // nowhere to start it, or older than the one shown
  setPath(c, f, bandsOf(f).path, at);
  c.dirty = true;
}

// Round prices for the scale: steps of 1, 2 or 5 times a power of ten, about `count` of them.
function priceTicks(lo, hi, count) {
  const raw = (hi - lo) / count;
  const e = Math.floor(Math.log10(raw));
  const m = [1, 2, 5, 10].find((k) => k * 10 ** e >= raw * (1 - 1e-9));
  const step = m * 10 ** e;
  const digits = Math.max(0, -(m === 10 ? e + 1 : e));
  const labels = [];
  for (let k = Math.ceil(lo / step - 1e-9); k <= Math.floor(hi / step + 1e-9); k++) {
    labels.push({ value: k * step, text: (k * step).toFixed(digits) });
  }
  return labels;
}

function timeText(ms, spanMs) {
  const d = new Date(ms);
  const two = (n) => String(n).padStart(2, "0");
  if (spanMs > 86400000) return `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())}`;
  return `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
}

// The times of the newest price and of positions 0, KEEP/3 and 2 KEEP/3 at least LABEL_GAP
// before it, and where the newest path ends (its steps are ticks, not seconds).
const LABEL_GAP = 45; // chart positions between two time labels (about 60 px at 420 px)
function timeTicks(c) {
  const n = c.prices.length;
  const known = c.times.filter(Number.isFinite);
  const span = known.length ? Math.max(...known) - Math.min(...known) : 0;
  const at = [0, Math.round(KEEP / 3), Math.round((2 * KEEP) / 3)].filter((i) => i <= n - 1 - LABEL_GAP);
  const labels = [];
  for (const i of n ? [...at, n - 1] : []) {
    if (!Number.isFinite(c.times[i])) continue;
    const text = timeText(c.times[i], span);
    // a burst of ticks within one second would repeat its time: once is enough
    if (labels.length && labels[labels.length - 1].text === text) continue;
    labels.push({ index: i, text, align: i === 0 ? "left" : "center" });
  }
  if (c.path && c.path.length) {
    labels.push({ index: c.pathAt + c.path.length, text: `+${c.path.length} ticks`, align: "right" });
  }
  return labels;
}

function draw(c) {
  const canvas = c.canvas;
  const dpr = devicePixelRatio;
  const w = (canvas.width = canvas.clientWidth * dpr);
  const h = (canvas.height = canvas.clientHeight * dpr);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  const values = c.prices.concat(c.nexts, c.path || [], bandValues(c)).filter(Number.isFinite);
  if (values.length < 2) return;
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi === lo) { hi += 1; lo -= 1; }
  // the plot area: the price scale to its right, the time axis below
  const left = 4 * dpr, right = w - 64 * dpr, top = 8 * dpr, bottom = h - 20 * dpr;
  const x = (i) => left + (i / (KEEP + AHEAD - 1)) * (right - left);
  const y = (v) => bottom - ((v - lo) / (hi - lo)) * (bottom - top);
  const prices = priceTicks(lo, hi, 5);
  const times = timeTicks(c);
  c.axes = window.streamcast.axes[c.symbol] = { price: prices.map((t) => t.text), time: times.map((t) => t.text) };
  axes(ctx, { left, right, bottom, dpr, x, y }, prices, times);
  const line = (points, color, width) => {
    ctx.strokeStyle = color; ctx.lineWidth = width * dpr; ctx.beginPath();
    let gap = true; // a missing value breaks the line rather than dropping it to the axis
    for (const [i, v] of points) {
      if (v === null) { gap = true; continue; }
      if (gap) ctx.moveTo(x(i), y(v)); else ctx.lineTo(x(i), y(v));
      gap = false;
    }
    ctx.stroke();
  };
  window.streamcast.bands[c.symbol] = shade(c, ctx, x, y, dpr);
  window.streamcast.prices[c.symbol] = c.prices.length;
  window.streamcast.path[c.symbol] =
    c.path ? { from: c.ids[c.pathAt], at: c.pathAt, steps: c.path.length } : null;
  line(c.prices.map((v, i) => [i, v]), "#e8e8e8", 1.5);
  line(c.nexts.map((v, i) => [i + 1, v]), "#4fc3f7", 1);
  if (c.path && c.path.length) line(c.path.map((v, k) => [c.pathAt + 1 + k, v]), "#ffb74d", 1.5);
}

// Every bound of the bands on the chart: the price scale makes room for them.
function bandValues(c) {
  const out = [];
  for (const b of c.nextBands) if (b) for (const p of Object.values(b)) out.push(p[0], p[1]);
  if (c.pathBands) for (const ps of Object.values(c.pathBands)) for (const p of ps) out.push(p[0], p[1]);
  return out;
}

// The bands, under the lines: each level a translucent layer, widest first, so that a wider band
// shows lighter than a narrower one over it. Around the 1-step forecasts a ribbon of their bands
// (each run of forecasts with a band one polygon) and a bar for the newest; around the newest
// path a fan from its origin price. Returns what was drawn (the page's state, for the tests).
const BAND_FILL = { next: "rgba(79, 195, 247, 0.16)", path: "rgba(255, 183, 77, 0.2)" };
const BAND_BAR = "rgba(79, 195, 247, 0.45)";
function shade(c, ctx, x, y, dpr) {
  const shown = { levels: [], polygons: 0, bar: [], path: [], next: null };
  const polygon = (run) => { // run: [[i, lo, hi], ...], at least two
    ctx.beginPath();
    run.forEach(([i, lo], k) => (k ? ctx.lineTo(x(i), y(lo)) : ctx.moveTo(x(i), y(lo))));
    for (let k = run.length - 1; k >= 0; k--) ctx.lineTo(x(run[k][0]), y(run[k][2]));
    ctx.closePath(); ctx.fill();
    shown.polygons++;
  };
  const levels = levelsOf(...c.nextBands, c.pathBands);
  shown.levels = levels;
  ctx.fillStyle = BAND_FILL.next;
  for (const level of levels) {
    let run = [];
    c.nextBands.forEach((b, i) => {
      if (b && b[level]) { run.push([i + 1, b[level][0], b[level][1]]); return; }
      if (run.length >= 2) polygon(run);
      run = [];
    });
    if (run.length >= 2) polygon(run);
  }
  const newest = c.nextBands.length ? c.nextBands[c.nextBands.length - 1] : null;
  if (newest) {
    shown.next = newest;
    ctx.strokeStyle = BAND_BAR; ctx.lineWidth = 4 * dpr;
    const at = x(c.nextBands.length);
    for (const level of levelsOf(newest)) {
      ctx.beginPath(); ctx.moveTo(at, y(newest[level][0])); ctx.lineTo(at, y(newest[level][1])); ctx.stroke();
      shown.bar.push(level);
    }
  }
  if (c.path && c.pathBands) {
    ctx.fillStyle = BAND_FILL.path;
    const origin = c.prices[c.pathAt];
    for (const level of levelsOf(c.pathBands)) {
      const run = c.pathBands[level].map(([lo, hi], k) => [c.pathAt + 1 + k, lo, hi]);
      if (origin !== null && origin !== undefined) run.unshift([c.pathAt, origin, origin]);
      if (run.length >= 2) { polygon(run); shown.path.push(level); }
    }
  }
  return shown;
}

// Grid lines and labels: prices right of the plot, times under it.
function axes(ctx, area, prices, times) {
  const { left, right, bottom, dpr, x, y } = area;
  ctx.font = `${11 * dpr}px system-ui, sans-serif`;
  ctx.lineWidth = dpr;
  ctx.strokeStyle = "#2a3138";
  ctx.fillStyle = "#9aa";
  ctx.textBaseline = "middle";
  ctx.textAlign = "left";
  for (const t of prices) {
    ctx.beginPath(); ctx.moveTo(left, y(t.value)); ctx.lineTo(right, y(t.value)); ctx.stroke();
    ctx.fillText(t.text, right + 6 * dpr, y(t.value));
  }
  ctx.beginPath(); ctx.moveTo(left, bottom); ctx.lineTo(right, bottom); ctx.stroke();
  ctx.textBaseline = "top";
  times.forEach((t) => {
    ctx.textAlign = t.align;
    ctx.beginPath(); ctx.moveTo(x(t.index), bottom); ctx.lineTo(x(t.index), bottom + 3 * dpr); ctx.stroke();
    ctx.fillText(t.text, x(t.index), bottom + 5 * dpr);
  });
}

function frame() {
  for (const c of charts.values()) if (c.dirty) { c.dirty = false; draw(c); }
  requestAnimationFrame(frame);
}

function showSkill(skill) {
  window.streamcast.skill = skill;
  const parts = [];
  for (const [version, horizons] of Object.entries(skill)) {
    const hs = Object.entries(horizons)
      .map(([hz, s]) => `h${hz} ${signed(s && s.skill)} (n=${s ? s.n : 0})`)
      .join("  ");
    parts.push(`${version}: ${hs}`);
  }
  document.getElementById("skill").textContent =
    parts.length ? "skill (1 - MSE model / MSE naive): " + parts.join("   |   ") : "skill: waiting for forecasts to meet their ticks";
}

// The header: the replica's numbers over the last seconds, "-" where there is nothing to say yet.
function showStatus(s) {
  const status = document.getElementById("status");
  if (!s.redis) { status.textContent = "redis unavailable, retrying"; return; }
  status.textContent = "live";
  window.streamcast.status = s;
  const set = (id, text) => { document.getElementById(id).textContent = text; };
  set("throughput", Number.isFinite(s.throughput_per_s) ? `${s.throughput_per_s.toFixed(1)} forecasts/s` : "-");
  const lag = Number.isFinite(s.lag) ? Math.round(s.lag) : null;
  set("lag", lag === null ? "-" : `${lag} tick${lag === 1 ? "" : "s"}`);
  set("p99", Number.isFinite(s.p99_latency_ms) ? `${Math.round(s.p99_latency_ms)} ms` : "-");
  set("model", typeof s.model === "string" && s.model ? s.model : "-");
}

async function start() {
  const status = document.getElementById("status");
  const params = new URLSearchParams(location.search);
  let symbols = params.get("symbols");
  if (!symbols) {
    const reply = await fetch("/api/symbols");
    symbols = (await reply.json()).symbols.join(",");
  }
  if (!symbols) { status.textContent = "no symbols yet: start a feed (streamcast replay)"; setTimeout(start, 2000); return; }
  const events = new EventSource("/events?symbols=" + encodeURIComponent(symbols));
  events.addEventListener("forecast", (e) => { window.streamcast.events++; window.streamcast.forecasts++; onForecast(JSON.parse(e.data)); });
  events.addEventListener("path", (e) => { window.streamcast.events++; window.streamcast.paths++; onPath(JSON.parse(e.data)); });
  events.addEventListener("skill", (e) => { window.streamcast.events++; showSkill(JSON.parse(e.data)); });
  events.addEventListener("status", (e) => { window.streamcast.events++; showStatus(JSON.parse(e.data)); });
  events.onopen = () => { status.textContent = "live"; };
  events.onerror = () => { status.textContent = "reconnecting…"; };
}

requestAnimationFrame(frame);
start();
