//! The one mapping between the monotonic clock and wall-clock (unix) time.
//!
//! The timing thread schedules on `Instant` (monotonic, immune to NTP steps); clients want unix
//! time. [`Clock`] pins the two together once, at start, and every later conversion goes through
//! that pair. It must not re-read the wall clock for a tick's time: a wall-clock step would then
//! bend the timeline that clients schedule on.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The server's epoch on both clocks. Cheap to copy; every thread holds its own.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    epoch: Instant,
    unix_epoch_ns: u64,
}

impl Clock {
    /// Reads both clocks back to back.
    pub fn start() -> Clock {
        let epoch = Instant::now();
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Clock {
            epoch,
            unix_epoch_ns: u64::try_from(unix.as_nanos()).unwrap_or(u64::MAX),
        }
    }

    /// Nanoseconds since the epoch, monotonic.
    pub fn now_ns(&self) -> u64 {
        self.ns_at(Instant::now())
    }

    /// The offset of `at` from the epoch (0 for instants before it).
    pub fn ns_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The `Instant` of an offset.
    pub fn instant(&self, ns: u64) -> Instant {
        self.epoch + Duration::from_nanos(ns)
    }

    /// Unix time, in nanoseconds, of an offset.
    pub fn unix_ns(&self, ns: u64) -> u64 {
        self.unix_epoch_ns.saturating_add(ns)
    }

    /// Unix time now, in nanoseconds, on the server's timeline.
    pub fn unix_now_ns(&self) -> u64 {
        self.unix_ns(self.now_ns())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_round_trip_through_instants() {
        let c = Clock::start();
        let at = c.instant(1_234_567);
        assert_eq!(c.ns_at(at), 1_234_567);
        assert_eq!(c.unix_ns(1_000) - c.unix_ns(0), 1_000);
    }

    #[test]
    fn unix_time_tracks_the_system_clock() {
        let c = Clock::start();
        let sys = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128;
        let ours = c.unix_now_ns() as i128;
        assert!((sys - ours).abs() < 50_000_000, "{sys} vs {ours}");
    }
}
