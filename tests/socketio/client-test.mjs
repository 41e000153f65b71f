// Drives the stock socket.io-client v4 against a server and checks what a predecessor client
// relies on. Run by tests/socketio.rs against the real conductor binary; also runs against
// bench/socketio-ref (a stock socket.io 4.8 server) with --seed.
//
//   node client-test.mjs URL SCENARIO [--transport websocket|polling|default] [--token T]
//                                     [--seed] [--timeout SECONDS]
//
// Scenarios:
//   basic      ticks with consecutive counts and conductor's fields; setBpm 150 -> bpmChange 150
//              and ticks at 150; with --transport default also that polling upgraded to websocket
//   reconnect  prints {"status":"ready"} after a few ticks, then expects the server to go away and
//              come back on the same URL; ticks must resume on the new connection
//   errors     setBpm out of range / not a number -> `error` {code,message}, nothing changes, the
//              connection stays; a namespace the server lacks -> connect_error "Invalid namespace"
//   rate       15 refused setBpm at once -> `error` rate_limited, the connection stays (run the
//              server with --max-messages-per-sec 5)
//   token      server started with --control-token T (pass --token T): without a token setBpm is
//              `unauthorized`; auth {token} and query {token} may change the tempo
//   pings      stays connected through Engine.IO heartbeats, two or more while silent and two or
//              more while sending; run the server with a short --ping-interval/--ping-timeout
//   hold       connects (and for default transports waits for the upgrade), prints
//              {"status":"connected"}, stays until stdin closes, then disconnects
//
// Lines on stdout are JSON: {"status":...} while running, and last {"ok":true|false,...}. The exit
// status is 0 only when every check passed. --seed drops what only conductor adds (hello,
// timeline, error events, time_us/ppqn), for a server that speaks the predecessor's events alone.

import { io } from "socket.io-client";

const USAGE =
  "usage: node client-test.mjs URL basic|reconnect|errors|rate|token|pings|hold " +
  "[--transport websocket|polling|default] [--token T] [--seed] [--timeout SECONDS]";

function parseArgs(argv) {
  const opts = { transport: "websocket", token: null, seed: false, timeout: 20 };
  const rest = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--transport") opts.transport = argv[++i];
    else if (a === "--token") opts.token = argv[++i];
    else if (a === "--seed") opts.seed = true;
    else if (a === "--timeout") opts.timeout = Number(argv[++i]);
    else rest.push(a);
  }
  if (rest.length !== 2 || !["websocket", "polling", "default"].includes(opts.transport)) {
    console.error(USAGE);
    process.exit(2);
  }
  [opts.url, opts.scenario] = rest;
  return opts;
}

const opts = parseArgs(process.argv.slice(2));
const result = { scenario: opts.scenario, transport: opts.transport };
const sockets = [];

function emitLine(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

class Failure extends Error {}

function check(cond, message) {
  if (!cond) throw new Failure(message);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function transportsFor(name) {
  if (name === "websocket") return { transports: ["websocket"] };
  if (name === "polling") return { transports: ["polling"] };
  return {}; // the stock default: polling first, then the upgrade to websocket
}

// A socket whose every event (reserved ones included) lands in one ordered log, so a scenario
// can wait for "the next X after this point" without racing the listeners.
class Client {
  constructor(label, extra = {}) {
    this.label = label;
    this.log = [];
    this.waiters = [];
    this.socket = io(opts.url, {
      ...transportsFor(opts.transport),
      forceNew: true,
      reconnectionDelay: 100,
      reconnectionDelayMax: 300,
      randomizationFactor: 0,
      timeout: 5000,
      ...extra,
    });
    sockets.push(this.socket);
    this.socket.onAny((event, ...args) => this.push(event, args[0]));
    for (const ev of ["connect", "disconnect", "connect_error"]) {
      this.socket.on(ev, (arg) => this.push(`@${ev}`, arg));
    }
    this.socket.io.on("reconnect_attempt", (n) => this.push("@reconnect_attempt", n));
    // The engine exists once the manager opens; follow its pings and upgrades.
    this.socket.io.on("open", () => {
      const engine = this.socket.io.engine;
      this.push("@open", engine.transport.name);
      engine.on("ping", () => this.push("@ping", null));
      engine.on("upgrade", (t) => this.push("@upgrade", t.name));
      engine.on("upgradeError", (e) => this.push("@upgradeError", String(e && e.message)));
    });
  }

  push(event, data) {
    const at = Date.now();
    if (event === "tick" && data && typeof data === "object") arrival.set(data, at);
    this.log.push({ event, data, at });
    const idx = this.log.length - 1;
    for (const w of [...this.waiters]) w(idx);
  }

  get transportName() {
    const engine = this.socket.io.engine;
    return engine && engine.transport ? engine.transport.name : null;
  }

  // Events named `event` from log position `from` on.
  events(event, from = 0) {
    return this.log.slice(from).filter((e) => e.event === event);
  }

  mark() {
    return this.log.length;
  }

  // Resolves with the first log entry at or after `from` that is `event` and satisfies `pred`.
  waitFor(event, { from = 0, pred = () => true, ms = 5000, what } = {}) {
    const desc = what || `${event} event`;
    return new Promise((resolve, reject) => {
      const matches = (e) => e.event === event && pred(e.data);
      for (let i = from; i < this.log.length; i++) {
        if (matches(this.log[i])) return resolve(this.log[i]);
      }
      let timer;
      const waiter = (idx) => {
        if (idx >= from && matches(this.log[idx])) {
          clearTimeout(timer);
          this.waiters.splice(this.waiters.indexOf(waiter), 1);
          resolve(this.log[idx]);
        }
      };
      this.waiters.push(waiter);
      timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(waiter), 1);
        const seen = [...new Set(this.log.slice(from).map((e) => e.event))].join(",") || "nothing";
        reject(new Failure(`${this.label}: no ${desc} within ${ms} ms (saw: ${seen})`));
      }, ms);
    });
  }

  // The first `n` ticks from `from` on, waiting for them.
  async ticks(n, { from = 0, ms } = {}) {
    const wait = ms || 2000 + n * 400; // 125 ms apart at 120 BPM; generous for slow machines
    let last = null;
    for (let i = 0; i < n; i++) {
      last = await this.waitFor("tick", {
        from: last ? this.log.indexOf(last) + 1 : from,
        ms: wait,
        what: `tick (${i} of ${n} so far)`,
      });
    }
    return this.events("tick", from).slice(0, n).map((e) => e.data);
  }

  async connected(ms = 8000) {
    const e = await Promise.race([
      this.waitFor("@connect", { ms, what: "connect" }),
      this.waitFor("@connect_error", { ms: ms + 1000 }).then((err) => {
        throw new Failure(`${this.label}: connect_error: ${err.data && err.data.message}`);
      }),
    ]);
    return e;
  }

  // Fails if the socket disconnected at or after `from`.
  stillConnected(from = 0) {
    const d = this.events("@disconnect", from);
    check(d.length === 0, `${this.label}: disconnected (${d.map((e) => e.data).join(", ")})`);
    check(this.socket.connected, `${this.label}: not connected`);
  }

  close() {
    this.socket.disconnect();
  }
}

// When each tick's data arrived (unix ms), to compare with its scheduled `time`.
const arrival = new WeakMap();

// Ticks: conductor's fields and types, consecutive counts, exact scheduled intervals.
function checkTicks(label, ticks, { bpm } = {}) {
  check(ticks.length > 0, `${label}: no ticks`);
  for (const t of ticks) {
    check(t && typeof t === "object", `${label}: tick data is not an object: ${JSON.stringify(t)}`);
    check(Number.isInteger(t.time), `${label}: tick.time not an integer: ${JSON.stringify(t)}`);
    check(typeof t.bpm === "number", `${label}: tick.bpm not a number: ${JSON.stringify(t)}`);
    check(Number.isInteger(t.count) && t.count >= 0, `${label}: bad tick.count: ${JSON.stringify(t)}`);
    if (bpm !== undefined) check(t.bpm === bpm, `${label}: tick at bpm ${t.bpm}, expected ${bpm}`);
    if (!opts.seed) {
      const keys = Object.keys(t).sort().join(",");
      check(keys === "bpm,count,ppqn,time,time_us", `${label}: tick fields ${keys}, expected bpm,count,ppqn,time,time_us`);
      check(Number.isInteger(t.time_us), `${label}: tick.time_us not an integer: ${JSON.stringify(t)}`);
      check(Number.isInteger(t.ppqn) && t.ppqn > 0, `${label}: bad tick.ppqn: ${JSON.stringify(t)}`);
      check(t.time === Math.floor(t.time_us / 1000), `${label}: tick.time ${t.time} is not time_us/1000 (${t.time_us})`);
      // Same machine, same clock: a tick arrives soon after its scheduled instant.
      const at = arrival.get(t);
      check(Math.abs(at - t.time) < 2000, `${label}: tick ${t.count} scheduled at ${t.time} arrived at ${at}`);
    }
  }
  for (let i = 1; i < ticks.length; i++) {
    const [a, b] = [ticks[i - 1], ticks[i]];
    check(b.count === a.count + 1, `${label}: counts not consecutive: ${a.count} then ${b.count}`);
    if (!opts.seed && a.bpm === b.bpm) {
      const expected = 60e6 / (b.bpm * b.ppqn);
      const dt = b.time_us - a.time_us;
      check(Math.abs(dt - expected) <= 1, `${label}: ticks ${a.count}->${b.count} ${dt} µs apart, expected ${expected}`);
    }
  }
}

// Every tick the client has seen, in order: consecutive across everything that happened.
function allTicks(c, from = 0) {
  return c.events("tick", from).map((e) => e.data);
}

async function checkGreeting(c, from = 0) {
  if (opts.seed) return null;
  const hello = (await c.waitFor("hello", { from, ms: 3000 })).data;
  for (const k of ["bpm", "ppqn", "count", "time", "min_bpm", "max_bpm"]) {
    check(typeof hello[k] === "number", `${c.label}: hello.${k} is not a number: ${JSON.stringify(hello)}`);
  }
  const timeline = (await c.waitFor("timeline", { from, ms: 3000 })).data;
  for (const k of ["bpm", "ppqn", "count", "time_us", "interval_us"]) {
    check(typeof timeline[k] === "number", `${c.label}: timeline.${k} is not a number: ${JSON.stringify(timeline)}`);
  }
  return hello;
}

// emit('setBpm', bpm) from `by`; every client in `all` hears bpmChange `bpm`, and their ticks
// after it are at the new tempo with the count running on.
async function changeTempo(by, all, bpm) {
  const marks = all.map((c) => c.mark());
  const before = all.map((c) => c.events("tick").at(-1)?.data.bpm);
  by.socket.emit("setBpm", bpm);
  for (const [i, c] of all.entries()) {
    const change = await c.waitFor("bpmChange", { from: marks[i], ms: 3000, what: `bpmChange after setBpm ${bpm}` });
    check(change.data === bpm, `${c.label}: bpmChange ${JSON.stringify(change.data)}, expected ${bpm}`);
    const after = c.log.indexOf(change) + 1;
    let from = after;
    // A timeline follows a real change (a setBpm to the tempo already set gets bpmChange alone).
    if (!opts.seed && before[i] !== bpm) {
      const tl = await c.waitFor("timeline", { from: after, ms: 3000, what: "timeline after bpmChange" });
      check(tl.data.bpm === bpm, `${c.label}: timeline after bpmChange has bpm ${tl.data.bpm}`);
      // conductor announces a change a lead ahead (issue 14): ticks before the timeline's
      // anchor keep the old tempo, the new one holds from the anchor on.
      const anchor = await c.waitFor("tick", {
        from: after,
        ms: 3000,
        what: `tick ${tl.data.count}, the timeline's anchor`,
        pred: (d) => d && d.count >= tl.data.count,
      });
      from = c.log.indexOf(anchor);
    }
    const ticks = await c.ticks(5, { from });
    checkTicks(`${c.label} after bpmChange`, ticks, { bpm });
  }
}

async function errorAfter(c, mark, code) {
  const e = await c.waitFor("error", { from: mark, ms: 3000, what: `error ${code}`, pred: (d) => d && d.code === code });
  check(typeof e.data.message === "string" && e.data.message.length > 0, `${c.label}: error ${code} without a message`);
  return e.data;
}

const scenarios = {
  async basic() {
    const c = new Client("client");
    await c.connected();
    result.connected_transport = c.transportName;
    if (opts.transport === "default") {
      check(c.log.find((e) => e.event === "@open").data === "polling", "default transports did not start on polling");
    }
    const hello = await checkGreeting(c);
    const first = await c.ticks(10);
    checkTicks("first ticks", first, hello ? { bpm: hello.bpm } : {});
    if (opts.transport === "default") {
      const up = await c.waitFor("@upgrade", { ms: 5000, what: "upgrade to websocket" });
      check(up.data === "websocket", `upgraded to ${up.data}`);
      const after = c.log.indexOf(up) + 1;
      await c.ticks(5, { from: after });
      result.upgraded = c.transportName === "websocket";
      check(result.upgraded, `transport after the upgrade is ${c.transportName}`);
      result.ticks_before_upgrade = c.events("tick", 0).length - c.events("tick", after).length;
    }
    await changeTempo(c, [c], 150);
    const ticks = allTicks(c);
    checkTicks("all ticks", ticks);
    c.stillConnected();
    result.final_transport = c.transportName;
    result.ticks = ticks.length;
    result.first_count = ticks[0].count;
    result.last_count = ticks[ticks.length - 1].count;
  },

  async reconnect() {
    const c = new Client("client");
    await c.connected();
    await checkGreeting(c);
    checkTicks("before restart", await c.ticks(5));
    if (opts.transport === "default") await c.waitFor("@upgrade", { ms: 5000, what: "upgrade to websocket" });
    result.transport_before = c.transportName;
    const before = allTicks(c);
    emitLine({ status: "ready", last_count: before[before.length - 1].count });
    const down = await c.waitFor("@disconnect", { ms: 15000, what: "disconnect while the server restarts" });
    result.disconnect_reason = down.data;
    const mark = c.log.indexOf(down) + 1;
    const up = await c.waitFor("@connect", { from: mark, ms: 15000, what: "reconnect after the restart" });
    result.reconnect_attempts = c.events("@reconnect_attempt", mark).length;
    result.down_ms = up.at - down.at;
    const from = c.log.indexOf(up);
    // hello and timeline may arrive before the connect handler runs; look from the disconnect.
    await checkGreeting(c, mark);
    const after = await c.ticks(5, { from });
    checkTicks("after restart", after);
    checkTicks("after restart (all)", allTicks(c, mark));
    c.stillConnected(from);
    result.transport_after = c.transportName;
    result.counts_after = after.map((t) => t.count);
  },

  async errors() {
    const c = new Client("client");
    await c.connected();
    const hello = await checkGreeting(c);
    const bpm = (await c.ticks(2))[0].bpm;
    if (!opts.seed) {
      let m = c.mark();
      c.socket.emit("setBpm", 999);
      result.out_of_range = await errorAfter(c, m, "bpm_out_of_range");
      m = c.mark();
      c.socket.emit("setBpm", hello.min_bpm - 1);
      await errorAfter(c, m, "bpm_out_of_range");
      m = c.mark();
      c.socket.emit("setBpm", "x");
      result.not_a_number = await errorAfter(c, m, "invalid_bpm");
      m = c.mark();
      c.socket.emit("setBpm");
      await errorAfter(c, m, "invalid_bpm");
    }
    // Another namespace on the same connection: the stock answer is a connect_error.
    // Manager#socket multiplexes it over the same Engine.IO connection, as a stock client does.
    const nsp = c.socket.io.socket("/nope");
    const err = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Failure("no connect_error for namespace /nope within 5000 ms")), 5000);
      nsp.on("connect", () => reject(new Failure("namespace /nope connected")));
      nsp.on("connect_error", (e) => {
        clearTimeout(timer);
        resolve(e);
      });
      nsp.connect();
    });
    nsp.disconnect();
    result.namespace_error = err && err.message;
    check(result.namespace_error === "Invalid namespace", `connect_error for /nope: ${result.namespace_error}`);
    const m = c.mark();
    await c.ticks(5, { from: m });
    check(c.events("bpmChange").length === 0, "a refused setBpm changed the tempo");
    const ticks = allTicks(c);
    checkTicks("all ticks", ticks, { bpm });
    c.stillConnected();
    result.ticks = ticks.length;
  },

  async rate() {
    const c = new Client("client");
    await c.connected();
    await checkGreeting(c);
    await c.ticks(2);
    const m = c.mark();
    // 15 refused tempo changes at once: more than --max-messages-per-sec 5, less than ten times.
    for (let i = 0; i < 15; i++) c.socket.emit("setBpm", 999);
    await errorAfter(c, m, "rate_limited");
    await sleep(300);
    const codes = c.events("error", m).map((e) => e.data.code);
    result.error_codes = codes;
    check(codes.every((x) => x === "rate_limited" || x === "bpm_out_of_range"), `unexpected errors ${codes}`);
    check(codes.filter((x) => x === "bpm_out_of_range").length < 15, "every message of the burst was handled");
    await c.ticks(3, { from: c.mark() });
    checkTicks("all ticks", allTicks(c));
    c.stillConnected();
  },

  async token() {
    check(opts.token, "the token scenario needs --token");
    const anon = new Client("no token");
    const auth = new Client("auth token", { auth: { token: opts.token } });
    const query = new Client("query token", { query: { token: opts.token } });
    const wrong = new Client("wrong token", { auth: { token: opts.token + "-wrong" } });
    const all = [anon, auth, query, wrong];
    for (const c of all) await c.connected();
    const hellos = [];
    for (const c of all) hellos.push(await checkGreeting(c));
    result.control = Object.fromEntries(all.map((c, i) => [c.label, hellos[i].control]));
    check(hellos.every((h) => h.token_required === true), "hello.token_required is not true");
    check(
      JSON.stringify(hellos.map((h) => h.control)) === "[false,true,true,false]",
      `hello.control per client: ${JSON.stringify(result.control)}`,
    );
    const bpm = (await anon.ticks(1))[0].bpm;
    for (const c of [anon, wrong]) {
      const m = c.mark();
      c.socket.emit("setBpm", 150);
      await errorAfter(c, m, "unauthorized");
      await c.ticks(2, { from: c.mark() });
      check(c.events("bpmChange").length === 0, `${c.label}: setBpm without the token changed the tempo`);
      checkTicks(`${c.label} after refusal`, allTicks(c, m), { bpm });
    }
    await changeTempo(auth, all, 150);
    await changeTempo(query, all, 160);
    for (const c of all) {
      checkTicks(`${c.label} all ticks`, allTicks(c));
      c.stillConnected();
    }
  },

  async pings() {
    const c = new Client("client");
    await c.connected();
    await checkGreeting(c);
    const pingInterval = c.socket.io.engine._pingInterval;
    const pingTimeout = c.socket.io.engine._pingTimeout;
    result.ping_interval_ms = pingInterval;
    result.ping_timeout_ms = pingTimeout;
    check(pingInterval <= 2000, `run the server with a short ping interval (handshake says ${pingInterval} ms)`);
    // Silent for two intervals, then chatty (a refused setBpm every 200 ms) for two more:
    // heartbeats must keep coming either way, or the stock client gives up ("ping timeout").
    const span = 2 * pingInterval + 600;
    let m = c.mark();
    await sleep(span);
    result.pings_silent = c.events("@ping", m).length;
    m = c.mark();
    const chatter = setInterval(() => c.socket.emit("setBpm", 9999), 200);
    await sleep(span);
    clearInterval(chatter);
    result.pings_chatty = c.events("@ping", m).length;
    c.stillConnected();
    check(result.pings_silent >= 2, `${result.pings_silent} pings in ${span} ms while silent`);
    check(result.pings_chatty >= 2, `${result.pings_chatty} pings in ${span} ms while sending`);
    const ticks = allTicks(c);
    checkTicks("all ticks", ticks);
    check(ticks.length >= (2 * span) / 125 / 2, `only ${ticks.length} ticks in ${2 * span} ms`);
    result.ticks = ticks.length;
    result.final_transport = c.transportName;
  },

  async hold() {
    const c = new Client("client");
    await c.connected();
    await c.ticks(1);
    if (opts.transport === "default") await c.waitFor("@upgrade", { ms: 5000, what: "upgrade to websocket" });
    emitLine({ status: "connected", transport: c.transportName, id: c.socket.id });
    await new Promise((resolve) => {
      process.stdin.on("data", () => {});
      process.stdin.on("end", resolve);
      process.stdin.on("close", resolve);
      process.stdin.resume();
    });
    c.stillConnected();
    checkTicks("all ticks", allTicks(c));
    result.ticks = allTicks(c).length;
  },
};

async function main() {
  const run = scenarios[opts.scenario];
  if (!run) {
    console.error(USAGE);
    process.exit(2);
  }
  const deadline = sleep(opts.timeout * 1000).then(() => {
    throw new Failure(`scenario did not finish within ${opts.timeout} s`);
  });
  const started = Date.now();
  try {
    await Promise.race([run(), deadline]);
    result.ok = true;
  } catch (e) {
    result.ok = false;
    result.error = e instanceof Failure ? e.message : String((e && e.stack) || e);
  }
  result.ms = Date.now() - started;
  // Disconnect cleanly (a polling client tells the server with a POST) before exiting.
  for (const s of sockets) s.disconnect();
  await sleep(200);
  emitLine(result);
  process.exit(result.ok ? 0 : 1);
}

main();
