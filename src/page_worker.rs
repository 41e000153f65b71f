//! The page worker: the thread that makes the HTTP answers too slow for the event loop.
//!
//! Two kinds of request go here: files from `--www` ([`crate::www`]), which wait on the disk,
//! and QR codes ([`crate::join`]), which cost up to milliseconds of CPU. The loop hands each one
//! over through a wait-free ring with a ticket, parks the connection, and goes back to its
//! ticks; the worker builds the complete answer (head and body) and hands it back through a
//! second ring, waking the loop with its `mio::Waker` as the timing thread does. The loop then
//! only queues the bytes: a file's body is one shared buffer, never copied per client.
//!
//! The worker owns the `--www` cache and a few recent QR codes. It never touches a socket or
//! anything of the loop's. A full ring is an answer too: the loop says 503 (busy) rather than
//! wait, and the worker waits for room rather than drop an answer. When the loop goes away the
//! worker notices its ring is abandoned and ends.

use std::io;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::debug;
use mio::Waker;
use rtrb::{Consumer, Producer, RingBuffer};

use crate::join::{self, QrError};
use crate::protocol::SharedFrame;
use crate::www::{self, Found, Site, WwwError};

/// Requests in flight at most; more get 503.
const JOBS: usize = 256;
/// Recent QR codes kept (the join panel asks for one or two URLs, over and over).
const QR_CACHE: usize = 8;

/// What to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Job {
    /// A file from `--www`: the raw request path (no query) and the request's
    /// `If-None-Match`, if any.
    File {
        path: String,
        if_none_match: Option<String>,
    },
    /// `/qr.svg`: a QR code of `text`.
    Qr { text: String },
}

/// One request for the worker.
#[derive(Debug)]
pub struct JobRequest {
    /// The loop's key for the connection, and the ticket that tells a late answer from an
    /// answer to the connection now under that key.
    pub conn: usize,
    pub ticket: u64,
    pub job: Job,
    /// `HEAD`: the same head, no body.
    pub head_only: bool,
    pub keep_alive: bool,
    /// CORS lines for the answer (see [`www::cors_headers`]).
    pub cors: Vec<String>,
}

/// A finished answer.
#[derive(Debug)]
pub struct Answer {
    pub conn: usize,
    pub ticket: u64,
    pub status: u16,
    pub head: SharedFrame,
    pub body: Option<SharedFrame>,
}

/// The loop's side of the worker.
pub struct PageWorker {
    jobs: Producer<JobRequest>,
    answers: Consumer<Answer>,
    handle: JoinHandle<()>,
    next_ticket: u64,
}

impl PageWorker {
    /// Starts the thread; `www` is the `--www` directory's real path, if any.
    pub fn spawn(www: Option<std::path::PathBuf>, waker: Arc<Waker>) -> io::Result<PageWorker> {
        let (jobs, job_rx) = RingBuffer::new(JOBS);
        let (answer_tx, answers) = RingBuffer::new(JOBS);
        let mut worker = Worker {
            site: www.map(Site::new),
            jobs: job_rx,
            answers: answer_tx,
            waker,
            qr: Vec::new(),
        };
        let handle = thread::Builder::new()
            .name("conductor-pages".into())
            .spawn(move || worker.run())?;
        Ok(PageWorker {
            jobs,
            answers,
            handle,
            next_ticket: 1,
        })
    }

    /// Queues a job; returns its ticket, or `None` when the worker has too much to do.
    pub fn submit(
        &mut self,
        conn: usize,
        job: Job,
        head_only: bool,
        keep_alive: bool,
        cors: Vec<String>,
    ) -> Option<u64> {
        let ticket = self.next_ticket;
        let request = JobRequest {
            conn,
            ticket,
            job,
            head_only,
            keep_alive,
            cors,
        };
        self.jobs.push(request).ok()?;
        self.next_ticket += 1;
        self.handle.thread().unpark();
        Some(ticket)
    }

    /// The next finished answer, if any.
    pub fn answer(&mut self) -> Option<Answer> {
        self.answers.pop().ok()
    }
}

/// The worker's state, on its own thread.
struct Worker {
    site: Option<Site>,
    jobs: Consumer<JobRequest>,
    answers: Producer<Answer>,
    waker: Arc<Waker>,
    /// Recent QR codes, newest last.
    qr: Vec<(String, SharedFrame)>,
}

impl Worker {
    fn run(&mut self) {
        loop {
            match self.jobs.pop() {
                Ok(request) => {
                    let answer = self.make(request);
                    if !self.hand_over(answer) {
                        return;
                    }
                }
                Err(_) if self.jobs.is_abandoned() => return,
                // Unparked by `submit`; the timeout only guards against a lost wake-up.
                Err(_) => thread::park_timeout(Duration::from_millis(500)),
            }
        }
    }

    /// Pushes the answer, waiting while the ring is full (the loop drains it at every wake).
    /// False when the loop is gone.
    fn hand_over(&mut self, mut answer: Answer) -> bool {
        loop {
            match self.answers.push(answer) {
                Ok(()) => {
                    let _ = self.waker.wake();
                    return true;
                }
                Err(rtrb::PushError::Full(back)) => {
                    if self.answers.is_abandoned() {
                        return false;
                    }
                    answer = back;
                    let _ = self.waker.wake();
                    thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    fn make(&mut self, request: JobRequest) -> Answer {
        let JobRequest {
            conn,
            ticket,
            job,
            head_only,
            keep_alive,
            cors,
        } = request;
        let reply = match job {
            Job::File {
                path,
                if_none_match,
            } => self.file(&path, if_none_match.as_deref()),
            Job::Qr { text } => self.qr(&text),
        };
        debug!("pages: {} for connection {conn}", reply.status);
        let mut extra: Vec<String> = reply.extra;
        extra.extend(cors);
        let length = reply.body.len();
        let head = head(keep_alive, reply.status, reply.content_type, length, &extra);
        let body = (!head_only && length > 0).then_some(reply.body);
        Answer {
            conn,
            ticket,
            status: reply.status,
            head: head.into_bytes().into(),
            body,
        }
    }

    fn file(&mut self, path: &str, if_none_match: Option<&str>) -> Reply {
        let Some(site) = self.site.as_mut() else {
            return Reply::error(&WwwError::NotFound);
        };
        match site.open(path) {
            Ok(Found::File {
                body,
                content_type,
                etag,
            }) => {
                let extra = vec![
                    format!("ETag: {etag}"),
                    // Pages change while a band rehearses: always ask, but a 304 is cheap.
                    "Cache-Control: no-cache".into(),
                    "X-Content-Type-Options: nosniff".into(),
                ];
                if if_none_match.is_some_and(|v| www::etag_matches(v, &etag)) {
                    return Reply {
                        status: 304,
                        content_type,
                        extra,
                        body: Arc::from(&[][..]),
                    };
                }
                Reply {
                    status: 200,
                    content_type,
                    extra,
                    body,
                }
            }
            Ok(Found::Redirect(location)) => Reply {
                status: 301,
                content_type: TEXT,
                extra: vec![format!("Location: {location}")],
                body: Arc::from(format!("301 Moved Permanently: {location}\n").as_bytes()),
            },
            Err(e) => Reply::error(&e),
        }
    }

    fn qr(&mut self, text: &str) -> Reply {
        let svg = match self.qr.iter().position(|(t, _)| t == text) {
            Some(i) => {
                let hit = self.qr.remove(i);
                let svg = Arc::clone(&hit.1);
                self.qr.push(hit);
                svg
            }
            None => match join::qr_svg(text) {
                Ok(svg) => {
                    let svg: SharedFrame = svg.into_bytes().into();
                    if self.qr.len() == QR_CACHE {
                        self.qr.remove(0);
                    }
                    self.qr.push((text.to_string(), Arc::clone(&svg)));
                    svg
                }
                Err(e) => return Reply::qr_error(&e),
            },
        };
        Reply {
            status: 200,
            content_type: "image/svg+xml",
            extra: vec!["Cache-Control: no-store".into()],
            body: svg,
        }
    }
}

const TEXT: &str = "text/plain; charset=utf-8";

/// An answer before it becomes bytes.
struct Reply {
    status: u16,
    content_type: &'static str,
    extra: Vec<String>,
    body: SharedFrame,
}

impl Reply {
    fn error(e: &WwwError) -> Reply {
        let status = e.status();
        let what = match e {
            WwwError::NotFound => "no such page; try /, /ws or /socket.io/".to_string(),
            e => e.to_string(),
        };
        Reply::text(status, &what)
    }

    fn qr_error(e: &QrError) -> Reply {
        Reply::text(400, &e.to_string())
    }

    fn text(status: u16, message: &str) -> Reply {
        Reply {
            status,
            content_type: TEXT,
            extra: vec!["Cache-Control: no-store".into()],
            body: Arc::from(format!("{status} {}: {message}\n", reason(status)).as_bytes()),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        301 => "Moved Permanently",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// A response head. A 304 carries no `Content-Length` of its own body (RFC 9110 §15.4.5
/// lets it describe the 200's; it is left out so no client waits for bytes).
fn head(
    keep_alive: bool,
    status: u16,
    content_type: &str,
    length: usize,
    extra: &[String],
) -> String {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    if status != 304 {
        out.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {length}\r\n"
        ));
    }
    out.push_str(&format!("Connection: {connection}\r\n"));
    for line in extra {
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out
}

/// The answer the loop sends itself when the worker's ring is full.
pub fn busy(keep_alive: bool) -> Vec<u8> {
    let body = b"503 Service Unavailable: too many pages being read; try again\n";
    let mut bytes = head(
        keep_alive,
        503,
        TEXT,
        body.len(),
        &["Retry-After: 1".to_string()],
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll, Token};
    use std::time::Instant;

    fn worker(www: Option<std::path::PathBuf>) -> (PageWorker, Poll) {
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(0)).unwrap());
        (PageWorker::spawn(www, waker).unwrap(), poll)
    }

    fn wait(w: &mut PageWorker, poll: &mut Poll) -> Answer {
        let mut events = Events::with_capacity(4);
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(a) = w.answer() {
                return a;
            }
            assert!(Instant::now() < until, "no answer within 5 s");
            poll.poll(&mut events, Some(Duration::from_millis(100)))
                .unwrap();
        }
    }

    fn text(frame: &SharedFrame) -> String {
        String::from_utf8_lossy(frame).into_owned()
    }

    #[test]
    fn a_qr_code_comes_back_with_its_ticket_and_a_complete_head() {
        let (mut w, mut poll) = worker(None);
        let job = Job::Qr {
            text: "http://10.0.0.7:3000/".into(),
        };
        let cors = vec!["Access-Control-Allow-Origin: *".to_string()];
        let ticket = w.submit(7, job, false, true, cors).unwrap();
        let a = wait(&mut w, &mut poll);
        assert_eq!((a.conn, a.ticket, a.status), (7, ticket, 200));
        let head = text(&a.head);
        let body = a.body.expect("body");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("Content-Type: image/svg+xml\r\n"), "{head}");
        assert!(
            head.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{head}"
        );
        assert!(head.contains("Connection: keep-alive\r\n"), "{head}");
        assert!(
            head.contains("Access-Control-Allow-Origin: *\r\n"),
            "{head}"
        );
        assert!(head.ends_with("\r\n\r\n"));
        assert!(text(&body).starts_with("<?xml"));
        // The same text again comes from the cache: the same buffer.
        let again = w
            .submit(
                8,
                Job::Qr {
                    text: "http://10.0.0.7:3000/".into(),
                },
                true,
                false,
                vec![],
            )
            .unwrap();
        let b = wait(&mut w, &mut poll);
        assert_eq!((b.conn, b.ticket), (8, again));
        // HEAD: the same length, no body.
        assert!(text(&b.head).contains(&format!("Content-Length: {}\r\n", body.len())));
        assert!(b.body.is_none());
    }

    #[test]
    fn without_www_every_file_is_a_404_and_bad_qr_text_a_400() {
        let (mut w, mut poll) = worker(None);
        let file = Job::File {
            path: "/x.html".into(),
            if_none_match: None,
        };
        w.submit(1, file, false, false, vec![]).unwrap();
        let a = wait(&mut w, &mut poll);
        assert_eq!(a.status, 404);
        assert!(text(&a.body.unwrap()).contains("no such page"));
        let qr = Job::Qr {
            text: "x".repeat(join::MAX_QR_TEXT + 1),
        };
        w.submit(2, qr, false, false, vec![]).unwrap();
        let a = wait(&mut w, &mut poll);
        assert_eq!(a.status, 400);
        assert!(text(&a.body.unwrap()).contains("longer than 256 bytes"));
    }

    #[test]
    fn files_get_validators_and_a_304_when_unchanged() {
        let dir = std::env::temp_dir().join(format!("conductor-pages-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.js"), "export const a = 1;\n").unwrap();
        let (mut w, mut poll) = worker(Some(dir.canonicalize().unwrap()));
        let job = |inm: Option<String>| Job::File {
            path: "/a.js".into(),
            if_none_match: inm,
        };
        w.submit(1, job(None), false, false, vec![]).unwrap();
        let a = wait(&mut w, &mut poll);
        let head = text(&a.head);
        assert_eq!(a.status, 200, "{head}");
        assert!(head.contains("Content-Type: text/javascript; charset=utf-8\r\n"));
        assert!(head.contains("X-Content-Type-Options: nosniff\r\n"));
        let etag = head
            .lines()
            .find_map(|l| l.strip_prefix("ETag: "))
            .expect("etag")
            .to_string();
        w.submit(2, job(Some(etag)), false, false, vec![]).unwrap();
        let b = wait(&mut w, &mut poll);
        assert_eq!(b.status, 304);
        assert!(b.body.is_none());
        assert!(!text(&b.head).contains("Content-Length"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_busy_answer_says_when_to_retry() {
        let bytes = String::from_utf8(busy(false)).unwrap();
        assert!(bytes.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(bytes.contains("Retry-After: 1\r\n"));
        let (head, body) = bytes.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
    }
}
