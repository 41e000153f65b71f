//! The bridge's command line and environment, and their validation.
//!
//! This module owns what the user can set and how settings tie together (which `--latency-ms`
//! belongs to which output). It only parses and checks: it opens no device and connects to
//! nothing. A bad value becomes a [`ConfigError`], printed by `main` as one line before it
//! exits with status 2.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};
use thiserror::Error;

/// Follows a conductor server and drives MIDI clock and OSC from its timeline.
///
/// Outputs: any number of --midi-port, --midi-device and --osc, in any order. A --latency-ms
/// right after an output nudges that output alone; one before every output (or
/// CONDUCTOR_BRIDGE_LATENCY_MS) nudges all of them.
#[derive(Clone, Debug, Parser)]
#[command(name = "conductor-bridge", version, about, long_about = None)]
pub struct Cli {
    /// The server's WebSocket endpoint, ws://HOST:PORT/ws (a bare ws://HOST:PORT gets /ws).
    #[arg(env = "CONDUCTOR_URL", required_unless_present = "list_midi_ports")]
    pub url: Option<String>,

    /// Control token for servers started with --control-token (sent as ?token=).
    #[arg(long, env = "CONDUCTOR_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// ALSA sequencer port: connects to the existing port of that name or address (e.g.
    /// "MicroFreak", "20:0"); when none exists, creates a virtual port of that name for other
    /// programs to connect to. Repeatable.
    #[arg(
        long = "midi-port",
        value_name = "NAME",
        env = "CONDUCTOR_BRIDGE_MIDI_PORT",
        value_delimiter = ','
    )]
    pub midi_ports: Vec<String>,

    /// Raw MIDI bytes to a device file: /dev/snd/midiC1D0, a USB or serial MIDI adapter, a
    /// pty. Repeatable.
    #[arg(
        long = "midi-device",
        value_name = "PATH",
        env = "CONDUCTOR_BRIDGE_MIDI_DEVICE",
        value_delimiter = ','
    )]
    pub midi_devices: Vec<PathBuf>,

    /// OSC over UDP to HOST:PORT (e.g. 127.0.0.1:57120 for SuperCollider). Repeatable.
    #[arg(
        long = "osc",
        value_name = "HOST:PORT",
        env = "CONDUCTOR_BRIDGE_OSC",
        value_delimiter = ','
    )]
    pub osc: Vec<String>,

    /// Send OSC as bundles with NTP timetags, --osc-ahead-ms before their instant, so the
    /// receiver schedules them to the sample.
    #[arg(long, env = "CONDUCTOR_BRIDGE_OSC_BUNDLES")]
    pub osc_bundles: bool,

    /// How far ahead OSC bundles are sent, in milliseconds.
    #[arg(long, env = "CONDUCTOR_BRIDGE_OSC_AHEAD_MS", default_value_t = 100.0)]
    pub osc_ahead_ms: f64,

    /// Milliseconds the output given just before is triggered early (negative: late), so a
    /// slow device sounds with the rest. Before any output: the default for all.
    #[arg(
        long = "latency-ms",
        value_name = "MS",
        env = "CONDUCTOR_BRIDGE_LATENCY_MS",
        allow_negative_numbers = true
    )]
    pub latency_ms: Vec<f64>,

    /// Send no MIDI clock while the transport is stopped (by default it runs, so devices
    /// show the tempo and tempo-synced effects keep time).
    #[arg(long, env = "CONDUCTOR_BRIDGE_NO_STOPPED_CLOCK")]
    pub no_stopped_clock: bool,

    /// SCHED_FIFO priority for the emitter thread (1-99), or 0 to not ask for one.
    #[arg(long, env = "CONDUCTOR_BRIDGE_RT_PRIORITY", default_value_t = 50)]
    pub rt_priority: i32,

    /// Microseconds before each event that the emitter spins instead of sleeping.
    #[arg(long, env = "CONDUCTOR_BRIDGE_SPIN_US", default_value_t = 2000)]
    pub spin_us: u64,

    /// Do not lock the process's memory (mlockall).
    #[arg(long, env = "CONDUCTOR_BRIDGE_NO_MLOCK")]
    pub no_mlock: bool,

    /// List the ALSA sequencer ports --midi-port can connect to, and exit.
    #[arg(long)]
    pub list_midi_ports: bool,
}

/// Where one output sends.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    MidiPort(String),
    MidiDevice(PathBuf),
    Osc { spec: String, addr: SocketAddr },
}

impl Target {
    /// How logs and errors name it.
    pub fn describe(&self) -> String {
        match self {
            Target::MidiPort(name) => format!("MIDI port {name:?}"),
            Target::MidiDevice(path) => format!("MIDI device {}", path.display()),
            Target::Osc { spec, addr } if spec == &addr.to_string() => format!("OSC {addr}"),
            Target::Osc { spec, addr } => format!("OSC {spec} ({addr})"),
        }
    }
}

/// One output and its nudge.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputSpec {
    pub target: Target,
    /// How much earlier than the beat this output is triggered (negative: later).
    pub latency_ns: i64,
}

/// The validated settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// The endpoint (the follower adds the token as `?token=`).
    pub url: String,
    pub token: Option<String>,
    pub outputs: Vec<OutputSpec>,
    /// How far ahead OSC bundles go out; `None`: plain messages at their instant.
    pub osc_ahead: Option<Duration>,
    pub clock_while_stopped: bool,
    pub rt_priority: i32,
    pub spin: Duration,
    pub mlock: bool,
}

/// A setting that cannot work, with what to do about it.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("{0:?} is not a conductor endpoint; give ws://HOST:PORT/ws")]
    BadUrl(String),
    #[error("wss:// is not supported; run the bridge where it reaches the server's ws:// port")]
    TlsUrl,
    #[error("no outputs; give at least one --midi-port, --midi-device or --osc")]
    NoOutputs,
    #[error("--osc {0:?} is not HOST:PORT (e.g. 127.0.0.1:57120)")]
    BadOsc(String),
    #[error("--osc {0:?}: {1}")]
    UnresolvedOsc(String, String),
    #[error("--midi-port must be a non-empty name or client:port address")]
    BadMidiPort,
    #[error("--midi-device must be a path, e.g. /dev/snd/midiC1D0")]
    BadMidiDevice,
    #[error("--latency-ms {0} is out of range; use -1000 to 1000")]
    BadLatency(String),
    #[error("--latency-ms is given twice for {0}")]
    LatencyTwice(String),
    #[error("--osc-ahead-ms {0} is out of range; use 1 to 10000")]
    BadAhead(String),
    #[error("--token must be 1 to 256 visible ASCII characters")]
    BadToken,
    #[error("--rt-priority {0} is out of range; use 0 (off) or 1 to 99")]
    BadPriority(i32),
    #[error("--spin-us {0} is out of range; use 0 to 10000")]
    BadSpin(u64),
}

impl Cli {
    /// Parses the process's arguments and environment, keeping the matches so the order of
    /// outputs and latencies can be read. Clap's own errors (and --help) come back as such.
    pub fn parse_with_order<I, T>(args: I) -> Result<(Cli, ArgMatches), clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Cli::command().try_get_matches_from(args)?;
        let cli = Cli::from_arg_matches(&matches)?;
        Ok((cli, matches))
    }

    /// Checks every setting and ties each latency to its output.
    pub fn validate(&self, matches: &ArgMatches) -> Result<Config, ConfigError> {
        let url = endpoint(self.url.as_deref().unwrap_or_default())?;
        if let Some(token) = &self.token
            && (token.is_empty()
                || token.len() > 256
                || !token.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(ConfigError::BadToken);
        }
        if !(0..=99).contains(&self.rt_priority) {
            return Err(ConfigError::BadPriority(self.rt_priority));
        }
        if self.spin_us > 10_000 {
            return Err(ConfigError::BadSpin(self.spin_us));
        }
        let osc_ahead = if self.osc_bundles {
            if !(self.osc_ahead_ms.is_finite() && (1.0..=10_000.0).contains(&self.osc_ahead_ms)) {
                return Err(ConfigError::BadAhead(self.osc_ahead_ms.to_string()));
            }
            Some(Duration::from_nanos(
                (self.osc_ahead_ms * 1e6).round() as u64
            ))
        } else {
            None
        };

        // Every output with its position on the command line (values from the environment
        // have none and come after everything given as flags).
        let mut outputs: Vec<(usize, Target)> = Vec::new();
        for (i, name) in positions(matches, "midi_ports", &self.midi_ports) {
            if name.trim().is_empty() {
                return Err(ConfigError::BadMidiPort);
            }
            outputs.push((i, Target::MidiPort(name.trim().to_string())));
        }
        for (i, path) in positions(matches, "midi_devices", &self.midi_devices) {
            if path.as_os_str().is_empty() {
                return Err(ConfigError::BadMidiDevice);
            }
            outputs.push((i, Target::MidiDevice(path.clone())));
        }
        for (i, spec) in positions(matches, "osc", &self.osc) {
            outputs.push((i, osc_target(spec)?));
        }
        if outputs.is_empty() {
            return Err(ConfigError::NoOutputs);
        }
        outputs.sort_by_key(|(i, _)| *i);

        let mut default_ns = 0;
        let mut own: Vec<Option<i64>> = vec![None; outputs.len()];
        let from_env = matches.value_source("latency_ms") == Some(ValueSource::EnvVariable);
        for (i, ms) in positions(matches, "latency_ms", &self.latency_ms) {
            if !(ms.is_finite() && (-1000.0..=1000.0).contains(ms)) {
                return Err(ConfigError::BadLatency(ms.to_string()));
            }
            let ns = (ms * 1e6).round() as i64;
            // The output given last before this flag.
            match outputs.iter().rposition(|(at, _)| *at < i) {
                Some(k) if !from_env => {
                    if own[k].replace(ns).is_some() {
                        return Err(ConfigError::LatencyTwice(outputs[k].1.describe()));
                    }
                }
                _ => default_ns = ns,
            }
        }
        let outputs = outputs
            .into_iter()
            .zip(own)
            .map(|((_, target), own)| OutputSpec {
                target,
                latency_ns: own.unwrap_or(default_ns),
            })
            .collect();

        Ok(Config {
            url,
            token: self.token.clone(),
            outputs,
            osc_ahead,
            clock_while_stopped: !self.no_stopped_clock,
            rt_priority: self.rt_priority,
            spin: Duration::from_micros(self.spin_us),
            mlock: !self.no_mlock,
        })
    }
}

/// Each value of a repeatable flag with its index on the command line; values from the
/// environment get indices past the end, in order.
fn positions<'a, T>(matches: &ArgMatches, id: &str, values: &'a [T]) -> Vec<(usize, &'a T)> {
    let indices: Vec<usize> = if matches.value_source(id) == Some(ValueSource::CommandLine) {
        matches
            .indices_of(id)
            .map(|i| i.collect())
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    values
        .iter()
        .enumerate()
        .map(|(k, v)| (indices.get(k).copied().unwrap_or(usize::MAX / 2 + k), v))
        .collect()
}

/// The endpoint as the follower connects to it.
fn endpoint(url: &str) -> Result<String, ConfigError> {
    let url = url.trim();
    if url.starts_with("wss://") {
        return Err(ConfigError::TlsUrl);
    }
    let Some(rest) = url.strip_prefix("ws://") else {
        return Err(ConfigError::BadUrl(url.to_string()));
    };
    let (host, path) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if host.is_empty() || host.contains(char::is_whitespace) || host.contains('@') {
        return Err(ConfigError::BadUrl(url.to_string()));
    }
    Ok(if path.is_empty() || path == "/" {
        format!("ws://{host}/ws")
    } else {
        url.to_string()
    })
}

fn osc_target(spec: &str) -> Result<Target, ConfigError> {
    let spec = spec.trim();
    let valid = spec
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !valid {
        return Err(ConfigError::BadOsc(spec.to_string()));
    }
    let addr = spec
        .to_socket_addrs()
        .map_err(|e| ConfigError::UnresolvedOsc(spec.to_string(), e.to_string()))?
        .next()
        .ok_or_else(|| {
            ConfigError::UnresolvedOsc(spec.to_string(), "no address for that name".into())
        })?;
    Ok(Target::Osc {
        spec: spec.to_string(),
        addr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["conductor-bridge"];
        argv.extend_from_slice(args);
        let (cli, matches) = Cli::parse_with_order(argv).expect("clap parse");
        cli.validate(&matches)
    }

    #[test]
    fn outputs_keep_their_order_and_their_own_latency() {
        let c = parse(&[
            "ws://127.0.0.1:3000/ws",
            "--latency-ms",
            "2",
            "--midi-device",
            "/dev/ptmx",
            "--latency-ms",
            "12.5",
            "--osc",
            "127.0.0.1:57120",
            "--midi-port",
            "Synth",
            "--latency-ms=-3",
        ])
        .unwrap();
        assert_eq!(c.url, "ws://127.0.0.1:3000/ws");
        let got: Vec<(String, i64)> = c
            .outputs
            .iter()
            .map(|o| (o.target.describe(), o.latency_ns))
            .collect();
        assert_eq!(
            got,
            [
                ("MIDI device /dev/ptmx".to_string(), 12_500_000),
                ("OSC 127.0.0.1:57120".to_string(), 2_000_000),
                ("MIDI port \"Synth\"".to_string(), -3_000_000),
            ]
        );
        assert!(c.clock_while_stopped);
        assert_eq!(c.osc_ahead, None);
    }

    #[test]
    fn a_bare_endpoint_gets_ws_and_the_token_rides_along() {
        let c = parse(&[
            "ws://h:3000",
            "--osc",
            "127.0.0.1:9000",
            "--token",
            "s3cret",
        ])
        .unwrap();
        assert_eq!(c.url, "ws://h:3000/ws");
        assert_eq!(c.token.as_deref(), Some("s3cret"));
        let c = parse(&["ws://h:3000/", "--osc", "127.0.0.1:9000"]).unwrap();
        assert_eq!(c.url, "ws://h:3000/ws");
    }

    #[test]
    fn bad_values_are_refused_with_what_to_do() {
        let osc = ["--osc", "127.0.0.1:9000"];
        let with = |args: &[&str]| {
            let mut all = args.to_vec();
            all.extend_from_slice(&osc);
            parse(&all).unwrap_err()
        };
        assert_eq!(
            with(&["http://h:3000/ws"]),
            ConfigError::BadUrl("http://h:3000/ws".into())
        );
        assert_eq!(with(&["wss://h/ws"]), ConfigError::TlsUrl);
        assert_eq!(
            parse(&["ws://h:3000/ws"]).unwrap_err(),
            ConfigError::NoOutputs
        );
        assert_eq!(
            parse(&["ws://h/ws", "--osc", "57120"]).unwrap_err(),
            ConfigError::BadOsc("57120".into())
        );
        assert_eq!(
            parse(&["ws://h/ws", "--osc", "127.0.0.1:0"]).unwrap_err(),
            ConfigError::BadOsc("127.0.0.1:0".into())
        );
        assert_eq!(
            with(&["ws://h/ws", "--latency-ms", "5000"]),
            ConfigError::BadLatency("5000".into())
        );
        assert_eq!(
            with(&["ws://h/ws", "--latency-ms", "NaN"]),
            ConfigError::BadLatency("NaN".into())
        );
        assert!(matches!(
            parse(&[
                "ws://h/ws",
                "--osc",
                "127.0.0.1:9000",
                "--latency-ms",
                "1",
                "--latency-ms",
                "2"
            ]),
            Err(ConfigError::LatencyTwice(_))
        ));
        assert_eq!(
            with(&["ws://h/ws", "--osc-bundles", "--osc-ahead-ms", "0"]),
            ConfigError::BadAhead("0".into())
        );
        assert_eq!(
            with(&["ws://h/ws", "--rt-priority", "100"]),
            ConfigError::BadPriority(100)
        );
        assert_eq!(
            with(&["ws://h/ws", "--token", "a b"]),
            ConfigError::BadToken
        );
    }

    #[test]
    fn bundles_take_their_lead() {
        let c = parse(&[
            "ws://h/ws",
            "--osc",
            "localhost:57120",
            "--osc-bundles",
            "--osc-ahead-ms",
            "250",
        ])
        .unwrap();
        assert_eq!(c.osc_ahead, Some(Duration::from_millis(250)));
        assert!(
            matches!(&c.outputs[0].target, Target::Osc { spec, .. } if spec == "localhost:57120")
        );
    }
}
