// Ticks chosen through the stock socket.io-client. Run by tests/ticks.rs:
//
//   node ticks-test.mjs http://127.0.0.1:PORT [--transport websocket|polling]
//
// Prints one JSON line with what it saw and exits 0 when every check passed. The server runs
// at 4 ticks a beat. It checks: io(url, { auth: { ticks: "beat" } }) gets hello.ticks "beat"
// and only ticks on a beat, without a gap; io(url, { query: { ticks: "none" } }) gets no tick
// but the timeline, and a tempo change (bpmChange, then timeline) like everyone else; a bad
// value in auth is a connect_error whose data says why.

import { io } from "socket.io-client";

const [url, ...rest] = process.argv.slice(2);
let transport = "websocket";
for (let i = 0; i < rest.length; i++) if (rest[i] === "--transport") transport = rest[++i];
const transports = { transports: [transport] };

class Failure extends Error {}
const check = (cond, message) => {
  if (!cond) throw new Failure(message);
};
const result = { ok: false, transport, hellos: {} };
const sockets = [];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function open(label, extra) {
  const log = [];
  const socket = io(url, { ...transports, forceNew: true, reconnection: false, timeout: 5000, ...extra });
  sockets.push(socket);
  socket.onAny((event, data) => log.push({ event, data }));
  socket.on("connect_error", (e) => log.push({ event: "@connect_error", data: { message: e.message, data: e.data } }));
  return { label, socket, log };
}

const ticks = (m) => m.log.filter((e) => e.event === "tick").map((e) => e.data.count);

try {
  const beat = open("auth", { auth: { ticks: "beat" } });
  const quiet = open("query", { query: { ticks: "none" } });
  const bad = open("bad", { auth: { ticks: "sometimes" } });
  await sleep(1500);
  for (const m of [beat, quiet]) {
    const hello = m.log.find((e) => e.event === "hello");
    check(hello, `${m.label}: no hello: ${JSON.stringify(m.log.slice(0, 3))}`);
    result.hellos[m.label] = hello.data.ticks ?? null;
  }
  const b = ticks(beat);
  result.beat = b;
  check(b.length >= 3, `auth beat: too few ticks ${b}`);
  check(b.every((c) => c % 4 === 0), `auth beat: not on beats ${b}`);
  check(b.every((c, i) => i === 0 || c === b[i - 1] + 4), `auth beat: a gap ${b}`);
  check(ticks(quiet).length === 0, `query none got ticks ${ticks(quiet)}`);
  check(quiet.log.some((e) => e.event === "timeline"), "query none: no timeline");
  const refused = bad.log.find((e) => e.event === "@connect_error");
  check(refused, `bad: no connect_error: ${JSON.stringify(bad.log)}`);
  result.refused = refused.data;
  check(refused.data.data?.code === "invalid_ticks", `bad: ${JSON.stringify(refused.data)}`);

  // A tempo change reaches the client that takes no ticks, bpmChange before its timeline.
  const mark = quiet.log.length;
  beat.socket.emit("setBpm", 150);
  await sleep(800);
  const after = quiet.log.slice(mark).map((e) => e.event);
  result.after = after;
  const change = after.indexOf("bpmChange");
  check(change >= 0 && after.indexOf("timeline", change) > change, `query none after setBpm: ${after}`);
  check(ticks(quiet).length === 0, "query none: ticks after the change");
  result.ok = true;
} catch (e) {
  result.error = e instanceof Failure ? e.message : String(e?.stack ?? e);
} finally {
  for (const s of sockets) s.close();
  console.log(JSON.stringify(result));
  process.exit(result.ok ? 0 : 1);
}
