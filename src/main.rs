//! The `conductor` binary: flags in, server up, one line out saying where to point a browser;
//! or, with `healthcheck`, one question to a running server.

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;
use log::{error, info};

use conductor::config::{Cli, Command};
use conductor::net::Server;
use conductor::rt;

mod healthcheck;

/// Status for settings that cannot work (clap's own convention).
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => {
            // clap's message spans several lines; keep the one that says what is wrong.
            let rendered = e.render().to_string();
            let line = rendered
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments");
            eprintln!("conductor: {line}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Some(Command::Healthcheck(args)) = &cli.command {
        let addr = args.target(&cli);
        return match healthcheck::check(addr, std::time::Duration::from_secs(args.timeout)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(reason) => {
                eprintln!("conductor healthcheck: {reason}");
                ExitCode::FAILURE
            }
        };
    }
    let cfg = match cli.validate() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("conductor: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();

    match rt::raise_fd_limit() {
        Ok(n) => info!("open files limit {n}"),
        Err(e) => info!("open files limit unchanged ({e})"),
    }
    if cfg.mlock {
        match rt::lock_memory() {
            Ok(()) => info!("memory locked (mlockall)"),
            Err(e) => info!("memory not locked ({e}); grant CAP_IPC_LOCK to enable"),
        }
    }
    let ppqn = cfg.ppqn;
    let server = match Server::bind(cfg) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("conductor: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = server.local_addr();
    // In a cluster the shared timeline's tempo, not --bpm.
    let bpm = server.bpm();
    let host = if addr.ip().is_unspecified() {
        "localhost".to_string()
    } else if addr.is_ipv6() {
        format!("[{}]", addr.ip())
    } else {
        addr.ip().to_string()
    };
    println!(
        "conductor: {bpm} BPM, ppqn {ppqn} — open http://{host}:{}/ in a browser (WebSocket ws://{host}:{}/ws)",
        addr.port(),
        addr.port()
    );
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}
