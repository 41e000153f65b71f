//! Socket.IO clients: Engine.IO handshakes, long-polling GETs and POSTs, the upgrade to a
//! WebSocket, and the Socket.IO packets inside, namespaces (rooms) included.
//!
//! The state of each client is its [`EioSession`]; this file carries out what its packets
//! mean and writes what it is owed, on whatever transport carries it.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use log::{debug, warn};
use tungstenite::protocol::frame::coding::CloseCode;

use crate::connection::{Rate, RateLimit};
use crate::hub::{Decision, JoinError};
use crate::stats::{ClientKind, CloseReason, RefuseReason};
use crate::tick_choice::TickChoice;
use crate::wire::engineio::{self, EioError, Packet, SioPacket, Transport as EioTransport};
use crate::wire::http::{self, Request};
use crate::wire::protocol::{self, ClientError, Outgoing};

use super::eio::{ConnKey, EioSession, Joined, Link};
use super::heartbeat::Heartbeat;
use super::shards;

use super::reactor::*;

impl Server {
    /// Everything under `/socket.io/`: the long-polling handshake, polls, posts, CORS
    /// preflight, and WebSocket upgrades (fresh, or taking over a polling session).
    pub(super) fn on_socketio_request(&mut self, key: usize, req: Request, now: Instant) {
        let Some(cors) = http::cors_headers(&req, &self.cfg.allowed_origins) else {
            self.stats.count_refused(RefuseReason::ForbiddenOrigin);
            return self.eio_refuse(key, &req, EioError::Forbidden, &[], now);
        };
        if req.method == "OPTIONS" {
            return self.respond(key, &req, 204, http::preflight(&cors), now);
        }
        let query = match engineio::parse_query(&req.query) {
            Ok(q) => q,
            Err(e) => return self.eio_refuse(key, &req, e, &cors, now),
        };
        // A handshake may choose its ticks; a request within a session names none.
        let ticks = if query.sid.is_none() {
            match TickChoice::from_param(http::query_param(&req.query, "ticks").as_deref()) {
                Ok(ticks) => ticks,
                Err(e) => {
                    self.stats.count_refused(RefuseReason::BadRequest);
                    let extra: Vec<&str> = cors.iter().map(String::as_str).collect();
                    let body = engineio::error_body(EioError::BadRequest, &e.to_string());
                    let bytes =
                        http::response_with(400, "application/json", &extra, body.as_bytes());
                    return self.respond(key, &req, 400, bytes, now);
                }
            }
        } else {
            None
        };
        let Some(peer) = self.socks.get(key).map(|s| s.conn.peer.ip()) else {
            return;
        };
        let client = http::client_ip(&req, self.cfg.client_ip_header.as_deref(), peer);
        // A session answers only its own client: to anyone else its id is unknown, so that an
        // id that leaked (a log, a shared screen) is of no use from elsewhere. A session on a
        // WebSocket is reached by its socket alone: for HTTP its id is spent, as it always was.
        let session = match &query.sid {
            None => None,
            Some(sid)
                if shards::shard_of_sid(sid, self.shared.shards())
                    .is_some_and(|shard| shard != self.shard) =>
            {
                // Its session lives on another shard: the connection goes there.
                let shard = shards::shard_of_sid(sid, self.shared.shards()).unwrap_or(0);
                return self.hand_over(key, &req, shard);
            }
            Some(sid) => match self.sids.get(sid) {
                Some(&skey)
                    if self
                        .sessions
                        .get(skey)
                        .is_some_and(|s| s.socket().is_none() && s.peer == client) =>
                {
                    Some(skey)
                }
                Some(_) => {
                    debug!("socket.io session id presented from elsewhere ({client}), or spent");
                    return self.eio_refuse(key, &req, EioError::SessionIdUnknown, &cors, now);
                }
                None => return self.eio_refuse(key, &req, EioError::SessionIdUnknown, &cors, now),
            },
        };
        match (query.transport, session, req.method.as_str()) {
            // Taking over a session adds no client, so the --max-clients check is skipped.
            (EioTransport::WebSocket, Some(skey), "GET") => match http::check_upgrade(&req) {
                Ok(accept) => self.socketio_takeover(key, &req, &accept, skey),
                Err(e) => {
                    self.stats.count_refused(RefuseReason::BadUpgrade);
                    let bytes = http::text_error(400, &e.to_string());
                    self.respond(key, &req, 400, bytes, now)
                }
            },
            (EioTransport::WebSocket, None, "GET") => match self.check_ws_upgrade(&req) {
                Ok(accept) => self.socketio_websocket(key, &req, &accept, client, ticks),
                Err((status, bytes)) => self.respond(key, &req, status, bytes, now),
            },
            (EioTransport::Polling, None, "GET") => {
                self.polling_handshake(key, &req, client, ticks, cors, now)
            }
            (EioTransport::Polling, Some(skey), "GET") => self.poll(key, &req, skey, cors, now),
            (EioTransport::Polling, Some(skey), "POST") => self.post(key, &req, skey, cors, now),
            (_, None, _) => self.eio_refuse(key, &req, EioError::BadHandshakeMethod, &cors, now),
            _ => self.eio_refuse(key, &req, EioError::BadRequest, &cors, now),
        }
    }

    /// Answers with Engine.IO's JSON error, which stock clients report and retry on.
    pub(super) fn eio_refuse(
        &mut self,
        key: usize,
        req: &Request,
        e: EioError,
        cors: &[String],
        now: Instant,
    ) {
        let extra: Vec<&str> = cors.iter().map(String::as_str).collect();
        let bytes =
            http::response_with(e.status(), "application/json", &extra, e.body().as_bytes());
        self.respond(key, req, e.status(), bytes, now);
    }

    /// A 200 for a polling request: `text/plain` with the CORS headers.
    pub(super) fn poll_response(keep_alive: bool, cors: &[String], body: &str) -> Vec<u8> {
        let extra: Vec<&str> = cors.iter().map(String::as_str).collect();
        http::response_on(
            keep_alive,
            200,
            "text/plain; charset=UTF-8",
            &extra,
            body.as_bytes(),
        )
    }

    /// Sends a polling 200 and, when the client allows, keeps the connection for its next
    /// request: a long-polling client polls at every tick, and a new TCP connection each time
    /// would leave thousands of TIME_WAIT sockets behind.
    pub(super) fn respond_polling(
        &mut self,
        key: usize,
        req: &Request,
        bytes: Vec<u8>,
        now: Instant,
    ) {
        if !req.keep_alive {
            return self.respond(key, req, 200, bytes, now);
        }
        self.stats.count_http(200);
        if let Some(s) = self.socks.get_mut(key) {
            s.conn
                .respond_and_continue(bytes, req.head_len + req.body.len(), now);
        }
    }

    pub(super) fn open_packet(&self, sid: &str, upgrades: &[&str]) -> String {
        engineio::open_packet(
            sid,
            upgrades,
            millis(self.cfg.ping_interval),
            millis(self.cfg.ping_timeout),
            EIO_MAX_PAYLOAD.min(self.cfg.max_message_bytes.max(http::MAX_BODY_BYTES)),
        )
    }

    pub(super) fn new_session(
        &mut self,
        req: &Request,
        client: IpAddr,
        link: Link,
        ticks: Option<TickChoice>,
    ) -> Option<usize> {
        let sid = match engineio::new_sid() {
            Ok(random) => shards::tag_sid(&random, self.shard),
            Err(e) => {
                warn!("no randomness for a session id: {e}");
                return None;
            }
        };
        let now_ns = self.clock.now_ns();
        let interval = nanos(self.cfg.ping_interval);
        let mut session = EioSession::new(
            sid.clone(),
            client,
            link,
            RateLimit::new(self.cfg.max_messages_per_sec),
            Heartbeat::new(now_ns, interval),
            now_ns,
        );
        session.token = http::presented_token(req);
        session.ticks = ticks;
        let skey = self.sessions.insert(session);
        self.sids.insert(sid, skey);
        Some(skey)
    }

    /// A Socket.IO client on a WebSocket from the start. It counts as a client from its
    /// namespace connect (`40`) on, like a polling session.
    pub(super) fn socketio_websocket(
        &mut self,
        key: usize,
        req: &Request,
        accept: &str,
        client: IpAddr,
        ticks: Option<TickChoice>,
    ) {
        let Some(skey) = self.new_session(req, client, Link::WebSocket { socket: key }, ticks)
        else {
            let bytes = http::text_error(503, "cannot create a session; try again");
            return self.respond(key, req, 503, bytes, Instant::now());
        };
        let sid = self.sessions[skey].sid.clone();
        let open = protocol::text_frame(&self.open_packet(&sid, &[]));
        let Some(s) = self.socks.get_mut(key) else {
            return;
        };
        self.stats.count_http(101);
        s.conn.upgrade(
            http::switching_protocols(accept),
            req.head_len,
            self.cfg.max_message_bytes,
        );
        s.owner = Owner::Eio(skey);
        s.conn.send(&open, self.cfg.max_queue);
        debug!("socket.io websocket open peer={}", s.conn.peer);
    }

    /// A WebSocket asking to take a polling session over. One socket per session: a second
    /// would either take the session from the first or get every broadcast uncounted.
    pub(super) fn socketio_takeover(
        &mut self,
        key: usize,
        req: &Request,
        accept: &str,
        skey: usize,
    ) {
        let Some(session) = self.sessions.get_mut(skey) else {
            return;
        };
        if !session.begin_upgrade(key) {
            return self.eio_refuse(key, req, EioError::BadRequest, &[], Instant::now());
        }
        let Some(s) = self.socks.get_mut(key) else {
            session.abandon_upgrade();
            return;
        };
        self.stats.count_http(101);
        s.conn.upgrade(
            http::switching_protocols(accept),
            req.head_len,
            self.cfg.max_message_bytes,
        );
        s.owner = Owner::Eio(skey);
        debug!("socket.io websocket probing peer={}", s.conn.peer);
    }

    /// Opens a long-polling session for `client`: within `--max-clients`,
    /// `--max-polling-sessions` and, for that address, `--max-sessions-per-ip`. The session
    /// counts as a client only once it connects to a namespace (`40`), and is closed if it has
    /// not within `--handshake-timeout` (housekeeping).
    pub(super) fn polling_handshake(
        &mut self,
        key: usize,
        req: &Request,
        client: IpAddr,
        ticks: Option<TickChoice>,
        cors: Vec<String>,
        now: Instant,
    ) {
        let extra: Vec<&str> = cors.iter().map(String::as_str).collect();
        if self.clients_everywhere() >= self.cfg.max_clients
            || shards::lock(&self.shared.session_addresses).total() >= self.cfg.max_polling_sessions
        {
            self.stats.count_refused(RefuseReason::MaxClients);
            let body = r#"{"code":3,"message":"Server full; try again later"}"#;
            let bytes = http::response_with(503, "application/json", &extra, body.as_bytes());
            return self.respond(key, req, 503, bytes, now);
        }
        if shards::lock(&self.shared.session_addresses).held(client) >= self.cfg.max_sessions_per_ip
        {
            self.stats.count_refused(RefuseReason::SessionsPerIp);
            let body = format!(
                r#"{{"code":3,"message":"{} sessions from your address already; try again later"}}"#,
                self.cfg.max_sessions_per_ip
            );
            let bytes = http::response_with(429, "application/json", &extra, body.as_bytes());
            return self.respond(key, req, 429, bytes, now);
        }
        let Some(skey) = self.new_session(req, client, Link::Polling { waiting: None }, ticks)
        else {
            let bytes = http::text_error(503, "cannot create a session; try again");
            return self.respond(key, req, 503, bytes, now);
        };
        shards::lock(&self.shared.session_addresses).try_add(client, self.cfg.max_sessions_per_ip);
        self.sessions[skey].holds_address_place = true;
        let sid = self.sessions[skey].sid.clone();
        let open = self.open_packet(&sid, &["websocket"]);
        let bytes = Self::poll_response(req.keep_alive, &cors, &open);
        self.respond_polling(key, req, bytes, now);
    }

    /// A long-poll GET: answered at once when packets wait (or while the session is being
    /// upgraded), parked until they do otherwise.
    pub(super) fn poll(
        &mut self,
        key: usize,
        req: &Request,
        skey: usize,
        cors: Vec<String>,
        now: Instant,
    ) {
        let backstop = now + self.cfg.ping_interval + self.cfg.ping_timeout;
        let now_ns = self.clock.now_ns();
        let Some(session) = self.sessions.get_mut(skey) else {
            return;
        };
        session.seen(now_ns);
        if session.waiting().is_some() {
            // Two polls at once: a broken client. Engine.IO closes such a session.
            self.close_session(skey, CloseReason::ProtocolError);
            return self.eio_refuse(key, req, EioError::BadRequest, &cors, now);
        }
        session.cors = cors;
        match session.take_payload(EIO_MAX_PAYLOAD) {
            Some(body) => {
                let bytes = Self::poll_response(req.keep_alive, &session.cors, &body);
                self.respond_polling(key, req, bytes, now);
            }
            // A client whose polling is paused for an upgrade waits for this GET to end.
            None if session.probed() => {
                let bytes = Self::poll_response(req.keep_alive, &session.cors, "6");
                self.respond_polling(key, req, bytes, now);
            }
            None => {
                session.set_waiting(Some(key));
                self.stats.count_http(200);
                if let Some(s) = self.socks.get_mut(key) {
                    s.conn.park(skey, backstop, req.keep_alive);
                }
            }
        }
    }

    /// A POST of client packets.
    pub(super) fn post(
        &mut self,
        key: usize,
        req: &Request,
        skey: usize,
        cors: Vec<String>,
        now: Instant,
    ) {
        let received_ns = self.clock.unix_now_ns();
        let now_ns = self.clock.now_ns();
        if let Some(session) = self.sessions.get_mut(skey) {
            session.seen(now_ns);
        }
        let Ok(body) = std::str::from_utf8(&req.body) else {
            self.close_session(skey, CloseReason::InvalidUtf8);
            return self.eio_refuse(key, req, EioError::BadRequest, &cors, now);
        };
        for packet in engineio::split_payload(body) {
            let Some(session) = self.sessions.get_mut(skey) else {
                break;
            };
            // The same bound as a WebSocket message (there, tungstenite closes with 1009).
            if packet.len() > self.cfg.max_message_bytes {
                self.close_session(skey, CloseReason::MessageTooBig);
                return self.eio_refuse(key, req, EioError::BadRequest, &cors, now);
            }
            match session.rate.check(now) {
                Rate::Allow => {}
                Rate::Refuse { warn } => {
                    self.stats.client_errors += 1;
                    if warn {
                        let err = ClientError::RateLimited(self.cfg.max_messages_per_sec);
                        self.session_event(skey, &protocol::error(&err));
                    }
                    continue;
                }
                Rate::Close => {
                    self.close_session(skey, CloseReason::RateLimited);
                    break;
                }
            }
            if let Err(e) = self.on_eio_packet(skey, None, packet, received_ns) {
                debug!("socket.io polling protocol error: {e}");
                self.close_session(skey, CloseReason::ProtocolError);
                return self.eio_refuse(key, req, EioError::BadRequest, &cors, now);
            }
        }
        let bytes = {
            let extra: Vec<&str> = cors.iter().map(String::as_str).collect();
            http::response_on(req.keep_alive, 200, "text/html", &extra, b"ok")
        };
        self.respond_polling(key, req, bytes, now);
    }

    /// One Engine.IO packet from a session: from a POST (`via` is `None`) or from a WebSocket.
    /// An error is a protocol violation: the caller ends the client (close 1002, or 400).
    pub(super) fn on_eio_packet(
        &mut self,
        skey: usize,
        via: Option<ConnKey>,
        text: &str,
        received_ns: u64,
    ) -> Result<(), engineio::PacketError> {
        let packet = engineio::decode_packet(text)?;
        let Some(session) = self.sessions.get_mut(skey) else {
            return Ok(());
        };
        let from_prober = via.is_some() && session.prober() == via;
        // A socket still probing speaks only the upgrade's packets; the session is the client.
        if from_prober && matches!(packet, Packet::Message(_)) {
            return Ok(());
        }
        match packet {
            Packet::Message(m) => self.on_sio_packet(skey, m, received_ns),
            Packet::Pong(_) => {
                let now_ns = self.clock.now_ns();
                if let Some(rtt) = session.heartbeat.answered(now_ns)
                    && let Some(joined) = &session.joined
                {
                    self.shared.control().hub.round_trip(joined.client, rtt);
                }
            }
            Packet::Ping("probe") if from_prober => {
                let Some(socket) = via else {
                    return Ok(());
                };
                session.mark_probed();
                if let Some(s) = self.socks.get_mut(socket) {
                    s.conn
                        .send(&protocol::text_frame("3probe"), self.cfg.max_queue);
                }
                // From now on the session's polls are answered at once, so the client's paused
                // polling can finish and it sends `5`.
                self.answer_poll(skey, Some("6"));
            }
            // Engine.IO v4 clients never ping; one that does gets a short echo on the
            // transport it used, never a long one queued on its behalf.
            Packet::Ping(data) if data.len() <= MAX_PING_ECHO => {
                let echo = format!("3{data}");
                match via {
                    Some(socket) => {
                        if let Some(s) = self.socks.get_mut(socket) {
                            s.conn
                                .send(&protocol::text_frame(&echo), self.cfg.max_queue);
                        }
                    }
                    None => self.send_packet(skey, &echo),
                }
            }
            Packet::Ping(_) => {}
            Packet::Upgrade => {
                if !from_prober {
                    return Err(engineio::PacketError::BadType('5'));
                }
                let Some((parked, queued)) = session.complete_upgrade() else {
                    return Err(engineio::PacketError::BadType('5'));
                };
                self.complete_upgrade(skey, parked, queued);
            }
            Packet::Noop => {}
            Packet::Close => match session.socket() {
                Some(socket) => {
                    if let Some(s) = self.socks.get_mut(socket) {
                        s.conn.close_ws(
                            CloseCode::Normal,
                            "",
                            CloseReason::ClientClosed,
                            Instant::now(),
                        );
                    }
                    self.after_io(socket);
                }
                None => self.close_session(skey, CloseReason::ClientClosed),
            },
        }
        Ok(())
    }

    /// The client sent `5`: its WebSocket is the session now. A poll still parked is released
    /// with a noop, and the packets it was waiting for follow on the socket, in order.
    pub(super) fn complete_upgrade(
        &mut self,
        skey: usize,
        parked: Option<ConnKey>,
        queued: Vec<Arc<str>>,
    ) {
        let Some(session) = self.sessions.get_mut(skey) else {
            return;
        };
        session.heartbeat.heard();
        let cors = session.cors.clone();
        // No longer a long-polling session: its address's place is free again.
        if session.holds_address_place {
            session.holds_address_place = false;
            shards::lock(&self.shared.session_addresses).remove(session.peer);
        }
        if let Some(kind) = session.counted.as_mut()
            && *kind == ClientKind::SocketIoPolling
        {
            *kind = ClientKind::SocketIoWs;
            self.stats
                .client_moved(ClientKind::SocketIoPolling, ClientKind::SocketIoWs);
        }
        let Some(socket) = session.socket() else {
            return;
        };
        if let Some(ckey) = parked
            && let Some(s) = self.socks.get_mut(ckey)
        {
            s.conn
                .respond(Self::poll_response(false, &cors, "6"), Instant::now());
            self.after_io(ckey);
        }
        if let Some(s) = self.socks.get_mut(socket) {
            // What the session had queued moves over whole; the queue limit applies from here.
            for packet in queued {
                s.conn.send(&protocol::text_frame(&packet), usize::MAX);
            }
            debug!("socket.io upgraded to websocket peer={}", s.conn.peer);
        }
    }

    /// A Socket.IO packet: namespace connects, events, disconnects.
    pub(super) fn on_sio_packet(&mut self, skey: usize, text: &str, received_ns: u64) {
        let packet = match engineio::decode_sio(text) {
            Ok(p) => p,
            Err(e) => {
                self.stats.client_errors += 1;
                let err = ClientError::BadPacket(e.to_string());
                return self.session_event(skey, &protocol::error(&err));
            }
        };
        match packet {
            SioPacket::Connect { nsp, auth } => self.connect_namespace(skey, nsp, auth),
            SioPacket::Disconnect { nsp } => {
                let Some(session) = self.sessions.get_mut(skey) else {
                    return;
                };
                if session.joined.as_ref().is_some_and(|j| j.nsp == nsp)
                    && let Some(joined) = session.joined.take()
                {
                    self.forget(joined.client);
                }
            }
            SioPacket::Event {
                nsp,
                name,
                data,
                ack,
            } => {
                let Some(client) = self
                    .sessions
                    .get(skey)
                    .and_then(|s| s.joined.as_ref())
                    .filter(|j| j.nsp == nsp)
                    .map(|j| j.client)
                else {
                    // Not connected to that namespace: Socket.IO drops such events too.
                    return;
                };
                let result = protocol::decode_event(&name, data.as_ref())
                    .and_then(|m| self.on_client_message(client, m, received_ns));
                match result {
                    // The callback waits for the cluster's answer (`Effect::Answer`).
                    Ok(Decision::Asked(ask)) => {
                        if let Some(id) = ack {
                            self.acks.insert(ask, (skey, id));
                        }
                    }
                    // The callback gets {ok:true} (the change itself arrives as bpmChange,
                    // transport, ...) or the error's {ok:false, code, message}; a client
                    // without one hears of an error by event.
                    Ok(Decision::Done) => self.conclude(client, ack, Ok(())),
                    Err(err) => self.conclude(client, ack, Err(err)),
                }
            }
            SioPacket::Ack => {}
        }
    }

    /// `40[/NAME,]`: the session joins room NAME (`/` is `main`), with the handshake's token
    /// or one in `auth`. One namespace per session: see [`super::eio`].
    pub(super) fn connect_namespace(
        &mut self,
        skey: usize,
        nsp: String,
        auth: Option<serde_json::Value>,
    ) {
        let Some(session) = self.sessions.get_mut(skey) else {
            return;
        };
        if let Some(joined) = &session.joined {
            if joined.nsp != nsp {
                let why = format!(
                    "this connection is in namespace {} already: one room per connection; open \
                     another one for {nsp} (socket.io-client: forceNew: true)",
                    joined.nsp
                );
                let refused = engineio::connect_error_with(
                    &nsp,
                    "Invalid namespace",
                    "one_room_per_connection",
                    &why,
                );
                return self.send_packet(skey, &refused);
            }
            // The same namespace again: join afresh.
            if let Some(old) = session.joined.take() {
                self.forget(old.client);
            }
        }
        let room = match nsp.strip_prefix('/') {
            Some("") => None,
            Some(name) => Some(name.to_string()),
            // Socket.IO namespaces start with `/`.
            None => {
                let refused = engineio::connect_error_with(
                    &nsp,
                    "Invalid namespace",
                    "invalid_room",
                    "a namespace starts with /",
                );
                return self.send_packet(skey, &refused);
            }
        };
        let Some(session) = self.sessions.get(skey) else {
            return;
        };
        let by_auth = auth
            .as_ref()
            .and_then(|a| a.get("token"))
            .and_then(|t| t.as_str())
            .map(str::to_string);
        let tokens: Vec<&str> = session
            .token
            .as_deref()
            .into_iter()
            .chain(by_auth.as_deref())
            .collect();
        let ticks = match TickChoice::from_auth(auth.as_ref()) {
            Ok(by_auth) => by_auth.or(session.ticks),
            Err(e) => {
                let why = e.to_string();
                let refused = engineio::connect_error_with(&nsp, &why, "invalid_ticks", &why);
                return self.send_packet(skey, &refused);
            }
        };
        // A session counts as a client from its first namespace connect on; a full server
        // refuses it here (a stock client reports connect_error, and may try again).
        if session.counted.is_none() && self.clients_everywhere() >= self.cfg.max_clients {
            self.stats.count_refused(RefuseReason::MaxClients);
            let message = format!(
                "server full: {} clients connected; try again later",
                self.clients_everywhere()
            );
            return self.send_packet(skey, &engineio::connect_error(&nsp, &message));
        }
        let Ok(socket_id) = engineio::new_sid() else {
            let refused = engineio::connect_error(&nsp, "cannot create a socket id; try again");
            return self.send_packet(skey, &refused);
        };
        let now_ns = self.clock.now_ns();
        match Self::join_room(
            &self.shared,
            self.shard,
            &mut self.fx,
            &mut self.rooms,
            JoinAsk {
                room: room.as_deref(),
                tokens: &tokens,
                ticks,
            },
            now_ns,
        ) {
            Ok(client) => {
                let named = nsp != "/";
                if let Some(session) = self.sessions.get_mut(skey) {
                    session.joined = Some(Joined {
                        nsp: nsp.clone(),
                        client,
                    });
                    if session.counted.is_none() {
                        let kind = session.kind();
                        session.counted = Some(kind);
                        self.stats.client_opened(kind);
                        self.shared.client_came();
                    }
                }
                self.set_route(
                    client,
                    Via::Eio {
                        session: skey,
                        named,
                    },
                );
                self.send_packet(skey, &engineio::connect_ok_in(&nsp, &socket_id));
                self.settle_hub();
            }
            Err(e) => {
                let code = match e {
                    JoinError::Name(_) => "invalid_room",
                    JoinError::Full { .. } => "too_many_rooms",
                };
                let refused =
                    engineio::connect_error_with(&nsp, &e.to_string(), code, &e.to_string());
                self.send_packet(skey, &refused);
            }
        }
    }

    /// An event to a session, in the namespace it joined (or `/`).
    pub(super) fn session_event(&mut self, skey: usize, event: &Outgoing) {
        let nsp = self
            .sessions
            .get(skey)
            .and_then(|s| s.joined.as_ref())
            .map_or("/".to_string(), |j| j.nsp.clone());
        self.send_packet(skey, &engineio::event_in(&nsp, event.name, &event.data));
    }

    /// Sends a raw Engine.IO packet to a session, on whatever carries it.
    pub(super) fn send_packet(&mut self, skey: usize, packet: &str) {
        let limit = self.cfg.max_queue;
        let Some(session) = self.sessions.get_mut(skey) else {
            return;
        };
        match session.socket() {
            Some(socket) => {
                if let Some(s) = self.socks.get_mut(socket) {
                    s.conn.send(&protocol::text_frame(packet), limit);
                }
            }
            None => {
                if session.push(packet.into(), limit) {
                    self.answer_poll(skey, None);
                } else {
                    self.close_session(skey, CloseReason::SlowConsumer);
                }
            }
        }
    }

    /// Answers the session's parked GET with what is queued (or `fallback` when nothing is).
    pub(super) fn answer_poll(&mut self, skey: usize, fallback: Option<&str>) {
        let Some(session) = self.sessions.get_mut(skey) else {
            return;
        };
        let Some(ckey) = session.waiting() else {
            return;
        };
        let Some(body) = session
            .take_payload(EIO_MAX_PAYLOAD)
            .or_else(|| fallback.map(str::to_string))
        else {
            return;
        };
        session.set_waiting(None);
        if let Some(s) = self.socks.get_mut(ckey) {
            let bytes = Self::poll_response(s.conn.parked_keep_alive(), &session.cors, &body);
            s.conn.answer_parked(bytes, Instant::now());
            self.after_io(ckey);
        }
    }

    /// Ends a session: its client leaves its room, a parked GET gets Engine.IO's close packet
    /// (a stock client then reconnects), its WebSocket (probing or carrying it) is closed, and
    /// later requests with its id get 400. Counted once, here.
    pub(super) fn close_session(&mut self, skey: usize, reason: CloseReason) {
        let Some(session) = self.sessions.try_remove(skey) else {
            return;
        };
        self.sids.remove(&session.sid);
        if session.holds_address_place {
            shards::lock(&self.shared.session_addresses).remove(session.peer);
        }
        if let Some(kind) = session.counted {
            self.client_closed(kind, reason);
        }
        debug!("socket.io session closed reason={}", reason.label());
        if let Some(joined) = &session.joined {
            self.forget(joined.client);
        }
        let now = Instant::now();
        if let Some(ckey) = session.waiting()
            && let Some(s) = self.socks.get_mut(ckey)
        {
            s.conn
                .respond(Self::poll_response(false, &session.cors, "1"), now);
            self.after_io(ckey);
        }
        for socket in [session.prober(), session.socket()].into_iter().flatten() {
            if let Some(s) = self.socks.get_mut(socket) {
                s.owner = Owner::Http;
                let (code, text) = match reason {
                    CloseReason::PingTimeout => (CloseCode::Away, "ping timeout"),
                    CloseReason::SlowConsumer => {
                        (CloseCode::Policy, "too slow: fell behind the ticks")
                    }
                    CloseReason::Shutdown => (CloseCode::Away, "server shutting down"),
                    _ => (CloseCode::Away, "session closed"),
                };
                s.conn.close_ws(code, text, reason, now);
                self.after_io(socket);
            }
        }
    }
}
