//! The `conductor` binary: flags in, server up, one line out saying where to point a browser;
//! or, with `healthcheck`, one question to a running server.

use std::io::Write;
use std::process::ExitCode;

use clap::error::ErrorKind;
use log::{error, info};

use conductor::config::{Cli, Command};
use conductor::join::{self, JoinUrls};
use conductor::net::Server;
use conductor::rt;

mod healthcheck;

/// clap's error in one line: what is wrong, its suggestion if it has one, and where to look.
/// (clap's own message spans several lines: usage, tips and a pointer to --help.)
fn usage_error_line(rendered: &str) -> String {
    let mut lines = rendered.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut line = lines
        .next()
        .unwrap_or("error: invalid arguments")
        .to_string();
    if let Some(tip) = lines.find_map(|l| l.strip_prefix("tip: ")) {
        line.push_str("; ");
        line.push_str(tip);
    }
    line.push_str(" (try --help)");
    line
}

/// Status for settings that cannot work (clap's own convention).
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::parse_args() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => {
            eprintln!("conductor: {}", usage_error_line(&e.render().to_string()));
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
    // Bound to every interface: where the phones on the LAN join. (The first line stays as it
    // is: scripts and tests read the local URL from it.)
    if addr.ip().is_unspecified() {
        match join::interface_addresses() {
            Ok(interfaces) => {
                // Whoever reads the banner may have stopped reading after its first line.
                let mut out = std::io::stdout().lock();
                for ip in join::lan_addresses(addr.ip(), &interfaces) {
                    let urls = JoinUrls::new(ip, addr.port());
                    let _ = writeln!(
                        out,
                        "conductor: on the LAN: {} (control) · {} (drum machine)",
                        urls.control, urls.drums
                    );
                }
                let _ = out.flush();
            }
            Err(e) => info!("cannot list this machine's addresses for the banner: {e}"),
        }
    }
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(args: &[&str]) -> String {
        let mut argv = vec!["conductor"];
        argv.extend_from_slice(args);
        let e = Cli::parse_args_from(argv).expect_err("refused");
        usage_error_line(&e.render().to_string())
    }

    #[test]
    fn a_usage_error_is_one_line_that_points_to_help() {
        let l = line(&["--bmp", "3"]);
        assert!(
            l.starts_with("error: unexpected argument '--bmp' found"),
            "{l}"
        );
        assert!(l.ends_with(" (try --help)"), "{l}");
        assert!(!l.contains('\n'));
        // clap's suggestion comes along.
        assert_eq!(
            line(&["--bpmm", "3"]),
            "error: unexpected argument '--bpmm' found; a similar argument exists: '--bpm' \
             (try --help)"
        );
        let l = line(&["--frob"]);
        assert_eq!(l, "error: unexpected argument '--frob' found (try --help)");
    }
}
