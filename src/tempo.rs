//! Tempo math: where every tick falls in time.
//!
//! This module owns the arithmetic of the tick schedule and nothing else. It reads no clock and
//! sleeps on nothing: times are integer nanoseconds on an abstract monotonic axis whose zero is
//! the timing thread's epoch (see [`crate::clock::Clock`]).
//!
//! Drift is impossible by construction. A tick's deadline is computed from the schedule's anchor
//! and the exact rational interval, `anchor_ns + floor(k · 60e9 / (bpm · ppqn))`, never by adding
//! a rounded interval to the previous deadline. So the error at tick 10⁷ is the same < 1 ns as at
//! tick 1.

use std::fmt;

use serde::{Serialize, Serializer};

/// Nanoseconds in a minute, times [`Bpm::SCALE`]: the numerator of every interval.
const SCALED_NANOS_PER_MINUTE: u128 = 60_000_000_000 * Bpm::SCALE as u128;

/// The highest tempo the server will ever accept, whatever its flags say.
pub const BPM_CEILING: f64 = 1000.0;

/// A tempo, held exactly as thousandths of a beat per minute.
///
/// Clients send tempos as JSON numbers. Quantising to 0.001 BPM keeps the schedule in integer
/// arithmetic while staying far below anything a musician could hear (at 120 BPM a 0.001 BPM
/// step moves a 16th note by about 1 µs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bpm(u32);

impl Bpm {
    /// Steps per beat-per-minute.
    pub const SCALE: u32 = 1000;

    /// The tempo nearest to `bpm`, or `None` when it is not a finite number in (0, 1000].
    pub fn from_f64(bpm: f64) -> Option<Bpm> {
        if !bpm.is_finite() || bpm <= 0.0 || bpm > BPM_CEILING {
            return None;
        }
        let milli = (bpm * f64::from(Self::SCALE)).round();
        if milli < 1.0 {
            return None;
        }
        Some(Bpm(milli as u32))
    }

    /// A tempo from thousandths of a BPM (at least 0.001).
    pub const fn from_milli(milli: u32) -> Bpm {
        Bpm(if milli == 0 { 1 } else { milli })
    }

    /// A whole-number tempo.
    pub const fn whole(bpm: u32) -> Bpm {
        Bpm(bpm * Self::SCALE)
    }

    /// The tempo in thousandths of a BPM.
    pub const fn milli(self) -> u32 {
        self.0
    }

    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / f64::from(Self::SCALE)
    }

    /// True when the tempo has no fractional part, so it prints as an integer (`120`, not
    /// `120.0`) exactly as the predecessor's JavaScript clients expect.
    pub fn is_whole(self) -> bool {
        self.0.is_multiple_of(Self::SCALE)
    }
}

impl fmt::Display for Bpm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_whole() {
            write!(f, "{}", self.0 / Self::SCALE)
        } else {
            write!(f, "{}", self.as_f64())
        }
    }
}

impl Serialize for Bpm {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.is_whole() {
            s.serialize_u32(self.0 / Self::SCALE)
        } else {
            s.serialize_f64(self.as_f64())
        }
    }
}

/// The deadlines of every tick from an anchor on, at one tempo.
///
/// `deadline_ns(anchor_count + k) = anchor_ns + floor(k · 60e9·SCALE / (bpm_milli · ppqn))`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TickSchedule {
    anchor_count: u64,
    anchor_ns: u64,
    bpm: Bpm,
    ppqn: u32,
}

impl TickSchedule {
    /// A schedule whose tick 0 falls at `start_ns`.
    pub fn new(bpm: Bpm, ppqn: u32, start_ns: u64) -> TickSchedule {
        assert!(ppqn > 0, "ppqn must be positive");
        TickSchedule {
            anchor_count: 0,
            anchor_ns: start_ns,
            bpm,
            ppqn,
        }
    }

    /// A schedule whose tick `anchor_count` falls at `anchor_ns` (a timeline adopted from
    /// elsewhere, e.g. a cluster's).
    pub fn anchored(bpm: Bpm, ppqn: u32, anchor_count: u64, anchor_ns: u64) -> TickSchedule {
        assert!(ppqn > 0, "ppqn must be positive");
        TickSchedule {
            anchor_count,
            anchor_ns,
            bpm,
            ppqn,
        }
    }

    pub fn bpm(&self) -> Bpm {
        self.bpm
    }

    pub fn ppqn(&self) -> u32 {
        self.ppqn
    }

    /// The first count this tempo applies to.
    pub fn anchor_count(&self) -> u64 {
        self.anchor_count
    }

    /// The deadline of [`Self::anchor_count`].
    pub fn anchor_ns(&self) -> u64 {
        self.anchor_ns
    }

    /// Nanoseconds that `ticks` ticks span at this tempo, rounded down.
    fn span_ns(&self, ticks: u64) -> u64 {
        let divisor = u128::from(self.bpm.milli()) * u128::from(self.ppqn);
        let span = u128::from(ticks) * SCALED_NANOS_PER_MINUTE / divisor;
        u64::try_from(span).unwrap_or(u64::MAX)
    }

    /// The exact interval between ticks, in nanoseconds (fractional).
    pub fn interval_ns(&self) -> f64 {
        SCALED_NANOS_PER_MINUTE as f64 / (f64::from(self.bpm.milli()) * f64::from(self.ppqn))
    }

    /// When tick `count` is due. Counts before the anchor belong to an earlier tempo and are
    /// clamped to the anchor: this schedule does not know them.
    pub fn deadline_ns(&self, count: u64) -> u64 {
        let k = count.saturating_sub(self.anchor_count);
        self.anchor_ns.saturating_add(self.span_ns(k))
    }

    /// The first count, at or after the anchor, whose deadline is at or after `ns`.
    ///
    /// With `x = ns − anchor_ns`, `floor(k·S/d) ≥ x` holds exactly when `k ≥ x·d/S` (x is an
    /// integer), so the answer is `anchor_count + ceil(x·d/S)`, in integers.
    pub fn first_count_at_or_after(&self, ns: u64) -> u64 {
        let x = u128::from(ns.saturating_sub(self.anchor_ns));
        let divisor = u128::from(self.bpm.milli()) * u128::from(self.ppqn);
        let k = (x * divisor).div_ceil(SCALED_NANOS_PER_MINUTE);
        self.anchor_count
            .saturating_add(u64::try_from(k).unwrap_or(u64::MAX))
    }

    /// The schedule after a tempo change that takes effect from tick `from_count`.
    ///
    /// The change re-anchors at the last emitted tick, `last_emitted_ns` (the deadline of tick
    /// `from_count − 1`, or `None` before the first tick): tick `from_count` falls one *new*
    /// interval after it, and the new interval holds from there. The caller passes that deadline
    /// rather than letting this schedule recompute it, because after two changes in one
    /// interval it belongs to an older schedule. Should the instant already be past
    /// (`earliest_ns`, normally "now"), the tick is due at `earliest_ns` instead, so a sudden
    /// speed-up never produces a tick that is late before it is born. No tick is moved earlier
    /// than its predecessor, none is doubled, and the count runs on unbroken.
    pub fn retempo(
        &self,
        from_count: u64,
        last_emitted_ns: Option<u64>,
        earliest_ns: u64,
        bpm: Bpm,
    ) -> TickSchedule {
        let next = TickSchedule { bpm, ..*self };
        let due = match last_emitted_ns {
            Some(last) => last.saturating_add(next.span_ns(1)),
            // Nothing emitted yet: the first tick keeps its deadline.
            None => self.deadline_ns(from_count),
        };
        TickSchedule {
            anchor_count: from_count,
            anchor_ns: due.max(earliest_ns),
            bpm,
            ppqn: self.ppqn,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bpm_parses_and_prints_like_javascript() {
        assert_eq!(Bpm::from_f64(120.0), Some(Bpm::whole(120)));
        assert_eq!(Bpm::whole(120).to_string(), "120");
        assert_eq!(Bpm::from_f64(133.3333).map(|b| b.milli()), Some(133_333));
        assert_eq!(Bpm::from_f64(133.3333).unwrap().to_string(), "133.333");
        assert_eq!(serde_json::to_string(&Bpm::whole(140)).unwrap(), "140");
        assert_eq!(
            serde_json::to_string(&Bpm::from_f64(92.5).unwrap()).unwrap(),
            "92.5"
        );
        for bad in [f64::NAN, f64::INFINITY, -1.0, 0.0, 0.0004, 1000.5] {
            assert_eq!(Bpm::from_f64(bad), None, "{bad}");
        }
    }

    #[test]
    fn sixteenths_at_120_bpm_are_125_ms_apart() {
        let s = TickSchedule::new(Bpm::whole(120), 4, 0);
        assert_eq!(s.deadline_ns(1), 125_000_000);
        assert_eq!(s.deadline_ns(8), 1_000_000_000);
        assert_eq!(s.interval_ns(), 125_000_000.0);
    }

    /// The tentpole guarantee: after ten million ticks at an awkward tempo whose interval is not
    /// a whole number of nanoseconds, the schedule is still within a nanosecond of the exact
    /// rational time, and no interval deviates from the ideal by a nanosecond or more.
    #[test]
    fn zero_cumulative_drift_over_ten_million_ticks() {
        let bpm = Bpm::from_f64(133.333).unwrap();
        let ppqn = 24;
        let start = 1_000;
        let s = TickSchedule::new(bpm, ppqn, start);
        let divisor = u128::from(bpm.milli()) * u128::from(ppqn);
        let exact_interval = SCALED_NANOS_PER_MINUTE as f64 / divisor as f64;
        let mut prev = s.deadline_ns(0);
        assert_eq!(prev, start);
        for n in 1..10_000_000u64 {
            let d = s.deadline_ns(n);
            let gap = (d - prev) as f64;
            assert!(
                (gap - exact_interval).abs() < 1.0,
                "tick {n}: interval {gap} ns"
            );
            prev = d;
        }
        let n = 9_999_999u128;
        let exact_ns = u128::from(start) + n * SCALED_NANOS_PER_MINUTE / divisor;
        assert_eq!(u128::from(prev), exact_ns, "cumulative drift at tick {n}");
    }

    #[test]
    fn tempo_change_reanchors_at_the_last_emitted_tick() {
        let s = TickSchedule::new(Bpm::whole(120), 4, 0);
        // Ticks 0..=10 emitted at 125 ms; tick 11 is the first at 150 BPM (100 ms).
        let c = s.retempo(
            11,
            Some(s.deadline_ns(10)),
            s.deadline_ns(10),
            Bpm::whole(150),
        );
        assert_eq!(
            c.deadline_ns(10),
            c.anchor_ns(),
            "earlier counts clamp to the anchor"
        );
        assert_eq!(c.deadline_ns(11), 1_250_000_000 + 100_000_000);
        assert_eq!(c.deadline_ns(21), 1_250_000_000 + 11 * 100_000_000);
        assert_eq!(c.anchor_count(), 11);
    }

    #[test]
    fn speed_up_late_in_an_interval_is_never_due_in_the_past() {
        let s = TickSchedule::new(Bpm::whole(60), 4, 0);
        // Tick 3 emitted at 750 ms; at 950 ms the tempo jumps to 200 BPM (75 ms): the natural
        // deadline, 825 ms, is past, so tick 4 is due now and the new interval runs from there.
        let c = s.retempo(4, Some(s.deadline_ns(3)), 950_000_000, Bpm::whole(200));
        assert_eq!(c.deadline_ns(4), 950_000_000);
        assert_eq!(c.deadline_ns(5), 1_025_000_000);
    }

    #[test]
    fn change_before_the_first_tick_keeps_its_deadline() {
        let s = TickSchedule::new(Bpm::whole(120), 4, 5_000);
        let c = s.retempo(0, None, 0, Bpm::whole(90));
        assert_eq!(c.deadline_ns(0), 5_000);
        assert_eq!(c.deadline_ns(1), 5_000 + 166_666_666);
    }

    #[test]
    fn two_changes_in_one_interval_space_the_next_tick_by_the_last_one() {
        let s = TickSchedule::new(Bpm::whole(120), 4, 0);
        let last = s.deadline_ns(10);
        // Between tick 10 and 11: first to 60 BPM, then to 200 BPM.
        let a = s.retempo(11, Some(last), last + 1_000, Bpm::whole(60));
        let b = a.retempo(11, Some(last), last + 2_000, Bpm::whole(200));
        assert_eq!(b.deadline_ns(11), last + 75_000_000);
        assert_eq!(b.bpm(), Bpm::whole(200));
    }

    #[test]
    fn first_count_at_or_after_finds_the_boundary() {
        let s = TickSchedule::new(Bpm::whole(120), 4, 1_000);
        assert_eq!(s.first_count_at_or_after(0), 0);
        assert_eq!(s.first_count_at_or_after(1_000), 0);
        assert_eq!(s.first_count_at_or_after(1_001), 1);
        assert_eq!(s.first_count_at_or_after(125_001_000), 1);
        assert_eq!(s.first_count_at_or_after(125_001_001), 2);
    }

    proptest! {
        /// The count found is the first at or after the instant: its deadline is not before
        /// it, and its predecessor's (within the schedule) is.
        #[test]
        fn first_count_at_or_after_is_exact(
            milli in 1_000u32..=1_000_000,
            ppqn in 1u32..=960,
            anchor_count in 0u64..1_000_000,
            anchor_ns in 0u64..1_000_000_000_000,
            offset in 0u64..100_000_000_000,
        ) {
            let mut s = TickSchedule::new(Bpm(milli), ppqn, anchor_ns);
            s.anchor_count = anchor_count;
            let at = anchor_ns + offset;
            let n = s.first_count_at_or_after(at);
            prop_assert!(s.deadline_ns(n) >= at);
            if n > anchor_count {
                prop_assert!(s.deadline_ns(n - 1) < at);
            }
        }
    }

    proptest! {
        /// Across any sequence of tempo changes: deadlines strictly increase, every interval
        /// equals its own tempo's interval (to the nanosecond, or longer only where a change
        /// came too late for the natural deadline), and the schedule never drifts from its
        /// latest anchor.
        #[test]
        fn deadlines_stay_continuous_across_changes(
            start_milli in 1_000u32..=1_000_000,
            ppqn in 1u32..=96,
            changes in proptest::collection::vec((1u64..200, 1_000u32..=1_000_000, 0u64..2_000_000_000), 0..8),
        ) {
            let mut s = TickSchedule::new(Bpm(start_milli), ppqn, 0);
            let mut count = 0u64;
            let mut prev: Option<u64> = None;
            let mut segment_start = 0u64;
            for (run, milli, delay) in changes.iter().copied().chain([(50, start_milli, 0)]) {
                for _ in 0..run {
                    let d = s.deadline_ns(count);
                    if let Some(p) = prev {
                        prop_assert!(d > p, "tick {} at {} not after {}", count, d, p);
                        if count > segment_start {
                            let gap = (d - p) as f64;
                            prop_assert!((gap - s.interval_ns()).abs() < 1.0);
                        }
                    }
                    let k = u128::from(count - s.anchor_count());
                    let exact = u128::from(s.anchor_ns())
                        + k * SCALED_NANOS_PER_MINUTE / (u128::from(s.bpm().milli()) * u128::from(ppqn));
                    prop_assert_eq!(u128::from(d), exact);
                    prev = Some(d);
                    count += 1;
                }
                let last = prev.unwrap_or(0);
                let now = last + delay;
                let next = s.retempo(count, prev, now, Bpm(milli));
                let due = next.deadline_ns(count);
                let natural = match prev {
                    Some(last) => last + next.span_ns(1),
                    None => s.deadline_ns(count),
                };
                prop_assert_eq!(due, natural.max(now));
                s = next;
                segment_start = count;
            }
        }
    }
}
