// Rooms through the stock socket.io-client: a namespace is a room. Run by tests/rooms.rs:
//
//   node rooms-test.mjs http://127.0.0.1:PORT [--transport websocket|polling|default]
//
// Prints one JSON line with what it saw and exits 0 when every check passed. It checks:
// io("http://host/NAME") joins room NAME (hello says so) and io("http://host") joins main;
// a tempo change in one room reaches its members and nobody else; a second namespace
// multiplexed on the same connection is refused with the stock "Invalid namespace" and the
// reason in err.data; a namespace that is no room name is refused with the naming rule.

import { io } from "socket.io-client";

const [url, ...rest] = process.argv.slice(2);
let transport = "websocket";
for (let i = 0; i < rest.length; i++) if (rest[i] === "--transport") transport = rest[++i];
const transports =
  transport === "websocket" ? { transports: ["websocket"] } : transport === "polling" ? { transports: ["polling"] } : {};

class Failure extends Error {}
const check = (cond, message) => {
  if (!cond) throw new Failure(message);
};
const result = { ok: false, transport };
const sockets = [];

class Member {
  constructor(label, path, extra = {}) {
    this.label = label;
    this.log = [];
    this.waiters = [];
    this.socket = io(url + path, { ...transports, forceNew: true, reconnection: false, timeout: 5000, ...extra });
    sockets.push(this.socket);
    this.socket.onAny((event, data) => this.push(event, data));
    this.socket.on("connect_error", (e) => this.push("@connect_error", e));
  }
  push(event, data) {
    this.log.push({ event, data });
    for (const w of [...this.waiters]) w();
  }
  events(event, from = 0) {
    return this.log.slice(from).filter((e) => e.event === event).map((e) => e.data);
  }
  waitFor(event, { from = 0, pred = () => true, ms = 5000 } = {}) {
    return new Promise((resolve, reject) => {
      const look = () => {
        const hit = this.log.slice(from).find((e) => e.event === event && pred(e.data));
        if (hit) {
          clearTimeout(timer);
          this.waiters.splice(this.waiters.indexOf(look), 1);
          resolve(hit.data);
        }
      };
      const timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(look), 1);
        reject(new Failure(`${this.label}: no ${event} within ${ms} ms`));
      }, ms);
      this.waiters.push(look);
      look();
    });
  }
}

try {
  const band = new Member("band", "/band");
  const other = new Member("other", "/other");
  const main = new Member("main", "");
  const hellos = {};
  for (const m of [band, other, main]) hellos[m.label] = await m.waitFor("hello");
  result.rooms = Object.fromEntries(Object.entries(hellos).map(([k, h]) => [k, h.room ?? null]));
  check(hellos.band.room === "band" && hellos.other.room === "other", `hello.room: ${JSON.stringify(result.rooms)}`);
  check(!("room" in hellos.main), "main's hello carries the predecessor's fields only");
  for (const m of [band, other, main]) await m.waitFor("tick");

  // A tempo change in one room: its members hear it, from the anchor its ticks change.
  const marks = [other, main].map((m) => m.log.length);
  const bandMark = band.log.length;
  band.socket.emit("setBpm", 150);
  const change = await band.waitFor("bpmChange", { from: bandMark });
  check(change === 150, `bpmChange ${change}`);
  const tl = await band.waitFor("timeline", { from: bandMark, pred: (d) => d.bpm === 150 });
  const anchorTick = await band.waitFor("tick", { from: bandMark, pred: (d) => d.count >= tl.count, ms: 3000 });
  check(anchorTick.bpm === 150, `band's tick ${anchorTick.count} at ${anchorTick.bpm}`);
  result.band_anchor = tl.count;
  // Meanwhile the other rooms tick on at 120 and hear nothing.
  await new Promise((r) => setTimeout(r, 500));
  for (const [i, m] of [other, main].entries()) {
    check(m.events("bpmChange", marks[i]).length === 0, `${m.label} heard the band's change`);
    const ticks = m.events("tick", marks[i]);
    check(ticks.length > 0 && ticks.every((t) => t.bpm === 120), `${m.label}'s ticks: ${JSON.stringify(ticks.map((t) => t.bpm))}`);
  }

  // One room per connection: a second namespace on band's Manager is refused, with why.
  const second = band.socket.io.socket("/third");
  const refusal = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Failure("no connect_error for a second namespace")), 5000);
    second.on("connect", () => reject(new Failure("a second namespace connected on one connection")));
    second.on("connect_error", (e) => {
      clearTimeout(timer);
      resolve(e);
    });
    second.connect();
  });
  second.disconnect();
  result.multiplex = { message: refusal.message, code: refusal.data && refusal.data.code };
  check(refusal.message === "Invalid namespace", `second namespace: ${refusal.message}`);
  check(refusal.data && refusal.data.code === "one_room_per_connection", `data: ${JSON.stringify(refusal.data)}`);
  check(band.socket.connected, "the first namespace stays connected");

  // A namespace that is no room name: refused with the rule.
  const bad = new Member("bad", "/Bad_Name");
  const err = await bad.waitFor("@connect_error");
  result.bad_name = err.message;
  check(/a-z, 0-9/.test(err.message), `bad name: ${err.message}`);

  result.ok = true;
} catch (e) {
  result.error = e instanceof Failure ? e.message : String(e && e.stack ? e.stack : e);
} finally {
  for (const s of sockets) s.disconnect();
  console.log(JSON.stringify(result));
  process.exit(result.ok ? 0 : 1);
}
