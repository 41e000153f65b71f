//! HTTP/1.1 as far as conductor needs it: parse one request head, route it, write a response.
//!
//! Pure functions over bytes. This module owns the request limits, the routing table and the
//! WebSocket upgrade checks; it never touches a socket (the connection feeds it bytes and writes
//! what it returns). Every response closes the connection: the pages poll rarely, and one
//! request per connection keeps the state machine small.

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
    /// The path, without the query string.
    pub path: String,
    /// The query string after `?`, or empty.
    pub query: String,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// Bytes the head took, including the blank line: what follows belongs to the next
    /// protocol (WebSocket frames, after an upgrade), or is the body.
    pub head_len: usize,
    /// The body, for a POST; filled in once [`body_length`] bytes have arrived.
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

    /// True when the comma-separated header `name` lists `token` (case-insensitive).
    fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

/// A request that cannot be served.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum HttpError {
    #[error("request head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("more than {MAX_HEADERS} headers")]
    TooManyHeaders,
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("a POST needs a Content-Length (chunked bodies are not accepted)")]
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

/// How many body bytes follow `req`'s head: its Content-Length for a POST, bounded by
/// [`MAX_BODY_BYTES`]; nothing for other methods (their bodies, if any, are not read).
pub fn body_length(req: &Request) -> Result<usize, HttpError> {
    if req.method != "POST" {
        return Ok(0);
    }
    if req.header("transfer-encoding").is_some() {
        return Err(HttpError::LengthRequired);
    }
    let length = req
        .header("content-length")
        .ok_or(HttpError::LengthRequired)?
        .parse::<usize>()
        .map_err(|_| HttpError::Malformed("Content-Length is not a number"))?;
    if length > MAX_BODY_BYTES {
        return Err(HttpError::BodyTooLarge);
    }
    Ok(length)
}

/// Parses a request head from the start of `buf`. `Ok(None)` means "not complete yet".
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
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
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
        headers,
        head_len,
        body: Vec::new(),
        keep_alive: false,
    };
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
pub fn route(method: &str, path: &str) -> Route {
    if path == "/socket.io/" || path == "/socket.io" {
        return match method {
            "GET" | "POST" | "OPTIONS" => Route::SocketIo,
            _ => Route::MethodNotAllowed,
        };
    }
    if method != "GET" {
        return Route::MethodNotAllowed;
    }
    match path {
        "/healthz" => Route::Healthz,
        "/stats" => Route::Stats,
        "/metrics" => Route::Metrics,
        "/join" => Route::Join,
        "/qr.svg" => Route::Qr,
        "/ws" => Route::WebSocket,
        _ => assets::find(path).map_or(Route::NotFound, Route::Asset),
    }
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
}

/// Validates a WebSocket upgrade (RFC 6455 §4.2.1) and returns the `Sec-WebSocket-Accept` value.
pub fn check_upgrade(req: &Request) -> Result<String, UpgradeError> {
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
        405 => &["Allow: GET"],
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
        assert!(parse("GET / HTTP/1.1\r\n\r\n").keep_alive);
        assert!(!parse("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!parse("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        let r = String::from_utf8(response_on(true, 200, "text/plain", &[], b"ok")).unwrap();
        assert!(r.contains("Connection: keep-alive\r\n"));
    }

    #[test]
    fn post_bodies_need_a_bounded_length() {
        let post = |extra: &str| parse(&format!("POST /socket.io/ HTTP/1.1\r\n{extra}\r\n"));
        assert_eq!(body_length(&post("Content-Length: 12\r\n")), Ok(12));
        assert_eq!(body_length(&post("")), Err(HttpError::LengthRequired));
        assert_eq!(
            body_length(&post("Transfer-Encoding: chunked\r\n")),
            Err(HttpError::LengthRequired)
        );
        assert_eq!(
            body_length(&post("Content-Length: 99999999\r\n")),
            Err(HttpError::BodyTooLarge)
        );
        assert_eq!(
            body_length(&post("Content-Length: 1e3\r\n")).map_err(|e| e.status()),
            Err(400)
        );
        assert_eq!(body_length(&parse("GET / HTTP/1.1\r\n\r\n")), Ok(0));
    }

    #[test]
    fn cors_echoes_only_allowed_origins() {
        let req = parse("GET /socket.io/ HTTP/1.1\r\nOrigin: https://band.example\r\n\r\n");
        let open = cors_headers(&req, &[]).unwrap();
        assert!(open.contains(&"Access-Control-Allow-Origin: https://band.example".to_string()));
        let listed = vec!["https://band.example".to_string()];
        assert!(cors_headers(&req, &listed).is_some());
        assert_eq!(
            cors_headers(&req, &["https://other.example".to_string()]),
            None
        );
        let no_origin = parse("GET /socket.io/ HTTP/1.1\r\n\r\n");
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
        assert_eq!(route("HEAD", "/healthz"), Route::MethodNotAllowed);
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
        assert!(r.contains("Allow: GET\r\n"));
        assert!(r.ends_with("405 Method Not Allowed: only GET\n"));
    }
}
