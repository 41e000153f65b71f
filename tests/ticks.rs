//! Clients choose what they receive (issue 17): `?ticks=all|beat|bar|none` on `/ws`, the same
//! in a Socket.IO handshake's query or its CONNECT's `auth`, against the real binary. Raw
//! WebSocket and Engine.IO frames, and the stock `socket.io-client` in Node
//! (tests/socketio/ticks-test.mjs), which needs `node` and `npm ci --prefix tests/socketio`
//! (`tests/common/require.rs`).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::require::{self, Tool};
use common::{Client, Server};
use serde_json::{Value, json};
use tungstenite::Message;

/// 240 BPM, 4 ticks a beat, 2 beats a bar: a tick every 62.5 ms, a bar every 500 ms.
const FAST: [&str; 8] = [
    "--bpm",
    "240",
    "--max-bpm",
    "400",
    "--ppqn",
    "4",
    "--beats-per-bar",
    "2",
];

/// Every event a `/ws` client gets for `span`, in order (`event` and `data`).
fn collect_for(c: &mut Client, span: Duration) -> Vec<Value> {
    let until = Instant::now() + span;
    c.ws.get_ref()
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut out = Vec::new();
    while Instant::now() < until {
        match c.ws.read() {
            Ok(Message::Text(t)) => out.push(serde_json::from_str(&t).expect("JSON")),
            Ok(Message::Close(c)) => panic!("closed: {c:?}"),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    c.ws.get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    out
}

fn counts(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e["event"] == "tick")
        .map(|e| e["data"]["count"].as_u64().expect("count"))
        .collect()
}

fn names(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("?"))
        .collect()
}

/// The counts step by `step` with no gap, and every one is a multiple of it.
fn assert_every(counts: &[u64], step: u64, what: &str) {
    assert!(counts.len() >= 2, "{what}: too few ticks {counts:?}");
    assert!(
        counts.iter().all(|c| c % step == 0),
        "{what}: not all multiples of {step}: {counts:?}"
    );
    assert!(
        counts.windows(2).all(|w| w[1] == w[0] + step),
        "{what}: a gap or a repeat: {counts:?}"
    );
}

#[test]
fn each_choice_over_ws_gets_its_ticks_and_every_change_in_order() {
    // `named_all` is read only for its hello, and the others one after another: a client left
    // unread longer than the ping timeout is rightly closed (at 10 to 15 s, by where its ping
    // falls in the spread), which is not what this test is about.
    let mut args = FAST.to_vec();
    args.extend(["--ping-timeout", "60"]);
    let server = Server::start(&args);
    let mut all = Client::connect(server.port, "/ws");
    let mut named_all = Client::connect(server.port, "/ws?ticks=all");
    let mut beat = Client::connect(server.port, "/ws?ticks=beat");
    let mut bar = Client::connect(server.port, "/ws?room=main&ticks=bar");
    let mut none = Client::connect(server.port, "/ws?ticks=none");
    // hello says what was chosen; by default it has the predecessor's fields only.
    let hello = all.next_event("hello");
    assert!(hello["data"].get("ticks").is_none(), "{hello}");
    assert_eq!(named_all.next_event("hello")["data"]["ticks"], "all");
    for (c, label) in [(&mut beat, "beat"), (&mut bar, "bar"), (&mut none, "none")] {
        assert_eq!(c.next_event("hello")["data"]["ticks"], label);
        assert_eq!(c.next_json()["event"], "timeline");
    }
    // A clock-sync ping from the client that takes no ticks is answered.
    none.send_json(&json!({"event": "ping", "data": {"t0": 1.5}}));
    let span = Duration::from_millis(1600);
    let before: Vec<Vec<Value>> = [&mut all, &mut beat, &mut bar, &mut none]
        .into_iter()
        .map(|c| collect_for(c, span))
        .collect();
    // Collected one after the other: each saw a different 1.6 s of the stream, all complete.
    assert_every(&counts(&before[0]), 1, "all");
    assert_every(&counts(&before[1]), 4, "beat");
    assert_every(&counts(&before[2]), 8, "bar");
    assert!(counts(&before[3]).is_empty(), "none got ticks");
    let pong = before[3]
        .iter()
        .find(|e| e["event"] == "pong")
        .expect("pong");
    assert_eq!(pong["data"]["t0"], 1.5);

    // A tempo change, then a stop and a start: every client hears each, in order with its
    // ticks (a tick after the anchor is at the new tempo).
    all.send_json(&json!({"event": "setBpm", "data": 300}));
    let after: Vec<Vec<Value>> = [&mut all, &mut beat, &mut bar, &mut none]
        .into_iter()
        .map(|c| collect_for(c, Duration::from_millis(1200)))
        .collect();
    for (events, label) in after.iter().zip(["all", "beat", "bar", "none"]) {
        let n = names(events);
        let change = n.iter().position(|e| *e == "bpmChange");
        let timeline = n.iter().position(|e| *e == "timeline");
        assert!(
            change.is_some() && change < timeline,
            "{label}: bpmChange then timeline: {n:?}"
        );
        let i = change.unwrap_or(0);
        assert_eq!(events[i]["data"], 300, "{label}");
        let anchor = events[timeline.unwrap_or(0)]["data"]["count"]
            .as_u64()
            .unwrap_or(u64::MAX);
        for tick in events.iter().filter(|e| e["event"] == "tick") {
            let count = tick["data"]["count"].as_u64().unwrap_or(0);
            let bpm = tick["data"]["bpm"].as_f64().unwrap_or(0.0);
            assert_eq!(
                bpm,
                if count < anchor { 240.0 } else { 300.0 },
                "{label}: {tick}"
            );
        }
    }
    assert_every(&counts(&after[0]), 1, "all after the change");
    assert!(counts(&after[1]).iter().all(|c| c % 4 == 0), "beat after");
    assert!(counts(&after[2]).iter().all(|c| c % 8 == 0), "bar after");
    assert!(counts(&after[3]).is_empty(), "none after");

    all.send_json(&json!({"event": "stop"}));
    let stopped = collect_for(&mut none, Duration::from_millis(800));
    let t = stopped
        .iter()
        .find(|e| e["event"] == "transport")
        .unwrap_or_else(|| panic!("none: no transport in {:?}", names(&stopped)));
    assert_eq!(t["data"]["state"], "stopped", "{t}");
    assert!(names(&stopped).contains(&"timeline"));
    assert!(counts(&stopped).is_empty());
    // Nobody was closed or fell behind.
    let stats = server.stats();
    assert_eq!(stats["clients"], 5, "{stats}");
}

#[test]
fn bar_lines_follow_beats_per_bar_and_stay_through_a_tempo_change() {
    // 3 beats a bar: bar lines every 12 ticks, as a quantised start would land.
    let server = Server::start(&[
        "--bpm",
        "300",
        "--max-bpm",
        "400",
        "--ppqn",
        "4",
        "--beats-per-bar",
        "3",
    ]);
    let mut bar = Client::connect(server.port, "/ws?ticks=bar");
    let mut conductor = Client::connect(server.port, "/ws?ticks=none");
    assert_eq!(bar.next_event("hello")["data"]["beats_per_bar"], 3);
    let first = collect_for(&mut bar, Duration::from_millis(1300));
    assert_every(&counts(&first), 12, "bar at 3/4");
    conductor.send_json(&json!({"event": "setBpm", "data": 360}));
    let then = collect_for(&mut bar, Duration::from_millis(1500));
    let c = counts(&then);
    assert!(
        !c.is_empty(),
        "bar lines after the change: {:?}",
        names(&then)
    );
    assert_every(
        &[&counts(&first)[..], &c[..]].concat(),
        12,
        "bar lines through the change",
    );
    assert!(names(&then).contains(&"bpmChange"));
}

#[test]
fn a_bad_choice_is_refused_with_what_is_allowed() {
    let server = Server::start(&[]);
    let (status, body) = common::parse_response(&server.raw(
        b"GET /ws?ticks=loud HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    ));
    assert_eq!(status, 400);
    assert!(
        body.contains("ticks must be one of all, beat, bar or none (got \"loud\")"),
        "{body}"
    );
    // Socket.IO's handshake, polling and WebSocket alike: Engine.IO's JSON error.
    let (status, body) = server.get("/socket.io/?EIO=4&transport=polling&ticks=Beat");
    assert_eq!(status, 400);
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["code"], 3);
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("(got \"Beat\")"),
        "{v}"
    );
    assert_eq!(
        server
            .ws_with("/socket.io/?EIO=4&transport=websocket&ticks=x", &[])
            .err(),
        Some(400)
    );
    // In a CONNECT's auth: a connect error, and the session may connect again.
    let mut sio = sio_open(&server, "");
    sio.send_text(r#"40{"ticks":"loud"}"#);
    let refused = sio_text(&mut sio);
    assert!(refused.starts_with("44{"), "{refused}");
    let v: Value = serde_json::from_str(&refused[2..]).unwrap();
    assert_eq!(v["data"]["code"], "invalid_ticks");
    assert!(
        v["message"].as_str().unwrap_or("").contains("got \"loud\""),
        "{v}"
    );
    sio.send_text(r#"40{"ticks":4}"#);
    let refused = sio_text(&mut sio);
    assert!(refused.contains("ticks must be a string"), "{refused}");
    sio.send_text(r#"40{"ticks":"none"}"#);
    assert!(sio_text(&mut sio).starts_with("40{\"sid\""));
    // Nothing was lost: the refused clients never counted, the server still serves.
    let mut plain = server.ws();
    assert_eq!(plain.next_json()["event"], "hello");
    assert_eq!(server.stats()["clients"], 2);
}

// ---------------------------------------------------------------------------------------------
// Socket.IO, raw frames

/// A Socket.IO client on a WebSocket from the start, past its open packet.
fn sio_open(server: &Server, query: &str) -> Client {
    let mut ws = server
        .ws_with(
            &format!("/socket.io/?EIO=4&transport=websocket{query}"),
            &[],
        )
        .expect("upgrade");
    let open = sio_text(&mut ws);
    assert!(open.starts_with("0{"), "{open}");
    ws
}

fn sio_text(ws: &mut Client) -> String {
    loop {
        match ws.ws.read().expect("read") {
            Message::Text(t) => return t.to_string(),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
    }
}

/// The events a Socket.IO client gets for `span` (`[name, data]`), answering pings.
fn sio_events(ws: &mut Client, span: Duration) -> Vec<Value> {
    let until = Instant::now() + span;
    ws.ws
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut out = Vec::new();
    while Instant::now() < until {
        match ws.ws.read() {
            Ok(Message::Text(t)) if t.as_str() == "2" => ws.send_text("3"),
            Ok(Message::Text(t)) => {
                // `42[...]` or `42/NAME,[...]`.
                if let Some(rest) = t.strip_prefix("42") {
                    let json = rest
                        .split_once(",[")
                        .map_or(rest.to_string(), |(nsp, tail)| {
                            assert!(nsp.starts_with('/'), "{t}");
                            format!("[{tail}")
                        });
                    let v: Value = serde_json::from_str(&json).expect("event JSON");
                    out.push(json!({"event": v[0], "data": v[1]}));
                }
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    out
}

#[test]
fn socketio_chooses_in_the_handshake_query_or_the_connect_auth() {
    let server = Server::start(&FAST);
    // The handshake's query.
    let mut by_query = sio_open(&server, "&ticks=beat");
    by_query.send_text("40");
    // CONNECT's auth, in main and in a named room.
    let mut by_auth = sio_open(&server, "");
    by_auth.send_text(r#"40{"ticks":"none","token":"x"}"#);
    let mut in_room = sio_open(&server, "");
    in_room.send_text(r#"40/band,{"ticks":"bar"}"#);
    // auth wins over the query.
    let mut both = sio_open(&server, "&ticks=none");
    both.send_text(r#"40{"ticks":"all"}"#);
    let mut plain = sio_open(&server, "");
    plain.send_text("40");
    let span = Duration::from_millis(1300);
    let seen: Vec<Vec<Value>> = [
        &mut by_query,
        &mut by_auth,
        &mut in_room,
        &mut both,
        &mut plain,
    ]
    .into_iter()
    .map(|c| sio_events(c, span))
    .collect();
    let hello = |events: &Vec<Value>| {
        events
            .iter()
            .find(|e| e["event"] == "hello")
            .cloned()
            .unwrap_or_else(|| panic!("no hello in {events:?}"))
    };
    assert_eq!(hello(&seen[0])["data"]["ticks"], "beat");
    assert_eq!(hello(&seen[1])["data"]["ticks"], "none");
    assert_eq!(hello(&seen[2])["data"]["ticks"], "bar");
    assert_eq!(hello(&seen[2])["data"]["room"], "band");
    assert_eq!(hello(&seen[3])["data"]["ticks"], "all");
    assert!(hello(&seen[4])["data"].get("ticks").is_none());
    assert_every(&counts(&seen[0]), 4, "query beat");
    assert!(counts(&seen[1]).is_empty(), "auth none got ticks");
    assert!(names(&seen[1]).contains(&"timeline"));
    assert!(counts(&seen[2]).iter().all(|c| c % 8 == 0) && !counts(&seen[2]).is_empty());
    assert_every(&counts(&seen[3]), 1, "auth all");
    assert_every(&counts(&seen[4]), 1, "default");

    // A `none` member of a room hears its tempo change, in order, like an `all` one.
    let mut conductor = sio_open(&server, "");
    conductor.send_text(r#"40/band,{"ticks":"all"}"#);
    let _ = sio_events(&mut conductor, Duration::from_millis(200));
    conductor.send_text(r#"42/band,["setBpm",150]"#);
    for (ws, label) in [(&mut conductor, "all"), (&mut in_room, "bar")] {
        let events = sio_events(ws, Duration::from_millis(800));
        let n = names(&events);
        let change = n.iter().position(|e| *e == "bpmChange");
        let timeline = n.iter().position(|e| *e == "timeline");
        assert!(change.is_some() && change < timeline, "{label}: {n:?}");
    }
}

#[test]
fn a_none_client_and_an_all_client_in_one_room_get_a_tempo_change_in_order() {
    let server = Server::start(&FAST);
    let mut all = Client::connect(server.port, "/ws?room=duo");
    let mut none = Client::connect(server.port, "/ws?room=duo&ticks=none");
    for c in [&mut all, &mut none] {
        c.next_event("timeline");
    }
    let _ = collect_for(&mut all, Duration::from_millis(300));
    none.send_json(&json!({"event": "setBpm", "data": 180}));
    let a = collect_for(&mut all, Duration::from_millis(1500));
    let n = collect_for(&mut none, Duration::from_millis(200));
    for (events, label) in [(&a, "all"), (&n, "none")] {
        let seq = names(events);
        let change = seq.iter().position(|e| *e == "bpmChange");
        let timeline = seq.iter().position(|e| *e == "timeline");
        assert!(change.is_some() && change < timeline, "{label}: {seq:?}");
        let t = &events[timeline.unwrap_or(0)]["data"];
        assert_eq!(t["bpm"], 180, "{label}: {t}");
    }
    // The `all` client: the ticks go on without a gap across the change, at 180 from the
    // anchor on, and its bpmChange comes before the first tick at the new tempo.
    assert_every(&counts(&a), 1, "all through the change");
    let change_at = a
        .iter()
        .position(|e| e["event"] == "bpmChange")
        .unwrap_or(0);
    let first_new = a
        .iter()
        .position(|e| e["event"] == "tick" && e["data"]["bpm"] == 180)
        .expect("a tick at the new tempo");
    assert!(change_at < first_new);
    assert!(counts(&n).is_empty());
}

// ---------------------------------------------------------------------------------------------
// The stock socket.io-client

#[test]
fn a_stock_socketio_client_chooses_with_auth_or_query() {
    if !require::tools(&[
        Tool::Node,
        Tool::NpmPackage {
            dir: "tests/socketio",
            package: "socket.io-client",
        },
    ]) {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/socketio/ticks-test.mjs");
    for transport in ["websocket", "polling"] {
        let server = Server::start(&FAST);
        let out = Command::new("node")
            .arg(&script)
            .arg(format!("http://127.0.0.1:{}", server.port))
            .args(["--transport", transport])
            .output()
            .expect("run node");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let result: Value = stdout
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| {
                panic!(
                    "no result from node ({transport}): {stdout}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        assert_eq!(result["ok"], true, "{transport}: {result}");
        assert_eq!(result["hellos"]["auth"], "beat", "{result}");
        assert_eq!(result["hellos"]["query"], "none", "{result}");
    }
}
