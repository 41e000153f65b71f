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

// ---------------------------------------------------------------------------------------------
// The image under a real container engine

/// Podman with storage, run root and configuration of its own under the system's temporary
/// directory (short paths: conmon's sockets live under the run root), so the test neither sees
/// nor leaves images and containers in the machine's own store. Removed on drop.
struct Engine {
    dir: PathBuf,
    /// `--runtime` when the engine's default runtime cannot run containers here.
    runtime: Option<String>,
}

impl Engine {
    fn new() -> Engine {
        let dir = std::env::temp_dir().join(format!("conductor-podman-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the engine's directory");
        // crun and runc refuse to raise RLIMIT_NOFILE/RLIMIT_NPROC above the hard limits of
        // the process that starts them, and podman as root asks for 1048576 open files by
        // default: ask for what this process is allowed. The server needs a handful of
        // threads, and as many open files as its clients.
        let nofile = hard_limit(libc::RLIMIT_NOFILE).min(65_536);
        let nproc = hard_limit(libc::RLIMIT_NPROC).min(4_096);
        // cgroupfs, and events in a file: the engine must not need a running systemd.
        let conf = format!(
            "[containers]\n\
             default_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc={nproc}:{nproc}\"]\n\
             [engine]\n\
             cgroup_manager = \"cgroupfs\"\n\
             events_logger = \"file\"\n"
        );
        std::fs::write(dir.join("containers.conf"), conf).expect("write containers.conf");
        Engine { dir, runtime: None }
    }

    fn podman(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .arg("--root")
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            // vfs: plain directories, so storage works on any filesystem, nested or not.
            .args(["--storage-driver", "vfs"]);
        if let Some(runtime) = &self.runtime {
            cmd.args(["--runtime", runtime]);
        }
        cmd.args(args).stdin(Stdio::null());
        cmd
    }

    /// Runs `podman args…` to the end (at most `limit`): its output, or why it failed.
    fn run(&self, args: &[&str], limit: Duration) -> Result<Output, String> {
        let mut child = self
            .podman(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run podman: {e}"))?;
        let (tx, rx) = mpsc::channel();
        let pid = child.id();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        std::thread::spawn(move || {
            let mut out = String::new();
            let mut err = String::new();
            if let Some(mut s) = stdout {
                let _ = s.read_to_string(&mut out);
            }
            if let Some(mut s) = stderr {
                let _ = s.read_to_string(&mut err);
            }
            let _ = tx.send((out, err));
        });
        let Ok((out, err)) = rx.recv_timeout(limit) else {
            // SAFETY: kill with a pid we spawned and have not waited for.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            let _ = child.wait();
            return Err(format!("`podman {}` took over {limit:?}", args.join(" ")));
        };
        let status = child.wait().map_err(|e| e.to_string())?;
        Ok(Output {
            status,
            stdout: out.into_bytes(),
            stderr: err.into_bytes(),
        })
    }

    /// `podman args…`, which must succeed: its stdout.
    fn ok(&self, args: &[&str], limit: Duration) -> String {
        let out = self.run(args, limit).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.status.success(),
            "`podman {}` failed ({}):\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Picks the first runtime that can start a container from `image` here: the engine's
    /// default (crun on Debian), else runc, which also runs on hosts with cgroup controllers
    /// on both hierarchies at once (crun refuses those). The reasons, when none can.
    fn choose_runtime(&mut self, image: &str) -> Result<String, String> {
        let mut reasons = Vec::new();
        for runtime in [None, Some("runc")] {
            self.runtime = runtime.map(str::to_string);
            let name = runtime.unwrap_or("the default runtime");
            let tried = self.run(
                &[
                    "run",
                    "--rm",
                    "--entrypoint",
                    "/conductor",
                    image,
                    "--version",
                ],
                Duration::from_secs(60),
            );
            match tried {
                Ok(out) if out.status.success() => return Ok(name.to_string()),
                Ok(out) => reasons.push(format!(
                    "{name}: {}",
                    last_error_line(&String::from_utf8_lossy(&out.stderr))
                )),
                Err(e) => reasons.push(format!("{name}: {e}")),
            }
        }
        self.runtime = None;
        Err(reasons.join("; "))
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Containers first (their network and mounts), then the store itself.
        let _ = self.run(&["rm", "--all", "--force"], Duration::from_secs(30));
        let _ = self.run(&["rmi", "--all", "--force"], Duration::from_secs(30));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn hard_limit(resource: libc::__rlimit_resource_t) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    let ok = unsafe { libc::getrlimit(resource, &mut lim) } == 0;
    assert!(ok, "getrlimit: {}", std::io::Error::last_os_error());
    lim.rlim_max
}

/// The line of an engine's stderr that says what went wrong (podman logs other errors too,
/// e.g. that it cannot reach systemd for health-check timers).
fn last_error_line(stderr: &str) -> String {
    stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("Error:"))
        .or_else(|| stderr.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("no message")
        .trim()
        .to_string()
}

/// Whether podman is installed and answers.
fn podman_installed() -> bool {
    Command::new("podman")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

const ENGINE_PACKAGES: &str = "apt-get install -y podman buildah crun runc uidmap fuse-overlayfs";

/// Fails the test: `what` (an engine, or one that works) is missing; or records the skip
/// when `CONDUCTOR_TEST_SKIP=podman` asks for it.
fn no_engine(what: &str) {
    let go_on = require::missing("podman", what, ENGINE_PACKAGES);
    assert!(!go_on, "require::missing returns only to skip");
}

/// Docker's name for this machine's architecture, as BuildKit sets `TARGETARCH`.
fn docker_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The Dockerfile's final stage, built by podman from the static binary `built()` made (the
/// `build` stage replaced by a directory that holds it), run as the image says: user 65534,
/// its `HEALTHCHECK` run by the engine, stopped with its `STOPSIGNAL`.
#[test]
fn the_image_runs_under_podman() {
    if !static_build_possible() {
        return;
    }
    if !podman_installed() {
        return no_engine("podman (a container engine)");
    }
    let binary = &built().binary;
    let mut engine = Engine::new();
    // Whether this engine can build at all, apart from the Dockerfile: a missing or broken
    // engine may be skipped explicitly; a Dockerfile that does not build may not.
    let probe = engine.dir.join("probe-context");
    std::fs::create_dir_all(&probe).expect("create the probe context");
    std::fs::write(
        probe.join("Containerfile"),
        "FROM scratch\nCOPY Containerfile /\n",
    )
    .expect("write the probe Containerfile");
    let probe_tag = format!("localhost/conductor-probe:{}", std::process::id());
    match engine.run(
        &["build", "--tag", &probe_tag, &probe.to_string_lossy()],
        Duration::from_secs(60),
    ) {
        Ok(out) if out.status.success() => {
            let _ = engine.run(&["rmi", "--force", &probe_tag], Duration::from_secs(30));
        }
        Ok(out) => {
            let why = last_error_line(&String::from_utf8_lossy(&out.stderr));
            return no_engine(&format!(
                "a container engine that can build images here (podman build: {why})"
            ));
        }
        Err(why) => {
            return no_engine(&format!(
                "a container engine that can build images here ({why})"
            ));
        }
    }

    // A directory standing in for the `build` stage: `COPY --from=build /conductor` takes the
    // binary from it. It is also the build context, which the final stage does not read.
    let stage = engine.dir.join("build-stage");
    std::fs::create_dir_all(&stage).expect("create the stage directory");
    std::fs::copy(binary, stage.join("conductor")).expect("copy the binary");
    // `COPY --from=build /srv /var/lib/conductor`: the empty directory the state volume is made
    // of (Debian's /srv in the real build stage).
    std::fs::create_dir_all(stage.join("srv")).expect("create the stage's /srv");
    let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile");
    let image = format!("localhost/conductor-test:{}", std::process::id());
    let build_context = format!("build={}", stage.display());
    let target_arch = format!("TARGETARCH={}", docker_arch());
    let built_image = engine.run(
        &[
            "build",
            // Docker's format: OCI images have no HEALTHCHECK, and podman would drop it.
            "--format",
            "docker",
            "--build-context",
            &build_context,
            // Only the build stage reads it, and it is skipped; this keeps podman from warning.
            "--build-arg",
            &target_arch,
            "--file",
            &dockerfile.to_string_lossy(),
            "--tag",
            &image,
            &stage.to_string_lossy(),
        ],
        Duration::from_secs(120),
    );
    let built_image = match built_image {
        Ok(out) if out.status.success() => out,
        // The engine builds a trivial image here, so this is the Dockerfile's fault: a
        // failure, never a skip.
        Ok(out) => panic!(
            "podman build of the Dockerfile's final stage failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(why) => panic!("podman build of the Dockerfile's final stage failed: {why}"),
    };
    let log = String::from_utf8_lossy(&built_image.stdout);
    assert!(
        !log.contains("cargo build"),
        "the build stage ran instead of the prebuilt binary:\n{log}"
    );

    // What the image declares, as the engine read it from the Dockerfile.
    let config = engine.ok(
        &["image", "inspect", "--format", "{{json .Config}}", &image],
        Duration::from_secs(30),
    );
    let config: serde_json::Value = serde_json::from_str(&config).expect("image config JSON");
    assert_eq!(config["User"], "65534:65534", "{config}");
    assert_eq!(config["StopSignal"], "SIGTERM", "{config}");
    assert_eq!(config["Entrypoint"], serde_json::json!(["/conductor"]));
    let health = engine.ok(
        &[
            "image",
            "inspect",
            "--format",
            "{{json .HealthCheck}}",
            &image,
        ],
        Duration::from_secs(30),
    );
    let health: serde_json::Value = serde_json::from_str(&health).expect("health-check JSON");
    assert_eq!(
        health["Test"],
        serde_json::json!(["CMD", "/conductor", "healthcheck"]),
        "{health}"
    );

    match engine.choose_runtime(&image) {
        Ok(runtime) => eprintln!("deploy: podman runs the image with {runtime}"),
        Err(why) => {
            return no_engine(&format!(
                "a container engine that can run containers here ({why})"
            ));
        }
    }

    // Published on a free loopback port, as `docker run -p` would.
    let free = TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = free.local_addr().expect("its address").port();
    drop(free);
    let name = format!("conductor-test-{}", std::process::id());
    let publish = format!("127.0.0.1:{port}:3000");
    engine.ok(
        &[
            "run",
            "--detach",
            "--name",
            &name,
            "--publish",
            &publish,
            &image,
        ],
        Duration::from_secs(60),
    );
    let logs = || {
        engine
            .run(&["logs", &name], Duration::from_secs(10))
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default()
    };

    let pid = engine.ok(
        &["inspect", "--format", "{{.State.Pid}}", &name],
        Duration::from_secs(30),
    );
    let uid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("the container's process")
        .lines()
        .find_map(|l| l.strip_prefix("Uid:").map(str::to_string))
        .expect("a Uid line");
    assert!(
        uid.split_whitespace().all(|id| id == NOBODY.to_string()),
        "the container's server runs as uid {uid}, not {NOBODY}"
    );

    // /healthz through the published port, then the HEALTHCHECK as the engine runs it (inside
    // the container, its result recorded in the container's health state). Without real-time
    // priority a busy machine can make a window of ticks late, and both say 503 / unhealthy
    // for a while: either must come good within 30 s.
    let until = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let answer = TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| get(port, "/healthz"));
        let check = engine.run(&["healthcheck", "run", &name], Duration::from_secs(30));
        let state = engine.ok(
            &["inspect", "--format", "{{.State.Health.Status}}", &name],
            Duration::from_secs(30),
        );
        let check_ok = check.as_ref().is_ok_and(|o| o.status.success());
        if answer.as_ref().is_some_and(|a| a.0 == 200) && check_ok && state == "healthy" {
            break;
        }
        seen.push(format!(
            "/healthz {:?}; healthcheck {:?}; state {state}",
            answer.map(|a| (a.0, a.2)),
            check.map(|o| o.status.code())
        ));
        assert!(
            Instant::now() < until,
            "the container never became healthy:\n{}\n{}",
            seen.join("\n"),
            logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (status, head, body) = get(port, "/");
    assert_eq!(status, 200, "GET / through the published port");
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(body.contains("</html>"));
    eprintln!(
        "deploy: container healthy (/healthz 200, HEALTHCHECK passed) after {} try(s)",
        seen.len() + 1
    );

    // `podman stop` sends the image's STOPSIGNAL and waits up to 10 s before SIGKILL (which
    // would read as 137): the server closes its clients and exits 0 well within that.
    let stopping = Instant::now();
    engine.ok(&["stop", "--time", "10", &name], Duration::from_secs(30));
    let stopped_in = stopping.elapsed();
    let code = engine.ok(
        &["inspect", "--format", "{{.State.ExitCode}}", &name],
        Duration::from_secs(30),
    );
    assert_eq!(
        code,
        "0",
        "exit status after podman stop ({stopped_in:?}):\n{}",
        logs()
    );
    assert!(
        stopped_in < Duration::from_secs(8),
        "stopping took {stopped_in:?}: the stop signal did not end the server"
    );
    assert!(
        logs().contains("shutdown complete"),
        "the server did not log its shutdown:\n{}",
        logs()
    );
}

/// The build stage's dependency layer, replayed on the repository: the files its `COPY` lines
/// name, then its first `RUN` after them (the empty sources), in an empty directory standing in
/// for `/src`; cargo must then load the whole workspace offline with the locked versions. A
/// workspace member added to `Cargo.toml` and forgotten in the Dockerfile fails here (a real
/// `docker build` needs a registry this machine cannot reach).
#[test]
fn the_dockerfiles_dependency_layer_loads_the_workspace() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).expect("read Dockerfile");
    // Continuation lines joined, so that each instruction is one line.
    let instructions: Vec<String> = dockerfile
        .replace("\\\n", " ")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    let first = instructions
        .iter()
        .position(|i| i.starts_with("COPY Cargo.toml"))
        .expect("the dependency layer starts with COPY Cargo.toml");
    let dir = std::env::temp_dir().join(format!("conductor-docker-deps-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the stand-in for /src");
    let mut stubs = None;
    for instruction in &instructions[first..] {
        if let Some(args) = instruction.strip_prefix("COPY ") {
            let words: Vec<&str> = args.split_whitespace().collect();
            let (sources, dest) = words.split_at(words.len() - 1);
            for source in sources {
                let to = if dest[0] == "./" {
                    dir.join(source)
                } else {
                    dir.join(dest[0])
                };
                std::fs::create_dir_all(to.parent().expect("a parent")).expect("mkdir");
                std::fs::copy(root.join(source), &to)
                    .unwrap_or_else(|e| panic!("COPY {source}: {e}"));
            }
        } else if let Some(script) = instruction.strip_prefix("RUN ") {
            stubs = Some(script.to_string());
            break;
        }
    }
    let stubs = stubs.expect("a RUN after the manifests (the empty sources)");
    assert!(
        !stubs.contains("cargo"),
        "the empty sources get a RUN of their own, before the build: {stubs}"
    );
    let ran = Command::new("sh")
        .args(["-c", &stubs])
        .current_dir(&dir)
        .output()
        .expect("run sh");
    assert!(ran.status.success(), "{stubs}: {ran:?}");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let loaded = Command::new(cargo)
        .args(["metadata", "--locked", "--offline", "--format-version", "1"])
        .current_dir(&dir)
        .output()
        .expect("run cargo metadata");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        loaded.status.success(),
        "the Dockerfile's dependency layer does not load the workspace; copy every member's \
         Cargo.toml and give it empty sources:\n{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
}
