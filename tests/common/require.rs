//! What a test needs from outside Cargo, and explicit, counted skips when it is missing.
//!
//! A test asks for its tools before it starts anything. Present: it runs. Missing, and the
//! person running the tests asked to skip that tool (`CONDUCTOR_TEST_SKIP=browser,redis`, or
//! `all`): the skip is recorded as a marker file under `target/tmp/test-skips/` and the test
//! returns early; `.ci/test` counts those markers as skipped, not passed. Missing and no skip
//! asked for: the test fails with the one command that installs the tool. A skip is never
//! decided here behind the person's back, so a test never says `ok` for work it did not do.
//!
//! This module must not install anything: installing is `.ci/test`'s job.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The environment variable that names the tools whose tests may be skipped.
pub const SKIP_VAR: &str = "CONDUCTOR_TEST_SKIP";

/// The names `CONDUCTOR_TEST_SKIP` accepts (besides `all`), each with what it covers.
pub const SKIP_NAMES: &[(&str, &str)] = &[
    ("browser", "Chromium, for tests/browser.rs"),
    (
        "node",
        "Node.js, npm and the npm packages of tests/ and bench/",
    ),
    ("redis", "redis-server, for tests/cluster.rs"),
    (
        "podman",
        "podman, buildah and a container engine that can run",
    ),
    ("musl", "Rust's musl target, for the static binary"),
    (
        "python",
        "Python 3 with venv and the websockets package, for tests/python_client.rs",
    ),
    (
        "alsa",
        "the kernel's ALSA sequencer (/dev/snd/seq), for the bridge's MIDI port test",
    ),
    (
        "jail",
        "root or user namespaces, to run the binary in an empty root",
    ),
];

/// Something a test needs that Cargo does not provide.
pub enum Tool<'a> {
    /// Debian's `chromium` at `/usr/bin/chromium`, or wherever `$CHROMIUM` says.
    Chromium,
    /// `node` and `npm` on the PATH.
    Node,
    /// An npm package installed under `dir/node_modules/` by `npm ci --prefix dir`; `dir` is
    /// relative to the workspace root.
    NpmPackage { dir: &'a str, package: &'a str },
    /// `redis-server` on the PATH.
    RedisServer,
    /// Rust's standard library for `<arch>-unknown-linux-musl`.
    MuslTarget,
    /// A Python module importable by the virtual environment `venv` (relative to the workspace
    /// root), installed there from the pip requirements file `requirements`.
    PythonModule {
        venv: &'a str,
        module: &'a str,
        requirements: &'a str,
    },
}

impl Tool<'_> {
    /// The `CONDUCTOR_TEST_SKIP` name that covers this tool.
    pub fn skip_name(&self) -> &'static str {
        match self {
            Tool::Chromium => "browser",
            Tool::Node | Tool::NpmPackage { .. } => "node",
            Tool::RedisServer => "redis",
            Tool::MuslTarget => "musl",
            Tool::PythonModule { .. } => "python",
        }
    }

    /// What is missing, in words.
    pub fn what(&self) -> String {
        match self {
            Tool::Chromium => format!("Chromium ({})", chromium().display()),
            Tool::Node => "node and npm".into(),
            Tool::NpmPackage { dir, package } => format!("the npm package {package} in {dir}"),
            Tool::RedisServer => "redis-server".into(),
            Tool::MuslTarget => format!("the Rust target {}", musl_target()),
            Tool::PythonModule { venv, module, .. } => {
                format!("the Python module {module} in {venv}")
            }
        }
    }

    /// The one command that installs it.
    pub fn install(&self) -> String {
        match self {
            Tool::Chromium => "apt-get install -y chromium".into(),
            Tool::Node => "apt-get install -y nodejs npm".into(),
            Tool::NpmPackage { dir, .. } => format!("npm ci --prefix {dir}"),
            Tool::RedisServer => "apt-get install -y redis-server".into(),
            Tool::MuslTarget => format!("rustup target add {}", musl_target()),
            Tool::PythonModule {
                venv, requirements, ..
            } => format!("python3 -m venv {venv} && {venv}/bin/pip install -r {requirements}"),
        }
    }

    /// Whether it is there.
    pub fn present(&self) -> bool {
        match self {
            Tool::Chromium => chromium().is_file(),
            Tool::Node => runs("node", &["--version"]) && runs("npm", &["--version"]),
            Tool::NpmPackage { dir, package } => workspace_root()
                .join(dir)
                .join("node_modules")
                .join(package)
                .join("package.json")
                .is_file(),
            Tool::RedisServer => runs("redis-server", &["--version"]),
            Tool::MuslTarget => target_installed(&musl_target()),
            Tool::PythonModule { venv, module, .. } => {
                let python = workspace_root().join(venv).join("bin/python");
                python.is_file()
                    && runs(
                        python.to_str().unwrap_or("python3"),
                        &["-c", &format!("import {module}")],
                    )
            }
        }
    }
}

/// Whether the test may go on: true when every tool is present. When one is missing, records
/// the skip and returns false if `CONDUCTOR_TEST_SKIP` covers it, and panics with the command
/// that installs it otherwise.
#[must_use = "return from the test when this is false"]
pub fn tools(needed: &[Tool]) -> bool {
    for tool in needed {
        if !tool.present() {
            return missing(tool.skip_name(), &tool.what(), &tool.install());
        }
    }
    true
}

/// The general case, for a need that is not a [`Tool`] (a container engine that must also be
/// able to run, say): `what` is missing; `remedy` is the one command or step that fixes it.
/// Returns false (after recording the skip) when `CONDUCTOR_TEST_SKIP` covers `skip_name`,
/// and panics otherwise.
#[must_use = "return from the test when this is false"]
pub fn missing(skip_name: &str, what: &str, remedy: &str) -> bool {
    assert!(
        SKIP_NAMES.iter().any(|(name, _)| *name == skip_name),
        "unknown skip name {skip_name:?}"
    );
    if !skip_requested(skip_name) {
        panic!(
            "{what} is missing. Install it: `{remedy}` (or run .ci/test as root, which installs \
             everything the tests need); or skip these tests explicitly with \
             {SKIP_VAR}={skip_name}"
        );
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_string();
    record_skip(
        &test,
        &format!("{what} is missing ({SKIP_VAR} covers {skip_name})"),
    );
    // Straight to stderr: the harness captures eprintln!, and a skip must show.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("\n!!! SKIPPED {test}: {what} is missing, and {SKIP_VAR} asked to skip it.\n")
            .as_bytes(),
    );
    false
}

/// Whether `CONDUCTOR_TEST_SKIP` names `skip_name` or `all`. Panics on a name it does not
/// know, so that a typo does not turn into a failure that looks like a missing tool.
pub fn skip_requested(skip_name: &str) -> bool {
    match std::env::var(SKIP_VAR) {
        Ok(value) => skip_covers(&value, skip_name).unwrap_or_else(|e| panic!("{e}")),
        Err(_) => false,
    }
}

/// Whether a `CONDUCTOR_TEST_SKIP` value (names separated by commas or spaces) covers
/// `skip_name`; an error names an unknown name and lists the known ones.
pub fn skip_covers(value: &str, skip_name: &str) -> Result<bool, String> {
    let mut covered = false;
    for name in value
        .split([',', ' '])
        .map(str::trim)
        .filter(|n| !n.is_empty())
    {
        if name != "all" && !SKIP_NAMES.iter().any(|(n, _)| *n == name) {
            return Err(format!(
                "{SKIP_VAR} names {name:?}; the names are all, {}",
                SKIP_NAMES
                    .iter()
                    .map(|(n, what)| format!("{n} ({what})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        covered |= name == "all" || name == skip_name;
    }
    Ok(covered)
}

/// Where skip markers go: `target/tmp/test-skips/`, which `.ci/test` empties before a run and
/// counts after it.
pub fn skip_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-skips")
}

fn record_skip(test: &str, why: &str) {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let dir = skip_dir();
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "test".into());
    let file = format!(
        "{exe}-{}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        test.replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "_")
    );
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join(file), format!("{exe} {test}: {why}\n")));
    if let Err(e) = written {
        // A skip that cannot be counted would be reported as a pass: refuse instead.
        panic!("cannot record the skip in {}: {e}", dir.display());
    }
}

/// The workspace root: this package's manifest directory, or its parent for `tools/`.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    if manifest.join("tools").is_dir() {
        manifest.to_path_buf()
    } else {
        manifest
            .parent()
            .expect("tools/ has a parent")
            .to_path_buf()
    }
}

/// The Chromium binary: `$CHROMIUM`, else Debian's.
pub fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/chromium".into())
}

/// `<arch>-unknown-linux-musl` for this machine.
pub fn musl_target() -> String {
    format!("{}-unknown-linux-musl", std::env::consts::ARCH)
}

/// Whether `program args…` runs and exits 0.
fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether the toolchain has the standard library for `target`.
pub fn target_installed(target: &str) -> bool {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    Command::new(rustc)
        .args(["--print", "target-libdir", "--target", target])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .is_some_and(|dir| {
            std::fs::read_dir(dir).is_ok_and(|entries| {
                entries.flatten().any(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.starts_with("libstd") && name.ends_with(".rlib")
                })
            })
        })
}
