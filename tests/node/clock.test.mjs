// conductor.js's clock estimator (ClockSync) and timeline maths against synthetic paths, in Node:
// delays, jitter, bursts, clock offset and skew, asymmetry, slewing. The same cases as the Rust
// estimator's unit tests (tools/sync/src/estimator.rs); crosscheck.test.mjs compares the two
// implementations sample by sample.
//
//   node --test tests/node/        (tests/node_client.rs runs it under cargo test)

import { test } from "node:test";
import assert from "node:assert/strict";
import { ClockSync, ClockMapping, Timeline } from "../../www/conductor.js";

// A deterministic generator (mulberry32).
function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// The server's clock is the truth (unix ms); the device reads offset + t·(1 + skew).
function path({ offset = 3217, skew = 0, up = 40, down = 40, jitter = 0, burstP = 0, burst = 0 } = {}) {
  const local = (t) => offset + t * (1 + skew * 1e-6);
  const truth = (l) => (l - offset) / (1 + skew * 1e-6);
  return {
    local,
    truth,
    exchange(t, r) {
      const delay = (base) => Math.max(0, base + jitter * (2 * r() - 1)) + (r() < burstP ? burst : 0);
      const t1 = t + delay(up);
      const t2 = t1 + 0.02;
      const t3 = t2 + delay(down);
      return [local(t), t1, t2, local(t3)];
    },
  };
}

// The default schedule: every 100 ms for 10 s, then every 250 ms.
function* pingTimes(seconds, start = 1.7e12) {
  for (let t = start; t - start < seconds * 1000; t += t - start < 10000 ? 100 : 250) yield t;
}

// Errors (ms) of the published mapping at every sample from `skip` s on.
function run(p, seconds, seed, skip = 0) {
  const r = rng(seed);
  const sync = new ClockSync();
  const errors = [];
  let start = null;
  for (const t of pingTimes(seconds)) {
    start ??= t;
    const [t0, t1, t2, t3] = p.exchange(t, r);
    const m = sync.addSample(t0, t1, t2, t3);
    assert.ok(m, "a mapping after every plausible sample");
    if (t - start >= skip * 1000) errors.push(m.toServer(t3) - p.truth(t3));
  }
  return { sync, errors };
}

const pct = (v, p) => {
  const s = v.map(Math.abs).sort((a, b) => a - b);
  return s[Math.round((s.length - 1) * p)];
};

// conductor.js's estimator before this one: the median offset of the best third by round trip.
function oldEstimate(window) {
  const rtt = ([t0, t1, t2, t3]) => t3 - t0 - (t2 - t1);
  const sorted = [...window].sort((a, b) => rtt(a) - rtt(b));
  const limit = rtt(sorted[0]) + Math.max(0.25, rtt(sorted[0]) / 2);
  const keep = Math.ceil(sorted.length / 3);
  const offs = sorted
    .filter((s, i) => i < keep && rtt(s) <= limit)
    .map(([t0, t1, t2, t3]) => (t1 - t0 + (t2 - t3)) / 2)
    .sort((a, b) => a - b);
  const m = offs.length >> 1;
  return offs.length % 2 ? offs[m] : (offs[m - 1] + offs[m]) / 2;
}

test("exact on a clean path, whatever the offset", () => {
  for (const offset of [-5000, 0, 42, 9e6]) {
    const p = path({ offset });
    const { sync, errors } = run(p, 5, 1);
    // A round trip's worth of lever arm at ±250 ppm while the rate is unknown: 10 µs.
    assert.ok(pct(errors, 1) < 0.015, `offset ${offset}: ${pct(errors, 1)}`);
    assert.ok(errors.slice(10).every((e) => Math.abs(e) < 1e-6));
    assert.ok(Math.abs(sync.mapping.errorBound - 40) < 1e-3);
    assert.ok(Math.abs(sync.mapping.minRtt - 80) < 1e-6);
  }
});

test("beats the old estimator under ±10 ms of jitter", () => {
  const p = path({ jitter: 10 });
  const now = [];
  const old = [];
  for (let seed = 1; seed <= 20; seed++) {
    const r = rng(seed);
    const sync = new ClockSync();
    const win = [];
    let start = null;
    for (const t of pingTimes(60)) {
      start ??= t;
      const s = p.exchange(t, r);
      const m = sync.addSample(...s);
      win.push(s);
      if (win.length > 30) win.shift();
      if (t - start >= 5000) {
        now.push(m.toServer(s[3]) - p.truth(s[3]));
        old.push(s[3] + oldEstimate(win) - p.truth(s[3]));
      }
    }
  }
  const [n50, n99, o50, o99] = [pct(now, 0.5), pct(now, 0.99), pct(old, 0.5), pct(old, 0.99)];
  console.log(`±10 ms: new p50 ${n50.toFixed(3)} p99 ${n99.toFixed(3)} ms; old p50 ${o50.toFixed(3)} p99 ${o99.toFixed(3)} ms`);
  assert.ok(n99 < 1, `p99 ${n99}`);
  assert.ok(n99 * 2 < o99 && n50 * 2 < o50);
});

test("bursts do not move the estimate", () => {
  for (let seed = 1; seed <= 5; seed++) {
    // The same jitter draws with and without bursts: the bursts draw from their own stream.
    const clean = run(path({ up: 60, down: 60, jitter: 5 }), 40, seed, 10).errors;
    const r = rng(seed);
    const b = rng(seed + 1000);
    const p = path({ up: 60, down: 60, jitter: 5 });
    const sync = new ClockSync();
    const errors = [];
    let start = null;
    for (const t of pingTimes(40)) {
      start ??= t;
      const [t0, t1, t2, t3] = p.exchange(t, r);
      // 20 % of each direction stalled 300 ms more.
      const up = b() < 0.2 ? 300 : 0;
      const down = b() < 0.2 ? 300 : 0;
      const m = sync.addSample(t0, t1 + up, t2 + up, t3 + up + down);
      if (t - start >= 10000) errors.push(m.toServer(t3 + up + down) - p.truth(t3 + up + down));
    }
    assert.ok(pct(errors, 0.99) < pct(clean, 0.99) + 1 && pct(errors, 0.99) < 1.5, `seed ${seed}`);
  }
});

test("recovers offset and rate of a skewed clock", () => {
  for (const skew of [-200, -37, 150, 200]) {
    const p = path({ offset: -4000, skew, up: 20, down: 20, jitter: 5 });
    const { sync, errors } = run(p, 60, 7, 15);
    const want = (1 / (1 + skew * 1e-6) - 1) * 1e6;
    assert.ok(Math.abs(sync.mapping.ratePpm - want) < 10, `skew ${skew}: rate ${sync.mapping.ratePpm}`);
    assert.ok(pct(errors, 1) < 1, `skew ${skew}`);
    // 20 s without a sample, still within half a millisecond.
    const later = p.local(1.7e12 + 80000);
    assert.ok(Math.abs(sync.mapping.toServer(later) - p.truth(later)) < 0.5);
  }
});

test("an asymmetric path is off by half the asymmetry", () => {
  const p = path({ up: 20, down: 100, jitter: 2 });
  const { sync, errors } = run(p, 30, 3, 10);
  for (const e of errors) assert.ok(Math.abs(e + 40) < 0.4, `error ${e}`);
  assert.ok(sync.mapping.errorBound >= 40);
});

test("once settled, a correction is slewed in at 2 ms a second", () => {
  const r = rng(1);
  const sync = new ClockSync();
  const p = path({ up: 30, down: 30 });
  const times = [...pingTimes(20)];
  for (const t of times) sync.addSample(...p.exchange(t, r));
  assert.ok(sync.settled);
  const before = sync.mapping;
  sync.resetPath();
  const faster = path({ up: 24, down: 30 });
  const [t0, t1, t2, t3] = faster.exchange(times[times.length - 1] + 500, r);
  const after = sync.addSample(t0, t1, t2, t3);
  assert.ok(Math.abs(after.offsetAt(t3) - before.offsetAt(t3)) < 1e-6, "continuous");
  assert.ok(Math.abs(after.residual - 3) < 0.02, `residual ${after.residual}`);
  const target = new ClockMapping({ ...after, residual: 0 });
  const left = (dt) => after.offsetAt(t3 + dt) - target.offsetAt(t3 + dt);
  assert.ok(Math.abs(after.slew - 1500) < 20);
  assert.ok(Math.abs(left(after.slew / 2) - after.residual / 2) < 1e-6);
  assert.ok(left(after.slew - 10) > 0);
  assert.equal(left(after.slew), 0);
});

test("a large correction steps", () => {
  const r = rng(5);
  const sync = new ClockSync();
  const p = path({ up: 10, down: 10 });
  for (const t of pingTimes(10)) sync.addSample(...p.exchange(t, r));
  assert.ok(sync.settled);
  const jumped = path({ up: 10, down: 10, offset: 3217 + 2000 });
  sync.resetPath();
  const s = jumped.exchange(1.7e12 + 11000, r);
  const m = sync.addSample(...s);
  assert.equal(m.residual, 0);
  assert.ok(Math.abs(m.toServer(s[3]) - jumped.truth(s[3])) < 0.01);
});

test("impossible samples are ignored", () => {
  const sync = new ClockSync();
  assert.equal(sync.addSample(100, 5000, 5010, 90), null, "reply before request");
  assert.equal(sync.addSample(100, 5010, 5000, 200), null, "server sent before it got it");
  assert.equal(sync.addSample(0, 0, 0, 61000), null, "a minute-long trip");
  const m = sync.addSample(0, 0.001, 0.001, 0.002);
  assert.ok(Math.abs(m.offset) < 1e-6);
  assert.equal(sync.addSample(0, 0.001, 0.001, 0.001), m, "older than the newest");
  assert.equal(sync.samples.length, 1);
});

test("toLocal inverts toServer, also while slewing", () => {
  const r = rng(9);
  for (let i = 0; i < 2000; i++) {
    const residual = (r() * 2 - 1) * 20;
    const m = new ClockMapping({
      anchor: 5000,
      offset: (r() * 2 - 1) * 1e12,
      rate: (r() * 2 - 1) * 500e-6,
      residual,
      slew: Math.abs(residual) / 2e-3,
    });
    const local = 5000 + (r() * 2 - 1) * 1e5;
    // 1e12 ms offsets leave about 0.1 µs of float resolution.
    assert.ok(Math.abs(m.toLocal(m.toServer(local)) - local) < 1e-3, `${i}`);
  }
});

test("the timeline keeps the old grid until a change's anchor", () => {
  const old = new Timeline({ count: 0, time_us: 0, bpm: 120, ppqn: 4, beats_per_bar: 4 });
  const t = new Timeline({ count: 100, time_us: 12_500_000, bpm: 140, ppqn: 4 }).after(old);
  assert.equal(t.tickTime(99), old.tickTime(99));
  assert.equal(t.tickTime(100), 12_500);
  assert.ok(Math.abs(t.tickTime(101) - (12_500 + 60_000 / 560)) < 1e-9);
  assert.equal(t.bpmAt(99), 120);
  assert.equal(t.bpmAt(100), 140);
  assert.ok(Math.abs(t.countAt(12_375) - 99) < 1e-9);
  assert.ok(Math.abs(t.countAt(12_499.9) - (99 + 124.9 / 125)) < 1e-9);
  assert.ok(Math.abs(t.countAt(12_600) - (100 + 100 / (60_000 / 560))) < 1e-9);
  // The fields pages read stay plain properties.
  assert.deepEqual(Object.keys(t).sort(), ["beats_per_bar", "bpm", "count", "interval_us", "ppqn", "time_us"]);
});
