//! HTTP requests: the routing table's answers, the WebSocket upgrade checks, and the answers
//! the page worker makes off the loop (`--www` files, QR codes).

use std::time::{Duration, Instant};

use log::debug;

use crate::hub::JoinError;
use crate::join::{self, JoinInfo};
use crate::metrics;
use crate::page_worker::{self, Job};
use crate::room::RoomName;
use crate::stats::RefuseReason;
use crate::tick_choice::TickChoice;
use crate::wire::http::{self, Request, Route as HttpRoute};
use crate::www;

use super::reactor::*;

/// How long a request waits for the page worker before its connection is dropped (a disk
/// that hangs); the worker answers in microseconds to milliseconds otherwise.
const PAGE_BACKSTOP: Duration = Duration::from_secs(10);
/// How long `/join`'s list of LAN addresses is reused before the interfaces are read again
/// (a laptop may change networks while it runs).
const JOIN_CACHE: Duration = Duration::from_secs(2);

/// What to tell a client the hub would not let in (before the upgrade).
pub(super) fn refusal(e: &JoinError) -> (u16, Vec<u8>) {
    match e {
        JoinError::Name(_) => (400, http::text_error(400, &e.to_string())),
        JoinError::Full { .. } => (503, http::text_error(503, &e.to_string())),
    }
}

impl Server {
    pub(super) fn on_request(&mut self, key: usize, req: Request, now: Instant) {
        let route = http::route(&req.method, &req.path);
        let response = match route {
            HttpRoute::WebSocket if !http::origin_allowed(&req, &self.cfg.allowed_origins) => {
                self.stats.count_refused(RefuseReason::ForbiddenOrigin);
                (
                    403,
                    http::text_error(
                        403,
                        "this page's origin may not open the WebSocket (--allowed-origin)",
                    ),
                )
            }
            // The room and the tick choice are checked before the handshake, so that a plain
            // GET of the same URL (what conductor.js asks when a WebSocket fails to open, since
            // a browser's WebSocket cannot read a refusal) gets their refusal too.
            HttpRoute::WebSocket => match (
                self.check_join(&req),
                TickChoice::from_param(http::query_param(&req.query, "ticks").as_deref()),
            ) {
                (Ok(room), Ok(ticks)) => match self.check_ws_upgrade(&req) {
                    Ok(accept) => return self.upgrade(key, &req, &accept, room, ticks),
                    Err(refusal) => refusal,
                },
                (Err(e), _) => refusal(&e),
                (_, Err(e)) => {
                    self.stats.count_refused(RefuseReason::BadRequest);
                    (400, http::text_error(400, &e.to_string()))
                }
            },
            HttpRoute::SocketIo => return self.on_socketio_request(key, req, now),
            HttpRoute::Asset(asset) => {
                let cors = www::cors_headers(req.header("origin"), &self.cfg.allowed_origins);
                let extra: Vec<&str> = cors.iter().map(String::as_str).collect();
                (
                    200,
                    http::response_with(200, asset.content_type, &extra, asset.body),
                )
            }
            HttpRoute::Join => match http::query_param(&req.query, "room")
                .as_deref()
                .filter(|r| !r.is_empty())
                .map_or(Ok(RoomName::main()), RoomName::parse)
            {
                Ok(room) => (
                    200,
                    http::response(200, "application/json", self.join_json(&room).as_bytes()),
                ),
                Err(e) => (400, http::text_error(400, &e.to_string())),
            },
            HttpRoute::Qr => match join::qr_text(&req.query) {
                Ok(text) => return self.ask_pages(key, &req, Job::Qr { text }, now),
                Err(e) => (400, http::text_error(400, &e.to_string())),
            },
            // Not embedded and not an endpoint: the operator's own pages, if any.
            HttpRoute::NotFound if self.cfg.www.is_some() => {
                let job = Job::File {
                    path: req.path.clone(),
                    if_none_match: req.header("if-none-match").map(str::to_string),
                };
                return self.ask_pages(key, &req, job, now);
            }
            HttpRoute::Healthz => match self.stats.degraded(self.silent_for()) {
                None => (200, http::response(200, "text/plain; charset=utf-8", b"ok")),
                Some(why) => (
                    503,
                    http::response(503, "text/plain; charset=utf-8", why.as_bytes()),
                ),
            },
            HttpRoute::Stats => {
                let body = metrics::render_json(&self.metric_table());
                (
                    200,
                    http::response(200, "application/json", body.as_bytes()),
                )
            }
            HttpRoute::Metrics => {
                let body = metrics::render_prometheus(&self.metric_table());
                (
                    200,
                    http::response(
                        200,
                        "text/plain; version=0.0.4; charset=utf-8",
                        body.as_bytes(),
                    ),
                )
            }
            HttpRoute::NotFound => (
                404,
                http::text_error(404, "no such page; try /, /ws or /socket.io/"),
            ),
            HttpRoute::MethodNotAllowed if req.path.starts_with("/socket.io") => (
                405,
                http::response_with(
                    405,
                    "text/plain; charset=utf-8",
                    &["Allow: GET, POST, OPTIONS"],
                    b"405 Method Not Allowed: /socket.io/ takes GET, POST and OPTIONS\n",
                ),
            ),
            HttpRoute::MethodNotAllowed if req.path == "/ws" => (
                405,
                http::response_with(
                    405,
                    "text/plain; charset=utf-8",
                    &["Allow: GET"],
                    b"405 Method Not Allowed: /ws takes a GET with a WebSocket upgrade\n",
                ),
            ),
            HttpRoute::MethodNotAllowed => {
                (405, http::text_error(405, "only GET and HEAD are served"))
            }
        };
        let (status, bytes) = response;
        self.respond(key, &req, status, bytes, now);
    }

    /// Sends a complete response and closes. Every response passes here, so a `HEAD` gets the
    /// `GET`'s status and headers without its body whatever route answered it.
    pub(super) fn respond(
        &mut self,
        key: usize,
        req: &Request,
        status: u16,
        bytes: Vec<u8>,
        now: Instant,
    ) {
        self.stats.count_http(status);
        debug!("http {} {} -> {status}", req.method, req.path);
        let bytes = if req.is_head() {
            http::without_body(bytes)
        } else {
            bytes
        };
        if let Some(s) = self.socks.get_mut(key) {
            s.conn.respond(bytes, now);
        }
    }

    /// Hands a request to the page worker and parks its connection until the answer comes
    /// back (`drain_pages`); a worker with too much to do gets the client a 503 at once.
    pub(super) fn ask_pages(&mut self, key: usize, req: &Request, job: Job, now: Instant) {
        let cors = www::cors_headers(req.header("origin"), &self.cfg.allowed_origins);
        let head_only = req.method == "HEAD";
        match self.pages.submit(key, job, head_only, req.keep_alive, cors) {
            Some(ticket) => {
                debug!("http {} {} -> page worker", req.method, req.path);
                if let Some(s) = self.socks.get_mut(key) {
                    s.conn
                        .park_for_page(ticket, now + PAGE_BACKSTOP, req.keep_alive);
                }
            }
            None => self.respond(key, req, 503, page_worker::busy(false), now),
        }
    }

    /// Sends the page worker's finished answers to the connections still waiting for them.
    pub(super) fn drain_pages(&mut self) {
        let now = Instant::now();
        while let Some(answer) = self.pages.answer() {
            // The client may have gone, and its key been reused: the ticket tells.
            let Some(s) = self.socks.get_mut(answer.conn) else {
                continue;
            };
            if s.conn.page_ticket != Some(answer.ticket) {
                continue;
            }
            self.stats.count_http(answer.status);
            s.conn.answer_page(answer.head, answer.body, now);
            self.after_io(answer.conn);
        }
        self.remove_finished();
    }

    /// `/join` (`/join?room=NAME`): where devices on the LAN reach this server, and the pages'
    /// URLs in that room.
    pub(super) fn join_json(&mut self, room: &RoomName) -> String {
        let now = Instant::now();
        let lan = match &self.join_cache {
            Some((made, lan)) if now.duration_since(*made) < JOIN_CACHE => lan.clone(),
            _ => {
                let interfaces = join::interface_addresses().unwrap_or_else(|e| {
                    debug!("cannot list interfaces: {e}");
                    Vec::new()
                });
                let lan = join::lan_addresses(self.local_addr.ip(), &interfaces);
                self.join_cache = Some((now, lan.clone()));
                lan
            }
        };
        JoinInfo::new(self.local_addr.ip(), self.local_addr.port(), &lan)
            .in_room(room)
            .json()
    }

    /// Whether the hub would let a `/ws` client into the room its request names.
    fn check_join(&self, req: &Request) -> Result<RoomName, JoinError> {
        let room = http::query_param(&req.query, "room");
        let room = room.as_deref().filter(|r| !r.is_empty());
        self.shared.control().hub.check_join(room)
    }

    /// The WebSocket handshake checks shared by `/ws` and `/socket.io/`: a valid upgrade, and
    /// room for one more client. Returns the accept key, or the refusal to send.
    pub(super) fn check_ws_upgrade(&mut self, req: &Request) -> Result<String, (u16, Vec<u8>)> {
        match http::check_upgrade(req) {
            Ok(_) if self.clients_everywhere() >= self.cfg.max_clients => {
                self.stats.count_refused(RefuseReason::MaxClients);
                let message = format!(
                    "server full: {} clients connected; try again later",
                    self.clients_everywhere()
                );
                Err((503, http::text_error(503, &message)))
            }
            Ok(accept) => Ok(accept),
            Err(e) => {
                self.stats.count_refused(RefuseReason::BadUpgrade);
                Err((400, http::text_error(400, &e.to_string())))
            }
        }
    }
}
