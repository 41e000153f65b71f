//! `/ws` clients: the upgrade into a room, their messages, and the answers to them.

use std::time::Instant;

use log::debug;
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::hub::{ClientId, Control, Decision};
use crate::lead::{self};
use crate::room::RoomName;
use crate::stats::{ClientKind, CloseReason};
use crate::tick_choice::TickChoice;
use crate::wire::engineio::{self};
use crate::wire::http::{self, Request};
use crate::wire::protocol::{self, ClientError, ClientMessage, Outgoing};

use super::heartbeat::{Heartbeat, phase};

use super::reactor::*;

/// The hub's argument for a room: `None` for `main`.
pub(super) fn room_arg(room: &RoomName) -> Option<&str> {
    (!room.is_main()).then_some(room.as_str())
}

impl Server {
    /// `/ws`: the 101, then the client joins its room and gets its hello and timeline.
    pub(super) fn upgrade(
        &mut self,
        key: usize,
        req: &Request,
        accept: &str,
        room: RoomName,
        ticks: Option<TickChoice>,
    ) {
        let probe_interval = self.ws_probe_interval_ns();
        let Some(s) = self.socks.get_mut(key) else {
            return;
        };
        self.stats.count_http(101);
        s.conn.upgrade(
            http::switching_protocols(accept),
            req.head_len,
            self.cfg.max_message_bytes,
        );
        let token = http::presented_token(req);
        let tokens: Vec<&str> = token.as_deref().into_iter().collect();
        let now_ns = self.clock.now_ns();
        let client = match Self::join_room(
            &self.shared,
            self.shard,
            &mut self.fx,
            &mut self.rooms,
            JoinAsk {
                room: room_arg(&room),
                tokens: &tokens,
                ticks,
            },
            now_ns,
        ) {
            Ok(client) => client,
            Err(e) => {
                // Checked before the upgrade; only a room limit reached in between lands here.
                s.conn.close_ws(
                    CloseCode::Again,
                    &e.to_string(),
                    CloseReason::Shutdown,
                    Instant::now(),
                );
                return;
            }
        };
        self.stats.client_opened(ClientKind::Ws);
        self.shared.client_came();
        s.conn.counted = Some(ClientKind::Ws);
        s.owner = Owner::Ws {
            client,
            heartbeat: Heartbeat::new(now_ns, phase(key, probe_interval)),
        };
        debug!("ws open peer={} room={room}", s.conn.peer);
        self.set_route(client, Via::Ws(key));
        self.settle_hub();
    }

    pub(super) fn ws_probe_interval_ns(&self) -> u64 {
        nanos(self.cfg.ping_interval.min(WS_PROBE_INTERVAL))
    }

    /// A WebSocket message: for a `/ws` client, or an Engine.IO session's socket.
    pub(super) fn on_ws_message(&mut self, key: usize, message: Message) {
        // A ping's receive time: taken before anything else is done with the message.
        let received_ns = self.clock.unix_now_ns();
        let now_ns = self.clock.now_ns();
        let Some(s) = self.socks.get_mut(key) else {
            return;
        };
        match &mut s.owner {
            Owner::Eio(skey) => {
                let skey = *skey;
                match message {
                    Message::Text(text) => {
                        if let Err(e) = self.on_eio_packet(skey, Some(key), &text, received_ns)
                            && let Some(s) = self.socks.get_mut(key)
                        {
                            debug!("socket.io protocol error peer={}: {e}", s.conn.peer);
                            s.conn.close_ws(
                                CloseCode::Protocol,
                                "Engine.IO protocol error",
                                CloseReason::ProtocolError,
                                Instant::now(),
                            );
                        }
                    }
                    Message::Binary(_) => {
                        self.stats.client_errors += 1;
                        self.reply_on_socket(key, &protocol::error(&ClientError::Binary));
                    }
                    _ => {}
                }
            }
            Owner::Ws { client, heartbeat } => {
                let client = *client;
                heartbeat.heard();
                let result = match message {
                    Message::Text(text) => protocol::decode(&text)
                        .and_then(|m| self.on_client_message(client, m, received_ns)),
                    Message::Binary(_) => Err(ClientError::Binary),
                    Message::Pong(payload) => {
                        let max_age = nanos(self.cfg.ping_interval + self.cfg.ping_timeout);
                        if let Some(rtt) = lead::rtt_from_pong(&payload, now_ns, max_age) {
                            self.shared.control().hub.round_trip(client, rtt);
                        }
                        Ok(Decision::Done)
                    }
                    // tungstenite answers pings and handles the close handshake itself.
                    Message::Ping(_) | Message::Close(_) | Message::Frame(_) => Ok(Decision::Done),
                };
                // A change handed to the cluster is concluded when its answer comes.
                if let Err(err) = result {
                    self.conclude(client, None, Err(err));
                }
            }
            Owner::Http => {}
        }
    }

    /// A decoded request from a client, on any protocol.
    pub(super) fn on_client_message(
        &mut self,
        client: ClientId,
        message: ClientMessage,
        received_ns: u64,
    ) -> Result<Decision, ClientError> {
        let control = match message {
            ClientMessage::Ping(t0) => {
                // Stamped as late as possible and written at once, not at the next writable
                // event: the client's offset estimate assumes t2 is the send.
                let pong = protocol::pong(t0, received_ns, self.clock.unix_now_ns());
                self.reply(client, &pong);
                match self.route(client) {
                    Some(Via::Ws(key)) => self.after_io(key),
                    Some(Via::Eio { session, .. }) => {
                        if let Some(socket) = self.sessions.get(session).and_then(|s| s.socket()) {
                            self.after_io(socket);
                        }
                    }
                    None => {}
                }
                return Ok(Decision::Done);
            }
            ClientMessage::SetBpm(value) => Control::SetBpm(value),
            ClientMessage::Start(quantize) => Control::Start(quantize),
            ClientMessage::Stop => Control::Stop,
        };
        let now_ns = self.clock.now_ns();
        let result = self.decide(|hub, fx| hub.control(client, control, now_ns, fx));
        self.settle_hub();
        result
    }

    /// Tells a client how its request ended: through its Socket.IO callback when it passed one
    /// (`{ok:true}`, or `{ok:false, error:{code,message}}`), else an `error` event on failure.
    pub(super) fn conclude(
        &mut self,
        client: ClientId,
        ack: Option<u64>,
        result: Result<(), ClientError>,
    ) {
        if let Err(err) = &result {
            self.stats.client_errors += 1;
            if ack.is_none() {
                self.reply(client, &protocol::error(err));
            }
        }
        let Some(id) = ack else {
            return;
        };
        let Some(Via::Eio { session, .. }) = self.route(client) else {
            return;
        };
        let Some(nsp) = self
            .sessions
            .get(session)
            .and_then(|s| s.joined.as_ref())
            .map(|j| j.nsp.clone())
        else {
            return;
        };
        let arg = match result {
            Ok(()) => r#"{"ok":true}"#.to_string(),
            Err(err) => {
                let e = protocol::error(&err);
                format!(r#"{{"ok":false,"error":{}}}"#, e.data)
            }
        };
        self.send_packet(session, &engineio::ack_in(&nsp, id, &arg));
    }

    /// An event to whoever a WebSocket carries: a `/ws` client, or an Engine.IO session (in
    /// its namespace, or `/` before it joined one).
    pub(super) fn reply_on_socket(&mut self, key: usize, event: &Outgoing) {
        let Some(s) = self.socks.get_mut(key) else {
            return;
        };
        match s.owner {
            Owner::Eio(skey) => {
                let nsp = self
                    .sessions
                    .get(skey)
                    .and_then(|s| s.joined.as_ref())
                    .map_or("/".to_string(), |j| j.nsp.clone());
                let packet = engineio::event_in(&nsp, event.name, &event.data);
                s.conn
                    .send(&protocol::text_frame(&packet), self.cfg.max_queue);
            }
            _ => {
                s.conn.send(&event.frame(), self.cfg.max_queue);
            }
        }
    }
}
