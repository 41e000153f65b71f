//! HTTP requests: the routing table's answers, and the WebSocket upgrade checks.

use std::time::Instant;

use log::debug;

use crate::hub::JoinError;
use crate::metrics;
use crate::stats::RefuseReason;
use crate::wire::http::{self, Request, Route as HttpRoute};

use super::reactor::*;

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
            HttpRoute::WebSocket => match self.check_ws_upgrade(&req) {
                Ok(accept) => match self.hub.check_join(
                    http::query_param(&req.query, "room")
                        .as_deref()
                        .filter(|r| !r.is_empty()),
                ) {
                    Ok(room) => return self.upgrade(key, &req, &accept, room),
                    Err(e) => refusal(&e),
                },
                Err(refusal) => refusal,
            },
            HttpRoute::SocketIo => return self.on_socketio_request(key, req, now),
            HttpRoute::Asset(asset) => (200, http::response(200, asset.content_type, asset.body)),
            HttpRoute::Healthz => match self.stats.degraded() {
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
            HttpRoute::MethodNotAllowed => (405, http::text_error(405, "only GET is served")),
        };
        let (status, bytes) = response;
        self.respond(key, &req, status, bytes, now);
    }

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
        if let Some(s) = self.socks.get_mut(key) {
            s.conn.respond(bytes, now);
        }
    }

    /// The WebSocket handshake checks shared by `/ws` and `/socket.io/`: a valid upgrade, and
    /// room for one more client. Returns the accept key, or the refusal to send.
    pub(super) fn check_ws_upgrade(&mut self, req: &Request) -> Result<String, (u16, Vec<u8>)> {
        match http::check_upgrade(req) {
            Ok(_) if self.stats.clients >= self.cfg.max_clients => {
                self.stats.count_refused(RefuseReason::MaxClients);
                let message = format!(
                    "server full: {} clients connected; try again later",
                    self.stats.clients
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
