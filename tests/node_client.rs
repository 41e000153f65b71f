//! conductor.js under Node, run by `cargo test`: `node --test tests/node/` with
//!
//! * `clock.test.mjs`: its clock estimator against synthetic paths (jitter, bursts, offset,
//!   skew, asymmetry, slewing) and its timeline maths;
//! * `crosscheck.test.mjs`: the same samples through conductor.js and through the Rust crate
//!   `conductor-sync` (written here), which must agree: one algorithm,
//!   `docs/protocol.md#clock-sync`;
//! * `client.test.mjs`: the library against the real binary with the `ws` package's WebSocket
//!   (Node 20 has none built in), the error without one, and `docs/examples/node-metronome.mjs`.
//!
//! Needs `node`, `npm` and `npm ci --prefix tests/node` (the `ws` package); without them the
//! test fails with the command that installs them, unless `CONDUCTOR_TEST_SKIP` asks to skip
//! (`tests/common/require.rs`). `.ci/test` installs them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Server;
use common::require::Tool;
use conductor_sync::ClockSync;
use serde_json::json;

fn node_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node")
}

/// Whether the test may run: node, npm and the `ws` package (`tests/common/require.rs`).
#[must_use]
fn require_node() -> bool {
    common::require::tools(&[
        Tool::Node,
        Tool::NpmPackage {
            dir: "tests/node",
            package: "ws",
        },
    ])
}

/// splitmix64, for reproducible synthetic paths.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A synthetic path: the server's clock is the truth, the device's reads
/// `offset + t·(1 + skew)`; delays `base ± jitter` (uniform), and with probability `burst_p` a
/// direction 300 ms more. Returns the samples and the Rust estimator's mapping after each, both
/// in ms (the unit conductor.js works in).
fn scenario(
    name: &str,
    seed: u64,
    (up_ms, down_ms, jitter_ms): (f64, f64, f64),
    burst_p: f64,
    offset_ms: f64,
    skew_ppm: f64,
) -> serde_json::Value {
    let mut rng = Rng(seed);
    let mut sync = ClockSync::default();
    let local = |t_ns: f64| (offset_ms * 1e6 + t_ns * (1.0 + skew_ppm * 1e-6)).round() as i64;
    let delay = |base_ms: f64, rng: &mut Rng| {
        let d = (base_ms + jitter_ms * (2.0 * rng.unit() - 1.0)).max(0.0) * 1e6;
        if rng.unit() < burst_p { d + 300e6 } else { d }
    };
    let mut samples = Vec::new();
    let mut expected = Vec::new();
    let start = 1_700_000_000_000.0e6; // server unix ns
    let mut t = start;
    while t - start < 60e9 {
        let t1 = t + delay(up_ms, &mut rng);
        let t2 = t1 + 20_000.0;
        let t3 = t2 + delay(down_ms, &mut rng);
        // Whole microseconds, as the server's stamps are, so that ms floats carry them well.
        let us = |ns: f64| (ns / 1e3).round() as i64 * 1000;
        let s = [us(local(t) as f64), us(t1), us(t2), us(local(t3) as f64)];
        let m = sync
            .add_sample(s[0], s[1], s[2], s[3])
            .expect("a plausible sample");
        samples.push(s.map(|ns| ns as f64 / 1e6));
        expected.push(json!([
            m.offset_at(s[3]) as f64 / 1e6,
            m.error_bound_ns() as f64 / 1e6,
            m.rate_ppm(),
            m.residual_ns() as f64 / 1e6,
            m.settled(),
        ]));
        t += if t - start < 10e9 { 100e6 } else { 250e6 };
    }
    json!({"name": name, "samples": samples, "expected": expected})
}

#[test]
fn conductor_js_under_node() {
    if !require_node() {
        return;
    }
    let vectors = json!({"scenarios": [
        scenario("40 ± 10 ms", 1, (40.0, 40.0, 10.0), 0.0, 3_217.0, 0.0),
        scenario("150 ± 30 ms, bursts, 150 ppm slow", 2, (150.0, 150.0, 30.0), 0.05, -4_000.0, -150.0),
        scenario("20 ± 5 ms, 200 ppm fast", 3, (20.0, 20.0, 5.0), 0.0, 7_000.0, 200.0),
        scenario("20 ms up, 100 ms down", 4, (20.0, 100.0, 2.0), 0.0, 1_000_000.0, 50.0),
    ]});
    let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sync-vectors.json");
    std::fs::write(&file, vectors.to_string()).expect("write the vectors");

    let server = Server::start(&[]);
    // Full of rooms (main is one): joining another is refused with 503, which is retried.
    let full = Server::start(&["--max-rooms", "1"]);
    let out = Command::new("node")
        .arg("--test")
        .arg(node_dir().join("clock.test.mjs"))
        .arg(node_dir().join("crosscheck.test.mjs"))
        .arg(node_dir().join("client.test.mjs"))
        .env(
            "CONDUCTOR_URL",
            format!("ws://127.0.0.1:{}/ws", server.port),
        )
        .env("CONDUCTOR_SYNC_VECTORS", &file)
        .env(
            "CONDUCTOR_FULL_URL",
            format!("ws://127.0.0.1:{}/ws", full.port),
        )
        .output()
        .expect("run node --test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "node --test failed (see above)");
    // Every test ran: none was skipped or left out.
    assert!(
        stdout.contains("# fail 0") && stdout.contains("# skipped 0"),
        "{stdout}"
    );
    let passed: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("# pass "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(passed >= 15, "only {passed} tests passed");
}
