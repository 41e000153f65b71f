//! The follower against a small in-process server that speaks conductor's protocol: hello and
//! timeline on connect, pongs stamped with this host's wall clock, and a close on request. (The
//! real binary is exercised by the probe's `--sync` test, `tools/tests/sync.rs`.)

use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use conductor_sync::{
    EmulatedClock, Follower, FollowerConfig, LocalClock, Quantize, RealClock, SyncError,
    TransportState,
};
use serde_json::{Value, json};
use tungstenite::Message;

fn unix_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// A fake conductor: each connection gets hello + timeline, pongs, and is closed after
/// `close_after` (if set). Messages other than pings are reported on the channel.
struct Fake {
    port: u16,
    received: Receiver<String>,
    close_after: Arc<Mutex<Option<Duration>>>,
}

fn timeline(bpm: f64, anchor_count: u64, anchor_us: i64) -> Value {
    json!({"event": "timeline", "data": {
        "count": anchor_count, "time_us": anchor_us, "time": anchor_us / 1000, "bpm": bpm,
        "ppqn": 4, "beats_per_bar": 4, "interval_us": 60e6 / (bpm * 4.0),
        "transport": {"state": "playing", "count": 0, "time_us": anchor_us, "time": anchor_us / 1000}
    }})
}

fn serve(stream: TcpStream, tx: Sender<String>, close_after: Option<Duration>, anchor_us: i64) {
    let mut ws = tungstenite::accept(stream).unwrap();
    let hello = json!({"event": "hello", "data": {"bpm": 120, "ppqn": 4, "count": 0,
        "min_bpm": 60, "max_bpm": 200, "beats_per_bar": 4, "playing": true, "control": true,
        "token_required": false, "version": "fake"}});
    ws.send(Message::text(hello.to_string())).unwrap();
    ws.send(Message::text(timeline(120.0, 0, anchor_us).to_string()))
        .unwrap();
    ws.get_ref()
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let opened = Instant::now();
    loop {
        if close_after.is_some_and(|d| opened.elapsed() > d) {
            let _ = ws.close(None);
            let _ = ws.flush();
            return;
        }
        match ws.read() {
            Ok(Message::Text(text)) => {
                let t1 = unix_ns();
                let v: Value = serde_json::from_str(&text).unwrap();
                if v["event"] == "ping" {
                    let pong = json!({"event": "pong", "data": {"t0": v["data"]["t0"],
                        "t1": t1 as f64 / 1e6, "t2": unix_ns() as f64 / 1e6}});
                    ws.send(Message::text(pong.to_string())).unwrap();
                } else {
                    if v["event"] == "setBpm" {
                        let t = timeline(v["data"].as_f64().unwrap(), 100, anchor_us + 12_500_000);
                        ws.send(Message::text(t.to_string())).unwrap();
                    }
                    let _ = tx.send(text.to_string());
                }
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Fake {
    fn start() -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, received) = channel();
        let close_after = Arc::new(Mutex::new(None));
        let anchor_us = unix_ns() / 1000;
        {
            let close_after = Arc::clone(&close_after);
            thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { return };
                    let tx = tx.clone();
                    let close = *close_after.lock().unwrap();
                    thread::spawn(move || serve(stream, tx, close, anchor_us));
                }
            });
        }
        Fake {
            port,
            received,
            close_after,
        }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }
}

#[test]
fn follows_a_server_and_recovers_an_emulated_clock() {
    let fake = Fake::start();
    // A device whose clock is 42 s behind and gains 150 µs a second.
    let clock = EmulatedClock::new(-42.0, 150.0).unwrap();
    let mut cfg = FollowerConfig::new(fake.url());
    cfg.clock = Arc::new(clock);
    let follower = Follower::start(cfg).unwrap();
    let state = follower.wait_synced(Duration::from_secs(5)).unwrap();
    assert!(state.connected);
    assert_eq!(state.connects, 1);
    let timeline = state.timeline.unwrap();
    assert_eq!(timeline.bpm(), 120.0);
    assert_eq!(timeline.transport_state(), TransportState::Playing);
    assert_eq!(follower.hello().unwrap().version, "fake");

    // After three seconds of pings, the mapping knows this host's wall clock from the device's
    // to well under a millisecond (loopback; the truth is the emulated clock's own relation).
    thread::sleep(Duration::from_secs(3));
    let reader = follower.reader();
    let s = reader.load();
    let m = s.mapping.unwrap();
    let local = clock.now_ns();
    let truth = RealClock::unix_at_zero_ns() + clock.real_at(local);
    let err = m.to_server(local) - truth;
    assert!(err.abs() < 500_000, "error {err} ns; mapping {m:?}");
    assert!(m.samples() >= 20, "{m:?}");
    // Tick times come back as local times on the device's clock.
    let next = timeline.first_count_at_or_after(m.to_server(local));
    let due = s.tick_local_ns(next).unwrap();
    assert!(
        due >= local - 1000 && due - local <= 125_000_000,
        "{due} vs {local}"
    );

    // Commands reach the server; the timeline that follows is taken, the old grid kept for
    // the ticks before its anchor.
    follower.send_set_bpm(140.0).unwrap();
    follower.send_start(Quantize::Beat).unwrap();
    follower.send_stop().unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        got.push(fake.received.recv_timeout(Duration::from_secs(2)).unwrap());
    }
    assert!(
        got[0].contains("\"setBpm\"") && got[0].contains("140"),
        "{got:?}"
    );
    assert!(
        got[1].contains("\"start\"") && got[1].contains("\"beat\""),
        "{got:?}"
    );
    assert!(got[2].contains("\"stop\""), "{got:?}");
    let s = follower
        .wait_until(Duration::from_secs(2), |s| {
            s.timeline.is_some_and(|t| t.bpm() == 140.0)
        })
        .unwrap();
    let t = s.timeline.unwrap();
    assert_eq!(t.anchor_count(), 100);
    assert_eq!(t.earlier_tempo().unwrap().bpm_milli, 120_000);
    assert_eq!(t.tick_time_ns(99) - t.tick_time_ns(98), 125_000_000);
}

#[test]
fn reconnects_keeping_the_timeline_and_says_so() {
    let fake = Fake::start();
    *fake.close_after.lock().unwrap() = Some(Duration::from_millis(700));
    let mut cfg = FollowerConfig::new(fake.url());
    cfg.min_backoff = Duration::from_millis(50);
    cfg.max_backoff = Duration::from_millis(200);
    let follower = Follower::start(cfg).unwrap();
    follower.wait_synced(Duration::from_secs(5)).unwrap();
    // The server closes; the follower says it is not connected but keeps what it knew.
    let s = follower
        .wait_until(Duration::from_secs(3), |s| !s.connected)
        .unwrap();
    assert!(s.timeline.is_some() && s.mapping.is_some());
    assert!(matches!(
        follower.send_set_bpm(100.0),
        Err(SyncError::NotConnected)
    ));
    // Then it is back.
    *fake.close_after.lock().unwrap() = None;
    let s = follower
        .wait_until(Duration::from_secs(5), |s| s.connected && s.connects >= 2)
        .unwrap();
    assert!(s.timeline.is_some());
}
