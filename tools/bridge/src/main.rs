//! The `conductor-bridge` binary: flags in, outputs opened, the follower and the emitter
//! started; then this thread watches and reports, one line per change of state.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::error::ErrorKind;
use log::{error, info, warn};

use conductor_bridge::config::{Cli, Config, Target};
use conductor_bridge::emitter::{self, Output, OutputPlan, OutputStats, Plan, Realtime, Sink};
use conductor_bridge::follow::{self, Follow, Report};
use conductor_bridge::midi_out::{self, MidiSink, PortKind, RawDevice};
use conductor_bridge::midi_plan::MidiPlan;
use conductor_bridge::osc_out::OscSink;
use conductor_bridge::osc_plan::OscPlan;

/// Status for settings that cannot work (clap's own convention).
const EXIT_USAGE: u8 = 2;
/// How often the main thread looks at the follower and the outputs.
const WATCH: Duration = Duration::from_millis(100);
/// How long without a first sync before saying so (once).
const NO_SYNC_WARNING: Duration = Duration::from_secs(5);
/// At most one line per output per this long about failed writes or late events.
const REPORT_EVERY: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let (cli, matches) = match Cli::parse_with_order(std::env::args_os()) {
        Ok(parsed) => parsed,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => {
            // clap's message spans several lines; keep the one that says what is wrong (and
            // what it lists, when it ends in a colon: "not provided:\n  <URL>").
            let rendered = e.render().to_string();
            let mut lines = rendered.lines().map(str::trim).filter(|l| !l.is_empty());
            let mut line = lines.next().unwrap_or("invalid arguments").to_string();
            if line.ends_with(':')
                && let Some(next) = lines.next()
            {
                line = format!("{line} {next}");
            }
            eprintln!("conductor-bridge: {line}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if cli.list_midi_ports {
        return match midi_out::list_ports() {
            Ok(ports) => {
                for p in ports {
                    println!("{p}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("conductor-bridge: error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let cfg = match cli.validate(&matches) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("conductor-bridge: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Every output opens before anything connects: a device that cannot work is the user's
    // value, refused at once with one line and status 2 (so nothing is logged before).
    let (outputs, opened) = match open_outputs(&cfg) {
        Ok(opened) => opened,
        Err(line) => {
            eprintln!("conductor-bridge: error: {line}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    for line in opened {
        info!("{line}");
    }
    if cfg.mlock {
        match conductor::rt::lock_memory() {
            Ok(()) => info!("memory locked (mlockall)"),
            Err(e) => info!("memory not locked ({e}); grant CAP_IPC_LOCK to enable"),
        }
    }
    let follow = match Follow::start(&cfg.url, cfg.token.clone()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("conductor-bridge: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(signal, Arc::clone(&stop)) {
            eprintln!("conductor-bridge: error: cannot handle signal {signal}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let watched: Vec<(String, Arc<OutputStats>)> = cfg
        .outputs
        .iter()
        .zip(&outputs)
        .map(|(spec, o)| (spec.target.describe(), Arc::clone(&o.stats)))
        .collect();
    let realtime = Realtime {
        fifo_priority: cfg.rt_priority,
        spin: cfg.spin,
    };
    let (feed, mut relay) = follow.feed();
    let emitter = match emitter::spawn(feed, outputs, realtime, Arc::clone(&stop)) {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("conductor-bridge: error: cannot start the emitter thread: {e}");
            return ExitCode::FAILURE;
        }
    };
    info!("following {}", cfg.url);

    let mut watcher = follow::Watcher::default();
    let mut reports: Vec<OutputReport> = watched.iter().map(|_| OutputReport::default()).collect();
    let started = Instant::now();
    let mut said_waiting = false;
    let mut version = 0;
    let mut status = ExitCode::SUCCESS;
    while !stop.load(Ordering::Relaxed) && !emitter.is_finished() {
        // Each new state as soon as the follower publishes it (a condition variable, not the
        // emitter's business), else every WATCH for the reports.
        match follow.next_state(version, WATCH) {
            Ok(Some(state)) => {
                version = state.version;
                relay.forward(&state);
                for line in watcher.observe(&state) {
                    match line {
                        Report::Info(text) => info!("{text}"),
                        Report::Warn(text) => warn!("{text}"),
                    }
                }
            }
            Ok(None) => relay.flush(),
            Err(why) => {
                error!("the follower stopped: {why}");
                status = ExitCode::FAILURE;
                break;
            }
        }
        if !said_waiting && !follow.state().is_synced() && started.elapsed() > NO_SYNC_WARNING {
            said_waiting = true;
            warn!(
                "no sync with {} after {} s; still trying (is the server up, and is this its \
                 ws:// endpoint?). Outputs stay silent until the first sync",
                cfg.url,
                NO_SYNC_WARNING.as_secs()
            );
        }
        for ((name, stats), report) in watched.iter().zip(&mut reports) {
            report.check(name, stats);
        }
    }
    stop.store(true, Ordering::Relaxed);
    if emitter.join().is_err() {
        eprintln!("conductor-bridge: error: the emitter thread panicked");
        return ExitCode::FAILURE;
    }
    for (name, stats) in &watched {
        info!(
            "{name}: {} sent, {} late (> 1 ms; worst {:.1} ms), {} failed",
            stats.sent.load(Ordering::Relaxed),
            stats.late.load(Ordering::Relaxed),
            stats.max_late_ns.load(Ordering::Relaxed) as f64 / 1e6,
            stats.failed.load(Ordering::Relaxed),
        );
    }
    status
}

/// Opens every output, with a line to log about each, or says which one cannot work and why.
fn open_outputs(cfg: &Config) -> Result<(Vec<Output>, Vec<String>), String> {
    let mut outputs = Vec::new();
    let mut lines = Vec::new();
    for spec in &cfg.outputs {
        let (plan, sink) = match &spec.target {
            Target::MidiDevice(path) => {
                let device = RawDevice::open(path).map_err(|e| e.to_string())?;
                lines.push(format!("{}: raw MIDI", spec.target.describe()));
                (
                    Plan::Midi(MidiPlan::new(cfg.clock_while_stopped)),
                    Sink::Midi(MidiSink::Device(device)),
                )
            }
            Target::MidiPort(name) => {
                let (sink, kind) = midi_out::open_port(name).map_err(|e| e.to_string())?;
                lines.push(match kind {
                    PortKind::Connected(full) => format!("MIDI port {name:?}: connected to {full}"),
                    PortKind::Virtual => format!(
                        "MIDI port {name:?}: no such port, so created a virtual one; connect \
                         it with aconnect 'conductor-bridge:{name}' DEVICE"
                    ),
                });
                (
                    Plan::Midi(MidiPlan::new(cfg.clock_while_stopped)),
                    Sink::Midi(sink),
                )
            }
            Target::Osc { addr, .. } => {
                let sink = OscSink::open(*addr, cfg.osc_ahead.is_some())
                    .map_err(|e| format!("{}: {e}", spec.target.describe()))?;
                lines.push(format!(
                    "{}: {}",
                    spec.target.describe(),
                    match cfg.osc_ahead {
                        Some(ahead) => format!("bundles {} ms ahead", ahead.as_millis()),
                        None => "messages at their instant".into(),
                    }
                ));
                (Plan::Osc(OscPlan::new()), Sink::Osc(Box::new(sink)))
            }
        };
        let ahead = match (&spec.target, cfg.osc_ahead) {
            (Target::Osc { .. }, Some(ahead)) => i64::try_from(ahead.as_nanos()).unwrap_or(0),
            _ => 0,
        };
        outputs.push(Output {
            plan: OutputPlan {
                plan,
                lead_ns: spec.latency_ns + ahead,
                latency_ns: spec.latency_ns,
            },
            sink,
            stats: Arc::new(OutputStats::default()),
        });
    }
    Ok((outputs, lines))
}

/// Turns an output's counters into at most one line per [`REPORT_EVERY`].
#[derive(Default)]
struct OutputReport {
    failed: u64,
    late: u64,
    last: Option<Instant>,
}

impl OutputReport {
    fn check(&mut self, name: &str, stats: &OutputStats) {
        if self.last.is_some_and(|at| at.elapsed() < REPORT_EVERY) {
            return;
        }
        let failed = stats.failed.load(Ordering::Relaxed);
        let late = stats.late.load(Ordering::Relaxed);
        if failed > self.failed {
            let why = match stats.last_error.load(Ordering::Relaxed) {
                -1 => "the device's buffer is full: is anything reading it?".to_string(),
                -2 => "the ALSA sequencer refused the event".to_string(),
                errno => std::io::Error::from_raw_os_error(errno).to_string(),
            };
            warn!("{name}: {} writes failed ({why})", failed - self.failed);
        }
        if late > self.late {
            warn!(
                "{name}: {} events more than 1 ms late (the machine is busy; grant CAP_SYS_NICE \
                 for SCHED_FIFO)",
                late - self.late
            );
        }
        if failed > self.failed || late > self.late {
            self.last = Some(Instant::now());
        }
        self.failed = failed;
        self.late = late;
    }
}
