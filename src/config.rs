//! Command-line flags and environment variables, and their validation.
//!
//! This module owns what the operator can set and the rules that tie the settings together. It
//! only parses and checks: it starts nothing. A bad value becomes a [`ConfigError`], which `main`
//! prints as one line before exiting with status 2.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use thiserror::Error;

use crate::room::RoomName;
use crate::tempo::{BPM_CEILING, Bpm};

/// What `conductor --version` prints after the name: the crate version and the git commit it
/// was built from (`unknown` when the build had neither git nor `CONDUCTOR_GIT_COMMIT`).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("CONDUCTOR_GIT_COMMIT"),
    ")"
);

/// A drift-free tempo server: ticks every 16th note to every WebSocket client.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "conductor",
    version = VERSION,
    about,
    disable_help_subcommand = true
)]
pub struct Cli {
    /// Without a command, the server runs.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// TCP port for HTTP and WebSocket (0 picks a free one).
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "PORT",
        default_value_t = 3000
    )]
    pub port: u16,

    /// Address to listen on.
    #[arg(long, env = "CONDUCTOR_BIND", default_value = "0.0.0.0")]
    pub bind: IpAddr,

    /// Tempo at start, in beats per minute.
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "CONDUCTOR_BPM",
        default_value_t = 120.0
    )]
    pub bpm: f64,

    /// Lowest tempo a client may set.
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "CONDUCTOR_MIN_BPM",
        default_value_t = 60.0
    )]
    pub min_bpm: f64,

    /// Highest tempo a client may set.
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "CONDUCTOR_MAX_BPM",
        default_value_t = 200.0
    )]
    pub max_bpm: f64,

    /// Ticks per quarter note: 4 gives 16th notes, 24 matches MIDI clock.
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "CONDUCTOR_PPQN",
        default_value_t = 4
    )]
    pub ppqn: u32,

    /// Beats in a bar: a quantised `start` waits for the next bar line, so everyone comes in
    /// on the downbeat together.
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "CONDUCTOR_BEATS_PER_BAR",
        default_value_t = 4
    )]
    pub beats_per_bar: u32,

    /// Frames a client may fall behind before it is closed with 1008 (slow consumer).
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "CONDUCTOR_MAX_QUEUE",
        default_value_t = 64
    )]
    pub max_queue: usize,

    /// Largest WebSocket message a client may send, in bytes; larger closes with 1009.
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "CONDUCTOR_MAX_MESSAGE_BYTES",
        default_value_t = 4096
    )]
    pub max_message_bytes: usize,

    /// Messages a client may send per second; more get an error event, ten times more a 1008
    /// close.
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "CONDUCTOR_MAX_MESSAGES_PER_SEC",
        default_value_t = 20
    )]
    pub max_messages_per_sec: u32,

    /// Most WebSocket clients at once; further upgrades get 503.
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "CONDUCTOR_MAX_CLIENTS",
        default_value_t = 100_000
    )]
    pub max_clients: usize,

    /// Most Socket.IO long-polling sessions at once; further handshakes get 503. Each one
    /// holds a request open, so they cost more than WebSocket clients.
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "CONDUCTOR_MAX_POLLING_SESSIONS",
        default_value_t = 1000
    )]
    pub max_polling_sessions: usize,

    /// Most Socket.IO long-polling sessions from one address (an IPv6 /64 counts as one);
    /// further handshakes from it get 429. A stock client polls only until it upgrades to
    /// WebSocket, so this caps what one peer can hold, not a classroom behind one NAT.
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "CONDUCTOR_MAX_SESSIONS_PER_IP",
        default_value_t = 32
    )]
    pub max_sessions_per_ip: usize,

    /// Take the client's address from this request header (e.g. Fly-Client-IP, or
    /// X-Forwarded-For, whose last entry is used) for --max-sessions-per-ip and for binding a
    /// session to its client. Only behind a proxy that sets it: anyone can send the header.
    #[arg(long, env = "CONDUCTOR_CLIENT_IP_HEADER")]
    pub client_ip_header: Option<String>,

    /// Only connections presenting this token (?token= or Authorization: Bearer) may change
    /// the tempo; everyone else still receives ticks.
    #[arg(long, env = "CONDUCTOR_CONTROL_TOKEN", hide_env_values = true)]
    pub control_token: Option<String>,

    /// A room's own control token, NAME=TOKEN (repeatable, or comma-separated in the
    /// environment): it lets its holder conduct that room, beside --control-token.
    #[arg(
        long = "room-token",
        env = "CONDUCTOR_ROOM_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub room_tokens: Vec<String>,

    /// Rooms at most, main included; joining a new room beyond them is refused.
    #[arg(long, env = "CONDUCTOR_MAX_ROOMS", default_value_t = 1000)]
    pub max_rooms: usize,

    /// How new connections reach the shards: handoff (shard 0 accepts and hands each to the
    /// shard with the fewest connections; measured better) or reuseport (a listener per
    /// shard, the kernel spreads them by a hash of the addresses).
    #[arg(long, env = "CONDUCTOR_ACCEPT", value_enum, default_value_t = AcceptMode::Handoff)]
    pub accept: AcceptMode,

    /// Fan-out shards: event loops, each owning a share of the connections (1 to 256).
    /// Default: every core where there are 1 or 2, otherwise one less than the cores, leaving
    /// one for the timing thread.
    #[arg(long, env = "CONDUCTOR_THREADS")]
    pub threads: Option<usize>,

    /// How long a room without clients lives on, with its saved state: seconds, or a number
    /// with s, m or h (90s, 10m, 1h). main is never dropped.
    #[arg(long, env = "CONDUCTOR_ROOM_IDLE", default_value = "10m")]
    pub room_idle: String,

    /// Rooms given their own labelled gauges in /metrics (those with the most clients);
    /// /stats lists every room.
    #[arg(long, env = "CONDUCTOR_METRICS_ROOMS", default_value_t = 100)]
    pub metrics_rooms: usize,

    /// Schedule every tempo and transport change exactly this many ms ahead, instead of the
    /// lead computed from the room's measured round trips (150 ms to 1 s).
    #[arg(long, env = "CONDUCTOR_CHANGE_LEAD_MS")]
    pub change_lead_ms: Option<u64>,

    /// A browser Origin allowed to open /ws (repeatable, or comma-separated in the
    /// environment); when given, other origins get 403. Requests without Origin are allowed.
    #[arg(
        long = "allowed-origin",
        env = "CONDUCTOR_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,

    /// Seconds a client may stay silent before the server pings it.
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "CONDUCTOR_PING_INTERVAL",
        default_value_t = 20
    )]
    pub ping_interval: u64,

    /// Seconds a pinged client has to answer before it is closed.
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "CONDUCTOR_PING_TIMEOUT",
        default_value_t = 10
    )]
    pub ping_timeout: u64,

    /// Seconds a connection may take to send its HTTP request or upgrade.
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "CONDUCTOR_HANDSHAKE_TIMEOUT",
        default_value_t = 10
    )]
    pub handshake_timeout: u64,

    /// SCHED_FIFO priority for the timing thread (1-99), or 0 to not ask for one.
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "CONDUCTOR_RT_PRIORITY",
        default_value_t = 50
    )]
    pub rt_priority: i32,

    /// Microseconds before each tick to wake the event loop, so that waking it is not on the
    /// tick's path (0 = off).
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "CONDUCTOR_PREWAKE_US",
        default_value_t = 500
    )]
    pub prewake_us: u64,

    /// Microseconds before each tick that the timing thread spins instead of sleeping. More
    /// costs CPU; less lets a virtual machine's idle wake-up delay make ticks late.
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "CONDUCTOR_SPIN_US",
        default_value_t = 2000
    )]
    pub spin_us: u64,

    /// Share one timeline with every instance started with the same Redis URL and
    /// --cluster-name (e.g. redis://10.0.0.5:6379/). Without it no Redis code runs.
    #[arg(long, env = "CONDUCTOR_CLUSTER")]
    pub cluster: Option<String>,

    /// Which shared timeline to join on that Redis.
    #[arg(long, env = "CONDUCTOR_CLUSTER_NAME", default_value = "default")]
    pub cluster_name: String,

    /// How far ahead a tempo or transport change is scheduled in a cluster, so that every
    /// instance hears of it before its first affected tick.
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "CONDUCTOR_CLUSTER_LEAD_MS",
        default_value_t = 250
    )]
    pub cluster_lead_ms: u64,

    /// Do not lock the process's memory (mlockall).
    #[arg(long, env = "CONDUCTOR_NO_MLOCK")]
    pub no_mlock: bool,

    /// Also serve the files in DIR (your own pages), beside the embedded ones, which win where
    /// both have a path.
    #[arg(long, env = "CONDUCTOR_WWW", value_name = "DIR")]
    pub www: Option<PathBuf>,

    /// Where tempo, transport and the timeline survive a restart, or `none`.
    #[arg(
        long,
        env = "CONDUCTOR_STATE",
        value_name = "FILE",
        default_value = DEFAULT_STATE_FILE
    )]
    pub state: PathBuf,

    /// Whether `--bpm` was given on the command line (not by the environment or the default):
    /// only then does it win over the tempo in the state file.
    #[arg(skip)]
    pub bpm_on_command_line: bool,

    /// The same for `--beats-per-bar`.
    #[arg(skip)]
    pub beats_per_bar_on_command_line: bool,
}

/// The state file when neither `--state` nor `CONDUCTOR_STATE` names one: in the working
/// directory.
pub const DEFAULT_STATE_FILE: &str = "conductor-state.json";

/// How new connections are spread over the shards (`--accept`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AcceptMode {
    /// A `SO_REUSEPORT` listener per shard: the kernel spreads connections by a hash of
    /// their addresses.
    Reuseport,
    /// Shard 0 accepts every connection and hands it to the shard with the fewest.
    Handoff,
}

/// `--threads` at most.
pub const MAX_THREADS: usize = 256;

/// The default number of fan-out shards for a machine with `cores` cores: all of them where
/// there are one or two (the timing thread sleeps most of the time and shares), otherwise one
/// less, so that the timing thread has a core of its own to wake on.
pub fn default_threads(cores: usize) -> usize {
    match cores {
        0..=2 => cores.max(1),
        n => (n - 1).min(MAX_THREADS),
    }
}

/// A one-shot tool instead of the server.
#[derive(Clone, Debug, Subcommand)]
pub enum Command {
    /// Ask a running server's /healthz: exit 0 on 200, else 1 with the reason on stderr.
    ///
    /// For container health checks: the image is built FROM scratch and has no curl.
    Healthcheck(HealthcheckArgs),
}

/// Where `conductor healthcheck` looks, and for how long.
#[derive(Clone, Debug, Args)]
pub struct HealthcheckArgs {
    /// Port to check [default: the server's PORT, else 3000].
    #[arg(long)]
    pub port: Option<u16>,

    /// Address to check [default: CONDUCTOR_BIND when it names one address, else loopback].
    #[arg(long)]
    pub host: Option<IpAddr>,

    /// Seconds to wait for connecting and for the answer, each.
    #[arg(long, default_value_t = 2)]
    pub timeout: u64,
}

impl Cli {
    /// Parses the process's arguments and environment, and notes which flags were typed on
    /// the command line (see [`Cli::bpm_on_command_line`]).
    pub fn parse_args() -> Result<Cli, clap::Error> {
        Self::parse_args_from(std::env::args_os())
    }

    /// [`Cli::parse_args`] for given arguments.
    pub fn parse_args_from<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Cli::command().try_get_matches_from(args)?;
        let mut cli = Cli::from_arg_matches(&matches)?;
        let typed = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
        cli.bpm_on_command_line = typed("bpm");
        cli.beats_per_bar_on_command_line = typed("beats_per_bar");
        Ok(cli)
    }
}

impl HealthcheckArgs {
    /// The address to check. What is not given comes from the server's own settings (`cli`,
    /// which read `PORT` and `CONDUCTOR_BIND`), so the check run inside a container or unit
    /// finds the server started with the same environment.
    pub fn target(&self, cli: &Cli) -> SocketAddr {
        let host = self.host.unwrap_or(match cli.bind {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        });
        SocketAddr::new(host, self.port.unwrap_or(cli.port))
    }
}

/// The validated settings the server runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub port: u16,
    pub bind: IpAddr,
    pub bpm: Bpm,
    pub min_bpm: Bpm,
    pub max_bpm: Bpm,
    pub ppqn: u32,
    pub beats_per_bar: u32,
    pub max_queue: usize,
    pub max_message_bytes: usize,
    pub max_messages_per_sec: u32,
    pub max_clients: usize,
    pub max_polling_sessions: usize,
    pub max_sessions_per_ip: usize,
    /// Lower-cased.
    pub client_ip_header: Option<String>,
    pub control_token: Option<String>,
    /// Lower-cased, without a trailing slash.
    pub allowed_origins: Vec<String>,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub handshake_timeout: Duration,
    pub rt_priority: i32,
    pub prewake: Duration,
    pub spin: Duration,
    pub mlock: bool,
    /// Redis URL, cluster name and change lead, when clustered.
    pub cluster: Option<(String, String, Duration)>,
    /// `--room-token`s, by room.
    pub room_tokens: Vec<(RoomName, String)>,
    pub max_rooms: usize,
    /// Fan-out shards (event loops).
    pub threads: usize,
    pub accept: AcceptMode,
    pub room_idle: Duration,
    pub metrics_rooms: usize,
    /// `--change-lead-ms`, when given.
    pub change_lead: Option<Duration>,
    /// `--www`: the directory of the operator's own pages, resolved (no symlinks, absolute).
    pub www: Option<PathBuf>,
    /// `--state`: where the state survives a restart (`None` for `--state none`).
    pub state_file: Option<PathBuf>,
    /// `--bpm` and `--beats-per-bar` typed on the command line: they win over the state file.
    pub bpm_on_command_line: bool,
    pub beats_per_bar_on_command_line: bool,
}

/// A setting that cannot work, with what to do about it.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("--{flag} {value} is out of range; give a tempo above 0 and at most {BPM_CEILING} BPM")]
    BadTempo { flag: &'static str, value: String },
    #[error("--min-bpm {min} is above --max-bpm {max}")]
    EmptyRange { min: Bpm, max: Bpm },
    #[error(
        "--bpm {value} is out of range; the limits in force are {min} to {max} BPM \
         (--min-bpm, --max-bpm)"
    )]
    BpmOutOfRange { value: String, min: Bpm, max: Bpm },
    #[error("--ppqn {0} is out of range; use 1 to 960 (4 = 16th notes, 24 = MIDI clock)")]
    BadPpqn(u32),
    #[error("--beats-per-bar {0} is out of range; use 1 to 64")]
    BadBeatsPerBar(u32),
    #[error("--max-queue {0} is out of range; use 2 to 65536")]
    BadQueue(usize),
    #[error("--max-message-bytes {0} is out of range; use 64 to 1048576")]
    BadMessageSize(usize),
    #[error("--max-messages-per-sec {0} is out of range; use 1 to 10000")]
    BadMessageRate(u32),
    #[error("--max-clients {0} is out of range; use 1 to 10000000")]
    BadMaxClients(usize),
    #[error("--max-polling-sessions {0} is out of range; use 0 (no long-polling) to 100000")]
    BadMaxPollingSessions(usize),
    #[error("--max-sessions-per-ip {0} is out of range; use 1 to 100000")]
    BadMaxSessionsPerIp(usize),
    #[error("--client-ip-header {0:?} is not a header name; give e.g. X-Forwarded-For")]
    BadClientIpHeader(String),
    #[error("--control-token must be 1 to 256 visible ASCII characters")]
    BadToken,
    #[error(
        "--allowed-origin {0:?} is not an origin; give scheme://host[:port], e.g. https://example.org"
    )]
    BadOrigin(String),
    #[error("--ping-interval and --ping-timeout must be 1 to 3600 seconds")]
    BadPing,
    #[error("--handshake-timeout {0} is out of range; use 1 to 3600 seconds")]
    BadHandshakeTimeout(u64),
    #[error("--rt-priority {0} is out of range; use 0 (off) or 1 to 99")]
    BadPriority(i32),
    #[error("--prewake-us {0} is out of range; use 0 (off) to 1500")]
    BadPrewake(u64),
    #[error("--spin-us {0} is out of range; use 0 to 10000")]
    BadSpin(u64),
    #[error("--cluster {0:?} is not a Redis URL; give redis://HOST[:PORT][/DB]")]
    BadClusterUrl(String),
    #[error("--cluster-name must be 1 to 64 letters, digits, '-', '_' or '.'")]
    BadClusterName,
    #[error("--cluster-lead-ms {0} is out of range; use 10 to 10000")]
    BadClusterLead(u64),
    #[error("--www {dir}: {reason}; give a directory of files to serve")]
    BadWww { dir: String, reason: String },
    #[error(
        "--state {0:?} is a directory; give a file in it (e.g. --state DIR/{DEFAULT_STATE_FILE}) \
         or --state none"
    )]
    StateIsDirectory(String),
    #[error("--max-rooms {0} is out of range; use 1 to 10000")]
    BadMaxRooms(usize),
    #[error("--threads {0} is out of range; use 1 to 256 (about one per core)")]
    BadThreads(usize),
    #[error(
        "--room-idle {0:?} is not a duration; give seconds, or e.g. 90s, 10m, 1h (1 s to 7 days)"
    )]
    BadRoomIdle(String),
    #[error("--room-token {0:?} is not NAME=TOKEN; {1}")]
    BadRoomToken(String, String),
    #[error("--metrics-rooms {0} is out of range; use 0 to 10000")]
    BadMetricsRooms(usize),
    #[error("--change-lead-ms {0} is out of range; use 0 to 10000")]
    BadChangeLead(u64),
}

/// A duration in seconds, or a number with `s`, `m` or `h`.
fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, "s"),
    };
    let n: u64 = number.parse().ok()?;
    let seconds = match unit.trim() {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        _ => return None,
    };
    Some(Duration::from_secs(seconds))
}

/// Whether `token` can be a control token: 1 to 256 visible ASCII characters.
fn usable_token(token: &str) -> bool {
    !token.is_empty() && token.len() <= 256 && token.bytes().all(|b| b.is_ascii_graphic())
}

fn tempo(flag: &'static str, value: f64) -> Result<Bpm, ConfigError> {
    Bpm::from_f64(value).ok_or_else(|| ConfigError::BadTempo {
        flag,
        value: value.to_string(),
    })
}

impl Cli {
    /// Checks every flag and the rules between them.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let min_bpm = tempo("min-bpm", self.min_bpm)?;
        let max_bpm = tempo("max-bpm", self.max_bpm)?;
        if min_bpm > max_bpm {
            return Err(ConfigError::EmptyRange {
                min: min_bpm,
                max: max_bpm,
            });
        }
        // Named against the limits in force, not the absolute ceiling: that is what the
        // operator can act on.
        let bpm = Bpm::from_f64(self.bpm)
            .filter(|bpm| (min_bpm..=max_bpm).contains(bpm))
            .ok_or_else(|| ConfigError::BpmOutOfRange {
                value: self.bpm.to_string(),
                min: min_bpm,
                max: max_bpm,
            })?;
        if !(1..=960).contains(&self.ppqn) {
            return Err(ConfigError::BadPpqn(self.ppqn));
        }
        if !(1..=64).contains(&self.beats_per_bar) {
            return Err(ConfigError::BadBeatsPerBar(self.beats_per_bar));
        }
        if !(2..=65536).contains(&self.max_queue) {
            return Err(ConfigError::BadQueue(self.max_queue));
        }
        if !(64..=1 << 20).contains(&self.max_message_bytes) {
            return Err(ConfigError::BadMessageSize(self.max_message_bytes));
        }
        if !(1..=10_000).contains(&self.max_messages_per_sec) {
            return Err(ConfigError::BadMessageRate(self.max_messages_per_sec));
        }
        if !(1..=3600).contains(&self.handshake_timeout) {
            return Err(ConfigError::BadHandshakeTimeout(self.handshake_timeout));
        }
        if !(0..=99).contains(&self.rt_priority) {
            return Err(ConfigError::BadPriority(self.rt_priority));
        }
        if self.prewake_us > 1500 {
            return Err(ConfigError::BadPrewake(self.prewake_us));
        }
        if !(1..=10_000_000).contains(&self.max_clients) {
            return Err(ConfigError::BadMaxClients(self.max_clients));
        }
        if self.max_polling_sessions > 100_000 {
            return Err(ConfigError::BadMaxPollingSessions(
                self.max_polling_sessions,
            ));
        }
        if !(1..=100_000).contains(&self.max_sessions_per_ip) {
            return Err(ConfigError::BadMaxSessionsPerIp(self.max_sessions_per_ip));
        }
        if let Some(name) = &self.client_ip_header
            && (name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)))
        {
            return Err(ConfigError::BadClientIpHeader(name.clone()));
        }
        if let Some(token) = &self.control_token
            && (token.is_empty()
                || token.len() > 256
                || !token.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(ConfigError::BadToken);
        }
        let mut allowed_origins = Vec::new();
        for origin in &self.allowed_origins {
            let o = origin.trim().trim_end_matches('/').to_ascii_lowercase();
            let valid = o.split_once("://").is_some_and(|(scheme, host)| {
                !scheme.is_empty() && !host.is_empty() && !host.contains('/')
            });
            if !valid {
                return Err(ConfigError::BadOrigin(origin.clone()));
            }
            allowed_origins.push(o);
        }
        if !(1..=3600).contains(&self.ping_interval) || !(1..=3600).contains(&self.ping_timeout) {
            return Err(ConfigError::BadPing);
        }
        if self.spin_us > 10_000 {
            return Err(ConfigError::BadSpin(self.spin_us));
        }
        let cluster = match &self.cluster {
            None => None,
            Some(url) => {
                // Plain TCP only: the redis crate is built without TLS (see docs/cluster.md).
                let valid = url
                    .strip_prefix("redis://")
                    .is_some_and(|rest| !rest.is_empty());
                if !valid {
                    return Err(ConfigError::BadClusterUrl(url.clone()));
                }
                let name = &self.cluster_name;
                if name.is_empty()
                    || name.len() > 64
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                {
                    return Err(ConfigError::BadClusterName);
                }
                if !(10..=10_000).contains(&self.cluster_lead_ms) {
                    return Err(ConfigError::BadClusterLead(self.cluster_lead_ms));
                }
                Some((
                    url.clone(),
                    name.clone(),
                    Duration::from_millis(self.cluster_lead_ms),
                ))
            }
        };
        let mut room_tokens: Vec<(RoomName, String)> = Vec::new();
        for entry in &self.room_tokens {
            let bad = |why: &str| ConfigError::BadRoomToken(entry.clone(), why.to_string());
            let (name, token) = entry
                .split_once('=')
                .ok_or_else(|| bad("e.g. --room-token class-7b=s3cret"))?;
            let name = RoomName::parse(name).map_err(|e| bad(&e.to_string()))?;
            if !usable_token(token) {
                return Err(bad("the token must be 1 to 256 visible ASCII characters"));
            }
            if room_tokens.iter().any(|(n, _)| *n == name) {
                return Err(bad("that room has a token already"));
            }
            room_tokens.push((name, token.to_string()));
        }
        if !(1..=10_000).contains(&self.max_rooms) {
            return Err(ConfigError::BadMaxRooms(self.max_rooms));
        }
        let threads = match self.threads {
            Some(n) if (1..=MAX_THREADS).contains(&n) => n,
            Some(n) => return Err(ConfigError::BadThreads(n)),
            None => default_threads(
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            ),
        };
        let room_idle = parse_duration(&self.room_idle)
            .filter(|d| (1..=7 * 24 * 3600).contains(&d.as_secs()))
            .ok_or_else(|| ConfigError::BadRoomIdle(self.room_idle.clone()))?;
        if self.metrics_rooms > 10_000 {
            return Err(ConfigError::BadMetricsRooms(self.metrics_rooms));
        }
        if let Some(ms) = self.change_lead_ms
            && ms > 10_000
        {
            return Err(ConfigError::BadChangeLead(ms));
        }
        let www = match &self.www {
            None => None,
            Some(dir) => Some(www_dir(dir)?),
        };
        let state_file = if self.state.as_os_str() == "none" {
            None
        } else if self.state.is_dir() {
            return Err(ConfigError::StateIsDirectory(
                self.state.display().to_string(),
            ));
        } else {
            // Whether it can be read and written is found out at start, where a problem is a
            // warning and not a refusal (see `state`).
            Some(self.state.clone())
        };
        Ok(Config {
            room_tokens,
            max_rooms: self.max_rooms,
            threads,
            accept: self.accept,
            room_idle,
            metrics_rooms: self.metrics_rooms,
            change_lead: self.change_lead_ms.map(Duration::from_millis),
            port: self.port,
            bind: self.bind,
            bpm,
            min_bpm,
            max_bpm,
            ppqn: self.ppqn,
            beats_per_bar: self.beats_per_bar,
            max_queue: self.max_queue,
            max_message_bytes: self.max_message_bytes,
            max_messages_per_sec: self.max_messages_per_sec,
            max_clients: self.max_clients,
            max_polling_sessions: self.max_polling_sessions,
            max_sessions_per_ip: self.max_sessions_per_ip,
            client_ip_header: self
                .client_ip_header
                .as_ref()
                .map(|h| h.to_ascii_lowercase()),
            control_token: self.control_token.clone(),
            allowed_origins,
            ping_interval: Duration::from_secs(self.ping_interval),
            ping_timeout: Duration::from_secs(self.ping_timeout),
            handshake_timeout: Duration::from_secs(self.handshake_timeout),
            rt_priority: self.rt_priority,
            prewake: Duration::from_micros(self.prewake_us),
            spin: Duration::from_micros(self.spin_us),
            mlock: !self.no_mlock,
            cluster,
            www,
            state_file,
            bpm_on_command_line: self.bpm_on_command_line,
            beats_per_bar_on_command_line: self.beats_per_bar_on_command_line,
        })
    }
}

/// The `--www` directory, resolved once: every served path is checked to stay inside it.
fn www_dir(dir: &Path) -> Result<PathBuf, ConfigError> {
    let refuse = |reason: String| ConfigError::BadWww {
        dir: dir.display().to_string(),
        reason,
    };
    let real = dir.canonicalize().map_err(|e| refuse(e.to_string()))?;
    if !real.is_dir() {
        return Err(refuse("not a directory".into()));
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    #[test]
    fn threads_default_to_the_cores_leaving_one_for_timing_where_there_are_more_than_two() {
        assert_eq!(default_threads(0), 1);
        assert_eq!(default_threads(1), 1);
        assert_eq!(default_threads(2), 2);
        assert_eq!(default_threads(3), 2);
        assert_eq!(default_threads(16), 15);
        assert_eq!(default_threads(1024), MAX_THREADS);
        assert_eq!(parse(&["--threads", "3"]).expect("valid").threads, 3);
        assert!(parse(&[]).expect("valid").threads >= 1);
        for bad in ["0", "257"] {
            assert!(
                parse(&["--threads", bad])
                    .unwrap_err()
                    .to_string()
                    .contains("--threads"),
                "{bad}"
            );
        }
    }

    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["conductor"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).expect("clap parse").validate()
    }

    #[test]
    fn defaults_match_the_predecessor() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.port, 3000);
        assert_eq!(c.bind.to_string(), "0.0.0.0");
        assert_eq!(c.bpm, Bpm::whole(120));
        assert_eq!((c.min_bpm, c.max_bpm), (Bpm::whole(60), Bpm::whole(200)));
        assert_eq!(c.ppqn, 4);
    }

    #[test]
    fn inconsistent_settings_are_refused() {
        assert!(matches!(
            parse(&["--bpm", "250"]),
            Err(ConfigError::BpmOutOfRange { .. })
        ));
        assert!(matches!(
            parse(&["--min-bpm", "150", "--max-bpm", "100", "--bpm", "120"]),
            Err(ConfigError::EmptyRange { .. })
        ));
        assert!(matches!(
            parse(&["--bpm", "NaN"]),
            Err(ConfigError::BpmOutOfRange { .. })
        ));
        assert!(matches!(
            parse(&["--bpm=-3"]),
            Err(ConfigError::BpmOutOfRange { .. })
        ));
        assert!(matches!(
            parse(&["--max-bpm", "1001"]),
            Err(ConfigError::BadTempo { .. })
        ));
        assert_eq!(
            parse(&["--ppqn", "0"]).unwrap_err(),
            ConfigError::BadPpqn(0)
        );
        assert_eq!(
            parse(&["--max-queue", "1"]).unwrap_err(),
            ConfigError::BadQueue(1)
        );
        assert_eq!(
            parse(&["--rt-priority", "100"]).unwrap_err(),
            ConfigError::BadPriority(100)
        );
    }

    #[test]
    fn origins_are_normalised_and_checked() {
        let c = parse(&[
            "--allowed-origin",
            "https://Example.org/",
            "--allowed-origin",
            "http://localhost:3000",
        ])
        .unwrap();
        assert_eq!(
            c.allowed_origins,
            ["https://example.org", "http://localhost:3000"]
        );
        assert!(matches!(
            parse(&["--allowed-origin", "example.org"]),
            Err(ConfigError::BadOrigin(_))
        ));
        assert!(matches!(
            parse(&["--allowed-origin", "https://a/b"]),
            Err(ConfigError::BadOrigin(_))
        ));
        assert_eq!(
            parse(&["--control-token", "has space"]).unwrap_err(),
            ConfigError::BadToken
        );
        assert_eq!(
            parse(&["--control-token", "s3cret"])
                .unwrap()
                .control_token
                .as_deref(),
            Some("s3cret")
        );
    }

    fn healthcheck(args: &[&str]) -> SocketAddr {
        let mut argv = vec!["conductor"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).expect("clap parse");
        match &cli.command {
            Some(Command::Healthcheck(h)) => h.target(&cli),
            None => panic!("no healthcheck command in {args:?}"),
        }
    }

    #[test]
    fn healthcheck_finds_the_server_from_its_own_settings() {
        assert_eq!(
            healthcheck(&["healthcheck"]).to_string(),
            // PORT may be set in the environment the tests run in.
            format!("127.0.0.1:{}", Cli::parse_from(["conductor"]).port)
        );
        assert_eq!(
            healthcheck(&["healthcheck", "--port", "8080"]).to_string(),
            "127.0.0.1:8080"
        );
        assert_eq!(
            healthcheck(&["--port", "4000", "--bind", "::", "healthcheck"]).to_string(),
            "[::1]:4000"
        );
        assert_eq!(
            healthcheck(&["--bind", "10.1.2.3", "healthcheck", "--port", "1"]).to_string(),
            "10.1.2.3:1"
        );
        assert_eq!(
            healthcheck(&["healthcheck", "--host", "127.0.0.2", "--port", "9"]).to_string(),
            "127.0.0.2:9"
        );
        // The server's flags are unchanged by the subcommand's existence.
        assert!(parse(&["--port", "3001"]).is_ok());
        assert!(Cli::try_parse_from(["conductor", "bogus"]).is_err());
    }

    #[test]
    fn version_names_the_commit() {
        let v = Cli::try_parse_from(["conductor", "--version"]).unwrap_err();
        let text = v.render().to_string();
        assert!(
            text.starts_with(&format!("conductor {} (", env!("CARGO_PKG_VERSION"))),
            "{text}"
        );
        assert!(text.trim_end().ends_with(')'), "{text}");
    }

    #[test]
    fn room_flags_are_checked() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.max_rooms, 1000);
        assert_eq!(c.room_idle, Duration::from_secs(600));
        assert_eq!(c.metrics_rooms, 100);
        assert_eq!(c.change_lead, None);
        for (idle, secs) in [("2", 2), ("90s", 90), ("10m", 600), ("1h", 3600)] {
            assert_eq!(
                parse(&["--room-idle", idle]).unwrap().room_idle.as_secs(),
                secs
            );
        }
        for bad in ["0", "8d", "m", "1.5m", "99999999999999999999"] {
            assert!(
                matches!(
                    parse(&["--room-idle", bad]),
                    Err(ConfigError::BadRoomIdle(_))
                ),
                "{bad}"
            );
        }
        let c = parse(&[
            "--room-token",
            "class-7b=s3cret",
            "--room-token",
            "band=x",
            "--change-lead-ms",
            "0",
        ])
        .unwrap();
        assert_eq!(c.room_tokens.len(), 2);
        assert_eq!(c.room_tokens[0].0.as_str(), "class-7b");
        assert_eq!(c.change_lead, Some(Duration::ZERO));
        for bad in ["nonsense", "Band=x", "band=", "band=has space", "=x"] {
            assert!(
                matches!(
                    parse(&["--room-token", bad]),
                    Err(ConfigError::BadRoomToken(..))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            parse(&["--room-token", "a=1", "--room-token", "a=2"]),
            Err(ConfigError::BadRoomToken(..))
        ));
        assert_eq!(
            parse(&["--max-rooms", "0"]).unwrap_err(),
            ConfigError::BadMaxRooms(0)
        );
        assert_eq!(
            parse(&["--change-lead-ms", "20000"]).unwrap_err(),
            ConfigError::BadChangeLead(20_000)
        );
    }

    #[test]
    fn session_limits_per_address_and_the_client_ip_header() {
        let c = parse(&[]).unwrap();
        assert_eq!((c.max_sessions_per_ip, c.client_ip_header), (32, None));
        let c = parse(&[
            "--max-sessions-per-ip",
            "4",
            "--client-ip-header",
            "Fly-Client-IP",
        ])
        .unwrap();
        assert_eq!(c.max_sessions_per_ip, 4);
        assert_eq!(c.client_ip_header.as_deref(), Some("fly-client-ip"));
        assert_eq!(
            parse(&["--max-sessions-per-ip", "0"]).unwrap_err(),
            ConfigError::BadMaxSessionsPerIp(0)
        );
        assert!(matches!(
            parse(&["--client-ip-header", "X Forwarded"]),
            Err(ConfigError::BadClientIpHeader(_))
        ));
    }

    #[test]
    fn a_tempo_out_of_range_names_the_limits_in_force() {
        // A negative number is a value, not a flag.
        for (args, shown) in [
            (
                &["--bpm", "-5"][..],
                "--bpm -5 is out of range; the limits in force are 60 to 200",
            ),
            (
                &["--bpm", "0"],
                "--bpm 0 is out of range; the limits in force are 60 to 200",
            ),
            (
                &["--min-bpm", "30", "--max-bpm", "90.5", "--bpm", "91"],
                "--bpm 91 is out of range; the limits in force are 30 to 90.5",
            ),
            (&["--min-bpm", "-1"], "--min-bpm -1 is out of range"),
        ] {
            let e = parse(args).unwrap_err().to_string();
            assert!(e.starts_with(shown), "{args:?}: {e}");
        }
        // Every numeric flag takes a negative value as a value (and then refuses it).
        let e = Cli::try_parse_from(["conductor", "--port", "-1"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{e}");
    }

    #[test]
    fn www_must_be_a_directory_and_is_resolved() {
        let dir = std::env::temp_dir().join(format!("conductor-www-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c = parse(&["--www", dir.to_str().unwrap()]).unwrap();
        assert_eq!(c.www, Some(dir.canonicalize().unwrap()));
        let file = dir.join("f.txt");
        std::fs::write(&file, "x").unwrap();
        let e = parse(&["--www", file.to_str().unwrap()]).unwrap_err();
        assert!(matches!(e, ConfigError::BadWww { .. }), "{e}");
        let e = parse(&["--www", "/no/such/conductor/dir"]).unwrap_err();
        assert!(e.to_string().contains("give a directory"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_state_file_defaults_to_the_working_directory_and_can_be_turned_off() {
        // CONDUCTOR_STATE may be set where the tests run.
        if std::env::var_os("CONDUCTOR_STATE").is_none() {
            assert_eq!(
                parse(&[]).unwrap().state_file,
                Some(PathBuf::from(DEFAULT_STATE_FILE))
            );
        }
        assert_eq!(parse(&["--state", "none"]).unwrap().state_file, None);
        assert_eq!(
            parse(&["--state", "/tmp/x.json"]).unwrap().state_file,
            Some(PathBuf::from("/tmp/x.json"))
        );
        assert!(matches!(
            parse(&["--state", "/tmp"]),
            Err(ConfigError::StateIsDirectory(_))
        ));
        assert!(Cli::try_parse_from(["conductor", "--state", ""]).is_err());
    }

    #[test]
    fn only_flags_typed_on_the_command_line_count_as_typed() {
        let cli = Cli::parse_args_from(["conductor", "--bpm", "90"]).unwrap();
        assert!(cli.bpm_on_command_line);
        assert!(!cli.beats_per_bar_on_command_line);
        let cli = Cli::parse_args_from(["conductor", "--beats-per-bar=3"]).unwrap();
        assert!(!cli.bpm_on_command_line);
        assert!(cli.beats_per_bar_on_command_line);
    }

    #[test]
    fn ppqn_24_and_fractional_tempos_are_fine() {
        let c = parse(&["--ppqn", "24", "--bpm", "93.5"]).unwrap();
        assert_eq!(c.ppqn, 24);
        assert_eq!(c.bpm.milli(), 93_500);
    }
}
