//! HTTP/1.1 as far as conductor needs it: parse one request head, route it, write a response.
//!
//! Pure functions over bytes. This module owns the request limits, the routing table and the
//! WebSocket upgrade checks; it never touches a socket (the connection feeds it bytes and writes
//! what it returns). Every response closes the connection: the pages poll rarely, and one
//! request per connection keeps the state machine small.

use std::net::IpAddr;

use thiserror::Error;

use crate::assets::{self, Asset};

/// The largest request head accepted; more gets 431.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// The most header lines accepted; more gets 431.
pub const MAX_HEADERS: usize = 64;
/// The largest request body accepted (Socket.IO long-polling POSTs; nothing else has one).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The parts of a request head that conductor looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path, without the query string (from an absolute-form target too:
    /// `GET http://host/stats` is `/stats`).
    pub path: String,
    /// The query string after `?`, or empty.
    pub query: String,
    /// The minor HTTP version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// Bytes the head took, including the blank line: what follows belongs to the next
    /// protocol (WebSocket frames, after an upgrade), or is the body.
    pub head_len: usize,
    /// How many body bytes follow the head, from its `Content-Length` (RFC 9112 §6.3): what
    /// must be read, and skipped, before the next request on the connection can begin.
    pub body_len: usize,
    /// The body; filled in once [`Request::body_len`] bytes have arrived.
    pub body: Vec<u8>,
    /// Whether the client lets the connection stay open after the response (HTTP/1.1 without
    /// `Connection: close`, or HTTP/1.0 with `Connection: keep-alive`).
    pub keep_alive: bool,
}

impl Request {
    /// The first header of that (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of the (lower-case) header `name`, in order.
    fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// True when the comma-separated header `name` lists `token` (case-insensitive).
    fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.header_values(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// Whether this is a `HEAD`: answered as the `GET`, without the body.
    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }
}

/// A request that cannot be served. Each is answered with its status, and the connection is
/// closed: after a framing error nothing that follows on it can be trusted to be a request.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum HttpError {
    #[error("request head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("more than {MAX_HEADERS} headers")]
    TooManyHeaders,
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error(
        "a request body needs a Content-Length (chunked and other transfer codings are not accepted)"
    )]
    LengthRequired,
    #[error("request body larger than {MAX_BODY_BYTES} bytes")]
    BodyTooLarge,
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeadTooLarge | HttpError::TooManyHeaders => 431,
            HttpError::Malformed(_) => 400,
            HttpError::LengthRequired => 411,
            HttpError::BodyTooLarge => 413,
        }
    }
}

/// The body length a request head announces (RFC 9112 §6.3), bounded by [`MAX_BODY_BYTES`].
///
/// Any method may carry a body, and its bytes are read (and for all but a POST ignored), so
/// they can never pass for the next request on a kept-alive connection. Everything that would
/// let two parsers see different bodies is refused: `Transfer-Encoding` (with a
/// `Content-Length` beside it, or on HTTP/1.0, as a malformed request; otherwise 411, since
/// chunked bodies are not read here), and `Content-Length` fields that disagree or are not
/// plain digits (`+1`, `1e3`, `0x10`). Repeated fields with one value (`5, 5`) are one length,
/// as RFC 9110 §8.6 allows. A POST without a length gets 411: Socket.IO posts always send one.
fn framing(req: &Request) -> Result<usize, HttpError> {
    let has_length = req.header("content-length").is_some();
    if req.header("transfer-encoding").is_some() {
        return Err(if has_length {
            HttpError::Malformed("both Transfer-Encoding and Content-Length")
        } else if req.version == 0 {
            HttpError::Malformed("Transfer-Encoding on HTTP/1.0")
        } else {
            HttpError::LengthRequired
        });
    }
    let mut length: Option<usize> = None;
    for value in req
        .header_values("content-length")
        .flat_map(|v| v.split(','))
    {
        let value = value.trim_matches([' ', '\t']);
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HttpError::Malformed(
                "Content-Length is not a plain decimal number",
            ));
        }
        // All digits: the only way to fail is to be too large for any body we take.
        let n = value
            .parse::<usize>()
            .map_err(|_| HttpError::BodyTooLarge)?;
        if length.is_some_and(|l| l != n) {
            return Err(HttpError::Malformed("Content-Length fields disagree"));
        }
        length = Some(n);
    }
    match length {
        Some(n) if n > MAX_BODY_BYTES => Err(HttpError::BodyTooLarge),
        Some(n) => Ok(n),
        None if req.method == "POST" => Err(HttpError::LengthRequired),
        None => Ok(0),
    }
}

/// Checks the `Host` field (RFC 9112 §3.2): exactly one on HTTP/1.1, at most one on HTTP/1.0,
/// and a plausible `host[:port]` (possibly empty). Nothing here serves by host name; the point
/// is to answer the way a proxy in front of us would, so that no request means one thing to
/// it and another here.
fn check_host(req: &Request) -> Result<(), HttpError> {
    let mut hosts = req.header_values("host");
    match (hosts.next(), hosts.next()) {
        (None, _) if req.version >= 1 => Err(HttpError::Malformed("HTTP/1.1 requires a Host")),
        (None, _) => Ok(()),
        (Some(_), Some(_)) => Err(HttpError::Malformed("more than one Host")),
        (Some(host), None) if !is_host_value(host) => {
            Err(HttpError::Malformed("Host is not host[:port]"))
        }
        (Some(_), None) => Ok(()),
    }
}

/// `uri-host [":" port]` in the characters RFC 3986 allows there (an IPv6 literal in brackets
/// included), or empty.
fn is_host_value(host: &str) -> bool {
    host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%:[]".contains(&b))
}

/// Splits a request target into (path, query): origin-form (`/path?query`), absolute-form
/// (`http://host/path?query`, which RFC 9112 §3.2.2 requires a server to accept), or `*` for
/// `OPTIONS`. Anything else is malformed.
fn split_target<'a>(method: &str, target: &'a str) -> Result<(&'a str, &'a str), HttpError> {
    let origin_form = if target.starts_with('/') {
        target
    } else if let Some(rest) = strip_scheme(target) {
        // The authority runs to the first '/' or '?'; an empty path is "/".
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        if end == 0 {
            return Err(HttpError::Malformed("absolute URI without a host"));
        }
        match &rest[end..] {
            "" => "/",
            tail if tail.starts_with('?') => return Ok(("/", &tail[1..])),
            tail => tail,
        }
    } else if target == "*" && method == "OPTIONS" {
        "*"
    } else {
        return Err(HttpError::Malformed(
            "request target must be a path or an absolute http(s) URI",
        ));
    };
    Ok(origin_form.split_once('?').unwrap_or((origin_form, "")))
}

/// What follows `http://` or `https://` (scheme case-insensitive), if `target` starts so.
fn strip_scheme(target: &str) -> Option<&str> {
    let (scheme, rest) = target.split_once("://")?;
    (scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")).then_some(rest)
}

/// Parses a request head from the start of `buf`. `Ok(None)` means "not complete yet". The
/// head's framing is checked here, so a request that parses has one meaning: its body is
/// [`Request::body_len`] bytes, and what follows is the next request.
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Err(HttpError::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD_BYTES => {
            return Err(HttpError::HeadTooLarge);
        }
        Ok(httparse::Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooManyHeaders),
        Err(e) => return Err(HttpError::Malformed(parse_error_text(e))),
    };
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err(HttpError::Malformed("missing method or target"));
    };
    let version = req.version.unwrap_or(0);
    let (path, query) = split_target(method, target)?;
    let headers = req
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).trim().to_string(),
            )
        })
        .collect();
    let mut request = Request {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        version,
        headers,
        head_len,
        body_len: 0,
        body: Vec::new(),
        keep_alive: false,
    };
    check_host(&request)?;
    request.body_len = framing(&request)?;
    request.keep_alive = if version >= 1 {
        !request.header_has_token("connection", "close")
    } else {
        request.header_has_token("connection", "keep-alive")
    };
    Ok(Some(request))
}

fn parse_error_text(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token",
        httparse::Error::Version => "invalid HTTP version",
        httparse::Error::TooManyHeaders => "too many headers",
    }
}

/// Where a request goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Asset(&'static Asset),
    Healthz,
    Stats,
    Metrics,
    /// `/join`: the LAN URLs of the pages, for the join panel.
    Join,
    /// `/qr.svg?text=...`: a QR code, made by the page worker.
    Qr,
    WebSocket,
    /// Engine.IO / Socket.IO, both transports (GET, POST, and OPTIONS for CORS preflight).
    SocketIo,
    NotFound,
    MethodNotAllowed,
}

/// The routing table. Paths are matched exactly against the embedded assets, so no path,
/// however encoded, reaches the filesystem from here; what matches nothing is `NotFound`,
/// which the server hands to [`crate::www`] (and its path rules) only with `--www`.
///
/// `HEAD` goes wherever `GET` goes, except to the two endpoints where a `GET` is not a read:
/// a WebSocket upgrade, and Socket.IO, whose polling `GET` opens a session or takes packets.
/// The response is the `GET`'s without its body (see [`without_body`]).
pub fn route(method: &str, path: &str) -> Route {
    if path == "/socket.io/" || path == "/socket.io" {
        return match method {
            "GET" | "POST" | "OPTIONS" => Route::SocketIo,
            _ => Route::MethodNotAllowed,
        };
    }
    if method != "GET" && method != "HEAD" {
        return Route::MethodNotAllowed;
    }
    match path {
        "/healthz" => Route::Healthz,
        "/stats" => Route::Stats,
        "/metrics" => Route::Metrics,
        "/join" => Route::Join,
        "/qr.svg" => Route::Qr,
        "/ws" if method == "HEAD" => Route::MethodNotAllowed,
        "/ws" => Route::WebSocket,
        _ => assets::find(path).map_or(Route::NotFound, Route::Asset),
    }
}

/// A complete response cut down to its head, for a `HEAD` request (RFC 9110 §9.3.2): status and
/// headers stay as the `GET` would send them, `Content-Length` included, and no body follows.
pub fn without_body(mut response: Vec<u8>) -> Vec<u8> {
    if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
        response.truncate(end + 4);
    }
    response
}

/// Why an upgrade request to `/ws` was refused (400).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum UpgradeError {
    #[error("this endpoint speaks WebSocket: send Upgrade: websocket and Connection: Upgrade")]
    NotAnUpgrade,
    #[error("unsupported Sec-WebSocket-Version; this server speaks version 13")]
    BadVersion,
    #[error("missing or malformed Sec-WebSocket-Key")]
    BadKey,
    #[error("a WebSocket upgrade needs HTTP/1.1")]
    OldHttp,
    #[error("a WebSocket upgrade request carries no body")]
    Body,
}

/// Validates a WebSocket upgrade (RFC 6455 §4.2.1) and returns the `Sec-WebSocket-Accept` value.
pub fn check_upgrade(req: &Request) -> Result<String, UpgradeError> {
    if req.version < 1 {
        return Err(UpgradeError::OldHttp);
    }
    // Its bytes would be taken for WebSocket frames.
    if req.body_len > 0 {
        return Err(UpgradeError::Body);
    }
    if !req.header_has_token("upgrade", "websocket")
        || !req.header_has_token("connection", "upgrade")
    {
        return Err(UpgradeError::NotAnUpgrade);
    }
    if req.header("sec-websocket-version") != Some("13") {
        return Err(UpgradeError::BadVersion);
    }
    let key = req
        .header("sec-websocket-key")
        .ok_or(UpgradeError::BadKey)?;
    if !is_base64_nonce(key) {
        return Err(UpgradeError::BadKey);
    }
    Ok(tungstenite::handshake::derive_accept_key(key.as_bytes()))
}

/// Whether a browser from this request's `Origin` may open the WebSocket. With no allow-list
/// every origin may; a request without `Origin` is not from a browser page and may too.
pub fn origin_allowed(req: &Request, allowed: &[String]) -> bool {
    if allowed.is_empty() {
        return true;
    }
    match req.header("origin") {
        None => true,
        Some(origin) => {
            let origin = origin.trim_end_matches('/').to_ascii_lowercase();
            allowed.contains(&origin)
        }
    }
}

/// The response headers that let the page at the request's `Origin` read a cross-origin
/// long-polling response, or `None` when that origin is not allowed. A request without
/// `Origin` needs none.
pub fn cors_headers(req: &Request, allowed: &[String]) -> Option<Vec<String>> {
    let Some(origin) = req.header("origin") else {
        return Some(Vec::new());
    };
    if !origin_allowed(req, allowed) {
        return None;
    }
    // The origin is echoed, not `*`: stock clients send credentials (cookies) with polls.
    let origin: String = origin.chars().filter(|c| !c.is_control()).collect();
    Some(vec![
        format!("Access-Control-Allow-Origin: {origin}"),
        "Access-Control-Allow-Credentials: true".into(),
        "Vary: Origin".into(),
    ])
}

/// The answer to a CORS preflight for an allowed origin.
pub fn preflight(cors: &[String]) -> Vec<u8> {
    let mut extra: Vec<&str> = cors.iter().map(String::as_str).collect();
    extra.extend([
        "Access-Control-Allow-Methods: GET, POST, OPTIONS",
        "Access-Control-Allow-Headers: content-type, authorization",
        "Access-Control-Max-Age: 86400",
    ]);
    response_with(204, "text/plain; charset=utf-8", &extra, b"")
}

/// The address a request comes from: `peer`, or behind a proxy (`header`, set with
/// `--client-ip-header`) the address the proxy put there. Of a list (`X-Forwarded-For: a, b`)
/// the last entry counts, the one the nearest proxy added; anything that is not an address
/// (missing, `unknown`, garbage) leaves `peer`.
pub fn client_ip(req: &Request, header: Option<&str>, peer: IpAddr) -> IpAddr {
    header
        .and_then(|name| req.header_values(name).last())
        .and_then(|value| value.rsplit(',').next())
        .and_then(|entry| {
            let entry = entry.trim();
            entry
                .parse::<IpAddr>()
                .ok()
                .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        })
        .unwrap_or(peer)
}

/// The control token a request presents: `?token=` in the URL (browsers cannot set headers
/// on a WebSocket) or `Authorization: Bearer`.
pub fn presented_token(req: &Request) -> Option<String> {
    let from_query = req
        .query
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
        .map(percent_decode);
    from_query.or_else(|| {
        req.header("authorization")
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(|t| t.trim().to_string())
    })
}

/// The first value of parameter `name` in a query string, percent-decoded.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| percent_decode(value))
    })
}

/// Decodes `%XX` escapes and `+`; anything malformed is kept as it is.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len()
                && bytes[i + 1].is_ascii_hexdigit()
                && bytes[i + 2].is_ascii_hexdigit() =>
            {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Compares a presented token with the expected one in time that depends only on the expected
/// token's length, so response timing does not reveal how much of a guess was right.
pub fn tokens_match(presented: &str, expected: &str) -> bool {
    let (p, e) = (presented.as_bytes(), expected.as_bytes());
    let mut diff = p.len() ^ e.len();
    for (i, b) in e.iter().enumerate() {
        diff |= usize::from(p.get(i).copied().unwrap_or(0) ^ b);
    }
    diff == 0
}

/// True for the base64 encoding of 16 bytes: 22 alphabet characters and `==`.
fn is_base64_nonce(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b.ends_with(b"==")
        && b[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// A complete response that closes the connection.
pub fn response(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    response_with(status, content_type, &[], body)
}

/// A response with extra header lines (`Name: value`, no CRLF).
pub fn response_with(status: u16, content_type: &str, extra: &[&str], body: &[u8]) -> Vec<u8> {
    response_on(false, status, content_type, extra, body)
}

/// A complete response; with `keep_alive` the connection stays open for the next request.
pub fn response_on(
    keep_alive: bool,
    status: u16,
    content_type: &str,
    extra: &[&str],
    body: &[u8],
) -> Vec<u8> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: {connection}\r\n",
        reason(status),
        body.len()
    );
    for line in extra {
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// A short plain-text error response.
pub fn text_error(status: u16, message: &str) -> Vec<u8> {
    let extra: &[&str] = match status {
        405 => &["Allow: GET, HEAD"],
        _ => &[],
    };
    response_with(
        status,
        "text/plain; charset=utf-8",
        extra,
        format!("{status} {}: {message}\n", reason(status)).as_bytes(),
    )
}

/// The `101 Switching Protocols` answer to a valid upgrade.
pub fn switching_protocols(accept: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Request {
        parse_request(text.as_bytes()).unwrap().unwrap()
    }

    const UPGRADE: &str = "GET /ws?token=abc HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

    #[test]
    fn parses_a_head_and_reports_its_length() {
        let text = "GET /stats?x=1 HTTP/1.1\r\nHost: a\r\nX-Thing:  v \r\n\r\nrest";
        let req = parse(text);
        assert_eq!(req.method, "GET");
        assert_eq!(req.path, "/stats");
        assert_eq!(req.query, "x=1");
        assert_eq!(req.header("x-thing"), Some("v"));
        assert_eq!(&text[req.head_len..], "rest");
    }

    #[test]
    fn partial_heads_wait_for_more() {
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\nHost"), Ok(None));
        assert_eq!(parse_request(b""), Ok(None));
    }

    #[test]
    fn limits_and_garbage_are_refused_with_the_right_status() {
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(parse_request(big.as_bytes()).unwrap_err().status(), 431);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("H{i}: v\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(parse_request(many.as_bytes()).unwrap_err().status(), 431);
        for bad in [
            "\x16\x03\x01garbage\r\n\r\n",
            "GET / HTTP/9.9\r\n\r\n",
            "GET\r\n\r\n",
        ] {
            assert_eq!(
                parse_request(bad.as_bytes()).unwrap_err().status(),
                400,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn socket_io_routes_take_get_post_and_preflight() {
        for method in ["GET", "POST", "OPTIONS"] {
            assert_eq!(route(method, "/socket.io/"), Route::SocketIo);
        }
        assert_eq!(route("GET", "/socket.io"), Route::SocketIo);
        assert_eq!(route("PUT", "/socket.io/"), Route::MethodNotAllowed);
        assert_eq!(route("POST", "/ws"), Route::MethodNotAllowed);
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_header() {
        assert!(parse("GET / HTTP/1.1\r\nHost: a\r\n\r\n").keep_alive);
        assert!(!parse("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!parse("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        let r = String::from_utf8(response_on(true, 200, "text/plain", &[], b"ok")).unwrap();
        assert!(r.contains("Connection: keep-alive\r\n"));
    }

    /// The framing outcome of a head: its body length, or the refusal's status.
    fn framed(text: &str) -> Result<usize, u16> {
        parse_request(text.as_bytes())
            .map(|r| r.expect("complete head").body_len)
            .map_err(|e| e.status())
    }

    #[test]
    fn post_bodies_need_a_bounded_length() {
        let post = |extra: &str| {
            framed(&format!(
                "POST /socket.io/ HTTP/1.1\r\nHost: a\r\n{extra}\r\n"
            ))
        };
        assert_eq!(post("Content-Length: 12\r\n"), Ok(12));
        assert_eq!(post(""), Err(411));
        assert_eq!(post("Transfer-Encoding: chunked\r\n"), Err(411));
        assert_eq!(post("Content-Length: 99999999\r\n"), Err(413));
        assert_eq!(
            post("Content-Length: 99999999999999999999999999\r\n"),
            Err(413)
        );
        assert_eq!(framed("GET / HTTP/1.1\r\nHost: a\r\n\r\n"), Ok(0));
    }

    /// RFC 9112 §6.3: one length, in plain digits, or the request is refused and the
    /// connection closed, so that nothing after it can be read as a second request.
    #[test]
    fn lengths_that_two_parsers_could_read_differently_are_refused() {
        let get = |extra: &str| framed(&format!("GET /healthz HTTP/1.1\r\nHost: a\r\n{extra}\r\n"));
        for bad in ["+1", "-1", "1e3", "0x10", "1 2", "", "1.0", "\u{0661}"] {
            assert_eq!(
                get(&format!("Content-Length: {bad}\r\n")),
                Err(400),
                "{bad:?}"
            );
        }
        assert_eq!(get("Content-Length: 1\r\nContent-Length: 40\r\n"), Err(400));
        assert_eq!(get("Content-Length: 5, 6\r\n"), Err(400));
        assert_eq!(get("Content-Length: 5, 5\r\n"), Ok(5));
        assert_eq!(get("Content-Length: 5\r\nContent-Length: 5\r\n"), Ok(5));
        assert_eq!(get("Content-Length: 007\r\n"), Ok(7));
        assert_eq!(
            get("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n"),
            Err(400)
        );
        assert_eq!(get("Transfer-Encoding: chunked\r\n"), Err(411));
        assert_eq!(
            framed("POST /socket.io/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(400)
        );
        // A body on a GET is framed like any other, so it is read rather than run.
        assert_eq!(get("Content-Length: 30\r\n"), Ok(30));
    }

    #[test]
    fn http_1_1_needs_exactly_one_plausible_host() {
        assert_eq!(framed("GET / HTTP/1.1\r\n\r\n"), Err(400));
        assert_eq!(
            framed("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            Err(400)
        );
        assert_eq!(
            framed("GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n"),
            Err(400)
        );
        assert_eq!(framed("GET / HTTP/1.1\r\nHost: a b\r\n\r\n"), Err(400));
        assert_eq!(framed("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n"), Err(400));
        assert_eq!(
            framed("GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n"),
            Err(400)
        );
        for good in [
            "example.org",
            "127.0.0.1:3000",
            "[::1]:80",
            "xn--bcher-kva.example",
            "",
        ] {
            assert_eq!(
                framed(&format!("GET / HTTP/1.1\r\nHost: {good}\r\n\r\n")),
                Ok(0),
                "{good:?}"
            );
        }
        assert_eq!(
            framed("GET / HTTP/1.0\r\n\r\n"),
            Ok(0),
            "HTTP/1.0 may leave it out"
        );
    }

    #[test]
    fn absolute_form_targets_route_by_their_path() {
        let req =
            parse("GET http://127.0.0.1:3000/stats?x=1 HTTP/1.1\r\nHost: 127.0.0.1:3000\r\n\r\n");
        assert_eq!((req.path.as_str(), req.query.as_str()), ("/stats", "x=1"));
        let req = parse("GET HTTPS://example.org HTTP/1.1\r\nHost: example.org\r\n\r\n");
        assert_eq!(req.path, "/");
        let req = parse("GET http://example.org?EIO=4 HTTP/1.1\r\nHost: example.org\r\n\r\n");
        assert_eq!((req.path.as_str(), req.query.as_str()), ("/", "EIO=4"));
        let req = parse("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(req.path, "*");
        for bad in ["stats", "http:///stats", "ftp://a/stats", "*"] {
            assert_eq!(
                framed(&format!("GET {bad} HTTP/1.1\r\nHost: a\r\n\r\n")),
                Err(400),
                "{bad}"
            );
        }
    }

    #[test]
    fn head_goes_where_get_goes_but_never_upgrades_or_polls() {
        assert_eq!(route("HEAD", "/healthz"), Route::Healthz);
        assert_eq!(route("HEAD", "/stats"), Route::Stats);
        assert_eq!(route("HEAD", "/metrics"), Route::Metrics);
        assert!(matches!(route("HEAD", "/"), Route::Asset(a) if a.path == "/"));
        assert_eq!(route("HEAD", "/nope"), Route::NotFound);
        assert_eq!(route("HEAD", "/ws"), Route::MethodNotAllowed);
        assert_eq!(route("HEAD", "/socket.io/"), Route::MethodNotAllowed);
        let get = response(200, "text/plain", b"hello");
        let head = without_body(get.clone());
        assert_eq!(&get[..head.len()], &head[..]);
        assert!(String::from_utf8(head).unwrap().ends_with(
            "Content-Length: 5\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
        ));
    }

    #[test]
    fn cors_echoes_only_allowed_origins() {
        let req =
            parse("GET /socket.io/ HTTP/1.1\r\nHost: a\r\nOrigin: https://band.example\r\n\r\n");
        let open = cors_headers(&req, &[]).unwrap();
        assert!(open.contains(&"Access-Control-Allow-Origin: https://band.example".to_string()));
        let listed = vec!["https://band.example".to_string()];
        assert!(cors_headers(&req, &listed).is_some());
        assert_eq!(
            cors_headers(&req, &["https://other.example".to_string()]),
            None
        );
        let no_origin = parse("GET /socket.io/ HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(cors_headers(&no_origin, &listed), Some(Vec::new()));
        let pre = String::from_utf8(preflight(&open)).unwrap();
        assert!(pre.starts_with("HTTP/1.1 204"));
        assert!(pre.contains("Access-Control-Allow-Methods: GET, POST, OPTIONS"));
    }

    #[test]
    fn routes() {
        assert!(matches!(route("GET", "/"), Route::Asset(a) if a.path == "/"));
        assert_eq!(route("GET", "/healthz"), Route::Healthz);
        assert_eq!(route("GET", "/stats"), Route::Stats);
        assert_eq!(route("GET", "/metrics"), Route::Metrics);
        assert_eq!(route("GET", "/ws"), Route::WebSocket);
        assert_eq!(route("GET", "/nope"), Route::NotFound);
        assert_eq!(route("POST", "/"), Route::MethodNotAllowed);
        for sneaky in [
            "/../Cargo.toml",
            "/%2e%2e/etc/passwd",
            "//etc/passwd",
            "/www/index.html",
        ] {
            assert_eq!(route("GET", sneaky), Route::NotFound, "{sneaky}");
        }
    }

    #[test]
    fn upgrade_accepts_rfc_example() {
        // The key and accept value from RFC 6455 §1.3.
        assert_eq!(
            check_upgrade(&parse(UPGRADE)).as_deref(),
            Ok("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
    }

    #[test]
    fn upgrade_refuses_bad_requests() {
        let cases = [
            (
                UPGRADE.replace("Upgrade: websocket\r\n", ""),
                UpgradeError::NotAnUpgrade,
            ),
            (
                UPGRADE.replace("keep-alive, Upgrade", "close"),
                UpgradeError::NotAnUpgrade,
            ),
            (
                UPGRADE.replace("Version: 13", "Version: 8"),
                UpgradeError::BadVersion,
            ),
            (
                UPGRADE.replace("dGhlIHNhbXBsZSBub25jZQ==", "short"),
                UpgradeError::BadKey,
            ),
            (
                UPGRADE.replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25j*Q=="),
                UpgradeError::BadKey,
            ),
            (
                UPGRADE.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
                UpgradeError::BadKey,
            ),
            (
                UPGRADE.replace("HTTP/1.1", "HTTP/1.0"),
                UpgradeError::OldHttp,
            ),
            (
                UPGRADE.replace("Host: x\r\n", "Host: x\r\nContent-Length: 4\r\n"),
                UpgradeError::Body,
            ),
        ];
        for (text, want) in cases {
            assert_eq!(check_upgrade(&parse(&text)), Err(want), "{text}");
        }
    }

    #[test]
    fn origin_allow_list() {
        let allowed = vec!["https://example.org".to_string()];
        let with = |origin: &str| {
            parse(&UPGRADE.replace("Host: x\r\n", &format!("Host: x\r\nOrigin: {origin}\r\n")))
        };
        assert!(origin_allowed(&with("https://example.org"), &allowed));
        assert!(origin_allowed(&with("https://EXAMPLE.org"), &allowed));
        assert!(!origin_allowed(&with("https://evil.example"), &allowed));
        assert!(!origin_allowed(&with("null"), &allowed));
        assert!(
            origin_allowed(&parse(UPGRADE), &allowed),
            "no Origin: not a browser"
        );
        assert!(
            origin_allowed(&with("https://evil.example"), &[]),
            "no list: anyone"
        );
    }

    #[test]
    fn tokens_from_query_or_bearer_header() {
        assert_eq!(presented_token(&parse(UPGRADE)).as_deref(), Some("abc"));
        let encoded = UPGRADE.replace("token=abc", "x=1&token=a%2Fb%3D");
        assert_eq!(presented_token(&parse(&encoded)).as_deref(), Some("a/b="));
        let header = UPGRADE
            .replace("?token=abc", "")
            .replace("Host: x\r\n", "Host: x\r\nAuthorization: Bearer s3cret\r\n");
        assert_eq!(presented_token(&parse(&header)).as_deref(), Some("s3cret"));
        let none = UPGRADE.replace("?token=abc", "");
        assert_eq!(presented_token(&parse(&none)), None);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%+5"), "% 5");
    }

    #[test]
    fn the_client_address_comes_from_the_proxy_header_only_when_asked() {
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let req = parse(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 198.51.100.7, 203.0.113.9\r\n\
             Fly-Client-IP: 2001:db8::5\r\n\r\n",
        );
        assert_eq!(client_ip(&req, None, peer), peer);
        assert_eq!(
            client_ip(&req, Some("x-forwarded-for"), peer).to_string(),
            "203.0.113.9"
        );
        assert_eq!(
            client_ip(&req, Some("fly-client-ip"), peer).to_string(),
            "2001:db8::5"
        );
        assert_eq!(client_ip(&req, Some("x-real-ip"), peer), peer, "absent");
        let odd = parse("GET / HTTP/1.1\r\nHost: a\r\nX-Real-IP: unknown\r\n\r\n");
        assert_eq!(client_ip(&odd, Some("x-real-ip"), peer), peer);
        let with_port = parse("GET / HTTP/1.1\r\nHost: a\r\nX-Real-IP: [2001:db8::1]:443\r\n\r\n");
        assert_eq!(
            client_ip(&with_port, Some("x-real-ip"), peer).to_string(),
            "2001:db8::1"
        );
    }

    #[test]
    fn token_comparison() {
        assert!(tokens_match("s3cret", "s3cret"));
        assert!(!tokens_match("s3cre", "s3cret"));
        assert!(!tokens_match("s3cret!", "s3cret"));
        assert!(!tokens_match("", "s3cret"));
        assert!(!tokens_match("S3cret", "s3cret"));
    }

    #[test]
    fn responses_are_complete_and_close() {
        let r = String::from_utf8(response(200, "text/plain", b"ok")).unwrap();
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(r.contains("Content-Length: 2\r\n"));
        assert!(r.contains("Connection: close\r\n"));
        assert!(r.ends_with("\r\n\r\nok"));
        let r = String::from_utf8(text_error(405, "only GET")).unwrap();
        assert!(r.contains("Allow: GET, HEAD\r\n"));
        assert!(r.ends_with("405 Method Not Allowed: only GET\n"));
    }
}
