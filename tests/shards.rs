//! Fan-out shards (`--threads N`) against the real binary: ticks reach every client on every
//! shard in order and without gaps; a room whose members sit on different shards goes through
//! a tempo change, a stop and a start with every member hearing the same timelines in order;
//! `/stats` adds up over the shards; Socket.IO long-polling and its upgrade find their session
//! whichever shard a request lands on.

mod common;

use std::collections::BTreeSet;
use std::thread;
use std::time::{Duration, Instant};

use common::{Client, Server, parse_response};
use serde_json::{Value, json};
use tungstenite::Message;

const SEP: char = '\u{1e}';

/// Every JSON message `c` gets for `span`.
fn collect_for(c: &mut Client, span: Duration) -> Vec<Value> {
    let until = Instant::now() + span;
    c.ws.get_ref()
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let mut out = Vec::new();
    while Instant::now() < until {
        match c.ws.read() {
            Ok(Message::Text(t)) => out.push(serde_json::from_str(&t).expect("JSON")),
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

/// Polls `/stats` until `check` holds (or panics after 10 s).
fn eventually(server: &Server, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = server.stats();
        if check(&stats) {
            return stats;
        }
        assert!(Instant::now() < until, "{what}: {stats}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Each shard's clients, from `/stats`, in shard order.
fn per_shard(stats: &Value) -> Vec<u64> {
    let n = stats["shard_count"].as_u64().expect("shard_count") as usize;
    (0..n)
        .map(|i| {
            stats["shards"][i.to_string()]["clients"]
                .as_u64()
                .unwrap_or(0)
        })
        .collect()
}

fn names(messages: &[Value]) -> Vec<&str> {
    messages
        .iter()
        .filter_map(|m| m["event"].as_str())
        .collect()
}

fn ticks_everywhere(threads: &str, accept: &str, clients: usize) {
    let server = Server::start(&[
        "--threads",
        threads,
        "--accept",
        accept,
        "--bpm",
        "200",
        "--ppqn",
        "24",
    ]);
    let shards: usize = threads.parse().expect("threads");
    let mut all: Vec<Client> = (0..clients).map(|_| server.ws()).collect();
    let stats = eventually(&server, "every client counted", |s| {
        s["clients"] == clients as u64
    });
    assert_eq!(stats["shard_count"], shards as u64, "{stats}");
    let each = per_shard(&stats);
    assert_eq!(each.len(), shards);
    assert!(
        each.iter().all(|&n| n > 0),
        "a shard holds no client: {each:?}"
    );
    assert_eq!(each.iter().sum::<u64>(), clients as u64, "{stats}");
    assert_eq!(stats["clients_by_protocol"]["ws"], clients as u64);
    for i in 0..shards {
        assert!(
            stats["shards"][i.to_string()]["fanout_p99_us"].is_number(),
            "{stats}"
        );
    }
    let metrics = server.get("/metrics").1;
    assert!(
        metrics.contains(&format!("conductor_shards {shards}\n")),
        "{metrics}"
    );
    // Every client, on whichever shard, gets every tick in order for a few seconds.
    let readers: Vec<_> = all
        .drain(..)
        .map(|mut c| thread::spawn(move || collect_for(&mut c, Duration::from_secs(3))))
        .collect();
    for (i, reader) in readers.into_iter().enumerate() {
        let got = reader.join().expect("reader");
        let counts: Vec<u64> = got
            .iter()
            .filter(|m| m["event"] == "tick")
            .map(|m| m["data"]["count"].as_u64().expect("count"))
            .collect();
        // 200 BPM at ppqn 24: 80 ticks a second.
        assert!(counts.len() > 150, "client {i}: {} ticks", counts.len());
        assert!(
            counts.windows(2).all(|w| w[1] == w[0] + 1),
            "client {i}: a gap or a reordering in {counts:?}"
        );
    }
    // Every message the shards wrote is in the total.
    let stats = server.stats();
    assert!(stats["messages_sent"].as_u64().unwrap_or(0) >= (clients * 150) as u64);
}

#[test]
fn every_client_gets_every_tick_in_order_on_two_shards() {
    ticks_everywhere("2", "handoff", 48);
}

#[test]
fn every_client_gets_every_tick_in_order_on_three_shards() {
    ticks_everywhere("3", "handoff", 60);
}

#[test]
fn reuseport_listeners_spread_clients_too() {
    ticks_everywhere("2", "reuseport", 48);
}

/// Whether tick `count` plays under a `timeline` event's transport.
fn plays(timeline: &Value, count: u64) -> bool {
    let t = &timeline["transport"];
    let from = t["count"].as_u64().expect("transport count");
    let playing = t["state"] == "playing";
    if count >= from { playing } else { !playing }
}

#[test]
fn a_room_across_shards_hears_one_timeline_through_a_tempo_change_and_a_restart() {
    let server = Server::start(&["--threads", "2", "--bpm", "200", "--ppqn", "4"]);
    let mut members: Vec<Client> = (0..24)
        .map(|_| Client::connect(server.port, "/ws?room=jam"))
        .collect();
    let stats = eventually(&server, "every member counted", |s| {
        s["rooms"]["jam"]["clients"] == 24
    });
    let each = per_shard(&stats);
    assert!(
        each.iter().all(|&n| n > 0),
        "members on one shard: {each:?}"
    );
    // One member conducts: a tempo change, a stop, a start; everyone records it all.
    let mut conductor = members.pop().expect("a member");
    let readers: Vec<_> = members
        .drain(..)
        .map(|mut c| thread::spawn(move || collect_for(&mut c, Duration::from_secs(5))))
        .collect();
    thread::sleep(Duration::from_millis(700));
    conductor.send_json(&json!({"event": "setBpm", "data": 180}));
    thread::sleep(Duration::from_millis(1200));
    conductor.send_json(&json!({"event": "stop"}));
    thread::sleep(Duration::from_millis(1000));
    conductor.send_json(&json!({"event": "start"}));
    let heard: Vec<Vec<Value>> = readers
        .into_iter()
        .map(|r| r.join().expect("reader"))
        .collect();
    let timelines = |messages: &[Value]| -> Vec<Value> {
        messages
            .iter()
            .filter(|m| m["event"] == "timeline")
            .map(|m| m["data"].clone())
            .collect()
    };
    let first = timelines(&heard[0]);
    assert!(
        first.len() >= 3,
        "tempo, stop and start each announce a timeline: {:?}",
        names(&heard[0])
    );
    for (i, messages) in heard.iter().enumerate() {
        // The same timelines, anchors and all, for every member on every shard.
        assert_eq!(timelines(messages), first, "member {i}");
        // Every tick is at the tempo of the latest timeline received before it that governs
        // its count: a tick never overtakes the timeline announced after it.
        let mut known: Vec<Value> = Vec::new();
        let mut last: Option<u64> = None;
        let mut ticks = 0;
        for m in messages {
            match m["event"].as_str() {
                Some("timeline") => known.push(m["data"].clone()),
                Some("tick") => {
                    ticks += 1;
                    let count = m["data"]["count"].as_u64().expect("count");
                    let governing = known
                        .iter()
                        .rev()
                        .find(|t| t["count"].as_u64().is_some_and(|a| a <= count));
                    if let Some(t) = governing {
                        assert_eq!(
                            m["data"]["bpm"], t["bpm"],
                            "member {i}: tick {count} at the wrong tempo"
                        );
                        assert!(plays(t, count), "member {i}: tick {count} while stopped");
                    }
                    // Nothing missing: whatever was skipped, the transport had stopped.
                    if let (Some(prev), Some(t)) = (last, known.last()) {
                        for k in prev + 1..count {
                            assert!(
                                !plays(t, k),
                                "member {i}: tick {k} missing between {prev} and {count}"
                            );
                        }
                    }
                    last = Some(count);
                }
                _ => {}
            }
        }
        assert!(ticks > 20, "member {i}: {ticks} ticks");
        let events = names(messages);
        for name in ["bpmChange", "transport"] {
            assert!(
                events.contains(&name),
                "member {i}: no {name} in {events:?}"
            );
        }
    }
}

/// A polling request on a fresh connection (so it may land on any shard).
fn request(port: u16, method: &str, query: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let text = format!(
        "{method} /socket.io/?{query} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(text.as_bytes()).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (status, _) = parse_response(&text);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

#[test]
fn socketio_polling_and_upgrade_find_their_session_on_any_shard() {
    // Each shard listening on its own: a request lands wherever the kernel's hash puts it.
    let server = Server::start(&["--threads", "3", "--accept", "reuseport", "--bpm", "200"]);
    let port = server.port;
    let mut tags = BTreeSet::new();
    let mut upgraded = Vec::new();
    for round in 0..6 {
        let (status, open) = request(port, "GET", "EIO=4&transport=polling&t=a", "");
        assert!(open.len() > 1, "round {round}: {open}");
        assert_eq!(status, 200, "{open}");
        let v: Value = serde_json::from_str(&open[1..]).expect("open packet");
        let sid = v["sid"].as_str().expect("sid").to_string();
        assert_eq!(sid.len(), 32);
        tags.insert(sid[..2].to_string());
        let q = format!("EIO=4&transport=polling&sid={sid}");
        // Each request is a new connection: with three shards most land elsewhere than the
        // session, and are handed to it.
        assert_eq!(request(port, "POST", &q, "40"), (200, "ok".to_string()));
        let mut counts = Vec::new();
        let until = Instant::now() + Duration::from_secs(5);
        while counts.len() < 6 && Instant::now() < until {
            let (status, payload) = request(port, "GET", &q, "");
            assert_eq!(status, 200, "round {round}: {payload}");
            for packet in payload.split(SEP) {
                if let Some(json) = packet.strip_prefix("42") {
                    let e: Value = serde_json::from_str(json).expect("event");
                    if e[0] == "tick" {
                        counts.push(e[1]["count"].as_u64().expect("count"));
                    }
                }
            }
        }
        assert!(counts.len() >= 6, "round {round}: {counts:?}");
        assert!(
            counts.windows(2).all(|w| w[1] == w[0] + 1),
            "round {round}: {counts:?}"
        );
        // The upgrade, wherever its connection lands.
        let mut ws = server
            .ws_with(
                &format!("/socket.io/?EIO=4&transport=websocket&sid={sid}"),
                &[],
            )
            .expect("upgrade");
        ws.send_text("2probe");
        loop {
            match ws.ws.read().expect("read") {
                Message::Text(t) if t.as_str() == "3probe" => break,
                Message::Text(t) => panic!("before 3probe: {t}"),
                _ => {}
            }
        }
        ws.send_text("5");
        let mut counts = Vec::new();
        while counts.len() < 4 {
            if let Message::Text(t) = ws.ws.read().expect("read")
                && let Some(json) = t.strip_prefix("42")
            {
                let e: Value = serde_json::from_str(json).expect("event");
                if e[0] == "tick" {
                    counts.push(e[1]["count"].as_u64().expect("count"));
                }
            }
        }
        assert!(counts.windows(2).all(|w| w[1] == w[0] + 1), "{counts:?}");
        // Spent for polling now, on every shard.
        assert_eq!(request(port, "GET", &q, "").0, 400);
        upgraded.push(ws);
    }
    let stats = eventually(&server, "six upgraded clients", |s| {
        s["clients_by_protocol"]["socketio_ws"] == 6
    });
    assert_eq!(stats["clients"], 6, "{stats}");
    assert!(
        tags.iter()
            .all(|t| ["00", "01", "02"].contains(&t.as_str()))
    );
    // An id naming no shard is unknown, like any other.
    let (status, body) = request(
        port,
        "GET",
        "EIO=4&transport=polling&sid=ff0000000000000000000000000000ff",
        "",
    );
    assert_eq!(
        (status, body.as_str()),
        (400, r#"{"code":1,"message":"Session ID unknown"}"#)
    );
}
