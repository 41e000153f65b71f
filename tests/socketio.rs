//! Socket.IO v4 clients against the real binary: the stock `socket.io-client` from npm, in Node
//! (tests/socketio/client-test.mjs, one scenario per run), and raw Engine.IO requests for what
//! a stock client never sends.
//!
//! The stock-client tests need `node` and `npm ci --prefix tests/socketio`; without them they
//! fail with the command that installs them, unless `CONDUCTOR_TEST_SKIP=node` asks to skip
//! them (`tests/common/require.rs`). `.ci/test` installs both.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use common::require::{self, Tool};
use common::{Server, bin};
use serde_json::{Value, json};
use tungstenite::Message;

// ---------------------------------------------------------------------------------------------
// The Node side

fn socketio_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/socketio")
}

/// Whether the stock client can run: `node` and the pinned socket.io-client. False (the skip
/// recorded) when they are missing and `CONDUCTOR_TEST_SKIP=node`; a failure naming the
/// install command when missing otherwise. Every test that starts a [`NodeRun`] asks first.
fn stock_client_installed() -> bool {
    require::tools(&[
        Tool::Node,
        Tool::NpmPackage {
            dir: "tests/socketio",
            package: "socket.io-client",
        },
    ])
}

/// One run of the Node script: its stdout lines arrive on a channel, its stdin stays open
/// until [`NodeRun::release`] (the `hold` scenario waits for that).
struct NodeRun {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
    what: String,
}

impl NodeRun {
    fn start(port: u16, scenario: &str, args: &[&str]) -> NodeRun {
        let mut child = Command::new("node")
            .arg(socketio_dir().join("client-test.mjs"))
            .arg(format!("http://127.0.0.1:{port}"))
            .arg(scenario)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run node (the test asked for it with stock_client_installed)");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        NodeRun {
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
            what: format!("{scenario} {}", args.join(" ")),
        }
    }

    /// The next JSON line, or None when the script has exited or `within` has passed.
    fn next(&mut self, until: Instant) -> Option<Value> {
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        return Some(v);
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Waits for `{"status": name}`; panics with what the script said otherwise.
    fn status(&mut self, name: &str, within: Duration) -> Value {
        let until = Instant::now() + within;
        while let Some(v) = self.next(until) {
            if v["status"] == name {
                return v;
            }
            if v.get("ok").is_some() {
                panic!("{}: ended before {name:?}: {v}", self.what);
            }
        }
        panic!(
            "{}: no {name:?} line within {within:?}; stdout: {:?}",
            self.what, self.seen
        );
    }

    /// Closes the script's stdin (ends `hold`).
    fn release(&mut self) {
        self.stdin.take();
    }

    /// Waits for `{"status": name}`, then ends the run and returns its result.
    fn finish_after(mut self, name: &str) -> Value {
        self.status(name, Duration::from_secs(15));
        self.finish(Duration::from_secs(10))
    }

    /// The result line; panics unless the scenario passed and the script exited 0.
    fn finish(mut self, within: Duration) -> Value {
        self.release();
        let until = Instant::now() + within;
        let mut result = None;
        while let Some(v) = self.next(until) {
            if v.get("ok").is_some() {
                result = Some(v);
                break;
            }
        }
        let Some(result) = result else {
            panic!(
                "{}: no result within {within:?}; stdout: {:?}",
                self.what, self.seen
            );
        };
        assert_eq!(
            result["ok"], true,
            "{}: {}\nresult: {result}",
            self.what, result["error"]
        );
        let status = self.child.wait().expect("wait node");
        assert!(status.success(), "{}: exit {status}", self.what);
        result
    }
}

impl Drop for NodeRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs one scenario to the end against `server`.
fn scenario(server: &Server, name: &str, args: &[&str]) -> Value {
    NodeRun::start(server.port, name, args).finish(Duration::from_secs(40))
}

// ---------------------------------------------------------------------------------------------
// The server side

/// conductor on a port of our choosing (the restart tests reuse the port the first one got).
struct FixedPortServer(Child);

impl FixedPortServer {
    fn start(port: u16) -> FixedPortServer {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let mut child = Command::new(bin())
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .env("RUST_LOG", "warn")
                .env("CONDUCTOR_STATE", "none")
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn conductor");
            let mut line = String::new();
            let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
            if line.contains(&format!("127.0.0.1:{port}")) {
                return FixedPortServer(child);
            }
            // Not listening (the port still held?): try again shortly.
            let _ = child.kill();
            let _ = child.wait();
            assert!(
                Instant::now() < until,
                "conductor did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for FixedPortServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sigterm(server: &mut Server) {
    let ok = Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
    assert_eq!(
        server.wait_exit(Duration::from_secs(5)),
        Some(0),
        "conductor did not exit 0 on SIGTERM"
    );
}

/// An HTTP exchange on its own connection: (status, lower-cased headers, body).
fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    http_on(s, port, method, path, headers, body)
}

/// The same from another loopback address (`127.0.0.x`): another peer, as far as the server
/// can tell.
fn http_from(
    from: [u8; 4],
    port: u16,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    http_on(connect_from(from, port), port, method, path, &[], body)
}

/// A TCP connection to the server on 127.0.0.1 from the local address `from`.
fn connect_from(from: [u8; 4], port: u16) -> TcpStream {
    use std::os::fd::FromRawFd;
    let sockaddr = |ip: [u8; 4], port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_be_bytes(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor we own; the address structs outlive them.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket");
        let local = sockaddr(from, 0);
        let rc = libc::bind(fd, &local as *const _ as *const libc::sockaddr, len);
        assert_eq!(rc, 0, "bind to {from:?}");
        let remote = sockaddr([127, 0, 0, 1], port);
        let rc = libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len);
        assert_eq!(rc, 0, "connect from {from:?}");
        TcpStream::from_raw_fd(fd)
    }
}

fn http_on(
    mut s: TcpStream,
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" {
        req.push_str(&format!(
            "Content-Type: text/plain;charset=UTF-8\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("write");
    // Read the head, then the body by Content-Length (the server need not close).
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).unwrap_or(0);
        assert!(
            n > 0,
            "{method} {path}: connection ended without a response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {head:?}"));
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let mut body = buf[head_end..].to_vec();
    while len.is_none_or(|l| body.len() < l) {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

const POLL: &str = "/socket.io/?EIO=4&transport=polling";

/// A polling handshake: the Engine.IO open packet's JSON.
fn handshake(port: u16) -> Value {
    let (status, headers, body) = http(port, "GET", POLL, &[], "");
    assert_eq!(status, 200, "handshake: {body}");
    assert!(
        header(&headers, "content-type").is_some_and(|v| v.starts_with("text/plain")),
        "handshake content-type: {headers:?}"
    );
    let open = body
        .strip_prefix('0')
        .unwrap_or_else(|| panic!("handshake body is not an open packet: {body:?}"));
    serde_json::from_str(open).expect("open packet JSON")
}

/// Asserts an Engine.IO error answer: `status` with `{"code":code,"message":message}`.
fn assert_eio_error(
    answer: (u16, Vec<(String, String)>, String),
    status: u16,
    code: u64,
    message: &str,
) {
    let (got, _, body) = answer;
    assert_eq!(got, status, "{body}");
    let v: Value =
        serde_json::from_str(&body).unwrap_or_else(|_| panic!("error body is not JSON: {body:?}"));
    assert_eq!(v, json!({"code": code, "message": message}));
}

/// A raw Socket.IO client over WebSocket, for frames a stock client never sends.
struct RawSio(common::Client);

impl RawSio {
    /// Opens the Engine.IO session and joins the default namespace.
    fn connect(port: u16) -> RawSio {
        let mut c = common::Client::connect(port, "/socket.io/?EIO=4&transport=websocket");
        let open = RawSio::text(&mut c);
        assert!(open.starts_with("0{"), "first frame {open:?}");
        let mut sio = RawSio(c);
        sio.send("40");
        let connect = sio.next_packet();
        assert!(connect.starts_with("40{"), "connect answer {connect:?}");
        let v: Value = serde_json::from_str(&connect[2..]).expect("connect JSON");
        assert!(v["sid"].is_string(), "{connect}");
        sio
    }

    fn text(c: &mut common::Client) -> String {
        match c.ws.read().expect("read frame") {
            Message::Text(t) => t.to_string(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    fn send(&mut self, text: &str) {
        self.0.send_text(text);
    }

    /// The next packet, answering Engine.IO pings on the way.
    fn next_packet(&mut self) -> String {
        loop {
            let t = RawSio::text(&mut self.0);
            if t == "2" {
                self.send("3");
                continue;
            }
            return t;
        }
    }

    /// The data of the next `42[name, data]` event.
    fn next_event(&mut self, name: &str) -> Value {
        for _ in 0..1000 {
            let p = self.next_packet();
            if let Some(json) = p.strip_prefix("42") {
                let v: Value = serde_json::from_str(json).expect("event JSON");
                if v[0] == name {
                    return v[1].clone();
                }
            }
        }
        panic!("no {name} event in 1000 packets");
    }
}

/// Whether the server is alive and still ticking to a fresh Socket.IO client.
fn assert_alive(server: &Server) {
    assert!(server.stats()["clients"].is_u64());
    let mut c = RawSio::connect(server.port);
    c.next_event("tick");
}

// ---------------------------------------------------------------------------------------------
// The stock client

#[test]
fn websocket_only_client_gets_consecutive_ticks_and_changes_the_tempo() {
    if !stock_client_installed() {
        return;
    }
    let server = Server::start(&[]);
    let r = scenario(&server, "basic", &["--transport", "websocket"]);
    assert_eq!(r["final_transport"], "websocket", "{r}");
    assert!(r["ticks"].as_u64().unwrap() >= 15, "{r}");
    assert_eq!(server.stats()["bpm"], 150);
}

#[test]
fn default_transports_start_on_polling_and_upgrade_to_websocket() {
    if !stock_client_installed() {
        return;
    }
    let server = Server::start(&[]);
    let r = scenario(&server, "basic", &["--transport", "default"]);
    assert_eq!(r["upgraded"], true, "{r}");
    assert_eq!(r["final_transport"], "websocket", "{r}");
    assert_eq!(server.stats()["bpm"], 150);
}

#[test]
fn polling_only_client_gets_consecutive_ticks_and_changes_the_tempo() {
    if !stock_client_installed() {
        return;
    }
    let server = Server::start(&[]);
    let r = scenario(&server, "basic", &["--transport", "polling"]);
    assert_eq!(r["final_transport"], "polling", "{r}");
    assert_eq!(server.stats()["bpm"], 150);
}

/// The client is told to expect a restart, conductor goes away (`graceful`: SIGTERM, else
/// SIGKILL) and comes back on the same port; the stock client reconnects by itself.
fn reconnect_after_restart(transport: &str, graceful: bool) {
    let mut server = Server::start(&[]);
    let port = server.port;
    let mut run = NodeRun::start(port, "reconnect", &["--transport", transport]);
    run.status("ready", Duration::from_secs(15));
    if graceful {
        sigterm(&mut server);
    }
    drop(server);
    std::thread::sleep(Duration::from_millis(300));
    let _again = FixedPortServer::start(port);
    let r = run.finish(Duration::from_secs(30));
    assert!(
        r["counts_after"].as_array().is_some_and(|c| c.len() == 5),
        "{r}"
    );
}

#[test]
fn websocket_client_reconnects_after_a_graceful_restart() {
    if !stock_client_installed() {
        return;
    }
    reconnect_after_restart("websocket", true);
}

#[test]
fn default_transports_client_reconnects_after_a_crash() {
    if !stock_client_installed() {
        return;
    }
    reconnect_after_restart("default", false);
}

#[test]
fn polling_client_reconnects_after_a_graceful_restart() {
    if !stock_client_installed() {
        return;
    }
    reconnect_after_restart("polling", true);
}

#[test]
fn refused_tempo_changes_get_error_events_over_websocket() {
    if !stock_client_installed() {
        return;
    }
    let server = Server::start(&[]);
    let r = scenario(&server, "errors", &["--transport", "websocket"]);
    assert_eq!(r["out_of_range"]["code"], "bpm_out_of_range", "{r}");
    assert_eq!(r["not_a_number"]["code"], "invalid_bpm", "{r}");
    assert_eq!(server.stats()["bpm"], 120);
}

#[test]
fn refused_tempo_changes_get_error_events_over_polling() {
    if !stock_client_installed() {
        return;
    }
    let server = Server::start(&[]);
    scenario(&server, "errors", &["--transport", "polling"]);
    assert_eq!(server.stats()["bpm"], 120);
}

#[test]
fn control_token_comes_as_auth_or_query() {
    if !stock_client_installed() {
        return;
    }
    let server = Server::start(&["--control-token", "s3cret"]);
    scenario(
        &server,
        "token",
        &["--token", "s3cret", "--transport", "websocket"],
    );
    scenario(
        &server,
        "token",
        &["--token", "s3cret", "--transport", "polling"],
    );
    assert_eq!(server.stats()["bpm"], 160);
}

#[test]
fn message_rate_is_limited_as_on_the_plain_protocol() {
    if !stock_client_installed() {
        return;
    }
    let server = Server::start(&["--max-messages-per-sec", "5"]);
    // Over polling the burst arrives as one POST of many packets.
    for transport in ["websocket", "polling"] {
        let r = scenario(&server, "rate", &["--transport", transport]);
        assert!(
            r["error_codes"]
                .as_array()
                .unwrap()
                .contains(&json!("rate_limited")),
            "{r}"
        );
    }
}

#[test]
fn heartbeats_follow_ping_interval_and_timeout() {
    if !stock_client_installed() {
        return;
    }
    let server = Server::start(&["--ping-interval", "1", "--ping-timeout", "1"]);
    let open = handshake(server.port);
    assert_eq!(open["pingInterval"], 1000, "{open}");
    assert_eq!(open["pingTimeout"], 1000, "{open}");
    std::thread::scope(|s| {
        for transport in ["websocket", "polling"] {
            let server = &server;
            s.spawn(move || scenario(server, "pings", &["--transport", transport]));
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Counting, sessions, CORS, raw protocol

/// Polls `/stats` until `clients_by_protocol` is `want` (counts may lag a request behind).
fn wait_for_counts(server: &Server, want: &Value) -> Value {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = server.stats();
        if &stats["clients_by_protocol"] == want || Instant::now() > until {
            return stats;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value of the per-protocol client gauge in `/metrics`.
fn metric_clients(metrics: &str, protocol: &str) -> Option<f64> {
    let label = format!("protocol=\"{protocol}\"");
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split('{').next().is_some_and(|n| n.contains("clients")) && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn stats_and_metrics_count_clients_by_protocol() {
    if !stock_client_installed() {
        return;
    }
    let server = Server::start(&[]);
    let mut plain = server.ws();
    plain.next_event("tick");
    // Default transports: counted as socketio_ws once upgraded, and only once.
    let mut upgraded = NodeRun::start(server.port, "hold", &["--transport", "default"]);
    let mut polling = NodeRun::start(server.port, "hold", &["--transport", "polling"]);
    assert_eq!(
        upgraded.status("connected", Duration::from_secs(15))["transport"],
        "websocket"
    );
    assert_eq!(
        polling.status("connected", Duration::from_secs(15))["transport"],
        "polling"
    );

    let want = json!({"ws": 1, "socketio_ws": 1, "socketio_polling": 1});
    let stats = wait_for_counts(&server, &want);
    assert_eq!(stats["clients_by_protocol"], want, "{stats}");
    assert_eq!(stats["clients"], 3, "{stats}");
    let (status, metrics) = server.get("/metrics");
    assert_eq!(status, 200);
    for (protocol, n) in [("ws", 1.0), ("socketio_ws", 1.0), ("socketio_polling", 1.0)] {
        assert_eq!(
            metric_clients(&metrics, protocol),
            Some(n),
            "clients gauge for {protocol} in:\n{metrics}"
        );
    }

    // Stock clients that disconnect leave at once (polling ones say so in a POST).
    upgraded.finish(Duration::from_secs(10));
    polling.finish(Duration::from_secs(10));
    let want = json!({"ws": 1, "socketio_ws": 0, "socketio_polling": 0});
    let stats = wait_for_counts(&server, &want);
    assert_eq!(stats["clients_by_protocol"], want, "{stats}");
    assert_eq!(stats["clients"], 1, "{stats}");
}

#[test]
fn ticks_carry_the_same_data_as_on_the_plain_protocol() {
    let server = Server::start(&[]);
    let mut plain = server.ws();
    let mut sio = RawSio::connect(server.port);
    let hello = sio.next_event("hello");
    assert_eq!(hello["bpm"], 120, "{hello}");
    assert!(sio.next_event("timeline")["interval_us"].is_number());
    let a = sio.next_event("tick");
    let mut b = plain.next_event("tick")["data"].clone();
    while b["count"].as_u64() < a["count"].as_u64() {
        b = plain.next_event("tick")["data"].clone();
    }
    let mut a = a;
    while a["count"].as_u64() < b["count"].as_u64() {
        a = sio.next_event("tick");
    }
    assert_eq!(a, b);
    let keys: Vec<_> = a.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys.len(), 5, "{a}");
}

#[test]
fn polling_handshake_and_unknown_or_missing_sid() {
    let server = Server::start(&[]);
    let port = server.port;
    let open = handshake(port);
    assert!(
        open["sid"].as_str().is_some_and(|s| !s.is_empty()),
        "{open}"
    );
    assert_eq!(open["upgrades"], json!(["websocket"]), "{open}");
    assert_eq!(open["pingInterval"], 20_000, "{open}");
    assert_eq!(open["pingTimeout"], 10_000, "{open}");
    assert!(open["maxPayload"].is_u64(), "{open}");

    let unknown = format!("{POLL}&sid=nosuchsession");
    assert_eio_error(
        http(port, "GET", &unknown, &[], ""),
        400,
        1,
        "Session ID unknown",
    );
    assert_eio_error(
        http(port, "POST", &unknown, &[], "40"),
        400,
        1,
        "Session ID unknown",
    );
    // A POST without a sid is no handshake.
    let (status, _, body) = http(port, "POST", POLL, &[], "40");
    assert_eq!(status, 400, "{body}");
    assert!(
        serde_json::from_str::<Value>(&body).is_ok_and(|v| v["code"].is_u64()),
        "{body}"
    );
    // A websocket upgrade naming an unknown session.
    let (status, _, body) = http(
        port,
        "GET",
        "/socket.io/?EIO=4&transport=websocket&sid=nosuchsession",
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
        "",
    );
    assert_eq!(status, 400, "{body}");

    assert_eio_error(
        http(
            port,
            "GET",
            "/socket.io/?EIO=4&transport=carrier-pigeon",
            &[],
            "",
        ),
        400,
        0,
        "Transport unknown",
    );
    assert_eio_error(
        http(port, "GET", "/socket.io/?EIO=3&transport=polling", &[], ""),
        400,
        5,
        "Unsupported protocol version",
    );

    // A session from the handshake: connect, then the long-poll answers at once.
    let sid = open["sid"].as_str().unwrap();
    let path = format!("{POLL}&sid={sid}");
    let (status, _, body) = http(port, "POST", &path, &[], "40");
    assert_eq!((status, body.as_str()), (200, "ok"));
    let (status, _, body) = http(port, "GET", &path, &[], "");
    assert_eq!(status, 200);
    let first = body.split('\x1e').next().unwrap();
    assert!(first.starts_with("40{\"sid\":"), "{body:?}");
    assert_alive(&server);
}

#[test]
fn polling_sessions_expire_and_are_capped() {
    let server = Server::start(&[
        "--ping-interval",
        "1",
        "--ping-timeout",
        "1",
        "--max-polling-sessions",
        "2",
    ]);
    let port = server.port;
    let a = handshake(port);
    handshake(port);
    let (status, _, body) = http(port, "GET", POLL, &[], "");
    assert_eq!(
        status, 503,
        "a third session past --max-polling-sessions 2: {body}"
    );

    // Nobody polls: gone within pingInterval + pingTimeout (and a little), and room again.
    std::thread::sleep(Duration::from_millis(3500));
    let path = format!("{POLL}&sid={}", a["sid"].as_str().unwrap());
    assert_eio_error(
        http(port, "GET", &path, &[], ""),
        400,
        1,
        "Session ID unknown",
    );
    handshake(port);
    let stats = server.stats();
    let polling = stats["clients_by_protocol"]["socketio_polling"].as_u64();
    assert!(polling.is_some_and(|n| n <= 1), "{stats}");
}

#[test]
fn cors_for_polling_follows_allowed_origin() {
    let server = Server::start(&["--allowed-origin", "https://stage.example"]);
    let port = server.port;
    let ok = [("Origin", "https://stage.example")];
    let (status, headers, body) = http(port, "GET", POLL, &ok, "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        header(&headers, "access-control-allow-origin"),
        Some("https://stage.example"),
        "{headers:?}"
    );
    // The preflight a browser sends before a POST with credentials or custom headers.
    let (status, headers, _) = http(
        port,
        "OPTIONS",
        POLL,
        &[
            ("Origin", "https://stage.example"),
            ("Access-Control-Request-Method", "POST"),
        ],
        "",
    );
    assert!(
        (200..300).contains(&status),
        "preflight: {status} {headers:?}"
    );
    assert_eq!(
        header(&headers, "access-control-allow-origin"),
        Some("https://stage.example"),
        "{headers:?}"
    );
    assert!(
        header(&headers, "access-control-allow-methods").is_some_and(|m| m.contains("POST")),
        "{headers:?}"
    );

    let evil = [("Origin", "https://evil.example")];
    let (status, headers, _) = http(port, "GET", POLL, &evil, "");
    assert_eq!(status, 403, "{headers:?}");
    assert_ne!(
        header(&headers, "access-control-allow-origin"),
        Some("https://evil.example")
    );
    let ws = server.ws_with("/socket.io/?EIO=4&transport=websocket", &evil);
    assert_eq!(ws.err(), Some(403));
    // Not a browser: allowed.
    handshake(port);
}

#[test]
fn cors_without_allowed_origin_lets_any_page_poll() {
    let server = Server::start(&[]);
    let (status, headers, body) = http(
        server.port,
        "GET",
        POLL,
        &[("Origin", "https://any.example")],
        "",
    );
    assert_eq!(status, 200, "{body}");
    let allow = header(&headers, "access-control-allow-origin");
    assert!(
        allow == Some("https://any.example") || allow == Some("*"),
        "{headers:?}"
    );
}

#[test]
fn raw_socketio_errors_over_websocket() {
    let server = Server::start(&[]);
    let mut c = RawSio::connect(server.port);
    c.send(r#"42["setBpm",999]"#);
    assert_eq!(c.next_event("error")["code"], "bpm_out_of_range");
    c.send(r#"42["setBpm","x"]"#);
    assert_eq!(c.next_event("error")["code"], "invalid_bpm");
    // Another namespace: the stock connect error, and the default one goes on.
    c.send("40/nope,");
    let mut answer = c.next_packet();
    while answer.starts_with("42") {
        answer = c.next_packet();
    }
    assert!(answer.starts_with("44/nope,"), "{answer:?}");
    let err: Value = serde_json::from_str(&answer["44/nope,".len()..]).expect("JSON");
    assert_eq!(err["message"], "Invalid namespace");
    c.next_event("tick");
    c.send(r#"42["setBpm",140]"#);
    assert_eq!(c.next_event("bpmChange"), json!(140));
}

/// Reads whatever comes for `span` (ticks keep coming), or until the server closes.
fn drain(c: &mut RawSio, span: Duration) {
    let until = Instant::now() + span;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        let left = left.max(Duration::from_millis(1));
        c.0.ws.get_ref().set_read_timeout(Some(left)).unwrap();
        if c.0.ws.read().is_err() {
            return;
        }
    }
}

#[test]
fn malformed_packets_never_crash_the_server() {
    let server = Server::start(&[]);
    let garbage: [&str; 12] = [
        "42not json",
        "42[]",
        "42{}",
        "42[1,2]",
        "42[\"setBpm\"",
        "4",
        "9",
        "",
        "41",
        "40{\"token\":",
        "3",
        &"4".repeat(100_000),
    ];
    for g in garbage {
        let mut c = RawSio::connect(server.port);
        c.send(g);
        // An error, a close or nothing: anything but a dead server.
        drain(&mut c, Duration::from_millis(300));
    }
    let mut c = RawSio::connect(server.port);
    c.0.ws
        .send(Message::binary(vec![0x04, 0xff, 0x00]))
        .unwrap();
    drain(&mut c, Duration::from_millis(300));

    // Over polling: garbage bodies and a body far over the limit.
    for body in ["garbage", "42[", "\x1e\x1e", &"x".repeat(2_000_000)] {
        let open = handshake(server.port);
        let path = format!("{POLL}&sid={}", open["sid"].as_str().unwrap());
        let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let _ = s.write_all(req.as_bytes());
        let _ = s.write_all(body.as_bytes());
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out);
        assert!(
            !text.starts_with("HTTP/1.1 5"),
            "POST of {} bytes: {text}",
            body.len()
        );
    }
    assert_alive(&server);
}

/// Tick counts in a polling payload or a WebSocket frame.
fn tick_counts(payload: &str) -> Vec<u64> {
    payload
        .split('\x1e')
        .filter_map(|p| p.strip_prefix("42"))
        .filter_map(|json| serde_json::from_str::<Value>(json).ok())
        .filter(|v| v[0] == "tick")
        .map(|v| v[1]["count"].as_u64().expect("tick count"))
        .collect()
}

#[test]
fn no_tick_is_lost_or_repeated_across_the_upgrade() {
    // 200 BPM: a tick every 75 ms, so several fall into the upgrade.
    let server = Server::start(&["--bpm", "200"]);
    let port = server.port;
    let sid = handshake(port)["sid"].as_str().unwrap().to_string();
    let path = format!("{POLL}&sid={sid}");
    assert_eq!(http(port, "POST", &path, &[], "40").0, 200);
    let mut counts = Vec::new();
    while counts.len() < 4 {
        let (status, _, body) = http(port, "GET", &path, &[], "");
        assert_eq!(status, 200, "{body}");
        counts.extend(tick_counts(&body));
    }
    // As a stock client does: a poll is in flight while the WebSocket probes.
    let parked = {
        let path = path.clone();
        std::thread::spawn(move || http(port, "GET", &path, &[], ""))
    };
    std::thread::sleep(Duration::from_millis(50));
    let mut ws = server
        .ws_with(
            &format!("/socket.io/?EIO=4&transport=websocket&sid={sid}"),
            &[],
        )
        .expect("upgrade");
    ws.send_text("2probe");
    let mut early = Vec::new();
    loop {
        match ws.ws.read().expect("read") {
            Message::Text(t) if t.as_str() == "3probe" => break,
            Message::Text(t) => early.push(t.to_string()),
            _ => {}
        }
    }
    assert!(early.is_empty(), "before 3probe: {early:?}");
    let (status, _, body) = parked.join().unwrap();
    assert_eq!(status, 200, "{body}");
    counts.extend(tick_counts(&body));
    // A slow client: ticks keep coming between the probe and the upgrade packet.
    std::thread::sleep(Duration::from_millis(400));
    ws.send_text("5");
    let until = counts.len() + 10;
    while counts.len() < until {
        if let Message::Text(t) = ws.ws.read().expect("read") {
            counts.extend(tick_counts(&t));
        }
    }
    assert!(
        counts.windows(2).all(|w| w[1] == w[0] + 1),
        "ticks lost or repeated across the upgrade: {counts:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// One peer against the session table (issue 13, D2), and session ids as credentials

/// Reads one HTTP response off a kept-alive connection: (status, body); `None` at EOF.
fn read_response(s: &mut BufReader<TcpStream>) -> Option<(u16, String)> {
    let mut status_line = String::new();
    if s.read_line(&mut status_line).ok()? == 0 {
        return None;
    }
    let status = status_line.split(' ').nth(1)?.parse().ok()?;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        s.read_line(&mut line).ok()?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().ok()?;
        }
    }
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).ok()?;
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The outside attacker's flood: `total` long-polling handshakes pipelined over `conns`
/// kept-alive connections from `from`. Returns the session ids it got, and the statuses.
fn pipelined_handshakes(
    from: [u8; 4],
    port: u16,
    conns: usize,
    total: usize,
) -> (Vec<String>, Vec<u16>) {
    let per_conn = total.div_ceil(conns);
    let one = "GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: t\r\n\r\n";
    let (mut sids, mut statuses) = (Vec::new(), Vec::new());
    let mut streams = Vec::new();
    for _ in 0..conns {
        let mut s = connect_from(from, port);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(one.repeat(per_conn).as_bytes()).unwrap();
        streams.push(BufReader::new(s));
    }
    for mut s in streams {
        // A refusal closes the connection: what was pipelined behind it is not served.
        for _ in 0..per_conn {
            let Some((status, body)) = read_response(&mut s) else {
                break;
            };
            statuses.push(status);
            if status == 200
                && let Some(open) = body.strip_prefix('0')
                && let Ok(v) = serde_json::from_str::<Value>(open)
            {
                sids.push(v["sid"].as_str().unwrap().to_string());
            }
        }
    }
    (sids, statuses)
}

/// D2: one peer pipelined 1,000 handshakes over 17 kept-alive connections and kept the
/// sessions alive with a pong every few seconds, and a stock client (polling first) never
/// connected. Now the peer gets --max-sessions-per-ip sessions, loses them at the handshake
/// timeout however it pongs, and the stock client connects beside it.
#[test]
fn a_peer_pipelining_handshakes_cannot_keep_a_stock_client_out() {
    let server = Server::start(&["--handshake-timeout", "3"]);
    let port = server.port;
    let attacker = [127, 0, 0, 2];
    let (sids, statuses) = pipelined_handshakes(attacker, port, 17, 1000);
    assert!(
        sids.len() <= 32,
        "one address got {} sessions (statuses {:?})",
        sids.len(),
        &statuses[..statuses.len().min(40)]
    );
    assert!(
        statuses.contains(&429),
        "no 429 among {} answers",
        statuses.len()
    );

    let mut stock = NodeRun::start(port, "hold", &["--transport", "default"]);
    // Meanwhile the attacker keeps its sessions busy with pongs, as in the report.
    let keep_alive = std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(5);
        let mut alive = sids.len();
        while Instant::now() < until && alive > 0 {
            alive = 0;
            for sid in &sids {
                let path = format!("{POLL}&sid={sid}");
                if http_from(attacker, port, "POST", &path, "3").0 == 200 {
                    alive += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        (sids, alive)
    });
    let connected = stock.status("connected", Duration::from_secs(15));
    assert_eq!(connected["transport"], "websocket", "{connected}");
    let (sids, alive) = keep_alive.join().unwrap();
    assert_eq!(
        alive, 0,
        "sessions without a namespace connect outlived the handshake timeout"
    );
    for sid in sids.iter().take(3) {
        let path = format!("{POLL}&sid={sid}");
        assert_eio_error(
            http_from(attacker, port, "POST", &path, "3"),
            400,
            1,
            "Session ID unknown",
        );
    }
    let stats = server.stats();
    assert!(
        stats["refused"]["sessions_per_ip"].as_u64() >= Some(1),
        "{stats}"
    );
    assert_eq!(
        stats["refused"]["connect_timeout"].as_u64(),
        Some(sids.len() as u64),
        "{stats}"
    );
    assert_eq!(stats["clients"], 1, "only the stock client counts: {stats}");
    stock.finish(Duration::from_secs(10));
}

/// D2: 300 handshakes (from ten addresses, within the per-address limit) made /ws answer 503
/// under --max-clients 300. Sessions that have not connected to the namespace are not
/// clients.
#[test]
fn handshakes_without_a_connect_do_not_count_against_max_clients() {
    let server = Server::start(&["--max-clients", "300"]);
    let port = server.port;
    let mut sessions = 0;
    for host in 2..12u8 {
        let (sids, _) = pipelined_handshakes([127, 0, 0, host], port, 3, 30);
        sessions += sids.len();
    }
    assert_eq!(sessions, 300);
    let mut plain = server
        .ws_with("/ws", &[])
        .expect("a /ws client beside 300 handshakes");
    plain.next_event("tick");
    let stock = NodeRun::start(port, "hold", &["--transport", "default"]).finish_after("connected");
    assert_eq!(stock["ok"], true, "{stock}");
    let stats = server.stats();
    assert_eq!(stats["refused"]["max_clients"], 0, "{stats}");
}

/// A session id is no credential from another address: a poll, a post or an upgrade with it
/// from elsewhere is told the id is unknown, and the session carries on for its client.
#[test]
fn a_session_answers_only_the_address_that_opened_it() {
    let server = Server::start(&[]);
    let port = server.port;
    let sid = handshake(port)["sid"].as_str().unwrap().to_string();
    let path = format!("{POLL}&sid={sid}");
    assert_eq!(http(port, "POST", &path, &[], "40").0, 200);
    let stranger = [127, 0, 0, 3];
    assert_eio_error(
        http_from(stranger, port, "GET", &path, ""),
        400,
        1,
        "Session ID unknown",
    );
    assert_eio_error(
        http_from(stranger, port, "POST", &path, "42[\"setBpm\",150]"),
        400,
        1,
        "Session ID unknown",
    );
    let upgrade = format!(
        "GET /socket.io/?EIO=4&transport=websocket&sid={sid} HTTP/1.1\r\nHost: t\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let mut s = connect_from(stranger, port);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(upgrade.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    // Its own client still polls it: the connect's answer is waiting.
    let (status, _, body) = http(port, "GET", &path, &[], "");
    assert_eq!(status, 200);
    assert!(body.starts_with("40{"), "{body:?}");
    assert_eq!(server.stats()["bpm"], 120);
}
