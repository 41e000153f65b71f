//! Two drum machines in headless Chromium, each behind its own emulated path (a city, 20 ± 5 ms
//! each way, and a continent, 75 ± 15 ms), against the real binary: `tests/browser/wan.mjs`
//! measures each page's planned steps against the ticks' instants (one host, one clock), and
//! the pages against each other, through a tempo change, a stop and a start. And the drum
//! machine's nudge (`tests/browser/nudge.mjs`): set, shown, kept per browser, applied.
//!
//! Needs Debian's `chromium` (or `$CHROMIUM`), `node` and `npm ci --prefix tests/browser`;
//! without them it fails with the command that installs them, unless `CONDUCTOR_TEST_SKIP`
//! asks to skip (`tests/common/require.rs`).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::Server;
use common::require::Tool;
use conductor_netem::{PathConfig, Profile};
use serde_json::{Value, json};

fn path(port: u16, profile: &str, seed: u64) -> conductor_netem::PathHandle {
    conductor_netem::spawn(PathConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: format!("127.0.0.1:{port}"),
        profile: Profile::parse(profile).unwrap(),
        seed,
        spin: Duration::from_micros(200),
        rt_priority: 0,
        name: profile.into(),
    })
    .expect("start an emulated path")
}

/// Chromium, node and playwright-core (`tests/common/require.rs`): the browser and the
/// script directory, or `None` when an explicit skip was asked for.
fn browser_setup() -> Option<(String, PathBuf)> {
    let ready = common::require::tools(&[
        Tool::Chromium,
        Tool::Node,
        Tool::NpmPackage {
            dir: "tests/browser",
            package: "playwright-core",
        },
    ]);
    let chromium = common::require::chromium();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    ready.then(|| (chromium.display().to_string(), dir))
}

#[test]
fn the_drum_machines_nudge_is_shown_kept_and_applied() {
    let Some((chromium, dir)) = browser_setup() else {
        return;
    };
    let server = Server::start(&[]);
    let out = Command::new("node")
        .arg(dir.join("nudge.mjs"))
        .arg(format!("http://127.0.0.1:{}", server.port))
        .env("CHROMIUM", &chromium)
        .output()
        .expect("run node tests/browser/nudge.mjs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "nudge checks failed:\n{stdout}");
    assert!(stdout.matches("ok  ").count() >= 10, "{stdout}");
}

#[test]
fn two_pages_behind_two_emulated_paths_play_together() {
    let Some((chromium, dir)) = browser_setup() else {
        return;
    };

    let server = Server::start(&["--bpm", "200"]);
    let city = path(server.port, "city", 1);
    let continent = path(server.port, "continent", 2);
    let report = std::env::temp_dir().join(format!("wan-{}.json", std::process::id()));
    let node = Command::new("node")
        .arg(dir.join("wan.mjs"))
        .args(["--page", &format!("city=http://{}", city.local_addr())])
        .args([
            "--page",
            &format!("continent=http://{}", continent.local_addr()),
        ])
        .args(["--duration", "22", "--warmup", "6", "--json"])
        .arg(&report)
        .env("CHROMIUM", &chromium)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run node tests/browser/wan.mjs");
    // The changes, from a control connection straight to the server, while the pages run.
    let mut control = server.ws();
    let started = std::time::Instant::now();
    for (at, msg) in [
        (10, json!({"event": "setBpm", "data": 150})),
        (14, json!({"event": "stop"})),
        (16, json!({"event": "start"})),
    ] {
        std::thread::sleep(Duration::from_secs(at).saturating_sub(started.elapsed()));
        control.send_json(&msg);
    }
    let out = node.wait_with_output().expect("wan.mjs output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "wan.mjs failed");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let _ = std::fs::remove_file(&report);

    for (i, (name, one_way)) in [("city", 20.0), ("continent", 75.0)]
        .into_iter()
        .enumerate()
    {
        let p = &r["pages"][i];
        assert_eq!(p["name"], name);
        assert!(p["steps"].as_u64().unwrap() > 150, "{name}: {p}");
        assert!(p["error_ms"]["n"].as_u64().unwrap() > 50, "{name}: {p}");
        // On time to within a few ms, on a loaded 2-core machine with its audio in the loop.
        assert!(p["error_ms"]["p50"].as_f64().unwrap() < 3.0, "{name}: {p}");
        assert!(p["error_ms"]["p99"].as_f64().unwrap() < 15.0, "{name}: {p}");
        // The truth is right: ticks arrive a path late.
        let late = p["predecessor_error_median_ms"].as_f64().unwrap();
        assert!(
            late > one_way - 5.0,
            "{name}: ticks {late} ms late on a {one_way} ms path"
        );
    }
    // Together: the timeline strategy within ms, the predecessor's the paths' difference apart.
    assert!(
        r["spread_ms"]["p50"].as_f64().unwrap() < 3.0,
        "{}",
        r["spread_ms"]
    );
    assert!(
        r["predecessor_spread_ms"]["p50"].as_f64().unwrap() > 25.0,
        "{}",
        r["predecessor_spread_ms"]
    );
    // The start is announced at least 150 ms ahead: both pages play its first step together.
    let changes = r["changes"].as_array().unwrap();
    let start = changes
        .iter()
        .find(|c| c["kind"] == "start")
        .unwrap_or_else(|| panic!("no start among {changes:?}"));
    assert_eq!(start["first_step_pages"], 2, "{start}");
    assert!(
        start["first_step_spread_ms"].as_f64().unwrap() < 5.0,
        "{start}"
    );
    for heard in start["heard_before_ms"].as_array().unwrap() {
        assert!(heard.as_f64().unwrap() > 0.0, "{start}");
    }
    assert!(changes.iter().any(|c| c["kind"] == "tempo"), "{changes:?}");
    assert!(changes.iter().any(|c| c["kind"] == "stop"), "{changes:?}");
    assert_eq!(
        r["problems"].as_array().unwrap().len(),
        0,
        "{}",
        r["problems"]
    );
}
