//! The pages in a real browser: headless Chromium (Debian's `chromium`) driven by
//! `playwright-core` from npm, through `tests/browser/run.mjs`, against the real binary. It
//! checks both pages for console errors, live ticks, the `#bpm` control against `/stats`, tap
//! tempo, start/stop, the library's clock offset on loopback, two drum machines scheduling the
//! same step for the same instant, and the token form against a second server that wants a
//! control token. It checks the control page's fixed defects (a 3-decimal tempo at 390 px, an
//! error that moves nothing, the box after a refused tempo, T after the slider, Start/Stop
//! showing which is active, a killed server shown as lost), the join panel (its LAN URL, and
//! the QR code decoded back with jsQR), the docs' example page served with `--www`, and a page
//! of another origin importing `/conductor.js`. It takes screenshots into the target directory
//! (`UPDATE_SCREENSHOTS=1`: into `tests/browser/screenshots/`, the committed ones).
//!
//! Needs `/usr/bin/chromium` (or `$CHROMIUM`), `node` and `npm ci --prefix tests/browser`;
//! without them it fails with the command that installs them, unless `CONDUCTOR_TEST_SKIP`
//! asks to skip (`tests/common/require.rs`). `.ci/test` installs all three.

mod common;
mod spawned;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use common::Server;
use common::require::{self, Tool};
use spawned::{Spawned, TempDir};

#[test]
fn pages_work_in_headless_chromium() {
    if !require::tools(&[
        Tool::Chromium,
        Tool::Node,
        Tool::NpmPackage {
            dir: "tests/browser",
            package: "playwright-core",
        },
        Tool::NpmPackage {
            dir: "tests/browser",
            package: "jsqr",
        },
    ]) {
        return;
    }
    let chromium = require::chromium();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser");

    // The first server also serves the docs' example pages (--www).
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/examples");
    let examples = examples.to_str().expect("UTF-8 path");
    let server = Server::start(&["--www", examples]);
    let guarded = Server::start(&["--control-token", "browser-test-token"]);
    // Another origin, on every interface: the join panel's LAN URL and QR code, and a page
    // importing the first server's /conductor.js. (Only ever reached on 127.0.0.1.)
    let logs = TempDir::new("browser");
    let other = Spawned::start(
        &[
            "--port", "0", "--bind", "0.0.0.0", "--state", "none", "--www", examples,
        ],
        &[],
        &logs.0,
    );
    // A server the browser script kills, to see the control page show it.
    let doomed = Server::start(&[]);
    let started = Instant::now();
    // A test run leaves the committed screenshots alone; UPDATE_SCREENSHOTS=1 refreshes them.
    let shots = if std::env::var_os("UPDATE_SCREENSHOTS").is_some() {
        dir.join("screenshots")
    } else {
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots")
    };
    let out = Command::new("node")
        .env("SCREENSHOTS_DIR", &shots)
        .arg(dir.join("run.mjs"))
        .arg(format!("http://127.0.0.1:{}", server.port))
        .arg(format!("http://127.0.0.1:{}", guarded.port))
        .arg("browser-test-token")
        .env("CHROMIUM", &chromium)
        .env("OTHER_BASE", format!("http://127.0.0.1:{}", other.port))
        .env("DOOMED_BASE", format!("http://127.0.0.1:{}", doomed.port))
        .env("DOOMED_PID", doomed.pid().to_string())
        .output()
        .expect("run node tests/browser/run.mjs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    if !stderr.trim().is_empty() {
        println!("stderr:\n{stderr}");
    }
    println!("browser test took {:.1?}", started.elapsed());
    assert!(
        out.status.success(),
        "browser checks failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}
