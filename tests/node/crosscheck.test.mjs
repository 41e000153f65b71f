// The JavaScript estimator against the Rust one, sample by sample: tests/node_client.rs runs
// conductor-sync's ClockSync over synthetic paths (jitter, bursts, offset, skew, asymmetry) and
// writes the samples and its mappings to the file named by CONDUCTOR_SYNC_VECTORS; here the same
// samples go through conductor.js's ClockSync. The two implement one description
// (docs/protocol.md#clock-sync), so they must agree to within float rounding.

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { ClockSync } from "../../www/conductor.js";

test("conductor.js and conductor-sync give the same mapping for the same samples", () => {
  const file = process.env.CONDUCTOR_SYNC_VECTORS;
  assert.ok(file, "CONDUCTOR_SYNC_VECTORS is not set: run `cargo test --release --test node_client`, which writes the vectors");
  const { scenarios } = JSON.parse(readFileSync(file, "utf8"));
  assert.ok(scenarios.length >= 4);
  for (const { name, samples, expected } of scenarios) {
    const sync = new ClockSync();
    let worst = 0;
    let worstRate = 0;
    samples.forEach(([t0, t1, t2, t3], i) => {
      const m = sync.addSample(t0, t1, t2, t3);
      const [offset, errorBound, ratePpm, residual, settled] = expected[i];
      const where = `${name}, sample ${i}`;
      // Rust works in integer ns, JavaScript in float ms: they may differ by some ns.
      const d = Math.abs(m.offsetAt(t3) - offset);
      worst = Math.max(worst, d);
      assert.ok(d < 0.002, `${where}: offset ${m.offsetAt(t3)} vs ${offset}`);
      assert.ok(Math.abs(m.errorBound - errorBound) < 0.002, `${where}: error bound ${m.errorBound} vs ${errorBound}`);
      // The fitted rate is a bisection's midpoint between boundaries that float rounding can
      // shift a little; what it moves (ppm times seconds) stays within the offset tolerance.
      worstRate = Math.max(worstRate, Math.abs(m.ratePpm - ratePpm));
      assert.ok(Math.abs(m.ratePpm - ratePpm) < 1, `${where}: rate ${m.ratePpm} vs ${ratePpm}`);
      assert.ok(Math.abs(m.residual - residual) < 0.002, `${where}: residual ${m.residual} vs ${residual}`);
      assert.equal(m.settled, settled, `${where}: settled`);
    });
    console.log(
      `${name}: ${samples.length} samples, largest difference ${(worst * 1e6).toFixed(1)} ns in offset, ${worstRate.toFixed(3)} ppm in rate`,
    );
  }
});
