//! A Socket.IO client on HTTP long-polling: an Engine.IO session that outlives its requests.
//!
//! This module owns one session's state: the packets waiting for the next GET, which parked GET
//! (if any) is waiting for them, the heartbeat, and the client's rights. It is pure bookkeeping
//! over [`Instant`]s passed in; it touches no socket. The event loop keeps the sessions in a
//! slab, answers the parked GET when [`PollSession::push`] says so, and drops sessions that
//! [`PollSession::health`] calls dead.

use std::collections::VecDeque;
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
    pub fn new(sid: String, may_control: bool, rate: RateLimit, now: Instant) -> PollSession {
        PollSession {
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
        PollSession::new("s".into(), false, RateLimit::new(20), now)
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
