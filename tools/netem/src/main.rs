//! conductor-netem: emulated network paths in front of a conductor server (docs/netem.md).

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use conductor_netem::profile::{PRESETS, duration};
use conductor_netem::proxy::{PathConfig, spawn_all};
use conductor_netem::{NetemError, Profile, calibrate};

/// Emulate network paths in front of a TCP server: one listening port per path profile.
///
/// Example: conductor-netem --to 127.0.0.1:3000 --path 9001=city --path 9002=intercontinental
///          --path '9003=up=20ms,down=100ms'   (then open http://127.0.0.1:9002/)
#[derive(Debug, Parser)]
#[command(
    name = "conductor-netem",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// The server behind every path, HOST:PORT
    #[arg(long, value_name = "HOST:PORT")]
    to: Option<String>,

    /// A path: [ADDR:]PORT=PROFILE, where PROFILE is a preset (see `profiles`) and/or
    /// KEY=VALUE pairs: delay, up, down, jitter, up-jitter, down-jitter, dist, burst,
    /// up-burst, down-burst. Repeat for more paths.
    #[arg(long = "path", value_name = "PORT=PROFILE")]
    paths: Vec<String>,

    /// Address the paths listen on when a --path names only a port
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,

    /// Seed of the jitter and bursts: the same seed replays the same delays
    #[arg(long, default_value_t = 1)]
    seed: u64,

    /// Spin (instead of sleeping) this long before each chunk leaves, µs: less timer error,
    /// more CPU
    #[arg(long, default_value_t = 300)]
    spin_us: u64,

    /// SCHED_FIFO priority of the threads that send (0: normal scheduler). Keep it below the
    /// server's (50) on a shared machine
    #[arg(long, default_value_t = 0)]
    rt_priority: u8,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the preset profiles
    Profiles,
    /// Measure what the emulator adds beyond the delay it is asked for, on this machine
    Calibrate {
        /// One-way delays to try, ms
        #[arg(long, value_delimiter = ',', default_value = "0,20")]
        delay_ms: Vec<f64>,
        /// Round trips per delay
        #[arg(long, default_value_t = 500)]
        count: usize,
        /// Pause between round trips, ms
        #[arg(long, default_value_t = 10.0)]
        interval_ms: f64,
        /// As for running paths
        #[arg(long, default_value_t = 300)]
        spin_us: u64,
        /// As for running paths
        #[arg(long, default_value_t = 0)]
        rt_priority: u8,
    },
}

fn path_config(
    spec: &str,
    cli: &Cli,
    upstream: &str,
    index: u64,
) -> Result<PathConfig, NetemError> {
    let (listen, profile) = spec
        .split_once('=')
        .ok_or_else(|| NetemError::PathSpec(spec.to_string()))?;
    let listen: SocketAddr = match listen.parse::<u16>() {
        Ok(port) => SocketAddr::new(cli.bind, port),
        Err(_) => listen
            .parse()
            .map_err(|_| NetemError::PathSpec(spec.to_string()))?,
    };
    Ok(PathConfig {
        listen,
        upstream: upstream.to_string(),
        profile: Profile::parse(profile)?,
        seed: cli.seed.wrapping_add(index << 32),
        spin: Duration::from_micros(cli.spin_us),
        rt_priority: cli.rt_priority,
        name: profile.to_string(),
    })
}

fn run(cli: &Cli) -> Result<(), NetemError> {
    match &cli.command {
        Some(Command::Profiles) => {
            for (name, what) in PRESETS {
                let p = Profile::preset(name).expect("every listed preset exists");
                println!("{name:<17} {what}\n{:<17} = {p}", "");
            }
            Ok(())
        }
        Some(Command::Calibrate {
            delay_ms,
            count,
            interval_ms,
            spin_us,
            rt_priority,
        }) => {
            let delays = delay_ms
                .iter()
                .map(|ms| duration(&format!("{ms}ms")))
                .collect::<Result<Vec<_>, _>>()?;
            if *count == 0 || !(interval_ms.is_finite() && *interval_ms >= 0.0) {
                return Err(NetemError::Io(
                    "--count must be positive and --interval-ms not negative".into(),
                ));
            }
            let (direct, rows) = calibrate::calibrate(
                &delays,
                *count,
                Duration::from_secs_f64(interval_ms / 1000.0),
                Duration::from_micros(*spin_us),
                *rt_priority,
            )?;
            println!(
                "direct round trip (loopback, median of {count}): {direct:.1} µs; spin {spin_us} µs, \
                 SCHED_FIFO {rt_priority}"
            );
            println!("added to a round trip beyond 2 × delay (two passes through the emulator):");
            println!(
                "{:>10} {:>10} {:>10} {:>10}",
                "delay", "p50 µs", "p99 µs", "max µs"
            );
            for r in rows {
                println!(
                    "{:>7.1} ms {:>10.1} {:>10.1} {:>10.1}",
                    r.delay.as_secs_f64() * 1000.0,
                    r.p50_us,
                    r.p99_us,
                    r.max_us
                );
            }
            Ok(())
        }
        None => {
            let upstream = cli.to.as_deref().ok_or_else(|| {
                NetemError::Io("give --to HOST:PORT (the server) and one --path or more".into())
            })?;
            if cli.paths.is_empty() {
                return Err(NetemError::Io(
                    "give at least one --path PORT=PROFILE, e.g. --path 9001=city".into(),
                ));
            }
            let configs = cli
                .paths
                .iter()
                .enumerate()
                .map(|(i, spec)| path_config(spec, cli, upstream, i as u64))
                .collect::<Result<Vec<_>, _>>()?;
            let _paths = spawn_all(configs)?;
            loop {
                std::thread::park();
            }
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("conductor-netem: {e}");
            ExitCode::from(2)
        }
    }
}
