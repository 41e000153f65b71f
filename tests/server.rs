//! The real binary, a real WebSocket client: the seed's protocol end to end.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Server, bin};
use serde_json::{Value, json};
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

fn ticks(client: &mut common::Client, n: usize) -> Vec<Value> {
    (0..n)
        .map(|_| client.next_event("tick")["data"].clone())
        .collect()
}

#[test]
fn hello_then_seed_shaped_ticks_with_consecutive_counts() {
    let server = Server::start(&[]);
    let mut c = server.ws();
    let hello = c.next_json();
    assert_eq!(hello["event"], "hello", "{hello}");
    assert_eq!(hello["data"]["bpm"], 120);
    assert_eq!(hello["data"]["ppqn"], 4);
    assert!(hello["data"]["count"].is_u64());
    assert!(hello["data"]["time"].is_u64());

    let ts = ticks(&mut c, 6);
    for t in &ts {
        // The seed's fields, with the seed's types.
        assert!(t["time"].is_u64(), "{t}");
        assert_eq!(t["bpm"], 120, "{t}");
        assert!(t["count"].is_u64(), "{t}");
        assert_eq!(
            t["time"].as_u64().unwrap(),
            t["time_us"].as_u64().unwrap() / 1000
        );
    }
    for pair in ts.windows(2) {
        assert_eq!(
            pair[1]["count"].as_u64().unwrap(),
            pair[0]["count"].as_u64().unwrap() + 1
        );
        // Scheduled instants: exactly one 16th note at 120 BPM apart.
        let dt = pair[1]["time_us"].as_u64().unwrap() - pair[0]["time_us"].as_u64().unwrap();
        assert_eq!(dt, 125_000, "{pair:?}");
    }
    // `time` is the scheduled instant on the wall clock, so it is close to now.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let last = ts[5]["time"].as_i64().unwrap();
    assert!((now_ms - last).abs() < 1000, "time {last} vs now {now_ms}");
}

#[test]
fn ticks_arrive_at_the_120_bpm_interval() {
    let server = Server::start(&[]);
    let mut c = server.ws();
    c.next_event("tick");
    let first = Instant::now();
    let n = 16;
    ticks(&mut c, n);
    let mean = first.elapsed() / n as u32;
    // 125 ms nominal; a loaded 2-core machine may delay one arrival, never the average much.
    assert!(
        mean > Duration::from_millis(120) && mean < Duration::from_millis(130),
        "mean interval {mean:?}"
    );
}

#[test]
fn set_bpm_reaches_every_client_and_sets_the_new_interval() {
    let server = Server::start(&[]);
    let mut a = server.ws();
    let mut b = server.ws();
    a.next_event("tick");
    b.next_event("tick");
    a.send_json(&json!({"event": "setBpm", "data": 150}));

    // The other client hears of it, as the seed's bare number...
    let change = b.next_event("bpmChange");
    assert_eq!(change, json!({"event": "bpmChange", "data": 150}));
    // ...and so does the one that asked.
    assert_eq!(a.next_event("bpmChange")["data"], 150);

    // From the timeline's anchor on (announced a lead ahead: issue 14), the interval is
    // 100 ms; the count runs on throughout.
    let anchor = b.next_event("timeline")["data"]["count"].as_u64().unwrap();
    let mut ts = ticks(&mut b, 1);
    while ts.last().unwrap()["count"].as_u64().unwrap() < anchor {
        let next = b.next_event("tick")["data"].clone();
        assert_eq!(
            next["count"].as_u64().unwrap(),
            ts.last().unwrap()["count"].as_u64().unwrap() + 1
        );
        ts.push(next);
    }
    let from = ts.len() - 1;
    ts.extend(ticks(&mut b, 4));
    let ts = &ts[from..];
    for pair in ts.windows(2) {
        assert_eq!(pair[1]["bpm"], 150);
        assert_eq!(
            pair[1]["count"].as_u64().unwrap(),
            pair[0]["count"].as_u64().unwrap() + 1
        );
        let dt = pair[1]["time_us"].as_u64().unwrap() - pair[0]["time_us"].as_u64().unwrap();
        assert_eq!(dt, 100_000, "{pair:?}");
    }
    assert_eq!(server.stats()["bpm"], 150);

    // Fractional tempos travel as numbers too.
    a.send_json(&json!({"event": "setBpm", "data": 92.5}));
    assert_eq!(b.next_event("bpmChange")["data"], 92.5);
}

#[test]
fn tempo_change_continues_the_count_without_a_gap_or_an_early_tick() {
    let server = Server::start(&["--max-bpm", "240"]);
    let mut a = server.ws();
    let before = a.next_event("tick")["data"].clone();
    a.send_json(&json!({"event": "setBpm", "data": 240}));
    let mut last = before;
    let mut seen_change = false;
    for _ in 0..6 {
        let m = a.next_json();
        match m["event"].as_str() {
            Some("bpmChange") => seen_change = true,
            Some("tick") => {
                let t = &m["data"];
                assert_eq!(
                    t["count"].as_u64().unwrap(),
                    last["count"].as_u64().unwrap() + 1
                );
                let dt = t["time_us"].as_u64().unwrap() - last["time_us"].as_u64().unwrap();
                // Never early: at least the new interval (62.5 ms) after the previous tick.
                assert!(dt >= 62_500, "{dt} µs between {last} and {t}");
                last = t.clone();
            }
            _ => {}
        }
    }
    assert!(seen_change);
}

#[test]
fn bad_input_is_answered_with_an_error_and_changes_nothing() {
    let server = Server::start(&[]);
    let mut c = server.ws();
    c.next_event("hello");
    let cases: [(Message, &str); 7] = [
        (
            Message::text(r#"{"event":"setBpm","data":300}"#),
            "bpm_out_of_range",
        ),
        (
            Message::text(r#"{"event":"setBpm","data":10}"#),
            "bpm_out_of_range",
        ),
        (
            Message::text(r#"{"event":"setBpm","data":"140"}"#),
            "invalid_bpm",
        ),
        (Message::text("{not json"), "invalid_json"),
        (
            Message::text(r#"{"event":"conquer","data":1}"#),
            "unknown_event",
        ),
        (Message::text(r#"["setBpm",140]"#), "invalid_message"),
        (Message::binary(vec![1u8, 2, 3]), "binary_unsupported"),
    ];
    for (message, code) in cases {
        c.ws.send(message).expect("send");
        let err = c.next_event("error");
        assert_eq!(err["data"]["code"], code, "{err}");
        assert!(
            err["data"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // Still connected, still ticking, tempo untouched.
    let t = c.next_event("tick");
    assert_eq!(t["data"]["bpm"], 120);
    let stats = server.stats();
    assert_eq!(stats["bpm"], 120);
    assert_eq!(stats["clients"], 1);
}

#[test]
fn a_bad_client_does_not_disturb_the_others() {
    let server = Server::start(&["--max-message-bytes", "256"]);
    let mut good = server.ws();
    let mut bad = server.ws();
    good.next_event("tick");
    bad.next_event("hello");
    bad.send_text(&"x".repeat(1000));
    let close = bad.expect_close().expect("close frame");
    assert_eq!(close.code, CloseCode::Size);
    let before = good.next_event("tick")["data"]["count"].as_u64().unwrap();
    let after = good.next_event("tick")["data"]["count"].as_u64().unwrap();
    assert_eq!(after, before + 1);
}

#[test]
fn http_endpoints() {
    let server = Server::start(&[]);
    assert_eq!(server.get("/healthz"), (200, "ok".to_string()));

    let (status, page) = server.get("/");
    assert_eq!(status, 200);
    assert!(page.contains("id=\"bpm\""), "{page}");

    let stats = server.stats();
    for key in ["bpm", "clients", "count", "uptime_s"] {
        assert!(stats[key].is_number(), "{key} in {stats}");
    }
    for key in ["tick_lateness_us", "fanout_us"] {
        for p in ["p50", "p99", "p999", "max"] {
            assert!(stats[key][p].is_number(), "{key}.{p} in {stats}");
        }
    }

    let (status, metrics) = server.get("/metrics");
    assert_eq!(status, 200);
    for name in [
        "conductor_clients ",
        "conductor_bpm ",
        "conductor_ticks_emitted_total ",
        "conductor_messages_sent_total ",
        "conductor_tick_lateness_seconds{quantile=\"0.99\"} ",
        "conductor_fanout_latency_seconds{quantile=\"0.5\"} ",
        "conductor_connections_closed_total{reason=\"slow_consumer\"} ",
        "conductor_connections_refused_total{reason=\"bad_upgrade\"} ",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    assert!(
        metrics
            .lines()
            .all(|l| l.starts_with('#') || l.starts_with("conductor_"))
    );

    let (status, body) = server.get("/nope");
    assert_eq!(status, 404);
    assert!(!body.is_empty());
    let (status, _) = common::parse_response(
        &server.raw(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"),
    );
    assert_eq!(status, 405);
    let (status, body) = server.get("/ws");
    assert_eq!(status, 400, "{body}");
    let (status, _) = common::parse_response(
        &server.raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"),
    );
    assert_eq!(status, 400);
}

#[test]
fn sigterm_closes_clients_with_1001_and_exits_0() {
    let mut server = Server::start(&[]);
    let mut c = server.ws();
    c.next_event("tick");
    let killed = Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let close = c.expect_close().expect("close frame");
    assert_eq!(close.code, CloseCode::Away);
    assert_eq!(server.wait_exit(Duration::from_secs(5)), Some(0));
}

#[test]
fn bad_flags_are_refused_with_one_line_and_status_2() {
    for args in [
        &["--bpm", "500"][..],
        &["--bpm", "abc"],
        &["--ppqn", "0"],
        &["--min-bpm", "150", "--max-bpm", "100"],
        &["--port", "70000"],
        &["--frobnicate"],
    ] {
        let out = Command::new(bin()).args(args).output().expect("run");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("conductor: "), "{err}");
    }
}

#[test]
fn help_lists_every_option_with_its_environment_variable() {
    let out = Command::new(bin()).arg("--help").output().expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--port",
        "--bind",
        "--bpm",
        "--min-bpm",
        "--max-bpm",
        "--ppqn",
        "--max-queue",
    ] {
        assert!(help.contains(flag), "{flag} missing from\n{help}");
    }
    assert!(help.contains("[env: PORT="), "{help}");
    assert!(help.contains("[env: CONDUCTOR_BPM="), "{help}");
}

#[test]
fn a_slow_consumer_is_closed_with_1008_and_counted_while_others_keep_time() {
    // 200 BPM at 960 ppqn: 3,200 ticks a second, so a stalled reader falls behind in moments.
    // Not real-time: this server ticks 3,200 times a second and shares two cores with the
    // other tests' servers.
    let server = Server::start(&[
        "--bpm",
        "200",
        "--ppqn",
        "960",
        "--max-queue",
        "8",
        "--rt-priority",
        "0",
    ]);
    let stream = common::tiny_buffer_stream(server.port);
    let url = format!("ws://127.0.0.1:{}/ws", server.port);
    let (mut slow, _) = tungstenite::client::client(url, stream).expect("handshake");
    let mut healthy = server.ws();

    // The healthy client reads on, gap-free, until the server gives up on the slow one.
    let mut last = healthy.next_event("tick")["data"]["count"]
        .as_u64()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut next_check = Instant::now();
    loop {
        let count = healthy.next_event("tick")["data"]["count"]
            .as_u64()
            .unwrap();
        assert_eq!(count, last + 1, "healthy client saw a gap");
        last = count;
        if Instant::now() >= next_check {
            if server.stats()["closed"]["slow_consumer"] == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "slow consumer never closed");
            next_check = Instant::now() + Duration::from_millis(200);
        }
    }
    // The slow one finds, after the backlog the kernel still held, the 1008 close.
    slow.get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let close = loop {
        match slow.read() {
            Ok(Message::Close(c)) => break c,
            Ok(_) => {}
            Err(e) => panic!("no close frame for the slow consumer: {e}"),
        }
    };
    assert_eq!(close.expect("close frame").code, CloseCode::Policy);
    assert_eq!(server.stats()["clients"], 1);
}

#[test]
fn a_flooding_client_is_rate_limited_then_closed_with_1008() {
    let server = Server::start(&[]);
    let mut c = server.ws();
    c.next_event("hello");
    for _ in 0..25 {
        c.send_text(r#"{"event":"setBpm","data":120}"#);
    }
    let err = c.next_event("error");
    assert_eq!(err["data"]["code"], "rate_limited", "{err}");
    for _ in 0..250 {
        if c.ws
            .send(Message::text(r#"{"event":"setBpm","data":120}"#))
            .is_err()
        {
            break;
        }
    }
    let close = c.expect_close().expect("close frame");
    assert_eq!(close.code, CloseCode::Policy);
    let stats = server.stats();
    assert_eq!(stats["closed"]["rate_limited"], 1, "{stats}");
}

#[test]
fn two_tempo_changes_in_one_interval_space_the_next_tick_by_the_last() {
    let server = Server::start(&[]);
    let mut c = server.ws();
    let before = c.next_event("tick")["data"].clone();
    // Both in one write, well inside one 125 ms interval.
    c.send_text(r#"{"event":"setBpm","data":60}"#);
    c.send_text(r#"{"event":"setBpm","data":200}"#);
    // Announced a lead ahead (issue 14): the tempo changes after the timeline's anchor, so
    // the tick spaced by the new tempo is the one after it.
    let mut anchor = None;
    while anchor.is_none() {
        let m = c.next_json();
        if m["event"] == "timeline" && m["data"]["bpm"] == 200 {
            anchor = m["data"]["count"].as_u64();
        }
    }
    let anchor = anchor.unwrap();
    let mut before = before;
    while before["count"].as_u64().unwrap() < anchor {
        before = c.next_event("tick")["data"].clone();
    }
    let next = c.next_event("tick")["data"].clone();
    assert_eq!(next["bpm"], 200, "{next}");
    assert_eq!(
        next["count"].as_u64().unwrap(),
        before["count"].as_u64().unwrap() + 1
    );
    let dt = next["time_us"].as_u64().unwrap() - before["time_us"].as_u64().unwrap();
    assert!(
        dt <= 76_000,
        "next tick {dt} µs after the last: spaced by the abandoned tempo"
    );
}
