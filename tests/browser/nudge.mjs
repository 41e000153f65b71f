// The drum machine's nudge in headless Chromium: set with the sync panel's buttons and field,
// shown there, kept in localStorage for this browser, applied by conductor.js (every step is
// planned that much later), and still there after a reload.
//
//   node tests/browser/nudge.mjs http://127.0.0.1:3000
//
// Run by tests/browser_wan.rs. Exit status 0 when every check passed; one line per check.

import { chromium } from "playwright-core";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const base = (process.argv[2] || "http://127.0.0.1:3000").replace(/\/$/, "");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let failures = 0;
const check = (cond, what) => {
  console.log(`${cond ? "ok  " : "FAIL"} ${what}`);
  if (!cond) failures++;
};
async function until(what, fn, ms = 8000) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    const v = await fn();
    if (v) return v;
    await sleep(50);
  }
  throw new Error(`timed out waiting for ${what}`);
}
const watchdog = setTimeout(() => {
  console.log("FAIL the nudge checks did not finish within 60 s");
  process.exit(1);
}, 60000);

const browser = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "conductor-nudge-")), {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--autoplay-policy=no-user-gesture-required"],
});
const problems = [];
try {
  const page = await browser.newPage();
  page.on("pageerror", (e) => problems.push(e.message));
  await page.goto(base + "/drums.html");
  await until("live", async () => (await page.textContent("#status")) === "live");
  await until("a few scheduled steps", () => page.evaluate(() => window.conductorDebug.scheduled.length >= 4));
  check((await page.evaluate(() => window.conductorDebug.conductor.nudge)) === 0, "a new browser starts with no nudge");

  // Where a step will sound without a nudge (the library's own mapping), then with one.
  const plannedAt = () =>
    page.evaluate(() => {
      const d = window.conductorDebug;
      const c = d.conductor;
      const n = Math.ceil(c.countAt(c.serverNow()) + 8);
      return c.audioTime(d.ctx, n) - c._audioClock(d.ctx).offset() - c.perfTime(c.tickTime(n)) / 1000;
    });
  const before = await plannedAt();
  await page.click("#nudgeUp");
  await page.click("#nudgeUp");
  await page.fill("#nudge", "-12.5");
  await page.dispatchEvent("#nudge", "change");
  const after = await plannedAt();
  check(Math.abs(before) < 1e-6 && Math.abs(after + 0.0125) < 1e-6, `steps move by the nudge (${(before * 1000).toFixed(3)} → ${(after * 1000).toFixed(3)} ms)`);
  check((await page.evaluate(() => window.conductorDebug.conductor.nudge)) === -12.5, "the field sets the nudge (−12.5 ms)");
  const shown = await page.textContent("#nudgeValue");
  check(/-12\.5/.test(shown), `the sync panel shows it ("${shown.trim()}")`);
  check((await page.evaluate(() => localStorage.getItem("conductorNudgeMs"))) === "-12.5", "kept in localStorage");
  // The scheduler planned its steps again, 12.5 ms earlier.
  await sleep(500);
  const heard = await page.evaluate(() => {
    const d = window.conductorDebug;
    const s = d.scheduled[d.scheduled.length - 1];
    return s.heard - s.time;
  });
  check(Math.abs(heard) < 0.01, `a step planned after the change is heard at its tick's instant on this device's account (${heard.toFixed(4)} ms)`);

  await page.reload();
  await until("live again", async () => (await page.textContent("#status")) === "live");
  check((await page.evaluate(() => window.conductorDebug.conductor.nudge)) === -12.5, "after a reload the nudge is still −12.5 ms");
  check(/-12\.5/.test(await page.textContent("#nudgeValue")), "and shown");
  await page.click("#nudgeUp");
  check((await page.evaluate(() => localStorage.getItem("conductorNudgeMs"))) === "-11.5", "the + button adds a millisecond and keeps it");
  check(problems.length === 0, `no uncaught errors${problems.length ? ": " + problems.join("; ") : ""}`);
} catch (e) {
  check(false, String(e));
} finally {
  clearTimeout(watchdog);
  await browser.close();
}
process.exit(failures ? 1 : 0);
