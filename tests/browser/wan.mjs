// Drum machines in headless Chromium, each behind its own emulated network path, measured
// against the truth: every page runs conductor.js (the real /drums.html, loaded through its
// path, so its WebSocket goes through it too), and all share this host's clock, so each step's
// planned instant can be compared with the tick's scheduled instant and with the other pages.
//
//   node tests/browser/wan.mjs --page near=http://127.0.0.1:9001 --page far=http://127.0.0.1:9002 \
//        [--duration 30] [--warmup 8] [--json out.json]
//
// Per page: the error of each step's planned instant (the last time it was scheduled, from the
// AudioContext time the page gave it, through that context's output timestamps) against its
// tick's instant (`time_us`, from the page's own tick messages), steps scheduled again because
// they moved, and steps planned that the server never played (after a stop). Beside it, the
// predecessor's strategy in the same page: each tick's arrival (plus a fixed lookahead, which
// cancels). Across pages: the spread of each step. Steps around a tempo or transport change
// (from just before the first page heard of it to half a second after its first tick) are left
// out of error and spread, and counted with the change. Used by tests/browser_wan.rs and by
// bench/wan. Exit status 0 when every page measured something.

import { chromium } from "playwright-core";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : dflt;
};
const pages = [];
for (let i = 0; i < args.length; i++) {
  if (args[i] === "--page") {
    const [name, origin] = args[i + 1].split(/=(.*)/s);
    pages.push({ name, origin: origin.replace(/\/$/, "") });
  }
}
const duration = Number(opt("--duration", 30));
const warmup = Number(opt("--warmup", 8));
const jsonOut = opt("--json", null);
if (!pages.length || !(duration > warmup)) {
  console.error("usage: wan.mjs --page NAME=http://HOST:PORT [--page ...] [--duration S] [--warmup S] [--json FILE]");
  process.exit(2);
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const hostNow = () => performance.timeOrigin + performance.now();

const watchdog = setTimeout(() => {
  console.error(`wan.mjs: did not finish within ${duration + 90} s`);
  process.exit(1);
}, (duration + 90) * 1000);

const profile = mkdtempSync(join(tmpdir(), "conductor-wan-"));
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    // Background pages must keep their timers: every page here is measured at once.
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
  ],
  viewport: { width: 900, height: 700 },
});

const problems = [];
const started = hostNow();
for (const p of pages) {
  p.page = await browser.newPage();
  p.page.on("pageerror", (e) => problems.push(`${p.name}: uncaught: ${e.message}`));
  p.page.on("console", (m) => m.type() === "error" && problems.push(`${p.name}: console error: ${m.text()}`));
  // The page takes no ticks by default; this test measures their arrival.
  await p.page.goto(p.origin + "/drums.html?ticks=all");
  // Record, in the page, every tick's arrival and scheduled instant and every timeline's arrival.
  await p.page.evaluate(() => {
    const c = window.conductorDebug.conductor;
    window.wan = { ticks: [], timelines: [] };
    const now = () => performance.timeOrigin + performance.now();
    c.addEventListener("tick", (e) => window.wan.ticks.push([e.detail.count, e.detail.time_us / 1000, now()]));
    c.addEventListener("timeline", (e) =>
      window.wan.timelines.push({
        at: now(),
        count: e.detail.count,
        time_us: e.detail.time_us,
        bpm: e.detail.bpm,
        transport: c.transport && { ...c.transport },
      }),
    );
  });
  p.steps = new Map(); // count -> {first, last, times}
  p.ticks = new Map(); // count -> {time, arrived}
  p.timelines = [];
}

// Every 250 ms: the steps each page scheduled since, converted to this host's clock through
// its AudioContext's output timestamp (taken now, a fraction of a second after the scheduling).
async function collect(p) {
  const got = await p.page.evaluate(() => {
    const d = window.conductorDebug;
    // The context's clock against performance.now() as the library keeps it: the median of its
    // recent output timestamps (one timestamp alone jumps by ms when a loaded machine's audio
    // device underruns).
    const audio = d.ctx ? d.conductor._audioClock(d.ctx).offset() : NaN;
    const toHost = (when) => performance.timeOrigin + (when - audio) * 1000;
    const steps = d.scheduled.splice(0).map((s) => [s.count, toHost(s.when) - d.conductor.nudge]);
    const w = window.wan;
    const out = { steps, ticks: w.ticks.splice(0), timelines: w.timelines.splice(0) };
    out.sync = { offset: d.conductor.offset, rtt: d.conductor.rtt, errorBound: d.conductor.errorBound, rate: d.conductor.rate };
    return out;
  });
  for (const [count, at] of got.steps) {
    if (!Number.isFinite(at)) continue;
    const s = p.steps.get(count);
    if (!s) p.steps.set(count, { first: at, last: at, times: 1 });
    else {
      s.last = at;
      s.times++;
    }
  }
  for (const [count, time, arrived] of got.ticks) p.ticks.set(count, { time, arrived });
  p.timelines.push(...got.timelines);
  p.sync = got.sync;
}

// The pages' drum machines keep only the last 64 scheduled steps; 250 ms is a few of them.
while (hostNow() - started < duration * 1000) {
  await sleep(250);
  for (const p of pages) await collect(p);
}
await sleep(500);
for (const p of pages) await collect(p);
await browser.close();
clearTimeout(watchdog);

// ---- analysis ----
const truth = new Map();
for (const p of pages) for (const [count, t] of p.ticks) truth.set(count, t.time);
const from = started + warmup * 1000;
// Changes: a new anchor or transport, as the first page heard of it.
const changes = [];
for (const p of pages) {
  let prev = null;
  for (const tl of p.timelines) {
    const tr = tl.transport || {};
    if (prev !== null) {
      const transportChanged = tr.state !== prev.state || tr.count !== prev.trCount;
      const tempoChanged = tl.count !== prev.count || tl.bpm !== prev.bpm;
      if (transportChanged || tempoChanged) {
        const kind = transportChanged ? (tr.state === "stopped" ? "stop" : "start") : "tempo";
        const first = transportChanged ? tr.count : tl.count;
        const instant = (transportChanged ? tr.time_us : tl.time_us) / 1000;
        const c = changes.find((x) => x.kind === kind && x.first === first);
        if (c) c.heard = Math.min(c.heard, tl.at);
        else changes.push({ kind, first, bpm: tl.bpm, heard: tl.at, instant });
      }
    }
    prev = { state: tr.state, trCount: tr.count, count: tl.count, bpm: tl.bpm };
  }
}
changes.sort((a, b) => a.first - b.first);
const excluded = changes.map((c) => [c.heard - 150, Math.max(c.instant, c.heard) + 500]);
const steady = (t) => t >= from && !excluded.some(([a, b]) => t >= a && t <= b);
const dist = (values) => {
  const v = values.map(Math.abs).sort((a, b) => a - b);
  if (!v.length) return { p50: null, p99: null, max: null, n: 0 };
  const at = (q) => v[Math.round((v.length - 1) * q)];
  return { p50: at(0.5), p99: at(0.99), max: at(1), n: v.length };
};
const medianSigned = (values) => {
  const v = [...values].sort((a, b) => a - b);
  return v.length ? v[v.length >> 1] : null;
};
const lastTruth = Math.max(...truth.keys());
const firstTruth = Math.min(...truth.keys());
const report = { duration_s: duration, warmup_s: warmup, pages: [], spread_ms: null, predecessor_spread_ms: null, changes: [], problems };
for (const p of pages) {
  const err = [];
  const predErr = [];
  let moved = 0;
  let extra = 0;
  for (const [count, s] of p.steps) {
    const t = truth.get(count);
    if (s.times > 1 && Math.abs(s.last - s.first) > 1) moved++;
    if (t === undefined) {
      // Not played by the server (stopped). Played here anyway if it was already sounding when
      // this page heard of the stop (the scheduler takes back only what is 5 ms or more away).
      const stop = changes.filter((c) => c.kind === "stop" && c.first <= count).pop();
      const heard = stop && p.timelines.find((x) => x.transport && x.transport.state === "stopped" && x.transport.count === stop.first);
      if (count > firstTruth && count < lastTruth && s.last >= from && heard && s.last < heard.at + 5) extra++;
      continue;
    }
    if (steady(t)) err.push(s.last - t);
  }
  for (const [count, tk] of p.ticks) if (steady(tk.time)) predErr.push(tk.arrived - tk.time);
  report.pages.push({
    name: p.name,
    origin: p.origin,
    steps: p.steps.size,
    error_ms: dist(err),
    error_median_ms: medianSigned(err),
    predecessor_error_ms: dist(predErr),
    predecessor_error_median_ms: medianSigned(predErr),
    moved,
    extra,
    sync: p.sync,
  });
}
const spreads = (get) => {
  const out = [];
  for (const [count, t] of truth) {
    if (!steady(t)) continue;
    const v = pages.map((p) => get(p, count)).filter(Number.isFinite);
    if (v.length === pages.length && v.length >= 2) out.push(Math.max(...v) - Math.min(...v));
  }
  return dist(out);
};
report.spread_ms = spreads((p, n) => p.steps.get(n)?.last);
report.predecessor_spread_ms = spreads((p, n) => p.ticks.get(n)?.arrived);
for (const c of changes) {
  const firsts = pages.map((p) => p.steps.get(c.first)?.last).filter(Number.isFinite);
  report.changes.push({
    kind: c.kind,
    bpm: c.bpm,
    first_count: c.first,
    // For a stop, pages that played its first silent tick anyway; else those that played it.
    first_step_pages: firsts.length,
    first_step_spread_ms: firsts.length >= 2 ? Math.max(...firsts) - Math.min(...firsts) : null,
    // How long before the change's first tick each page had it (negative: after).
    heard_before_ms: pages.map((p) => {
      const tl = p.timelines.find((x) => (c.kind === "tempo" ? x.count === c.first : x.transport && x.transport.count === c.first));
      return tl ? c.instant - tl.at : null;
    }),
  });
}
const fmt = (d) => (d.n ? `${d.p50.toFixed(2)} / ${d.p99.toFixed(2)} / ${d.max.toFixed(2)}` : "–");
for (const r of report.pages) {
  console.log(
    `${r.name.padEnd(14)} ${String(r.steps).padStart(5)} steps  error ${fmt(r.error_ms)} ms (median ${r.error_median_ms?.toFixed(2)})  ` +
      `predecessor ${fmt(r.predecessor_error_ms)} ms  moved ${r.moved} extra ${r.extra}  ` +
      `offset ${r.sync.offset?.toFixed(2)} ms, bound ${r.sync.errorBound?.toFixed(2)} ms, rate ${r.sync.rate?.toFixed(1)} ppm`,
  );
}
console.log(`spread across pages: timeline ${fmt(report.spread_ms)} ms, predecessor ${fmt(report.predecessor_spread_ms)} ms`);
for (const c of report.changes) {
  console.log(
    `change: ${c.kind} (${c.bpm} BPM) from tick ${c.first_count}: heard ${c.heard_before_ms.map((v) => (v === null ? "?" : v.toFixed(1))).join(", ")} ms before it; ` +
      `first step on ${c.first_step_pages} pages${c.first_step_spread_ms === null ? "" : `, ${c.first_step_spread_ms.toFixed(2)} ms apart`}`,
  );
}
for (const p of problems) console.log(`problem: ${p}`);
if (jsonOut) writeFileSync(jsonOut, JSON.stringify(report, null, 2) + "\n");
const ok = report.pages.every((r) => r.error_ms.n > 0) && !problems.length;
process.exit(ok ? 0 : 1);
