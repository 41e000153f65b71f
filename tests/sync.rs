//! Clock sync, the timeline and the transport, against the real binary with a real client.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Client, Server};
use serde_json::{Value, json};
use tungstenite::Message;

fn unix_ms_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
        * 1000.0
}

/// Where the timeline puts tick `n`, in unix µs.
fn predict_us(timeline: &Value, n: u64) -> f64 {
    let d = &timeline["data"];
    let anchor = d["count"].as_u64().expect("anchor count");
    assert!(n >= anchor, "tick {n} is before the anchor {anchor}");
    let bpm = d["bpm"].as_f64().expect("bpm");
    let ppqn = d["ppqn"].as_f64().expect("ppqn");
    d["time_us"].as_f64().expect("time_us") + (n - anchor) as f64 * 60e6 / (bpm * ppqn)
}

/// The hello and the timeline a new client receives first, in that order.
fn connect(server: &Server) -> (Client, Value, Value) {
    let mut c = server.ws();
    let hello = c.next_json();
    assert_eq!(hello["event"], "hello", "{hello}");
    let timeline = c.next_json();
    assert_eq!(timeline["event"], "timeline", "{timeline}");
    (c, hello, timeline)
}

/// Messages until `within` passes; read timeouts end the wait.
fn collect_for(c: &mut Client, within: Duration) -> Vec<Value> {
    let until = Instant::now() + within;
    let mut out = Vec::new();
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        c.ws.get_ref()
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match c.ws.read() {
            Ok(Message::Text(t)) => out.push(serde_json::from_str(&t).expect("JSON")),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) => panic!("read: {e}"),
        }
    }
    c.ws.get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    out
}

#[test]
fn ping_gets_a_pong_with_server_times_and_a_small_offset() {
    let server = Server::start(&[]);
    let (mut c, _, _) = connect(&server);
    let mut best: Option<(f64, f64)> = None; // (rtt, offset)
    for _ in 0..8 {
        let t0 = unix_ms_now();
        c.send_json(&json!({"event": "ping", "data": {"t0": t0}}));
        let pong = c.next_event("pong");
        let t3 = unix_ms_now();
        let d = &pong["data"];
        assert_eq!(d["t0"].as_f64(), Some(t0), "t0 is echoed exactly: {pong}");
        let (t1, t2) = (d["t1"].as_f64().unwrap(), d["t2"].as_f64().unwrap());
        assert!(t1 <= t2, "received {t1} after sent {t2}");
        assert!(t2 - t1 < 50.0, "the server held the ping {} ms", t2 - t1);
        // µs resolution: the fraction carries at most three decimals.
        assert!(((t1 * 1000.0).round() - t1 * 1000.0).abs() < 1e-3);
        let rtt = (t3 - t0) - (t2 - t1);
        let offset = ((t1 - t0) + (t2 - t3)) / 2.0;
        if best.is_none_or(|(r, _)| rtt < r) {
            best = Some((rtt, offset));
        }
        std::thread::sleep(Duration::from_millis(60));
    }
    let (rtt, offset) = best.unwrap();
    eprintln!("best ping: rtt {rtt:.3} ms, offset {offset:.3} ms");
    // One machine, one clock: the lowest-RTT sample's offset is bounded by half its RTT.
    assert!(
        offset.abs() <= rtt / 2.0 + 0.01,
        "offset {offset} ms, rtt {rtt} ms"
    );
    assert!(offset.abs() < 1.0, "offset {offset} ms on loopback");
}

#[test]
fn bad_pings_get_an_error_and_the_connection_stays() {
    let server = Server::start(&[]);
    let (mut c, _, _) = connect(&server);
    c.send_text(r#"{"event":"ping","data":{"t0":"soon"}}"#);
    let e = c.next_event("error");
    assert_eq!(e["data"]["code"], "invalid_ping");
    c.send_json(&json!({"event": "ping", "data": {"t0": 1}}));
    assert_eq!(c.next_event("pong")["data"]["t0"], 1.0);
}

#[test]
fn the_timeline_on_connect_predicts_every_tick() {
    let server = Server::start(&["--bpm", "200"]);
    let (mut c, hello, timeline) = connect(&server);
    assert_eq!(hello["data"]["beats_per_bar"], 4);
    assert_eq!(hello["data"]["playing"], true);
    let d = &timeline["data"];
    assert_eq!(d["bpm"], 200);
    assert_eq!(d["ppqn"], 4);
    assert_eq!(d["beats_per_bar"], 4);
    assert_eq!(d["interval_us"], 75_000.0);
    assert_eq!(d["transport"]["state"], "playing");
    let mut worst = 0.0f64;
    for _ in 0..12 {
        let tick = c.next_event("tick");
        let n = tick["data"]["count"].as_u64().unwrap();
        let actual = tick["data"]["time_us"].as_f64().unwrap();
        let error = (predict_us(&timeline, n) - actual).abs();
        worst = worst.max(error);
        assert!(error < 1000.0, "tick {n}: predicted {error} µs off");
    }
    eprintln!("worst prediction error: {worst} µs");
    // The arithmetic is exact up to rounding to the microsecond.
    assert!(worst <= 2.0, "{worst} µs");
}

#[test]
fn a_tempo_change_announces_its_anchor_and_the_new_timeline_holds() {
    let server = Server::start(&["--bpm", "120"]);
    let (mut c, _, _) = connect(&server);
    let before = c.next_event("tick")["data"]["count"].as_u64().unwrap();
    c.send_json(&json!({"event": "setBpm", "data": 180}));
    assert_eq!(c.next_event("bpmChange")["data"], 180);
    let timeline = c.next_event("timeline");
    let anchor = timeline["data"]["count"].as_u64().unwrap();
    assert_eq!(timeline["data"]["bpm"], 180);
    assert!(anchor > before, "anchor {anchor} not after tick {before}");
    let mut seen_anchor = false;
    for _ in 0..10 {
        let tick = c.next_event("tick");
        let n = tick["data"]["count"].as_u64().unwrap();
        if n < anchor {
            continue;
        }
        seen_anchor |= n == anchor;
        assert_eq!(tick["data"]["bpm"], 180);
        let error = (predict_us(&timeline, n) - tick["data"]["time_us"].as_f64().unwrap()).abs();
        assert!(error < 1000.0, "tick {n}: {error} µs from the timeline");
    }
    assert!(seen_anchor, "the anchor tick {anchor} itself was sent");
    // A client connecting now gets the same timeline.
    let (_, _, fresh) = connect(&server);
    assert_eq!(fresh["data"], timeline["data"]);
}

#[test]
fn stop_silences_ticks_and_start_comes_in_on_the_next_bar() {
    let server = Server::start(&["--bpm", "200"]);
    let (mut c, _, _) = connect(&server);
    let (mut other, _, _) = connect(&server);
    c.next_event("tick");

    c.send_json(&json!({"event": "stop"}));
    let stop = c.next_event("transport");
    assert_eq!(stop["data"]["state"], "stopped");
    let stopped_from = stop["data"]["count"].as_u64().unwrap();
    let timeline = c.next_event("timeline");
    assert_eq!(timeline["data"]["transport"], stop["data"]);
    assert_eq!(other.next_event("transport")["data"], stop["data"]);
    // Ticks already on their way may arrive; none at or after the stop.
    for m in collect_for(&mut c, Duration::from_millis(500)) {
        if m["event"] == "tick" {
            let n = m["data"]["count"].as_u64().unwrap();
            assert!(
                n < stopped_from,
                "tick {n} sent after the stop at {stopped_from}"
            );
        }
    }
    let stats = server.stats();
    assert_eq!(stats["transport"]["state"], "stopped", "{stats}");
    assert!(
        stats["count"].as_u64().unwrap() > stopped_from,
        "the clock runs on"
    );

    c.send_json(&json!({"event": "start"}));
    let asked_at = unix_ms_now();
    let start = c.next_event("transport");
    assert_eq!(start["data"]["state"], "playing");
    let from = start["data"]["count"].as_u64().unwrap();
    assert_eq!(from % 16, 0, "a bar is 4 beats of 4 ticks: {from}");
    let lead_ms = start["data"]["time_us"].as_f64().unwrap() / 1000.0 - asked_at;
    assert!(
        (100.0..=1400.0).contains(&lead_ms),
        "start {lead_ms} ms ahead"
    );
    let timeline = c.next_event("timeline");
    assert_eq!(timeline["data"]["transport"]["state"], "playing");
    let first = c.next_event("tick");
    assert_eq!(first["data"]["count"].as_u64(), Some(from));
    assert_eq!(first["data"]["time_us"], start["data"]["time_us"]);
    let error = (predict_us(&timeline, from) - first["data"]["time_us"].as_f64().unwrap()).abs();
    assert!(error < 1000.0);
    // The stop is announced a lead ahead (issue 14): ticks before its count still come, then
    // nothing until the start.
    let mut next = other.next_event("tick");
    while next["data"]["count"].as_u64().unwrap() < stopped_from {
        next = other.next_event("tick");
    }
    assert_eq!(next["data"]["count"].as_u64(), Some(from));
    assert_eq!(server.stats()["transport"]["state"], "playing");
}

#[test]
fn transport_commands_follow_the_control_rules() {
    let server = Server::start(&["--control-token", "s3cret"]);
    let (mut viewer, hello, _) = connect(&server);
    assert_eq!(hello["data"]["control"], false);
    viewer.send_json(&json!({"event": "stop"}));
    assert_eq!(viewer.next_event("error")["data"]["code"], "unauthorized");
    viewer.send_json(&json!({"event": "start"}));
    assert_eq!(viewer.next_event("error")["data"]["code"], "unauthorized");
    assert_eq!(server.stats()["transport"]["state"], "playing");

    let mut admin = Client::connect(server.port, "/ws?token=s3cret");
    admin.next_event("timeline");
    admin.send_text(r#"{"event":"start","data":{"quantize":"bars"}}"#);
    assert_eq!(
        admin.next_event("error")["data"]["code"],
        "invalid_quantize"
    );
    // Already playing: confirmed to the sender, nobody else hears of it.
    admin.send_json(&json!({"event": "start", "data": {"quantize": "beat"}}));
    let confirm = admin.next_event("transport");
    assert_eq!(confirm["data"]["state"], "playing");
    for m in collect_for(&mut viewer, Duration::from_millis(300)) {
        assert_ne!(m["event"], "transport", "a no-op start was broadcast");
    }
    admin.send_json(&json!({"event": "stop"}));
    assert_eq!(admin.next_event("transport")["data"]["state"], "stopped");
    admin.send_json(&json!({"event": "start", "data": {"quantize": "beat"}}));
    let start = admin.next_event("transport");
    assert_eq!(start["data"]["count"].as_u64().unwrap() % 4, 0);
}
