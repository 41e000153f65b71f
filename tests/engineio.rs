//! Engine.IO / Socket.IO at the byte level, against the real binary: the handshake, polls,
//! posts, errors a stock client understands, CORS, caps, the heartbeat and the upgrade probe.
//! (tests/socketio.rs drives the stock socket.io-client itself.)

mod common;

use std::time::{Duration, Instant};

use common::{Server, parse_response};
use serde_json::Value;
use tungstenite::Message;

const SEP: char = '\u{1e}';

/// A polling request's raw response: (status, headers+body text).
fn request(server: &Server, method: &str, query: &str, extra: &str, body: &str) -> (u16, String) {
    let text = server.raw(
        format!(
            "{method} /socket.io/?{query} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n{extra}\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let status = parse_response(&text).0;
    (status, text)
}

/// `Server::raw` for a thread that holds only the port.
fn raw_at(port: u16, request: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn body(text: &str) -> &str {
    text.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// Opens a polling session; returns its sid and the open packet's JSON.
fn handshake(server: &Server, extra: &str) -> (String, Value) {
    let (status, text) = request(server, "GET", "EIO=4&transport=polling&t=a", extra, "");
    assert_eq!(status, 200, "{text}");
    let open = body(&text);
    assert!(open.starts_with('0'), "{open}");
    let v: Value = serde_json::from_str(&open[1..]).expect("open packet JSON");
    (v["sid"].as_str().expect("sid").to_string(), v)
}

fn poll(server: &Server, sid: &str) -> (u16, String) {
    let (status, text) = request(
        server,
        "GET",
        &format!("EIO=4&transport=polling&sid={sid}"),
        "",
        "",
    );
    (status, body(&text).to_string())
}

fn post(server: &Server, sid: &str, payload: &str) -> (u16, String) {
    let (status, text) = request(
        server,
        "POST",
        &format!("EIO=4&transport=polling&sid={sid}"),
        "Content-Type: text/plain;charset=UTF-8\r\n",
        payload,
    );
    (status, body(&text).to_string())
}

/// Polls for up to 3 s until a packet passes `pick`; returns what `pick` made of it.
fn poll_for<T>(server: &Server, sid: &str, pick: impl Fn(&str) -> Option<T>) -> Option<T> {
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        if let Some(found) = poll(server, sid).1.split(SEP).find_map(&pick) {
            return Some(found);
        }
    }
    None
}

/// The packets of polls until one is an event named `name`; returns its data.
fn poll_event(server: &Server, sid: &str, name: &str) -> Value {
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let (status, payload) = poll(server, sid);
        assert_eq!(status, 200, "{payload}");
        for packet in payload.split(SEP) {
            if let Some(json) = packet.strip_prefix("42") {
                let v: Value = serde_json::from_str(json).expect("event JSON");
                if v[0] == name {
                    return v[1].clone();
                }
            }
        }
    }
    panic!("no {name} event within 5 s");
}

#[test]
fn polling_handshake_connect_and_ticks() {
    let server = Server::start(&["--bpm", "200", "--ping-interval", "20"]);
    let (sid, open) = handshake(&server, "");
    assert_eq!(sid.len(), 32);
    assert_eq!(open["upgrades"][0], "websocket");
    assert_eq!(open["pingInterval"], 20_000);
    assert_eq!(open["pingTimeout"], 10_000);
    assert!(open["maxPayload"].as_u64().unwrap() >= 4096);
    // A handshake is not a client yet: it counts from its namespace connect on.
    assert_eq!(server.stats()["clients_by_protocol"]["socketio_polling"], 0);

    assert_eq!(post(&server, &sid, "40"), (200, "ok".to_string()));
    assert_eq!(server.stats()["clients_by_protocol"]["socketio_polling"], 1);
    let (status, payload) = poll(&server, &sid);
    assert_eq!(status, 200);
    let first = payload.split(SEP).next().unwrap();
    assert!(first.starts_with("40{\"sid\":"), "{payload}");
    let hello = poll_event(&server, &sid, "tick");
    for field in ["time", "bpm", "count", "time_us", "ppqn"] {
        assert!(hello[field].is_number(), "tick lacks {field}: {hello}");
    }
    // Consecutive counts across polls.
    let mut last = hello["count"].as_u64().unwrap();
    for _ in 0..5 {
        let tick = poll_event(&server, &sid, "tick");
        let count = tick["count"].as_u64().unwrap();
        assert_eq!(count, last + 1, "after {last}");
        last = count;
    }
    // setBpm over a POST, honoured like /ws's.
    assert_eq!(post(&server, &sid, "42[\"setBpm\",150]").0, 200);
    assert_eq!(poll_event(&server, &sid, "bpmChange"), 150);
    assert_eq!(post(&server, &sid, "42[\"setBpm\",999]").0, 200);
    assert_eq!(
        poll_event(&server, &sid, "error")["code"],
        "bpm_out_of_range"
    );
    // With a callback (an ack id), the answer comes through it.
    assert_eq!(post(&server, &sid, "4221[\"setBpm\",160]").0, 200);
    let acked = poll_for(&server, &sid, |p| {
        (p == "4321[{\"ok\":true}]").then_some(())
    });
    assert!(acked.is_some(), "no ack 21 for setBpm");
    assert_eq!(post(&server, &sid, "4222[\"setBpm\",1]").0, 200);
    let refused = poll_for(&server, &sid, |p| {
        p.strip_prefix("4322").map(str::to_string)
    });
    let refused: Value = serde_json::from_str(&refused.expect("no ack 22")).unwrap();
    assert_eq!(refused[0]["ok"], false);
    assert_eq!(refused[0]["error"]["code"], "bpm_out_of_range");
    let (status, text) = request(&server, "PUT", "EIO=4&transport=polling", "", "");
    assert_eq!(status, 405);
    assert!(text.contains("Allow: GET, POST, OPTIONS"), "{text}");
    // A client's close packet ends the session.
    assert_eq!(post(&server, &sid, "1").0, 200);
    assert_eq!(server.stats()["clients_by_protocol"]["socketio_polling"], 0);
    let (status, payload) = poll(&server, &sid);
    assert_eq!(status, 400);
    assert_eq!(payload, r#"{"code":1,"message":"Session ID unknown"}"#);
}

/// Reads one HTTP response (head and Content-Length body) from a kept-alive connection.
fn read_response(s: &mut std::net::TcpStream) -> (String, String) {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("response head");
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("Content-Length");
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).expect("response body");
    (head, String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn long_polling_keeps_its_connection_alive() {
    use std::io::Write;
    let server = Server::start(&["--bpm", "200"]);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let get = |sid: &str| {
        format!("GET /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: t\r\n\r\n")
    };
    s.write_all(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let (head, open) = read_response(&mut s);
    assert!(head.contains("Connection: keep-alive\r\n"), "{head}");
    let v: Value = serde_json::from_str(&open[1..]).unwrap();
    let sid = v["sid"].as_str().unwrap().to_string();
    // A POST and then several polls, all on this one connection (a pipelined pair first).
    let post = format!(
        "POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n40"
    );
    s.write_all(format!("{post}{}", get(&sid)).as_bytes())
        .unwrap();
    assert_eq!(read_response(&mut s).1, "ok");
    let (_, first) = read_response(&mut s);
    assert!(first.starts_with("40{"), "{first}");
    let mut ticks = 0;
    for _ in 0..10 {
        s.write_all(get(&sid).as_bytes()).unwrap();
        let (head, payload) = read_response(&mut s);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        ticks += payload
            .split(SEP)
            .filter(|p| p.starts_with("42[\"tick\""))
            .count();
    }
    assert!(ticks >= 8, "{ticks} ticks in 10 polls");
    // One connection for all of that (the other is this /metrics request).
    let (_, metrics) = server.get("/metrics");
    let accepted: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("conductor_connections_accepted_total "))
        .and_then(|n| n.parse().ok())
        .expect("accepted counter");
    assert_eq!(accepted, 2, "{metrics}");
}

#[test]
fn engine_io_errors_are_the_ones_clients_know() {
    let server = Server::start(&[]);
    let cases = [
        ("EIO=4&transport=polling&sid=deadbeef", "GET", 400, 1),
        ("EIO=3&transport=polling", "GET", 400, 5),
        ("transport=polling", "GET", 400, 5),
        ("EIO=4&transport=flash", "GET", 400, 0),
        ("EIO=4&transport=polling", "POST", 400, 2),
    ];
    for (query, method, status, code) in cases {
        let (got, text) = request(&server, method, query, "", "");
        assert_eq!(got, status, "{method} {query}: {text}");
        let v: Value = serde_json::from_str(body(&text)).expect("JSON error");
        assert_eq!(v["code"], code, "{method} {query}: {text}");
        assert!(v["message"].is_string());
    }
    // A packet type no client sends: 400 "Bad request", and the session is over.
    let (sid, _) = handshake(&server, "");
    let (status, payload) = post(&server, &sid, "9oops");
    assert_eq!(status, 400, "{payload}");
    assert!(payload.contains("\"code\":3"), "{payload}");
    assert_eq!(poll(&server, &sid).0, 400);
    // A malformed Socket.IO packet inside a valid Engine.IO message: an error event.
    let (sid, _) = handshake(&server, "");
    post(&server, &sid, "40");
    assert_eq!(post(&server, &sid, "42[\"setBpm\"").0, 200);
    assert_eq!(poll_event(&server, &sid, "error")["code"], "invalid_packet");
    // An unknown namespace gets a connect error.
    assert_eq!(post(&server, &sid, "40/admin,").0, 200);
    let seen = poll_for(&server, &sid, |p| p.starts_with("44/admin,").then_some(()));
    assert!(seen.is_some(), "no 44 connect error for /admin");
    // Oversized and chunked bodies.
    let big = "4".repeat(70_000);
    assert_eq!(post(&server, &sid, &big).0, 413);
    assert_eq!(server.stats()["healthy"], true);
}

#[test]
fn cors_follows_allowed_origin_and_sessions_are_capped() {
    let server = Server::start(&[
        "--allowed-origin",
        "https://band.example",
        "--max-polling-sessions",
        "1",
    ]);
    let (status, text) = request(
        &server,
        "GET",
        "EIO=4&transport=polling",
        "Origin: https://evil.example\r\n",
        "",
    );
    assert_eq!(status, 403, "{text}");
    assert!(body(&text).contains("\"code\":4"));
    let (status, text) = request(
        &server,
        "OPTIONS",
        "EIO=4&transport=polling",
        "Origin: https://band.example\r\nAccess-Control-Request-Method: POST\r\n",
        "",
    );
    assert_eq!(status, 204, "{text}");
    assert!(text.contains("Access-Control-Allow-Methods: GET, POST, OPTIONS"));
    let (sid, _) = handshake(&server, "Origin: https://band.example\r\n");
    let (status, text) = request(
        &server,
        "POST",
        &format!("EIO=4&transport=polling&sid={sid}"),
        "Origin: https://band.example\r\n",
        "40",
    );
    assert_eq!(status, 200);
    assert!(text.contains("Access-Control-Allow-Origin: https://band.example\r\n"));
    assert!(text.contains("Access-Control-Allow-Credentials: true\r\n"));
    // The cap: one session is all this server takes.
    let (status, text) = request(&server, "GET", "EIO=4&transport=polling", "", "");
    assert_eq!(status, 503, "{text}");
    assert_eq!(server.stats()["refused"]["max_clients"], 1);
}

#[test]
fn silent_polling_sessions_are_pinged_then_expire() {
    let server = Server::start(&["--ping-interval", "1", "--ping-timeout", "1"]);
    let (sid, open) = handshake(&server, "");
    assert_eq!(open["pingInterval"], 1000);
    // The parked poll is answered by the server's ping within the interval.
    let started = Instant::now();
    let (status, payload) = poll(&server, &sid);
    assert_eq!((status, payload.as_str()), (200, "2"));
    assert!(started.elapsed() < Duration::from_millis(1600));
    // Answer it, and the session lives on.
    assert_eq!(post(&server, &sid, "3").0, 200);
    assert_eq!(poll(&server, &sid), (200, "2".to_string()));
    // Then say nothing: closed for the missing pong.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(poll(&server, &sid).0, 400);
    let stats = server.stats();
    // It never connected to the namespace (`40`), so it was never a client, and its end is
    // not a client's close.
    assert_eq!(stats["closed"]["ping_timeout"], 0, "{stats}");
    assert_eq!(stats["clients"], 0);
}

#[test]
fn websocket_upgrade_takes_the_session_over() {
    let server = Server::start(&["--bpm", "200"]);
    let (sid, _) = handshake(&server, "");
    post(&server, &sid, "40");
    let (_, first) = poll(&server, &sid);
    assert!(first.starts_with("40"), "{first}");

    let mut ws = server
        .ws_with(
            &format!("/socket.io/?EIO=4&transport=websocket&sid={sid}"),
            &[],
        )
        .expect("upgrade");
    // One socket per session: a second one is refused, whoever sends it.
    let second = server.ws_with(
        &format!("/socket.io/?EIO=4&transport=websocket&sid={sid}"),
        &[],
    );
    assert_eq!(second.err(), Some(400));
    // Before the probe the socket is not the client: a namespace connect on it is ignored
    // (the loop below fails on anything but 3probe).
    ws.send_text("40");
    // A poll parked now is released once the probe succeeds.
    let port = server.port;
    let sid2 = sid.clone();
    let parked = std::thread::spawn(move || {
        let s = raw_at(
            port,
            &format!(
                "GET /socket.io/?EIO=4&transport=polling&sid={sid2} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            ),
        );
        body(&s).to_string()
    });
    std::thread::sleep(Duration::from_millis(100));
    ws.send_text("2probe");
    loop {
        match ws.ws.read().expect("read") {
            Message::Text(t) if t.as_str() == "3probe" => break,
            Message::Text(t) => panic!("before 3probe: {t}"),
            _ => {}
        }
    }
    let released = parked.join().unwrap();
    assert!(
        released.split(SEP).all(|p| p == "6" || p.starts_with("42")),
        "parked poll answered with {released:?}"
    );
    ws.send_text("5");
    let mut counts = Vec::new();
    while counts.len() < 4 {
        if let Message::Text(t) = ws.ws.read().expect("read")
            && let Some(json) = t.strip_prefix("42")
        {
            let v: Value = serde_json::from_str(json).unwrap();
            if v[0] == "tick" {
                counts.push(v[1]["count"].as_u64().unwrap());
            }
        }
    }
    assert!(counts.windows(2).all(|w| w[1] == w[0] + 1), "{counts:?}");
    let stats = server.stats();
    assert_eq!(stats["clients_by_protocol"]["socketio_ws"], 1, "{stats}");
    assert_eq!(
        stats["clients_by_protocol"]["socketio_polling"], 0,
        "{stats}"
    );
    // The session id now belongs to the WebSocket: polling with it is over.
    assert_eq!(poll(&server, &sid).0, 400);
    // A bad Engine.IO packet closes the socket with a protocol error.
    ws.send_text("9");
    let close = ws.expect_close().expect("close frame");
    assert_eq!(u16::from(close.code), 1002);
}

#[test]
fn websocket_only_clients_get_the_open_packet_and_pings() {
    let server = Server::start(&["--ping-interval", "1", "--ping-timeout", "5"]);
    let mut ws = server
        .ws_with("/socket.io/?EIO=4&transport=websocket", &[])
        .expect("upgrade");
    let open = match ws.ws.read().expect("open") {
        Message::Text(t) => t.to_string(),
        other => panic!("{other:?}"),
    };
    assert!(open.starts_with("0{"), "{open}");
    let v: Value = serde_json::from_str(&open[1..]).unwrap();
    assert_eq!(v["upgrades"].as_array().map(Vec::len), Some(0));
    // No events before the namespace connect; then connect, hello, timeline.
    ws.send_text("40");
    let mut names = Vec::new();
    let until = Instant::now() + Duration::from_secs(3);
    let mut pinged = false;
    while Instant::now() < until && !(pinged && names.len() >= 3) {
        if let Message::Text(t) = ws.ws.read().expect("read") {
            if t.as_str() == "2" {
                pinged = true;
                ws.send_text("3");
            } else if let Some(rest) = t.strip_prefix("40") {
                assert!(rest.starts_with("{\"sid\":"), "{t}");
                names.push("connect".to_string());
            } else if let Some(json) = t.strip_prefix("42") {
                let v: Value = serde_json::from_str(json).unwrap();
                names.push(v[0].as_str().unwrap().to_string());
            }
        }
    }
    assert_eq!(&names[..3], ["connect", "hello", "timeline"], "{names:?}");
    assert!(pinged, "no Engine.IO ping within 3 s at --ping-interval 1");
    assert_eq!(server.stats()["clients_by_protocol"]["socketio_ws"], 1);
}

#[test]
fn kept_alive_connections_end_cleanly() {
    use std::io::{Read, Write};
    let server = Server::start(&["--handshake-timeout", "1"]);
    // A client that sends its request and half-closes at once still gets the answer.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out:?}");
    // A kept-alive connection that goes idle is closed, and not counted as a slow handshake.
    let mut idle = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    idle.write_all(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let _ = read_response(&mut idle);
    let mut rest = Vec::new();
    let started = Instant::now();
    let _ = idle.read_to_end(&mut rest);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "idle connection kept open"
    );
    assert_eq!(server.stats()["refused"]["handshake_timeout"], 0);
}

/// A Socket.IO WebSocket that never connects to the namespace (`40`) is a handshake left
/// hanging, not a client: closed at the handshake timeout, like a polling session.
#[test]
fn a_socketio_websocket_without_a_connect_is_closed_at_the_handshake_timeout() {
    let server = Server::start(&["--handshake-timeout", "1"]);
    let mut idle = server
        .ws_with("/socket.io/?EIO=4&transport=websocket", &[])
        .expect("upgrade");
    let started = Instant::now();
    let close = idle.expect_close().expect("a close frame");
    assert_eq!(u16::from(close.code), 1008, "{close:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let stats = server.stats();
    assert_eq!(stats["refused"]["connect_timeout"], 1, "{stats}");
    assert_eq!(stats["clients"], 0, "{stats}");
    // One that connects in time stays.
    let mut joined = server
        .ws_with("/socket.io/?EIO=4&transport=websocket", &[])
        .expect("upgrade");
    joined.send_text("40");
    std::thread::sleep(Duration::from_millis(1500));
    joined.send_text("3");
    assert_eq!(server.stats()["clients"], 1);
}
