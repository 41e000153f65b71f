//! Arbitrary bytes as an HTTP request head: parsing, routing and every upgrade check must
//! answer without panicking, and a parsed head must lie within the bytes given.
#![no_main]

use conductor::http;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match http::parse_request(data) {
        Ok(Some(req)) => {
            assert!(req.head_len <= data.len());
            assert!(req.head_len <= http::MAX_HEAD_BYTES);
            let _ = http::route(&req.method, &req.path);
            let _ = http::check_upgrade(&req);
            let allowed = ["https://stage.example".to_string()];
            let _ = http::origin_allowed(&req, &allowed);
            if let Some(cors) = http::cors_headers(&req, &allowed) {
                // Echoed headers must never carry a line break into the response.
                assert!(cors.iter().all(|h| !h.contains('\r') && !h.contains('\n')));
            }
            match http::body_length(&req) {
                Ok(n) => assert!(n <= http::MAX_BODY_BYTES),
                Err(e) => assert!(matches!(e.status(), 400 | 411 | 413)),
            }
            if let Some(token) = http::presented_token(&req) {
                let _ = http::tokens_match(&token, "s3cret");
            }
        }
        Ok(None) => assert!(data.len() < http::MAX_HEAD_BYTES),
        Err(e) => assert!(matches!(e.status(), 400 | 431)),
    }
});
