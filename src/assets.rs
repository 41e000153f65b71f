//! The web pages, embedded in the binary at build time from `www/`.
//!
//! This module owns the table of embedded paths. It reads nothing from disk at run time, so a
//! request path can only ever name one of these entries: there is no path to traverse. (The
//! operator's own pages, `--www`, are [`crate::www`]'s, with its own path rules; these win.)

/// One embedded file.
#[derive(Debug, PartialEq, Eq)]
pub struct Asset {
    /// The URL path it is served at.
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static [u8],
}

const HTML: &str = "text/html; charset=utf-8";
/// Browsers refuse to run an ES module served under any other type.
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

static ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: HTML,
        body: include_bytes!("../www/index.html"),
    },
    Asset {
        path: "/index.html",
        content_type: HTML,
        body: include_bytes!("../www/index.html"),
    },
    Asset {
        path: "/drums.html",
        content_type: HTML,
        body: include_bytes!("../www/drums.html"),
    },
    Asset {
        path: "/conductor.js",
        content_type: JS,
        body: include_bytes!("../www/conductor.js"),
    },
    // The styles both pages share.
    Asset {
        path: "/base.css",
        content_type: CSS,
        body: include_bytes!("../www/base.css"),
    },
];

/// The asset served at exactly `path`.
pub fn find(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(path: &str) -> &'static str {
        std::str::from_utf8(find(path).expect(path).body).expect("UTF-8")
    }

    #[test]
    fn every_page_and_the_library_are_served() {
        assert_eq!(find("/").unwrap().body, find("/index.html").unwrap().body);
        assert_eq!(find("/drums.html").unwrap().content_type, HTML);
        assert_eq!(find("/base.css").unwrap().content_type, CSS);
        for page in ["/index.html", "/drums.html"] {
            assert!(text(page).contains(r#"href="/base.css""#), "{page}");
        }
        assert_eq!(
            find("/conductor.js").unwrap().content_type,
            "text/javascript; charset=utf-8"
        );
    }

    #[test]
    fn paths_match_exactly() {
        for path in [
            "",
            "/drums",
            "/DRUMS.HTML",
            "/conductor.js/",
            "/www/conductor.js",
            "/index.html?x",
        ] {
            assert!(find(path).is_none(), "{path}");
        }
    }

    #[test]
    fn pages_load_only_what_is_embedded() {
        // The pages must work offline and in a closed network: no CDN, no remote script.
        for path in ["/", "/drums.html"] {
            let page = text(path);
            assert!(page.contains("from \"./conductor.js\""), "{path}");
            assert!(
                !page.contains("http://") && !page.contains("https://"),
                "{path}"
            );
        }
        assert!(text("/").contains("id=\"bpm\""));
    }

    #[test]
    fn the_library_is_an_es_module_exporting_conductor() {
        assert!(text("/conductor.js").contains("export class Conductor"));
    }
}
