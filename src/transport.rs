//! The transport: whether ticks are played or held back, and from which count.
//!
//! This module owns the rules of `start` and `stop` as pure functions of counts. It reads no
//! clock and sends nothing. The clock never stops: while the transport is stopped the timing
//! thread keeps counting and the loop simply does not send the ticks, so a quantised start
//! lands on a bar line of the same timeline every client already knows.

use std::fmt;

/// Whether ticks are being sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportState {
    Playing,
    Stopped,
}

impl TransportState {
    /// The name used on the wire and in `/stats`.
    pub fn label(self) -> &'static str {
        match self {
            TransportState::Playing => "playing",
            TransportState::Stopped => "stopped",
        }
    }
}

impl fmt::Display for TransportState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Where a `start` may fall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantize {
    /// On the next bar line (count a multiple of ppqn × beats per bar): the default, so every
    /// player comes in on the downbeat together.
    Bar,
    /// On the next beat (count a multiple of ppqn).
    Beat,
    /// On the next tick that leaves clients their lead time.
    None,
}

impl Quantize {
    pub fn parse(name: &str) -> Option<Quantize> {
        match name {
            "bar" => Some(Quantize::Bar),
            "beat" => Some(Quantize::Beat),
            "none" => Some(Quantize::None),
            _ => None,
        }
    }

    /// Ticks between the counts a start may fall on.
    pub fn ticks(self, ppqn: u32, beats_per_bar: u32) -> u64 {
        match self {
            Quantize::Bar => u64::from(ppqn) * u64::from(beats_per_bar),
            Quantize::Beat => u64::from(ppqn),
            Quantize::None => 1,
        }
    }
}

/// The transport's state for every count from the next tick on: `before` until `from_count`,
/// `state` from there. Only one change is ever pending; a newer one replaces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transport {
    before: TransportState,
    state: TransportState,
    from_count: u64,
}

impl Transport {
    /// Playing from tick 0: the server starts playing, as the predecessor did.
    pub fn playing() -> Transport {
        Transport {
            before: TransportState::Playing,
            state: TransportState::Playing,
            from_count: 0,
        }
    }

    /// A transport as stored elsewhere (a cluster's shared timeline).
    pub fn from_parts(before: TransportState, state: TransportState, from_count: u64) -> Transport {
        Transport {
            before,
            state,
            from_count,
        }
    }

    /// The state that holds before [`Self::from_count`].
    pub fn before(&self) -> TransportState {
        self.before
    }

    /// The state that holds from [`Self::from_count`] on (possibly a change still pending).
    pub fn state(&self) -> TransportState {
        self.state
    }

    /// The first count of [`Self::state`].
    pub fn from_count(&self) -> u64 {
        self.from_count
    }

    /// The state at `count`.
    pub fn state_at(&self, count: u64) -> TransportState {
        if count >= self.from_count {
            self.state
        } else {
            self.before
        }
    }

    /// Whether tick `count` is sent.
    pub fn plays(&self, count: u64) -> bool {
        self.state_at(count) == TransportState::Playing
    }

    /// Changes to `state` from tick `from_count` on, where `next` is the next tick to be sent
    /// (`from_count >= next`). What holds at `next` carries on until then, which cancels any
    /// change still pending. Returns false, changing nothing, when `state` is already where
    /// the transport is heading: a second `start` must not move the first one's downbeat.
    pub fn change(&mut self, state: TransportState, from_count: u64, next: u64) -> bool {
        if state == self.state {
            return false;
        }
        let from_count = from_count.max(next);
        self.before = self.state_at(next);
        self.state = state;
        self.from_count = from_count;
        true
    }
}

/// The first count at or after both `next` and `earliest` that is a multiple of `quantum`
/// (`quantum` 0 counts as 1).
pub fn start_count(next: u64, earliest: u64, quantum: u64) -> u64 {
    let quantum = quantum.max(1);
    next.max(earliest).div_ceil(quantum).saturating_mul(quantum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn starts_playing() {
        let t = Transport::playing();
        assert!(t.plays(0));
        assert!(t.plays(1_000_000));
        assert_eq!(t.state(), TransportState::Playing);
    }

    #[test]
    fn stop_then_quantised_start() {
        let mut t = Transport::playing();
        assert!(t.change(TransportState::Stopped, 10, 10));
        assert!(t.plays(9));
        assert!(!t.plays(10));
        // Asked at tick 21 for the next bar of 16 ticks: silent until 32, then playing.
        assert!(t.change(TransportState::Playing, start_count(21, 21, 16), 21));
        assert!(!t.plays(21));
        assert!(!t.plays(31));
        assert!(t.plays(32));
        assert_eq!(t.from_count(), 32);
    }

    #[test]
    fn repeating_a_command_changes_nothing() {
        let mut t = Transport::playing();
        assert!(!t.change(TransportState::Playing, 5, 5));
        assert!(t.change(TransportState::Stopped, 5, 5));
        assert!(!t.change(TransportState::Stopped, 9, 9));
        assert_eq!(t.from_count(), 5);
        assert!(t.change(TransportState::Playing, 16, 9));
        // A second start while the first is pending keeps the first downbeat.
        assert!(!t.change(TransportState::Playing, 32, 10));
        assert_eq!(t.from_count(), 16);
    }

    #[test]
    fn stop_cancels_a_pending_start() {
        let mut t = Transport::playing();
        t.change(TransportState::Stopped, 3, 3);
        t.change(TransportState::Playing, 16, 4);
        assert!(t.change(TransportState::Stopped, 6, 6));
        assert!(!t.plays(16));
        assert!(!t.plays(6));
    }

    #[test]
    fn a_change_never_reaches_back_before_the_next_tick() {
        let mut t = Transport::playing();
        t.change(TransportState::Stopped, 2, 7);
        assert_eq!(t.from_count(), 7);
        assert!(t.plays(6));
    }

    #[test]
    fn quantize_names_and_sizes() {
        assert_eq!(Quantize::parse("bar"), Some(Quantize::Bar));
        assert_eq!(Quantize::parse("beat"), Some(Quantize::Beat));
        assert_eq!(Quantize::parse("none"), Some(Quantize::None));
        assert_eq!(Quantize::parse("Bar"), None);
        assert_eq!(Quantize::Bar.ticks(4, 4), 16);
        assert_eq!(Quantize::Beat.ticks(24, 3), 24);
        assert_eq!(Quantize::None.ticks(24, 3), 1);
    }

    proptest! {
        #[test]
        fn start_count_is_the_first_fitting_multiple(
            next in 0u64..1_000_000, earliest in 0u64..1_000_000, quantum in 0u64..4000,
        ) {
            let c = start_count(next, earliest, quantum);
            let q = quantum.max(1);
            prop_assert!(c >= next && c >= earliest);
            prop_assert_eq!(c % q, 0);
            prop_assert!(c < next.max(earliest) + q);
        }

        /// Whatever the sequence of commands, the ticks already sent are never re-decided and
        /// the state at or after the change's count is the one asked for.
        #[test]
        fn changes_only_affect_the_future(
            commands in proptest::collection::vec((any::<bool>(), 0u64..50, 0u64..5), 1..20),
        ) {
            let mut t = Transport::playing();
            let mut next = 0u64;
            for (play, ahead, advance) in commands {
                let state = if play { TransportState::Playing } else { TransportState::Stopped };
                let at_next = t.state_at(next);
                let before = t;
                let changed = t.change(state, next + ahead, next);
                if changed {
                    prop_assert_eq!(t.state_at(next + ahead), state);
                    if ahead > 0 {
                        prop_assert_eq!(t.state_at(next), at_next);
                    }
                } else {
                    prop_assert_eq!(t, before);
                }
                next += advance;
            }
        }
    }
}
