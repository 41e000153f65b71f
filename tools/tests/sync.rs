//! `conductor-probe --sync` through the emulator against the real binary: native clients on
//! two emulated paths (city-like and continent-like, with jitter), clocks off by seconds and
//! skewed, a tempo change, a stop and a start in the middle. The bounds are generous: this
//! checks that sync works end to end and that the probe measures it, not the targets (those
//! are `bench/wan`'s).

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::Server;
use conductor_netem::{PathConfig, Profile};
use serde_json::Value;

fn path(name: &str, port: u16, profile: &str, seed: u64) -> conductor_netem::PathHandle {
    conductor_netem::spawn(PathConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: format!("127.0.0.1:{port}"),
        profile: Profile::parse(profile).unwrap(),
        seed,
        spin: Duration::from_micros(200),
        rt_priority: 0,
        name: name.into(),
    })
    .expect("start an emulated path")
}

fn ms(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN) / 1000.0
}

#[test]
fn sync_through_emulated_paths_with_a_tempo_change_a_stop_and_a_start() {
    let server = Server::start(&["--bpm", "200"]);
    let near = path("near", server.port, "delay=20ms,jitter=5ms", 1);
    let far = path("far", server.port, "delay=75ms,jitter=10ms", 2);
    let json = std::env::temp_dir().join(format!("probe-sync-{}.json", std::process::id()));
    let out = Command::new(PathBuf::from(env!("CARGO_BIN_EXE_conductor-probe")))
        .args(["--sync", &format!("ws://127.0.0.1:{}/ws", server.port)])
        .args(["--via", &format!("near=ws://{}/ws", near.local_addr())])
        .args(["--via", &format!("far=ws://{}/ws", far.local_addr())])
        .args(["--clients", "2", "--duration", "26", "--warmup", "8"])
        .args(["--at", "13:bpm=150", "--at", "18:stop", "--at", "20:start"])
        .args(["--json", json.to_str().unwrap()])
        .output()
        .expect("run the probe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "probe failed");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    assert!(
        r["ticks_seen"].as_u64().unwrap() > 200,
        "{}",
        r["ticks_seen"]
    );

    for (i, (name, one_way)) in [("near", 20.0), ("far", 75.0)].into_iter().enumerate() {
        let p = &r["paths"][i];
        assert_eq!(p["name"], name);
        let native = &p["native"];
        let pred = &p["predecessor"];
        // The truth is right: the predecessor's strategy is as late as the path is long.
        let late = ms(&pred["error_median_us"]);
        assert!(
            (late - one_way).abs() < 8.0,
            "{name}: predecessor {late} ms late on a {one_way} ms path"
        );
        // The timeline strategy is on time, to within a few ms even on a loaded machine,
        // and each client converged.
        assert!(
            native["error_us"]["n"].as_u64().unwrap() > 100,
            "{name}: {native}"
        );
        assert!(ms(&native["error_us"]["p50"]) < 2.0, "{name}: {native}");
        assert!(ms(&native["error_us"]["p99"]) < 10.0, "{name}: {native}");
        for c in p["first_within_1ms_s"].as_array().unwrap() {
            assert!(c.as_f64().is_some_and(|s| s < 15.0), "{name}: {p}");
        }
    }
    // Across both paths: the timeline strategy within milliseconds, the predecessor's about
    // the difference of the two paths apart.
    assert!(ms(&r["overall_native_spread_us"]["p50"]) < 3.0, "{r}");
    assert!(ms(&r["overall_predecessor_spread_us"]["p50"]) > 30.0, "{r}");

    let changes = r["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 3, "{r}");
    // The tempo change happened, and every client heard of it (today after its first tick
    // on the far path: the server applies it at the next tick).
    let bpm = &changes[0];
    assert!(bpm["first_count"].as_u64().is_some(), "{bpm}");
    for p in bpm["per_path"].as_array().unwrap() {
        assert!(p["notice_ms_min"].as_f64().is_some(), "{bpm}");
    }
    // The start is announced ahead (at least 150 ms), so every client plays its first step,
    // and within a few ms of each other.
    let start = &changes[2];
    assert!(start["lead_ms"].as_f64().unwrap() >= 150.0, "{start}");
    assert_eq!(start["first_step_players"], 4, "{start}");
    assert!(ms(&start["first_step_spread_us"]["max"]) < 5.0, "{start}");
    for p in start["per_path"].as_array().unwrap() {
        assert!(p["notice_ms_min"].as_f64().unwrap() > 0.0, "{start}");
    }
    // The stop happened (what the far clients played after it is counted, not judged here).
    let stop = &changes[1];
    assert!(stop["first_count"].as_u64().is_some(), "{stop}");
}
