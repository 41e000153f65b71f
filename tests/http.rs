//! HTTP/1.1 framing against the real binary (RFC 9112): what a proxy in front of conductor
//! sees as one request must be one request here too, and `HEAD` answers like `GET`.
//!
//! Each case speaks raw bytes on one connection and reads every response until the server
//! closes, so a request smuggled behind another shows up as a response too many.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::Server;

/// One response as read off the wire: status, lower-cased headers, body.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut body = self.text();
        body.truncate(120);
        write!(f, "{} {:?} {body:?}", self.status, self.headers)
    }
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `bytes` on a fresh connection and splits everything that comes back, until the
/// server closes, into responses. `head_only`: the request was a HEAD, whose response has a
/// Content-Length but no body.
fn exchange(server: &Server, bytes: &[u8], head_only: bool) -> Vec<Response> {
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).expect("write");
    let mut raw = Vec::new();
    // A reset after the last response (the server closing with our extra bytes unread) ends
    // the reading as well as EOF does.
    let _ = s.read_to_end(&mut raw);
    split_responses(&raw, head_only)
}

fn split_responses(mut raw: &[u8], head_only: bool) -> Vec<Response> {
    let mut out = Vec::new();
    while let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {head:?}"));
        let headers: Vec<(String, String)> = head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let length = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(0);
        raw = &raw[end + 4..];
        let take = if head_only { 0 } else { length.min(raw.len()) };
        out.push(Response {
            status,
            headers,
            body: raw[..take].to_vec(),
        });
        raw = &raw[take..];
    }
    assert!(
        raw.is_empty(),
        "bytes after the last response: {:?}",
        String::from_utf8_lossy(raw)
    );
    out
}

fn statuses(responses: &[Response]) -> Vec<u16> {
    responses.iter().map(|r| r.status).collect()
}

/// A Socket.IO long-polling session, for requests that keep the connection alive.
fn polling_sid(server: &Server) -> String {
    let r = exchange(
        server,
        b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        false,
    );
    let body = r[0].text();
    let open: serde_json::Value =
        serde_json::from_str(body.strip_prefix('0').expect("open packet")).expect("JSON");
    open["sid"].as_str().expect("sid").to_string()
}

const SMUGGLED: &str = "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n";

#[test]
fn two_different_content_lengths_get_400_and_nothing_after_them_runs() {
    let server = Server::start(&[]);
    let sid = polling_sid(&server);
    // A keep-alive POST whose first length covers the pong and whose second covers the
    // smuggled request: were the first believed, the rest would run as a second request.
    let request = format!(
        "POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: t\r\n\
         Content-Length: 1\r\nContent-Length: {}\r\n\r\n3{SMUGGLED}",
        1 + SMUGGLED.len()
    );
    let r = exchange(&server, request.as_bytes(), false);
    assert_eq!(statuses(&r), [400], "{r:?}");
    assert!(r[0].text().contains("Content-Length"), "{}", r[0].text());
}

#[test]
fn a_body_on_a_get_is_read_not_run_as_the_next_request() {
    let server = Server::start(&[]);
    // A keep-alive handshake GET with a body that looks like a request, then a real one.
    let request = format!(
        "GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\
         \r\n{SMUGGLED}GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
        SMUGGLED.len()
    );
    let r = exchange(&server, request.as_bytes(), false);
    assert_eq!(statuses(&r), [200, 200], "{r:?}");
    assert!(
        r[0].text().starts_with("0{"),
        "the handshake: {}",
        r[0].text()
    );
    assert_eq!(r[1].text(), "ok", "the second answer must be /healthz's");
}

#[test]
fn lengths_that_are_not_plain_digits_get_400() {
    let server = Server::start(&[]);
    for bad in ["+1", "-1", "1e1", "0x1", "1 1", ""] {
        let request = format!("GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: {bad}\r\n\r\nx");
        let r = exchange(&server, request.as_bytes(), false);
        assert_eq!(statuses(&r), [400], "Content-Length: {bad:?}: {r:?}");
    }
    // Transfer-Encoding beside Content-Length is the classic smuggling pair.
    let r = exchange(
        &server,
        b"POST /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: t\r\n\
          Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
        false,
    );
    assert_eq!(statuses(&r), [400], "{r:?}");
}

#[test]
fn http_1_1_needs_exactly_one_host() {
    let server = Server::start(&[]);
    for head in [
        "GET /healthz HTTP/1.1\r\n\r\n",
        "GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "GET /healthz HTTP/1.1\r\nHost: a b\r\n\r\n",
    ] {
        let r = exchange(&server, head.as_bytes(), false);
        assert_eq!(statuses(&r), [400], "{head:?}: {r:?}");
    }
    let r = exchange(&server, b"GET /healthz HTTP/1.0\r\n\r\n", false);
    assert_eq!((r[0].status, r[0].text()), (200, "ok".into()), "HTTP/1.0");
}

#[test]
fn absolute_form_targets_are_served() {
    let server = Server::start(&[]);
    let port = server.port;
    let request =
        format!("GET http://127.0.0.1:{port}/healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    let r = exchange(&server, request.as_bytes(), false);
    assert_eq!((r[0].status, r[0].text()), (200, "ok".into()), "{r:?}");
    // A WebSocket client may ask in absolute-form too.
    let upgrade = format!(
        "GET http://127.0.0.1:{port}/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(upgrade.as_bytes()).unwrap();
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"HTTP/1.1 101");
}

#[test]
fn a_websocket_upgrade_needs_http_1_1() {
    let server = Server::start(&[]);
    let r = exchange(
        &server,
        b"GET /ws HTTP/1.0\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        false,
    );
    assert_eq!(statuses(&r), [400], "{r:?}");
    assert!(r[0].text().contains("HTTP/1.1"), "{}", r[0].text());
}

#[test]
fn head_answers_as_get_without_the_body() {
    let server = Server::start(&[]);
    for path in [
        "/",
        "/healthz",
        "/stats",
        "/metrics",
        "/conductor.js",
        "/nope",
    ] {
        let get = exchange(
            &server,
            format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
            false,
        );
        let head = exchange(
            &server,
            format!("HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
            true,
        );
        assert_eq!(head.len(), 1, "{path}: {head:?}");
        let (get, head) = (&get[0], &head[0]);
        assert_eq!(head.status, get.status, "{path}");
        assert!(head.body.is_empty(), "{path}: HEAD sent a body");
        assert_eq!(
            head.header("content-type"),
            get.header("content-type"),
            "{path}"
        );
        // /stats and /metrics change between the two requests; the length of a static
        // answer must be the GET's exactly.
        let length: usize = head.header("content-length").unwrap().parse().unwrap();
        if path != "/stats" && path != "/metrics" {
            assert_eq!(length, get.body.len(), "{path}");
        } else {
            assert!(length > 0, "{path}");
        }
    }
    // Not where a GET is not a read: upgrades and Socket.IO polls.
    for path in ["/ws", "/socket.io/?EIO=4&transport=polling"] {
        let r = exchange(
            &server,
            format!("HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
            true,
        );
        assert_eq!(statuses(&r), [405], "{path}");
        assert!(
            r[0].header("allow").is_some_and(|a| a.contains("GET")),
            "{r:?}"
        );
    }
    let stats = server.stats();
    assert_eq!(
        stats["clients_by_protocol"]["socketio_polling"], 0,
        "{stats}"
    );
}
