//! The first hour's pages against the real binary: `--www` files and their path rules, CORS
//! on the embedded assets, `/join` and `/qr.svg`, the banner's LAN URLs, and the command
//! line's answers to bad flags.

mod common;
mod spawned;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::symlink;
use std::process::Command;
use std::time::{Duration, Instant};

use common::bin;
use serde_json::Value;
use spawned::{Spawned, TempDir, header, request, split_response};

/// A `--www` directory with a page, a module, a subdirectory, a hidden file, a symlink that
/// stays inside and two that lead out, and a file beside it that must never be served.
fn site(dir: &TempDir) -> String {
    let www = dir.path("www");
    std::fs::create_dir_all(www.join("songs/slow")).unwrap();
    std::fs::write(www.join("page.html"), "<!doctype html><p>my page</p>").unwrap();
    std::fs::write(www.join("app.mjs"), "export const x = 1;\n").unwrap();
    std::fs::write(www.join("kick.wav"), [0x52, 0x49, 0x46, 0x46]).unwrap();
    std::fs::write(www.join("notes"), "no extension").unwrap();
    std::fs::write(www.join("songs/index.html"), "<p>songs</p>").unwrap();
    std::fs::write(www.join("songs/slow/blues.txt"), "12 bars").unwrap();
    std::fs::write(www.join("my song.txt"), "spaced").unwrap();
    std::fs::write(www.join(".env"), "SECRET=1").unwrap();
    // Must lose to the embedded library.
    std::fs::write(www.join("conductor.js"), "alert('not the library')").unwrap();
    std::fs::write(dir.path("secret.txt"), "OUTSIDE").unwrap();
    symlink(www.join("page.html"), www.join("alias.html")).unwrap();
    symlink(dir.path("secret.txt"), www.join("leak.txt")).unwrap();
    symlink(&dir.0, www.join("up")).unwrap();
    www.to_str().unwrap().to_string()
}

fn start(args: &[&str], dir: &TempDir) -> Spawned {
    let mut all = vec!["--port", "0", "--bind", "127.0.0.1", "--state", "none"];
    all.extend_from_slice(args);
    Spawned::start(&all, &[], &dir.0)
}

fn raw_path(s: &Spawned, path: &str) -> (u16, String, Vec<u8>) {
    request(s.port, &format!("GET {path} HTTP/1.1"), &[])
}

#[test]
fn www_serves_files_with_their_types_and_directories_by_their_index() {
    let dir = TempDir::new("www-files");
    let www = site(&dir);
    let s = start(&["--www", &www], &dir);
    for (path, ctype, body) in [
        (
            "/page.html",
            "text/html; charset=utf-8",
            "<!doctype html><p>my page</p>",
        ),
        (
            "/app.mjs",
            "text/javascript; charset=utf-8",
            "export const x = 1;\n",
        ),
        ("/kick.wav", "audio/wav", "RIFF"),
        ("/notes", "application/octet-stream", "no extension"),
        ("/songs/", "text/html; charset=utf-8", "<p>songs</p>"),
        (
            "/songs/slow/blues.txt",
            "text/plain; charset=utf-8",
            "12 bars",
        ),
        ("/my%20song.txt", "text/plain; charset=utf-8", "spaced"),
        (
            "/alias.html",
            "text/html; charset=utf-8",
            "<!doctype html><p>my page</p>",
        ),
    ] {
        let (status, head, got) = s.get(path, &[]);
        assert_eq!(status, 200, "{path}: {head}");
        assert_eq!(header(&head, "content-type"), Some(ctype), "{path}");
        assert_eq!(header(&head, "x-content-type-options"), Some("nosniff"));
        assert_eq!(String::from_utf8_lossy(&got), body, "{path}");
    }
    // A directory without its slash is sent to it, so relative links work.
    let (status, head, _) = s.get("/songs", &[]);
    assert_eq!(status, 301, "{head}");
    assert_eq!(header(&head, "location"), Some("/songs/"));
    // The embedded pages win, and the server said so at start.
    let (status, _, body) = s.get("/conductor.js", &[]);
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("export class Conductor"));
    let hidden = s.log_lines("is never served");
    assert_eq!(hidden.len(), 1, "{}", s.log());
    assert!(hidden[0].contains("conductor.js"), "{hidden:?}");
    // And the server's endpoints.
    assert_eq!(s.get("/healthz", &[]).0, 200);
    // Unchanged since: 304 without a body.
    let (_, head, _) = s.get("/page.html", &[]);
    let etag = header(&head, "etag").expect("ETag").to_string();
    let (status, head, body) = s.get("/page.html", &[&format!("If-None-Match: {etag}")]);
    assert_eq!(status, 304, "{head}");
    assert!(body.is_empty());
    // What is not there is a 404 that says where to look.
    let (status, _, body) = s.get("/missing.html", &[]);
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("no such page"));
}

#[test]
fn www_paths_cannot_leave_the_directory_or_show_hidden_files() {
    let dir = TempDir::new("www-escape");
    let www = site(&dir);
    let s = start(&["--www", &www], &dir);
    for path in [
        "/../secret.txt",
        "/songs/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E%2Fsecret.txt",
        "/songs%2f..%2f..%2fsecret.txt",
        "/songs/..%2f..%2fsecret.txt",
        "/..%5csecret.txt",
        "/leak.txt",
        "/up/secret.txt",
        "/.env",
        "/%2eenv",
        "/page.html%00.txt",
        "/page.html%0a",
        "//secret.txt",
        "/songs//index.html",
        "/%",
        "/%zz",
        "/%c0%ae%c0%ae/secret.txt",
    ] {
        let (status, head, body) = raw_path(&s, path);
        let text = String::from_utf8_lossy(&body);
        assert!(
            status == 404 || status == 400,
            "{path}: {status}\n{head}\n{text}"
        );
        assert!(
            !text.contains("OUTSIDE") && !text.contains("SECRET"),
            "{path}: {text}"
        );
    }
    // A link may go up and come back in: where it really leads is what counts.
    let (status, _, body) = raw_path(&s, "/up/www/page.html");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("my page"));
}

#[test]
fn the_library_and_pages_answer_with_cors_as_allowed_origin_says() {
    let dir = TempDir::new("cors");
    let www = site(&dir);
    let open = start(&["--www", &www], &dir);
    for path in ["/conductor.js", "/", "/base.css", "/page.html"] {
        let (status, head, _) = open.get(path, &["Origin: https://elsewhere.example"]);
        assert_eq!(status, 200, "{path}");
        assert_eq!(
            header(&head, "access-control-allow-origin"),
            Some("*"),
            "{path}: {head}"
        );
    }
    let strict = start(
        &["--www", &www, "--allowed-origin", "https://band.example"],
        &dir,
    );
    for path in ["/conductor.js", "/page.html"] {
        let (status, head, _) = strict.get(path, &["Origin: https://band.example"]);
        assert_eq!(status, 200);
        assert_eq!(
            header(&head, "access-control-allow-origin"),
            Some("https://band.example"),
            "{path}: {head}"
        );
        assert_eq!(header(&head, "vary"), Some("Origin"));
        // Another site gets the file but no permission to use it across origins.
        let (status, head, _) = strict.get(path, &["Origin: https://other.example"]);
        assert_eq!(status, 200);
        assert_eq!(header(&head, "access-control-allow-origin"), None, "{head}");
        assert_eq!(header(&head, "vary"), Some("Origin"));
    }
}

#[test]
fn a_large_file_reaches_a_slow_reader_whole_while_ticks_go_on() {
    let dir = TempDir::new("www-large");
    let www = dir.path("www");
    std::fs::create_dir_all(&www).unwrap();
    // The largest file served: more than loopback's socket buffers hold, so the server must
    // keep writing for as long as the client takes to read.
    let size = 16 * 1024 * 1024;
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    std::fs::write(www.join("big.bin"), &data).unwrap();
    let s = start(&["--www", www.to_str().unwrap()], &dir);
    let mut ws = s.ws();
    ws.next_event("tick");

    let mut sock = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    sock.write_all(b"GET /big.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    // A phone on a busy network: 256 KiB every 100 ms, so the whole takes about 6 s, far
    // past the 2 s a closing connection gets to flush (counted from its last progress).
    let started = Instant::now();
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 256 * 1024];
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let mut filled = 0;
        while filled < chunk.len() {
            match sock.read(&mut chunk[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => panic!("read after {} bytes: {e}", got.len()),
            }
        }
        got.extend_from_slice(&chunk[..filled]);
        if filled < chunk.len() {
            break;
        }
    }
    assert!(
        started.elapsed() > Duration::from_secs(3),
        "not a slow reader"
    );
    let (status, head, body) = split_response(&got);
    assert_eq!(status, 200, "{head}");
    assert_eq!(body.len(), size, "a cut-off response");
    assert!(body == data, "the body differs");
    // The ticks went on meanwhile, without a gap.
    let first = ws.next_event("tick")["data"]["count"].as_u64().unwrap();
    let next = ws.next_event("tick")["data"]["count"].as_u64().unwrap();
    assert_eq!(next, first + 1);
}

#[test]
fn kept_alive_connections_get_one_answer_per_request() {
    let dir = TempDir::new("www-keepalive");
    let www = site(&dir);
    let s = start(&["--www", &www], &dir);
    let mut sock = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut bodies = Vec::new();
    // (An embedded page closes the connection after its answer, so it comes last.)
    for path in [
        "/page.html",
        "/songs/slow/blues.txt",
        "/missing",
        "/conductor.js",
    ] {
        sock.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .unwrap();
        // Read exactly one response: its head, then Content-Length bytes.
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            sock.read_exact(&mut byte).unwrap();
            buf.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&buf).into_owned();
        let length: usize = header(&head, "content-length").unwrap().parse().unwrap();
        let mut body = vec![0u8; length];
        sock.read_exact(&mut body).unwrap();
        bodies.push((head, String::from_utf8_lossy(&body).into_owned()));
    }
    assert!(bodies[0].1.contains("my page"), "{bodies:?}");
    assert_eq!(bodies[1].1, "12 bars");
    assert!(bodies[2].0.starts_with("HTTP/1.1 404"), "{bodies:?}");
    assert!(bodies[3].1.contains("export class Conductor"));
}

#[test]
fn join_lists_lan_urls_and_qr_codes_encode_bounded_text() {
    let dir = TempDir::new("join");
    let local = start(&[], &dir);
    let (status, _, body) = local.get("/join", &[]);
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["urls"], serde_json::json!([]), "loopback only: {v}");
    assert_eq!(v["port"], local.port);

    let all = Spawned::start(
        &["--port", "0", "--bind", "0.0.0.0", "--state", "none"],
        &[],
        &dir.0,
    );
    let (_, _, body) = all.get("/join", &[]);
    let v: Value = serde_json::from_slice(&body).unwrap();
    let lan = lan_ipv4();
    let listed: Vec<String> = v["urls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["address"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, lan, "{v}");
    for u in v["urls"].as_array().unwrap() {
        let a = u["address"].as_str().unwrap();
        assert_eq!(u["control"], format!("http://{a}:{}/", all.port));
        assert_eq!(u["drums"], format!("http://{a}:{}/drums.html", all.port));
    }

    let url = format!("http://192.0.2.7:{}/drums.html", local.port);
    let (status, head, svg) = local.get(&format!("/qr.svg?text={}", encode(&url)), &[]);
    assert_eq!(status, 200, "{head}");
    assert_eq!(header(&head, "content-type"), Some("image/svg+xml"));
    let svg = String::from_utf8(svg).unwrap();
    assert!(svg.contains("<svg") && svg.contains("<path"), "{svg}");
    for (query, says) in [
        ("", "give the text"),
        ("?text=", "give the text"),
        (
            &format!("?text={}", "a".repeat(257)) as &str,
            "longer than 256",
        ),
        ("?text=%ff", "not valid"),
    ] {
        let (status, _, body) = local.get(&format!("/qr.svg{query}"), &[]);
        assert_eq!(status, 400, "{query}");
        assert!(String::from_utf8_lossy(&body).contains(says), "{query}");
    }
}

/// Percent-encodes everything but unreserved characters.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// This machine's IPv4 addresses that another device could reach, from `getifaddrs` as the
/// library reads it (the rule itself is unit-tested in `join`).
fn lan_ipv4() -> Vec<String> {
    conductor::join::interface_addresses()
        .unwrap()
        .into_iter()
        .filter(|a| a.usable && a.ip.is_ipv4())
        .map(|a| a.ip.to_string())
        .fold(Vec::new(), |mut v, ip| {
            if !v.contains(&ip) {
                v.push(ip);
            }
            v
        })
}

#[test]
fn bound_to_all_interfaces_the_banner_names_every_lan_url() {
    let dir = TempDir::new("banner");
    let s = Spawned::start(
        &["--port", "0", "--bind", "0.0.0.0", "--state", "none"],
        &[],
        &dir.0,
    );
    // The first line is the one scripts read; it is unchanged.
    assert!(
        s.banner[0].starts_with("conductor: 120 BPM, ppqn 4 — open http://localhost:"),
        "{:?}",
        s.banner
    );
    let lan = lan_ipv4();
    assert_eq!(s.banner.len(), 1 + lan.len(), "{:?}", s.banner);
    for (line, ip) in s.banner[1..].iter().zip(&lan) {
        assert_eq!(
            line,
            &format!(
                "conductor: on the LAN: http://{ip}:{p}/ (control) · http://{ip}:{p}/drums.html (drum machine)",
                p = s.port
            )
        );
    }
    // Both families: IPv6 addresses that a browser can use come after, never link-local.
    let s6 = Spawned::start(
        &["--port", "0", "--bind", "::", "--state", "none"],
        &[],
        &dir.0,
    );
    let v6: Vec<&String> = s6
        .banner
        .iter()
        .filter(|l| l.contains("http://["))
        .collect();
    assert!(v6.iter().all(|l| !l.contains("[fe80")), "{:?}", s6.banner);
    let global6 = conductor::join::interface_addresses()
        .unwrap()
        .into_iter()
        .filter(|a| {
            a.usable && matches!(a.ip, std::net::IpAddr::V6(ip) if !ip.is_unicast_link_local())
        })
        .count();
    assert_eq!(v6.len(), global6, "{:?}", s6.banner);
    // Bound to loopback: only the first line.
    let local = start(&[], &dir);
    assert_eq!(local.banner.len(), 1, "{:?}", local.banner);
}

#[test]
fn bad_flags_get_one_line_that_says_what_to_do() {
    for (args, says) in [
        (
            &["--bpm", "-5"][..],
            "conductor: error: --bpm -5 is out of range; the limits in force are 60 to 200 BPM",
        ),
        (
            &["--bpm", "0"],
            "conductor: error: --bpm 0 is out of range; the limits in force are 60 to 200 BPM",
        ),
        (
            &["--min-bpm", "40", "--bpm", "30"],
            "conductor: error: --bpm 30 is out of range; the limits in force are 40 to 200 BPM",
        ),
        (
            &["--frobnicate"],
            "conductor: error: unexpected argument '--frobnicate' found (try --help)",
        ),
        (
            &["--bpmm", "90"],
            "conductor: error: unexpected argument '--bpmm' found; a similar argument exists: '--bpm' (try --help)",
        ),
        (
            &["--www", "/no/such/dir"],
            "conductor: error: --www /no/such/dir:",
        ),
    ] {
        let out = Command::new(bin())
            .args(args)
            .env_remove("CONDUCTOR_STATE")
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with(says), "{args:?}: {err}");
    }
    // The server waits for none of these: it never started.
    let started = Instant::now();
    let out = Command::new(bin()).args(["--bpm", "-1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(started.elapsed() < Duration::from_secs(5));
}
