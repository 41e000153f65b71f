//! conductor-probe: measures how steady a tick server really is.
//!
//! Opens N WebSocket (or Socket.IO) connections to any tick server, records every tick's
//! arrival with the kernel's receive timestamp, and reports interval jitter, drift, fan-out
//! spread, latency against the server's scheduled time, gaps, reorders and closes.

mod metrics;
mod net;
mod plot;
mod report;
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
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;

use metrics::{Recorder, TickChoice};
use net::{Mode, Shared, Target, ThreadOptions};
use report::{Report, RunInfo, Tally, print_table};

/// Connections one source address can hold before its ephemeral ports run out (with margin).
const PER_SOURCE: usize = 20_000;

/// Measure tick jitter, drift and fan-out of a WebSocket or Socket.IO tick server.
#[derive(Debug, Parser)]
#[command(name = "conductor-probe", version, about)]
struct Cli {
    /// WebSocket URL of a tick server, e.g. ws://127.0.0.1:3000/ws
    #[arg(required_unless_present_any = ["socketio", "merge"])]
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

    /// Adds KEY=VALUE to the query of every connection's URL (the Socket.IO handshake's too),
    /// e.g. --query ticks=none --query room=stage. `ticks=beat|bar|none` also sets what the probe
    /// expects: gaps counted in beats or bars, or no ticks at all
    #[arg(long = "query", value_name = "KEY=VALUE")]
    query: Vec<String>,

    /// Use loopback source addresses from 127.0.0.(1+N) on, so that several probe processes
    /// against one server never share ephemeral ports
    #[arg(long, value_name = "N", default_value_t = 0)]
    source_offset: usize,

    /// Start measuring at this unix time (seconds) once connected, so that several probe
    /// processes measure the same window
    #[arg(long, value_name = "UNIX_SECONDS")]
    measure_at: Option<f64>,

    /// Put the raw histograms, per-count arrivals and per-connection drifts into --json, for
    /// --merge
    #[arg(long)]
    raw: bool,

    /// Add up the --json reports of probe processes run with --raw against one server (one
    /// run split over processes) into one report; with --json and --plot like a run
    #[arg(long, value_name = "FILE", num_args = 1.., conflicts_with_all = ["url", "socketio"])]
    merge: Vec<PathBuf>,

    #[command(flatten)]
    sync: sync::SyncArgs,
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
    let mut path = match mode {
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
    let (extra, ticks) = query_pairs(&cli.query)?;
    if !extra.is_empty() {
        path.push(if path.contains('?') { '&' } else { '?' });
        path.push_str(&extra);
    }
    Ok(Target {
        addr,
        url: format!("ws://{authority}{path}"),
        mode,
        ticks,
    })
}

/// `--query` pairs as a query string (percent-encoded), and the ticks they ask for.
fn query_pairs(pairs: &[String]) -> Result<(String, TickChoice), String> {
    let mut out = Vec::new();
    let mut ticks = TickChoice::All;
    for pair in pairs {
        let (key, value) = pair
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| format!("--query {pair:?}: expected KEY=VALUE, e.g. ticks=none"))?;
        if key == "ticks" {
            ticks = TickChoice::from_query_value(value);
        }
        out.push(format!("{}={}", percent_encode(key), percent_encode(value)));
    }
    Ok((out.join("&"), ticks))
}

/// Encodes everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unix_now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
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
    let wanted = source_count(cli);
    let loopback_v4 = matches!(addr.ip(), IpAddr::V4(ip) if ip.is_loopback());
    (0..cli.clients)
        .map(|i| {
            if loopback_v4 && (wanted > 1 || cli.source_offset > 0) {
                // At most 254, checked in main.
                let n = (cli.source_offset + i % wanted) as u8;
                Some(Ipv4Addr::new(127, 0, 0, 1 + n))
            } else {
                None
            }
        })
        .collect()
}

fn source_count(cli: &Cli) -> usize {
    cli.sources
        .unwrap_or_else(|| cli.clients.div_ceil(PER_SOURCE))
        .max(1)
}

/// `--merge`: reads the reports, adds them up, and writes the result like a run would.
fn merge_files(cli: &Cli) -> Result<ExitCode, String> {
    let mut reports = Vec::new();
    for path in &cli.merge {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let report: Report = serde_json::from_str(&text).map_err(|e| {
            format!(
                "{} is not a probe report ({e}); give the --json files of probes run with --raw",
                path.display()
            )
        })?;
        reports.push(report);
    }
    let raws: Vec<Recorder> = reports
        .iter()
        .filter_map(|r| r.raw.as_ref())
        .map(|raw| Recorder::from_raw(&raw.recorder))
        .collect();
    let merged = report::merge(reports, cli.label.clone(), cli.raw).map_err(|e| e.to_string())?;
    print_table(&merged);
    write_outputs(cli, &merged, || {
        let mut rec = Recorder::default();
        for r in raws {
            rec.merge(r);
        }
        rec
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Writes `--json` and `--plot`; `recorder` gives the distributions to plot.
fn write_outputs(
    cli: &Cli,
    report: &Report,
    recorder: impl FnOnce() -> Recorder,
) -> Result<(), String> {
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if let Some(path) = &cli.plot {
        let rec = recorder();
        let spread = rec.spread();
        let title = format!(
            "{} — {} client{}, {:.0} s",
            report.label.as_deref().unwrap_or(&report.url),
            report.connected,
            if report.connected == 1 { "" } else { "s" },
            report.duration_s
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
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !cli.merge.is_empty() {
        return merge_files(&cli).unwrap_or_else(|e| {
            eprintln!("conductor-probe: {e}");
            ExitCode::FAILURE
        });
    }
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
    if cli.source_offset + source_count(&cli) > 254 {
        eprintln!(
            "conductor-probe: --source-offset {} with {} source addresses goes past 127.0.0.254",
            cli.source_offset,
            source_count(&cli)
        );
        return ExitCode::from(2);
    }
    if cli
        .measure_at
        .is_some_and(|t| !t.is_finite() || (t - unix_now_s()).abs() > 86_400.0)
    {
        eprintln!("conductor-probe: --measure-at must be a unix time within a day of now");
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
    // Several processes measure one window: wait for its start (still answering pings).
    if let Some(at) = cli.measure_at {
        while unix_now_s() < at {
            thread::sleep(Duration::from_secs_f64((at - unix_now_s()).clamp(0.0, 0.2)));
        }
    }

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
        messages,
        pings,
    } = collect(handles)?;

    let drifts: Vec<f64> = tracks.iter().filter_map(|t| t.drift_ns()).collect();
    let info = RunInfo {
        label: cli.label.clone(),
        url: target.url.clone(),
        mode: match target.mode {
            Mode::Plain => "ws",
            Mode::SocketIo => "socketio",
        }
        .to_string(),
        ticks_asked: target.ticks.label().to_string(),
        clients: cli.clients,
        processes: 1,
        measured_s,
        latency_valid: target.addr.ip().is_loopback(),
    };
    let tally = Tally::of_tracks(&tracks, messages, pings);
    let report = report::build(info, &rec, drifts, tally, failures, closes, cli.raw);
    print_table(&report);
    write_outputs(cli, &report, || rec)?;

    if report.connected == 0 {
        let why = report
            .failures
            .iter()
            .max_by_key(|(_, n)| **n)
            .map_or("no reason given".to_string(), |(k, _)| k.clone());
        return Err(format!("no connection to {} succeeded: {why}", target.url));
    }
    // A client that asked for no ticks and got none is what was asked for.
    if report.ticks_total == 0 && target.ticks != TickChoice::None {
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
    messages: u64,
    pings: u64,
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
        messages: 0,
        pings: 0,
    };
    for handle in handles {
        let result = handle
            .join()
            .map_err(|_| "a probe thread panicked".to_string())?
            .map_err(|e| format!("event loop failed: {e}"))?;
        all.rec.merge(result.rec);
        all.tracks.extend(result.tracks);
        all.messages += result.messages;
        all.pings += result.pings;
        for (k, v) in result.failures {
            *all.failures.entry(k).or_insert(0) += v;
        }
        for (k, v) in result.closes {
            *all.closes.entry(k).or_insert(0) += v;
        }
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_pairs_are_encoded_and_ticks_taken_from_them() {
        let q = |v: &[&str]| query_pairs(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(q(&[]).unwrap(), (String::new(), TickChoice::All));
        assert_eq!(
            q(&["ticks=none", "room=main stage/2"]).unwrap(),
            (
                "ticks=none&room=main%20stage%2F2".to_string(),
                TickChoice::None
            )
        );
        assert_eq!(q(&["ticks=beat"]).unwrap().1, TickChoice::Beat);
        assert_eq!(q(&["flag="]).unwrap().0, "flag=");
        assert!(q(&["ticks"]).unwrap_err().contains("KEY=VALUE"));
        assert!(q(&["=x"]).is_err());
    }

    fn cli(args: &[&str]) -> Cli {
        Cli::parse_from(std::iter::once("conductor-probe").chain(args.iter().copied()))
    }

    #[test]
    fn the_query_goes_on_the_websocket_url_and_the_socketio_handshake() {
        let t = target(&cli(&["ws://127.0.0.1:9/ws", "--query", "ticks=bar"])).unwrap();
        assert_eq!(t.url, "ws://127.0.0.1:9/ws?ticks=bar");
        assert_eq!(t.ticks, TickChoice::Bar);
        let t = target(&cli(&["ws://127.0.0.1:9/ws?token=a", "--query", "room=b"])).unwrap();
        assert_eq!(t.url, "ws://127.0.0.1:9/ws?token=a&room=b");
        let t = target(&cli(&[
            "--socketio",
            "http://127.0.0.1:9",
            "--query",
            "ticks=none",
        ]))
        .unwrap();
        assert_eq!(
            t.url,
            "ws://127.0.0.1:9/socket.io/?EIO=4&transport=websocket&ticks=none"
        );
    }

    #[test]
    fn a_source_offset_moves_every_connection_to_its_own_addresses() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let c = cli(&[
            "ws://127.0.0.1:9/ws",
            "--clients",
            "3",
            "--source-offset",
            "2",
        ]);
        let all = sources(&c, addr);
        assert!(all.iter().all(|s| *s == Some(Ipv4Addr::new(127, 0, 0, 3))));
        let c = cli(&["ws://127.0.0.1:9/ws", "--clients", "4", "--sources", "2"]);
        let all = sources(&c, addr);
        assert_eq!(all[0], Some(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(all[1], Some(Ipv4Addr::new(127, 0, 0, 2)));
        let c = cli(&["ws://127.0.0.1:9/ws", "--clients", "4"]);
        assert!(sources(&c, addr).iter().all(Option::is_none));
    }
}
