//! conductor-probe against the real server, and against a real Socket.IO v4 server from npm.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::Server;
use common::require::{self, Tool};
use serde_json::Value;

fn probe_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_conductor-probe"))
}

fn probe(args: &[&str]) -> Output {
    Command::new(probe_bin())
        .args(args)
        .output()
        .expect("run probe")
}

/// Runs the probe with `--json` and returns the parsed report.
fn probe_json(args: &[&str]) -> Value {
    probe_report(args).0
}

/// Runs the probe with `--json`: the parsed report and the table it printed.
fn probe_report(args: &[&str]) -> (Value, String) {
    let path = std::env::temp_dir().join(format!(
        "probe-{}-{}.json",
        std::process::id(),
        args.join("_").replace(['/', ':'], "")
    ));
    let mut all = args.to_vec();
    let path_str = path.to_string_lossy().into_owned();
    all.extend(["--json", &path_str]);
    let out = probe(&all);
    assert!(
        out.status.success(),
        "probe failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let text = std::fs::read_to_string(&path).expect("probe JSON written");
    let _ = std::fs::remove_file(&path);
    (
        serde_json::from_str(&text).expect("valid JSON"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn one_line_error(out: &Output) -> String {
    assert!(!out.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let last = err.lines().last().unwrap_or("").to_string();
    assert!(last.starts_with("conductor-probe: "), "{err}");
    last
}

#[test]
fn a_3s_run_at_120_bpm_sees_about_24_ticks_and_no_gaps() {
    let server = Server::start(&[]);
    let url = format!("ws://127.0.0.1:{}/ws", server.port);
    let plot = std::env::temp_dir().join(format!("probe-plot-{}.svg", std::process::id()));
    let plot_str = plot.to_string_lossy().into_owned();
    let (r, table) = probe_report(&[
        &url,
        "--clients",
        "5",
        "--duration",
        "3",
        "--plot",
        &plot_str,
    ]);
    assert_eq!(r["clients"], 5);
    assert_eq!(r["connected"], 5);
    assert_eq!(r["gaps"], 0, "{r}");
    assert_eq!(r["reorders"], 0, "{r}");
    let (min, max) = (
        r["ticks_min"].as_u64().unwrap(),
        r["ticks_max"].as_u64().unwrap(),
    );
    assert!(
        (22..=26).contains(&min) && (22..=26).contains(&max),
        "{min}..{max}"
    );
    for key in ["interval_jitter_us", "spread_us", "latency_us"] {
        for p in ["p50", "p99", "p999", "max"] {
            assert!(r[key][p].is_number(), "{key}.{p}");
        }
    }
    // Jitter is small next to the 125 ms interval, even on a loaded machine.
    assert!(
        r["interval_jitter_us"]["p50"].as_f64().unwrap() < 10_000.0,
        "{r}"
    );
    assert!(r["spread_us"]["samples"].as_u64().unwrap() >= 20, "{r}");
    assert_eq!(r["latency_valid"], true);
    assert!(r["drift_us"].as_f64().unwrap().abs() < 20_000.0, "{r}");
    // Three seconds say nothing about drift per minute.
    assert!(r["drift_us_per_min"].is_null(), "{r}");
    let drift_line = table
        .lines()
        .find(|l| l.trim_start().starts_with("drift"))
        .expect("a drift line");
    assert!(drift_line.contains("over the 3"), "{drift_line}");
    assert!(!drift_line.contains("/min"), "{drift_line}");
    let svg = std::fs::read_to_string(&plot).expect("plot written");
    assert!(svg.contains("<svg") && svg.contains("interval jitter"));
    let _ = std::fs::remove_file(plot);
}

#[test]
fn the_probe_accounts_for_a_tempo_change_in_drift() {
    let server = Server::start(&["--bpm", "200"]);
    let url = format!("ws://127.0.0.1:{}/ws", server.port);
    let mut probe = Command::new(probe_bin())
        .args([&url, "--clients", "2", "--duration", "3", "--json"])
        .arg(std::env::temp_dir().join(format!("probe-tempo-{}.json", std::process::id())))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("probe");
    std::thread::sleep(Duration::from_millis(1500));
    let mut c = server.ws();
    c.next_event("hello");
    c.send_text(r#"{"event":"setBpm","data":150}"#);
    assert!(probe.wait().expect("wait").success());
    let path = std::env::temp_dir().join(format!("probe-tempo-{}.json", std::process::id()));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let _ = std::fs::remove_file(path);
    assert_eq!(r["gaps"], 0, "{r}");
    // Without accounting for the change, drift would be tens of milliseconds.
    assert!(r["drift_us"].as_f64().unwrap().abs() < 5_000.0, "{r}");
}

#[test]
fn bad_targets_get_a_clear_one_line_error() {
    // Nothing listening: it fails at once, without waiting out the duration or printing a
    // table of zeros first.
    let port = free_port();
    let started = Instant::now();
    let out = probe(&[&format!("ws://127.0.0.1:{port}/ws"), "--duration", "30"]);
    let took = started.elapsed();
    let line = one_line_error(&out);
    assert!(line.contains("Connection refused"), "{line}");
    assert!(line.contains("is the server running"), "{line}");
    assert!(took < Duration::from_secs(5), "took {took:?} to give up");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "",
        "a report was printed for a run that measured nothing"
    );

    // A server that answers, but not with a WebSocket upgrade.
    let server = Server::start(&[]);
    let line = one_line_error(&probe(&[
        &format!("ws://127.0.0.1:{}/healthz", server.port),
        "--duration",
        "1",
    ]));
    assert!(line.contains("upgrade refused: HTTP 200"), "{line}");
    let line = one_line_error(&probe(&[
        &format!("ws://127.0.0.1:{}/nope", server.port),
        "--duration",
        "1",
    ]));
    assert!(line.contains("HTTP 404"), "{line}");

    // Not a URL we can use.
    let out = probe(&["wss://127.0.0.1:1/ws"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TLS"));
    assert_eq!(probe(&["127.0.0.1:3000"]).status.code(), Some(2));

    // A WebSocket server that sends no ticks: conductor's endpoint speaks the plain protocol,
    // so asking for Socket.IO there connects but never joins.
    let line = one_line_error(&probe(&[
        "--socketio",
        &format!("http://127.0.0.1:{}/ws", server.port),
        "--duration",
        "1",
        "--timeout",
        "2",
    ]));
    assert!(
        line.contains("no connection") || line.contains("no tick"),
        "{line}"
    );
}

#[test]
fn a_run_split_over_processes_merges_into_one_report() {
    let server = Server::start(&[]);
    let url = format!("ws://127.0.0.1:{}/ws", server.port);
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        + 2.0;
    let at = format!("{at:.3}");
    let dir = std::env::temp_dir();
    let part = |i: usize| dir.join(format!("probe-split-{}-{i}.json", std::process::id()));
    let children: Vec<_> = [(0, "3"), (1, "4")]
        .into_iter()
        .map(|(i, clients)| {
            Command::new(probe_bin())
                .args([&url, "--clients", clients, "--duration", "2", "--raw"])
                .args(["--source-offset", &i.to_string(), "--measure-at", &at])
                .arg("--json")
                .arg(part(i))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("probe")
        })
        .collect();
    for mut child in children {
        assert!(child.wait().expect("wait").success());
    }
    let (a, b) = (part(0), part(1));
    let (r, table) = probe_report(&[
        "--merge",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--label",
        "split",
    ]);
    let _ = (std::fs::remove_file(a), std::fs::remove_file(b));
    assert_eq!(r["processes"], 2, "{r}");
    assert_eq!(
        (r["clients"].as_u64(), r["connected"].as_u64()),
        (Some(7), Some(7))
    );
    assert_eq!(r["gaps"], 0, "{r}");
    assert!(r.get("raw").is_none(), "raw data only when asked: {r}");
    // One window: every count was seen by the clients of both processes.
    assert!(r["spread_us"]["samples"].as_u64().unwrap() >= 14, "{r}");
    let (min, max) = (
        r["ticks_min"].as_u64().unwrap(),
        r["ticks_max"].as_u64().unwrap(),
    );
    assert!((14..=18).contains(&min) && max - min <= 1, "{min}..{max}");
    assert!(table.contains("2 probe processes merged"), "{table}");

    // A report without raw data cannot be merged: one line says how to make one.
    let plain = dir.join(format!("probe-plain-{}.json", std::process::id()));
    std::fs::write(&plain, serde_json::to_string(&r).unwrap()).unwrap();
    let line = one_line_error(&probe(&["--merge", plain.to_str().unwrap()]));
    let _ = std::fs::remove_file(plain);
    assert!(line.contains("--raw"), "{line}");
}

#[test]
fn query_parameters_reach_the_server_and_ticks_none_needs_no_ticks() {
    let server = Server::start(&[]);
    let url = format!("ws://127.0.0.1:{}/ws", server.port);
    // Whether or not this server honours ?ticks=none, asking for it is no failure, and the
    // report says what was asked.
    let r = probe_json(&[
        &url,
        "--clients",
        "2",
        "--duration",
        "1",
        "--query",
        "ticks=none",
    ]);
    assert_eq!(r["ticks_asked"], "none");
    assert_eq!(r["connected"], 2, "{r}");
    assert!(
        r["url"].as_str().unwrap().ends_with("/ws?ticks=none"),
        "{r}"
    );
    // A malformed pair is refused before anything connects.
    let out = probe(&[&url, "--query", "ticks"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEY=VALUE"));
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The socket.io reference server (bench/socketio-ref, installed by .ci/test with npm).
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The reference server on `port`; `None` (the skip recorded) when node or its npm packages
/// are missing and `CONDUCTOR_TEST_SKIP=node`; a failure naming the install command otherwise.
fn socketio_server(port: u16) -> Option<Node> {
    if !require::tools(&[
        Tool::Node,
        Tool::NpmPackage {
            dir: "bench/socketio-ref",
            package: "socket.io",
        },
    ]) {
        return None;
    }
    let dir = require::workspace_root().join("bench/socketio-ref");
    let child = Command::new("node")
        .arg("server.js")
        .current_dir(&dir)
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .spawn()
        .expect("node");
    let until = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "socket.io server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(Node(child))
}

#[test]
fn socketio_mode_measures_a_real_socketio_v4_server() {
    let port = free_port();
    let Some(_node) = socketio_server(port) else {
        return;
    };
    let r = probe_json(&[
        "--socketio",
        &format!("http://127.0.0.1:{port}"),
        "--clients",
        "3",
        "--duration",
        "3",
    ]);
    assert_eq!(r["mode"], "socketio");
    assert_eq!(r["connected"], 3, "{r}");
    assert_eq!(r["gaps"], 0, "{r}");
    let (min, max) = (
        r["ticks_min"].as_u64().unwrap(),
        r["ticks_max"].as_u64().unwrap(),
    );
    assert!(
        (21..=26).contains(&min) && (21..=26).contains(&max),
        "{min}..{max}"
    );
    assert!(
        r["interval_jitter_us"]["samples"].as_u64().unwrap() > 50,
        "{r}"
    );
}
