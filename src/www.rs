//! Your own pages: the static files of `--www DIR`, served beside the embedded ones.
//!
//! This module owns what a request path may name in DIR and how a file is answered: the path
//! rules ([`resolve`], pure), reading a file with its checks ([`Site::open`]), content types,
//! validators (`ETag`) and the CORS headers that every page and the library carry
//! ([`cors_headers`]). It must not run on the event loop: opening and reading a file can wait
//! on a disk (an SD card, a network mount) for milliseconds or more, and the loop must never
//! hold a tick back for that. [`crate::page_worker`] calls it from its own thread and hands the
//! answer back; the loop only queues the bytes.
//!
//! What a path may name:
//! * Each `/`-separated segment is percent-decoded on its own, so `%2F` can never become a
//!   separator. A segment that decodes to `.`, `..`, a name starting with `.` (hidden files:
//!   `.git`, `.env`), or anything containing `/`, `\`, NUL or a control character is refused;
//!   so is malformed percent-encoding or invalid UTF-8, and an empty segment (`//`).
//! * The file is then resolved with every symlink followed (`realpath`), and the real path
//!   must lie under DIR's own real path (resolved once at start). A symlink inside DIR to a
//!   file inside DIR is fine; one that leads out is a 404.
//! * Only regular files are served: a FIFO, socket or device is a 404 (it is opened
//!   non-blocking, so a FIFO swapped in between the checks cannot hang the worker either),
//!   and a file larger than [`MAX_FILE_BYTES`] is refused with 403.
//! * A directory answers its `index.html`; asked without the trailing slash it redirects
//!   (301) to it, so that the page's relative links resolve inside the directory.
//!
//! The embedded pages win where a path exists both embedded and in DIR (`/`, `/index.html`,
//! `/drums.html`, `/conductor.js`, `/base.css`), and so do the server's own endpoints: the
//! library must always match the server that speaks its protocol, and the control page must
//! stay reachable whatever DIR holds. Put your pages at other names.
//!
//! Files are read whole into memory, so a response is one shared buffer however many clients
//! fetch it: a small cache keyed by the file's identity (device, inode, size, mtime) keeps up to
//! [`CACHE_BYTES`] of them, and a file changed on disk is read afresh on its next request.

use std::collections::HashMap;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use log::warn;
use thiserror::Error;

/// The largest file served from `--www`. Responses are built in memory; this bounds what one
/// request can make the server hold (see the module doc).
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// The most file bytes kept in the cache.
pub const CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// The longest request path considered, in bytes, and the deepest.
const MAX_PATH_BYTES: usize = 1024;
const MAX_SEGMENTS: usize = 32;

/// Why a path gets no file.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum WwwError {
    /// Not there, hidden, outside DIR, or not a regular file: all look the same from outside.
    #[error("no such page")]
    NotFound,
    #[error("malformed path: {0}")]
    BadPath(&'static str),
    #[error("the file is larger than the {} MiB --www serves", MAX_FILE_BYTES >> 20)]
    TooLarge,
    #[error("the file cannot be read; check its permissions")]
    Unreadable,
}

impl WwwError {
    pub fn status(&self) -> u16 {
        match self {
            WwwError::NotFound => 404,
            WwwError::BadPath(_) => 400,
            WwwError::TooLarge | WwwError::Unreadable => 403,
        }
    }
}

/// A request path, checked: the decoded segments under DIR, and whether it named a directory
/// (trailing slash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SitePath {
    pub segments: Vec<String>,
    pub directory: bool,
}

/// Checks a request path (without its query) against the rules in the module doc.
pub fn resolve(path: &str) -> Result<SitePath, WwwError> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(WwwError::BadPath("it must start with /"));
    };
    if path.len() > MAX_PATH_BYTES {
        return Err(WwwError::NotFound);
    }
    let mut segments = Vec::new();
    let mut directory = rest.is_empty();
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.len() > MAX_SEGMENTS {
        return Err(WwwError::NotFound);
    }
    for (i, raw) in parts.iter().enumerate() {
        if raw.is_empty() {
            if i + 1 == parts.len() {
                directory = true;
                continue;
            }
            // `//`: not a path any page links to.
            return Err(WwwError::NotFound);
        }
        let bytes = percent_decode(raw, false).ok_or(WwwError::BadPath("bad %-escape"))?;
        let name = String::from_utf8(bytes).map_err(|_| WwwError::BadPath("not UTF-8"))?;
        if name.starts_with('.')
            || name
                .chars()
                .any(|c| c == '/' || c == '\\' || c == '\0' || c.is_control())
        {
            return Err(WwwError::NotFound);
        }
        segments.push(name);
    }
    Ok(SitePath {
        segments,
        directory,
    })
}

/// Decodes `%XX` escapes; `plus_is_space` for query strings. `None` for a malformed escape.
pub fn percent_decode(text: &str, plus_is_space: bool) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hi = (hex[0] as char).to_digit(16)?;
                let lo = (hex[1] as char).to_digit(16)?;
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(out)
}

/// The content type for a file name, by extension; unknown ones are `application/octet-stream`
/// (with `nosniff`, a browser will not guess a script out of it).
pub fn content_type(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        // Browsers run an ES module only when it is served as JavaScript.
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "webmanifest" => "application/manifest+json",
        "txt" | "md" => "text/plain; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "xml" => "application/xml",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "ico" => "image/x-icon",
        "wav" => "audio/wav",
        "mp3" => "audio/mpeg",
        "ogg" | "oga" => "audio/ogg",
        "opus" => "audio/opus",
        "flac" => "audio/flac",
        "m4a" => "audio/mp4",
        "mid" | "midi" => "audio/midi",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        // Streaming compilation needs the exact type.
        "wasm" => "application/wasm",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "otf" => "font/otf",
        "pdf" => "application/pdf",
        _ => "application/octet-stream",
    }
}

/// The CORS answer for a page, the library or a `--www` file, so that a page on another site
/// can `import` `/conductor.js`. Without `--allowed-origin`, any origin (`*`: these are public
/// files, fetched without credentials); with it, the request's `Origin` is echoed when listed
/// and nothing is granted otherwise (the browser then refuses the cross-origin use; the file
/// itself is still served, as to any client that sends no `Origin`). `allowed` is lower-cased
/// without trailing slashes, as `Config` keeps it.
pub fn cors_headers(origin: Option<&str>, allowed: &[String]) -> Vec<String> {
    if allowed.is_empty() {
        return vec!["Access-Control-Allow-Origin: *".into()];
    }
    // The answer depends on Origin: caches must keep one per origin.
    let mut lines = vec!["Vary: Origin".to_string()];
    if let Some(origin) = origin {
        let normal = origin.trim().trim_end_matches('/').to_ascii_lowercase();
        if allowed.contains(&normal) {
            let echoed: String = origin.chars().filter(|c| !c.is_control()).collect();
            lines.push(format!("Access-Control-Allow-Origin: {echoed}"));
        }
    }
    lines
}

/// Files at the top of DIR that the embedded pages hide (`index.html`, `conductor.js`, ...),
/// so that the operator hears why such a file is never served.
pub fn shadowed(root: &Path) -> Vec<PathBuf> {
    ["index.html", "drums.html", "conductor.js", "base.css"]
        .iter()
        .map(|name| root.join(name))
        .filter(|p| p.exists())
        .collect()
}

/// What a path in DIR gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    File {
        body: Arc<[u8]>,
        content_type: &'static str,
        /// A strong validator from the file's identity, for `If-None-Match`.
        etag: String,
    },
    /// A directory asked for without its trailing slash: where to send the browser.
    Redirect(String),
}

/// One cached file.
struct Cached {
    identity: (u64, u64, u64, i64, i64),
    body: Arc<[u8]>,
    used: Instant,
}

/// The `--www` directory and its cache. Lives on the page worker's thread.
pub struct Site {
    root: PathBuf,
    cache: HashMap<PathBuf, Cached>,
    cached_bytes: u64,
}

impl Site {
    /// `root` must be the directory's real path (`Config` resolves it).
    pub fn new(root: PathBuf) -> Site {
        Site {
            root,
            cache: HashMap::new(),
            cached_bytes: 0,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file `url_path` names (the raw request path, without query), under the rules in the
    /// module doc.
    pub fn open(&mut self, url_path: &str) -> Result<Found, WwwError> {
        let site_path = resolve(url_path)?;
        let mut path = self.root.clone();
        for segment in &site_path.segments {
            path.push(segment);
        }
        let (mut real, mut meta) = self.real(&path)?;
        let mut name = site_path
            .segments
            .last()
            .cloned()
            .unwrap_or_else(|| "index.html".into());
        if meta.is_dir() {
            if !site_path.directory {
                return Ok(Found::Redirect(format!("{url_path}/")));
            }
            (real, meta) = self.real(&real.join("index.html"))?;
            name = "index.html".into();
        } else if site_path.directory {
            // `/file.html/`: not a directory.
            return Err(WwwError::NotFound);
        }
        if !meta.is_file() {
            return Err(WwwError::NotFound);
        }
        if meta.len() > MAX_FILE_BYTES {
            return Err(WwwError::TooLarge);
        }
        let identity = identity(&meta);
        let etag = format!(
            "\"{:x}-{:x}-{:x}.{:x}\"",
            identity.1, identity.2, identity.3, identity.4
        );
        let content_type = content_type(&name);
        if let Some(hit) = self.cache.get_mut(&real)
            && hit.identity == identity
        {
            hit.used = Instant::now();
            return Ok(Found::File {
                body: Arc::clone(&hit.body),
                content_type,
                etag,
            });
        }
        let body = read_file(&real, &meta)?;
        self.remember(real, identity, Arc::clone(&body));
        Ok(Found::File {
            body,
            content_type,
            etag,
        })
    }

    /// `path` with every symlink resolved, if it exists and stays under the root.
    fn real(&self, path: &Path) -> Result<(PathBuf, Metadata), WwwError> {
        let real = fs::canonicalize(path).map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied => WwwError::Unreadable,
            _ => WwwError::NotFound,
        })?;
        if !real.starts_with(&self.root) {
            return Err(WwwError::NotFound);
        }
        let meta = fs::metadata(&real).map_err(|_| WwwError::NotFound)?;
        Ok((real, meta))
    }

    fn remember(&mut self, real: PathBuf, identity: (u64, u64, u64, i64, i64), body: Arc<[u8]>) {
        let size = body.len() as u64;
        if size > CACHE_BYTES / 4 {
            return;
        }
        if let Some(old) = self.cache.remove(&real) {
            self.cached_bytes -= old.body.len() as u64;
        }
        while self.cached_bytes + size > CACHE_BYTES {
            let Some(oldest) = self
                .cache
                .iter()
                .min_by_key(|(_, c)| c.used)
                .map(|(p, _)| p.clone())
            else {
                break;
            };
            if let Some(old) = self.cache.remove(&oldest) {
                self.cached_bytes -= old.body.len() as u64;
            }
        }
        self.cached_bytes += size;
        self.cache.insert(
            real,
            Cached {
                identity,
                body,
                used: Instant::now(),
            },
        );
    }
}

fn identity(meta: &Metadata) -> (u64, u64, u64, i64, i64) {
    (
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
    )
}

/// Reads a regular file whole. Opened without following a last symlink (one swapped in after
/// `realpath`) and non-blocking (a FIFO swapped in cannot hang the thread); the open file must
/// still be the one that was checked.
fn read_file(real: &Path, checked: &Metadata) -> Result<Arc<[u8]>, WwwError> {
    let mut file: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(real)
        .map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied => WwwError::Unreadable,
            _ => WwwError::NotFound,
        })?;
    let meta = file.metadata().map_err(|_| WwwError::NotFound)?;
    if !meta.is_file() || (meta.dev(), meta.ino()) != (checked.dev(), checked.ino()) {
        return Err(WwwError::NotFound);
    }
    let mut body = Vec::with_capacity(meta.len().min(MAX_FILE_BYTES) as usize);
    match (&mut file).take(MAX_FILE_BYTES + 1).read_to_end(&mut body) {
        Ok(_) if body.len() as u64 > MAX_FILE_BYTES => Err(WwwError::TooLarge),
        Ok(_) => Ok(body.into()),
        Err(e) => {
            warn!("www: cannot read {}: {e}", real.display());
            Err(WwwError::Unreadable)
        }
    }
}

/// Whether an `If-None-Match` header value names `etag` (or is `*`).
pub fn etag_matches(if_none_match: &str, etag: &str) -> bool {
    if_none_match
        .split(',')
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == "*" || t == etag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn segs(path: &str) -> Vec<String> {
        resolve(path).unwrap().segments
    }

    #[test]
    fn plain_paths_resolve_to_their_segments() {
        assert_eq!(segs("/a/b.html"), ["a", "b.html"]);
        assert_eq!(
            resolve("/"),
            Ok(SitePath {
                segments: vec![],
                directory: true
            })
        );
        assert!(resolve("/songs/").unwrap().directory);
        assert!(!resolve("/songs").unwrap().directory);
        assert_eq!(segs("/my%20song.html"), ["my song.html"]);
        assert_eq!(segs("/caf%C3%A9.js"), ["café.js"]);
        // A + in a path is a plus.
        assert_eq!(segs("/a+b.txt"), ["a+b.txt"]);
    }

    #[test]
    fn traversal_and_hidden_tricks_are_refused() {
        for path in [
            "/..",
            "/../etc/passwd",
            "/a/../../etc/passwd",
            "/%2e%2e/etc/passwd",
            "/%2E%2E%2Fetc%2Fpasswd",
            "/a%2f..%2f..%2fetc",
            "/a%2Fb",
            "/a%5c..%5cb",
            "/.",
            "/./a",
            "/.git/config",
            "/.env",
            "/a/.hidden",
            "/a%00.html",
            "/a%0a.html",
            "/a//b",
            "//etc/passwd",
        ] {
            assert!(resolve(path).is_err(), "{path}");
        }
        assert_eq!(resolve("/%zz"), Err(WwwError::BadPath("bad %-escape")));
        assert_eq!(resolve("/%"), Err(WwwError::BadPath("bad %-escape")));
        assert_eq!(resolve("/%ff"), Err(WwwError::BadPath("not UTF-8")));
        assert!(resolve("relative").is_err());
        assert_eq!(
            resolve(&format!("/{}", "a/".repeat(40))),
            Err(WwwError::NotFound)
        );
    }

    #[test]
    fn content_types_cover_what_pages_use() {
        assert_eq!(content_type("x.html"), "text/html; charset=utf-8");
        assert_eq!(content_type("X.JS"), "text/javascript; charset=utf-8");
        assert_eq!(content_type("m.mjs"), "text/javascript; charset=utf-8");
        assert_eq!(content_type("s.css"), "text/css; charset=utf-8");
        assert_eq!(content_type("k.wav"), "audio/wav");
        assert_eq!(content_type("w.wasm"), "application/wasm");
        assert_eq!(content_type("i.svg"), "image/svg+xml");
        assert_eq!(content_type("noext"), "application/octet-stream");
        assert_eq!(content_type("x.exe"), "application/octet-stream");
    }

    #[test]
    fn cors_is_open_without_an_allow_list_and_exact_with_one() {
        assert_eq!(
            cors_headers(Some("https://a.example"), &[]),
            ["Access-Control-Allow-Origin: *"]
        );
        assert_eq!(cors_headers(None, &[]), ["Access-Control-Allow-Origin: *"]);
        let allowed = vec!["https://a.example".to_string()];
        assert_eq!(
            cors_headers(Some("https://A.example/"), &allowed),
            [
                "Vary: Origin",
                "Access-Control-Allow-Origin: https://A.example/"
            ]
        );
        assert_eq!(
            cors_headers(Some("https://b.example"), &allowed),
            ["Vary: Origin"]
        );
        assert_eq!(cors_headers(None, &allowed), ["Vary: Origin"]);
    }

    #[test]
    fn etags_match_lists_weak_forms_and_star() {
        assert!(etag_matches("\"a\"", "\"a\""));
        assert!(etag_matches("\"b\", W/\"a\"", "\"a\""));
        assert!(etag_matches("*", "\"a\""));
        assert!(!etag_matches("\"b\"", "\"a\""));
    }

    /// A directory tree under the system's temp dir, removed on drop.
    struct Tree(PathBuf);

    impl Tree {
        fn new(name: &str) -> Tree {
            let dir =
                std::env::temp_dir().join(format!("conductor-www-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(dir.join("site/sub")).unwrap();
            fs::write(dir.join("site/page.html"), "<p>page</p>").unwrap();
            fs::write(dir.join("site/sub/index.html"), "<p>sub</p>").unwrap();
            fs::write(dir.join("site/.secret"), "hidden").unwrap();
            fs::write(dir.join("outside.txt"), "outside").unwrap();
            Tree(dir)
        }

        fn site(&self) -> Site {
            Site::new(self.0.join("site").canonicalize().unwrap())
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn body(found: Result<Found, WwwError>) -> String {
        match found {
            Ok(Found::File { body, .. }) => String::from_utf8(body.to_vec()).unwrap(),
            other => panic!("not a file: {other:?}"),
        }
    }

    #[test]
    fn files_directories_and_redirects() {
        let t = Tree::new("files");
        let mut site = t.site();
        assert_eq!(body(site.open("/page.html")), "<p>page</p>");
        assert_eq!(body(site.open("/sub/")), "<p>sub</p>");
        assert_eq!(site.open("/sub"), Ok(Found::Redirect("/sub/".into())));
        assert_eq!(site.open("/page.html/"), Err(WwwError::NotFound));
        assert_eq!(site.open("/missing.html"), Err(WwwError::NotFound));
        assert_eq!(site.open("/.secret"), Err(WwwError::NotFound));
        // The root has no index.html.
        assert_eq!(site.open("/"), Err(WwwError::NotFound));
        match site.open("/page.html") {
            Ok(Found::File {
                content_type, etag, ..
            }) => {
                assert_eq!(content_type, "text/html; charset=utf-8");
                assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn files_that_the_embedded_pages_hide_are_named() {
        let t = Tree::new("shadow");
        let root = t.0.join("site");
        assert!(shadowed(&root).is_empty());
        fs::write(root.join("conductor.js"), "old copy").unwrap();
        assert_eq!(shadowed(&root), [root.join("conductor.js")]);
    }

    #[test]
    fn symlinks_may_not_lead_out() {
        let t = Tree::new("links");
        let site_dir = t.0.join("site");
        symlink(t.0.join("outside.txt"), site_dir.join("out.txt")).unwrap();
        symlink(&t.0, site_dir.join("up")).unwrap();
        symlink("/etc", site_dir.join("etc")).unwrap();
        symlink(site_dir.join("page.html"), site_dir.join("alias.html")).unwrap();
        let mut site = t.site();
        assert_eq!(site.open("/out.txt"), Err(WwwError::NotFound));
        assert_eq!(site.open("/up/outside.txt"), Err(WwwError::NotFound));
        assert_eq!(site.open("/etc/passwd"), Err(WwwError::NotFound));
        // A link that stays inside is followed; the type is the name asked for.
        assert_eq!(body(site.open("/alias.html")), "<p>page</p>");
    }

    #[test]
    fn only_regular_files_of_bounded_size_are_served() {
        let t = Tree::new("special");
        let site_dir = t.0.join("site");
        let fifo = site_dir.join("pipe.html");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let mut site = t.site();
        assert_eq!(site.open("/pipe.html"), Err(WwwError::NotFound));
        let big = File::create(site_dir.join("big.bin")).unwrap();
        big.set_len(MAX_FILE_BYTES + 1).unwrap();
        assert_eq!(site.open("/big.bin"), Err(WwwError::TooLarge));
    }

    #[test]
    fn a_changed_file_is_read_again_and_the_same_one_is_shared() {
        let t = Tree::new("cache");
        let mut site = t.site();
        let a = site.open("/page.html").unwrap();
        let b = site.open("/page.html").unwrap();
        match (&a, &b) {
            (Found::File { body: x, .. }, Found::File { body: y, .. }) => {
                assert!(Arc::ptr_eq(x, y))
            }
            _ => panic!(),
        }
        fs::write(t.0.join("site/page.html"), "<p>new, longer</p>").unwrap();
        assert_eq!(body(site.open("/page.html")), "<p>new, longer</p>");
    }
}
