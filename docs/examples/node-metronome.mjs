// node-metronome.mjs: a metronome in Node that prints every beat at its instant on the server's
// clock, in time with every other conductor client (browsers, the bridge, other metronomes).
//
//   curl -O http://localhost:3000/conductor.js      # the client library, from your server
//   npm install ws                                  # Node 20 and older; 22+ has a WebSocket
//   node node-metronome.mjs ws://localhost:3000/ws [BEATS] [NUDGE_MS]
//
// One line a beat, printed when it is due (timers in Node are good to about a millisecond):
//
//   beat 3.2 (tick 1234) due 1764043200125.000 at 1764043200125.310 (0.31 ms late)
//
// `due` is the beat's instant on the server's clock (unix ms), `at` this machine's clock when the
// line was printed. Stop with Ctrl-C, or give BEATS to stop after that many.

import { Conductor } from "./conductor.js";

const WebSocket = globalThis.WebSocket ?? (await import("ws")).default;
const [url = "ws://localhost:3000/ws", beatsArg, nudgeArg] = process.argv.slice(2);
const beats = beatsArg ? Number(beatsArg) : Infinity;

const c = new Conductor(url, { WebSocket, nudgeMs: Number(nudgeArg) || 0 });
c.addEventListener("error", (e) => console.error(`the server refused: ${e.detail.message}`));
c.addEventListener("close", (e) => {
  if (e.detail.retryInMs != null) console.error(`connection lost; again in ${e.detail.retryInMs} ms`);
});
c.connect();

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const localNow = () => performance.timeOrigin + performance.now();

// Wait until the clock and the timeline are known.
while (!(c.synced && c.timeline)) await sleep(20);

let printed = 0;
let last = -Infinity;
while (printed < beats) {
  if (!c.playing && c.startCount === null) {
    await sleep(50);
    continue;
  }
  // The next beat line (counted from the last start), at least 20 ms ahead.
  const ppqn = c.ppqn;
  const from = c.startCount ?? 0;
  let n = Math.ceil(c.countAt(c.serverNow() + 20) - 1e-9);
  n += (((from - n) % ppqn) + ppqn) % ppqn;
  if (n <= last) n = last + ppqn;
  // Sleep until about 2 ms before it (re-planning if the tempo changes meanwhile), then spin.
  let due = c.tickTime(n);
  while (c.perfTime(due) + c.nudge - performance.now() > 2) {
    await sleep(Math.min(50, c.perfTime(due) + c.nudge - performance.now() - 2));
    due = c.tickTime(n);
  }
  while (performance.now() < c.perfTime(due) + c.nudge);
  last = n;
  if (!c.isPlayingAt(n)) continue;
  const at = localNow();
  const { bar, beat } = c.position(n);
  console.log(
    `beat ${bar}.${beat} (tick ${n}) due ${due.toFixed(3)} at ${at.toFixed(3)} (${(at - c.mapping.toLocal(due) - c.nudge).toFixed(2)} ms late)`,
  );
  printed++;
}
c.close();
