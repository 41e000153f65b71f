// Loads conductor's pages in real headless Chromium and checks them against a running server.
//
//   node tests/browser/run.mjs http://127.0.0.1:3000 [http://127.0.0.1:3001 TOKEN]
//
// The optional second server runs with --control-token TOKEN: the control page must ask for the
// token before it lets anyone change the tempo.
//
// More servers, through the environment (each part is skipped, saying so, when its variable is
// missing; tests/browser.rs sets them all):
//   OTHER_BASE   a server bound to 0.0.0.0 with --www docs/examples: the join panel with a LAN
//                URL and its QR code, and a page on that origin importing BASE's /conductor.js
//   DOOMED_BASE, DOOMED_PID   a server this script kills: the control page must show it
// The first server must run with --www docs/examples (the metronome example).
// Rooms: on the first server, /drums.html?room=x follows room x's tempo (set by a WebSocket
// client while main stays at its own), /?room=x conducts x, and a bad name shows the server's
// refusal without retrying; on OTHER_BASE, /?room=x's join panel and QR code carry room=x.
//
// Run by tests/browser.rs, which starts the server. Exit status 0 when every check passed; each
// check prints one line. Screenshots go to $SCREENSHOTS_DIR, by default tests/browser/screenshots/
// (the committed ones). CHROMIUM overrides the browser (default /usr/bin/chromium, Debian's
// package).

import { chromium } from "playwright-core";
import { createRequire } from "node:module";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

const base = (process.argv[2] || "http://127.0.0.1:3000").replace(/\/$/, "");
const [tokenBase, token] = [process.argv[3], process.argv[4]];
const otherBase = process.env.OTHER_BASE?.replace(/\/$/, "");
const doomedBase = process.env.DOOMED_BASE?.replace(/\/$/, "");
const doomedPid = Number(process.env.DOOMED_PID);
// jsQR reads the join panel's QR code back, in the page, from the pixels it shows.
const jsqr = createRequire(import.meta.url).resolve("jsqr/dist/jsQR.js");
const shots =
  process.env.SCREENSHOTS_DIR || fileURLToPath(new URL("./screenshots/", import.meta.url));
mkdirSync(shots, { recursive: true });
const started = Date.now();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const elapsed = () => ((Date.now() - started) / 1000).toFixed(1) + " s";

let failures = 0;
function ok(what) {
  console.log(`ok   ${what}`);
}
function fail(what) {
  failures++;
  console.log(`FAIL ${what}`);
}
function check(cond, what) {
  (cond ? ok : fail)(what);
  return cond;
}
async function until(what, fn, timeoutMs = 5000) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    last = await fn();
    if (last) return last;
    await sleep(50);
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
}
async function stats(at = base) {
  const r = await fetch(at + "/stats");
  return r.json();
}

// A hard ceiling, so a hung browser cannot hang the test suite.
const watchdog = setTimeout(() => {
  console.log(`FAIL the browser test did not finish within 180 s`);
  process.exit(1);
}, 180_000);

const profile = mkdtempSync(join(tmpdir(), "conductor-chromium-"));
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
  ],
  viewport: { width: 1280, height: 900 },
});
console.log(`chromium ${browser.browser()?.version() ?? ""} at ${base}`);

// Every console error and uncaught exception on every page, with the page it came from.
const problems = [];
// Pages whose server this script killed: their failed reconnects are expected, not problems.
const orphaned = new Set();
function watch(page, name) {
  page.on("console", (m) => {
    if (m.type() === "error" && !orphaned.has(name)) problems.push(`${name}: console error: ${m.text()} (${m.location().url})`);
  });
  page.on("pageerror", (e) => problems.push(`${name}: uncaught: ${e.message}`));
  page.on("requestfailed", (r) => {
    if (!orphaned.has(name)) problems.push(`${name}: request failed: ${r.url()} ${r.failure()?.errorText}`);
  });
  return page;
}
const debug = (page, fn, arg) => page.evaluate(fn, arg);
// The join panel's QR code, read back from the pixels the page shows (jsQR, in the page).
async function decodeQr(page) {
  await page.addScriptTag({ path: jsqr });
  return debug(page, async () => {
    const img = document.getElementById("joinQr");
    await img.decode();
    const size = 8 * img.naturalWidth;
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = size;
    const g = canvas.getContext("2d");
    g.imageSmoothingEnabled = false;
    g.drawImage(img, 0, 0, size, size);
    const found = window.jsQR(g.getImageData(0, 0, size, size).data, size, size);
    return found && found.data;
  });
}

try {
  // ---------------- the control page ----------------
  const index = watch(await browser.newPage(), "index");
  await index.goto(base + "/");
  await until("index to say live", async () => (await index.textContent("#status")) === "live");
  ok("index: connected (status live)");
  const hello = await debug(index, () => window.conductorDebug.conductor.hello);
  const hasTransport = hello && "playing" in hello;

  // Live ticks: the tick counter on the page moves. "Live" is the connection; the counter
  // shows a number from the first tick on.
  await until("index to show a tick", async () =>
    Number.isInteger(Number(await index.textContent("#count"))));
  const c1 = Number(await index.textContent("#count"));
  await sleep(600);
  const c2 = Number(await index.textContent("#count"));
  check(Number.isInteger(c1) && c2 > c1, `index: live ticks shown (#count ${c1} -> ${c2})`);

  // The clock offset on loopback: the same clock on both ends, so it must be near zero.
  const sync = await until(
    "twelve clock samples (the bursts at 0, 1 and 2 s)",
    () => debug(index, () => {
      const c = window.conductorDebug.conductor;
      return c._samples.length >= 12 && { offset: c.offset, rtt: c.rtt, spread: c.spread };
    }),
    8000,
  );
  check(
    Math.abs(sync.offset) < 1,
    `index: clock offset on loopback ${sync.offset.toFixed(3)} ms (|offset| < 1 ms; rtt ${sync.rtt.toFixed(3)} ms, spread ${sync.spread.toFixed(3)} ms)`,
  );
  const shown = await index.textContent("#offset");
  check(/\d/.test(shown), `index: shows its offset ("${shown}") and rtt ("${await index.textContent("#rtt")}")`);

  // The #bpm control sets the server's tempo.
  await index.fill("#bpm", "137");
  await index.dispatchEvent("#bpm", "change");
  const s1 = await until("/stats bpm 137", async () => {
    const s = await stats();
    return s.bpm === 137 && s;
  });
  check(s1.bpm === 137, `index: #bpm change -> /stats bpm ${s1.bpm}`);
  await until("the readout to show 137", async () => (await index.textContent("#bpmValue")) === "137");
  ok("index: tempo readout follows (137)");

  // Tap tempo: four taps 500 ms apart ask for 120 BPM. Tapped from inside the page, so that
  // the test's own round trips do not move the taps.
  await debug(index, async () => {
    for (let i = 0; i < 4; i++) {
      if (i) await new Promise((r) => setTimeout(r, 500));
      document.getElementById("tap").dispatchEvent(new PointerEvent("pointerdown", { bubbles: true }));
    }
  });
  const s2 = await until("/stats bpm near 120 after taps", async () => {
    const s = await stats();
    return s.bpm !== 137 && s;
  });
  check(Math.abs(s2.bpm - 120) < 5, `index: tap tempo, four taps 500 ms apart -> /stats bpm ${s2.bpm}`);
  await index.fill("#bpm", "120");
  await index.dispatchEvent("#bpm", "change");
  await until("/stats bpm 120", async () => (await stats()).bpm === 120);

  // Clients on the page come from /stats.
  await until("clients shown", async () => Number(await index.textContent("#clients")) >= 1);
  ok(`index: clients shown (${await index.textContent("#clients")})`);

  // Transport: stop, then start on the next bar.
  if (hasTransport) {
    await index.click("#stop");
    await until("transport stopped", () => debug(index, () => window.conductorDebug.conductor.transport?.state === "stopped"));
    await until("the page to say stopped", async () => (await index.textContent("#transport")) === "stopped");
    const st = await stats();
    if (st.transport !== undefined) check(JSON.stringify(st.transport).includes("stopped"), `index: stop -> /stats transport ${JSON.stringify(st.transport)}`);
    await sleep(300); // ticks already on the wire may still land
    const a = Number(await index.textContent("#count"));
    await sleep(500);
    const b = Number(await index.textContent("#count"));
    check(a === b, `index: stop button stops the ticks (#count stays ${a} -> ${b})`);
    await index.selectOption("#quantize", "bar");
    await index.click("#start");
    await until("transport playing", () => debug(index, () => window.conductorDebug.conductor.transport?.state === "playing"));
    const tr = await debug(index, () => window.conductorDebug.conductor.transport);
    const perBar = hello.ppqn * (hello.beats_per_bar || 4);
    check(tr.count % perBar === 0, `index: start quantised to a bar line (tick ${tr.count}, ${perBar} ticks a bar)`);
    await until("ticks to resume", async () => Number(await index.textContent("#count")) > b, 5000);
    await until("the page to say playing", async () => (await index.textContent("#transport")) === "playing", 5000);
    ok("index: start button resumes the ticks");
  } else {
    console.log("skip transport checks: this server's hello has no `playing` (no transport support)");
  }

  // ---------------- the drum machine, twice ----------------
  const drums = [];
  for (const name of ["drums-a", "drums-b"]) {
    const p = watch(await browser.newPage(), name);
    await p.goto(base + "/drums.html");
    drums.push(p);
  }
  for (const [i, p] of drums.entries()) {
    await p.bringToFront(); // a background tab gets no animation frames
    await until(`drums ${i} live`, async () => (await p.textContent("#status")) === "live");
    const state = await until("the audio context to run", () => debug(p, () => window.conductorDebug.ctx?.state === "running" && "running"));
    check(state === "running", `drums ${i}: AudioContext running`);
    await until(`drums ${i} to schedule steps`, () => debug(p, () => window.conductorDebug.scheduled.length >= 8), 8000);
    const sA = await debug(p, () => window.conductorDebug.currentStep);
    await sleep(400);
    const sB = await debug(p, () => window.conductorDebug.currentStep);
    const lit = await p.locator(".steps button.now").count();
    check(sA !== null && sB > sA && lit === 4, `drums ${i}: steps advance (${sA} -> ${sB}) and one column is lit (${lit} cells)`);
    await until(`drums ${i}: twelve clock samples`, () => debug(p, () => window.conductorDebug.conductor._samples.length >= 12), 8000);
    const off = await debug(p, () => window.conductorDebug.conductor.offset);
    check(Math.abs(off) < 1, `drums ${i}: clock offset on loopback ${off.toFixed(3)} ms`);
  }
  // When will each scheduled step be heard, on this machine's clock? Worked out here from the
  // AudioContext's own output timestamp, not the library's mapping: both pages share the machine's
  // clock, so the same step must come out of both at the same instant, and at its tick's instant.
  // Steps scheduled from now on: the first ones a page schedules use its first clock samples.
  const since = await debug(drums[1], () => window.conductorDebug.conductor.serverNow());
  await sleep(1000);
  const heard = (p) =>
    debug(p, (since) => {
      const d = window.conductorDebug;
      const ts = d.ctx.getOutputTimestamp();
      // The last scheduling of each step counts: a step may be taken back and scheduled again.
      const last = new Map(d.scheduled.map((s) => [s.count, s]));
      return [...last.values()].filter((s) => s.time > since).map((s) => ({
        count: s.count,
        step: s.step,
        time: s.time,
        local: performance.timeOrigin + ts.performanceTime + (s.when - ts.contextTime) * 1000,
      }));
    }, since);
  const [la, lb] = [await heard(drums[0]), await heard(drums[1])];
  for (const [i, l] of [la, lb].entries()) {
    const worst = Math.max(...l.map((s) => Math.abs(s.local - s.time)));
    check(l.length >= 4 && worst < 1, `drums ${i}: ${l.length} steps will sound at their ticks' instants (worst ${worst.toFixed(3)} ms off)`);
  }
  const byCount = new Map(la.map((s) => [s.count, s]));
  const common = lb.filter((s) => byCount.has(s.count));
  const maxDiff = Math.max(...common.map((s) => Math.abs(s.local - byCount.get(s.count).local)));
  const sameStep = common.every((s) => s.step === byCount.get(s.count).step);
  check(
    common.length >= 4 && sameStep && maxDiff < 1,
    `drums: two pages, ${common.length} common steps, same step numbers, sounding within ${maxDiff.toFixed(3)} ms of each other`,
  );
  // Editing the pattern: a click toggles the cell and the pattern is kept.
  const cell = drums[0].locator('button[aria-label="Snare step 2"]');
  const before = await cell.getAttribute("aria-pressed");
  await cell.click();
  const after = await cell.getAttribute("aria-pressed");
  const saved = await debug(drums[0], () => localStorage.getItem("conductorDrums"));
  check(before !== after && saved && JSON.parse(saved).snare[1] === (after === "true" ? "x" : "."), `drums: clicking a step toggles it (${before} -> ${after}) and saves the pattern`);
  await cell.click();

  // ---------------- a server that wants a control token ----------------
  if (tokenBase) {
    const guarded = watch(await browser.newPage(), "index (token)");
    await guarded.goto(tokenBase + "/");
    await until("the token page to say live", async () => (await guarded.textContent("#status")) === "live");
    check(
      (await guarded.isVisible("#tokenForm")) && (await guarded.isDisabled("#bpm")) && (await guarded.isDisabled("#start")),
      "token: the page asks for the control token and disables the controls",
    );
    await guarded.fill("#token", token);
    await guarded.click('#tokenForm button[type="submit"]');
    await until("the controls to be enabled", async () => !(await guarded.isDisabled("#bpm")));
    await guarded.fill("#bpm", "99");
    await guarded.dispatchEvent("#bpm", "change");
    const s3 = await until("/stats bpm 99 on the token server", async () => {
      const s = await stats(tokenBase);
      return s.bpm === 99 && s;
    });
    check(!(await guarded.isVisible("#tokenForm")) && s3.bpm === 99, "token: with the token the page sets the tempo (/stats bpm 99)");
    await guarded.close();
  }

  // ---------------- the control page's defects, each checked ----------------
  {
    const page = watch(await browser.newPage(), "index (defects)");
    await page.bringToFront(); // keys go to the tab in front
    await page.setViewportSize({ width: 390, height: 844 });
    await page.goto(base + "/");
    await until("defects page live", async () => (await page.textContent("#status")) === "live");

    // A 3-decimal tempo on a phone: the page stays as wide as the screen.
    await page.fill("#bpm", "119.875");
    await page.dispatchEvent("#bpm", "change");
    await until("the readout to show 119.875", async () => (await page.textContent("#bpmValue")) === "119.875");
    await sleep(300);
    const widths = await debug(page, () => ({
      page: document.documentElement.scrollWidth,
      stop: document.getElementById("stop").getBoundingClientRect().right,
      value: document.getElementById("bpmValue").getBoundingClientRect().right,
    }));
    check(
      widths.page <= 390 && widths.stop <= 390 && widths.value <= 390,
      `defects: at 390 px with 119.875 the page is ${widths.page} px wide (Stop ends at ${Math.round(widths.stop)}, the number at ${Math.round(widths.value)})`,
    );

    // An out-of-range entry: an error, the box back to the tempo in force, nothing moved.
    const below = async () => debug(page, () => document.getElementById("join").getBoundingClientRect().top + window.scrollY);
    const before = await below();
    await page.fill("#bpm", "250");
    await page.dispatchEvent("#bpm", "change");
    await until("the range error", async () => /60 to 200/.test(await page.textContent("#error")));
    const after = await below();
    check(after === before, `defects: an error message moves nothing below it (join panel at ${before} px, then ${after} px)`);
    const box = await page.inputValue("#bpm");
    check(box === "119.875", `defects: after a refused 250 the box shows the tempo in force ("${box}")`);

    // T taps after the slider was used (the slider is an <input>, but not one typed in).
    await page.focus("#bpmSlider");
    await page.keyboard.press("ArrowRight");
    // (Leaving the box may re-send its tempo, whose echo moves the slider back: the server's
    // tempo is what counts.)
    await until("the slider's tempo", async () => (await stats()).bpm !== 119.875);
    await page.keyboard.press("t");
    const tapped = await page.textContent("#tap");
    check(tapped.startsWith("TAP ·"), `defects: T counts as a tap after using the slider ("${tapped}")`);
    await sleep(2100); // the tap sequence lapses

    // Start and Stop say which is in force.
    const pressed = () => debug(page, () => [document.getElementById("start").getAttribute("aria-pressed"), document.getElementById("stop").getAttribute("aria-pressed")].join("/"));
    await page.click("#stop");
    await until("stop pressed", async () => (await pressed()) === "false/true");
    ok("defects: Stop shows as active once stopped (start/stop pressed: false/true)");
    await page.click("#start");
    await until("start pressed", async () => (await pressed()) === "true/false");
    ok("defects: Start shows as active once started (true/false)");
    await page.fill("#bpm", "120");
    await page.dispatchEvent("#bpm", "change");
    await until("/stats bpm 120 again", async () => (await stats()).bpm === 120);
    await page.close();
  }

  // The server goes away: nothing on the page may look live.
  if (doomedBase && doomedPid) {
    const page = watch(await browser.newPage(), "index (lost)");
    await page.setViewportSize({ width: 390, height: 844 });
    await page.goto(doomedBase + "/");
    await until("doomed page live", async () => (await page.textContent("#status")) === "live");
    await until("clients shown", async () => Number(await page.textContent("#clients")) >= 1);
    orphaned.add("index (lost)");
    process.kill(doomedPid, "SIGKILL");
    await until("the page to notice", () => debug(page, () => document.body.classList.contains("offline")), 5000);
    const seen = await debug(page, () => {
      const $ = (id) => document.getElementById(id);
      return {
        status: $("status").textContent,
        banner: getComputedStyle($("lost")).display !== "none" && $("lost").textContent,
        bpmColor: getComputedStyle($("bpmValue")).color,
        transport: $("transport").textContent,
        transportColor: getComputedStyle($("transport")).color,
        clients: $("clients").textContent,
        pressed: $("start").getAttribute("aria-pressed") + "/" + $("stop").getAttribute("aria-pressed"),
      };
    });
    const white = "rgb(243, 245, 248)", green = "rgb(55, 214, 122)";
    check(
      /disconnected/.test(seen.status) && seen.banner && /lost/.test(seen.banner) &&
        seen.bpmColor !== white && seen.transportColor !== green && seen.transport === "unknown" &&
        seen.clients === "–" && seen.pressed === "false/false",
      `lost: the page shows the lost connection (${JSON.stringify(seen)})`,
    );
    await page.screenshot({ path: join(shots, "index-lost.png") });
    await page.close();
  } else {
    console.log("skip the lost-connection check: DOOMED_BASE and DOOMED_PID are not set");
  }

  // ---------------- your own pages (--www), and the library from another origin ----------------
  {
    const page = watch(await browser.newPage(), "metronome (--www)");
    await page.goto(base + "/metronome.html");
    await until("the example to connect", async () => (await page.textContent("#status")) === "connected");
    await until("the example to follow the beats", async () => /^\d+$/.test(await page.textContent("#beat")));
    const b = await page.textContent("#bpm");
    check(b === "120", `www: docs/examples/metronome.html served by --www follows the server (beat ${await page.textContent("#beat")}, ${b} BPM)`);
    await page.close();
  }
  if (otherBase) {
    const page = watch(await browser.newPage(), "another origin");
    await page.goto(`${otherBase}/from-another-site.html?server=${encodeURIComponent(base)}`);
    await until("the cross-origin page to connect", async () => (await page.textContent("#status")) === "connected", 8000);
    const c1 = Number(await until("a tick", async () => /^\d+$/.test(await page.textContent("#count")) && page.textContent("#count")));
    const origin = await debug(page, () => location.origin);
    check(origin !== base && c1 >= 0, `cors: a page from ${origin} imports ${base}/conductor.js and follows its ticks (tick ${c1})`);
    await page.close();

    // The join panel of a server on every interface: its LAN URL, and a QR code of it.
    const lan = await (await fetch(otherBase + "/join")).json();
    const idx = watch(await browser.newPage(), "index (join)");
    await idx.goto(otherBase + "/");
    await until("the join URL", async () => /^http:/.test(await idx.textContent("#joinUrl")));
    const url = await idx.textContent("#joinUrl");
    const expected = lan.urls.map((u) => u.drums);
    check(expected.includes(url), `join: the panel shows ${url} (the server's LAN URLs: ${expected.join(", ")})`);
    const decoded = await decodeQr(idx);
    check(decoded === url, `join: the QR code decodes to ${decoded}`);
    await idx.screenshot({ path: join(shots, "index-join.png") });
    await idx.click("#joinControl");
    const control = await idx.textContent("#joinUrl");
    check(lan.urls.some((u) => u.control === control), `join: "control page" switches it to ${control}`);
    await idx.close();

    // The join panel of /?room=x: the room's pages, in the link and in the QR code.
    const inX = watch(await browser.newPage(), "index (join, room x)");
    await inX.goto(otherBase + "/?room=x");
    await until("the join URL in room x", async () => /^http:/.test(await inX.textContent("#joinUrl")));
    const xUrl = await inX.textContent("#joinUrl");
    const xExpected = lan.urls.map((u) => u.drums + "?room=x");
    check(xExpected.includes(xUrl), `rooms: on /?room=x the join panel shows ${xUrl} (expected one of ${xExpected.join(", ")})`);
    const xDecoded = await decodeQr(inX);
    check(xDecoded === xUrl && new URL(xDecoded).searchParams.get("room") === "x", `rooms: its QR code decodes to ${xDecoded}`);
    await inX.click("#joinControl");
    const xControl = await inX.textContent("#joinUrl");
    check(lan.urls.some((u) => u.control + "?room=x" === xControl), `rooms: "control page" switches it to ${xControl}`);
    check(new URL(await decodeQr(inX)).searchParams.get("room") === "x", "rooms: and the control page's QR code keeps room=x");
    await inX.close();
  } else {
    console.log("skip the join panel and cross-origin checks: OTHER_BASE is not set");
  }
  // A server on loopback only says why phones cannot join.
  const hint = await index.textContent("#joinHint");
  check(/--bind 0\.0\.0\.0/.test(hint), `join: on a loopback-only server the panel says so ("${hint}")`);

  // ---------------- rooms ----------------
  {
    // Room x at 93 BPM, set by a plain WebSocket client (opened in a blank page), while main
    // stays at its own tempo.
    const mainBpm = (await stats()).bpm;
    const roomBpm = mainBpm === 93 ? 94 : 93;
    // Not watched: a page of this origin to run a WebSocket in, whose favicon 404s (no page).
    const setter = await browser.newPage();
    await setter.goto(base + "/conductor.js");
    const set = await debug(setter, (bpm) => new Promise((resolve, reject) => {
      const ws = new WebSocket(location.origin.replace(/^http/, "ws") + "/ws?room=x");
      window.roomSocket = ws; // kept open: the room has a member while the drums join
      let room = null;
      ws.onmessage = (e) => {
        const m = JSON.parse(e.data);
        if (m.event === "hello") {
          room = m.data.room;
          ws.send(JSON.stringify({ event: "setBpm", data: bpm }));
        }
        if (m.event === "bpmChange") resolve({ room, bpm: m.data });
        if (m.event === "error") reject(new Error(JSON.stringify(m.data)));
      };
      setTimeout(() => reject(new Error("no bpmChange in room x within 5 s")), 5000);
    }), roomBpm);
    check(set.room === "x" && set.bpm === roomBpm, `rooms: a WebSocket client in room x set ${set.bpm} BPM (hello.room ${set.room})`);

    const dx = watch(await browser.newPage(), "drums (room x)");
    await dx.goto(base + "/drums.html?room=x");
    await dx.bringToFront();
    await until("drums in room x live", async () => (await dx.textContent("#status")) === "live");
    const label = (await dx.isVisible("#room")) && (await dx.textContent("#room"));
    check(label && /\bx\b/.test(label), `rooms: the drum machine says which room it is in ("${label}")`);
    await until(`drums in room x to show ${roomBpm} BPM`, async () => (await dx.textContent("#bpmValue")) === String(roomBpm), 8000);
    ok(`rooms: /drums.html?room=x shows room x's ${roomBpm} BPM`);
    // It plays at x's tempo: consecutive scheduled sixteenths are a sixteenth of x's beat apart.
    await until("drums in room x to schedule steps", () => debug(dx, () => window.conductorDebug.scheduled.length >= 8), 8000);
    const gaps = await debug(dx, () => {
      const last = new Map(window.conductorDebug.scheduled.map((s) => [s.count, s]));
      const steps = [...last.values()].sort((a, b) => a.count - b.count);
      const out = [];
      for (let i = 1; i < steps.length; i++) if (steps[i].step === steps[i - 1].step + 1) out.push(steps[i].time - steps[i - 1].time);
      return out.slice(-6);
    });
    const sixteenth = 60000 / roomBpm / 4;
    check(gaps.length >= 3 && gaps.every((g) => Math.abs(g - sixteenth) < 0.01), `rooms: its steps are ${sixteenth.toFixed(3)} ms apart (${gaps.map((g) => g.toFixed(3)).join(", ")})`);
    const back = await dx.getAttribute("#toControl", "href");
    check(back === "./?room=x", `rooms: its link to the control page keeps the room (${back})`);
    const st = await stats();
    check(st.bpm === mainBpm && st.rooms.x.bpm === roomBpm, `rooms: main stays at ${st.bpm} BPM while x is at ${st.rooms.x.bpm}`);
    const idxBpm = await index.textContent("#bpmValue");
    check(idxBpm === String(mainBpm), `rooms: the control page in main still shows ${idxBpm} BPM`);

    // The control page in room x: labelled, its link keeps the room, it shows x's tempo.
    const cx = watch(await browser.newPage(), "index (room x)");
    await cx.goto(base + "/?room=x");
    await until("index in room x live", async () => (await cx.textContent("#status")) === "live");
    await until(`index in room x to show ${roomBpm} BPM`, async () => (await cx.textContent("#bpmValue")) === String(roomBpm));
    const toDrums = await cx.getAttribute("#toDrums", "href");
    check((await cx.textContent("#roomName")) === "x" && toDrums === "drums.html?room=x", `rooms: /?room=x conducts room x at ${roomBpm} BPM, labelled, linking ${toDrums}`);
    await cx.close();

    // A bad name: the server's refusal, shown, and no retrying.
    const bad = await browser.newPage();
    watch(bad, "drums (bad room)");
    orphaned.add("drums (bad room)"); // its failed handshake is logged by Chromium on purpose
    await bad.goto(base + "/drums.html?room=Bad%21");
    await until("the bad room's refusal", async () => (await bad.textContent("#status")) === "refused", 8000);
    const said = await bad.textContent("#error");
    check(/refused room "Bad!"/.test(said) && /characters other than a-z, 0-9/.test(said), `rooms: a bad name shows the server's refusal ("${said}")`);
    await sleep(1500);
    check((await bad.textContent("#status")) === "refused", "rooms: and does not retry");
    await bad.close();
    // The control page too: its banner and its join panel say why.
    const badIndex = await browser.newPage();
    watch(badIndex, "index (bad room)");
    orphaned.add("index (bad room)");
    await badIndex.goto(base + "/?room=Bad%21");
    await until("the control page's refusal", async () => (await badIndex.textContent("#status")) === "refused", 8000);
    const banner = await badIndex.textContent("#lost");
    const joinHint = await badIndex.textContent("#joinHint");
    check(
      /refused room "Bad!"/.test(banner) && /characters other than a-z/.test(banner) && /room name "Bad!"/.test(joinHint),
      `rooms: the control page in a bad room says so ("${banner}"; join panel: "${joinHint}")`,
    );
    await badIndex.close();
    await dx.close();
    await setter.close();
  }

  // ---------------- screenshots ----------------
  await sleep(1000); // a few more points on the plot
  await index.screenshot({ path: join(shots, "index.png"), fullPage: true });
  await drums[0].screenshot({ path: join(shots, "drums.png"), fullPage: true });
  for (const [name, page] of [["index", index], ["drums", drums[0]]]) {
    await page.setViewportSize({ width: 390, height: 844 });
    await sleep(400);
    await page.screenshot({ path: join(shots, `${name}-phone.png`), fullPage: true });
  }
  ok("screenshots: index.png, drums.png, index-phone.png, drums-phone.png (and index-join.png, index-lost.png above)");

  // Last: nothing went wrong on any page along the way.
  check(problems.length === 0, `no console errors or uncaught exceptions on any page${problems.length ? ":\n  " + problems.join("\n  ") : ""}`);
} catch (e) {
  fail(`${e.message}`);
  if (problems.length) console.log("  page problems so far:\n  " + problems.join("\n  "));
} finally {
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
  clearTimeout(watchdog);
}
console.log(`${failures ? "FAILED" : "passed"}: ${failures} failed check(s) in ${elapsed()}`);
process.exit(failures ? 1 : 0);
