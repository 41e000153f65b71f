// conductor.js: the client library for a conductor tempo server, for browsers and Node. An ES
// module with no dependencies and no build step; every server serves it at /conductor.js.
//
//   import { Conductor } from "/conductor.js";
//   const c = new Conductor(undefined, { ticks: "beat" }); // same-origin ws(s)://host/ws
//   c.addEventListener("tick", (e) => console.log(e.detail.count)); // every beat's tick
//   c.connect();
//
// In Node (22+ has a global WebSocket; before that, pass one, e.g. from the `ws` package):
//
//   import WebSocket from "ws";                // npm install ws
//   import { Conductor } from "./conductor.js"; // curl -O http://HOST:3000/conductor.js
//   const c = new Conductor("ws://HOST:3000/ws", { WebSocket }).connect();
//
// The units, exported for other clients to build on:
//   Conductor      the client: connection, clock, timeline, transport, events (below)
//   Connection     a WebSocket that reconnects with backoff; timers that live as long as it
//   ClockSync      the clock estimator of docs/protocol.md#clock-sync (the same description as
//                  the Rust crate conductor-sync): samples in, ClockMapping out
//   ClockMapping   local ↔ server time: toServer(localMs), toLocal(serverMs), offsetAt(localMs)
//   Timeline       the server's timeline: tickTime(n), countAt(serverMs), the tempo before a
//                  change's anchor kept
//   AudioClock     an AudioContext's clock against performance.now(), from its output timestamp
//   AudioScheduler the lookahead scheduler behind Conductor.schedule()
//
// What Conductor does
//   - Connects, and reconnects after any close with exponential backoff and jitter (250 ms
//     doubling to 10 s), until close() is called.
//   - Measures the clock: a ping every 100 ms for the first 10 s of a connection, then every
//     250 ms (10 and 4 messages a second, inside the server's limit of 20). ClockSync keeps the
//     lowest forward and highest backward value of each direction over a 60 s window, fits the
//     clocks' rate, and slews corrections in at 2 ms a second once settled
//     (docs/protocol.md#clock-sync).
//   - Keeps the server's timeline (the anchor tick, its instant and the interval), so it knows
//     the instant of any tick, past or future, without waiting for the tick message.
//
// Constructor: new Conductor(url?, options?)
//   url      WebSocket URL; default ws(s)://<this page's host>/ws (in a page; Node needs one)
//   options  room            the room to join (docs/rooms.md), sent as ?room=; default: none,
//                            which is the room `main`. A name the server refuses (not 1 to 64
//                            of a-z, 0-9, _ and -) ends the connection: an `error` event
//                            {code: "invalid_room", status: 400, message: the server's words},
//                            then `close` with retryInMs null. No retrying.
//            token           control token, sent as ?token= (needed only if the server asks)
//            ticks           which tick messages the server sends, as ?ticks=: "none" (the
//                            default: everything here runs on the timeline, so ticks are not
//                            needed), "beat", "bar" or "all". The `tick` event fires only for
//                            the ticks asked for: a page that shows ticks as they arrive asks
//                            for "beat" (or "all"). A ticks= in the URL wins.
//            lookahead       seconds the audio scheduler looks ahead (default 0.1)
//            nudgeMs         this device's manual correction, ms: positive plays later (default
//                            0). Round trips cannot see a path's asymmetry
//                            (docs/protocol.md#clock-sync); set by ear, per device.
//            WebSocket       the WebSocket class to use (default: the global one; Node < 22
//                            has none: pass `ws`'s)
//            pingIntervalMs  ms between pings once the first 10 s are over (default 250)
//            clock           ClockSync options (docs/protocol.md#clock-sync), e.g.
//                            {maxRatePpm: 250}
//            (resyncMs, sampleWindow, burst, resyncBurst and pingSpacingMs of earlier versions
//            are accepted and ignored: pings are continuous now)
//
// Methods
//   connect() (returns this), close(), reconnect() (e.g. after setting options.token)
//   setNudge(ms)           changes the nudge; the scheduler re-plans what it had planned
//   serverNow()            the server's wall clock now, unix ms (float)
//   tickTime(n)            unix ms (server clock) at which tick n is due; n may be fractional
//   countAt(serverMs)      the (fractional) tick count at a server instant
//   perfTime(serverMs)     the same instant as a performance.now() value; serverTime(perfMs) back
//   isPlayingAt(n)         whether the transport plays at tick n
//   stepAt(serverMs, stepsPerBeat = 4)
//                          the step sounding at that instant, counted from the last start (the
//                          numbering schedule() uses), or null while stopped
//   position(n)            {bar, beat, step} (1-based) of tick n, counted from the last start
//   audioTime(ctx, n)      the AudioContext time at which tick n must sound; compensates the
//                          audio output latency with ctx.getOutputTimestamp(), and the nudge
//   schedule(ctx, onStep, {stepsPerBeat = 4, lookahead, intervalMs = 25})
//                          runs a lookahead scheduler: every intervalMs it calls
//                          onStep({step, count, time, when}) once for each step that will sound
//                          within `lookahead` seconds while the transport plays. `step` counts
//                          from the last start, `when` is the AudioContext time. onStep may
//                          return the source nodes it started: if a tempo or transport change
//                          (or a better clock estimate, or a new nudge) moves that step by more
//                          than 1 ms before it sounds, they are stopped and the step is
//                          scheduled again. Returns {stop()}.
//   audioReady(ctx)        whether ctx runs and its clock has been sampled enough to schedule
//   setBpm(bpm), start(quantize = "bar" | "beat" | "none"), stop()
//
// Properties (read-only)
//   connected, bpm, ppqn, beatsPerBar, count (now, from the timeline), playing, startCount
//   (the tick where the transport last started), offset (ms, server minus local, now), rtt
//   (ms, the shortest round trip in the window), rate (ppm), errorBound (ms: how far the true
//   offset can be, on the samples' evidence; asymmetry included), spread (the same as
//   errorBound, for pages written for earlier versions), synced, settled,
//   nudge (ms), mapping (the current ClockMapping), clock (the ClockSync), control (may this
//   connection change the tempo of its room), tokenRequired, room (the room joined: the
//   server's `hello.room`, "main" when it names none), minBpm, maxBpm, timeline, transport,
//   lastTick, version
//
// Events (CustomEvent; the payload is in event.detail)
//   open, close {code, reason, retryInMs}, hello (hello data), tick (tick data plus `lateMs`:
//   how long after its instant it arrived; only for the ticks asked for: none by default,
//   see the `ticks` option), tempo {bpm, previous}, transport {state, count,
//   time_us}, timeline (timeline data), sync {offset, rtt, spread, samples, rate, errorBound,
//   nudge, settled}, nudge {nudge}, error {code, message} (the server refused something; a
//   refused connection adds `status`, the HTTP status: invalid_room (400) is final,
//   unavailable (503: the server is full, or holds --max-rooms rooms) is retried with backoff)
//
// Why a connection failed: a WebSocket cannot read the HTTP answer that refused it, so when a
// socket closes before it ever opened, Connection asks the same URL again with a plain GET
// (the server checks the room before the handshake) and reports the status and text.

const localNow = () => performance.timeOrigin + performance.now();

const DEFAULTS = {
  room: null,
  token: null,
  // Conductor schedules on the timeline, so it asks the server for no ticks at all: a client
  // that takes none costs the server only its pings and the rare timeline.
  ticks: "none",
  lookahead: 0.1,
  nudgeMs: 0,
  WebSocket: null,
  fastPingMs: 100,
  fastPingsForMs: 10000,
  pingIntervalMs: 250,
  minBackoffMs: 250,
  maxBackoffMs: 10000,
  clock: {},
};

// `url` with `params` added to its query (those null or empty left out, and those the URL
// names already kept as the URL has them).
function withQuery(url, params) {
  let out = url;
  for (const [name, value] of Object.entries(params)) {
    if (value === null || value === undefined || value === "") continue;
    if (new RegExp("[?&]" + name + "=").test(out)) continue;
    out += (out.includes("?") ? "&" : "?") + name + "=" + encodeURIComponent(value);
  }
  return out;
}

function median(sorted) {
  const m = sorted.length >> 1;
  return sorted.length % 2 ? sorted[m] : (sorted[m - 1] + sorted[m]) / 2;
}

// ---------------------------------------------------------------------------------------------
// Clock sync (docs/protocol.md#clock-sync; the same description as
// tools/sync/src/estimator.rs). All times in ms: local times on this device's clock, server
// times unix ms.

export const CLOCK_DEFAULTS = {
  windowMs: 60000,
  maxSamples: 256,
  maxRatePpm: 250,
  rateConfidence: 32,
  settleMs: 3000,
  settleSamples: 8,
  maxSlewPpm: 2000,
  stepMs: 20,
  outlierFloorMs: 2,
  outlierFactor: 3,
};

// Local ↔ server time as estimated at one moment: the offset (server − local) at local time L
// is offset + rate·(L − anchor), plus what is left of a correction being slewed in.
export class ClockMapping {
  constructor({ anchor, offset, rate = 0, residual = 0, slew = 0, errorBound = 0, minRtt = 0, samples = 0, settled = false }) {
    Object.assign(this, { anchor, offset, rate, residual, slew, errorBound, minRtt, samples, settled });
  }

  residualAt(dt) {
    if (this.residual === 0 || dt <= 0) return this.residual;
    if (dt >= this.slew) return 0;
    return this.residual * (1 - dt / this.slew);
  }

  offsetAt(local) {
    const dt = local - this.anchor;
    return this.offset + this.rate * dt + this.residualAt(dt);
  }

  toServer(local) {
    return local + this.offsetAt(local);
  }

  // The inverse of toServer: the mapping is piecewise linear and increasing; solve each piece
  // and keep the one whose dt lies in it.
  toLocal(server) {
    const base = server - this.anchor - this.offset;
    const rho = this.residual;
    const settledDt = base / (1 + this.rate);
    let dt;
    if (rho === 0 || settledDt >= this.slew) dt = settledDt;
    else {
      const slewing = (base - rho) / (1 + this.rate - rho / this.slew);
      dt = slewing > 0 ? slewing : (base - rho) / (1 + this.rate);
    }
    return this.anchor + dt;
  }

  get ratePpm() {
    return this.rate * 1e6;
  }
}

// The lowest forward value min(aᵢ − r·xᵢ) and the highest backward value max(bᵢ − r·yᵢ).
function envelopes(xs, a, ys, b, r) {
  let lo = Infinity;
  let hi = -Infinity;
  for (let i = 0; i < xs.length; i++) lo = Math.min(lo, a[i] - r * xs[i]);
  for (let i = 0; i < ys.length; i++) hi = Math.max(hi, b[i] - r * ys[i]);
  return [lo, hi];
}

// The rate of the pair of parallel lines that hug the forward values from below and the
// backward values from above (docs/protocol.md#clock-sync, step 2): where g(r) changes sign,
// by bisection.
function fitRate(xs, a, ys, b, maxRate) {
  const n = xs.length;
  let meanX = 0;
  let meanY = 0;
  for (let i = 0; i < n; i++) {
    meanX += xs[i];
    meanY += ys[i];
  }
  meanX /= n;
  meanY /= n;
  const g = (r) => {
    let best = Infinity;
    let bx = 0;
    for (let i = 0; i < n; i++) {
      const v = a[i] - r * xs[i];
      if (v < best) {
        best = v;
        bx = xs[i];
      }
    }
    let top = -Infinity;
    let ty = 0;
    for (let i = 0; i < n; i++) {
      const v = b[i] - r * ys[i];
      if (v > top) {
        top = v;
        ty = ys[i];
      }
    }
    return bx - meanX + (meanY - ty);
  };
  const boundary = (below) => {
    let lo = -maxRate;
    let hi = maxRate;
    if (!below(lo)) return lo;
    if (below(hi)) return hi;
    for (let k = 0; k < 60; k++) {
      const mid = 0.5 * (lo + hi);
      if (below(mid)) lo = mid;
      else hi = mid;
    }
    return 0.5 * (lo + hi);
  };
  return 0.5 * (boundary((r) => g(r) < 0) + boundary((r) => g(r) <= 0));
}

export class ClockSync {
  constructor(options = {}) {
    this.config = { ...CLOCK_DEFAULTS, ...options };
    this.samples = []; // {t0, t1, t2, t3}, oldest first
    this.rate = 0; // the last well-determined rate: the prior after a reset
    this.mapping = null;
    this.settled = false;
    this._first = null;
    this._sinceReset = 0;
  }

  // Adds one exchange (t0 local send, t1 server receive, t2 server send, t3 local receive, ms)
  // and returns the mapping. Impossible samples are ignored.
  addSample(t0, t1, t2, t3) {
    const cfg = this.config;
    const elapsed = t3 - t0;
    const held = t2 - t1;
    const last = this.samples[this.samples.length - 1];
    const plausible =
      elapsed >= 0 && elapsed < 60000 && held >= 0 && held < 60000 && elapsed - held > -1 && [t0, t1, t2, t3].every(Number.isFinite);
    if (!plausible || (last && t3 < last.t3)) return this.mapping;
    this.samples.push({ t0, t1, t2, t3 });
    while (this.samples.length > Math.max(1, cfg.maxSamples) || t3 - this.samples[0].t3 > cfg.windowMs) this.samples.shift();
    this._sinceReset++;
    if (this._first === null) this._first = t3;
    const est = this._estimate();
    if (est.uncertainty < 0.25 * cfg.maxRatePpm * 1e-6) this.rate = est.rate;
    const now = t3;
    const fresh = {
      anchor: now,
      offset: est.offset,
      rate: est.rate,
      errorBound: est.errorBound,
      minRtt: est.minRtt,
      samples: est.kept,
      settled: this.settled,
    };
    let next = new ClockMapping(fresh);
    const p = this.mapping;
    if (p && this.settled) {
      const residual = p.offsetAt(now) - est.offset;
      if (Math.abs(residual) <= cfg.stepMs && cfg.maxSlewPpm > 0) {
        next = new ClockMapping({
          ...fresh,
          residual,
          slew: Math.abs(residual) / (cfg.maxSlewPpm * 1e-6),
          errorBound: est.errorBound + Math.abs(residual),
        });
      }
    }
    this.mapping = next;
    if (this._sinceReset >= cfg.settleSamples && now - this._first >= cfg.settleMs) this.settled = true;
    return this.mapping;
  }

  // Forgets the samples, for a new path (a reconnect); keeps the mapping, rate and settled state.
  resetPath() {
    this.samples = [];
    this._first = null;
    this._sinceReset = 0;
  }

  _estimate() {
    const cfg = this.config;
    const s = this.samples;
    const rtts = s.map((x) => x.t3 - x.t0 - (x.t2 - x.t1)).sort((p, q) => p - q);
    const minRtt = rtts[0];
    const med = rtts[rtts.length >> 1];
    const limit = minRtt + Math.max(cfg.outlierFloorMs, cfg.outlierFactor * (med - minRtt));
    const at = s[s.length - 1].t3;
    const base = s[0].t1 - s[0].t0;
    const xs = s.map((x) => x.t0 - at);
    const a = s.map((x) => x.t1 - x.t0 - base);
    const ys = s.map((x) => x.t3 - at);
    const b = s.map((x) => x.t2 - x.t3 - base);
    const kept = [];
    for (let i = 0; i < s.length; i++) if (s[i].t3 - s[i].t0 - (s[i].t2 - s[i].t1) <= limit) kept.push(i);
    const n = kept.length;
    const span = at - Math.min(...kept.map((i) => s[i].t0));
    const maxRate = Math.max(0, cfg.maxRatePpm) * 1e-6;
    let rate;
    let uncertainty;
    if (n >= 4 && span >= 1000) {
      const kx = kept.map((i) => xs[i]);
      const ka = kept.map((i) => a[i]);
      const ky = kept.map((i) => ys[i]);
      const kb = kept.map((i) => b[i]);
      rate = fitRate(kx, ka, ky, kb, maxRate);
      const [lo, hi] = envelopes(kx, ka, ky, kb, rate);
      const excess = [];
      for (let i = 0; i < n; i++) excess.push(ka[i] - rate * kx[i] - lo);
      for (let i = 0; i < n; i++) excess.push(hi - (kb[i] - rate * ky[i]));
      excess.sort((p, q) => p - q);
      const typical = excess[excess.length >> 1];
      uncertainty = Math.min((cfg.rateConfidence * typical) / (n * span), 2 * maxRate);
    } else {
      rate = Math.min(maxRate, Math.max(-maxRate, this.rate));
      uncertainty = 2 * maxRate;
    }
    const fastest = Math.min(rate + uncertainty, maxRate);
    const slowest = Math.max(rate - uncertainty, -maxRate);
    const upper = envelopes(xs, a, ys, b, fastest)[0];
    const lower = envelopes(xs, a, ys, b, slowest)[1];
    return {
      offset: base + (upper + lower) / 2,
      rate,
      errorBound: Math.max(0, (upper - lower) / 2),
      minRtt,
      kept: n,
      uncertainty,
    };
  }
}

// ---------------------------------------------------------------------------------------------
// The timeline: tick n >= count is due at time_us + (n − count)·interval_us (server unix µs).
// Until its anchor, ticks keep the grid of the timeline before it (`earlier`), so that a change
// announced ahead does not move the ticks before it.

export class Timeline {
  constructor({ count, time_us, bpm, ppqn = 4, beats_per_bar = 4, interval_us }, earlier = null) {
    this.count = count;
    this.time_us = time_us;
    this.bpm = bpm;
    this.ppqn = ppqn || 4;
    this.interval_us = interval_us || 60e6 / (bpm * this.ppqn);
    this.beats_per_bar = beats_per_bar || 4;
    Object.defineProperty(this, "earlier", { value: earlier, enumerable: false });
  }

  // This timeline as it follows `previous`.
  after(previous) {
    if (!previous) return this;
    const earlier = this.count > previous.count ? previous.segment() : this.count === previous.count ? previous.earlier : null;
    return new Timeline(this, earlier);
  }

  segment() {
    return { count: this.count, time_us: this.time_us, bpm: this.bpm, interval_us: this.interval_us };
  }

  // The tempo segment tick n falls on.
  segmentFor(n) {
    return this.earlier && n < this.count ? this.earlier : this;
  }

  tickTime(n) {
    const s = this.segmentFor(n);
    return (s.time_us + (n - s.count) * s.interval_us) / 1000;
  }

  countAt(serverMs) {
    const s = this.earlier && serverMs * 1000 < this.time_us ? this.earlier : this;
    const n = s.count + (serverMs * 1000 - s.time_us) / s.interval_us;
    return s === this.earlier ? Math.min(n, this.count) : n;
  }

  bpmAt(n) {
    return this.segmentFor(n).bpm;
  }
}

// ---------------------------------------------------------------------------------------------
// The connection: one WebSocket at a time, reconnected with backoff; timers that live as long
// as the current socket. Events: open, message {data (parsed JSON), arrived (local ms)}, close
// {code, reason, retryInMs}, refused {code, status, message} (the server answered the handshake
// with an error; see "Why a connection failed" above).

// The server's rule for room names (docs/rooms.md#names). Used only to tell a refused name
// (final) from the server's other 400, which a plain GET gets for not being an upgrade.
export const ROOM_NAME = /^[a-z0-9_-]{1,64}$/;

// The URL to open: `url` plus ?room= and ?token= from the options.
export function connectUrl(url, { room, token, ticks } = {}) {
  // A parameter already in the URL wins.
  return withQuery(url, { room, token, ticks });
}

export class Connection extends EventTarget {
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.options = { ...DEFAULTS, ...options };
    this.WebSocket = this.options.WebSocket || globalThis.WebSocket;
    if (typeof this.WebSocket !== "function") {
      throw new Error(
        "conductor.js: there is no WebSocket here. Node 22 and later have one built in; " +
          "on older Node, install the ws package (npm install ws) and pass it: " +
          "new Conductor(url, { WebSocket }) with `import WebSocket from \"ws\"`",
      );
    }
    this.ws = null;
    this._timers = new Set();
    this._attempt = 0;
    this._closed = true;
    this._generation = 0; // counts sockets, so that a late answer about an old one is dropped
  }

  get connected() {
    return !!this.ws && this.ws.readyState === 1;
  }

  connect() {
    this._closed = false;
    this._open();
    return this;
  }

  // Drops the current socket and opens a new one at once.
  reconnect() {
    this._closed = false;
    this._attempt = 0;
    this._clearTimers();
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(1000);
    this._open();
  }

  close() {
    this._closed = true;
    this._clearTimers();
    if (this.ws) this.ws.close(1000);
  }

  // The server answered like a server: the next reconnect starts from the shortest backoff.
  resetBackoff() {
    this._attempt = 0;
  }

  send(event, data) {
    if (!this.connected) return false;
    this.ws.send(JSON.stringify(data === undefined ? { event } : { event, data }));
    return true;
  }

  after(ms, fn) {
    const id = setTimeout(() => {
      this._timers.delete(id);
      fn();
    }, ms);
    this._timers.add(id);
  }

  _clearTimers() {
    for (const id of this._timers) clearTimeout(id);
    this._timers.clear();
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _open() {
    const o = this.options;
    const url = connectUrl(this.url, o);
    const generation = ++this._generation;
    let opened = false;
    let ws;
    try {
      ws = new this.WebSocket(url);
    } catch (err) {
      this._retry(0, String(err));
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      opened = true;
      this._emit("open", {});
    };
    ws.onerror = () => {}; // a close follows, which retries
    ws.onmessage = (e) => {
      // The event's own timestamp is when the browser queued it: closer to the arrival than
      // now, if the page was busy. (Node's events have none.)
      const nowPerf = performance.now();
      const ts = e.timeStamp;
      const arrivedPerf = ts > 0 && ts <= nowPerf && nowPerf - ts < 1000 ? ts : nowPerf;
      let data;
      try {
        data = JSON.parse(typeof e.data === "string" ? e.data : String(e.data));
      } catch {
        return;
      }
      this._emit("message", { data, arrived: performance.timeOrigin + arrivedPerf });
    };
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this._clearTimers();
      if (opened || this._closed) {
        this._retry(e.code, e.reason);
        return;
      }
      // Refused before it opened: ask why, then decide whether to try again.
      this._whyRefused(url).then((refusal) => {
        if (generation !== this._generation) return; // reconnect() opened another meanwhile
        if (refusal && !this._closed) {
          this._emit("refused", refusal);
          if (refusal.final) this._closed = true;
        }
        this._retry(e.code, e.reason);
      });
    };
  }

  // The server's answer to a plain GET of the URL a WebSocket failed to open: {code, status,
  // message, final}, or null when it has nothing to say (unreachable, or the 400 every plain
  // GET gets for not being an upgrade).
  async _whyRefused(url) {
    if (typeof fetch !== "function") return null;
    const httpUrl = url.replace(/^ws/, "http");
    let status;
    let text;
    try {
      const signal = typeof AbortSignal !== "undefined" && AbortSignal.timeout ? AbortSignal.timeout(3000) : undefined;
      const res = await fetch(httpUrl, { cache: "no-store", signal });
      status = res.status;
      text = (await res.text()).trim();
    } catch {
      return null;
    }
    // "400 Bad Request: room name …": the message is what follows the status line's words.
    const message = text.replace(/^\d{3} [^:]*: /, "");
    const room = this.options.room;
    if (status === 400 && room && !ROOM_NAME.test(String(room))) {
      return { code: "invalid_room", status, message, final: true };
    }
    if (status === 503) return { code: "unavailable", status, message, final: false };
    return null;
  }

  _retry(code, reason) {
    if (this._closed) {
      this._emit("close", { code, reason, retryInMs: null });
      return;
    }
    const o = this.options;
    const ceiling = Math.min(o.maxBackoffMs, o.minBackoffMs * 2 ** this._attempt++);
    const delay = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
    this._emit("close", { code, reason, retryInMs: delay });
    const id = setTimeout(() => {
      this._timers.delete(id);
      if (!this._closed) this._open();
    }, delay);
    this._timers.add(id);
  }
}

// ---------------------------------------------------------------------------------------------
// Web Audio: an AudioContext's clock against performance.now(), and the lookahead scheduler.

// The AudioContext's clock minus performance.now()/1000, for the frame being heard now: the
// median of the last samples of ctx.getOutputTimestamp(), taken at most every 20 ms. Its pairs
// agree to about 0.1 ms, except the first one or two after the context starts. Where it is
// missing, ctx.currentTime less the reported output latency stands in (a few ms of jitter).
export class AudioClock {
  constructor(ctx) {
    this.ctx = ctx;
    this.raw = [];
    this.d = NaN;
    this.at = -Infinity;
    this.exact = false;
    // A suspended context's clock stops: after a resume, start over.
    ctx.addEventListener("statechange", () => {
      this.raw = [];
      this.exact = false;
      this.at = -Infinity;
    });
  }

  // Seconds to add to performance.now()/1000 to get the context time heard then.
  offset() {
    const ctx = this.ctx;
    const perfNow = performance.now();
    if (perfNow - this.at < 20 || ctx.state !== "running") return this.d;
    this.at = perfNow;
    const ts = ctx.getOutputTimestamp ? ctx.getOutputTimestamp() : null;
    const exact = !!ts && ts.contextTime > 0 && ts.performanceTime > 0;
    if (exact && !this.exact) {
      this.raw = [];
      this.exact = true;
    }
    if (exact) this.raw.push(ts.contextTime - ts.performanceTime / 1000);
    else if (!this.exact) this.raw.push(ctx.currentTime - perfNow / 1000 - (ctx.outputLatency || ctx.baseLatency || 0));
    else return this.d;
    if (this.raw.length > 15) this.raw.shift();
    this.d = median([...this.raw].sort((x, y) => x - y));
    return this.d;
  }

  ready() {
    this.offset();
    return this.ctx.state === "running" && this.raw.length >= (this.exact ? 3 : 8);
  }
}

// Every intervalMs, the steps due within the lookahead go to onStep; steps planned earlier that
// a change moved by more than 1 ms (or that no longer play) are taken back and planned again.
export class AudioScheduler {
  constructor(conductor, ctx, onStep, opts = {}) {
    this.c = conductor;
    this.ctx = ctx;
    this.onStep = onStep;
    this.opts = opts;
    this.stepsPerBeat = opts.stepsPerBeat || 4;
    this.pending = new Map(); // tick position -> {step, when, nodes}
    this.run = () => this._run();
    this.id = null;
  }

  start() {
    const c = this.c;
    this.id = setInterval(this.run, this.opts.intervalMs || 25);
    for (const type of ["timeline", "transport", "nudge"]) c.addEventListener(type, this.run);
    this.run();
    return this;
  }

  stop() {
    clearInterval(this.id);
    for (const type of ["timeline", "transport", "nudge"]) this.c.removeEventListener(type, this.run);
    for (const e of this.pending.values()) AudioScheduler.stopNodes(e.nodes);
    this.pending.clear();
  }

  static stopNodes(nodes) {
    for (const node of nodes || []) {
      try {
        node.stop(0);
      } catch {}
      try {
        node.disconnect();
      } catch {}
    }
  }

  _run() {
    const c = this.c;
    const ctx = this.ctx;
    if (!c.audioReady(ctx) || !c.timeline) return;
    const now = ctx.currentTime;
    const stepOf = (pos) => ((pos - c._playFrom) * this.stepsPerBeat) / c.ppqn;
    for (const [pos, e] of this.pending) {
      if (e.when < now - 1) this.pending.delete(pos);
      if (e.when <= now + 0.005) continue;
      const when = c.audioTime(ctx, pos);
      if (!c.isPlayingAt(pos) || Math.abs(when - e.when) > 0.001 || stepOf(pos) !== e.step) {
        AudioScheduler.stopNodes(e.nodes);
        this.pending.delete(pos);
      }
    }
    if (c._playFrom === null) return;
    const lookahead = this.opts.lookahead ?? c.lookahead;
    const ticksPerStep = c.ppqn / this.stepsPerBeat;
    const from = c.countAt(c.serverTimeOfAudio(ctx, now));
    const to = c.countAt(c.serverTimeOfAudio(ctx, now + lookahead));
    let s = Math.max(Math.ceil((from - c._playFrom) / ticksPerStep - 1e-9), 0);
    const last = Math.floor((to - c._playFrom) / ticksPerStep + 1e-9);
    for (let i = 0; s <= last && i < 256; s++, i++) {
      const pos = c._playFrom + s * ticksPerStep;
      if (this.pending.has(pos) || !c.isPlayingAt(pos)) continue;
      const when = c.audioTime(ctx, pos);
      if (when < now) continue;
      const nodes = this.onStep({ step: s, count: pos, time: c.tickTime(pos), when });
      this.pending.set(pos, { step: s, when, nodes: Array.isArray(nodes) ? nodes : [] });
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The client.

function defaultUrl() {
  if (typeof location === "undefined") {
    throw new Error('conductor.js: give the server\'s WebSocket URL, e.g. new Conductor("ws://localhost:3000/ws")');
  }
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  return scheme + location.host + "/ws";
}

export class Conductor extends EventTarget {
  constructor(url, options = {}) {
    super();
    this.url = url ?? defaultUrl();
    this.options = { ...DEFAULTS, ...options };
    this.connection = new Connection(this.url, this.options);
    this.lookahead = this.options.lookahead;
    this.nudge = Number(this.options.nudgeMs) || 0;
    this.clock = new ClockSync(this.options.clock);
    this.hello = null;
    this.timeline = null; // a Timeline: {count, time_us, bpm, ppqn, interval_us, beats_per_bar}
    this.transport = null; // {state, count, time_us}
    this.lastTick = null;
    this.synced = false;
    this._playFrom = null; // tick count where the current (or last) play period began
    this._playUntil = Infinity; // tick count where it ends
    this._pending = new Set();
    this._opened = 0;
    this._audio = new WeakMap();
    this.connection.addEventListener("open", () => this._onOpen());
    this.connection.addEventListener("message", (e) => this._message(e.detail.data, e.detail.arrived));
    this.connection.addEventListener("close", (e) => {
      this.clock.resetPath();
      this._emit("close", e.detail);
    });
    this.connection.addEventListener("refused", (e) => {
      const { code, status, message } = e.detail;
      this._emit("error", { code, status, message });
    });
  }

  // ---- connection ----

  connect() {
    this.connection.options.token = this.options.token;
    this.connection.options.room = this.options.room;
    this.connection.connect();
    return this;
  }

  // Drops the current connection and opens a new one at once (e.g. after changing the token).
  reconnect() {
    this.connection.options.token = this.options.token;
    this.connection.options.room = this.options.room;
    this.connection.reconnect();
  }

  close() {
    this.connection.close();
  }

  get connected() {
    return this.connection.connected;
  }

  get ws() {
    return this.connection.ws;
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _onOpen() {
    this._pending.clear();
    this._opened = localNow();
    this._emit("open", {});
    const o = this.options;
    const ping = () => {
      this._ping();
      const fast = localNow() - this._opened < o.fastPingsForMs;
      this.connection.after(fast ? o.fastPingMs : o.pingIntervalMs, ping);
    };
    ping();
  }

  // ---- commands ----

  setBpm(bpm) {
    return this.connection.send("setBpm", Number(bpm));
  }

  start(quantize = "bar") {
    return this.connection.send("start", { quantize });
  }

  stop() {
    return this.connection.send("stop");
  }

  setNudge(ms) {
    const v = Number(ms);
    if (!Number.isFinite(v)) throw new TypeError(`conductor.js: nudge must be a number of ms, not ${ms}`);
    this.nudge = v;
    this._emit("nudge", { nudge: v });
    this._emitSync();
  }

  // ---- incoming ----

  _message(m, arrived) {
    const d = m && m.data;
    switch (m && m.event) {
      case "pong":
        this._pong(d, arrived);
        break;
      case "hello":
        this.connection.resetBackoff();
        this.hello = d;
        if (d.playing === false && !this.transport) this._playFrom = null;
        this._emit("hello", d);
        break;
      case "timeline":
        this._setTimeline(d, true);
        break;
      case "tick":
        this._tick(d, arrived);
        break;
      case "bpmChange": {
        const previous = this.bpm;
        if (this.hello) this.hello.bpm = d;
        this._emit("tempo", { bpm: d, previous });
        break;
      }
      case "transport":
        this._setTransport(d);
        break;
      case "error":
        // An old server that cannot answer pings says so once; that is not the user's business.
        if (d && d.code === "unknown_event" && this._pending.size && !this.clock.samples.length) {
          this._pending.clear();
          return;
        }
        this._emit("error", d || {});
        break;
    }
  }

  _tick(d, arrived) {
    this.lastTick = d;
    const t = this.timeline;
    const scheduled = d.time_us !== undefined ? d.time_us / 1000 : d.time;
    // Without a server timeline (an older server), or if a tick disagrees with ours by more
    // than a millisecond, anchor the timeline at the tick itself.
    if (!t || Math.abs(this.tickTime(d.count) - scheduled) > 1 || t.bpmAt(d.count) !== d.bpm) {
      const ppqn = d.ppqn || (t && t.ppqn) || (this.hello && this.hello.ppqn) || 4;
      this._setTimeline(
        {
          count: d.count,
          time_us: scheduled * 1000,
          bpm: d.bpm,
          ppqn,
          interval_us: 60e6 / (d.bpm * ppqn),
          beats_per_bar: (t && t.beats_per_bar) || (this.hello && this.hello.beats_per_bar) || 4,
        },
        false,
      );
    }
    this._emit("tick", { ...d, lateMs: arrived + this.mapping.offsetAt(arrived) - scheduled });
  }

  _setTimeline(d, fromServer) {
    const previous = this.timeline;
    this.timeline = fromServer ? new Timeline(d).after(previous) : new Timeline(d);
    if (this.hello) this.hello.bpm = d.bpm;
    if (d.transport) this._setTransport(d.transport, true);
    else if (!this.transport && this._playFrom === null && (!this.hello || this.hello.playing !== false)) {
      this._playFrom = 0; // an older server: always playing, steps counted from tick 0
    }
    if (fromServer || !previous || previous.bpm !== d.bpm) this._emit("timeline", this.timeline);
  }

  _setTransport(tr, quiet = false) {
    const old = this.transport;
    const same = old && old.state === tr.state && old.count === tr.count;
    this.transport = { state: tr.state, count: tr.count, time_us: tr.time_us };
    if (tr.state === "playing") {
      this._playFrom = tr.count;
      this._playUntil = Infinity;
    } else {
      this._playUntil = tr.count;
      if (!old || old.state !== "playing") {
        // We never saw it play: nothing before the stop is ours to play.
        if (this._playFrom === null || this._playFrom > tr.count) this._playFrom = null;
      }
    }
    if (!same || !quiet) this._emit("transport", { ...this.transport, playing: this.playing });
  }

  // ---- clock ----

  _ping() {
    if (!this.connected) return;
    const t0 = localNow();
    this._pending.add(t0);
    if (this._pending.size > 64) this._pending.delete(this._pending.values().next().value);
    this.connection.send("ping", { t0 });
  }

  _pong(d, t3) {
    if (!d || !this._pending.delete(d.t0)) return;
    if (!this.clock.addSample(d.t0, d.t1, d.t2, t3)) return;
    this.synced = true;
    this._emitSync();
  }

  _emitSync() {
    if (!this.synced) return;
    this._emit("sync", {
      offset: this.offset,
      rtt: this.rtt,
      spread: this.spread,
      samples: this.clock.samples.length,
      rate: this.rate,
      errorBound: this.errorBound,
      nudge: this.nudge,
      settled: this.settled,
    });
  }

  // Until the first pong: the same clock as the server's.
  get mapping() {
    return this.clock.mapping || new ClockMapping({ anchor: 0, offset: 0 });
  }

  get offset() {
    return this.mapping.offsetAt(localNow());
  }

  get rtt() {
    return this.clock.mapping ? this.clock.mapping.minRtt : NaN;
  }

  get rate() {
    return this.clock.mapping ? this.clock.mapping.ratePpm : NaN;
  }

  get errorBound() {
    return this.clock.mapping ? this.clock.mapping.errorBound : NaN;
  }

  // Kept for pages written for earlier versions: now the same as errorBound.
  get spread() {
    return this.errorBound;
  }

  get settled() {
    return this.clock.settled;
  }

  // The window's samples (for pages that show how many).
  get _samples() {
    return this.clock.samples;
  }

  serverNow() {
    return this.mapping.toServer(localNow());
  }

  perfTime(serverMs) {
    return this.mapping.toLocal(serverMs) - performance.timeOrigin;
  }

  serverTime(perfMs) {
    return this.mapping.toServer(perfMs + performance.timeOrigin);
  }

  // ---- timeline ----

  get bpm() {
    return this.timeline ? this.timeline.bpm : this.hello ? this.hello.bpm : null;
  }

  get ppqn() {
    return this.timeline ? this.timeline.ppqn : this.hello ? this.hello.ppqn : 4;
  }

  get beatsPerBar() {
    return (this.timeline && this.timeline.beats_per_bar) || (this.hello && this.hello.beats_per_bar) || 4;
  }

  get control() {
    return !!this.hello && this.hello.control !== false;
  }

  get tokenRequired() {
    return !!this.hello && !!this.hello.token_required;
  }
  get room() {
    return this.hello ? this.hello.room || "main" : this.options.room || "main";
  }

  get minBpm() {
    return this.hello ? this.hello.min_bpm : 60;
  }

  get maxBpm() {
    return this.hello ? this.hello.max_bpm : 200;
  }

  get version() {
    return this.hello ? this.hello.version : null;
  }

  tickTime(n) {
    return this.timeline ? this.timeline.tickTime(n) : NaN;
  }

  countAt(serverMs) {
    return this.timeline ? this.timeline.countAt(serverMs) : NaN;
  }

  get count() {
    if (!this.timeline) return this.lastTick ? this.lastTick.count : null;
    return Math.floor(this.countAt(this.serverNow()) + 1e-9);
  }

  isPlayingAt(n) {
    return this._playFrom !== null && n >= this._playFrom && n < this._playUntil;
  }

  // The tick where the transport last started (null if this client never saw it play).
  get startCount() {
    return this._playFrom;
  }

  // The step (0, 1, 2, … from the last start, `stepsPerBeat` to a beat) sounding at a server
  // instant, or null while stopped. The numbering is the one schedule() uses.
  stepAt(serverMs, stepsPerBeat = 4) {
    const n = this.countAt(serverMs);
    if (!Number.isFinite(n) || !this.isPlayingAt(n)) return null;
    return Math.floor(((n - this._playFrom) * stepsPerBeat) / this.ppqn + 1e-9);
  }

  get playing() {
    const n = this.count;
    return n !== null && this.isPlayingAt(n);
  }

  // {bar, beat, step}, 1-based, counted from the tick where the transport last started;
  // `step` is the 16th note within the beat (with ppqn 4; in general the tick within the beat).
  position(n) {
    const from = this._playFrom ?? 0;
    const ppqn = this.ppqn;
    const k = Math.floor(n - from);
    const perBar = ppqn * this.beatsPerBar;
    const mod = (a, b) => ((a % b) + b) % b;
    return {
      bar: Math.floor(k / perBar) + 1,
      beat: Math.floor(mod(k, perBar) / ppqn) + 1,
      step: mod(k, ppqn) + 1,
    };
  }

  // ---- Web Audio ----

  _audioClock(ctx) {
    let clock = this._audio.get(ctx);
    if (!clock) {
      clock = new AudioClock(ctx);
      this._audio.set(ctx, clock);
    }
    return clock;
  }

  // Whether audioTime() can be trusted yet for this context: it is running and its clock has
  // been sampled a few times.
  audioReady(ctx) {
    return this._audioClock(ctx).ready();
  }

  // The AudioContext time at which the server instant `serverMs` must sound on this device
  // (its nudge included).
  audioTimeAt(ctx, serverMs) {
    return (this.perfTime(serverMs) + this.nudge) / 1000 + this._audioClock(ctx).offset();
  }

  audioTime(ctx, n) {
    return this.audioTimeAt(ctx, this.tickTime(n));
  }

  // The server instant whose sound this device plays at AudioContext time `t`.
  serverTimeOfAudio(ctx, t) {
    return this.serverTime((t - this._audioClock(ctx).offset()) * 1000 - this.nudge);
  }

  schedule(ctx, onStep, opts = {}) {
    const s = new AudioScheduler(this, ctx, onStep, opts).start();
    return { stop: () => s.stop() };
  }
}
