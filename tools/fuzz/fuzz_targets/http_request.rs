//! Arbitrary bytes as an HTTP request head: parsing, framing, routing and every upgrade check
//! must answer without panicking, and a parsed request must have one meaning: its head and
//! announced body lie within the limits, its path is a path, and a HEAD's answer is a GET's
//! without the body.
#![no_main]

use conductor::http;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match http::parse_request(data) {
        Ok(Some(req)) => {
            assert!(req.head_len <= data.len());
            assert!(req.head_len <= http::MAX_HEAD_BYTES);
            assert!(req.body_len <= http::MAX_BODY_BYTES);
            assert!(req.version <= 1);
            // Origin-form or absolute-form both end up as a path (or `*` for OPTIONS).
            assert!(req.path.starts_with('/') || (req.path == "*" && req.method == "OPTIONS"));
            // RFC 9112 §3.2: HTTP/1.1 has exactly one Host, HTTP/1.0 at most one.
            let hosts = req.headers.iter().filter(|(n, _)| n == "host").count();
            assert!(hosts <= 1 && (req.version == 0 || hosts == 1));
            // No request both chunked and length-delimited gets through.
            assert!(req.header("transfer-encoding").is_none());
            let route = http::route(&req.method, &req.path);
            if req.method == "HEAD" {
                assert!(!matches!(route, http::Route::WebSocket | http::Route::SocketIo));
            }
            let upgrade = http::check_upgrade(&req);
            if upgrade.is_ok() {
                assert!(req.version == 1 && req.body_len == 0);
            }
            let allowed = ["https://stage.example".to_string()];
            let _ = http::origin_allowed(&req, &allowed);
            if let Some(cors) = http::cors_headers(&req, &allowed) {
                // Echoed headers must never carry a line break into the response.
                assert!(cors.iter().all(|h| !h.contains('\r') && !h.contains('\n')));
            }
            // Whatever a client claims in a forwarding header, the address is an address.
            let peer = std::net::IpAddr::from([192, 0, 2, 1]);
            let _ = http::client_ip(&req, Some("x-forwarded-for"), peer);
            assert_eq!(http::client_ip(&req, None, peer), peer);
            if let Some(token) = http::presented_token(&req) {
                let _ = http::tokens_match(&token, "s3cret");
            }
            // The head of any response is what HEAD sends: everything up to the blank line.
            let full = http::response(200, "text/plain", &data[req.head_len..]);
            let head = http::without_body(full.clone());
            assert!(full.starts_with(&head) && head.ends_with(b"\r\n\r\n"));
            assert_eq!(full.len() - head.len(), data.len() - req.head_len);
        }
        Ok(None) => assert!(data.len() < http::MAX_HEAD_BYTES),
        Err(e) => assert!(matches!(e.status(), 400 | 411 | 413 | 431)),
    }
});
