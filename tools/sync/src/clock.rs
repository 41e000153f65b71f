//! Local clocks: where a client reads "now".
//!
//! This module owns the notion of a device's own monotonic clock, in nanoseconds. A
//! [`RealClock`] is this process's monotonic clock; an [`EmulatedClock`] is the same clock
//! offset by a chosen amount and running fast or slow by a chosen rate, so that one host can
//! play many devices whose clocks disagree, while still knowing the truth (tests, the probe's
//! `--sync` mode). Nothing here knows the server.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::error::SyncError;

/// A monotonic clock in nanoseconds. Its zero is arbitrary; only differences and the mapping
/// to the server's clock matter.
pub trait LocalClock: Send + Sync {
    fn now_ns(&self) -> i64;
}

/// The process-wide epoch of [`RealClock`], and the unix time it was pinned to.
fn epoch() -> &'static (Instant, i64) {
    static EPOCH: OnceLock<(Instant, i64)> = OnceLock::new();
    EPOCH.get_or_init(|| {
        let at = Instant::now();
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        (at, unix)
    })
}

/// This process's monotonic clock, ns since the first use of any `RealClock` (never negative).
#[derive(Clone, Copy, Debug, Default)]
pub struct RealClock;

impl RealClock {
    pub fn now_ns(&self) -> i64 {
        i64::try_from(epoch().0.elapsed().as_nanos()).unwrap_or(i64::MAX)
    }

    /// The unix time of `RealClock` 0, read once, back to back with the monotonic clock. On one
    /// host, `real_ns + unix_at_zero_ns()` is the wall-clock instant a conductor server started
    /// at about the same time would give it (the server pins its clocks the same way).
    pub fn unix_at_zero_ns() -> i64 {
        epoch().1
    }
}

impl LocalClock for RealClock {
    fn now_ns(&self) -> i64 {
        RealClock::now_ns(self)
    }
}

/// A device clock for tests and emulation: `offset + real · (1 + skew)`, where `real` is
/// [`RealClock`]. It knows its relation to the real clock, hence the truth.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EmulatedClock {
    offset_ns: i64,
    skew: f64,
}

/// The largest skew accepted: quartz is within ±100 ppm, a bad one ±200; beyond 1000 ppm a
/// clock is broken, not skewed.
pub const MAX_EMULATED_SKEW_PPM: f64 = 1000.0;

impl EmulatedClock {
    /// A clock `offset_s` seconds ahead of the real one (negative: behind) that gains
    /// `skew_ppm` microseconds a second (negative: loses).
    pub fn new(offset_s: f64, skew_ppm: f64) -> Result<EmulatedClock, SyncError> {
        if !offset_s.is_finite() || offset_s.abs() > 1.0e6 {
            return Err(SyncError::BadClock(format!(
                "offset {offset_s} s; choose up to ±1,000,000 s"
            )));
        }
        if !skew_ppm.is_finite() || skew_ppm.abs() > MAX_EMULATED_SKEW_PPM {
            return Err(SyncError::BadClock(format!(
                "skew {skew_ppm} ppm; choose up to ±{MAX_EMULATED_SKEW_PPM} ppm"
            )));
        }
        Ok(EmulatedClock {
            offset_ns: (offset_s * 1e9).round() as i64,
            skew: skew_ppm * 1e-6,
        })
    }

    pub fn offset_ns(&self) -> i64 {
        self.offset_ns
    }

    pub fn skew_ppm(&self) -> f64 {
        self.skew * 1e6
    }

    /// What this clock reads when the real clock reads `real_ns`.
    pub fn local_at(&self, real_ns: i64) -> i64 {
        self.offset_ns + real_ns + (real_ns as f64 * self.skew).round() as i64
    }

    /// The real clock's reading when this clock reads `local_ns`: the truth behind a local
    /// instant.
    pub fn real_at(&self, local_ns: i64) -> i64 {
        ((local_ns - self.offset_ns) as f64 / (1.0 + self.skew)).round() as i64
    }
}

impl LocalClock for EmulatedClock {
    fn now_ns(&self) -> i64 {
        self.local_at(RealClock.now_ns())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_clock_is_monotonic() {
        let c = RealClock;
        let a = c.now_ns();
        let b = c.now_ns();
        assert!(a >= 0 && b >= a);
    }

    #[test]
    fn emulated_clock_round_trips_and_runs_at_its_rate() {
        let c = EmulatedClock::new(-3.5, 200.0).unwrap();
        for real in [0i64, 1_000_000_000, 3_600_000_000_000] {
            assert!((c.real_at(c.local_at(real)) - real).abs() <= 1);
        }
        // 200 ppm: 200 µs gained per second.
        assert_eq!(
            c.local_at(1_000_000_000) - c.local_at(0),
            1_000_000_000 + 200_000
        );
        assert_eq!(c.local_at(0), -3_500_000_000);
        assert!(EmulatedClock::new(0.0, 1500.0).is_err());
        assert!(EmulatedClock::new(f64::NAN, 0.0).is_err());
    }
}
