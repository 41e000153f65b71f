//! conductor-probe: measures how steady a tick server really is.
//!
//! Opens N WebSocket (or Socket.IO) connections to any tick server, records every tick's
//! arrival with the kernel's receive timestamp, and reports interval jitter, drift, fan-out
//! spread, latency against the server's scheduled time, gaps, reorders and closes.

mod metrics;
mod net;
mod plot;
mod stamped;
mod sync;
mod wire;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use serde::Serialize;

use metrics::{Percentiles, Recorder, median};
use net::{Mode, Shared, Target, ThreadOptions};

/// Connections one source address can hold before its ephemeral ports run out (with margin).
const PER_SOURCE: usize = 20_000;

/// The shortest run whose drift is also reported per minute. A 10 s run's drift is mostly the
/// arrival noise of its first and last tick; six times that is not a rate.
const MIN_RUN_FOR_DRIFT_RATE_S: f64 = 60.0;

/// Drift per minute for a run of `measured_s` seconds, when the run is long enough to say.
fn drift_per_min(drift_us: f64, measured_s: f64) -> Option<f64> {
    (measured_s >= MIN_RUN_FOR_DRIFT_RATE_S).then(|| drift_us * 60.0 / measured_s)
}

/// Measure tick jitter, drift and fan-out of a WebSocket or Socket.IO tick server.
#[derive(Debug, Parser)]
#[command(name = "conductor-probe", version, about)]
struct Cli {
    /// WebSocket URL of a tick server, e.g. ws://127.0.0.1:3000/ws
    #[arg(required_unless_present = "socketio")]
    url: Option<String>,

    /// Speak Socket.IO v4 to this server instead (e.g. http://127.0.0.1:3000)
    #[arg(long, value_name = "URL", conflicts_with = "url")]
    socketio: Option<String>,

    /// Connections to open
    #[arg(long, default_value_t = 1)]
    clients: usize,

    /// Seconds to measure, once every connection is up
    #[arg(long, default_value_t = 10.0)]
    duration: f64,

    /// Write the results as JSON to this file
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// Draw the jitter, spread and latency distributions to this SVG file
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,

    /// Probe threads, each with its own event loop and share of the connections
    #[arg(long, default_value_t = 1)]
    threads: usize,

    /// Connections being set up at once
    #[arg(long, default_value_t = 256)]
    connect_batch: usize,

    /// Seconds a connection may take to connect and finish its handshake
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,

    /// Loopback source addresses to spread connections over (default: one per 20,000)
    #[arg(long)]
    sources: Option<usize>,

    /// Label for this run in the report (e.g. the server's name)
    #[arg(long)]
    label: Option<String>,

    #[command(flatten)]
    sync: sync::SyncArgs,
}

/// The JSON report.
#[derive(Debug, Serialize)]
struct Report {
    label: Option<String>,
    url: String,
    mode: &'static str,
    clients: usize,
    connected: usize,
    duration_s: f64,
    ticks_total: u64,
    ticks_min: u64,
    ticks_max: u64,
    gaps: u64,
    reorders: u64,
    interval_jitter_us: Percentiles,
    spread_us: Percentiles,
    latency_us: Percentiles,
    /// Latency compares the probe's clock with the server's: meaningful on one host.
    latency_valid: bool,
    latency_early: u64,
    /// Median over connections of (last arrival − first arrival − ideal elapsed time) over the
    /// whole run, µs.
    drift_us: f64,
    drift_us_max_abs: f64,
    /// Drift per minute, µs: only for runs of [`MIN_RUN_FOR_DRIFT_RATE_S`] or more (`null`
    /// otherwise), since scaling a short run's drift up multiplies its noise into a rate.
    drift_us_per_min: Option<f64>,
    failures: BTreeMap<String, u64>,
    closes: BTreeMap<String, u64>,
}

/// Parses the URL into what the connections need. Errors are one line for the user.
fn target(cli: &Cli) -> Result<Target, String> {
    let (raw, mode) = match (&cli.url, &cli.socketio) {
        (_, Some(url)) => (url.as_str(), Mode::SocketIo),
        (Some(url), None) => (url.as_str(), Mode::Plain),
        (None, None) => return Err("give a ws:// URL or --socketio URL".into()),
    };
    let (scheme, rest) = raw
        .split_once("://")
        .ok_or_else(|| format!("{raw:?} is not a URL; expected ws://HOST:PORT/PATH"))?;
    match (scheme, mode) {
        ("ws", _) | ("http", Mode::SocketIo) => {}
        ("wss" | "https", _) => {
            return Err(format!(
                "{raw}: TLS is not supported; probe the server over ws://"
            ));
        }
        _ => {
            return Err(format!(
                "{raw}: unsupported scheme {scheme:?}; expected ws://"
            ));
        }
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("{raw}: no host"));
    }
    let host_port = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = host_port
        .to_socket_addrs()
        .map_err(|e| format!("{raw}: cannot resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{raw}: {authority} has no address"))?;
    let path = match mode {
        Mode::Plain => path.to_string(),
        Mode::SocketIo => {
            let base = path.trim_end_matches('/');
            let base = if base.is_empty() || base == "/socket.io" {
                "/socket.io"
            } else {
                base
            };
            format!("{base}/?EIO=4&transport=websocket")
        }
    };
    Ok(Target {
        addr,
        url: format!("ws://{authority}{path}"),
        mode,
    })
}

/// Raises the soft open-files limit to the hard one: each connection is a descriptor.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The source address of each connection: the kernel's choice, or several loopback addresses
/// when one would run out of ports.
fn sources(cli: &Cli, addr: SocketAddr) -> Vec<Option<Ipv4Addr>> {
    let wanted = cli
        .sources
        .unwrap_or_else(|| cli.clients.div_ceil(PER_SOURCE));
    let loopback_v4 = matches!(addr.ip(), IpAddr::V4(ip) if ip.is_loopback());
    (0..cli.clients)
        .map(|i| {
            if loopback_v4 && wanted > 1 {
                let n = (i % wanted) as u8;
                Some(Ipv4Addr::new(127, 0, 0, 1 + n))
            } else {
                None
            }
        })
        .collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.sync.sync {
        let url = cli.url.as_deref().unwrap_or_default();
        return sync::run(
            &cli.sync,
            url,
            cli.clients,
            cli.duration,
            cli.json.as_ref(),
            cli.label.as_deref(),
        )
        .unwrap_or_else(|e| {
            eprintln!("conductor-probe: {e}");
            ExitCode::FAILURE
        });
    }
    let target = match target(&cli) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("conductor-probe: {e}");
            return ExitCode::from(2);
        }
    };
    let seconds_ok = |v: f64| v.is_finite() && v > 0.0 && v <= 86_400.0;
    if cli.clients == 0 || cli.threads == 0 || !seconds_ok(cli.duration) || !seconds_ok(cli.timeout)
    {
        eprintln!(
            "conductor-probe: --clients and --threads must be positive, --duration and --timeout \
             between 0 and 86400 seconds"
        );
        return ExitCode::from(2);
    }
    if cli.sources.is_some_and(|n| !(1..=254).contains(&n)) {
        eprintln!("conductor-probe: --sources must be 1 to 254 (127.0.0.1 .. 127.0.0.254)");
        return ExitCode::from(2);
    }
    raise_fd_limit();
    match run(&cli, target) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("conductor-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli, target: Target) -> Result<ExitCode, String> {
    let threads = cli.threads.min(cli.clients);
    let shared = Arc::new(Shared {
        gauges: (0..threads).map(|_| Default::default()).collect(),
        ..Default::default()
    });
    let opts = ThreadOptions {
        connect_batch: cli.connect_batch.max(1),
        handshake_timeout: Duration::from_secs_f64(cli.timeout.max(0.1)),
    };
    let all_sources = sources(cli, target.addr);
    let mut handles = Vec::new();
    for t in 0..threads {
        let mine: Vec<_> = all_sources
            .iter()
            .skip(t)
            .step_by(threads)
            .copied()
            .collect();
        let (target, shared) = (target.clone(), Arc::clone(&shared));
        let handle = thread::Builder::new()
            .name(format!("probe-{t}"))
            .spawn(move || net::run_thread(&target, mine, &shared, t, opts))
            .map_err(|e| format!("cannot start a probe thread: {e}"))?;
        handles.push(handle);
    }

    let tty = std::io::stderr().is_terminal();
    let sum = |f: fn(&net::Gauges) -> u64| shared.gauges.iter().map(f).sum::<u64>();
    let counts = || {
        (
            sum(|g| g.connected.load(Ordering::Relaxed)),
            sum(|g| g.failed.load(Ordering::Relaxed)),
        )
    };
    let progress = |phase: &str| {
        let (connected, failed) = counts();
        let ticks = sum(|g| g.ticks.load(Ordering::Relaxed));
        let p99 = shared
            .gauges
            .iter()
            .map(|g| g.p99_ns.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        let line = format!(
            "{phase}: {connected}/{} connected, {failed} failed, {ticks} ticks, jitter p99 {:.1} µs",
            cli.clients,
            p99 as f64 / 1000.0
        );
        if tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
        let _ = std::io::stderr().flush();
    };
    let every = Duration::from_millis(if tty { 200 } else { 1000 });

    // Connect phase: until everyone is up or has failed, or the ramp runs out of time. Checked
    // often, so that a refused connection ends the run at once; reported at the usual pace.
    let ramp_limit = Duration::from_secs_f64(cli.timeout.max(1.0) + cli.clients as f64 / 500.0);
    let ramp_start = Instant::now();
    let mut reported = ramp_start;
    loop {
        thread::sleep(Duration::from_millis(20));
        let (connected, failed) = counts();
        let settled = connected as usize + failed as usize >= cli.clients;
        if settled || ramp_start.elapsed() > ramp_limit {
            break;
        }
        if reported.elapsed() >= every {
            progress("connecting");
            reported = Instant::now();
        }
    }
    // Nobody to measure: say why now, rather than after the whole duration and a table of
    // zeros.
    if counts().0 == 0 {
        shared.stop.store(true, Ordering::Relaxed);
        if tty {
            eprint!("\r\x1b[2K");
        }
        let collected = collect(handles)?;
        let why = collected
            .failures
            .iter()
            .max_by_key(|(_, n)| **n)
            .map_or("no reason given".to_string(), |(k, _)| k.clone());
        return Err(format!(
            "no connection to {} succeeded: {why}{}",
            target.url,
            if why.contains("refused") {
                " (is the server running, on that port?)"
            } else {
                ""
            }
        ));
    }
    progress("connecting");

    // Measure.
    shared.measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let length = Duration::from_secs_f64(cli.duration);
    while started.elapsed() < length {
        let left = length.saturating_sub(started.elapsed());
        thread::sleep(left.min(every));
        progress("measuring");
    }
    shared.measuring.store(false, Ordering::Relaxed);
    let measured_s = started.elapsed().as_secs_f64();
    shared.stop.store(true, Ordering::Relaxed);
    if tty {
        eprintln!();
    }

    let Collected {
        rec,
        tracks,
        failures,
        closes,
    } = collect(handles)?;

    let mut drifts: Vec<f64> = tracks.iter().filter_map(|t| t.drift_ns()).collect();
    let drift_us_max_abs = drifts.iter().fold(0.0f64, |m, d| m.max(d.abs())) / 1000.0;
    let drift_us = median(&mut drifts) / 1000.0;
    let ticks: Vec<u64> = tracks.iter().map(|t| t.ticks).collect();
    let spread = rec.spread();
    let report = Report {
        label: cli.label.clone(),
        url: target.url.clone(),
        mode: match target.mode {
            Mode::Plain => "ws",
            Mode::SocketIo => "socketio",
        },
        clients: cli.clients,
        connected: tracks.len(),
        duration_s: (measured_s * 1000.0).round() / 1000.0,
        ticks_total: ticks.iter().sum(),
        ticks_min: ticks.iter().copied().min().unwrap_or(0),
        ticks_max: ticks.iter().copied().max().unwrap_or(0),
        gaps: tracks.iter().map(|t| t.gaps).sum(),
        reorders: tracks.iter().map(|t| t.reorders).sum(),
        interval_jitter_us: Percentiles::of(&rec.jitter),
        spread_us: Percentiles::of(&spread),
        latency_us: Percentiles::of(&rec.latency),
        latency_valid: target.addr.ip().is_loopback(),
        latency_early: rec.early,
        drift_us,
        drift_us_max_abs,
        drift_us_per_min: drift_per_min(drift_us, measured_s),
        failures,
        closes,
    };
    print_table(&report);
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if let Some(path) = &cli.plot {
        let title = format!(
            "{} — {} client{}, {:.0} s",
            cli.label.as_deref().unwrap_or(&target.url),
            report.connected,
            if report.connected == 1 { "" } else { "s" },
            measured_s
        );
        let mut lines = vec![
            ("interval jitter", &rec.jitter),
            ("fan-out spread", &spread),
        ];
        if report.latency_valid {
            lines.push(("latency", &rec.latency));
        }
        plot::percentile_plot(path, &title, &lines)?;
    }

    if report.connected == 0 {
        let why = report
            .failures
            .iter()
            .max_by_key(|(_, n)| **n)
            .map_or("no reason given".to_string(), |(k, _)| k.clone());
        return Err(format!("no connection to {} succeeded: {why}", target.url));
    }
    if report.ticks_total == 0 {
        return Err(format!(
            "connected to {}, but no tick messages arrived in {:.0} s: is this a tick server{}?",
            target.url,
            measured_s,
            if target.mode == Mode::Plain {
                " (or a Socket.IO one: try --socketio)"
            } else {
                ""
            }
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// What every probe thread measured, merged.
struct Collected {
    rec: Recorder,
    tracks: Vec<metrics::ConnTrack>,
    failures: BTreeMap<String, u64>,
    closes: BTreeMap<String, u64>,
}

/// Waits for the probe threads (told to stop) and merges their results.
fn collect(
    handles: Vec<thread::JoinHandle<std::io::Result<net::ThreadResult>>>,
) -> Result<Collected, String> {
    let mut all = Collected {
        rec: Recorder::default(),
        tracks: Vec::new(),
        failures: BTreeMap::new(),
        closes: BTreeMap::new(),
    };
    for handle in handles {
        let result = handle
            .join()
            .map_err(|_| "a probe thread panicked".to_string())?
            .map_err(|e| format!("event loop failed: {e}"))?;
        all.rec.merge(result.rec);
        all.tracks.extend(result.tracks);
        for (k, v) in result.failures {
            *all.failures.entry(k).or_insert(0) += v;
        }
        for (k, v) in result.closes {
            *all.closes.entry(k).or_insert(0) += v;
        }
    }
    Ok(all)
}

fn print_table(r: &Report) {
    let row = |name: &str, p: &Percentiles| {
        println!(
            "  {name:<16} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            p.p50, p.p99, p.p999, p.max
        );
    };
    println!("{} ({}), {} s", r.url, r.mode, r.duration_s);
    println!(
        "  clients {} connected {}  ticks/conn {}..{}  gaps {}  reorders {}",
        r.clients, r.connected, r.ticks_min, r.ticks_max, r.gaps, r.reorders
    );
    println!(
        "  {:<16} {:>10} {:>10} {:>10} {:>10}",
        "µs", "p50", "p99", "p99.9", "max"
    );
    row("interval jitter", &r.interval_jitter_us);
    row("fan-out spread", &r.spread_us);
    row("latency", &r.latency_us);
    let rate = r
        .drift_us_per_min
        .map_or(String::new(), |per_min| format!("; {per_min:.1} µs/min"));
    println!(
        "  drift {:.1} µs over the {} s run (median over connections{rate}; worst {:.1} µs)",
        r.drift_us, r.duration_s, r.drift_us_max_abs
    );
    if r.latency_valid {
        println!("  latency: probe and server share this host's clock, so it is valid");
    } else {
        println!(
            "  latency: compares two hosts' clocks; valid only as far as they are synchronised"
        );
    }
    for (k, v) in &r.failures {
        println!("  failed: {v} × {k}");
    }
    for (k, v) in &r.closes {
        println!("  closed by server: {v} × {k}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_is_a_rate_only_for_runs_of_a_minute_or_more() {
        // A 10 s run's drift is not scaled up six times into a rate.
        assert_eq!(drift_per_min(-75.0, 10.0), None);
        assert_eq!(drift_per_min(-75.0, 59.9), None);
        assert_eq!(drift_per_min(-75.0, 60.0), Some(-75.0));
        assert_eq!(drift_per_min(-9.9, 600.0), Some(-0.99));
    }
}
