//! The deployed binary, as far as a machine without a Docker engine can check it.
//!
//! The Dockerfile builds one static binary with the `dist` profile and puts it alone into an
//! image `FROM scratch`, run as user 65534. This test builds it the same way (for musl, as in
//! the Dockerfile; `CONDUCTOR_DEPLOY_TARGET=x86_64-unknown-linux-gnu` builds glibc with
//! `+crt-static` instead), into its own target directory so it never waits on the outer `cargo test`'s build lock. Then it copies the
//! binary into an empty directory and runs it there with `chroot --userspec=65534:65534`: no
//! libraries, no `/etc`, `/proc` or `/dev`, not root. There it must answer `/healthz` and the
//! page, pass its own `healthcheck`, stay small when idle, and exit 0 on SIGTERM.
//!
//! Needs the musl target (`rustup target add x86_64-unknown-linux-musl`) and root for
//! `chroot --userspec`; without root it uses a user namespace (`unshare -r`) and runs as the
//! invoking user instead. Where something is missing the test fails and says what to install,
//! unless `CONDUCTOR_TEST_SKIP` asks to skip it (`musl`, `jail`; `tests/common/require.rs`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::require::{self, Tool};

/// The targets.
const MAX_BINARY_BYTES: u64 = 3 * 1024 * 1024;
const MAX_IDLE_RSS_KIB: u64 = 4 * 1024;
/// The user the image runs as (`USER 65534:65534`, nobody).
const NOBODY: u32 = 65534;

struct Built {
    binary: PathBuf,
    target: String,
}

/// Builds the static binary once for all tests in this file.
fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let musl = require::musl_target();
        // The tests asked for the musl target already (`static_build_possible`).
        let target = std::env::var("CONDUCTOR_DEPLOY_TARGET").unwrap_or(musl);
        let target_dir = static_target_dir();
        let started = Instant::now();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["build", "--locked", "--quiet", "--profile", "dist"])
            .args(["--bin", "conductor", "--target", &target, "--target-dir"])
            .arg(&target_dir)
            // As in the Dockerfile. musl links statically anyway; glibc needs asking.
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_RUSTFLAGS")
            .status()
            .expect("run cargo");
        assert!(status.success(), "static build failed: {status}");
        eprintln!(
            "deploy: built {target} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Built {
            binary: target_dir.join(&target).join("dist").join("conductor"),
            target,
        }
    })
}

/// Whether the static binary can be built here: the musl target the Dockerfile builds for is
/// installed, or `CONDUCTOR_DEPLOY_TARGET` names another target. False (the skip recorded) when
/// it is missing and `CONDUCTOR_TEST_SKIP=musl`; a failure naming the install command otherwise.
fn static_build_possible() -> bool {
    std::env::var_os("CONDUCTOR_DEPLOY_TARGET").is_some() || require::tools(&[Tool::MuslTarget])
}

/// `static/` beside the directory this test was built into (`target/release/deps/..`).
fn static_target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    profile_dir
        .parent()
        .expect("target directory")
        .join("static")
}

/// Program headers of an ELF64 little-endian file: (type, offset, file size).
fn program_headers(elf: &[u8]) -> Vec<(u32, u64, u64)> {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!((elf[4], elf[5]), (2, 1), "not ELF64 little-endian");
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36), u16_at(0x38));
    (0..phnum as usize)
        .map(|i| {
            let h = phoff + i * phentsize as usize;
            (u32_at(h), u64_at(h + 8), u64_at(h + 32))
        })
        .collect()
}

const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;

#[test]
fn the_binary_is_static_and_small() {
    if !static_build_possible() {
        return;
    }
    let built = built();
    let elf = std::fs::read(&built.binary).expect("read binary");
    let headers = program_headers(&elf);
    assert!(
        headers.iter().all(|h| h.0 != PT_INTERP),
        "{} asks for a dynamic loader (PT_INTERP)",
        built.binary.display()
    );
    // A static PIE keeps a dynamic section for relocating itself, but names no library.
    for &(_, offset, size) in headers.iter().filter(|h| h.0 == PT_DYNAMIC) {
        let dynamic = &elf[offset as usize..(offset + size) as usize];
        for entry in dynamic.chunks_exact(16) {
            let tag = u64::from_le_bytes(entry[..8].try_into().unwrap());
            assert_ne!(tag, DT_NEEDED, "the binary needs a shared library");
            if tag == DT_NULL {
                break;
            }
        }
    }
    let bytes = elf.len() as u64;
    eprintln!(
        "deploy: {} is {bytes} bytes ({:.2} MiB)",
        built.target,
        bytes as f64 / 1048576.0
    );
    assert!(
        bytes <= MAX_BINARY_BYTES,
        "binary is {bytes} bytes, over the 3 MiB target"
    );
}

/// An empty directory holding only the binary, removed on drop.
struct Jail {
    root: PathBuf,
}

impl Jail {
    fn new(binary: &Path) -> Jail {
        let root = std::env::temp_dir().join(format!("conductor-deploy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir(&root).expect("create jail");
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let inside = root.join("conductor");
        std::fs::copy(binary, &inside).expect("copy binary");
        std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o755)).unwrap();
        Jail { root }
    }

    /// `/conductor args…` inside the jail: as 65534 when we are root, else as ourselves in a
    /// user namespace.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = if is_root() {
            let mut c = Command::new("chroot");
            c.arg(format!("--userspec={NOBODY}:{NOBODY}"));
            c
        } else {
            let mut c = Command::new("unshare");
            c.args(["--user", "--map-root-user", "chroot"]);
            c
        };
        cmd.arg(&self.root)
            .arg("/conductor")
            .args(args)
            // Nothing from the test's environment (PORT, say) leaks in.
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("RUST_LOG", "info");
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn in the jail");
        // Nothing here may hang the test suite.
        let until = Instant::now() + Duration::from_secs(20);
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > until {
                let _ = child.kill();
                panic!("`conductor {}` did not finish in 20 s", args.join(" "));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().expect("output")
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The server running in the jail; killed if the test ends early.
struct Jailed {
    child: Child,
    port: u16,
    log: Arc<Mutex<String>>,
}

impl Jailed {
    fn start(jail: &Jail) -> Jailed {
        let mut child = jail
            .command(&["--port", "0", "--bind", "127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the server in the jail");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let banner = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
        let port = banner
            .split("http://127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|p| p.parse().ok());
        let mut jailed = Jailed {
            child,
            port: 0,
            log,
        };
        match port {
            Some(port) => jailed.port = port,
            None => panic!(
                "no banner from the jailed server: {banner:?}\n{}",
                jailed.log()
            ),
        }
        jailed
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// A line of /proc/PID/status, e.g. `VmRSS`.
    fn status(&self, key: &str) -> String {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(':')))
            .unwrap_or_else(|| panic!("no {key} in /proc/PID/status"))
            .trim()
            .to_string()
    }
}

impl Drop for Jailed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` on 127.0.0.1:port: (status, headers, body).
fn get(port: u16, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not HTTP: {text:?}"));
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn ticks_emitted(port: u16) -> u64 {
    let (status, _, body) = get(port, "/stats");
    assert_eq!(status, 200, "{body}");
    let stats: serde_json::Value = serde_json::from_str(&body).expect("stats JSON");
    stats["ticks_emitted"].as_u64().expect("ticks_emitted")
}

/// Whether this process can run something in a jail: as root with chroot, or else in a user
/// namespace of its own.
fn can_jail() -> bool {
    let mut probe = if is_root() {
        let mut c = Command::new("chroot");
        c.arg("--version");
        c
    } else {
        let mut c = Command::new("unshare");
        c.args(["--user", "--map-root-user", "true"]);
        c
    };
    probe
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn it_serves_from_an_empty_root_as_nobody() {
    if !static_build_possible() {
        return;
    }
    if !can_jail()
        && !require::missing(
            "jail",
            "root (for chroot --userspec) or unprivileged user namespaces (unshare -r)",
            "run the tests as root, or allow user namespaces: sysctl -w kernel.unprivileged_userns_clone=1",
        )
    {
        return;
    }
    let jail = Jail::new(&built().binary);

    let out = jail.run(&["--version"]);
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && version.starts_with("conductor 0.1.0 ("),
        "--version in the jail: {out:?}"
    );
    eprintln!("deploy: {}", version.trim());

    let server = Jailed::start(&jail);
    let port = server.port;
    if is_root() {
        let uid = server.status("Uid");
        assert!(
            uid.split_whitespace().all(|id| id == NOBODY.to_string()),
            "runs as uid {uid}, not {NOBODY}"
        );
    }

    let (status, head, body) = get(port, "/");
    assert_eq!(status, 200, "GET /");
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(
        body.trim_start()
            .to_ascii_lowercase()
            .starts_with("<!doctype html")
            && body.contains("</html>"),
        "GET / is not the page: {:?}",
        &body[..body.len().min(200)]
    );

    // /healthz says 503 while 8 of the last 64 ticks were late, so judge it over a full window,
    // not in the first few ticks when it cannot yet be anything but 200. In the jail the server
    // has no real-time priority, so other work on the machine can make a window late: it must
    // answer 200, and `healthcheck` pass, at some point in the 30 s after that. Each 503 on the
    // way must also make `healthcheck` fail.
    let started = Instant::now();
    while ticks_emitted(port) < 64 {
        assert!(started.elapsed() < Duration::from_secs(20), "no ticks");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut seen = Vec::new();
    let until = Instant::now() + Duration::from_secs(30);
    let healthy = loop {
        let (status, _, body) = get(port, "/healthz");
        let out = jail.run(&["healthcheck", "--port", &port.to_string()]);
        if status == 200 && out.status.success() {
            break true;
        }
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if status != 200 {
            assert_eq!(
                out.status.code(),
                Some(1),
                "healthcheck passed while /healthz said {status}"
            );
        }
        seen.push(format!(
            "/healthz {status} {}; healthcheck: {}",
            body.trim(),
            stderr.trim()
        ));
        if Instant::now() > until {
            break false;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        healthy,
        "no 200 from /healthz with a passing healthcheck in 30 s (on the normal scheduler, \
         a busy machine makes ticks late):\n{}\n{}",
        seen.join("\n"),
        server.log()
    );
    eprintln!(
        "deploy: /healthz 200 and healthcheck 0 after {} unhealthy answer(s)",
        seen.len()
    );

    let free = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = free.local_addr().unwrap().port();
    drop(free);
    let out = jail.run(&["healthcheck", "--port", &closed_port.to_string()]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "healthcheck, nothing listening: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect"),
        "{out:?}"
    );

    std::thread::sleep(Duration::from_secs(1));
    let rss = server.status("VmRSS");
    let kib: u64 = rss
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("VmRSS {rss:?}"));
    eprintln!("deploy: idle RSS {kib} KiB");
    assert!(
        kib <= MAX_IDLE_RSS_KIB,
        "idle RSS {kib} KiB, over the 4 MiB target"
    );

    // SAFETY: kill with a pid we spawned and still own (not yet waited for).
    unsafe { libc::kill(server.child.id() as libc::pid_t, libc::SIGTERM) };
    let mut server = server;
    let until = Instant::now() + Duration::from_secs(5);
    let code = loop {
        if let Some(status) = server.child.try_wait().expect("wait") {
            break status.code();
        }
        assert!(Instant::now() < until, "no exit within 5 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0), "exit status after SIGTERM\n{}", server.log());
}
