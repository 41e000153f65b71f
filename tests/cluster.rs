//! Several instances on one timeline (`--cluster`): a real `redis-server` on a free loopback
//! port and two or three real `conductor` processes joined to it.
//!
//! Each test starts its own Redis and uses its own cluster name. Without `redis-server` (Debian
//! package `redis-server`; `.ci/test` installs it) the tests fail with the command that
//! installs it, unless `CONDUCTOR_TEST_SKIP=redis` asks to skip them (`tests/common/require.rs`).
//! They run one at a time: the alignment test measures arrival
//! times, and two cores shared with other tests would only add noise to it.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::require::{self, Tool};
use common::{Client, Server};
use serde_json::{Value, json};

/// One test at a time (see the module comment).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// 200 BPM at ppqn 4: a tick every 75 ms, exactly.
const BPM: &str = "200";
const INTERVAL_US: u64 = 75_000;

fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn unix_us_now() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    u64::try_from(d.as_micros()).expect("µs fit")
}

/// A `redis-server` on a loopback port, with neither snapshots nor an append-only file, so a
/// restart comes back empty. Killed when dropped.
struct Redis {
    child: Option<Child>,
    port: u16,
}

impl Redis {
    /// A new server on a free port; `None` (the skip recorded) when `redis-server` is missing
    /// and `CONDUCTOR_TEST_SKIP` covers it; a failure naming the install command otherwise.
    fn start() -> Option<Redis> {
        if !require::tools(&[Tool::RedisServer]) {
            return None;
        }
        let mut redis = Redis {
            child: None,
            port: free_port(),
        };
        redis.spawn();
        Some(redis)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts the server on `self.port` and waits until it answers PING.
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "redis already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if self.try_command(&["PING"]).is_some_and(|r| r == "+PONG") {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not answer PING", self.port);
    }

    /// Kills the server outright (SIGKILL), as a crash would.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// One command in RESP; the reply's first line (a bulk string's payload for `$`).
    fn try_command(&self, args: &[&str]) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut request = format!("*{}\r\n", args.len());
        for a in args {
            request += &format!("${}\r\n{a}\r\n", a.len());
        }
        s.write_all(request.as_bytes()).ok()?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&reply);
            let complete = match text.strip_prefix('$') {
                // `$-1` is nil; `$LEN\r\nPAYLOAD\r\n` complete when all of it is here.
                Some(rest) => rest.split_once("\r\n").is_some_and(|(len, body)| {
                    len == "-1" || body.len() >= len.parse::<usize>().unwrap_or(0) + 2
                }),
                None => text.ends_with("\r\n"),
            };
            if complete {
                break;
            }
        }
        let text = String::from_utf8_lossy(&reply).into_owned();
        match text.strip_prefix('$') {
            Some(rest) => Some(rest.split("\r\n").nth(1).unwrap_or("").to_string()),
            None => Some(text.trim_end().to_string()),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A conductor instance in cluster `name` on `redis`, asking for `bpm` at start, with `extra`
/// flags.
fn instance_with(redis: &Redis, name: &str, bpm: &str, extra: &[&str]) -> Server {
    let url = redis.url();
    let mut args = vec!["--bpm", bpm, "--cluster", &url, "--cluster-name", name];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn instance_at(redis: &Redis, name: &str, bpm: &str) -> Server {
    instance_with(redis, name, bpm, &[])
}

/// An instance asking for 200 BPM.
fn instance(redis: &Redis, name: &str) -> Server {
    instance_at(redis, name, BPM)
}

/// Polls `/stats` of every server until `cluster.connected` is `want` on all, or panics.
fn wait_connected(servers: &[&Server], want: bool, within: Duration) {
    let until = Instant::now() + within;
    loop {
        let states: Vec<Value> = servers
            .iter()
            .map(|s| s.stats()["cluster"]["connected"].clone())
            .collect();
        if states.iter().all(|c| c == &json!(want)) {
            return;
        }
        assert!(
            Instant::now() < until,
            "cluster.connected is {states:?}, not all {want}, after {within:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A tick as a client saw it.
#[derive(Clone, Copy, Debug)]
struct Seen {
    time_us: u64,
    bpm: f64,
    arrived: Instant,
}

/// A client and everything it has read so far, by kind.
struct Watch {
    client: Client,
    ticks: BTreeMap<u64, Seen>,
    timelines: Vec<Value>,
    bpm_changes: Vec<f64>,
    errors: Vec<Value>,
}

impl Watch {
    /// Connects and takes the hello and the first timeline.
    fn new(server: &Server) -> (Watch, Value) {
        Watch::at(server, "/ws")
    }

    /// As [`Watch::new`], at `path` (a room: `/ws?room=NAME`).
    fn at(server: &Server, path: &str) -> (Watch, Value) {
        let mut client = Client::connect(server.port, path);
        let hello = client.next_event("hello");
        let timeline = client.next_event("timeline");
        let watch = Watch {
            client,
            ticks: BTreeMap::new(),
            timelines: vec![timeline],
            bpm_changes: Vec::new(),
            errors: Vec::new(),
        };
        (watch, hello)
    }

    /// Reads one message and files it; returns its event name.
    fn read_one(&mut self) -> String {
        let m = self.client.next_json();
        let arrived = Instant::now();
        let event = m["event"].as_str().unwrap_or("").to_string();
        match event.as_str() {
            "tick" => {
                let d = &m["data"];
                let count = d["count"].as_u64().expect("tick count");
                let seen = Seen {
                    time_us: d["time_us"].as_u64().expect("tick time_us"),
                    bpm: d["bpm"].as_f64().expect("tick bpm"),
                    arrived,
                };
                assert!(
                    self.ticks.insert(count, seen).is_none(),
                    "tick {count} arrived twice"
                );
            }
            "timeline" => self.timelines.push(m),
            "bpmChange" => self
                .bpm_changes
                .push(m["data"].as_f64().expect("bpmChange number")),
            "error" => self.errors.push(m),
            _ => {}
        }
        event
    }

    /// Reads until a tick with count `count` or later has arrived.
    fn until_count(&mut self, count: u64) {
        while self.ticks.last_key_value().is_none_or(|(&c, _)| c < count) {
            self.read_one();
        }
    }

    /// Reads until `n` more ticks have arrived.
    fn more_ticks(&mut self, n: usize) {
        let want = self.ticks.len() + n;
        while self.ticks.len() < want {
            self.read_one();
        }
    }

    /// Reads until an event `name` arrives; returns it from the filed messages.
    fn until_event(&mut self, name: &str) {
        for _ in 0..1000 {
            if self.read_one() == name {
                return;
            }
        }
        panic!("no {name} in 1000 messages");
    }

    fn last_count(&self) -> u64 {
        *self.ticks.last_key_value().expect("a tick").0
    }

    fn timeline(&self) -> &Value {
        &self.timelines.last().expect("a timeline")["data"]
    }
}

/// Counts both saw, with the scheduled instants asserted identical on both.
fn same_instants(a: &Watch, b: &Watch, what: &str) -> Vec<u64> {
    let common: Vec<u64> = a
        .ticks
        .keys()
        .filter(|c| b.ticks.contains_key(c))
        .copied()
        .collect();
    for c in &common {
        let (x, y) = (a.ticks[c], b.ticks[c]);
        assert_eq!(
            x.time_us, y.time_us,
            "{what}: tick {c} scheduled at {} µs on one instance, {} µs on the other",
            x.time_us, y.time_us
        );
        assert_eq!(x.bpm, y.bpm, "{what}: tick {c} has a different bpm");
    }
    common
}

/// The tick instant a timeline predicts for count `n` (µs; exact at whole-µs intervals).
fn predicted_us(timeline: &Value, n: u64) -> u64 {
    let anchor = timeline["count"].as_u64().expect("timeline count");
    assert!(
        n >= anchor,
        "tick {n} is before the timeline's anchor {anchor}"
    );
    let interval = timeline["interval_us"].as_f64().expect("interval_us");
    timeline["time_us"].as_u64().expect("timeline time_us")
        + ((n - anchor) as f64 * interval) as u64
}

/// `p` in 0..=1 of sorted `values`.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

#[test]
fn a_set_bpm_on_one_instance_changes_the_other_at_the_same_count_and_instant() {
    let _serial = serial();
    let Some(redis) = Redis::start() else { return };
    let a = instance(&redis, "setbpm");
    // B asks for another tempo at start: the cluster's timeline wins.
    let b = instance_at(&redis, "setbpm", "120");
    let (mut wa, hello_a) = Watch::new(&a);
    let (mut wb, hello_b) = Watch::new(&b);
    assert_eq!(hello_a["data"]["bpm"], 200);
    assert_eq!(hello_b["data"]["bpm"], 200, "B joined the cluster's tempo");

    // Before any change: the same counts at the same instants.
    wa.more_ticks(5);
    wb.until_count(wa.last_count() + 3);
    wa.until_count(wb.last_count());
    assert!(same_instants(&wa, &wb, "before the change").len() >= 3);

    let sent_us = unix_us_now();
    wa.client
        .send_json(&json!({"event": "setBpm", "data": 150}));
    for w in [&mut wa, &mut wb] {
        w.until_event("bpmChange");
        w.until_event("timeline");
    }
    assert_eq!(wa.bpm_changes, vec![150.0]);
    assert_eq!(wb.bpm_changes, vec![150.0], "B heard of A's change");
    let (ta, tb) = (wa.timeline().clone(), wb.timeline().clone());
    let anchor = ta["count"].as_u64().unwrap();
    let anchor_us = ta["time_us"].as_u64().unwrap();
    assert_eq!(tb["count"], ta["count"], "same anchor count: {ta} vs {tb}");
    assert_eq!(
        tb["time_us"], ta["time_us"],
        "same anchor instant: {ta} vs {tb}"
    );
    assert_eq!(ta["bpm"], 150);
    assert_eq!(tb["bpm"], 150);
    // The change bites a lead (250 ms by default) after it was asked for, not before.
    assert!(
        anchor_us >= sent_us + 250_000,
        "the change takes effect {} µs after it was sent, inside the 250 ms lead",
        anchor_us as i64 - sent_us as i64
    );

    wa.until_count(anchor + 8);
    wb.until_count(anchor + 8);
    let common = same_instants(&wa, &wb, "across the change");
    assert!(common.iter().filter(|&&c| c >= anchor).count() >= 8);
    for w in [&wa, &wb] {
        // The old tempo up to the anchor, the new one from it, on the instants announced.
        assert_eq!(w.ticks[&anchor].time_us, anchor_us);
        assert_eq!(w.ticks[&anchor].bpm, 150.0);
        if let Some(before) = w.ticks.get(&(anchor - 1)) {
            assert_eq!(before.bpm, 200.0);
            assert_eq!(
                anchor_us - before.time_us,
                INTERVAL_US,
                "old interval up to the anchor"
            );
        }
        for c in anchor..anchor + 8 {
            assert_eq!(w.ticks[&(c + 1)].time_us - w.ticks[&c].time_us, 100_000);
        }
    }
    for s in [&a, &b] {
        let st = s.stats();
        assert_eq!(st["bpm"], 150);
        assert_eq!(st["cluster"]["version"], 2, "{st}");
        assert_eq!(st["cluster"]["connected"], true);
    }
    let stored: Value = serde_json::from_str(
        &redis
            .try_command(&["GET", "conductor:setbpm:timeline"])
            .unwrap(),
    )
    .expect("stored timeline JSON");
    assert_eq!(stored["version"], 2);
    assert_eq!(stored["bpm_milli"], 150_000);
    assert_eq!(stored["anchor_count"], anchor);
    assert_eq!(
        stored["anchor_unix_ns"].as_u64().unwrap() / 1_000,
        anchor_us
    );
}

#[test]
fn a_late_joiner_emits_the_same_counts_at_the_same_instants() {
    let _serial = serial();
    let Some(redis) = Redis::start() else { return };
    let a = instance(&redis, "late");
    let b = instance(&redis, "late");
    let (mut wa, _) = Watch::new(&a);
    let (mut wb, _) = Watch::new(&b);
    // Move the timeline off its start, so that the joiner has something to learn.
    wb.client
        .send_json(&json!({"event": "setBpm", "data": 150}));
    wa.until_event("timeline");
    let anchor = wa.timeline()["count"].as_u64().unwrap();
    wa.until_count(anchor + 3);

    // C starts late, asking for 120 BPM; it must follow the cluster at 150 instead.
    let c = instance_at(&redis, "late", "120");
    let (mut wc, hello_c) = Watch::new(&c);
    assert_eq!(hello_c["data"]["bpm"], 150, "{hello_c}");
    let tc = wc.timeline().clone();
    assert_eq!(tc["bpm"], 150);
    // C's timeline may be anchored later (at its own start), but on the same grid.
    let tc_count = tc["count"].as_u64().unwrap();
    assert!(tc_count >= anchor);
    assert_eq!(
        tc["time_us"].as_u64().unwrap(),
        predicted_us(wa.timeline(), tc_count)
    );

    wc.more_ticks(20);
    let first_c = *wc.ticks.first_key_value().unwrap().0;
    for w in [&mut wa, &mut wb] {
        w.until_count(wc.last_count());
    }
    let ab = same_instants(&wa, &wb, "A and B");
    let ac = same_instants(&wa, &wc, "A and the late joiner");
    let bc = same_instants(&wb, &wc, "B and the late joiner");
    assert!(ab.len() >= 20);
    assert!(ac.len() >= 20, "{} common counts with the joiner", ac.len());
    assert!(bc.len() >= 20);
    assert_eq!(ac.first(), Some(&first_c));
    for (&count, seen) in &wc.ticks {
        assert_eq!(seen.time_us, predicted_us(wa.timeline(), count));
    }

    // The joiner shows up in every instance's peer count (heartbeats every second).
    let until = Instant::now() + Duration::from_secs(4);
    for s in [&a, &b, &c] {
        loop {
            let st = s.stats();
            if st["cluster"]["peers"] == 3 {
                assert_eq!(st["cluster"]["version"], 2);
                break;
            }
            assert!(Instant::now() < until, "peers never reached 3: {st}");
            thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn clients_of_two_instances_get_each_count_within_a_millisecond() {
    let _serial = serial();
    let Some(redis) = Redis::start() else { return };
    // On the normal scheduler: two SCHED_FIFO instances spinning before each tick on a
    // two-core machine would keep this process off the CPU until both had sent, and every
    // arrival would be stamped at the same moment, hiding the difference measured here.
    let a = instance_with(&redis, "align", BPM, &["--rt-priority", "0"]);
    let b = instance_with(&redis, "align", BPM, &["--rt-priority", "0"]);
    let (wa, _) = Watch::new(&a);
    let (wb, _) = Watch::new(&b);
    // One reader thread per instance, so neither waits behind the other's reads.
    let read = |mut w: Watch| {
        thread::spawn(move || {
            w.more_ticks(60);
            w
        })
    };
    let (ha, hb) = (read(wa), read(wb));
    let (wa, wb) = (ha.join().unwrap(), hb.join().unwrap());
    let common = same_instants(&wa, &wb, "alignment");
    assert!(
        common.len() >= 40,
        "only {} counts seen on both",
        common.len()
    );
    let mut diffs: Vec<f64> = common
        .iter()
        .map(|c| {
            let (x, y) = (wa.ticks[c].arrived, wb.ticks[c].arrived);
            let d = if x > y { x - y } else { y - x };
            d.as_secs_f64() * 1e6
        })
        .collect();
    diffs.sort_by(f64::total_cmp);
    let (p50, p99, max) = (
        percentile(&diffs, 0.5),
        percentile(&diffs, 0.99),
        diffs[diffs.len() - 1],
    );
    eprintln!(
        "cluster alignment over {} counts: arrival difference p50 {p50:.0} µs, p99 {p99:.0} µs, max {max:.0} µs",
        diffs.len()
    );
    assert!(p50 < 1_000.0, "median arrival difference {p50:.0} µs");
    assert!(p99 < 20_000.0, "p99 arrival difference {p99:.0} µs");
}

#[test]
fn killing_redis_keeps_every_instance_ticking_and_a_restart_restores_control() {
    let _serial = serial();
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let a = instance(&redis, "outage");
    let b = instance(&redis, "outage");
    let (mut wa, _) = Watch::new(&a);
    let (mut wb, _) = Watch::new(&b);
    wait_connected(&[&a, &b], true, Duration::from_secs(3));
    // A first change, so that what comes back after the restart is visibly this timeline.
    wa.client
        .send_json(&json!({"event": "setBpm", "data": 150}));
    for w in [&mut wa, &mut wb] {
        w.until_event("bpmChange");
        w.until_event("timeline");
        w.more_ticks(1);
        w.bpm_changes.clear();
    }
    let before = wb.timeline().clone();
    assert_eq!(before["bpm"], 150);

    redis.kill();
    wait_connected(&[&a, &b], false, Duration::from_secs(3));
    let counts: Vec<u64> = [&a, &b]
        .iter()
        .map(|s| s.stats()["count"].as_u64().unwrap())
        .collect();
    // Control is refused on both, with the reason.
    wa.client
        .send_json(&json!({"event": "setBpm", "data": 120}));
    wb.client.send_json(&json!({"event": "stop"}));
    for w in [&mut wa, &mut wb] {
        w.until_event("error");
        let e = &w.errors[0]["data"];
        assert_eq!(e["code"], "cluster_unavailable", "{e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // And ticking goes on, on the timeline they had, in step.
    thread::sleep(Duration::from_millis(800));
    for (s, was) in [&a, &b].iter().zip(&counts) {
        let now = s.stats()["count"].as_u64().unwrap();
        assert!(
            now >= was + 6,
            "count went from {was} to only {now} in 0.8 s"
        );
    }
    let from = wa.last_count().max(wb.last_count());
    wa.until_count(from + 5);
    wb.until_count(from + 5);
    same_instants(&wa, &wb, "while Redis is down");
    for w in [&wa, &wb] {
        assert!(w.bpm_changes.is_empty(), "a refused change changed nothing");
        let last = w.last_count();
        assert_eq!(w.ticks[&last].time_us, predicted_us(&before, last));
        assert_eq!(w.ticks[&last].bpm, 150.0);
    }

    // Redis comes back empty on the same port: both reconnect (backoff at most 2 s) and the
    // timeline they kept is written back.
    let down_at = Instant::now();
    redis.spawn();
    wait_connected(&[&a, &b], true, Duration::from_secs(6));
    eprintln!("reconnected {:?} after the restart", down_at.elapsed());
    let stored: Value = serde_json::from_str(
        &redis
            .try_command(&["GET", "conductor:outage:timeline"])
            .expect("GET"),
    )
    .expect("the timeline written back");
    assert_eq!(stored["version"], 2, "{stored}");
    assert_eq!(stored["bpm_milli"], 150_000);

    // Control works again, and both follow it at the same count and instant.
    wb.client
        .send_json(&json!({"event": "setBpm", "data": 120}));
    for w in [&mut wa, &mut wb] {
        w.until_event("bpmChange");
        w.until_event("timeline");
        assert_eq!(w.bpm_changes, vec![120.0]);
    }
    let (ta, tb) = (wa.timeline().clone(), wb.timeline().clone());
    assert_eq!(ta["bpm"], 120);
    assert_eq!(
        (&ta["count"], &ta["time_us"]),
        (&tb["count"], &tb["time_us"])
    );
    let anchor = ta["count"].as_u64().unwrap();
    wa.until_count(anchor + 3);
    wb.until_count(anchor + 3);
    same_instants(&wa, &wb, "after the restart");
    assert_eq!(
        wa.ticks[&(anchor + 1)].time_us - wa.ticks[&anchor].time_us,
        125_000
    );
    for s in [&a, &b] {
        assert_eq!(s.stats()["cluster"]["version"], 3);
    }
}

#[test]
fn a_stop_and_a_start_reach_every_instance_at_the_same_count() {
    let _serial = serial();
    let Some(redis) = Redis::start() else { return };
    let a = instance(&redis, "transport");
    let b = instance(&redis, "transport");
    let (mut wa, _) = Watch::new(&a);
    let (mut wb, _) = Watch::new(&b);
    wa.more_ticks(2);
    wb.more_ticks(2);

    // A stop sent to A: announced on both for the same count, a lead ahead; ticks up to it
    // still arrive everywhere, none from it on.
    wa.client.send_json(&json!({"event": "stop"}));
    for w in [&mut wa, &mut wb] {
        w.until_event("transport");
        w.until_event("timeline");
    }
    let (sa, sb) = (
        wa.timeline()["transport"].clone(),
        wb.timeline()["transport"].clone(),
    );
    assert_eq!(sa, sb, "the same stop on both");
    assert_eq!(sa["state"], "stopped");
    let stop_at = sa["count"].as_u64().unwrap();
    for w in [&mut wa, &mut wb] {
        w.until_count(stop_at - 1);
    }
    thread::sleep(Duration::from_millis(500));

    // A start sent to B: both resume at the same count, on a bar line (16 ticks at ppqn 4).
    wb.client.send_json(&json!({"event": "start"}));
    for w in [&mut wa, &mut wb] {
        w.until_event("transport");
        w.until_event("timeline");
    }
    let (pa, pb) = (
        wa.timeline()["transport"].clone(),
        wb.timeline()["transport"].clone(),
    );
    assert_eq!(pa, pb, "the same start on both");
    assert_eq!(pa["state"], "playing");
    let start_at = pa["count"].as_u64().unwrap();
    assert_eq!(start_at % 16, 0, "a start lands on a bar line");
    for w in [&mut wa, &mut wb] {
        w.until_count(start_at + 2);
        let silent: Vec<u64> = w.ticks.range(stop_at..start_at).map(|(&c, _)| c).collect();
        assert!(silent.is_empty(), "ticks {silent:?} sent while stopped");
        assert!(w.ticks.contains_key(&(stop_at - 1)) && w.ticks.contains_key(&start_at));
        assert_eq!(w.ticks[&start_at].time_us, pa["time_us"].as_u64().unwrap());
    }
    same_instants(&wa, &wb, "across stop and start");
}

#[test]
fn a_late_joiner_reports_the_same_transport_instant() {
    let _serial = serial();
    let Some(redis) = Redis::start() else { return };
    let a = instance(&redis, "joiner-transport");
    let (wa, _) = Watch::new(&a);
    thread::sleep(Duration::from_millis(500));
    let c = instance(&redis, "joiner-transport");
    let (wc, _) = Watch::new(&c);
    assert_eq!(wa.timeline()["transport"], wc.timeline()["transport"]);
}

#[test]
fn an_instance_started_while_redis_is_down_joins_when_it_answers() {
    let _serial = serial();
    let Some(mut redis) = Redis::start() else {
        return;
    };
    // MIDI-clock resolution, so that A's count runs far ahead of B's while B counts alone.
    let a = instance_with(&redis, "late-redis", BPM, &["--ppqn", "24"]);
    let (mut wa, _) = Watch::new(&a);
    wait_connected(&[&a], true, Duration::from_secs(3));
    redis.kill();
    wait_connected(&[&a], false, Duration::from_secs(3));
    // B starts while Redis is out of reach: after its join wait it counts on its own grid, at
    // its own tempo, from 0.
    let b = instance_with(&redis, "late-redis", "120", &["--ppqn", "24"]);
    let (mut wb, hello) = Watch::new(&b);
    assert_eq!(hello["data"]["bpm"], 120);
    wb.more_ticks(2);
    // Redis comes back empty and both write back what they have: whichever landed, the two
    // must be on one grid at once (not when B's count reaches A's, seconds or days later).
    redis.spawn();
    wait_connected(&[&a, &b], true, Duration::from_secs(6));
    // Whichever timeline won, one instance's count has jumped (maybe back), so the same count
    // may have been seen on the other grid before: compare only ticks due from now on.
    let cutoff = unix_us_now() + 300_000;
    let started = Instant::now();
    for w in [&mut wa, &mut wb] {
        while w.ticks.values().filter(|t| t.time_us >= cutoff).count() < 12 {
            w.read_one();
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?} to see 12 ticks each after the cut-off",
        started.elapsed()
    );
    let fresh = |w: &Watch| -> BTreeMap<u64, Seen> {
        w.ticks
            .iter()
            .filter(|(_, t)| t.time_us >= cutoff)
            .map(|(&c, &t)| (c, t))
            .collect()
    };
    let (fa, fb) = (fresh(&wa), fresh(&wb));
    let common: Vec<u64> = fa.keys().filter(|c| fb.contains_key(c)).copied().collect();
    assert!(
        common.len() >= 8,
        "A and B share only {} fresh counts: A {:?}, B {:?}",
        common.len(),
        fa.keys().collect::<Vec<_>>(),
        fb.keys().collect::<Vec<_>>()
    );
    for c in common {
        assert_eq!(
            fa[&c].time_us, fb[&c].time_us,
            "tick {c}: A and B disagree on its instant"
        );
        assert_eq!(
            fa[&c].bpm, fb[&c].bpm,
            "tick {c}: A and B disagree on the tempo"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile or broken Redis: what anyone with write access to it can do, and Redis refusing work

/// The cluster's timeline as stored, parsed.
fn stored_timeline(redis: &Redis, name: &str) -> Option<Value> {
    let raw = redis.try_command(&["GET", &format!("conductor:{name}:timeline")])?;
    serde_json::from_str(&raw).ok()
}

/// Writes `timeline` into the key and announces it, as a rogue writer would.
fn write_timeline(redis: &Redis, name: &str, timeline: &Value) {
    let json = timeline.to_string();
    let set = redis.try_command(&["SET", &format!("conductor:{name}:timeline"), &json]);
    assert_eq!(set.as_deref(), Some("+OK"));
    redis.try_command(&["PUBLISH", &format!("conductor:{name}:changes"), &json]);
}

/// Polls the key until `done` holds, or panics after `within`.
fn until_stored(
    redis: &Redis,
    name: &str,
    within: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let until = Instant::now() + within;
    loop {
        let stored = stored_timeline(redis, name);
        if let Some(v) = stored.as_ref().filter(|v| done(v)) {
            return v.clone();
        }
        assert!(
            Instant::now() < until,
            "{what} within {within:?}; the key holds {stored:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The counts of the ticks that arrive during `span`, in order, after what was already
/// waiting has been read (a read that had to wait says the backlog is gone). A runaway
/// instance sends ticks as fast as it can: reading stops at 5,000 either way.
fn ticks_during(w: &mut Watch, span: Duration) -> Vec<u64> {
    for _ in 0..5_000 {
        let started = Instant::now();
        w.read_one();
        if started.elapsed() >= Duration::from_millis(20) {
            break;
        }
    }
    let mut counts = Vec::new();
    let until = Instant::now() + span;
    while Instant::now() < until && counts.len() < 5_000 {
        let before = w.ticks.len();
        if w.read_one() == "tick" && w.ticks.len() > before {
            counts.push(*w.ticks.last_key_value().expect("a tick").0);
        }
    }
    counts
}

/// Waits for an event by name for at most `within` (a refused request must be answered, and
/// an unanswered one must fail the test in seconds, not after a thousand ticks).
fn event_within(w: &mut Watch, name: &str, within: Duration) -> Value {
    let until = Instant::now() + within;
    while Instant::now() < until {
        let before = (w.errors.len(), w.bpm_changes.len(), w.timelines.len());
        let event = w.read_one();
        if event == name {
            return match name {
                "error" => w.errors[before.0].clone(),
                "timeline" => w.timelines[before.2].clone(),
                "bpmChange" => json!(w.bpm_changes[before.1]),
                _ => json!(event),
            };
        }
    }
    panic!("no {name} within {within:?}");
}

/// D1: a timeline written into Redis by someone else must never make an instance tick flat
/// out, fall silent or leave its tempo limits. Each is refused and the key repaired: a sane
/// timeline (the one the instances follow) with a higher version.
#[test]
fn timelines_that_would_race_or_silence_the_cluster_are_refused_and_repaired() {
    let _serial = serial();
    let Some(redis) = Redis::start() else { return };
    let name = "rogue";
    let a = instance(&redis, name);
    let b = instance(&redis, name);
    wait_connected(&[&a, &b], true, Duration::from_secs(3));
    let (mut wa, _) = Watch::new(&a);
    let (mut wb, _) = Watch::new(&b);
    let year_ns = 365 * 24 * 3600 * 1_000_000_000u64;
    type Tamper = fn(&mut Value, u64);
    let cases: [(&str, Tamper); 4] = [
        // The count wraps about a second later: every deadline in the past.
        ("runaway count", |t, _| {
            t["anchor_count"] = json!(u64::MAX - 8)
        }),
        ("anchor a year ahead", |t, year| {
            let at = t["anchor_unix_ns"].as_u64().unwrap() + year;
            t["anchor_unix_ns"] = json!(at);
            t["transport_unix_ns"] = json!(at);
        }),
        ("a start that never comes", |t, _| {
            t["playing_before"] = json!(false);
            t["playing"] = json!(true);
            t["transport_count"] = json!(u64::MAX - 1);
        }),
        // 1000 BPM although --max-bpm is 200.
        ("tempo above --max-bpm", |t, _| {
            t["bpm_milli"] = json!(1_000_000)
        }),
    ];
    for (what, tamper) in cases {
        let mut bad = stored_timeline(&redis, name).expect("a stored timeline");
        let version = bad["version"].as_u64().unwrap() + 1;
        bad["version"] = json!(version);
        tamper(&mut bad, year_ns);
        write_timeline(&redis, name, &bad);
        // Both keep ticking at 200 BPM, in step: about 13 ticks a second, no more, no fewer,
        // also past the moment a runaway count would have wrapped (about a second).
        for w in [&mut wa, &mut wb] {
            let counts = ticks_during(w, Duration::from_millis(1500));
            assert!(
                (15..=25).contains(&counts.len()),
                "{what}: {} ticks in 1.5 s: {:?}",
                counts.len(),
                &counts[..counts.len().min(20)]
            );
            assert!(
                counts.windows(2).all(|p| p[1] == p[0] + 1),
                "{what}: {counts:?}"
            );
        }
        same_instants(&wa, &wb, what);
        let repaired = until_stored(&redis, name, Duration::from_secs(3), what, |v| {
            v["version"].as_u64() > Some(version)
        });
        assert_eq!(repaired["bpm_milli"], 200_000, "{what}: {repaired}");
        assert!(
            repaired["anchor_count"].as_u64().unwrap() < 1 << 52,
            "{what}"
        );
        assert!(
            repaired["anchor_unix_ns"].as_u64().unwrap()
                < unix_us_now() * 1000 + 60 * 1_000_000_000,
            "{what}"
        );
        for s in [&a, &b] {
            let stats = s.stats();
            assert_eq!(stats["bpm"], 200, "{what}: {stats}");
            assert_eq!(stats["healthy"], true, "{what}: {stats}");
            assert!(
                stats["cluster"]["timelines_refused"].as_u64() >= Some(1),
                "{stats}"
            );
        }
    }
    // Deleting the key brings back the sane timeline, never a refused one.
    redis.try_command(&["DEL", &format!("conductor:{name}:timeline")]);
    let back = until_stored(&redis, name, Duration::from_secs(3), "written back", |_| {
        true
    });
    assert_eq!(back["bpm_milli"], 200_000, "{back}");
}

/// D4: a version past 2^53 and a key of another Redis type are corrupt: the next control
/// request replaces them and is answered, as for an unparseable key.
#[test]
fn a_corrupt_version_or_a_hash_typed_key_is_replaced_and_control_answers() {
    let _serial = serial();
    let Some(redis) = Redis::start() else { return };
    let name = "corrupt";
    let a = instance(&redis, name);
    wait_connected(&[&a], true, Duration::from_secs(3));
    let (mut w, _) = Watch::new(&a);
    let key = format!("conductor:{name}:timeline");

    // Version 2^60, the rest sane: not published, so only the request finds it.
    let mut huge = stored_timeline(&redis, name).expect("a stored timeline");
    huge["version"] = json!(1u64 << 60);
    redis.try_command(&["SET", &key, &huge.to_string()]);
    w.client.send_json(&json!({"event": "setBpm", "data": 150}));
    assert_eq!(
        event_within(&mut w, "bpmChange", Duration::from_secs(5)),
        150.0
    );
    let stored = stored_timeline(&redis, name).expect("a timeline");
    assert!(stored["version"].as_u64().unwrap() < 1 << 53, "{stored}");
    assert_eq!(stored["bpm_milli"], 150_000);

    // A hash where the timeline should be.
    redis.try_command(&["DEL", &key]);
    redis.try_command(&["HSET", &key, "version", "7"]);
    w.client.send_json(&json!({"event": "setBpm", "data": 120}));
    assert_eq!(
        event_within(&mut w, "bpmChange", Duration::from_secs(5)),
        120.0
    );
    assert_eq!(
        redis.try_command(&["TYPE", &key]).as_deref(),
        Some("+string")
    );
    assert_eq!(
        stored_timeline(&redis, name).expect("a timeline")["bpm_milli"],
        120_000
    );
    assert_eq!(a.stats()["cluster"]["connected"], true);
}

/// `total_connections_received` from `INFO stats`.
fn connections_received(redis: &Redis) -> u64 {
    let mut s = TcpStream::connect(("127.0.0.1", redis.port)).expect("connect to redis");
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(b"*2\r\n$4\r\nINFO\r\n$5\r\nstats\r\n").unwrap();
    // A bulk string: `$LEN\r\n` then LEN bytes.
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let info = loop {
        let n = s.read(&mut buf).expect("INFO reply");
        assert!(n > 0, "redis closed during INFO");
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some((len, body)) = text.strip_prefix('$').and_then(|t| t.split_once("\r\n"))
            && body.len() >= len.parse::<usize>().unwrap_or(0)
        {
            break body.to_string();
        }
    };
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no total_connections_received in {info:?}"))
}

/// D3: a Redis that lets the instance in but refuses its writes (out of memory under
/// noeviction) is retried with a growing backoff, not ten times a second, and clients and
/// /stats are told what is wrong: not "unreachable".
#[test]
fn a_redis_that_refuses_writes_is_retried_with_backoff_and_named() {
    let _serial = serial();
    let Some(redis) = Redis::start() else { return };
    let name = "oom";
    let a = instance(&redis, name);
    wait_connected(&[&a], true, Duration::from_secs(3));
    let (mut w, _) = Watch::new(&a);

    for (k, v) in [("maxmemory-policy", "noeviction"), ("maxmemory", "1")] {
        assert_eq!(
            redis.try_command(&["CONFIG", "SET", k, v]).as_deref(),
            Some("+OK")
        );
    }
    wait_connected(&[&a], false, Duration::from_secs(3));
    // Let the backoff reach its ceiling, then count reconnections (each session opens two
    // connections; the second INFO's own connection is one more).
    thread::sleep(Duration::from_secs(3));
    let before = connections_received(&redis);
    thread::sleep(Duration::from_secs(6));
    let made = connections_received(&redis) - before - 1;
    assert!(
        made <= 12,
        "{made} connections in 6 s to a Redis that refuses writes (before the fix: ~120)"
    );
    let stats = a.stats();
    assert_eq!(stats["cluster"]["error"], "out_of_memory", "{stats}");
    w.client.send_json(&json!({"event": "setBpm", "data": 150}));
    let err = event_within(&mut w, "error", Duration::from_secs(3));
    assert_eq!(err["data"]["code"], "cluster_unavailable", "{err}");
    let message = err["data"]["message"].as_str().unwrap_or("");
    assert!(message.contains("out of memory"), "{message}");
    assert!(!message.contains("unreachable"), "{message}");
    // Ticks went on throughout.
    assert!(ticks_during(&mut w, Duration::from_millis(500)).len() >= 4);

    // Memory back: connected again within the backoff's ceiling, and control works.
    assert_eq!(
        redis
            .try_command(&["CONFIG", "SET", "maxmemory", "0"])
            .as_deref(),
        Some("+OK")
    );
    wait_connected(&[&a], true, Duration::from_secs(5));
    assert_eq!(a.stats()["cluster"]["error"], Value::Null);
    w.client.send_json(&json!({"event": "setBpm", "data": 150}));
    assert_eq!(
        event_within(&mut w, "bpmChange", Duration::from_secs(3)),
        150.0
    );

    // A peers key of the wrong type is ours to rebuild, not a reason to reconnect forever.
    let peers = format!("conductor:{name}:peers");
    redis.try_command(&["DEL", &peers]);
    redis.try_command(&["SET", &peers, "garbage"]);
    let until = Instant::now() + Duration::from_secs(3);
    while redis.try_command(&["TYPE", &peers]).as_deref() != Some("+zset") {
        assert!(Instant::now() < until, "the peers key was never rebuilt");
        thread::sleep(Duration::from_millis(100));
    }
    // And the session stayed up throughout.
    for _ in 0..20 {
        let stats = a.stats();
        assert_eq!(stats["cluster"]["connected"], true, "{stats}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// A state file holding `bpm`, anchored ten seconds ago, as a stopped server left it.
fn state_file(path: &std::path::Path, bpm_milli: u32) {
    use conductor::cluster::SharedTimeline;
    use conductor::state::{Persisted, encode, write_atomically};
    let ago = unix_us_now() * 1000 - 10_000_000_000;
    let saved = Persisted {
        timeline: SharedTimeline {
            version: 1,
            anchor_count: 0,
            anchor_unix_ns: ago,
            bpm_milli,
            ppqn: 4,
            playing_before: true,
            playing: false,
            transport_count: 0,
            transport_unix_ns: ago,
        },
        beats_per_bar: 4,
        rooms: Vec::new(),
    };
    write_atomically(path, &encode(&saved, unix_us_now() * 1000)).expect("write state file");
}

#[test]
fn the_shared_timeline_wins_over_a_state_file_and_an_empty_redis_gets_the_saved_one() {
    let _serial = serial();
    let Some(redis) = Redis::start() else { return };
    let dir = std::env::temp_dir().join(format!("conductor-cluster-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state.json");
    let url = redis.url();

    // Redis has nothing: the first instance seeds it with its saved timeline (90, stopped).
    state_file(&path, 90_000);
    let args = [
        "--cluster",
        url.as_str(),
        "--cluster-name",
        "state",
        "--state",
        path.to_str().unwrap(),
    ];
    let a = Server::start(&args);
    let (_, hello) = Watch::new(&a);
    assert_eq!(hello["data"]["bpm"], 90, "{hello}");
    assert_eq!(hello["data"]["playing"], false, "{hello}");

    // A second instance whose own file says 150 joins the shared 90 instead, and its file
    // follows the shared timeline.
    let other = dir.join("other.json");
    state_file(&other, 150_000);
    let args_b = [
        "--cluster",
        url.as_str(),
        "--cluster-name",
        "state",
        "--state",
        other.to_str().unwrap(),
    ];
    let b = Server::start(&args_b);
    let (_, hello) = Watch::new(&b);
    assert_eq!(hello["data"]["bpm"], 90, "{hello}");
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&other).unwrap_or_default();
        if text.contains("\"bpm\": 90.0") {
            break;
        }
        assert!(Instant::now() < until, "the file never followed: {text}");
        thread::sleep(Duration::from_millis(50));
    }
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

// Rooms in a cluster: one key per room, each room on its own shared timeline

/// The keys matching `pattern`, sorted (a `KEYS` reply's names).
fn keys(redis: &Redis, pattern: &str) -> Vec<String> {
    let reply = redis.try_command(&["KEYS", pattern]).expect("KEYS answers");
    let mut names: Vec<String> = reply
        .split("\r\n")
        .filter(|l| !l.is_empty() && !l.starts_with('*') && !l.starts_with('$'))
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

/// Polls `/stats` until `done` holds for its `rooms`, or panics after `within`.
fn until_rooms(server: &Server, within: Duration, what: &str, done: impl Fn(&Value) -> bool) {
    let until = Instant::now() + within;
    loop {
        let rooms = server.stats()["rooms"].clone();
        if done(&rooms) {
            return;
        }
        assert!(
            Instant::now() < until,
            "{what} within {within:?}: rooms {rooms}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_room_is_one_timeline_across_instances_with_its_own_key_and_idles_out_everywhere() {
    let _serial = serial();
    let Some(redis) = Redis::start() else { return };
    let idle = ["--room-idle", "2"];
    let a = instance_with(&redis, "rooms", BPM, &idle);
    let b = instance_with(&redis, "rooms", BPM, &idle);
    wait_connected(&[&a, &b], true, Duration::from_secs(10));
    let (mut main_a, _) = Watch::new(&a);
    let (mut main_b, _) = Watch::new(&b);
    let (mut xa, hello_xa) = Watch::at(&a, "/ws?room=x");
    let (mut xb, hello_xb) = Watch::at(&b, "/ws?room=x");
    for hello in [&hello_xa, &hello_xb] {
        assert_eq!(hello["data"]["room"], "x", "{hello}");
        assert_eq!(
            hello["data"]["bpm"], 200,
            "a new room starts at --bpm: {hello}"
        );
    }
    // A room only A's clients are in: a key of its own too.
    let (_ya, _) = Watch::at(&a, "/ws?room=y");

    // Joined on A and on B, x is one timeline: the same counts at the same instants.
    xa.more_ticks(5);
    xb.until_count(xa.last_count() + 3);
    xa.until_count(xb.last_count());
    assert!(same_instants(&xa, &xb, "room x before the change").len() >= 3);

    // A setBpm in x on B reaches x's clients on A: the same tempo, anchor count and instant.
    xb.client
        .send_json(&json!({"event": "setBpm", "data": 150}));
    for w in [&mut xa, &mut xb] {
        w.until_event("bpmChange");
        w.until_event("timeline");
    }
    assert_eq!(
        xa.bpm_changes,
        vec![150.0],
        "A's clients in x heard B's change"
    );
    assert_eq!(xb.bpm_changes, vec![150.0]);
    let (ta, tb) = (xa.timeline().clone(), xb.timeline().clone());
    assert_eq!(ta["bpm"], 150);
    assert_eq!(tb["bpm"], 150);
    assert_eq!(ta["count"], tb["count"], "same anchor count: {ta} vs {tb}");
    assert_eq!(
        ta["time_us"], tb["time_us"],
        "same anchor instant: {ta} vs {tb}"
    );
    let anchor = ta["count"].as_u64().expect("anchor count");
    xa.until_count(anchor + 6);
    xb.until_count(anchor + 6);
    let common = same_instants(&xa, &xb, "room x across the change");
    assert!(common.iter().filter(|&&c| c >= anchor).count() >= 6);
    for w in [&xa, &xb] {
        assert_eq!(w.ticks[&anchor].time_us, predicted_us(&ta, anchor));
        assert_eq!(w.ticks[&(anchor + 1)].bpm, 150.0);
    }

    // main, on both instances, never heard of it.
    main_a.more_ticks(4);
    main_b.more_ticks(4);
    for (w, s) in [(&main_a, &a), (&main_b, &b)] {
        assert!(w.bpm_changes.is_empty(), "main heard {:?}", w.bpm_changes);
        assert!(w.ticks.values().all(|t| t.bpm == 200.0));
        let st = s.stats();
        assert_eq!(st["bpm"], 200, "main's tempo: {st}");
        assert_eq!(st["rooms"]["main"]["bpm"], 200);
        assert_eq!(st["rooms"]["x"]["bpm"], 150, "{st}");
    }
    assert!(same_instants(&main_a, &main_b, "main").len() >= 2);

    // One key per room: main's as before rooms, x's and y's under room:NAME; only rooms expire.
    assert_eq!(
        keys(&redis, "conductor:rooms:*timeline"),
        vec![
            "conductor:rooms:room:x:timeline",
            "conductor:rooms:room:y:timeline",
            "conductor:rooms:timeline",
        ]
    );
    let x: Value = serde_json::from_str(
        &redis
            .try_command(&["GET", "conductor:rooms:room:x:timeline"])
            .expect("x's key"),
    )
    .expect("x's key holds a timeline");
    assert_eq!(x["bpm_milli"], 150_000, "{x}");
    assert_eq!(x["anchor_count"], anchor);
    assert_eq!(
        x["anchor_unix_ns"].as_u64().unwrap() / 1_000,
        ta["time_us"].as_u64().unwrap()
    );
    let main_key = stored_timeline(&redis, "rooms").expect("main's key");
    assert_eq!(
        main_key["bpm_milli"], 200_000,
        "main's key untouched: {main_key}"
    );
    assert_eq!(
        redis
            .try_command(&["PTTL", "conductor:rooms:timeline"])
            .as_deref(),
        Some(":-1"),
        "main's key never expires"
    );
    let ttl: i64 = redis
        .try_command(&["PTTL", "conductor:rooms:room:x:timeline"])
        .and_then(|r| r.trim_start_matches(':').parse().ok())
        .expect("PTTL of x");
    assert!(
        ttl > 0 && ttl <= 2_000,
        "x's key lives --room-idle (2 s): PTTL {ttl}"
    );

    // x idle on both instances (y stays, A's client still in it): dropped on both, and its key
    // expires; main and y stay.
    drop(xa);
    drop(xb);
    for s in [&a, &b] {
        until_rooms(s, Duration::from_secs(10), "x dropped", |r| {
            r.get("x").is_none() && r.get("main").is_some()
        });
    }
    let until = Instant::now() + Duration::from_secs(10);
    while redis
        .try_command(&["EXISTS", "conductor:rooms:room:x:timeline"])
        .as_deref()
        != Some(":0")
    {
        assert!(Instant::now() < until, "x's key outlived the room");
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        keys(&redis, "conductor:rooms:*timeline"),
        vec![
            "conductor:rooms:room:y:timeline",
            "conductor:rooms:timeline"
        ]
    );
    assert!(
        a.stats()["rooms"].get("y").is_some(),
        "y, still played on A, stays"
    );
    // Who joins x now starts afresh at --bpm.
    let (_again, hello) = Watch::at(&b, "/ws?room=x");
    assert_eq!(hello["data"]["bpm"], 200, "{hello}");
}
