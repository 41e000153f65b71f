//! The Python example of `docs/protocol.md`, `docs/examples/metronome.py`, run verbatim against
//! the real binary: it must print the beats it was asked for, one beat apart, each `due` the
//! instant the server itself gave that tick, and each printed near that instant (it plays from
//! the timeline and its clock estimate, never from a tick's arrival).
//!
//! Needs Python 3 with the `websockets` package in `tests/python/.venv` (`.ci/test` makes it
//! from `tests/python/requirements.txt`); without it the test fails with the command that
//! installs it, unless `CONDUCTOR_TEST_SKIP=python` asks to skip (`tests/common/require.rs`).

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Server;
use common::require::{self, Tool};

const BEATS: usize = 6;

/// One line of the example's output: `beat 3.2 (tick 1236) due 1764043200125.000 at
/// 1764043200125.480 (0.48 ms late)`.
#[derive(Debug)]
struct Beat {
    bar: u64,
    beat: u64,
    tick: u64,
    due_ms: f64,
    late_ms: f64,
}

fn parse(line: &str) -> Option<Beat> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let [
        "beat",
        position,
        "(tick",
        tick,
        "due",
        due,
        "at",
        _at,
        late,
        "ms",
        "late)",
    ] = words[..]
    else {
        return None;
    };
    let (bar, beat) = position.split_once('.')?;
    Some(Beat {
        bar: bar.parse().ok()?,
        beat: beat.parse().ok()?,
        tick: tick.strip_suffix(')')?.parse().ok()?,
        due_ms: due.parse().ok()?,
        late_ms: late.strip_prefix('(')?.parse().ok()?,
    })
}

#[test]
fn the_python_example_prints_each_beat_at_the_servers_instant() {
    let venv = "tests/python/.venv";
    if !require::tools(&[Tool::PythonModule {
        venv,
        module: "websockets",
        requirements: "tests/python/requirements.txt",
    }]) {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let server = Server::start(&[]);

    // The server's own instant of every tick, from a client of the test's own.
    let ticks = Arc::new(Mutex::new(HashMap::new()));
    let done = Arc::new(AtomicBool::new(false));
    let mut watcher = server.ws();
    let recorder = {
        let (ticks, done) = (ticks.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let tick = &watcher.next_event("tick")["data"];
                let count = tick["count"].as_u64().expect("tick count");
                let time_us = tick["time_us"].as_u64().expect("tick time_us");
                ticks.lock().unwrap().insert(count, time_us);
            }
        })
    };

    let mut child = Command::new(root.join(venv).join("bin/python"))
        .arg(root.join("docs/examples/metronome.py"))
        .arg(format!("ws://127.0.0.1:{}/ws", server.port))
        .arg(BEATS.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the Python example");
    // Two seconds of pings, then six beats at 120 BPM: three more seconds.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the example") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the Python example did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read the example's output");
    println!("{out}");
    assert!(status.success(), "the example exited with {status}");

    // The last printed tick may be a moment ahead of the watcher; it stops at the next tick.
    std::thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::Relaxed);
    recorder.join().expect("the tick recorder");
    let beats: Vec<Beat> = out
        .lines()
        .map(|l| parse(l).unwrap_or_else(|| panic!("not a beat line: {l:?}")))
        .collect();
    assert_eq!(beats.len(), BEATS, "{out}");
    let ticks = ticks.lock().unwrap().clone();
    for (i, b) in beats.iter().enumerate() {
        // ppqn 4 and 4 beats a bar (the defaults), counted from the transport's start at 0.
        assert_eq!(b.tick % 4, 0, "{b:?} is not on a beat");
        assert_eq!(
            (b.bar, b.beat),
            (b.tick / 16 + 1, b.tick / 4 % 4 + 1),
            "{b:?}"
        );
        if i > 0 {
            assert_eq!(
                b.tick,
                beats[i - 1].tick + 4,
                "beats skipped or doubled: {out}"
            );
        }
        let time_us = ticks
            .get(&b.tick)
            .unwrap_or_else(|| panic!("the server sent no tick {}", b.tick));
        assert!(
            (b.due_ms - *time_us as f64 / 1000.0).abs() < 0.002,
            "{b:?}: the server's tick {} was due at {time_us} µs",
            b.tick
        );
        // Not a precision check (bench/ measures that), but a wrong offset or a beat played a
        // beat late (500 ms) shows here.
        assert!(b.late_ms.abs() < 100.0, "{b:?}");
    }
}
