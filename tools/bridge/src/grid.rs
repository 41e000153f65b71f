//! What the plans need to know of the server's timeline, and the MIDI clock grid laid on it.
//!
//! This module owns one piece of arithmetic: where the 24-per-quarter-note MIDI clocks fall
//! between the server's ticks, whatever its ppqn. It reads no clock and computes no tick time
//! itself: tick instants come from the sync library's timeline through [`TimelineView`], so the
//! bridge and every other client share one implementation of the server's schedule.
//!
//! Clock `m` (counted from the server's count 0, as the server counts ticks) sits at tick
//! position `m · ppqn / 24`. Between ticks `n` and `n + 1` it is placed by integer
//! interpolation, `t(n) + (t(n+1) − t(n)) · r / 24` with `r = m · ppqn mod 24`, so it inherits
//! the timeline's exactness: nothing is accumulated, and a clock that coincides with a tick
//! (every clock at ppqn 24, every 6th at ppqn 4) falls on the tick's instant to the nanosecond.

/// Timing clocks per quarter note, fixed by the MIDI specification.
pub const CLOCKS_PER_BEAT: u64 = 24;
/// Timing clocks per 16th note: one MIDI beat, the unit of the Song Position Pointer.
pub const CLOCKS_PER_16TH: u64 = 6;

/// The server's timeline, as the plans read it. Implemented for the sync library's `Timeline`
/// (see `follow.rs`); the plans never compute a tick time themselves.
pub trait TimelineView {
    /// When tick `count` is due, in server unix nanoseconds.
    fn tick_time_ns(&self, count: u64) -> i64;
    /// The first count whose tick is due at or after `server_ns`.
    fn first_count_at_or_after(&self, server_ns: i64) -> u64;
    /// Whether the transport plays tick `count` (the server sends it).
    fn plays(&self, count: u64) -> bool;
    fn ppqn(&self) -> u32;
    fn beats_per_bar(&self) -> u32;
    /// The tempo in beats per minute.
    fn bpm(&self) -> f64;
    /// The first tick at this timeline's tempo (the `count` of the `timeline` event).
    fn anchor_count(&self) -> u64;
    /// The count from which the transport's current state holds.
    fn transport_from(&self) -> u64;
    /// The transport's state from [`Self::transport_from`] on.
    fn transport_playing(&self) -> bool;
}

/// When MIDI clock `m` is due, in server nanoseconds.
pub fn clock_time<T: TimelineView>(tl: &T, m: u64) -> i64 {
    let pos = u128::from(m) * u128::from(tl.ppqn().max(1));
    let n = u64::try_from(pos / u128::from(CLOCKS_PER_BEAT)).unwrap_or(u64::MAX);
    let r = (pos % u128::from(CLOCKS_PER_BEAT)) as i128;
    let at = tl.tick_time_ns(n);
    if r == 0 {
        return at;
    }
    let next = tl.tick_time_ns(n.saturating_add(1));
    let step = i128::from(next) - i128::from(at);
    // floor division, so a clock never lands before the exact instant's nanosecond.
    let offset = (step * r).div_euclid(i128::from(CLOCKS_PER_BEAT as i64));
    i64::try_from(i128::from(at) + offset).unwrap_or(i64::MAX)
}

/// The tick at or before clock `m` (the tick whose 16th, or beat, the clock belongs to).
pub fn tick_of_clock(ppqn: u32, m: u64) -> u64 {
    let pos = u128::from(m) * u128::from(ppqn.max(1)) / u128::from(CLOCKS_PER_BEAT);
    u64::try_from(pos).unwrap_or(u64::MAX)
}

/// The first clock at or after tick `count`: the clock a start on that tick lands on.
pub fn clock_of_tick(ppqn: u32, count: u64) -> u64 {
    let pos = (u128::from(count) * u128::from(CLOCKS_PER_BEAT)).div_ceil(u128::from(ppqn.max(1)));
    u64::try_from(pos).unwrap_or(u64::MAX)
}

/// The first clock due at or after `server_ns`.
pub fn first_clock_at_or_after<T: TimelineView>(tl: &T, server_ns: i64) -> u64 {
    let n = tl.first_count_at_or_after(server_ns);
    // Tick n − 1 is before `server_ns`, so the answer is after the last clock at or before it:
    // at most 24 / ppqn + 1 clocks to walk.
    let mut m = tick_clock_floor(tl.ppqn(), n.saturating_sub(1));
    while clock_time(tl, m) < server_ns {
        m += 1;
    }
    m
}

/// The last clock at or before tick `count`.
fn tick_clock_floor(ppqn: u32, count: u64) -> u64 {
    let pos = u128::from(count) * u128::from(CLOCKS_PER_BEAT) / u128::from(ppqn.max(1));
    u64::try_from(pos).unwrap_or(u64::MAX)
}

/// Whether the transport plays at clock `m`: the tick the clock belongs to is played.
pub fn clock_plays<T: TimelineView>(tl: &T, m: u64) -> bool {
    tl.plays(tick_of_clock(tl.ppqn(), m))
}

#[cfg(test)]
pub(crate) mod fake {
    //! A timeline for unit tests, built from the server's own `timeline` event.
    pub use crate::follow::tests_support::{timeline, timeline_bars};
}

#[cfg(test)]
mod tests {
    use super::fake::timeline;
    use super::*;

    #[test]
    fn at_ppqn_4_six_clocks_share_each_16th_exactly() {
        // 120 BPM, ppqn 4: a 16th is 125 ms, a clock 20.833… ms.
        let tl = timeline(120.0, 4, 0, 1_000_000_000, true, 0);
        for n in 0..100u64 {
            let t = tl.tick_time_ns(n);
            assert_eq!(clock_time(&tl, 6 * n), t, "clock on tick {n}");
            let next = tl.tick_time_ns(n + 1);
            for r in 1..6 {
                let want = t + (next - t) * r as i64 / 6;
                assert_eq!(clock_time(&tl, 6 * n + r), want);
            }
        }
        // 24 clocks span exactly one beat, with no accumulated error after a million beats.
        let beat = 1_000_000u64;
        assert_eq!(clock_time(&tl, 24 * beat), tl.tick_time_ns(4 * beat));
        assert_eq!(
            clock_time(&tl, 24 * beat) - clock_time(&tl, 0),
            beat as i64 * 500_000_000
        );
    }

    #[test]
    fn at_ppqn_24_one_clock_per_tick_and_at_96_one_per_four() {
        let tl = timeline(133.0, 24, 0, 5_000_000_000, true, 0);
        for n in 0..500 {
            assert_eq!(clock_time(&tl, n), tl.tick_time_ns(n));
        }
        let tl = timeline(97.5, 96, 0, 5_000_000_000, true, 0);
        for m in 0..500 {
            assert_eq!(clock_time(&tl, m), tl.tick_time_ns(4 * m));
        }
    }

    #[test]
    fn odd_ppqn_places_clocks_between_ticks() {
        // ppqn 5: clock 1 is at tick position 5/24.
        let tl = timeline(100.0, 5, 0, 0, true, 0);
        let (t0, t1) = (tl.tick_time_ns(0), tl.tick_time_ns(1));
        assert_eq!(clock_time(&tl, 1), t0 + (t1 - t0) * 5 / 24);
        assert_eq!(clock_of_tick(5, 1), 5); // 24/5 = 4.8 → the fifth clock
        assert_eq!(tick_of_clock(5, 5), 1);
        assert_eq!(tick_of_clock(5, 4), 0);
        assert_eq!(clock_time(&tl, 24), tl.tick_time_ns(5));
    }

    #[test]
    fn first_clock_at_or_after_inverts_clock_time() {
        for ppqn in [1, 2, 3, 4, 5, 7, 24, 48, 96, 960] {
            let tl = timeline(123.456, ppqn, 0, 1_700_000_000_000_000_000, true, 0);
            for m in [0u64, 1, 5, 6, 23, 24, 25, 1000, 12345] {
                let t = clock_time(&tl, m);
                assert_eq!(first_clock_at_or_after(&tl, t), m, "ppqn {ppqn} clock {m}");
                assert_eq!(
                    first_clock_at_or_after(&tl, t + 1),
                    m + 1,
                    "ppqn {ppqn} clock {m}"
                );
                if m > 0 {
                    assert_eq!(
                        first_clock_at_or_after(&tl, t - 1),
                        m,
                        "ppqn {ppqn} clock {m}"
                    );
                }
            }
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// For any tempo, ppqn and anchor: clocks are strictly increasing, every 24th is
            /// the tick that begins its beat, and the inverse finds each clock again.
            #[test]
            fn clocks_are_ordered_exact_on_beats_and_invertible(
                bpm_milli in 1_000u32..1_000_000,
                ppqn in 1u32..=960,
                anchor_count in 0u64..1_000_000,
                anchor_us in 0i64..2_000_000_000_000_000,
                m in 0u64..10_000_000,
            ) {
                let tl = timeline(f64::from(bpm_milli) / 1000.0, ppqn, anchor_count, anchor_us * 1000, true, 0);
                let (a, b) = (clock_time(&tl, m), clock_time(&tl, m + 1));
                prop_assert!(a < b, "clock {m}: {a} then {b}");
                let beat = m / 24;
                prop_assert_eq!(clock_time(&tl, beat * 24), tl.tick_time_ns(beat * u64::from(ppqn)));
                prop_assert_eq!(first_clock_at_or_after(&tl, a), m);
                prop_assert_eq!(first_clock_at_or_after(&tl, a + 1), m + 1);
                // A start on tick n lands on a clock at or after it, and before the next one
                // (clocks are finer than ticks at ppqn <= 24).
                let n = tick_of_clock(ppqn, m);
                prop_assert!(clock_of_tick(ppqn, n) <= m);
                prop_assert!(clock_time(&tl, clock_of_tick(ppqn, n)) >= tl.tick_time_ns(n));
            }
        }
    }
}
