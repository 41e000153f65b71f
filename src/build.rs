//! Build script: hands the git commit to the compiler as `CONDUCTOR_GIT_COMMIT`, for
//! `conductor --version`.
//!
//! The commit comes from the environment variable of the same name when it is set (a Docker
//! build has no `.git`: `docker build --build-arg CONDUCTOR_GIT_COMMIT=$(git rev-parse --short
//! HEAD)`), else from `git rev-parse`, else it is `unknown`. The script runs again when HEAD
//! moves or the variable changes, and at no other time.

use std::path::{Path, PathBuf};
use std::process::Command;

const VAR: &str = "CONDUCTOR_GIT_COMMIT";

fn main() {
    println!("cargo::rerun-if-env-changed={VAR}");
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let commit = match std::env::var(VAR) {
        Ok(given) if !given.trim().is_empty() => sanitize(given.trim()),
        _ => {
            watch_head(&dir);
            git(&dir, &["rev-parse", "--short", "HEAD"])
                .map(|c| sanitize(&c))
                .unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo::rustc-env={VAR}={commit}");
}

/// At most 40 characters of `[0-9A-Za-z._-]`; anything else is not a commit we want to print.
fn sanitize(s: &str) -> String {
    let ok = s.len() <= 40
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok { s.into() } else { "unknown".into() }
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_string())
}

/// Asks cargo to rerun this script when HEAD, the branch it names, or the packed refs change.
/// Only existing files are named: a missing one would make cargo rerun the script every build.
fn watch_head(dir: &Path) {
    let resolve = |p: String| {
        let p = PathBuf::from(p);
        if p.is_absolute() { p } else { dir.join(p) }
    };
    let Some(git_dir) = git(dir, &["rev-parse", "--git-dir"]).map(resolve) else {
        return;
    };
    let common = git(dir, &["rev-parse", "--git-common-dir"])
        .map(resolve)
        .unwrap_or_else(|| git_dir.clone());
    let mut watched = vec![git_dir.join("HEAD"), common.join("packed-refs")];
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        watched.push(common.join(branch));
    }
    for path in watched.iter().filter(|p| p.exists()) {
        println!("cargo::rerun-if-changed={}", path.display());
    }
}
