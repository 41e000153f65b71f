// conductor.js: the browser client for a conductor tempo server. An ES module with no
// dependencies and no build step; the server serves it at /conductor.js.
//
//   import { Conductor } from "/conductor.js";
//   const c = new Conductor();                 // same-origin ws(s)://host/ws
//   c.addEventListener("tick", (e) => console.log(e.detail.count));
//   c.connect();
//
// What it does
//   - Connects, and reconnects after any close with exponential backoff and jitter
//     (250 ms doubling to 10 s), until close() is called.
//   - Estimates the offset between this page's clock and the server's, NTP-style: a burst of
//     pings on connect, a few more after 1 s and 2 s and then every `resyncMs`; of the last
//     `sampleWindow` samples it keeps those whose round trip is close to the shortest (at most
//     a third of them) and takes the median of their offsets.
//   - Keeps the server's timeline (the anchor tick, its instant and the interval), so it knows the
//     instant of any tick, past or future, without waiting for the tick message.
//
// Constructor: new Conductor(url?, options?)
//   url      WebSocket URL; default ws(s)://<this page's host>/ws
//   options  token         control token, sent as ?token= (needed only if the server asks)
//            lookahead     seconds the audio scheduler looks ahead (default 0.1)
//            resyncMs      how often to re-measure the clock offset (default 5000)
//            sampleWindow  clock samples kept (default 30)
//
// Methods
//   connect(), close(), reconnect() (e.g. after setting options.token)
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
//                          audio output latency with ctx.getOutputTimestamp()
//   schedule(ctx, onStep, {stepsPerBeat = 4, lookahead, intervalMs = 25})
//                          runs a lookahead scheduler: every intervalMs it calls
//                          onStep({step, count, time, when}) once for each step that will sound
//                          within `lookahead` seconds while the transport plays. `step` counts
//                          from the last start, `when` is the AudioContext time. onStep may
//                          return the source nodes it started: if a tempo or transport change
//                          (or a better clock estimate) moves that step by more than 1 ms
//                          before it sounds, they are stopped and the step is scheduled again.
//                          Returns {stop()}.
//   audioReady(ctx)        whether ctx runs and its clock has been sampled enough to schedule
//   setBpm(bpm), start(quantize = "bar" | "beat" | "none"), stop()
//
// Properties (read-only)
//   connected, bpm, ppqn, beatsPerBar, count (now, from the timeline), playing, startCount
//   (the tick where the transport last started), offset (ms,
//   server minus local), rtt (ms), spread (ms, disagreement among the best samples), synced,
//   control (may this connection change the tempo), tokenRequired, minBpm, maxBpm, timeline,
//   transport, lastTick, version
//
// Events (CustomEvent; the payload is in event.detail)
//   open, close {code, reason, retryInMs}, hello (hello data), tick (tick data plus `lateMs`:
//   how long after its instant it arrived), tempo {bpm, previous}, transport {state, count,
//   time_us}, timeline (timeline data), sync {offset, rtt, spread, samples},
//   error {code, message} (the server refused something)

const localNow = () => performance.timeOrigin + performance.now();

const DEFAULTS = {
  token: null,
  lookahead: 0.1,
  resyncMs: 5000,
  sampleWindow: 30,
  burst: 6,
  resyncBurst: 3,
  pingSpacingMs: 70,
  minBackoffMs: 250,
  maxBackoffMs: 10000,
};

function defaultUrl() {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  return scheme + location.host + "/ws";
}

function median(sorted) {
  const m = sorted.length >> 1;
  return sorted.length % 2 ? sorted[m] : (sorted[m - 1] + sorted[m]) / 2;
}

export class Conductor extends EventTarget {
  constructor(url = defaultUrl(), options = {}) {
    super();
    this.url = url;
    this.options = { ...DEFAULTS, ...options };
    this.lookahead = this.options.lookahead;
    this.ws = null;
    this.hello = null;
    this.timeline = null; // {count, time_us, bpm, ppqn, interval_us, beats_per_bar}
    this.transport = null; // {state, count, time_us}
    this.lastTick = null;
    this.offset = 0;
    this.rtt = NaN;
    this.spread = NaN;
    this.synced = false;
    this._serverTimeline = false;
    this._playFrom = null; // tick count where the current (or last) play period began
    this._playUntil = Infinity; // tick count where it ends
    this._samples = [];
    this._pending = new Set();
    this._timers = new Set();
    this._attempt = 0;
    this._closed = true;
    this._audio = new WeakMap();
  }

  // ---- connection ----

  connect() {
    this._closed = false;
    this._open();
    return this;
  }

  // Drops the current connection and opens a new one at once (e.g. after changing the token).
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

  get connected() {
    return !!this.ws && this.ws.readyState === WebSocket.OPEN;
  }

  _open() {
    const url = this.options.token
      ? this.url + (this.url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(this.options.token)
      : this.url;
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (err) {
      this._retry(0, String(err));
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      this._pending.clear();
      this._samples = [];
      this._emit("open", {});
      // A page is often busy just after it connects, which delays the answers: measure again
      // after one and two seconds, then every resyncMs.
      this._burst(this.options.burst);
      this._after(1000, () => this._burst(this.options.resyncBurst));
      this._after(2000, () => this._burst(this.options.resyncBurst));
      this._every(this.options.resyncMs, () => this._burst(this.options.resyncBurst));
    };
    ws.onmessage = (e) => this._message(e);
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this._clearTimers();
      this._retry(e.code, e.reason);
    };
  }

  _retry(code, reason) {
    if (this._closed) {
      this._emit("close", { code, reason, retryInMs: null });
      return;
    }
    const o = this.options;
    const ceiling = Math.min(o.maxBackoffMs, o.minBackoffMs * 2 ** this._attempt++);
    const delay = Math.round(ceiling / 2 + Math.random() * ceiling / 2);
    this._emit("close", { code, reason, retryInMs: delay });
    this._after(delay, () => this._open());
  }

  _after(ms, fn) {
    const id = setTimeout(() => {
      this._timers.delete(id);
      fn();
    }, ms);
    this._timers.add(id);
  }

  _every(ms, fn) {
    const id = setInterval(fn, ms);
    this._timers.add(id);
  }

  _clearTimers() {
    for (const id of this._timers) {
      clearTimeout(id);
      clearInterval(id);
    }
    this._timers.clear();
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _send(event, data) {
    if (!this.connected) return false;
    this.ws.send(JSON.stringify(data === undefined ? { event } : { event, data }));
    return true;
  }

  // ---- commands ----

  setBpm(bpm) {
    return this._send("setBpm", Number(bpm));
  }

  start(quantize = "bar") {
    return this._send("start", { quantize });
  }

  stop() {
    return this._send("stop");
  }

  // ---- incoming ----

  _message(e) {
    // The event's own timestamp is when the browser queued it: closer to the arrival than now,
    // if the page was busy.
    const nowPerf = performance.now();
    const arrivedPerf = e.timeStamp > 0 && e.timeStamp <= nowPerf && nowPerf - e.timeStamp < 1000 ? e.timeStamp : nowPerf;
    const arrived = performance.timeOrigin + arrivedPerf;
    let m;
    try {
      m = JSON.parse(e.data);
    } catch {
      return;
    }
    const d = m.data;
    switch (m.event) {
      case "pong":
        this._pong(d, arrived);
        break;
      case "hello":
        this._attempt = 0;
        this.hello = d;
        this._serverTimeline = false;
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
        if (d && d.code === "unknown_event" && this._pending.size && !this._samples.length) {
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
    if (!t || Math.abs(this.tickTime(d.count) - scheduled) > 1 || t.bpm !== d.bpm) {
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
    this._emit("tick", { ...d, lateMs: arrived + this.offset - scheduled });
  }

  _setTimeline(d, fromServer) {
    const previousBpm = this.timeline ? this.timeline.bpm : null;
    this.timeline = {
      count: d.count,
      time_us: d.time_us,
      bpm: d.bpm,
      ppqn: d.ppqn,
      interval_us: d.interval_us || 60e6 / (d.bpm * d.ppqn),
      beats_per_bar: d.beats_per_bar || 4,
    };
    if (fromServer) this._serverTimeline = true;
    if (this.hello) this.hello.bpm = d.bpm;
    if (d.transport) this._setTransport(d.transport, true);
    else if (!this.transport && this._playFrom === null && (!this.hello || this.hello.playing !== false)) {
      this._playFrom = 0; // an older server: always playing, steps counted from tick 0
    }
    if (fromServer || previousBpm !== d.bpm) this._emit("timeline", this.timeline);
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

  _burst(n) {
    let sent = 0;
    const one = () => {
      if (!this.connected) return;
      const t0 = localNow();
      this._pending.add(t0);
      if (this._pending.size > 32) this._pending.delete(this._pending.values().next().value);
      this._send("ping", { t0 });
      if (++sent < n) this._after(this.options.pingSpacingMs, one);
    };
    one();
  }

  _pong(d, t3) {
    if (!d || !this._pending.delete(d.t0)) return;
    const { t0, t1, t2 } = d;
    // Timers are coarsened to 0.1 ms in browsers, so a loopback round trip may come out a hair
    // below zero.
    const rtt = Math.max(0, t3 - t0 - (t2 - t1));
    const offset = (t1 - t0 + (t2 - t3)) / 2;
    if (!(t3 - t0 - (t2 - t1) > -1) || !Number.isFinite(offset)) return;
    this._samples.push({ offset, rtt, at: t3 });
    while (this._samples.length > this.options.sampleWindow) this._samples.shift();
    // A sample's offset is wrong by at most half its round trip, and a delayed answer (a busy
    // page, a queue on the way) shows up as a longer round trip. So: the samples whose round
    // trip is within a little of the shortest, at most the best third, and the median of those.
    const sorted = [...this._samples].sort((a, b) => a.rtt - b.rtt);
    const limit = sorted[0].rtt + Math.max(0.25, sorted[0].rtt / 2);
    const keep = Math.max(1, Math.ceil(sorted.length / 3));
    const best = sorted.filter((x, i) => i < keep && x.rtt <= limit);
    const offsets = best.map((x) => x.offset).sort((a, b) => a - b);
    this.offset = median(offsets);
    this.rtt = median(best.map((x) => x.rtt));
    this.spread = offsets[offsets.length - 1] - offsets[0];
    this.synced = true;
    this._emit("sync", { offset: this.offset, rtt: this.rtt, spread: this.spread, samples: this._samples.length });
  }

  serverNow() {
    return localNow() + this.offset;
  }

  perfTime(serverMs) {
    return serverMs - this.offset - performance.timeOrigin;
  }

  serverTime(perfMs) {
    return perfMs + performance.timeOrigin + this.offset;
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
    const t = this.timeline;
    if (!t) return NaN;
    return (t.time_us + (n - t.count) * t.interval_us) / 1000;
  }

  countAt(serverMs) {
    const t = this.timeline;
    if (!t) return NaN;
    return t.count + (serverMs * 1000 - t.time_us) / t.interval_us;
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

  // The AudioContext's clock minus performance.now()/1000, for the frame being heard now: the
  // median of the last samples of ctx.getOutputTimestamp(), taken at most every 20 ms. Its pairs
  // agree to about 0.1 ms, except the first one or two after the context starts. Where it is
  // missing, ctx.currentTime less the reported output latency stands in (a few ms of jitter).
  _audioClock(ctx) {
    const perfNow = performance.now();
    let st = this._audio.get(ctx);
    if (!st) {
      st = { raw: [], d: NaN, at: -Infinity, exact: false };
      this._audio.set(ctx, st);
      // A suspended context's clock stops: after a resume, start over.
      ctx.addEventListener("statechange", () => {
        st.raw = [];
        st.exact = false;
        st.at = -Infinity;
      });
    }
    if (perfNow - st.at < 20 || ctx.state !== "running") return st.d;
    st.at = perfNow;
    const ts = ctx.getOutputTimestamp ? ctx.getOutputTimestamp() : null;
    const exact = !!ts && ts.contextTime > 0 && ts.performanceTime > 0;
    if (exact && !st.exact) {
      st.raw = [];
      st.exact = true;
    }
    if (exact) st.raw.push(ts.contextTime - ts.performanceTime / 1000);
    else if (!st.exact) st.raw.push(ctx.currentTime - perfNow / 1000 - (ctx.outputLatency || ctx.baseLatency || 0));
    else return st.d;
    if (st.raw.length > 15) st.raw.shift();
    st.d = median([...st.raw].sort((x, y) => x - y));
    return st.d;
  }

  // Whether audioTime() can be trusted yet for this context: it is running and its clock has
  // been sampled a few times.
  audioReady(ctx) {
    this._audioClock(ctx);
    const st = this._audio.get(ctx);
    return ctx.state === "running" && st.raw.length >= (st.exact ? 3 : 8);
  }

  audioTimeAt(ctx, serverMs) {
    return this.perfTime(serverMs) / 1000 + this._audioClock(ctx);
  }

  audioTime(ctx, n) {
    return this.audioTimeAt(ctx, this.tickTime(n));
  }

  // The server instant at which AudioContext time `t` will be heard.
  serverTimeOfAudio(ctx, t) {
    return this.serverTime((t - this._audioClock(ctx)) * 1000);
  }

  schedule(ctx, onStep, opts = {}) {
    const stepsPerBeat = opts.stepsPerBeat || 4;
    const intervalMs = opts.intervalMs || 25;
    const pending = new Map(); // tick position -> {step, when, nodes}
    const stopNodes = (nodes) => {
      for (const node of nodes || []) {
        try {
          node.stop(0);
        } catch {}
        try {
          node.disconnect();
        } catch {}
      }
    };
    const stepOf = (pos) => (pos - this._playFrom) * stepsPerBeat / this.ppqn;
    const run = () => {
      if (!this.audioReady(ctx) || !this.timeline) return;
      const now = ctx.currentTime;
      // Anything not yet sounding that a tempo or transport change, or a better clock estimate,
      // moved by more than a millisecond is taken back and scheduled again below.
      for (const [pos, e] of pending) {
        if (e.when < now - 1) pending.delete(pos);
        if (e.when <= now + 0.005) continue;
        const when = this.audioTime(ctx, pos);
        if (!this.isPlayingAt(pos) || Math.abs(when - e.when) > 0.001 || stepOf(pos) !== e.step) {
          stopNodes(e.nodes);
          pending.delete(pos);
        }
      }
      if (this._playFrom === null) return;
      const lookahead = opts.lookahead ?? this.lookahead;
      const ticksPerStep = this.ppqn / stepsPerBeat;
      const from = this.countAt(this.serverTimeOfAudio(ctx, now));
      const to = this.countAt(this.serverTimeOfAudio(ctx, now + lookahead));
      let s = Math.max(Math.ceil((from - this._playFrom) / ticksPerStep - 1e-9), 0);
      const last = Math.floor((to - this._playFrom) / ticksPerStep + 1e-9);
      for (let i = 0; s <= last && i < 256; s++, i++) {
        const pos = this._playFrom + s * ticksPerStep;
        if (pending.has(pos) || !this.isPlayingAt(pos)) continue;
        const when = this.audioTime(ctx, pos);
        if (when < now) continue;
        const nodes = onStep({ step: s, count: pos, time: this.tickTime(pos), when });
        pending.set(pos, { step: s, when, nodes: Array.isArray(nodes) ? nodes : [] });
      }
    };
    const id = setInterval(run, intervalMs);
    this.addEventListener("timeline", run);
    this.addEventListener("transport", run);
    run();
    return {
      stop: () => {
        clearInterval(id);
        this.removeEventListener("timeline", run);
        this.removeEventListener("transport", run);
        for (const e of pending.values()) stopNodes(e.nodes);
        pending.clear();
      },
    };
  }
}
