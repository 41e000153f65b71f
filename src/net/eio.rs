//! One Engine.IO session, a Socket.IO client, whatever carries it: long-polling, a WebSocket
//! probing to take over, or the WebSocket that did.
//!
//! This module owns one session's state: which transport it is on ([`Link`], an enum, so a
//! session is in exactly one of those states and an upgrade is a change of variant, not a copy
//! of fields between two records), the packets waiting for the next poll, the heartbeat (the
//! one rule of [`super::heartbeat`]), the rate limit, and the room it joined. It is
//! bookkeeping over instants passed in; it touches no socket. The reactor keeps the sessions in
//! a slab and does what the methods' results say.
//!
//! A session joins one namespace, so one room, at a time. A stock Manager that multiplexes a
//! second namespace over the same connection is refused with the stock `Invalid namespace`
//! connect error (with the reason in its `data`): one Engine.IO connection is one client, with
//! one rate limit, one round trip and one place in the counts. A page that wants two rooms
//! opens two connections (`io(url, { forceNew: true })`).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use crate::connection::RateLimit;
use crate::hub::ClientId;
use crate::stats::ClientKind;
use crate::tick_choice::TickChoice;
use crate::wire::engineio::SEPARATOR;

use super::heartbeat::{Beat, Heartbeat};

/// A connection's key in the reactor's slab.
pub type ConnKey = usize;

/// The key one peer's sessions are counted under: an IPv4 address (also when mapped into
/// IPv6), or an IPv6 /64, the block one subscriber gets; counting single IPv6 addresses would
/// let one host take as many as it has addresses to choose from.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(
                u128::from(v6) & 0xffff_ffff_ffff_ffff_0000_0000_0000_0000,
            )),
        },
        v4 => v4,
    }
}

/// Long-polling sessions held per address ([`address_key`]), against
/// `--max-sessions-per-ip`.
#[derive(Debug, Default)]
pub struct AddressCounts(HashMap<IpAddr, usize>, usize);

impl AddressCounts {
    /// Takes one place for `client`; false when it already holds `limit`.
    pub fn try_add(&mut self, client: IpAddr, limit: usize) -> bool {
        let held = self.0.entry(address_key(client)).or_insert(0);
        if *held >= limit {
            return false;
        }
        *held += 1;
        self.1 += 1;
        true
    }

    /// Gives back one place of `client`'s.
    pub fn remove(&mut self, client: IpAddr) {
        let key = address_key(client);
        if let Some(held) = self.0.get_mut(&key) {
            *held -= 1;
            self.1 -= 1;
            if *held == 0 {
                self.0.remove(&key);
            }
        }
    }

    pub fn held(&self, client: IpAddr) -> usize {
        self.0.get(&address_key(client)).copied().unwrap_or(0)
    }

    /// Places held, all addresses: the long-polling sessions (`--max-polling-sessions`).
    pub fn total(&self) -> usize {
        self.1
    }
}

/// How a session's packets travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// HTTP long-polling: packets wait in the queue for the next GET, and `waiting` is a GET
    /// parked until they come.
    Polling { waiting: Option<ConnKey> },
    /// Still polling, while a WebSocket (`socket`) probes to take over. Once it has probed
    /// (`2probe`), GETs are answered at once so the client's paused polling can finish and it
    /// sends `5`.
    Upgrading {
        waiting: Option<ConnKey>,
        socket: ConnKey,
        probed: bool,
    },
    /// On a WebSocket: packets go straight to it.
    WebSocket { socket: ConnKey },
}

/// The namespace a session joined, and the hub's client for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Joined {
    /// As the client named it (`/`, or `/NAME`): packets to it carry this prefix.
    pub nsp: String,
    pub client: ClientId,
}

/// One Socket.IO client.
#[derive(Debug)]
pub struct EioSession {
    pub sid: String,
    /// The client's address: requests for this session from any other are refused, so a
    /// session id that leaks (a log, a screen share) is no use elsewhere.
    pub peer: IpAddr,
    /// Holds one of its address's `--max-sessions-per-ip` places (a long-polling session,
    /// until it upgrades).
    pub holds_address_place: bool,
    pub link: Link,
    /// Encoded Engine.IO packets (`42[...]`, `2`, …) not yet delivered by a poll.
    queue: VecDeque<Arc<str>>,
    pub heartbeat: Heartbeat,
    pub rate: RateLimit,
    /// The last GET or POST: a polling client that stops polling is gone.
    last_seen_ns: u64,
    /// The control token the handshake request presented (`?token=`, `Authorization`).
    pub token: Option<String>,
    /// The ticks the handshake asked for (`&ticks=`); a CONNECT's `auth.ticks` wins.
    pub ticks: Option<TickChoice>,
    /// The CORS headers for the latest request's origin, for the responses to it.
    pub cors: Vec<String>,
    pub joined: Option<Joined>,
    /// What the session counts as in the stats, once it counts.
    pub counted: Option<ClientKind>,
    pub opened_ns: u64,
}

impl EioSession {
    pub fn new(
        sid: String,
        peer: IpAddr,
        link: Link,
        rate: RateLimit,
        heartbeat: Heartbeat,
        now_ns: u64,
    ) -> EioSession {
        EioSession {
            sid,
            peer,
            holds_address_place: false,
            link,
            queue: VecDeque::new(),
            heartbeat,
            rate,
            last_seen_ns: now_ns,
            token: None,
            ticks: None,
            cors: Vec::new(),
            joined: None,
            counted: None,
            opened_ns: now_ns,
        }
    }

    /// The stats' name for the transport it is on.
    pub fn kind(&self) -> ClientKind {
        match self.link {
            Link::WebSocket { .. } => ClientKind::SocketIoWs,
            _ => ClientKind::SocketIoPolling,
        }
    }

    /// The WebSocket carrying the session, once upgraded (or from the start).
    pub fn socket(&self) -> Option<ConnKey> {
        match self.link {
            Link::WebSocket { socket } => Some(socket),
            _ => None,
        }
    }

    /// The WebSocket probing to take the session over.
    pub fn prober(&self) -> Option<ConnKey> {
        match self.link {
            Link::Upgrading { socket, .. } => Some(socket),
            _ => None,
        }
    }

    /// The GET parked for packets.
    pub fn waiting(&self) -> Option<ConnKey> {
        match self.link {
            Link::Polling { waiting } | Link::Upgrading { waiting, .. } => waiting,
            Link::WebSocket { .. } => None,
        }
    }

    pub fn set_waiting(&mut self, conn: Option<ConnKey>) {
        if let Link::Polling { waiting } | Link::Upgrading { waiting, .. } = &mut self.link {
            *waiting = conn;
        }
    }

    /// Whether a probe has been answered (GETs are then not parked).
    pub fn probed(&self) -> bool {
        matches!(self.link, Link::Upgrading { probed: true, .. })
    }

    /// A WebSocket starts probing. False when another already is: one socket per session.
    pub fn begin_upgrade(&mut self, socket: ConnKey) -> bool {
        match self.link {
            Link::Polling { waiting } => {
                self.link = Link::Upgrading {
                    waiting,
                    socket,
                    probed: false,
                };
                true
            }
            _ => false,
        }
    }

    pub fn mark_probed(&mut self) {
        if let Link::Upgrading { probed, .. } = &mut self.link {
            *probed = true;
        }
    }

    /// The prober went away before the upgrade completed: back to plain polling.
    pub fn abandon_upgrade(&mut self) {
        if let Link::Upgrading { waiting, .. } = self.link {
            self.link = Link::Polling { waiting };
        }
    }

    /// The client sent `5`: the prober becomes the transport. Returns the GET still parked
    /// (to be released) and the packets still queued (to follow on the socket, in order).
    pub fn complete_upgrade(&mut self) -> Option<(Option<ConnKey>, Vec<Arc<str>>)> {
        let Link::Upgrading {
            waiting,
            socket,
            probed: true,
        } = self.link
        else {
            return None;
        };
        self.link = Link::WebSocket { socket };
        Some((waiting, self.queue.drain(..).collect()))
    }

    /// Queues a packet for the next poll. False when `limit` packets are already waiting: the
    /// client stopped polling, and the caller drops the session as a slow consumer.
    pub fn push(&mut self, packet: Arc<str>, limit: usize) -> bool {
        if self.queue.len() >= limit {
            return false;
        }
        self.queue.push_back(packet);
        true
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Everything queued, as one polling payload (packets joined by `\x1e`), at most
    /// `max_bytes` long unless a single packet is longer; `None` when nothing is queued.
    pub fn take_payload(&mut self, max_bytes: usize) -> Option<String> {
        let first = self.queue.pop_front()?;
        let mut payload = String::from(&*first);
        while let Some(next) = self.queue.front() {
            if payload.len() + 1 + next.len() > max_bytes {
                break;
            }
            payload.push(SEPARATOR);
            payload.push_str(next);
            self.queue.pop_front();
        }
        Some(payload)
    }

    /// A request arrived from the client.
    pub fn seen(&mut self, now_ns: u64) {
        self.last_seen_ns = now_ns;
    }

    /// A session that has not connected to a namespace (`40`, which makes it a counted
    /// client) within `timeout` of its handshake is a handshake left hanging, not a client: one
    /// peer could otherwise hold a table full of them with a pong every few seconds.
    pub fn connect_overdue(&self, now_ns: u64, timeout_ns: u64) -> bool {
        self.counted.is_none() && now_ns.saturating_sub(self.opened_ns) >= timeout_ns
    }

    /// The heartbeat, for either transport: a ping every `interval`, death when one goes
    /// unanswered for `timeout`; and, while polling, death when the client has made no
    /// request for `interval + timeout` (a stock client always has a GET outstanding, so that
    /// only happens once it is gone).
    pub fn health(&mut self, now_ns: u64, interval_ns: u64, timeout_ns: u64) -> Beat {
        let polling = !matches!(self.link, Link::WebSocket { .. });
        if polling
            && self.waiting().is_none()
            && now_ns.saturating_sub(self.last_seen_ns) >= interval_ns.saturating_add(timeout_ns)
        {
            return Beat::Dead;
        }
        self.heartbeat.due(now_ns, interval_ns, timeout_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const S: u64 = 1_000_000_000;

    fn session(link: Link) -> EioSession {
        EioSession::new(
            "s".into(),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            link,
            RateLimit::new(20),
            Heartbeat::new(0, 20 * S),
            0,
        )
    }

    #[test]
    fn payload_joins_packets_in_order_within_the_size() {
        let mut s = session(Link::Polling { waiting: None });
        assert_eq!(s.take_payload(100), None);
        for p in ["2", "42[\"tick\",1]", "42[\"tick\",2]"] {
            assert!(s.push(p.into(), 8));
        }
        assert_eq!(s.take_payload(16).as_deref(), Some("2\u{1e}42[\"tick\",1]"));
        assert_eq!(s.take_payload(16).as_deref(), Some("42[\"tick\",2]"));
        assert_eq!(s.queued(), 0);
        // One packet larger than the limit still goes, alone.
        s.push("x".repeat(40).into(), 8);
        assert_eq!(s.take_payload(16).map(|p| p.len()), Some(40));
        assert!(s.push("a".into(), 1));
        assert!(!s.push("b".into(), 1), "full");
    }

    #[test]
    fn an_upgrade_is_one_change_of_state() {
        let mut s = session(Link::Polling { waiting: Some(3) });
        s.push("42[\"tick\",1]".into(), 8);
        assert!(s.begin_upgrade(7));
        assert!(!s.begin_upgrade(8), "one prober at a time");
        assert_eq!(
            (s.prober(), s.waiting(), s.socket()),
            (Some(7), Some(3), None)
        );
        assert_eq!(s.complete_upgrade(), None, "not before the probe");
        s.mark_probed();
        assert!(s.probed());
        let (parked, queued) = s.complete_upgrade().unwrap();
        assert_eq!(parked, Some(3));
        assert_eq!(queued.len(), 1);
        assert_eq!(s.link, Link::WebSocket { socket: 7 });
        assert_eq!(s.kind(), ClientKind::SocketIoWs);
        // A prober that goes away leaves the session polling.
        let mut t = session(Link::Polling { waiting: None });
        t.begin_upgrade(9);
        t.abandon_upgrade();
        assert_eq!(t.link, Link::Polling { waiting: None });
    }

    #[test]
    fn the_heartbeat_is_the_same_on_both_transports() {
        for link in [
            Link::Polling { waiting: Some(1) },
            Link::WebSocket { socket: 1 },
        ] {
            let mut s = session(link);
            assert_eq!(s.health(5 * S, 20 * S, 10 * S), Beat::Quiet);
            assert_eq!(
                s.health(20 * S, 20 * S, 10 * S),
                Beat::Ping { sent_ns: 20 * S }
            );
            assert_eq!(s.heartbeat.answered(20 * S + 30_000_000), Some(30_000_000));
            assert_eq!(
                s.health(40 * S, 20 * S, 10 * S),
                Beat::Ping { sent_ns: 40 * S }
            );
            assert_eq!(s.health(50 * S, 20 * S, 10 * S), Beat::Dead);
        }
    }

    #[test]
    fn a_session_that_never_connects_is_overdue_after_the_handshake_timeout() {
        let mut s = session(Link::Polling { waiting: None });
        assert!(!s.connect_overdue(9 * S, 10 * S));
        assert!(s.connect_overdue(10 * S, 10 * S));
        s.counted = Some(ClientKind::SocketIoPolling);
        assert!(!s.connect_overdue(1_000 * S, 10 * S));
    }

    #[test]
    fn addresses_are_counted_per_ipv4_or_ipv6_slash_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut counts = AddressCounts::default();
        assert!(counts.try_add(ip("192.0.2.1"), 2));
        assert!(
            counts.try_add(ip("::ffff:192.0.2.1"), 2),
            "mapped: the same host"
        );
        assert!(!counts.try_add(ip("192.0.2.1"), 2));
        assert!(counts.try_add(ip("192.0.2.2"), 2), "another host");
        assert!(counts.try_add(ip("2001:db8:1:2::1"), 2));
        assert!(counts.try_add(ip("2001:db8:1:2:ffff::9"), 2));
        assert!(!counts.try_add(ip("2001:db8:1:2:abcd::1"), 2), "same /64");
        assert!(counts.try_add(ip("2001:db8:1:3::1"), 2), "next /64");
        counts.remove(ip("192.0.2.1"));
        assert_eq!(counts.held(ip("192.0.2.1")), 1);
        assert!(counts.try_add(ip("192.0.2.1"), 2));
        counts.remove(ip("192.0.2.2"));
        assert_eq!(counts.held(ip("192.0.2.2")), 0);
        assert_eq!(counts.0.len(), 3, "empty entries are dropped");
    }

    #[test]
    fn a_polling_client_that_stops_polling_is_dead() {
        let mut s = session(Link::Polling { waiting: None });
        s.seen(S);
        assert_eq!(s.health(S + 30 * S, 20 * S, 10 * S), Beat::Dead);
        let mut ws = session(Link::WebSocket { socket: 1 });
        ws.heartbeat.heard();
        assert_ne!(
            ws.health(29 * S, 20 * S, 10 * S),
            Beat::Dead,
            "a WebSocket does not poll"
        );
    }
}
