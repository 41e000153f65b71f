//! conductor-floor as `bench/run` uses it: a real sink process, real loopback sockets.

use std::process::Command;

use serde_json::Value;

fn floor(args: &[&str]) -> (std::process::Output, Option<Value>) {
    let path = std::env::temp_dir().join(format!(
        "floor-{}-{}.json",
        std::process::id(),
        args.join("_")
    ));
    let out = Command::new(env!("CARGO_BIN_EXE_conductor-floor"))
        .args(args)
        .arg("--json")
        .arg(&path)
        .output()
        .expect("run conductor-floor");
    let report = std::fs::read_to_string(&path)
        .ok()
        .map(|t| serde_json::from_str(&t).expect("valid JSON"));
    let _ = std::fs::remove_file(path);
    (out, report)
}

#[test]
fn every_byte_written_to_every_socket_reaches_the_sink() {
    let (out, r) = floor(&[
        "--clients",
        "60",
        "--threads",
        "3",
        "--rate",
        "20",
        "--duration",
        "1",
        "--warmup",
        "0.2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = r.expect("a report");
    assert_eq!(r["clients"], 60);
    assert_eq!(r["threads"], 3);
    assert_eq!(r["frame_bytes"], 100);
    assert_eq!(r["sink_connections"], 60);
    assert_eq!(r["errors"], 0);
    assert_eq!(r["bytes_written"], r["bytes_received"], "{r}");
    // About 20 passes in the measured second, each writing to all 60 sockets.
    let passes = r["passes"].as_u64().unwrap();
    assert!((15..=21).contains(&passes), "{r}");
    assert_eq!(r["writes"].as_u64().unwrap(), passes * 60, "{r}");
    assert!(r["cpu_us_per_write"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["pass_us"]["p50"].as_f64().unwrap() > 0.0, "{r}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("CPU per write"), "{table}");
}

#[test]
fn flat_out_passes_follow_each_other_and_stop_on_time() {
    let started = std::time::Instant::now();
    let (out, r) = floor(&[
        "--clients",
        "20",
        "--rate",
        "0",
        "--duration",
        "0.5",
        "--warmup",
        "0.1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = r.expect("a report");
    assert!(r["passes"].as_u64().unwrap() > 20, "{r}");
    assert_eq!(r["bytes_written"], r["bytes_received"], "{r}");
    assert!(
        started.elapsed().as_secs() < 30,
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn bad_arguments_and_limits_get_a_one_line_answer() {
    let (out, _) = floor(&["--clients", "0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("conductor-floor: "), "{err}");
    let (out, _) = floor(&["--clients", "100000000"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("open files") && err.contains("ulimit -n"),
        "{err}"
    );
}
