//! Rooms against the real binary: addressing, names, limits, tokens, idle expiry, reporting, a
//! stock Socket.IO client in a namespace; and changes announced a lead ahead that follows the
//! farthest member's measured round trip (issue 14), with a client behind a delaying proxy.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::require::{self, Tool};
use common::{Client, Server};
use serde_json::{Value, json};

fn unix_us_now() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    u64::try_from(d.as_micros()).expect("µs fit")
}

fn join(server: &Server, room: &str) -> Client {
    Client::connect(server.port, &format!("/ws?room={room}"))
}

/// Messages for `span`, the socket's read timeout permitting.
fn collect_for(c: &mut Client, span: Duration) -> Vec<Value> {
    let until = Instant::now() + span;
    c.ws.get_ref()
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut out = Vec::new();
    while Instant::now() < until {
        match c.ws.read() {
            Ok(tungstenite::Message::Text(t)) => out.push(serde_json::from_str(&t).expect("JSON")),
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

#[test]
fn a_tempo_change_in_one_room_leaves_the_others_alone() {
    let server = Server::start(&[]);
    let mut a = join(&server, "band");
    let mut b = join(&server, "choir");
    let mut m = server.ws();
    let hello = a.next_event("hello");
    assert_eq!(hello["data"]["room"], "band");
    assert_eq!(hello["data"]["bpm"], 120, "a room starts at --bpm");
    assert_eq!(b.next_event("hello")["data"]["room"], "choir");
    assert!(m.next_event("hello")["data"].get("room").is_none());
    for c in [&mut a, &mut b, &mut m] {
        c.next_event("tick");
    }

    a.send_json(&json!({"event": "setBpm", "data": 150}));
    assert_eq!(a.next_event("bpmChange")["data"], 150);
    let anchor = a.next_event("timeline")["data"]["count"].as_u64().unwrap();
    loop {
        let t = a.next_event("tick")["data"].clone();
        if t["count"].as_u64().unwrap() >= anchor {
            assert_eq!(t["bpm"], 150);
            break;
        }
    }
    // The other rooms hear nothing of it, and tick on at 120.
    for c in [&mut b, &mut m] {
        let seen = collect_for(c, Duration::from_millis(600));
        assert!(seen.iter().all(|e| e["event"] != "bpmChange"), "{seen:?}");
        let ticks: Vec<&Value> = seen.iter().filter(|e| e["event"] == "tick").collect();
        assert!(ticks.len() >= 3, "{seen:?}");
        assert!(ticks.iter().all(|t| t["data"]["bpm"] == 120), "{ticks:?}");
    }
    let stats = server.stats();
    assert_eq!(stats["rooms"]["band"]["bpm"], 150, "{stats}");
    assert_eq!(stats["rooms"]["choir"]["bpm"], 120);
    assert_eq!(stats["rooms"]["main"]["clients"], 1);
    assert_eq!(stats["rooms"]["band"]["transport"]["state"], "playing");
    assert_eq!(stats["bpm"], 120, "the unlabelled tempo is main's");
    assert_eq!(stats["room_count"], 3);
    // A client of a room gets that room's timeline, and a room's ticks count on their own.
    let mut late = join(&server, "band");
    let timeline = late.next_event("timeline");
    assert_eq!(timeline["data"]["bpm"], 150);
}

#[test]
fn room_names_are_checked_and_main_is_the_default() {
    let server = Server::start(&[]);
    for bad in ["Band", "a%20b", "a.b", &"x".repeat(65)] {
        let refused = server.ws_with(&format!("/ws?room={bad}"), &[]);
        assert_eq!(refused.err(), Some(400), "{bad}");
    }
    let text = server.raw(
        b"GET /ws?room=Nope HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    );
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(
        text.contains("a-z, 0-9"),
        "the rule is in the answer: {text}"
    );
    // No room, an empty one, and main by name are all main.
    for path in ["/ws", "/ws?room=", "/ws?room=main"] {
        let mut c = Client::connect(server.port, path);
        assert!(
            c.next_event("hello")["data"].get("room").is_none(),
            "{path}"
        );
    }
    assert_eq!(server.stats()["room_count"], 1);
}

#[test]
fn past_max_rooms_a_new_room_is_refused_clearly_and_existing_ones_stay_open() {
    let server = Server::start(&["--max-rooms", "2", "--room-idle", "1"]);
    let _m = server.ws();
    let mut a = join(&server, "a");
    a.next_event("hello");
    let text = server.raw(
        b"GET /ws?room=b HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    );
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("--max-rooms"), "{text}");
    let mut again = join(&server, "a");
    again.next_event("hello");
    // Once room a idles out, b fits.
    drop(a);
    drop(again);
    eventually(&server, "room a dropped", |s| s["room_count"] == 1);
    let mut b = join(&server, "b");
    assert_eq!(b.next_event("hello")["data"]["room"], "b");
}

#[test]
fn an_empty_room_is_dropped_after_room_idle_with_its_state_and_main_never() {
    let server = Server::start(&["--room-idle", "2"]);
    let mut a = join(&server, "short");
    a.next_event("tick");
    a.send_json(&json!({"event": "setBpm", "data": 90}));
    a.next_event("bpmChange");
    drop(a);
    thread::sleep(Duration::from_millis(1000));
    let stats = server.stats();
    assert_eq!(stats["rooms"]["short"]["clients"], 0, "{stats}");
    assert_eq!(
        stats["rooms"]["short"]["bpm"], 90,
        "kept while it may come back"
    );
    let gone = eventually(&server, "room short dropped", |s| {
        s["rooms"].get("short").is_none()
    });
    assert_eq!(
        gone["rooms"]["main"]["clients"], 0,
        "main stays, empty: {gone}"
    );
    // Coming back makes a new room, at --bpm: the old state went with it.
    let mut back = join(&server, "short");
    assert_eq!(back.next_event("hello")["data"]["bpm"], 120);
    assert_eq!(back.next_event("timeline")["data"]["bpm"], 120);
}

#[test]
fn a_room_token_lets_its_holder_conduct_that_room_only() {
    let server = Server::start(&["--room-token", "class=teach", "--control-token", "admin"]);
    let cases = [
        ("/ws?room=class&token=teach", true),
        ("/ws?room=class&token=admin", true),
        ("/ws?room=class", false),
        ("/ws?room=class&token=wrong", false),
        ("/ws?room=other&token=teach", false),
        ("/ws?room=other&token=admin", true),
        ("/ws?token=teach", false),
    ];
    for (path, may) in cases {
        let mut c = Client::connect(server.port, path);
        let hello = c.next_event("hello");
        assert_eq!(hello["data"]["control"], may, "{path}");
        assert_eq!(hello["data"]["token_required"], true, "{path}");
        c.send_json(&json!({"event": "stop"}));
        let answer = loop {
            let m = c.next_json();
            if m["event"] == "transport" || m["event"] == "error" {
                break m;
            }
        };
        if may {
            assert_eq!(answer["event"], "transport", "{path}: {answer}");
            c.send_json(&json!({"event": "start"}));
            let _ = c.next_event("transport");
        } else {
            assert_eq!(answer["data"]["code"], "unauthorized", "{path}: {answer}");
        }
    }
    // Without --control-token, a room without a token of its own is open to all.
    let open = Server::start(&["--room-token", "class=teach"]);
    let mut c = Client::connect(open.port, "/ws?room=jam");
    let hello = c.next_event("hello");
    assert_eq!(hello["data"]["control"], true);
    assert_eq!(hello["data"]["token_required"], false);
}

/// The `hello` of a Socket.IO client over WebSocket in namespace `nsp` (`/` is `main`),
/// connecting with `auth` (the stock client's `auth` option, e.g. `{"token": …}`).
fn socketio_hello(server: &Server, nsp: &str, auth: Option<Value>) -> Value {
    let mut c = Client::connect(server.port, "/socket.io/?EIO=4&transport=websocket");
    let open = c.ws.read().expect("the Engine.IO open packet");
    assert!(open.to_text().unwrap_or("").starts_with('0'), "{open:?}");
    let prefix = if nsp == "/" {
        String::new()
    } else {
        format!("{nsp},")
    };
    let auth = auth.map(|a| a.to_string()).unwrap_or_default();
    c.send_text(&format!("40{prefix}{auth}"));
    let event_prefix = format!("42{prefix}");
    for _ in 0..100 {
        let m = c.ws.read().expect("a Socket.IO packet");
        let text = m.to_text().unwrap_or("");
        if let Some(rest) = text.strip_prefix(&event_prefix)
            && rest.starts_with("[\"hello\",")
        {
            let event: Value = serde_json::from_str(rest).expect("hello JSON");
            return event[1].clone();
        }
    }
    panic!("no hello in {nsp}");
}

/// `hello.control` answers for the client's own room: the room's token there, the server's
/// everywhere (docs/rooms.md#who-may-conduct), alike over /ws and Socket.IO namespaces.
#[test]
fn hello_control_answers_per_room_over_both_protocols() {
    let server = Server::start(&["--room-token", "class=teach"]);
    let ws = |path: &str| {
        let mut c = Client::connect(server.port, path);
        c.next_event("hello")["data"].clone()
    };
    let cases = [
        ("ws main", ws("/ws"), true, false),
        (
            "ws main with class's token",
            ws("/ws?token=teach"),
            true,
            false,
        ),
        ("ws class", ws("/ws?room=class"), false, true),
        (
            "ws class with its token",
            ws("/ws?room=class&token=teach"),
            true,
            true,
        ),
        (
            "ws class, wrong token",
            ws("/ws?room=class&token=nope"),
            false,
            true,
        ),
        ("ws jam", ws("/ws?room=jam"), true, false),
        ("sio /", socketio_hello(&server, "/", None), true, false),
        (
            "sio /class",
            socketio_hello(&server, "/class", None),
            false,
            true,
        ),
        (
            "sio /class with its token",
            socketio_hello(&server, "/class", Some(json!({"token": "teach"}))),
            true,
            true,
        ),
        (
            "sio /jam with class's token",
            socketio_hello(&server, "/jam", Some(json!({"token": "teach"}))),
            true,
            false,
        ),
    ];
    for (what, hello, control, required) in cases {
        assert_eq!(hello["control"], control, "{what}: {hello}");
        assert_eq!(hello["token_required"], required, "{what}: {hello}");
    }
}

#[test]
fn metrics_label_the_busiest_rooms_and_keep_the_totals() {
    let server = Server::start(&["--metrics-rooms", "2"]);
    let mut clients = Vec::new();
    for (room, n) in [("a", 1), ("b", 3), ("c", 2)] {
        for _ in 0..n {
            let mut c = join(&server, room);
            c.next_event("hello");
            clients.push(c);
        }
    }
    let (status, text) = server.get("/metrics");
    assert_eq!(status, 200);
    let labelled: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("conductor_room_clients{"))
        .collect();
    assert_eq!(
        labelled,
        [
            "conductor_room_clients{room=\"b\"} 3",
            "conductor_room_clients{room=\"c\"} 2"
        ]
    );
    assert!(text.contains("conductor_clients 6\n"), "{text}");
    assert!(text.contains("conductor_rooms 4\n"), "{text}");
    assert!(
        text.contains("conductor_room_bpm{room=\"b\"} 120\n"),
        "{text}"
    );
    assert!(text.contains("conductor_room_change_lead_seconds{room=\"b\"} "));
    let stats = server.stats();
    assert_eq!(
        stats["rooms"].as_object().unwrap().len(),
        4,
        "/stats has them all"
    );
}

/// `40/NAME,` on a raw polling session joins room NAME; one namespace per session.
#[test]
fn a_namespace_is_a_room_over_raw_engine_io() {
    let server = Server::start(&[]);
    let (status, body) = common::parse_response(&server.raw(
        b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    ));
    assert_eq!(status, 200);
    let open: Value = serde_json::from_str(body.trim_start_matches('0')).unwrap();
    let sid = open["sid"].as_str().unwrap().to_string();
    let post = |payload: &str| {
        let text = server.raw(
            format!(
                "POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: t\r\n\
                 Connection: close\r\nContent-Length: {}\r\n\r\n{payload}",
                payload.len()
            )
            .as_bytes(),
        );
        common::parse_response(&text).0
    };
    // Packets polled but not yet looked for: a poll returns everything queued at once.
    let seen = std::cell::RefCell::new(std::collections::VecDeque::<String>::new());
    let poll_until = |want: &dyn Fn(&str) -> bool| -> String {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let found = seen.borrow().iter().position(|p| want(p));
            if let Some(at) = found {
                let mut seen = seen.borrow_mut();
                let packet = seen.remove(at).unwrap();
                seen.drain(..at);
                return packet;
            }
            let text = server.raw(
                format!(
                    "GET /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: t\r\n\
                     Connection: close\r\n\r\n"
                )
                .as_bytes(),
            );
            let (status, body) = common::parse_response(&text);
            assert_eq!(status, 200, "{body}");
            seen.borrow_mut()
                .extend(body.split('\x1e').map(str::to_string));
            assert!(Instant::now() < until, "not seen; last poll {body:?}");
        }
    };
    assert_eq!(post("40/drums,"), 200);
    let ok = poll_until(&|p| p.starts_with("40/drums,"));
    assert!(ok.contains("\"sid\""), "{ok}");
    let hello = poll_until(&|p| p.starts_with("42/drums,[\"hello\""));
    let hello: Value = serde_json::from_str(&hello["42/drums,".len()..]).unwrap();
    assert_eq!(hello[1]["room"], "drums");
    poll_until(&|p| p.starts_with("42/drums,[\"tick\""));
    // A second namespace on the same session: refused, the stock message, the reason in data.
    assert_eq!(post("40/bass,"), 200);
    let refused = poll_until(&|p| p.starts_with("44/bass,"));
    let err: Value = serde_json::from_str(&refused["44/bass,".len()..]).unwrap();
    assert_eq!(err["message"], "Invalid namespace");
    assert_eq!(err["data"]["code"], "one_room_per_connection");
    // Events in that room reach it; the room is counted.
    assert_eq!(post("42/drums,[\"setBpm\",140]"), 200);
    poll_until(&|p| p.starts_with("42/drums,[\"bpmChange\",140]"));
    let stats = server.stats();
    assert_eq!(stats["rooms"]["drums"]["clients"], 1, "{stats}");
    assert_eq!(stats["rooms"]["main"]["bpm"], 120);
    // Leaving the namespace leaves the room.
    assert_eq!(post("41/drums,"), 200);
    eventually(&server, "left", |s| s["rooms"]["drums"]["clients"] == 0);
}

#[test]
fn a_stock_socketio_client_joins_a_room_by_namespace() {
    if !require::tools(&[
        Tool::Node,
        Tool::NpmPackage {
            dir: "tests/socketio",
            package: "socket.io-client",
        },
    ]) {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/socketio/rooms-test.mjs");
    for transport in ["websocket", "polling"] {
        let server = Server::start(&[]);
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
        assert_eq!(result["rooms"]["band"], "band");
    }
}

// ---------------------------------------------------------------------------------------------
// Changes announced ahead (issue 14)

/// A TCP proxy that holds every chunk `delay` in each direction, in order: a client behind it
/// has a round trip of twice `delay` more than its own.
struct DelayProxy {
    port: u16,
}

impl DelayProxy {
    fn start(target: u16, delay: Duration) -> DelayProxy {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { return };
                let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)) else {
                    return;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                for (from, to) in [
                    (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                    (outbound, inbound),
                ] {
                    Self::pipe(from, to, delay);
                }
            }
        });
        DelayProxy { port }
    }

    /// Reads `from`, and writes each chunk to `to` once it is `delay` old.
    fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
        let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
        thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx
                            .send((Instant::now() + delay, buf[..n].to_vec()))
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        thread::spawn(move || {
            while let Ok((due, bytes)) = rx.recv() {
                thread::sleep(due.saturating_duration_since(Instant::now()));
                if to.write_all(&bytes).is_err() {
                    return;
                }
            }
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    }
}

/// How far ahead of now each kind of change lands, as announced to `c`: (tempo anchor, stop,
/// start) in ms from when it was asked.
fn leads_of_changes(c: &mut Client, bpm: f64) -> (f64, f64, f64) {
    let asked = unix_us_now();
    c.send_json(&json!({"event": "setBpm", "data": bpm}));
    let tl = loop {
        let m = c.next_event("timeline");
        if m["data"]["bpm"] == bpm {
            break m;
        }
    };
    let tempo = (tl["data"]["time_us"].as_u64().unwrap() as f64 - asked as f64) / 1000.0;
    let asked = unix_us_now();
    c.send_json(&json!({"event": "stop"}));
    let stop = c.next_event("transport");
    assert_eq!(stop["data"]["state"], "stopped");
    let stop_ms = (stop["data"]["time_us"].as_u64().unwrap() as f64 - asked as f64) / 1000.0;
    // The start must wait until the stop has begun (a start against a pending stop waits).
    let stop_at = stop["data"]["time_us"].as_u64().unwrap();
    while unix_us_now() < stop_at + 20_000 {
        thread::sleep(Duration::from_millis(10));
    }
    let asked = unix_us_now();
    c.send_json(&json!({"event": "start", "data": {"quantize": "none"}}));
    let start = c.next_event("transport");
    assert_eq!(start["data"]["state"], "playing");
    let start_ms = (start["data"]["time_us"].as_u64().unwrap() as f64 - asked as f64) / 1000.0;
    (tempo, stop_ms, start_ms)
}

/// Polls `/stats` until `check` holds, reading `c` in between: a client that reads answers the
/// server's pings, which is how its round trip is measured.
fn eventually_reading(
    server: &Server,
    c: &mut Client,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let stats = server.stats();
        if check(&stats) {
            return stats;
        }
        assert!(Instant::now() < until, "{what}: {stats}");
        collect_for(c, Duration::from_millis(100));
    }
}

/// A client read on its own thread, so that it answers pings and each message is stamped when
/// it arrives.
struct Reader {
    seen: std::sync::Arc<std::sync::Mutex<Vec<(u64, Value)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Reader {
    fn start(mut c: Client) -> Reader {
        use std::sync::atomic::Ordering;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        let handle = thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                for m in collect_for(&mut c, Duration::from_millis(50)) {
                    s.lock().unwrap().push((unix_us_now(), m));
                }
            }
        });
        Reader {
            seen,
            stop,
            handle: Some(handle),
        }
    }

    /// When the first message matching `pick` arrived, and the message.
    fn arrival(&self, pick: impl Fn(&Value) -> bool) -> Option<(u64, Value)> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .find(|(_, m)| pick(m))
            .cloned()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[test]
fn changes_are_announced_a_lead_ahead_that_follows_the_farthest_round_trip() {
    let server = Server::start(&["--bpm", "200", "--max-bpm", "240"]);
    let mut near = server.ws();
    near.next_event("tick");
    let lead_ms = |s: &Value| s["rooms"]["main"]["lead_ms"].as_f64().unwrap();
    // A LAN room: the floor, 150 ms (plus its sub-millisecond round trip).
    let lan = eventually_reading(&server, &mut near, "near measured", |s| lead_ms(s) > 150.0);
    assert!(lead_ms(&lan) < 160.0, "{lan}");
    let (tempo, stop, start) = leads_of_changes(&mut near, 210.0);
    for (what, ms) in [("tempo", tempo), ("stop", stop), ("start", start)] {
        assert!(
            (150.0..600.0).contains(&ms),
            "{what} {ms} ms ahead on a LAN"
        );
    }

    // A member 150 ms away each way (300 ms round trip) joins: the lead follows it.
    let proxy = DelayProxy::start(server.port, Duration::from_millis(150));
    let far = Reader::start(Client::connect(proxy.port, "/ws"));
    let farther = eventually_reading(&server, &mut near, "far measured", |s| lead_ms(s) > 440.0);
    assert!(lead_ms(&farther) < 700.0, "{farther}");
    let (tempo, stop, start) = leads_of_changes(&mut near, 220.0);
    for (what, ms) in [("tempo", tempo), ("stop", stop), ("start", start)] {
        assert!(
            (440.0..1200.0).contains(&ms),
            "{what} {ms} ms ahead with a far member"
        );
    }
    // The far member hears of each change before it takes effect, with room to spare.
    let (heard, timeline) = far
        .arrival(|m| m["event"] == "timeline" && m["data"]["bpm"] == 220)
        .expect("the far member heard of the tempo change");
    let anchor = timeline["data"]["time_us"].as_u64().unwrap();
    assert!(
        heard + 100_000 < anchor,
        "far member heard of the tempo change {} ms before its anchor",
        (anchor as f64 - heard as f64) / 1000.0
    );
    let (heard, stop) = far
        .arrival(|m| m["event"] == "transport" && m["data"]["state"] == "stopped")
        .expect("the far member heard of the stop");
    assert!(heard + 100_000 < stop["data"]["time_us"].as_u64().unwrap());

    // It leaves: the lead comes back down.
    drop(far);
    eventually_reading(&server, &mut near, "lead back to the floor", |s| {
        lead_ms(s) < 160.0
    });
}

#[test]
fn change_lead_ms_fixes_the_lead() {
    let server = Server::start(&["--change-lead-ms", "400"]);
    let mut c = server.ws();
    c.next_event("tick");
    let stats = eventually_reading(&server, &mut c, "lead", |s| {
        s["rooms"]["main"]["lead_ms"] == 400.0
    });
    assert_eq!(stats["rooms"]["main"]["lead_ms"], 400.0);
    let (tempo, stop, start) = leads_of_changes(&mut c, 130.0);
    for (what, ms) in [("tempo", tempo), ("stop", stop), ("start", start)] {
        assert!((400.0..900.0).contains(&ms), "{what} {ms} ms ahead");
    }
}

/// What conductor.js asks after a WebSocket failed to open: a plain GET of the same URL gets
/// the room's refusal (checked before the handshake), and a good room the usual upgrade answer.
/// `/join?room=NAME` gives the pages' URLs in that room.
#[test]
fn a_plain_get_learns_why_a_room_is_refused_and_join_takes_a_room() {
    let server = Server::start(&["--max-rooms", "2"]);
    let (status, body) = server.get("/ws?room=Bad!");
    assert_eq!(status, 400);
    assert!(
        body.contains(r#"room name "Bad!" has characters other than a-z"#),
        "{body}"
    );
    let (status, body) = server.get("/ws?room=fine");
    assert_eq!(status, 400);
    assert!(body.contains("this endpoint speaks WebSocket"), "{body}");
    let mut full = Client::connect(server.port, "/ws?room=one");
    full.next_event("hello");
    let (status, body) = server.get("/ws?room=two");
    assert_eq!(status, 503);
    assert!(body.contains("--max-rooms"), "{body}");

    let (status, body) = server.get("/join?room=band-2");
    assert_eq!(status, 200, "{body}");
    let join: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(join["room"], "band-2");
    // On loopback there are no LAN URLs (join.rs's unit tests and the browser test, on
    // 0.0.0.0, check the URLs themselves).
    assert!(join["urls"].is_array(), "{join}");
    let (status, body) = server.get("/join");
    let main: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(status, 200);
    assert!(main.get("room").is_none(), "main's /join as before: {main}");
    assert_eq!(server.get("/join?room=main").1, body);
    let (status, body) = server.get("/join?room=No");
    assert_eq!(status, 400);
    assert!(body.contains("room name \"No\""), "{body}");
}
