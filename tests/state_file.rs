//! The state file against the real binary: a restart resumes the same tempo, transport and
//! count phase; a SIGKILL between two changes leaves one of them whole; a corrupt file is kept
//! aside; an unwritable location is a warning, not a failure.

mod common;
mod spawned;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use spawned::{Spawned, TempDir, eventually};

use conductor::state::{self, Limits};
use conductor::tempo::Bpm;

fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn start(state: &Path, extra: &[&str], env: &[(&str, &str)], dir: &TempDir) -> Spawned {
    let mut args = vec!["--port", "0", "--bind", "127.0.0.1", "--no-mlock"];
    args.extend_from_slice(&["--state", state.to_str().unwrap()]);
    args.extend_from_slice(extra);
    Spawned::start(&args, env, &dir.0)
}

/// The state file as JSON, once it is there and `pred` holds.
fn file_when(path: &Path, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    eventually(what, Duration::from_secs(5), || {
        let bytes = std::fs::read(path).ok()?;
        let v: Value = serde_json::from_slice(&bytes).ok()?;
        pred(&v).then_some(v)
    })
}

/// The hello and the timeline a new client gets first.
fn connect(s: &Spawned) -> (common::Client, Value, Value) {
    let mut c = s.ws();
    let hello = c.next_event("hello");
    let timeline = c.next_event("timeline");
    (c, hello, timeline)
}

/// Tick `n`'s instant in µs on `timeline`, exactly as the server computes it (integer
/// nanoseconds from the anchor), from the anchor's µs (truncated, so within 1 µs).
fn predict_us(timeline: &Value, n: u64) -> f64 {
    let d = &timeline["data"];
    let anchor = d["count"].as_u64().unwrap();
    let bpm_milli = (d["bpm"].as_f64().unwrap() * 1000.0).round() as u128;
    let ppqn = d["ppqn"].as_u64().unwrap() as u128;
    let k = (n - anchor) as u128;
    let span_ns = k * 60_000_000_000_000 / (bpm_milli * ppqn);
    d["time_us"].as_u64().unwrap() as f64 + span_ns as f64 / 1000.0
}

#[test]
fn a_restart_resumes_the_same_tempo_transport_and_count_phase() {
    let dir = TempDir::new("restart");
    let path = dir.path("state.json");

    // A first life: 133.5 BPM, then stopped.
    let s1 = start(&path, &[], &[], &dir);
    let (mut c, hello, _) = connect(&s1);
    assert_eq!(hello["data"]["bpm"], 120);
    c.send_json(&json!({"event": "setBpm", "data": 133.5}));
    assert_eq!(c.next_event("bpmChange")["data"], 133.5);
    c.next_event("timeline");
    c.send_json(&json!({"event": "stop"}));
    let stopped = c.next_event("transport");
    assert_eq!(stopped["data"]["state"], "stopped");
    let before = c.next_event("timeline");
    assert_eq!(before["data"]["bpm"], 133.5);
    file_when(&path, "the stop in the file", |v| {
        v["bpm"] == 133.5 && v["transport"]["state"] == "stopped"
    });
    assert_eq!(s1.terminate(), Some(0));
    std::thread::sleep(Duration::from_millis(400));

    // Restarted: the same tempo, still stopped, and the count where the old timeline puts it.
    let s2 = start(&path, &[], &[], &dir);
    let (mut c, hello, after) = connect(&s2);
    assert_eq!(hello["data"]["bpm"], 133.5, "{hello}");
    assert_eq!(hello["data"]["playing"], false, "{hello}");
    let t = &after["data"];
    assert_eq!(t["bpm"], 133.5);
    assert_eq!(t["transport"], before["data"]["transport"], "{after}");
    let anchor = t["count"].as_u64().unwrap();
    assert!(
        anchor > before["data"]["count"].as_u64().unwrap(),
        "the count went on: {after} after {before}"
    );
    let error = predict_us(&before, anchor) - t["time_us"].as_f64().unwrap();
    assert!(
        error.abs() <= 2.0,
        "tick {anchor} is {error} µs off the old timeline"
    );
    let stats: Value = serde_json::from_slice(&s2.get("/stats", &[]).2).unwrap();
    assert_eq!(stats["transport"]["state"], "stopped", "{stats}");
    assert_eq!(stats["bpm"], 133.5);

    // Started on a bar, then a crash (SIGKILL) once the file says so.
    c.send_json(&json!({"event": "start"}));
    let playing = c.next_event("transport");
    let from = playing["data"]["count"].as_u64().unwrap();
    assert_eq!(from % 16, 0, "on a bar: {playing}");
    file_when(&path, "the start in the file", |v| {
        v["transport"]["state"] == "playing" && v["transport"]["count"] == from
    });
    s2.kill();

    // Restarted again: playing, the same start count, ticks on the same grid.
    let s3 = start(&path, &[], &[], &dir);
    let (mut c, hello, resumed) = connect(&s3);
    assert_eq!(hello["data"]["playing"], true, "{hello}");
    assert_eq!(resumed["data"]["transport"], playing["data"], "{resumed}");
    for _ in 0..4 {
        let tick = c.next_event("tick");
        let n = tick["data"]["count"].as_u64().unwrap();
        assert!(n >= from);
        let error = predict_us(&before, n) - tick["data"]["time_us"].as_f64().unwrap();
        assert!(
            error.abs() <= 2.0,
            "tick {n} is {error} µs off the first life's timeline"
        );
    }
}

#[test]
fn a_kill_between_two_changes_leaves_one_of_them_whole() {
    let dir = TempDir::new("sigkill");
    let path = dir.path("state.json");
    let limits = Limits {
        min_bpm: Bpm::whole(60),
        max_bpm: Bpm::whole(200),
    };
    // The kill lands at different moments of the second write: before, during, after.
    for (round, delay_us) in [0u64, 200, 500, 1000, 2000, 5000].into_iter().enumerate() {
        let first = 100 + 2 * round as u64;
        let second = first + 1;
        let s = start(&path, &[], &[], &dir);
        let (mut c, _, _) = connect(&s);
        c.send_json(&json!({"event": "setBpm", "data": first}));
        c.next_event("bpmChange");
        file_when(&path, "the first change", |v| {
            v["bpm"].as_f64() == Some(first as f64)
        });
        c.send_json(&json!({"event": "setBpm", "data": second}));
        std::thread::sleep(Duration::from_micros(delay_us));
        s.kill();

        let bytes = std::fs::read(&path).expect("the state file is there");
        let saved = state::decode(&bytes, limits, unix_now_ns()).unwrap_or_else(|e| {
            panic!(
                "round {round}: torn file ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        });
        let bpm = saved.timeline.bpm();
        assert!(
            bpm == Bpm::whole(first as u32) || bpm == Bpm::whole(second as u32),
            "round {round}: {bpm} is neither change"
        );
        // And a server resumes from it.
        let again = start(&path, &[], &[], &dir);
        let (_, hello, _) = connect(&again);
        assert_eq!(hello["data"]["bpm"].as_f64(), Some(bpm.as_f64()));
        again.kill();
    }
}

#[test]
fn a_corrupt_file_is_kept_aside_and_the_server_starts_on_defaults() {
    let dir = TempDir::new("corrupt");
    let path = dir.path("state.json");
    let absurd = serde_json::to_vec(&json!({
        "format": 1, "bpm": 1e9, "ppqn": 4, "beats_per_bar": 4,
        "anchor": {"count": 0, "unix_ns": 1_764_000_000_000_000_000u64},
        "transport": {"state": "playing", "count": 0, "unix_ns": 0, "before": "playing"}
    }))
    .unwrap();
    for (what, content) in [
        ("torn", b"{\"format\": 1, \"bpm\": 13".to_vec()),
        ("absurd", absurd),
        ("binary", vec![0xff, 0x00, 0x13, 0x37]),
    ] {
        std::fs::write(&path, &content).unwrap();
        let s = start(&path, &[], &[], &dir);
        let (_, hello, _) = connect(&s);
        assert_eq!(hello["data"]["bpm"], 120, "{what}: defaults");
        let bad = dir.path("state.json.bad");
        assert_eq!(
            std::fs::read(&bad).expect(".bad kept"),
            content,
            "{what}: the bad file is kept as it was"
        );
        let lines = s.log_lines("state:");
        assert_eq!(lines.len(), 1, "{what}: one log line, got {lines:?}");
        assert!(lines[0].contains("kept aside as"), "{lines:?}");
        // The server saved its own state anew, beside the kept copy.
        file_when(&path, "a fresh state file", |v| v["bpm"] == 120.0);
        s.kill();
        std::fs::remove_file(&bad).unwrap();
    }
}

#[test]
fn an_unwritable_location_is_one_warning_and_the_server_runs() {
    let dir = TempDir::new("unwritable");
    std::fs::write(dir.path("a-file"), "not a directory").unwrap();
    for path in [
        dir.path("no/such/dir/state.json"),
        dir.path("a-file/state.json"),
    ] {
        let s = start(&path, &[], &[], &dir);
        let (mut c, _, _) = connect(&s);
        c.send_json(&json!({"event": "setBpm", "data": 150}));
        assert_eq!(c.next_event("bpmChange")["data"], 150);
        c.next_event("tick");
        let lines = s.log_lines("state:");
        assert_eq!(
            lines.len(),
            1,
            "{}: one line, got {lines:?}",
            path.display()
        );
        assert!(
            lines[0].contains("WARN") && lines[0].contains("running without saving"),
            "{lines:?}"
        );
        assert!(!path.exists());
    }
}

#[test]
fn a_bpm_typed_on_the_command_line_wins_over_the_file_and_the_environment_does_not() {
    let dir = TempDir::new("precedence");
    let path = dir.path("state.json");
    let s = start(&path, &[], &[], &dir);
    let (mut c, _, _) = connect(&s);
    c.send_json(&json!({"event": "setBpm", "data": 142}));
    c.next_event("bpmChange");
    file_when(&path, "142 in the file", |v| v["bpm"] == 142.0);
    s.kill();

    // A supervisor's standing environment: the band's tempo is kept.
    let s = start(&path, &[], &[("CONDUCTOR_BPM", "90")], &dir);
    let (_, hello, _) = connect(&s);
    assert_eq!(hello["data"]["bpm"], 142);
    s.kill();

    // Typed now: it wins, on the same grid.
    let s = start(&path, &["--bpm", "90", "--beats-per-bar", "3"], &[], &dir);
    let (_, hello, timeline) = connect(&s);
    assert_eq!(hello["data"]["bpm"], 90);
    assert_eq!(timeline["data"]["beats_per_bar"], 3);
    assert!(
        s.log_lines("replaces the saved 142").len() == 1,
        "{}",
        s.log()
    );
    let v = file_when(&path, "90 in the file", |v| v["bpm"] == 90.0);
    assert_eq!(v["beats_per_bar"], 3);
}

#[test]
fn state_none_reads_and_writes_nothing() {
    let dir = TempDir::new("none");
    let s = Spawned::start(
        &["--port", "0", "--bind", "127.0.0.1", "--state", "none"],
        &[],
        &dir.0,
    );
    let (mut c, _, _) = connect(&s);
    c.send_json(&json!({"event": "setBpm", "data": 99}));
    c.next_event("bpmChange");
    assert!(s.log_lines("state").is_empty(), "{}", s.log());
    // Nothing in the directory but the log.
    let names: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".log"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

#[test]
fn a_second_server_on_the_same_file_leaves_it_to_the_first() {
    let dir = TempDir::new("locked");
    let path = dir.path("state.json");
    let first = start(&path, &[], &[], &dir);
    let (mut c, _, _) = connect(&first);
    c.send_json(&json!({"event": "setBpm", "data": 111}));
    c.next_event("bpmChange");
    file_when(&path, "111 in the file", |v| v["bpm"] == 111.0);

    let second = start(&path, &[], &[], &dir);
    let (mut d, hello, _) = connect(&second);
    assert_eq!(
        hello["data"]["bpm"], 120,
        "the second does not resume the first's tempo"
    );
    let lines = second.log_lines("state:");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("another conductor is using"), "{lines:?}");
    // The second's changes do not reach the file; the first's still do.
    d.send_json(&json!({"event": "setBpm", "data": 77}));
    d.next_event("bpmChange");
    c.send_json(&json!({"event": "setBpm", "data": 112}));
    c.next_event("bpmChange");
    file_when(&path, "112 in the file", |v| v["bpm"] == 112.0);
    std::thread::sleep(Duration::from_millis(300));
    let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(v["bpm"], 112.0);
}

/// The hello and the timeline a new client of room `room` gets first.
fn connect_room(s: &Spawned, room: &str) -> (common::Client, Value, Value) {
    let mut c = common::Client::connect(s.port, &format!("/ws?room={room}"));
    let hello = c.next_event("hello");
    let timeline = c.next_event("timeline");
    (c, hello, timeline)
}

/// Sends `event` and returns the timeline that follows its announcement.
fn change(c: &mut common::Client, event: Value, announced: &str) -> Value {
    c.send_json(&event);
    c.next_event(announced);
    c.next_event("timeline")
}

#[test]
fn rooms_survive_a_restart_at_their_tempo_transport_and_phase_and_an_idled_room_does_not() {
    let dir = TempDir::new("rooms-restart");
    let path = dir.path("state.json");

    // A first life with a short --room-idle: a at 90 BPM and stopped, b at 140 BPM playing,
    // c at 77 BPM until its last client leaves and it idles out.
    let s1 = start(&path, &["--room-idle", "2"], &[], &dir);
    let (mut ca, hello, _) = connect_room(&s1, "a");
    assert_eq!(hello["data"]["room"], "a");
    change(&mut ca, json!({"event": "setBpm", "data": 90}), "bpmChange");
    let before_a = change(&mut ca, json!({"event": "stop"}), "transport");
    assert_eq!(before_a["data"]["bpm"], 90);
    assert_eq!(before_a["data"]["transport"]["state"], "stopped");
    let (mut cb, _, _) = connect_room(&s1, "b");
    let before_b = change(
        &mut cb,
        json!({"event": "setBpm", "data": 140}),
        "bpmChange",
    );
    assert_eq!(before_b["data"]["bpm"], 140);
    assert_eq!(before_b["data"]["transport"]["state"], "playing");
    let (mut cc, _, _) = connect_room(&s1, "c");
    change(&mut cc, json!({"event": "setBpm", "data": 77}), "bpmChange");
    file_when(&path, "a, b and c in the file", |v| {
        v["rooms"]["a"]["bpm"] == 90.0
            && v["rooms"]["a"]["transport"]["state"] == "stopped"
            && v["rooms"]["b"]["bpm"] == 140.0
            && v["rooms"]["c"]["bpm"] == 77.0
    });
    drop(cc);
    let idled = eventually("c to idle out of the file", Duration::from_secs(10), || {
        let v: Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
        v["rooms"].get("c").is_none().then_some(v)
    });
    assert_eq!(idled["bpm"], 120.0, "main untouched: {idled}");
    assert!(
        idled["rooms"].get("a").is_some() && idled["rooms"].get("b").is_some(),
        "{idled}"
    );
    // b's members are still there at the end; a's too.
    cb.next_event("tick");
    drop((ca, cb));
    assert_eq!(s1.terminate(), Some(0));
    std::thread::sleep(Duration::from_millis(400));

    // Restarted (default --room-idle): a and b are back before anyone joins them; c is not.
    let s2 = start(&path, &[], &[], &dir);
    let stats: Value = serde_json::from_slice(&s2.get("/stats", &[]).2).unwrap();
    let rooms = &stats["rooms"];
    assert_eq!(rooms["a"]["bpm"], 90, "{stats}");
    assert_eq!(rooms["a"]["transport"]["state"], "stopped");
    assert_eq!(rooms["b"]["bpm"], 140);
    assert_eq!(rooms["b"]["transport"]["state"], "playing");
    assert!(
        rooms.get("c").is_none(),
        "c idled out before the restart: {stats}"
    );
    assert_eq!(stats["bpm"], 120);

    // a: 90 BPM, stopped, where the old timeline puts the count.
    let (_ca, hello, after) = connect_room(&s2, "a");
    assert_eq!(hello["data"]["bpm"], 90, "{hello}");
    assert_eq!(hello["data"]["playing"], false, "{hello}");
    assert_eq!(
        after["data"]["transport"], before_a["data"]["transport"],
        "{after}"
    );
    let anchor = after["data"]["count"].as_u64().unwrap();
    assert!(
        anchor > before_a["data"]["count"].as_u64().unwrap(),
        "{after}"
    );
    let error = predict_us(&before_a, anchor) - after["data"]["time_us"].as_f64().unwrap();
    assert!(
        error.abs() <= 2.0,
        "a: tick {anchor} is {error} µs off the old timeline"
    );

    // b: 140 BPM, playing since the same start, ticking on the first life's grid.
    let (mut cb, hello, after) = connect_room(&s2, "b");
    assert_eq!(hello["data"]["bpm"], 140, "{hello}");
    assert_eq!(hello["data"]["playing"], true, "{hello}");
    assert_eq!(
        after["data"]["transport"], before_b["data"]["transport"],
        "{after}"
    );
    for _ in 0..4 {
        let tick = cb.next_event("tick");
        assert_eq!(tick["data"]["bpm"], 140);
        let n = tick["data"]["count"].as_u64().unwrap();
        let error = predict_us(&before_b, n) - tick["data"]["time_us"].as_f64().unwrap();
        assert!(
            error.abs() <= 2.0,
            "b: tick {n} is {error} µs off the first life's timeline"
        );
    }

    // c starts afresh at --bpm, and the file never brought it back.
    let (_cc, hello, _) = connect_room(&s2, "c");
    assert_eq!(
        hello["data"]["bpm"], 120,
        "c came back from the file: {hello}"
    );
    let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert!(v["rooms"]["c"].get("bpm").is_none_or(|b| b == 120.0), "{v}");
}
