//! The one heartbeat rule, for every client on every transport.
//!
//! A client is pinged every `interval`; a ping unanswered for `timeout` means the client is
//! gone. The rule is the same for a `/ws` client (a WebSocket Ping frame carrying its send
//! instant, answered by the browser or library itself) and for an Engine.IO session (the
//! protocol's `2`, answered with `3`, on either transport); only the interval differs, and the
//! caller chooses it. Each answered ping is also a round-trip measurement, which the hub turns
//! into the room's lead ([`crate::lead`]).
//!
//! Pure: instants come in as nanoseconds on the server's monotonic clock.

/// What a client is due now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Beat {
    Quiet,
    /// Send a ping now (stamped `sent_ns`).
    Ping {
        sent_ns: u64,
    },
    /// A ping went unanswered for the timeout.
    Dead,
}

/// One client's heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// When the next ping is due.
    next_ping_ns: u64,
    /// The ping still waiting for its answer.
    outstanding: Option<u64>,
}

impl Heartbeat {
    /// A heartbeat whose first ping is due `first_after_ns` from `now_ns` (for a `/ws` client,
    /// its [`phase`] in the interval; one interval on for Engine.IO, whose clients expect the
    /// negotiated `pingInterval`).
    pub fn new(now_ns: u64, first_after_ns: u64) -> Heartbeat {
        Heartbeat {
            next_ping_ns: now_ns.saturating_add(first_after_ns),
            outstanding: None,
        }
    }

    pub fn due(&mut self, now_ns: u64, interval_ns: u64, timeout_ns: u64) -> Beat {
        match self.outstanding {
            Some(sent) if now_ns.saturating_sub(sent) >= timeout_ns => Beat::Dead,
            Some(_) => Beat::Quiet,
            None if now_ns >= self.next_ping_ns => {
                self.outstanding = Some(now_ns);
                self.next_ping_ns = now_ns.saturating_add(interval_ns);
                Beat::Ping { sent_ns: now_ns }
            }
            None => Beat::Quiet,
        }
    }

    /// The answer to the outstanding ping arrived: returns the round trip.
    pub fn answered(&mut self, now_ns: u64) -> Option<u64> {
        self.outstanding
            .take()
            .map(|sent| now_ns.saturating_sub(sent))
    }

    /// The client proved it is alive some other way (any WebSocket frame): the outstanding
    /// ping no longer counts against it. (Its round trip, if the answer still comes, is
    /// measured from the answer's own payload.)
    pub fn heard(&mut self) {
        self.outstanding = None;
    }

    pub fn waiting(&self) -> bool {
        self.outstanding.is_some()
    }
}

/// Where in `interval_ns` the client with key `key` has its pings: spread evenly over the
/// interval by a multiplicative hash, so that thousands of clients that connected together
/// are not all pinged (and do not all answer) in the same housekeeping pass.
pub fn phase(key: usize, interval_ns: u64) -> u64 {
    // Fibonacci hashing: consecutive keys land far apart; the high half of the 128-bit
    // product scales the 64-bit hash onto the interval.
    let hash = (key as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((u128::from(hash) * u128::from(interval_ns)) >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn pings_every_interval_and_measures_the_answer() {
        let mut h = Heartbeat::new(0, 0);
        assert_eq!(h.due(0, 5 * S, 10 * S), Beat::Ping { sent_ns: 0 });
        assert_eq!(h.due(S, 5 * S, 10 * S), Beat::Quiet);
        assert_eq!(h.answered(S + 40_000_000), Some(S + 40_000_000));
        assert_eq!(h.due(4 * S, 5 * S, 10 * S), Beat::Quiet);
        assert_eq!(h.due(5 * S, 5 * S, 10 * S), Beat::Ping { sent_ns: 5 * S });
    }

    #[test]
    fn an_unanswered_ping_is_death_after_the_timeout() {
        let mut h = Heartbeat::new(0, 20 * S);
        assert_eq!(
            h.due(19 * S, 20 * S, 10 * S),
            Beat::Quiet,
            "first ping one interval on"
        );
        assert_eq!(
            h.due(20 * S, 20 * S, 10 * S),
            Beat::Ping { sent_ns: 20 * S }
        );
        assert_eq!(h.due(29 * S, 20 * S, 10 * S), Beat::Quiet);
        assert_eq!(h.due(30 * S, 20 * S, 10 * S), Beat::Dead);
    }

    #[test]
    fn phases_spread_consecutive_clients_over_the_interval() {
        let interval = 5 * S;
        // 10,000 clients, 20 housekeeping passes of 250 ms: none gets much more than its share.
        let mut passes = [0u32; 20];
        for key in 0..10_000 {
            let p = phase(key, interval);
            assert!(p < interval);
            passes[(p / (interval / 20)) as usize] += 1;
        }
        assert!(
            passes.iter().all(|&n| (350..=650).contains(&n)),
            "{passes:?}"
        );
        assert_eq!(phase(7, 0), 0);
    }

    #[test]
    fn any_sign_of_life_clears_the_ping() {
        let mut h = Heartbeat::new(0, 0);
        h.due(0, S, S);
        assert!(h.waiting());
        h.heard();
        assert_eq!(h.due(2 * S, S, S), Beat::Ping { sent_ns: 2 * S });
        assert_eq!(h.answered(3 * S), Some(S));
        assert_eq!(h.answered(3 * S), None);
    }
}
