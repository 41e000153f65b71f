//! Arbitrary request paths and `/qr.svg` queries: the path rules never panic and never let
//! through a segment that could step out of the `--www` directory, and the QR text stays bounded.
#![no_main]

use conductor::{join, www};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(path) = www::resolve(text) {
        for segment in &path.segments {
            assert!(!segment.is_empty());
            assert!(!segment.starts_with('.'), "{segment:?}");
            assert!(
                !segment.contains(['/', '\\', '\0']) && !segment.chars().any(char::is_control),
                "{segment:?}"
            );
        }
    }
    let _ = www::percent_decode(text, true);
    if let Ok(qr) = join::qr_text(text) {
        assert!(!qr.is_empty() && qr.len() <= join::MAX_QR_TEXT);
    }
});
