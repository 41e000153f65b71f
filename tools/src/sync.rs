//! `conductor-probe --sync`: what clients would *hear*, not when ticks arrive.
//!
//! This module owns the sync measurement. N native clients per path (the `conductor-sync`
//! follower, each on an emulated clock that is off by seconds and skewed by up to ±200 ppm)
//! plan every tick they would play, ahead by a lookahead, as `conductor.js` does; beside them,
//! clients with the predecessor's strategy play each tick when it arrives plus a fixed
//! lookahead. All run on this host, so the truth is known: a plain client straight to the
//! server records every tick's scheduled instant, and each planned local instant converts back
//! to this host's clock through the emulated clock's own relation.
//!
//! Reported per path and strategy: the error of each played step against its tick's scheduled
//! instant, the spread of one step across clients (per path, between paths, over all), the time
//! from connecting to being within 1 ms for good, and glitches: a planned step that moved by
//! more than 1 ms or was taken back, a step the server played that a client did not, one it
//! played that the server did not. Tempo and transport changes (`--at`) are reported each with
//! how long before its first tick every client heard of it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use conductor_sync::{
    EmulatedClock, Follower, FollowerConfig, LocalClock, Quantize, RealClock, SyncReader, Timeline,
    TransportState,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use serde_json::Value;

use crate::stamped::{StampedClient, unix_now_ns};

/// A planned step that moves by more than this before it sounds is a glitch (as in
/// `conductor.js`, which takes it back and schedules it again).
const MOVE_TOLERANCE_NS: i64 = 1_000_000;

/// The `--sync` options (the probe's `--clients`, `--duration`, `--json` and `--label` apply).
#[derive(Debug, Default, clap::Args)]
pub struct SyncArgs {
    /// Measure clock sync and planned play times (docs/protocol.md#clock-sync) instead of tick
    /// arrivals. The URL is the server itself: a plain client there records the truth, and
    /// `--at` changes are sent there
    #[arg(long)]
    pub sync: bool,

    /// A path to the same server, NAME=ws://HOST:PORT/ws (e.g. through conductor-netem);
    /// repeat for more. --clients native clients go through each. Without any, they go direct
    #[arg(long = "via", value_name = "NAME=URL", requires = "sync")]
    pub via: Vec<String>,

    /// Clients with the predecessor's strategy (play each tick on arrival + a fixed
    /// lookahead) on each path
    #[arg(long, default_value_t = 1, requires = "sync")]
    pub predecessor_clients: usize,

    /// Emulated clocks are off by up to ± this many seconds (uniform)
    #[arg(long, default_value_t = 5.0, requires = "sync")]
    pub clock_offset_s: f64,

    /// Emulated clocks run fast or slow by up to ± this many ppm (uniform)
    #[arg(long, default_value_t = 200.0, requires = "sync")]
    pub clock_skew_ppm: f64,

    /// How far ahead the native clients plan, ms (conductor.js: 100)
    #[arg(long, default_value_t = 100.0, requires = "sync")]
    pub lookahead_ms: f64,

    /// The predecessor's fixed lookahead after arrival, ms
    #[arg(long, default_value_t = 100.0, requires = "sync")]
    pub predecessor_lookahead_ms: f64,

    /// Seconds from the start left out of the error and spread figures (convergence is
    /// measured from the start)
    #[arg(long, default_value_t = 10.0, requires = "sync")]
    pub warmup: f64,

    /// A change to make, SECONDS:ACTION with ACTION bpm=N, stop, start or start=bar|beat|none;
    /// seconds from the start; repeat
    #[arg(long = "at", value_name = "SECONDS:ACTION", requires = "sync")]
    pub at: Vec<String>,

    /// Control token for the `--at` changes
    #[arg(long, requires = "sync")]
    pub token: Option<String>,

    /// Leave this path out of the overall spread (e.g. an asymmetric one); repeat
    #[arg(long = "exclude-from-spread", value_name = "NAME", requires = "sync")]
    pub exclude_from_spread: Vec<String>,

    /// Seed for the emulated clocks
    #[arg(long, default_value_t = 1, requires = "sync")]
    pub seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Action {
    Bpm(f64),
    Stop,
    Start(Quantize),
}

impl Action {
    fn label(&self) -> String {
        match self {
            Action::Bpm(b) => format!("bpm={b}"),
            Action::Stop => "stop".into(),
            Action::Start(q) => format!("start={}", q.label()),
        }
    }
}

fn parse_at(spec: &str) -> Result<(f64, Action), String> {
    let bad =
        || format!("--at {spec:?}: write SECONDS:ACTION, e.g. 20:bpm=140, 30:stop, 33:start=bar");
    let (secs, action) = spec.split_once(':').ok_or_else(bad)?;
    let secs: f64 = secs.trim().parse().map_err(|_| bad())?;
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(bad());
    }
    let action = match action.trim() {
        "stop" => Action::Stop,
        "start" | "start=bar" => Action::Start(Quantize::Bar),
        "start=beat" => Action::Start(Quantize::Beat),
        "start=none" => Action::Start(Quantize::None),
        a => match a.strip_prefix("bpm=").map(str::parse::<f64>) {
            Some(Ok(b)) if b.is_finite() && b > 0.0 => Action::Bpm(b),
            _ => return Err(bad()),
        },
    };
    Ok((secs, action))
}

/// p50 / p99 / max of absolute values, and how many.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Dist {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub n: usize,
}

impl Dist {
    /// Of `values` (ns), in µs, by absolute value.
    fn of_ns(values: impl IntoIterator<Item = i64>) -> Dist {
        let mut v: Vec<f64> = values
            .into_iter()
            .map(|x| x.unsigned_abs() as f64 / 1000.0)
            .collect();
        if v.is_empty() {
            return Dist::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        Dist {
            p50: at(0.5),
            p99: at(0.99),
            max: at(1.0),
            n: v.len(),
        }
    }

    fn ms(&self) -> String {
        if self.n == 0 {
            return "–".into();
        }
        format!(
            "{:.2} / {:.2} / {:.2}",
            self.p50 / 1000.0,
            self.p99 / 1000.0,
            self.max / 1000.0
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
enum GlitchKind {
    /// Planned, then moved by more than 1 ms before it sounded.
    Moved,
    /// Planned, then taken back (the transport stopped before it).
    Dropped,
    /// The server played it; this client did not.
    Missed,
    /// This client played it; the server did not.
    Extra,
}

#[derive(Clone, Copy, Debug)]
struct Glitch {
    kind: GlitchKind,
    count: u64,
    /// When it happened (the decision, or for missed/extra the step's instant), unix ns.
    at_ns: i64,
}

struct Plan {
    local: i64,
}

/// One native client and what it did.
struct Native {
    path: usize,
    clock: EmulatedClock,
    /// Kept for its thread: dropping it disconnects.
    _follower: Follower,
    reader: SyncReader,
    started_ns: i64,
    pending: BTreeMap<u64, Plan>,
    horizon: u64,
    /// (count, true instant it was planned for, unix ns).
    plays: Vec<(u64, i64)>,
    glitches: Vec<Glitch>,
    /// (unix ns, mapping error ns), every 10 ms once synced.
    errors: Vec<(i64, i64)>,
    /// Each new timeline as this client first had it: (unix ns, timeline).
    timelines: Vec<(i64, Timeline)>,
}

impl Native {
    fn truth(&self, local: i64) -> i64 {
        RealClock::unix_at_zero_ns() + self.clock.real_at(local)
    }

    fn step(&mut self, lookahead_ns: i64) {
        let s = self.reader.load();
        let now_local = self.clock.now_ns();
        let now_true = self.truth(now_local);
        if let Some(t) = s.timeline
            && self.timelines.last().is_none_or(|(_, last)| *last != t)
        {
            self.timelines.push((now_true, t));
        }
        let (Some(t), Some(m)) = (s.timeline, s.mapping) else {
            return;
        };
        if self
            .errors
            .last()
            .is_none_or(|(at, _)| now_true - at >= 10_000_000)
        {
            self.errors
                .push((now_true, m.to_server(now_local) - now_true));
        }
        // Steps already planned: still playing, still at the same instant?
        let mut played = Vec::new();
        for (&n, plan) in self.pending.iter_mut() {
            if !t.plays(n) {
                self.glitches.push(Glitch {
                    kind: GlitchKind::Dropped,
                    count: n,
                    at_ns: now_true,
                });
                played.push((n, None));
                continue;
            }
            let local = m.to_local(t.tick_time_ns(n));
            if (local - plan.local).abs() > MOVE_TOLERANCE_NS {
                self.glitches.push(Glitch {
                    kind: GlitchKind::Moved,
                    count: n,
                    at_ns: now_true,
                });
            }
            plan.local = local;
            if local <= now_local {
                played.push((n, Some(local)));
            }
        }
        for (n, local) in played {
            self.pending.remove(&n);
            if let Some(local) = local {
                let at = self.truth(local);
                self.plays.push((n, at));
            }
        }
        // New steps within the lookahead.
        let mut n = self
            .horizon
            .max(t.first_count_at_or_after(m.to_server(now_local)));
        for _ in 0..1000 {
            let local = m.to_local(t.tick_time_ns(n));
            if local > now_local + lookahead_ns {
                break;
            }
            if t.plays(n) {
                self.pending.insert(n, Plan { local });
            }
            n += 1;
        }
        self.horizon = n;
    }
}

/// What the reference client saw: the server's truth.
#[derive(Default)]
struct Truth {
    /// count → scheduled instant, unix ns.
    ticks: BTreeMap<u64, i64>,
    /// Every timeline event, with its arrival (unix ns).
    timelines: Vec<(i64, Timeline)>,
}

/// A plain client's tick arrivals: count → arrival (unix ns).
type Arrivals = BTreeMap<u64, i64>;

fn plain_client(
    url: String,
    stop: Arc<AtomicBool>,
    on_message: impl Fn(&Value, i64) + Send + 'static,
) -> Result<thread::JoinHandle<Result<(), String>>, String> {
    let mut client = StampedClient::connect(&url)?;
    thread::Builder::new()
        .name("probe-plain".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some((text, at)) = client.next()?
                    && let Ok(v) = serde_json::from_str::<Value>(&text)
                {
                    on_message(&v, at);
                }
            }
            Ok(())
        })
        .map_err(|e| e.to_string())
}

fn tick_of(v: &Value) -> Option<(u64, i64)> {
    if v.get("event")? != "tick" {
        return None;
    }
    let d = v.get("data")?;
    let count = d.get("count")?.as_u64()?;
    let us = d
        .get("time_us")
        .and_then(Value::as_i64)
        .or_else(|| d.get("time").and_then(Value::as_i64).map(|ms| ms * 1000))?;
    Some((count, us * 1000))
}

#[derive(Serialize)]
struct StrategyReport {
    clients: usize,
    /// |played − scheduled|, µs.
    error_us: Dist,
    /// The signed median of played − scheduled, µs (the asymmetric path's offset shows here).
    error_median_us: f64,
    /// Per step, the latest − the earliest client on this path, µs.
    spread_us: Dist,
    glitches: BTreeMap<GlitchKind, usize>,
}

#[derive(Serialize)]
struct PathReport {
    name: String,
    url: String,
    native: StrategyReport,
    predecessor: StrategyReport,
    /// Per native client: seconds from connecting until its mapping stays within 1 ms of the
    /// truth (null: never, within the run).
    convergence_s: Vec<Option<f64>>,
    /// Per native client: seconds until it was first within 1 ms.
    first_within_1ms_s: Vec<Option<f64>>,
}

#[derive(Serialize)]
struct PairReport {
    a: String,
    b: String,
    native_spread_us: Dist,
    predecessor_spread_us: Dist,
}

#[derive(Serialize)]
struct ChangePathReport {
    name: String,
    /// How long before the change's first tick each native client had the new timeline, ms
    /// (negative: after); min and max over the path's clients.
    notice_ms_min: Option<f64>,
    notice_ms_max: Option<f64>,
    glitches: BTreeMap<GlitchKind, usize>,
}

#[derive(Serialize)]
struct ChangeReport {
    at_s: f64,
    action: String,
    /// The first tick of the new state, and its scheduled instant relative to the request, ms.
    first_count: Option<u64>,
    lead_ms: Option<f64>,
    /// The new state's first step across the native clients of the paths in the overall
    /// spread (for a stop: none should play it).
    first_step_spread_us: Dist,
    /// Native clients (every path) that played the first step (for a stop: played it anyway).
    first_step_players: usize,
    per_path: Vec<ChangePathReport>,
}

#[derive(Serialize)]
struct GlitchEvent {
    path: String,
    client: usize,
    kind: GlitchKind,
    count: u64,
    /// Seconds from the start.
    at_s: f64,
}

#[derive(Serialize)]
struct ClientReport {
    path: String,
    clock_offset_s: f64,
    clock_skew_ppm: f64,
    estimated_rate_ppm: Option<f64>,
    error_us: Dist,
    convergence_s: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    mode: &'static str,
    label: Option<String>,
    url: String,
    duration_s: f64,
    warmup_s: f64,
    lookahead_ms: f64,
    predecessor_lookahead_ms: f64,
    clients_per_path: usize,
    ticks_seen: usize,
    paths: Vec<PathReport>,
    pairs: Vec<PairReport>,
    /// Over every path but the excluded ones.
    overall_excluding: Vec<String>,
    overall_native_spread_us: Dist,
    overall_predecessor_spread_us: Dist,
    /// The error and spread figures leave out these stretches around changes (seconds from
    /// the start).
    excluded_s: Vec<(f64, f64)>,
    changes: Vec<ChangeReport>,
    clients: Vec<ClientReport>,
    /// Every glitch after the warm-up, in time order (the first 500).
    glitch_events: Vec<GlitchEvent>,
}

/// Per count, the latest − the earliest of `times` (only counts with at least two).
fn spreads<'a>(groups: impl IntoIterator<Item = &'a BTreeMap<u64, i64>>) -> Vec<i64> {
    let mut span: HashMap<u64, (i64, i64, usize)> = HashMap::new();
    for g in groups {
        for (&n, &t) in g {
            let e = span.entry(n).or_insert((t, t, 0));
            e.0 = e.0.min(t);
            e.1 = e.1.max(t);
            e.2 += 1;
        }
    }
    span.values()
        .filter(|(_, _, k)| *k >= 2)
        .map(|(lo, hi, _)| hi - lo)
        .collect()
}

/// The first instant from which every later sample is within 1 ms, seconds after `start`.
fn convergence(errors: &[(i64, i64)], start: i64) -> (Option<f64>, Option<f64>) {
    let within = |e: i64| e.abs() <= 1_000_000;
    let first = errors
        .iter()
        .find(|(_, e)| within(*e))
        .map(|(t, _)| (t - start) as f64 / 1e9);
    let stays = match errors.iter().rposition(|(_, e)| !within(*e)) {
        None => errors.first().map(|(t, _)| (t - start) as f64 / 1e9),
        Some(i) if i + 1 < errors.len() => Some((errors[i + 1].0 - start) as f64 / 1e9),
        Some(_) => None,
    };
    (first, stays)
}

pub fn run(
    args: &SyncArgs,
    url: &str,
    clients: usize,
    duration: f64,
    json: Option<&PathBuf>,
    label: Option<&str>,
) -> Result<ExitCode, String> {
    if !url.starts_with("ws://") {
        return Err(format!("{url}: --sync needs the server's ws:// URL"));
    }
    let actions = args
        .at
        .iter()
        .map(|s| parse_at(s))
        .collect::<Result<Vec<_>, _>>()?;
    let mut paths: Vec<(String, String)> = args
        .via
        .iter()
        .map(|v| {
            v.split_once('=')
                .filter(|(n, u)| !n.is_empty() && u.starts_with("ws://"))
                .map(|(n, u)| (n.to_string(), u.to_string()))
                .ok_or_else(|| format!("--via {v:?}: write NAME=ws://HOST:PORT/ws"))
        })
        .collect::<Result<_, _>>()?;
    if paths.is_empty() {
        paths.push(("direct".into(), url.to_string()));
    }
    if !(args.warmup >= 0.0 && args.warmup < duration) {
        return Err("--warmup must be shorter than --duration".into());
    }
    let lookahead_ns = (args.lookahead_ms * 1e6) as i64;
    let stop = Arc::new(AtomicBool::new(false));
    let start_ns = RealClock::unix_at_zero_ns() + RealClock.now_ns();

    // The truth: a plain client at the server itself.
    let truth = Arc::new(Mutex::new(Truth::default()));
    let reference = {
        let truth = Arc::clone(&truth);
        plain_client(url.to_string(), Arc::clone(&stop), move |v, at| {
            let mut t = truth.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((n, ns)) = tick_of(v) {
                t.ticks.insert(n, ns);
            } else if v.get("event").and_then(Value::as_str) == Some("timeline")
                && let Ok(tl) = Timeline::from_event(v)
            {
                t.timelines.push((at, tl));
            }
        })
        .map_err(|e| format!("cannot connect to the server: {e}"))?
    };
    let control = if actions.is_empty() {
        None
    } else {
        let mut cfg = FollowerConfig::new(url);
        cfg.token = args.token.clone();
        cfg.name = "probe-control".into();
        let f = Follower::start(cfg).map_err(|e| e.to_string())?;
        f.wait_synced(Duration::from_secs(10))
            .map_err(|e| format!("control connection: {e}"))?;
        Some(f)
    };

    // The clients.
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut natives = Vec::new();
    let mut predecessors: Vec<(usize, Arc<Mutex<Arrivals>>)> = Vec::new();
    let mut plain_threads = vec![reference];
    for (i, (name, path_url)) in paths.iter().enumerate() {
        for k in 0..clients {
            let clock = EmulatedClock::new(
                args.clock_offset_s * (2.0 * rng.random::<f64>() - 1.0),
                args.clock_skew_ppm * (2.0 * rng.random::<f64>() - 1.0),
            )
            .map_err(|e| e.to_string())?;
            let mut cfg = FollowerConfig::new(path_url.clone());
            cfg.clock = Arc::new(clock);
            cfg.name = format!("{name}/{k}");
            let started_ns = RealClock::unix_at_zero_ns() + RealClock.now_ns();
            let follower = Follower::start(cfg).map_err(|e| e.to_string())?;
            natives.push(Native {
                path: i,
                clock,
                reader: follower.reader(),
                _follower: follower,
                started_ns,
                pending: BTreeMap::new(),
                horizon: 0,
                plays: Vec::new(),
                glitches: Vec::new(),
                errors: Vec::new(),
                timelines: Vec::new(),
            });
        }
        for _ in 0..args.predecessor_clients {
            let arrivals = Arc::new(Mutex::new(Arrivals::new()));
            let sink = Arc::clone(&arrivals);
            let h = plain_client(path_url.clone(), Arc::clone(&stop), move |v, at| {
                if let Some((n, _)) = tick_of(v) {
                    sink.lock().unwrap_or_else(|e| e.into_inner()).insert(n, at);
                }
            })
            .map_err(|e| format!("predecessor client via {name}: {e}"))?;
            plain_threads.push(h);
            predecessors.push((i, arrivals));
        }
    }
    eprintln!(
        "sync: {} path{} × {clients} native + {} predecessor client{}, {duration} s",
        paths.len(),
        if paths.len() == 1 { "" } else { "s" },
        args.predecessor_clients,
        if args.predecessor_clients == 1 {
            ""
        } else {
            "s"
        }
    );

    // Measure: every native client's scheduler, about every millisecond.
    let measuring = {
        let stop = Arc::clone(&stop);
        thread::Builder::new()
            .name("probe-sync".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for n in natives.iter_mut() {
                        n.step(lookahead_ns);
                    }
                    thread::sleep(Duration::from_millis(1));
                }
                natives
            })
            .map_err(|e| e.to_string())?
    };

    // The changes, on time.
    let started = Instant::now();
    let mut sent: Vec<(f64, Action, i64)> = Vec::new();
    let mut pending_actions = actions.clone();
    pending_actions.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut next_progress = 5.0;
    loop {
        let elapsed = started.elapsed().as_secs_f64();
        if elapsed >= duration {
            break;
        }
        if let Some(&(at, action)) = pending_actions.first()
            && elapsed >= at
        {
            pending_actions.remove(0);
            if let Some(c) = &control {
                // Before sending: the answer may be back before this thread runs again.
                let sent_ns = unix_now_ns();
                let result = match action {
                    Action::Bpm(b) => c.send_set_bpm(b),
                    Action::Stop => c.send_stop(),
                    Action::Start(q) => c.send_start(q),
                };
                match result {
                    Ok(()) => sent.push((at, action, sent_ns)),
                    Err(e) => eprintln!("sync: {} at {at} s not sent: {e}", action.label()),
                }
            }
            continue;
        }
        if elapsed >= next_progress {
            eprintln!("sync: {elapsed:.0} s");
            next_progress += 5.0;
        }
        let next = pending_actions
            .first()
            .map_or(duration, |a| a.0)
            .min(duration)
            .min(next_progress);
        thread::sleep(Duration::from_secs_f64((next - elapsed).clamp(0.001, 0.25)));
    }
    stop.store(true, Ordering::Relaxed);
    let natives = measuring
        .join()
        .map_err(|_| "the measuring thread panicked".to_string())?;
    for h in plain_threads {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("sync: a plain client ended early: {e}"),
            Err(_) => return Err("a plain client thread panicked".into()),
        }
    }
    if let Some(c) = &control
        && let Some(e) = c.last_server_error()
    {
        eprintln!(
            "sync: the server refused a change: {} ({})",
            e.message, e.code
        );
    }
    let truth = std::mem::take(&mut *truth.lock().unwrap_or_else(|e| e.into_inner()));
    let report = analyse(
        args,
        url,
        label,
        duration,
        &paths,
        &natives,
        &predecessors,
        &truth,
        &sent,
        start_ns,
    );
    print_report(&report);
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    drop(natives);
    if report.ticks_seen == 0 {
        return Err(format!(
            "no ticks from {url} in {duration} s: is it a conductor server?"
        ));
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn analyse(
    args: &SyncArgs,
    url: &str,
    label: Option<&str>,
    duration: f64,
    paths: &[(String, String)],
    natives: &[Native],
    predecessors: &[(usize, Arc<Mutex<Arrivals>>)],
    truth: &Truth,
    sent: &[(f64, Action, i64)],
    start_ns: i64,
) -> Report {
    let from_ns = start_ns + (args.warmup * 1e9) as i64;
    // Around each change the steps are the change's business (reported with it); the
    // steady-state figures leave them out: from a lookahead before the request to half a
    // second after the change's first tick.
    let lookahead_ns = (args.lookahead_ms * 1e6) as i64;
    let excluded: Vec<(i64, i64)> = sent
        .iter()
        .map(|&(_, action, sent_ns)| {
            let first = carried_by(truth, action, sent_ns)
                .map(|tl| match action {
                    Action::Bpm(_) => tl.tick_time_ns(tl.anchor_count()),
                    _ => tl.transport_time_ns(),
                })
                .unwrap_or(sent_ns);
            (sent_ns - lookahead_ns, first.max(sent_ns) + 500_000_000)
        })
        .collect();
    let steady = |t: i64| t >= from_ns && !excluded.iter().any(|&(a, b)| t >= a && t <= b);
    let in_window = |t: i64| t >= from_ns;
    let pred_ns = (args.predecessor_lookahead_ms * 1e6) as i64;
    // Plays as count → true instant, per client, inside the measured window; the predecessor's
    // at arrival + its lookahead, less that lookahead to compare with the scheduled instant.
    let native_plays: Vec<BTreeMap<u64, i64>> = natives
        .iter()
        .map(|n| {
            n.plays
                .iter()
                .filter(|(_, t)| steady(*t))
                .copied()
                .collect()
        })
        .collect();
    let pred_plays: Vec<(usize, BTreeMap<u64, i64>)> = predecessors
        .iter()
        .map(|(p, a)| {
            let a = a.lock().unwrap_or_else(|e| e.into_inner());
            let plays = a
                .iter()
                .filter(|(_, t)| steady(**t + pred_ns))
                .map(|(n, t)| (*n, *t))
                .collect();
            (*p, plays)
        })
        .collect();
    let errors = |plays: &BTreeMap<u64, i64>| -> Vec<i64> {
        plays
            .iter()
            .filter_map(|(n, t)| truth.ticks.get(n).map(|s| t - s))
            .collect()
    };
    // Missed and extra steps, per native client, against the server's ticks in the window
    // (counts the client could have known: from its first planned step on).
    let mut glitch_lists: Vec<Vec<Glitch>> = natives.iter().map(|n| n.glitches.clone()).collect();
    for (i, n) in natives.iter().enumerate() {
        let Some(&first) = n.plays.first().map(|(c, _)| c) else {
            continue;
        };
        let played: BTreeMap<u64, i64> = n.plays.iter().copied().collect();
        let last_truth = truth.ticks.keys().next_back().copied().unwrap_or(0);
        for (&c, &at) in truth.ticks.range(first..) {
            let measured = in_window(at) && at < start_ns + (duration * 1e9) as i64 - 500_000_000;
            if measured && !played.contains_key(&c) {
                glitch_lists[i].push(Glitch {
                    kind: GlitchKind::Missed,
                    count: c,
                    at_ns: at,
                });
            }
        }
        for (&c, &at) in &played {
            if c <= last_truth && in_window(at) && !truth.ticks.contains_key(&c) {
                glitch_lists[i].push(Glitch {
                    kind: GlitchKind::Extra,
                    count: c,
                    at_ns: at,
                });
            }
        }
    }
    let count_kinds = |gs: &mut dyn Iterator<Item = &Glitch>| {
        let mut m = BTreeMap::new();
        for k in [
            GlitchKind::Moved,
            GlitchKind::Dropped,
            GlitchKind::Missed,
            GlitchKind::Extra,
        ] {
            m.insert(k, 0);
        }
        for g in gs {
            *m.entry(g.kind).or_insert(0) += 1;
        }
        m
    };

    let mut path_reports = Vec::new();
    for (p, (name, purl)) in paths.iter().enumerate() {
        let idx: Vec<usize> = (0..natives.len())
            .filter(|&i| natives[i].path == p)
            .collect();
        let nerr: Vec<i64> = idx.iter().flat_map(|&i| errors(&native_plays[i])).collect();
        let mut signed = nerr.clone();
        signed.sort_unstable();
        let preds: Vec<&BTreeMap<u64, i64>> = pred_plays
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, m)| m)
            .collect();
        let perr: Vec<i64> = preds.iter().flat_map(|m| errors(m)).collect();
        let mut psigned = perr.clone();
        psigned.sort_unstable();
        let conv: Vec<(Option<f64>, Option<f64>)> = idx
            .iter()
            .map(|&i| convergence(&natives[i].errors, natives[i].started_ns))
            .collect();
        path_reports.push(PathReport {
            name: name.clone(),
            url: purl.clone(),
            native: StrategyReport {
                clients: idx.len(),
                error_us: Dist::of_ns(nerr),
                error_median_us: signed
                    .get(signed.len() / 2)
                    .map_or(0.0, |v| *v as f64 / 1e3),
                spread_us: Dist::of_ns(spreads(idx.iter().map(|&i| &native_plays[i]))),
                glitches: count_kinds(&mut idx.iter().flat_map(|&i| glitch_lists[i].iter())),
            },
            predecessor: StrategyReport {
                clients: preds.len(),
                error_us: Dist::of_ns(perr),
                error_median_us: psigned
                    .get(psigned.len() / 2)
                    .map_or(0.0, |v| *v as f64 / 1e3),
                spread_us: Dist::of_ns(spreads(preds.iter().copied())),
                glitches: count_kinds(&mut std::iter::empty()),
            },
            convergence_s: conv.iter().map(|c| c.1).collect(),
            first_within_1ms_s: conv.iter().map(|c| c.0).collect(),
        });
    }

    let natives_of = |p: usize| {
        (0..natives.len())
            .filter(move |&i| natives[i].path == p)
            .map(|i| &native_plays[i])
    };
    let preds_of = |p: usize| {
        pred_plays
            .iter()
            .filter(move |(q, _)| *q == p)
            .map(|(_, m)| m)
    };
    let mut pairs = Vec::new();
    for a in 0..paths.len() {
        for b in a + 1..paths.len() {
            pairs.push(PairReport {
                a: paths[a].0.clone(),
                b: paths[b].0.clone(),
                native_spread_us: Dist::of_ns(spreads(natives_of(a).chain(natives_of(b)))),
                predecessor_spread_us: Dist::of_ns(spreads(preds_of(a).chain(preds_of(b)))),
            });
        }
    }
    let included: Vec<usize> = (0..paths.len())
        .filter(|&p| !args.exclude_from_spread.contains(&paths[p].0))
        .collect();
    let overall_native = Dist::of_ns(spreads(included.iter().flat_map(|&p| natives_of(p))));
    let overall_pred = Dist::of_ns(spreads(included.iter().flat_map(|&p| preds_of(p))));

    // The changes: for each request, the first timeline that carried it.
    let firsts: Vec<u64> = sent
        .iter()
        .filter_map(|&(_, action, sent_ns)| {
            carried_by(truth, action, sent_ns).map(|tl| match action {
                Action::Bpm(_) => tl.anchor_count(),
                _ => tl.transport_count(),
            })
        })
        .collect();
    let mut changes = Vec::new();
    for &(at_s, action, sent_ns) in sent {
        let carried = carried_by(truth, action, sent_ns);
        let first = carried.map(|tl| match action {
            Action::Bpm(_) => tl.anchor_count(),
            _ => tl.transport_count(),
        });
        let first_time = first.and_then(|c| carried.map(|tl| tl.tick_time_ns(c)));
        let same_change = |tl: &Timeline| match (action, first) {
            (Action::Bpm(b), Some(c)) => tl.anchor_count() == c && (tl.bpm() - b).abs() < 1e-6,
            (Action::Stop, Some(c)) => {
                tl.transport_state() == TransportState::Stopped && tl.transport_count() == c
            }
            (Action::Start(_), Some(c)) => {
                tl.transport_state() == TransportState::Playing && tl.transport_count() == c
            }
            _ => false,
        };
        let mut first_plays = BTreeMap::new();
        let mut players = 0;
        let mut per_path = Vec::new();
        for (p, (name, _)) in paths.iter().enumerate() {
            let mut notices = Vec::new();
            for (i, n) in natives.iter().enumerate().filter(|(_, n)| n.path == p) {
                if let (Some(ft), Some((seen, _))) = (
                    first_time,
                    n.timelines
                        .iter()
                        .find(|(t, tl)| *t >= sent_ns - 1_000_000 && same_change(tl)),
                ) {
                    notices.push((ft - seen) as f64 / 1e6);
                }
                if let Some(c) = first
                    && let Some((_, t)) = n.plays.iter().find(|(k, _)| *k == c)
                {
                    players += 1;
                    // The spread leaves out the paths left out of the overall spread.
                    if !args.exclude_from_spread.contains(name) {
                        first_plays.insert(i as u64, *t);
                    }
                }
            }
            // A glitch belongs to the change whose first tick is nearest to it (within 32).
            let near = |g: &&Glitch| {
                first.is_some_and(|c| {
                    let d = g.count.abs_diff(c);
                    d <= 32 && firsts.iter().all(|&o| g.count.abs_diff(o) >= d)
                })
            };
            per_path.push(ChangePathReport {
                name: name.clone(),
                notice_ms_min: notices.iter().copied().reduce(f64::min),
                notice_ms_max: notices.iter().copied().reduce(f64::max),
                glitches: count_kinds(
                    &mut (0..natives.len())
                        .filter(|&i| natives[i].path == p)
                        .flat_map(|i| glitch_lists[i].iter())
                        .filter(near),
                ),
            });
        }
        let spread = if first_plays.len() >= 2 {
            let lo = first_plays.values().min().copied().unwrap_or(0);
            let hi = first_plays.values().max().copied().unwrap_or(0);
            Dist::of_ns([hi - lo])
        } else {
            Dist::default()
        };
        changes.push(ChangeReport {
            at_s,
            action: action.label(),
            first_count: first,
            lead_ms: first_time.map(|t| (t - sent_ns) as f64 / 1e6),
            first_step_spread_us: spread,
            first_step_players: players,
            per_path,
        });
    }

    let clients = natives
        .iter()
        .enumerate()
        .map(|(i, n)| ClientReport {
            path: paths[n.path].0.clone(),
            clock_offset_s: n.clock.offset_ns() as f64 / 1e9,
            clock_skew_ppm: n.clock.skew_ppm(),
            estimated_rate_ppm: n.reader.load().mapping.map(|m| m.rate_ppm()),
            error_us: Dist::of_ns(errors(&native_plays[i])),
            convergence_s: convergence(&n.errors, n.started_ns).1,
        })
        .collect();
    let mut glitch_events: Vec<GlitchEvent> = glitch_lists
        .iter()
        .enumerate()
        .flat_map(|(i, gs)| {
            gs.iter()
                .filter(|g| in_window(g.at_ns))
                .map(move |g| GlitchEvent {
                    path: paths[natives[i].path].0.clone(),
                    client: i,
                    kind: g.kind,
                    count: g.count,
                    at_s: (g.at_ns - start_ns) as f64 / 1e9,
                })
        })
        .collect();
    glitch_events.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    glitch_events.truncate(500);
    Report {
        mode: "sync",
        label: label.map(str::to_string),
        url: url.to_string(),
        duration_s: duration,
        warmup_s: args.warmup,
        lookahead_ms: args.lookahead_ms,
        predecessor_lookahead_ms: args.predecessor_lookahead_ms,
        clients_per_path: natives.iter().filter(|n| n.path == 0).count(),
        ticks_seen: truth.ticks.len(),
        paths: path_reports,
        pairs,
        overall_excluding: args.exclude_from_spread.clone(),
        overall_native_spread_us: overall_native,
        overall_predecessor_spread_us: overall_pred,
        excluded_s: excluded
            .iter()
            .map(|(a, b)| ((a - start_ns) as f64 / 1e9, (b - start_ns) as f64 / 1e9))
            .collect(),
        changes,
        clients,
        glitch_events,
    }
}

/// The first timeline the server sent after `sent_ns` that carries the change `action` asked
/// for: a new anchor at that tempo, or a new transport in that state. None when the server
/// was already there (it then confirms to the sender alone) or refused.
fn carried_by(truth: &Truth, action: Action, sent_ns: i64) -> Option<Timeline> {
    let before = truth
        .timelines
        .iter()
        .rev()
        .find(|(arrived, _)| *arrived < sent_ns)
        .map(|(_, tl)| *tl);
    truth
        .timelines
        .iter()
        .filter(|(arrived, _)| *arrived >= sent_ns)
        .map(|(_, tl)| *tl)
        .find(|tl| {
            let new_anchor = before.is_none_or(|b| b.anchor_count() != tl.anchor_count());
            let new_transport = before.is_none_or(|b| b.transport() != tl.transport());
            match action {
                Action::Bpm(b) => (tl.bpm() - b).abs() < 1e-6 && new_anchor,
                Action::Stop => tl.transport_state() == TransportState::Stopped && new_transport,
                Action::Start(_) => {
                    tl.transport_state() == TransportState::Playing && new_transport
                }
            }
        })
}

fn glitch_text(g: &BTreeMap<GlitchKind, usize>) -> String {
    let get = |k| g.get(&k).copied().unwrap_or(0);
    format!(
        "{}/{}/{}/{}",
        get(GlitchKind::Moved),
        get(GlitchKind::Dropped),
        get(GlitchKind::Missed),
        get(GlitchKind::Extra)
    )
}

fn print_report(r: &Report) {
    println!(
        "{} — sync, {} s ({} s warm-up), lookahead {} ms (predecessor: arrival + {} ms)",
        r.url, r.duration_s, r.warmup_s, r.lookahead_ms, r.predecessor_lookahead_ms
    );
    println!(
        "  {:<18} {:<12} {:>3}  {:<22} {:>10}  {:<22} {:<14} glitches",
        "path",
        "strategy",
        "n",
        "error p50/p99/max ms",
        "median ms",
        "spread p50/p99/max ms",
        "converged s"
    );
    for p in &r.paths {
        let conv: Vec<String> = p
            .convergence_s
            .iter()
            .map(|c| c.map_or("never".into(), |s| format!("{s:.1}")))
            .collect();
        for (strategy, s, conv) in [
            ("timeline", &p.native, conv.join(",")),
            ("predecessor", &p.predecessor, String::new()),
        ] {
            if s.clients == 0 {
                continue;
            }
            println!(
                "  {:<18} {:<12} {:>3}  {:<22} {:>10.2}  {:<22} {:<14} {}",
                p.name,
                strategy,
                s.clients,
                s.error_us.ms(),
                s.error_median_us / 1000.0,
                s.spread_us.ms(),
                conv,
                if strategy == "timeline" {
                    glitch_text(&s.glitches)
                } else {
                    String::new()
                }
            );
        }
    }
    println!("  (glitches: moved/dropped/missed/extra steps)");
    let excl = if r.overall_excluding.is_empty() {
        String::new()
    } else {
        format!(" except {}", r.overall_excluding.join(", "))
    };
    println!(
        "  spread over every path{excl}: timeline {} ms, predecessor {} ms",
        r.overall_native_spread_us.ms(),
        r.overall_predecessor_spread_us.ms()
    );
    for pr in &r.pairs {
        println!(
            "  spread {} ↔ {}: timeline {} ms, predecessor {} ms",
            pr.a,
            pr.b,
            pr.native_spread_us.ms(),
            pr.predecessor_spread_us.ms()
        );
    }
    for c in &r.changes {
        let Some(first) = c.first_count else {
            println!(
                "  at {} s {}: no change (the server was already there, or refused it)",
                c.at_s, c.action
            );
            continue;
        };
        let lead = c.lead_ms.map_or("?".into(), |l| format!("{l:.1}"));
        if c.action == "stop" {
            println!(
                "  at {} s stop: first silent tick {first} ({lead} ms after the request); \
                 played anyway by {} clients",
                c.at_s, c.first_step_players
            );
        } else {
            println!(
                "  at {} s {}: first tick {first} ({lead} ms after the request); \
                 played by {} clients, {} ms apart",
                c.at_s,
                c.action,
                c.first_step_players,
                c.first_step_spread_us.ms()
            );
        }
        for p in &c.per_path {
            println!(
                "      {:<18} heard it {} to {} ms before its first tick; glitches {}",
                p.name,
                p.notice_ms_min.map_or("?".into(), |v| format!("{v:.1}")),
                p.notice_ms_max.map_or("?".into(), |v| format!("{v:.1}")),
                glitch_text(&p.glitches)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_changes() {
        assert_eq!(parse_at("20:bpm=140"), Ok((20.0, Action::Bpm(140.0))));
        assert_eq!(parse_at("1.5:stop"), Ok((1.5, Action::Stop)));
        assert_eq!(
            parse_at("3:start=beat"),
            Ok((3.0, Action::Start(Quantize::Beat)))
        );
        assert_eq!(parse_at("3:start"), Ok((3.0, Action::Start(Quantize::Bar))));
        for bad in [
            "x:stop",
            "3",
            "3:dance",
            "-1:stop",
            "3:bpm=fast",
            "3:bpm=-1",
        ] {
            assert!(
                parse_at(bad).unwrap_err().contains("SECONDS:ACTION"),
                "{bad}"
            );
        }
    }

    #[test]
    fn spreads_and_convergence() {
        let a: BTreeMap<u64, i64> = [(1, 100), (2, 200), (3, 300)].into();
        let b: BTreeMap<u64, i64> = [(1, 150), (2, 190)].into();
        let mut s = spreads([&a, &b]);
        s.sort_unstable();
        assert_eq!(s, vec![10, 50]);
        let errs = [
            (0, 5_000_000),
            (1, 500_000),
            (2, 2_000_000),
            (3, 100),
            (4, 0),
        ];
        assert_eq!(convergence(&errs, 0), (Some(1e-9), Some(3e-9)));
        assert_eq!(convergence(&errs[..3], 0), (Some(1e-9), None));
        let d = Dist::of_ns([-3000, 1000, 2000]);
        assert_eq!((d.p50, d.max, d.n), (2.0, 3.0, 3));
    }
}
