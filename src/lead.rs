//! How far ahead a change is scheduled: the lead, from the round trips the server measures.
//!
//! This module owns the statistic and the bounds. It reads no clock and sends no ping: the
//! I/O layer measures each client's round trip (a WebSocket Ping carrying a timestamp, or an
//! Engine.IO heartbeat) and records it in the client's [`RoundTrips`]; the hub asks
//! [`LeadPolicy::lead_ns`] for a room's lead when a change is planned.
//!
//! **The rule.** A change must reach every member of the room before the first tick it
//! affects, early enough for that member to schedule the tick by the new rule:
//!
//! ```text
//! lead = clamp(max over members (max of that member's recent round trips) + margin,
//!              floor, ceiling)          or --change-lead-ms, when given
//! ```
//!
//! * **The whole round trip, not half.** A client hears of a change one *downstream* delay
//!   after it is sent. Round-trip sync cannot see how a path splits, and on an asymmetric
//!   path (20 ms up, 100 ms down) half the round trip (60 ms) falls short of the downstream
//!   delay; the whole round trip never does.
//! * **The recent maximum, per member.** A path with jitter or bursts delivers some messages
//!   late; the change is one message and must not be the late one. The largest of the last
//!   [`WINDOW`] samples covers the jitter and the bursts the member has shown lately, and
//!   forgets a stall once it has aged out of the window (about 40 s at one probe every 5 s).
//!   A percentile would need far more samples per client than a few pings give.
//! * **The maximum over members.** Everyone must hear it first: the farthest member decides.
//! * **The margin** covers what happens on the client after it hears: its scheduler commits
//!   sounds `lookahead` ahead (conductor.js: 100 ms, re-checked every 25 ms), and its audio
//!   output adds its latency (tens of ms; more over Bluetooth). [`MARGIN`] is 150 ms, so a
//!   LAN gets the 150 ms a start has always had.
//! * **The ceiling** keeps one member behind a terrible path from making every change in
//!   the room wait seconds: at most [`CEILING`] (1 s). That member may hear late; the others
//!   do not pay for it.
//! * **The floor** is what a LAN needs ([`FLOOR`], the margin itself), raised in a cluster to
//!   `--cluster-lead-ms`: the other instances' members, whose round trips this instance does
//!   not see, and Redis's own propagation, must fit in it.

/// Round-trip samples kept per client.
pub const WINDOW: usize = 8;
/// What a client needs after hearing of a change: scheduling lookahead plus output latency.
pub const MARGIN_NS: u64 = 150_000_000;
/// The least lead ever used without an override: a LAN's round trip is below a millisecond.
pub const FLOOR_NS: u64 = MARGIN_NS;
/// The most lead ever used without an override.
pub const CEILING_NS: u64 = 1_000_000_000;

/// One client's recent round trips, in microseconds (a round trip over 71 minutes is
/// recorded as that).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoundTrips {
    samples: [u32; WINDOW],
    /// Samples recorded so far, saturating at [`WINDOW`].
    len: u8,
    /// Where the next sample goes.
    next: u8,
}

impl RoundTrips {
    pub fn record(&mut self, rtt_ns: u64) {
        let us = u32::try_from(rtt_ns / 1_000).unwrap_or(u32::MAX);
        self.samples[usize::from(self.next)] = us;
        self.next = ((usize::from(self.next) + 1) % WINDOW) as u8;
        self.len = (usize::from(self.len) + 1).min(WINDOW) as u8;
    }

    /// The largest recent round trip, or `None` before the first sample.
    pub fn recent_max_ns(&self) -> Option<u64> {
        self.samples[..usize::from(self.len)]
            .iter()
            .max()
            .map(|&us| u64::from(us) * 1_000)
    }

    /// The latest round trip, or `None` before the first sample.
    pub fn latest_ns(&self) -> Option<u64> {
        (self.len > 0).then(|| {
            let last = (usize::from(self.next) + WINDOW - 1) % WINDOW;
            u64::from(self.samples[last]) * 1_000
        })
    }
}

/// The bounds a lead is computed within, or the fixed lead an operator chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeadPolicy {
    /// `--change-lead-ms`: when set, every change is scheduled exactly this far ahead.
    pub fixed_ns: Option<u64>,
    pub margin_ns: u64,
    pub floor_ns: u64,
    pub ceiling_ns: u64,
}

impl Default for LeadPolicy {
    fn default() -> Self {
        LeadPolicy {
            fixed_ns: None,
            margin_ns: MARGIN_NS,
            floor_ns: FLOOR_NS,
            ceiling_ns: CEILING_NS,
        }
    }
}

impl LeadPolicy {
    /// The policy for a server started with `--change-lead-ms` (`fixed_ms`) and, in a
    /// cluster, `--cluster-lead-ms` (`cluster_floor_ms`), which raises the floor (and the
    /// ceiling with it, should the floor exceed it).
    pub fn new(fixed_ms: Option<u64>, cluster_floor_ms: Option<u64>) -> LeadPolicy {
        let mut policy = LeadPolicy {
            fixed_ns: fixed_ms.map(|ms| ms.saturating_mul(1_000_000)),
            ..LeadPolicy::default()
        };
        if let Some(ms) = cluster_floor_ms {
            policy.floor_ns = policy.floor_ns.max(ms.saturating_mul(1_000_000));
            policy.ceiling_ns = policy.ceiling_ns.max(policy.floor_ns);
        }
        policy
    }

    /// The lead for a room whose farthest member's recent round trip is `worst_rtt_ns`
    /// (`None`: no member measured yet).
    pub fn lead_ns(&self, worst_rtt_ns: Option<u64>) -> u64 {
        if let Some(fixed) = self.fixed_ns {
            return fixed;
        }
        worst_rtt_ns
            .unwrap_or(0)
            .saturating_add(self.margin_ns)
            .clamp(self.floor_ns, self.ceiling_ns)
    }
}

/// The payload of a WebSocket Ping the server sends to measure a round trip: its send
/// instant (ns on the server's monotonic clock) as 8 big-endian bytes. A client's Pong
/// echoes it (RFC 6455 §5.5.3), so no state is kept per ping and a stale or forged Pong can
/// only be told apart by [`rtt_from_pong`]'s bounds.
pub fn ping_payload(sent_ns: u64) -> [u8; 8] {
    sent_ns.to_be_bytes()
}

/// The round trip a Pong reports, if its payload is one of ours: 8 bytes naming an instant
/// not after `now_ns` and no older than `max_age_ns` (anything else is ignored: a Pong the
/// client sent unasked, or one echoing something else).
pub fn rtt_from_pong(payload: &[u8], now_ns: u64, max_age_ns: u64) -> Option<u64> {
    let bytes: [u8; 8] = payload.try_into().ok()?;
    let sent = u64::from_be_bytes(bytes);
    let rtt = now_ns.checked_sub(sent)?;
    (rtt <= max_age_ns).then_some(rtt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn the_window_keeps_the_recent_maximum_and_forgets_old_spikes() {
        let mut r = RoundTrips::default();
        assert_eq!(r.recent_max_ns(), None);
        r.record(300 * MS);
        for _ in 0..WINDOW - 1 {
            r.record(40 * MS);
        }
        assert_eq!(r.recent_max_ns(), Some(300 * MS));
        assert_eq!(r.latest_ns(), Some(40 * MS));
        r.record(41 * MS);
        assert_eq!(r.recent_max_ns(), Some(41 * MS), "the spike aged out");
    }

    #[test]
    fn a_lan_gets_the_floor_and_a_far_client_its_round_trip_plus_the_margin() {
        let p = LeadPolicy::default();
        assert_eq!(p.lead_ns(None), 150 * MS);
        assert_eq!(p.lead_ns(Some(MS / 2)), 150 * MS + MS / 2);
        assert_eq!(p.lead_ns(Some(300 * MS)), 450 * MS);
        assert_eq!(p.lead_ns(Some(5_000 * MS)), 1_000 * MS, "bounded");
    }

    #[test]
    fn the_override_wins_and_a_cluster_raises_the_floor() {
        let fixed = LeadPolicy::new(Some(40), Some(250));
        assert_eq!(fixed.lead_ns(Some(300 * MS)), 40 * MS);
        let cluster = LeadPolicy::new(None, Some(250));
        assert_eq!(cluster.lead_ns(None), 250 * MS);
        assert_eq!(cluster.lead_ns(Some(200 * MS)), 350 * MS);
        let slow = LeadPolicy::new(None, Some(3_000));
        assert_eq!(slow.lead_ns(Some(10 * MS)), 3_000 * MS);
    }

    #[test]
    fn pongs_name_their_ping() {
        let payload = ping_payload(5 * MS);
        assert_eq!(rtt_from_pong(&payload, 7 * MS, 60_000 * MS), Some(2 * MS));
        assert_eq!(
            rtt_from_pong(&payload, 4 * MS, 60_000 * MS),
            None,
            "from the future"
        );
        assert_eq!(
            rtt_from_pong(&payload, 70_000 * MS, 60_000 * MS),
            None,
            "too old"
        );
        assert_eq!(rtt_from_pong(b"", 7 * MS, 60_000 * MS), None);
        assert_eq!(rtt_from_pong(b"hello", 7 * MS, 60_000 * MS), None);
    }

    proptest! {
        #[test]
        fn recent_max_is_the_max_of_the_last_window(samples in proptest::collection::vec(0u64..10_000_000_000, 1..40)) {
            let mut r = RoundTrips::default();
            for &s in &samples {
                r.record(s);
            }
            let tail = &samples[samples.len().saturating_sub(WINDOW)..];
            let expected = tail.iter().map(|s| s / 1_000 * 1_000).max();
            prop_assert_eq!(r.recent_max_ns(), expected);
            prop_assert_eq!(r.latest_ns(), samples.last().map(|s| s / 1_000 * 1_000));
        }

        #[test]
        fn the_lead_stays_within_its_bounds(rtt in proptest::option::of(0u64..u64::MAX), floor in 0u64..5_000) {
            let p = LeadPolicy::new(None, Some(floor));
            let lead = p.lead_ns(rtt);
            prop_assert!(lead >= p.floor_ns && lead <= p.ceiling_ns);
            if let Some(rtt) = rtt {
                prop_assert!(lead >= rtt.saturating_add(MARGIN_NS).min(p.ceiling_ns));
            }
        }
    }
}
