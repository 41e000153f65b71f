//! A Socket.IO client on HTTP long-polling: an Engine.IO session that outlives its requests.
//!
//! This module owns one session's state: the packets waiting for the next GET, which parked GET
//! (if any) is waiting for them, the heartbeat, the client's rights and the address it belongs
//! to; and the rules that keep one peer from filling the session table ([`AddressCounts`],
//! [`PollSession::connect_overdue`]). It is pure bookkeeping over [`Instant`]s passed in; it
//! touches no socket. The event loop keeps the sessions in a slab, answers the parked GET when
//! [`PollSession::push`] says so, and drops sessions that [`PollSession::health`] calls dead.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::connection::RateLimit;
use crate::engineio::SEPARATOR;

/// One long-polling session.
#[derive(Debug)]
pub struct PollSession {
    pub sid: String,
    /// Encoded Engine.IO packets (`42[...]`, `2`, …) not yet delivered.
    queue: VecDeque<Arc<str>>,
    /// The connection key of a GET parked until there is something to send.
    pub waiting: Option<usize>,
    /// Connected to the default namespace: only then does it get events.
    pub joined: bool,
    pub may_control: bool,
    pub rate: RateLimit,
    /// The last GET or POST: a client that stops polling is gone.
    last_seen: Instant,
    ping_sent: Option<Instant>,
    last_ping: Instant,
    /// The one WebSocket (its connection key) asking to take this session over, from its
    /// upgrade request on. A session has at most one; it is closed with the session.
    pub prober: Option<usize>,
    /// That WebSocket has probed (`2probe`): GETs are no longer parked, so the client's paused
    /// polling can finish and it can send `5`.
    pub probed: bool,
    /// The CORS headers for the latest request's origin, for the responses to it.
    pub cors: Vec<String>,
    /// The client's address: requests for this session from any other are refused, so a
    /// session id that leaks (a log, a screen share) is no use elsewhere.
    pub client: IpAddr,
    created: Instant,
    /// Counted as a client (against `--max-clients`), which it is from its first Socket.IO
    /// connect (`40`) on; until then it is only a handshake.
    pub counted: bool,
}

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

/// Sessions held per address ([`address_key`]), against `--max-sessions-per-ip`.
#[derive(Debug, Default)]
pub struct AddressCounts(HashMap<IpAddr, usize>);

impl AddressCounts {
    /// Takes one place for `client`; false when it already holds `limit`.
    pub fn try_add(&mut self, client: IpAddr, limit: usize) -> bool {
        let held = self.0.entry(address_key(client)).or_insert(0);
        if *held >= limit {
            return false;
        }
        *held += 1;
        true
    }

    /// Gives back one place of `client`'s.
    pub fn remove(&mut self, client: IpAddr) {
        let key = address_key(client);
        if let Some(held) = self.0.get_mut(&key) {
            *held -= 1;
            if *held == 0 {
                self.0.remove(&key);
            }
        }
    }

    pub fn held(&self, client: IpAddr) -> usize {
        self.0.get(&address_key(client)).copied().unwrap_or(0)
    }
}

/// What the heartbeat asks of the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Fine,
    /// Queue an Engine.IO ping (`2`).
    Ping,
    /// No pong within the timeout, or no request for longer than a client ever waits: close.
    Dead,
}

impl PollSession {
    pub fn new(
        sid: String,
        client: IpAddr,
        may_control: bool,
        rate: RateLimit,
        now: Instant,
    ) -> PollSession {
        PollSession {
            client,
            created: now,
            counted: false,
            sid,
            queue: VecDeque::new(),
            waiting: None,
            joined: false,
            may_control,
            rate,
            last_seen: now,
            ping_sent: None,
            last_ping: now,
            prober: None,
            probed: false,
            cors: Vec::new(),
        }
    }

    /// Queues a packet. False when `limit` packets are already waiting: the client stopped
    /// polling, and the caller drops the session as a slow consumer.
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

    /// Drains the queue in order, for the WebSocket that takes the session over.
    pub fn take_all(&mut self) -> Vec<Arc<str>> {
        self.queue.drain(..).collect()
    }

    /// A request arrived from the client.
    pub fn seen(&mut self, now: Instant) {
        self.last_seen = now;
    }

    /// The client answered the ping.
    pub fn pong(&mut self) {
        self.ping_sent = None;
    }

    /// A session that has not connected to the namespace (`40`) within `timeout` of its
    /// handshake is a handshake left hanging, not a client: one peer could otherwise hold a
    /// table full of them with a pong every few seconds.
    pub fn connect_overdue(&self, now: Instant, timeout: Duration) -> bool {
        !self.counted && now.duration_since(self.created) >= timeout
    }

    /// The heartbeat: a ping every `interval`; dead when a ping goes unanswered for
    /// `timeout`, or when the client has made no request for `interval + timeout` (a stock
    /// client always has a GET outstanding, so that only happens once it is gone).
    pub fn health(&mut self, now: Instant, interval: Duration, timeout: Duration) -> Health {
        if let Some(sent) = self.ping_sent
            && now.duration_since(sent) >= timeout
        {
            return Health::Dead;
        }
        if self.waiting.is_none() && now.duration_since(self.last_seen) >= interval + timeout {
            return Health::Dead;
        }
        if self.ping_sent.is_none() && now.duration_since(self.last_ping) >= interval {
            self.ping_sent = Some(now);
            self.last_ping = now;
            return Health::Ping;
        }
        Health::Fine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(now: Instant) -> PollSession {
        let client = IpAddr::from([127, 0, 0, 1]);
        PollSession::new("s".into(), client, false, RateLimit::new(20), now)
    }

    #[test]
    fn a_session_that_never_connects_is_overdue_after_the_handshake_timeout() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(10);
        let mut s = session(t0);
        assert!(!s.connect_overdue(t0 + Duration::from_secs(9), timeout));
        assert!(s.connect_overdue(t0 + timeout, timeout));
        s.counted = true;
        assert!(!s.connect_overdue(t0 + timeout * 100, timeout));
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
    fn payload_joins_packets_in_order_within_the_size() {
        let mut s = session(Instant::now());
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
    }

    #[test]
    fn a_full_queue_refuses() {
        let mut s = session(Instant::now());
        assert!(s.push("a".into(), 2));
        assert!(s.push("b".into(), 2));
        assert!(!s.push("c".into(), 2));
        assert_eq!(s.take_all().len(), 2);
    }

    #[test]
    fn heartbeat_pings_then_gives_up() {
        let t0 = Instant::now();
        let (interval, timeout) = (Duration::from_secs(20), Duration::from_secs(10));
        let mut s = session(t0);
        s.waiting = Some(1);
        assert_eq!(
            s.health(t0 + Duration::from_secs(5), interval, timeout),
            Health::Fine
        );
        assert_eq!(s.health(t0 + interval, interval, timeout), Health::Ping);
        assert_eq!(
            s.health(t0 + interval + Duration::from_secs(1), interval, timeout),
            Health::Fine
        );
        s.pong();
        assert_eq!(s.health(t0 + interval * 2, interval, timeout), Health::Ping);
        assert_eq!(
            s.health(t0 + interval * 2 + timeout, interval, timeout),
            Health::Dead
        );
    }

    #[test]
    fn a_client_that_stops_polling_is_dead() {
        let t0 = Instant::now();
        let (interval, timeout) = (Duration::from_secs(20), Duration::from_secs(10));
        let mut s = session(t0);
        s.seen(t0 + Duration::from_secs(1));
        let later = t0 + Duration::from_secs(1) + interval + timeout;
        assert_eq!(s.health(later, interval, timeout), Health::Dead);
    }
}
