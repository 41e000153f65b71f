//! What a public server meets: scanners, slowloris, floods, strangers, dead peers, shutdown.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::Server;
use serde_json::json;
use tungstenite::Message;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn upgrade_request(extra: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{extra}\r\n"
    )
}

/// Polls /stats until `check` holds or 10 s pass.
fn eventually(server: &Server, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = server.stats();
        if check(&stats) {
            return;
        }
        assert!(Instant::now() < until, "{what} never happened: {stats}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn slowloris_connections_are_closed_after_the_handshake_timeout() {
    let server = Server::start(&["--handshake-timeout", "1"]);
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "expected the server to hang up");
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(4),
        "closed only after {waited:?}"
    );
    eventually(&server, "handshake_timeout count", |st| {
        st["refused"]["handshake_timeout"] == 1
    });
}

#[test]
fn oversized_and_malformed_requests_get_431_and_400() {
    let server = Server::start(&[]);
    let big = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(9000)
    );
    assert_eq!(common::parse_response(&server.raw(big.as_bytes())).0, 431);
    let many: String = (0..70).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\nHost: t\r\n{many}\r\n");
    assert_eq!(common::parse_response(&server.raw(many.as_bytes())).0, 431);
    assert_eq!(
        common::parse_response(&server.raw(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")).0,
        400
    );
    // HEAD is served as GET without the body (tests/http.rs).
    for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
        let req = format!("{method} / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
        let text = server.raw(req.as_bytes());
        assert_eq!(common::parse_response(&text).0, 405, "{method}");
    }
}

#[test]
fn invalid_upgrades_get_400() {
    let server = Server::start(&[]);
    for extra in [
        "Sec-WebSocket-Version: 13\r\n".to_string(),
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n".to_string(),
        format!("Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: {KEY}\r\n"),
        format!("Sec-WebSocket-Key: {KEY}\r\n"),
    ] {
        let text = server.raw(upgrade_request(&extra).as_bytes());
        assert_eq!(common::parse_response(&text).0, 400, "{extra}: {text}");
    }
    eventually(&server, "bad_upgrade count", |st| {
        st["refused"]["bad_upgrade"] == 4
    });
}

#[test]
fn paths_cannot_escape_the_embedded_assets() {
    let server = Server::start(&[]);
    for path in [
        "/../Cargo.toml",
        "/%2e%2e/Cargo.toml",
        "/..%2fsrc/main.rs",
        "/www/index.html",
        "//etc/passwd",
    ] {
        assert_eq!(server.get(path).0, 404, "{path}");
    }
}

#[test]
fn oversized_messages_close_with_1009_and_invalid_utf8_with_1007() {
    let server = Server::start(&["--max-message-bytes", "512"]);
    let mut big = server.ws();
    big.next_event("hello");
    big.send_text(&"x".repeat(600));
    assert_eq!(big.expect_close().expect("close").code, CloseCode::Size);

    let mut bad = server.ws();
    bad.next_event("hello");
    let frame = Frame::message(vec![0xff, 0xfe, 0xfd], OpCode::Data(Data::Text), true);
    bad.ws.send(Message::Frame(frame)).unwrap();
    assert_eq!(bad.expect_close().expect("close").code, CloseCode::Invalid);
    eventually(&server, "both closes counted", |st| {
        st["closed"]["message_too_big"] == 1 && st["closed"]["invalid_utf8"] == 1
    });
}

#[test]
fn past_max_clients_upgrades_get_503_and_are_counted() {
    let server = Server::start(&["--max-clients", "2"]);
    let _a = server.ws();
    let _b = server.ws();
    assert_eq!(server.ws_with("/ws", &[]).err(), Some(503));
    eventually(&server, "max_clients refusal", |st| {
        st["refused"]["max_clients"] == 1 && st["clients"] == 2
    });
}

#[test]
fn only_token_holders_may_conduct_but_everyone_hears_the_ticks() {
    let server = Server::start(&["--control-token", "s3cret"]);
    let mut listener = server.ws();
    let hello = listener.next_event("hello");
    assert_eq!(hello["data"]["token_required"], true);
    assert_eq!(hello["data"]["control"], false);
    listener.next_event("tick");
    listener.send_json(&json!({"event": "setBpm", "data": 150}));
    assert_eq!(listener.next_event("error")["data"]["code"], "unauthorized");

    let mut wrong = server.ws_with("/ws?token=guess", &[]).expect("upgrade");
    wrong.next_event("hello");
    wrong.send_json(&json!({"event": "setBpm", "data": 150}));
    assert_eq!(wrong.next_event("error")["data"]["code"], "unauthorized");
    assert_eq!(server.stats()["bpm"], 120);

    let mut by_query = server.ws_with("/ws?token=s3cret", &[]).expect("upgrade");
    assert_eq!(by_query.next_event("hello")["data"]["control"], true);
    by_query.send_json(&json!({"event": "setBpm", "data": 150}));
    assert_eq!(listener.next_event("bpmChange")["data"], 150);

    let mut by_header = server
        .ws_with("/ws", &[("Authorization", "Bearer s3cret")])
        .expect("upgrade");
    assert_eq!(by_header.next_event("hello")["data"]["control"], true);
    by_header.send_json(&json!({"event": "setBpm", "data": 90}));
    assert_eq!(listener.next_event("bpmChange")["data"], 90);
}

#[test]
fn foreign_origins_get_403_and_listed_or_absent_ones_connect() {
    let server = Server::start(&["--allowed-origin", "https://stage.example"]);
    assert_eq!(
        server
            .ws_with("/ws", &[("Origin", "https://evil.example")])
            .err(),
        Some(403)
    );
    assert!(
        server
            .ws_with("/ws", &[("Origin", "https://stage.example")])
            .is_ok()
    );
    assert!(
        server.ws_with("/ws", &[]).is_ok(),
        "no Origin header: not a browser, allowed"
    );
    eventually(&server, "forbidden_origin count", |st| {
        st["refused"]["forbidden_origin"] == 1
    });
}

#[test]
fn dead_peers_are_pinged_then_closed_and_live_ones_stay() {
    let server = Server::start(&["--ping-interval", "1", "--ping-timeout", "1"]);
    // A peer that completes the upgrade and then never reads or answers anything.
    let mut dead = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    dead.write_all(
        upgrade_request(&format!(
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n"
        ))
        .as_bytes(),
    )
    .unwrap();
    // A live client: tungstenite answers pings while it reads.
    let mut live = server.ws();
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        live.next_event("tick");
    }
    eventually(&server, "ping timeout", |st| {
        st["closed"]["ping_timeout"] == 1
    });
    assert_eq!(server.stats()["clients"], 1);
    live.next_event("tick");
    drop(dead);
}

#[test]
fn a_hundred_stalled_clients_leave_a_reading_client_gap_free() {
    // Fast ticks so the stalled clients' buffers fill and they are cut off during the test.
    let server = Server::start(&[
        "--bpm",
        "200",
        "--ppqn",
        "96",
        "--max-queue",
        "16",
        "--rt-priority",
        "0",
    ]);
    let mut stalled = Vec::new();
    for _ in 0..100 {
        let url = format!("ws://127.0.0.1:{}/ws", server.port);
        let stream = common::tiny_buffer_stream(server.port);
        let (ws, _) = tungstenite::client::client(url, stream).expect("handshake");
        stalled.push(ws);
    }
    let mut reader = server.ws();
    let mut last = reader.next_event("tick")["data"]["count"].as_u64().unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    let mut seen = 0;
    while Instant::now() < until {
        let count = reader.next_event("tick")["data"]["count"].as_u64().unwrap();
        assert_eq!(count, last + 1, "the reading client saw a gap");
        last = count;
        seen += 1;
    }
    assert!(seen > 1000, "only {seen} ticks in 5 s at 320 ticks/s");
    let stats = server.stats();
    assert_eq!(stats["dropped_ticks"], 0, "{stats}");
}

#[test]
fn running_out_of_descriptors_pauses_accepting_but_keeps_serving() {
    let server = Server::start_with(&[], Some(48));
    let mut client = server.ws();
    client.next_event("tick");
    // Hold connections open until the server cannot accept more.
    let mut held = Vec::new();
    for _ in 0..60 {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", server.port)) {
            held.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    // The existing client keeps receiving consecutive ticks.
    let a = client.next_event("tick")["data"]["count"].as_u64().unwrap();
    let b = client.next_event("tick")["data"]["count"].as_u64().unwrap();
    assert_eq!(b, a + 1);
    drop(held);
    // Once descriptors are free again, the server accepts and answers.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = server.stats();
        if stats["refused"]["fd_limit"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        assert!(Instant::now() < until, "fd_limit never counted: {stats}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(server.get("/healthz").0, 200);
}

#[test]
fn healthz_is_ok_while_ticks_are_on_time() {
    let server = Server::start(&[]);
    let mut c = server.ws();
    for _ in 0..5 {
        c.next_event("tick");
    }
    assert_eq!(server.get("/healthz"), (200, "ok".to_string()));
    assert_eq!(server.stats()["healthy"], true);
}

/// D1, the last layer: a timing thread that wakes far behind its deadlines (here the whole
/// process was stopped for a second) skips to the present instead of firing the missed ticks
/// back to back, counts them as dropped, and the next ticks come on time.
#[test]
fn a_stalled_timing_thread_skips_the_missed_ticks_instead_of_bursting() {
    // 120 BPM at ppqn 4: 125 ms apart.
    let server = Server::start(&["--rt-priority", "0"]);
    let mut c = server.ws();
    let before_stop = c.next_event("tick")["data"]["count"].as_u64().unwrap();
    let pid = server.pid() as libc::pid_t;
    // SAFETY: signals to the child this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_millis(1000));
    unsafe { libc::kill(pid, libc::SIGCONT) };
    // Every tick from here on, with its arrival: no two may come in a burst.
    let mut arrivals = Vec::new();
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let count = c.next_event("tick")["data"]["count"].as_u64().unwrap();
        arrivals.push((count, Instant::now()));
    }
    for pair in arrivals.windows(2) {
        let ((a, at_a), (b, at_b)) = (pair[0], pair[1]);
        let gap = at_b.duration_since(at_a);
        assert!(
            gap >= Duration::from_millis(40),
            "ticks {a} and {b} arrived {gap:?} apart: {arrivals:?}"
        );
        assert_eq!(b, a + 1, "{arrivals:?}");
    }
    // The stall's eight ticks are not among them: the count jumped over it.
    let first = arrivals.first().map(|(c, _)| *c).unwrap();
    assert!(
        first >= before_stop + 6,
        "tick {before_stop} before the stall, {first} after: {arrivals:?}"
    );
    let stats = server.stats();
    let skipped = stats["skipped_ticks"].as_u64().unwrap();
    assert!(
        skipped >= 5,
        "a second's stall skipped only {skipped}: {stats}"
    );
    assert!(stats["dropped_ticks"].as_u64() >= Some(skipped), "{stats}");
}

/// Pings count against the message rate like any message, and a refused one gets no pong:
/// answering it would be doing the work the limit is there to refuse.
#[test]
fn pings_over_the_message_rate_get_no_pong() {
    let server = Server::start(&["--max-messages-per-sec", "5"]);
    let mut c = server.ws();
    c.next_event("hello");
    for i in 0..25u8 {
        c.ws.send(Message::Ping(vec![i].into())).unwrap();
    }
    let (mut pongs, mut errors) = (Vec::new(), 0);
    let until = Instant::now() + Duration::from_millis(700);
    while Instant::now() < until {
        match c.ws.read() {
            Ok(Message::Pong(p)) => pongs.push(p[0]),
            Ok(Message::Text(t)) if t.contains("rate_limited") => errors += 1,
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(
        pongs,
        [0, 1, 2, 3, 4],
        "pongs only for the pings within the limit"
    );
    assert_eq!(errors, 1, "one rate_limited error");
    // Still connected, and still ticking.
    c.next_event("tick");
}

/// A client that stops reading is found within seconds (its kernel backlog stops falling)
/// and closed as a slow consumer, instead of after its buffers and ours have filled, which
/// at normal tick rates took longer than the ping timeout.
#[test]
fn a_client_that_never_reads_is_closed_within_seconds() {
    // Pings every 10 minutes: the ping timeout must not be what finds it.
    let server = Server::start(&["--ping-interval", "600", "--rt-priority", "0"]);
    let url = format!("ws://127.0.0.1:{}/ws", server.port);
    let (stalled, _) = tungstenite::client::client(url, common::tiny_buffer_stream(server.port))
        .expect("handshake");
    let mut reader = server.ws();
    let started = Instant::now();
    let until = started + Duration::from_secs(20);
    loop {
        reader.next_event("tick");
        let stats = server.stats();
        if stats["closed"]["slow_consumer"] == 1 {
            break;
        }
        assert!(Instant::now() < until, "not closed within 20 s: {stats}");
    }
    let took = started.elapsed();
    eprintln!("a client that never reads was closed after {took:?}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert_eq!(server.stats()["clients"], 1);
    drop(stalled);
}

/// The session limits' flags and their environment variables: a bad value is one line on
/// stderr and status 2, like every other flag.
#[test]
fn session_limit_flags_refuse_bad_values_with_status_2() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = std::process::Command::new(common::bin())
            .args(args)
            .envs(env.iter().copied())
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), err)
    };
    for (args, env) in [
        (&["--max-sessions-per-ip", "0"][..], &[][..]),
        (&["--max-sessions-per-ip", "many"], &[]),
        (&["--client-ip-header", "X Forwarded For"], &[]),
        (&[], &[("CONDUCTOR_MAX_SESSIONS_PER_IP", "0")]),
        (&[], &[("CONDUCTOR_CLIENT_IP_HEADER", "bad:name")]),
    ] {
        let (code, err) = run(args, env);
        assert_eq!(code, Some(2), "{args:?} {env:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?} {env:?}: {err}");
        assert!(err.starts_with("conductor: "), "{err}");
    }
    let (code, help) = {
        let out = std::process::Command::new(common::bin())
            .arg("--help")
            .output()
            .expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert_eq!(code, Some(0));
    assert!(
        help.contains("[env: CONDUCTOR_MAX_SESSIONS_PER_IP="),
        "{help}"
    );
    assert!(help.contains("[env: CONDUCTOR_CLIENT_IP_HEADER="), "{help}");
}
