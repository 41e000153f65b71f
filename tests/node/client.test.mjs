// conductor.js in Node against the real server (CONDUCTOR_URL, started by tests/node_client.rs):
// a clear error where there is no WebSocket, the `ws` package's WebSocket passed in, the events,
// the clock on one host, the nudge, a tempo change, and docs/examples/node-metronome.mjs run as
// a user would run it (conductor.js beside it, ws installed).

import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, mkdirSync } from "node:fs";
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";
import { Conductor } from "../../www/conductor.js";

const url = process.env.CONDUCTOR_URL;
const here = (p) => fileURLToPath(new URL(p, import.meta.url));

function once(target, type, ms = 5000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${type} event within ${ms} ms`)), ms);
    target.addEventListener(type, (e) => {
      clearTimeout(timer);
      resolve(e.detail);
    }, { once: true });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

test("the server is given", () => {
  assert.ok(url, "CONDUCTOR_URL is not set: run `cargo test --release --test node_client`, which starts the server");
});

test("without a WebSocket, the constructor says what to do", () => {
  const saved = globalThis.WebSocket;
  delete globalThis.WebSocket; // Node 22 has one; Node 20 (this project's) has none
  try {
    assert.throws(() => new Conductor(url), /install the ws package \(npm install ws\) and pass it/);
  } finally {
    if (saved) globalThis.WebSocket = saved;
  }
  assert.throws(() => new Conductor(undefined, { WebSocket }), /give the server's WebSocket URL/);
});

test("by default it asks for no ticks and follows the timeline; ticks: \"beat\" gets beats", async () => {
  const quiet = new Conductor(url, { WebSocket });
  const hello = once(quiet, "hello");
  const timeline = once(quiet, "timeline");
  let ticks = 0;
  quiet.addEventListener("tick", () => ticks++);
  quiet.connect();
  assert.equal((await hello).ticks, "none");
  await timeline;
  await sleep(1000);
  assert.equal(ticks, 0, "ticks with the default");
  assert.ok(Number.isFinite(quiet.count) && quiet.count > 0, `count from the timeline: ${quiet.count}`);
  quiet.close();
  const beats = new Conductor(url + "?room=main", { WebSocket, ticks: "beat" });
  const got = [];
  beats.addEventListener("tick", (e) => got.push(e.detail.count));
  beats.connect();
  assert.equal((await once(beats, "hello")).ticks, "beat");
  await sleep(1200);
  beats.close();
  assert.ok(got.length >= 1 && got.every((n) => n % 4 === 0), `beats only: ${got}`);
});

test("with the ws package it follows the real server", async () => {
  const c = new Conductor(url, { WebSocket, nudgeMs: 7, ticks: "all" });
  const hello = once(c, "hello");
  const timeline = once(c, "timeline");
  const tick = once(c, "tick");
  const sync = once(c, "sync");
  c.connect();
  assert.equal((await hello).ppqn, 4);
  assert.ok((await timeline).bpm > 0);
  const t = await tick;
  // The timeline predicts the tick's instant (float maths: within a microsecond).
  assert.ok(Math.abs(c.tickTime(t.count) - t.time_us / 1000) < 0.001, `${c.tickTime(t.count)} vs ${t.time_us / 1000}`);
  const s = await sync;
  assert.equal(s.nudge, 7);
  // One host, one clock: after a second of pings the offset is near zero.
  await sleep(1500);
  assert.ok(Math.abs(c.offset) < 1, `offset ${c.offset} ms on one host`);
  assert.ok(c.rtt < 10 && Number.isFinite(c.rate) && c.errorBound < 5, `rtt ${c.rtt} rate ${c.rate} bound ${c.errorBound}`);
  assert.ok(c._samples.length >= 12);
  const n = c.count + 4;
  assert.ok(Math.abs(c.perfTime(c.tickTime(n)) + performance.timeOrigin - c.tickTime(n)) < 1);
  // The nudge: reported, and the events say so.
  const nudged = once(c, "nudge");
  const resync = once(c, "sync");
  c.setNudge(-3);
  assert.equal((await nudged).nudge, -3);
  assert.equal((await resync).nudge, -3);
  assert.equal(c.nudge, -3);
  assert.throws(() => c.setNudge("soon"), /nudge must be a number/);
  // A tempo change round trip.
  const tempo = once(c, "tempo");
  const next = once(c, "timeline");
  assert.ok(c.setBpm(133));
  assert.equal((await tempo).bpm, 133);
  assert.equal((await next).bpm, 133);
  c.setBpm(120);
  await sleep(200);
  const closed = once(c, "close");
  c.close();
  assert.equal((await closed).retryInMs, null);
});

test("the Node example prints beats at their instants", async () => {
  // As a user runs it: conductor.js beside the script, ws installed (here, tests/node's).
  const dir = here("./.run/");
  mkdirSync(dir, { recursive: true });
  copyFileSync(here("../../docs/examples/node-metronome.mjs"), dir + "node-metronome.mjs");
  copyFileSync(here("../../www/conductor.js"), dir + "conductor.js");
  // The server's own ticks, to check the example's instants against.
  const ticks = new Map();
  const ref = new WebSocket(url);
  ref.on("message", (data) => {
    const m = JSON.parse(String(data));
    if (m.event === "tick") ticks.set(m.data.count, m.data.time_us / 1000);
  });
  const child = spawn(process.execPath, [dir + "node-metronome.mjs", url, "6"], { stdio: ["ignore", "pipe", "inherit"] });
  let out = "";
  child.stdout.on("data", (d) => (out += d));
  const code = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill();
      reject(new Error(`the example did not finish within 30 s; printed:\n${out}`));
    }, 30000);
    child.on("exit", (c) => {
      clearTimeout(timer);
      resolve(c);
    });
  });
  await sleep(300);
  ref.close();
  assert.equal(code, 0, out);
  const lines = out.trim().split("\n");
  assert.equal(lines.length, 6, out);
  const late = [];
  let prev = null;
  for (const line of lines) {
    const m = line.match(/^beat (\d+)\.(\d+) \(tick (\d+)\) due ([\d.]+) at ([\d.]+) \(/);
    assert.ok(m, `unexpected line: ${line}`);
    const [count, due, at] = [Number(m[3]), Number(m[4]), Number(m[5])];
    assert.equal(count % 4, 0, `${line}: beats fall on beat lines`);
    if (prev !== null) assert.equal(count, prev + 4, `${line}: one beat after the last`);
    prev = count;
    // The instant the example planned is the server's own tick instant...
    assert.ok(ticks.has(count), `${line}: the server sent tick ${count}`);
    assert.ok(Math.abs(due - ticks.get(count)) < 0.01, `${line}: server says ${ticks.get(count)}`);
    // ...and it printed then, on this host's clock (which the server shares).
    late.push(at - due);
  }
  late.sort((a, b) => a - b);
  assert.ok(late[0] > -1 && late[late.length >> 1] < 3 && late[late.length - 1] < 25, `late by ${late.join(", ")} ms`);
});

test("the room option joins that room: its tempo, not main's", async () => {
  // A room of its own, at a tempo nothing else here uses.
  const band = new Conductor(url, { WebSocket, room: "node-band" });
  const hello = once(band, "hello");
  band.connect();
  assert.equal((await hello).room, "node-band");
  assert.equal(band.room, "node-band");
  const tempo = once(band, "tempo");
  assert.ok(band.setBpm(97));
  assert.equal((await tempo).bpm, 97);
  // A newcomer to the room gets the room's timeline; one in main does not.
  const second = new Conductor(url, { WebSocket, room: "node-band" });
  const main = new Conductor(url, { WebSocket });
  const [t2, tm] = [once(second, "timeline"), once(main, "timeline")];
  second.connect();
  main.connect();
  assert.equal((await t2).bpm, 97);
  assert.notEqual((await tm).bpm, 97);
  assert.equal(main.room, "main");
  for (const c of [band, second, main]) c.close();
});

test("a room name the server refuses ends with the server's error, not retries", async () => {
  const c = new Conductor(url, { WebSocket, room: "Not A Room" });
  let opened = false;
  c.addEventListener("open", () => (opened = true));
  const error = once(c, "error");
  const closed = once(c, "close");
  c.connect();
  const e = await error;
  assert.equal(e.code, "invalid_room");
  assert.equal(e.status, 400);
  // The server's own words (src/room.rs; it shows spaces as ?), not the library's.
  assert.match(e.message, /room name "Not\?A\?Room" has characters other than a-z, 0-9, '_' and '-'/);
  assert.equal((await closed).retryInMs, null, "a refused name is final");
  await sleep(1000);
  assert.equal(opened, false);
  assert.equal(c.connected, false);
});

test("a server with no room to spare is reported, and retried", async () => {
  const full = process.env.CONDUCTOR_FULL_URL;
  assert.ok(full, "CONDUCTOR_FULL_URL is not set: tests/node_client.rs starts a server with --max-rooms 1");
  const c = new Conductor(full, { WebSocket, room: "one-too-many", minBackoffMs: 50, maxBackoffMs: 100 });
  const errors = [];
  c.addEventListener("error", (e) => errors.push(e.detail));
  const closed = once(c, "close");
  c.connect();
  const first = await closed;
  assert.equal(errors.length, 1, JSON.stringify(errors));
  assert.equal(errors[0].code, "unavailable");
  assert.equal(errors[0].status, 503);
  assert.match(errors[0].message, /already holds 1 rooms \(--max-rooms\)/);
  assert.ok(first.retryInMs !== null, "a full server is tried again");
  // It keeps trying (and saying why) until closed; then it stops.
  await sleep(800);
  assert.ok(errors.length >= 2, `${errors.length} refusal(s) reported`);
  c.close();
  const reported = errors.length;
  await sleep(500);
  assert.equal(errors.length, reported, "no more tries after close()");
  assert.equal(c.connected, false);
});
