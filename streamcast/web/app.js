// streamcast live page: one chart per symbol from the /events server-sent event stream.
"use strict";

const KEEP = 200; // points per chart
const charts = new Map(); // symbol -> {prices, nexts, path, origin, canvas, caption, model}
window.streamcast = { events: 0, forecasts: 0, skill: null };

function chart(symbol) {
  let c = charts.get(symbol);
  if (c) return c;
  const figure = document.createElement("figure");
  const caption = document.createElement("figcaption");
  caption.textContent = symbol;
  const canvas = document.createElement("canvas");
  figure.append(caption, canvas);
  document.getElementById("charts").append(figure);
  c = { prices: [], nexts: [], path: null, pathAt: 0, canvas, caption, model: "" };
  charts.set(symbol, c);
  return c;
}

// A number to draw, or null: the server sends null for a non-finite value, and a forecast whose
// model output was not finite comes without `next` (with a `reason`) and often without `path`.
const finite = (v) => (Number.isFinite(v) ? v : null);
const fmt = (v, digits) => (Number.isFinite(v) ? v.toFixed(digits) : "-");

function onForecast(f) {
  if (!f || typeof f.symbol !== "string") return;
  const c = chart(f.symbol);
  c.prices.push(finite(f.price));
  c.nexts.push(finite(f.next)); // the forecast of the value after this price
  if (c.prices.length > KEEP) { c.prices.shift(); c.nexts.shift(); }
  if (Array.isArray(f.path)) { c.path = f.path.map(finite); c.pathAt = c.prices.length - 1; }
  else if (c.path) { c.pathAt = Math.max(0, c.pathAt - (c.prices.length >= KEEP ? 1 : 0)); }
  c.model = typeof f.model === "string" ? f.model : "";
  const next = fmt(f.next, 2) + (f.reason ? ` (${f.reason})` : "");
  c.caption.textContent = `${f.symbol}  price ${fmt(f.price, 2)}  next ${next}  model ${c.model}`;
  c.dirty = true;
}

function draw(c) {
  const canvas = c.canvas;
  const w = (canvas.width = canvas.clientWidth * devicePixelRatio);
  const h = (canvas.height = canvas.clientHeight * devicePixelRatio);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  const pathLen = c.path ? c.path.length : 0;
  const span = KEEP + 50;
  const values = c.prices.concat(c.nexts, c.path || []).filter(Number.isFinite);
  if (values.length < 2) return;
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi === lo) { hi += 1; lo -= 1; }
  const x = (i) => (i / (span - 1)) * (w - 8) + 4;
  const y = (v) => h - 6 - ((v - lo) / (hi - lo)) * (h - 12);
  const line = (points, color, width) => {
    ctx.strokeStyle = color; ctx.lineWidth = width * devicePixelRatio; ctx.beginPath();
    let gap = true; // a missing value breaks the line rather than dropping it to the axis
    for (const [i, v] of points) {
      if (v === null) { gap = true; continue; }
      if (gap) ctx.moveTo(x(i), y(v)); else ctx.lineTo(x(i), y(v));
      gap = false;
    }
    ctx.stroke();
  };
  line(c.prices.map((v, i) => [i, v]), "#e8e8e8", 1.5);
  line(c.nexts.map((v, i) => [i + 1, v]), "#4fc3f7", 1);
  if (pathLen) line(c.path.map((v, k) => [c.pathAt + 1 + k, v]), "#ffb74d", 1.5);
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
      .map(([hz, s]) => `h${hz} ${s && Number.isFinite(s.skill) ? (s.skill >= 0 ? "+" : "") + s.skill.toFixed(3) : "-"} (n=${s ? s.n : 0})`)
      .join("  ");
    parts.push(`${version}: ${hs}`);
  }
  document.getElementById("skill").textContent =
    parts.length ? "skill (1 - MSE model / MSE naive): " + parts.join("   |   ") : "skill: waiting for forecasts to meet their ticks";
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
  events.addEventListener("skill", (e) => { window.streamcast.events++; showSkill(JSON.parse(e.data)); });
  events.addEventListener("status", (e) => { status.textContent = JSON.parse(e.data).redis ? "live" : "redis unavailable, retrying"; });
  events.onopen = () => { status.textContent = "live"; };
  events.onerror = () => { status.textContent = "reconnecting…"; };
}

requestAnimationFrame(frame);
start();
