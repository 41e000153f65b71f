//! The delay line of one direction: when each chunk that arrived may leave.
//!
//! This module owns the timing decisions and nothing else: it is a pure function of the
//! profile, a seeded random stream and the arrival times (ns on any monotonic axis). The proxy
//! feeds it and sleeps until the instants it returns.
//!
//! A chunk that arrives at `t` leaves at `max(t + delay + jitter, stall_end + delay + jitter,
//! previous departure)`: never before the chunk ahead of it (TCP keeps order, so a late chunk
//! holds up the ones behind it, as on a real path), and not during a stall. A stall begins, with
//! the burst probability, at a chunk's arrival and lasts the burst's length.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution as _, Normal, Pareto};

use crate::profile::{Direction, Distribution};

/// What one direction did, for the log and the tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LineStats {
    pub chunks: u64,
    pub bursts: u64,
    /// Chunks held back by the chunk ahead of them (later than their own delay).
    pub held_for_order: u64,
}

pub struct DelayLine {
    dir: Direction,
    rng: StdRng,
    normal: Option<Normal<f64>>,
    pareto: Option<Pareto<f64>>,
    last_departure: Option<u64>,
    stall_until: u64,
    pub stats: LineStats,
}

impl DelayLine {
    pub fn new(dir: Direction, seed: u64) -> DelayLine {
        let jitter = dir.jitter.as_nanos() as f64;
        DelayLine {
            dir,
            rng: StdRng::seed_from_u64(seed),
            normal: Normal::new(0.0, jitter).ok(),
            pareto: Pareto::new(1.0, 2.5).ok(),
            last_departure: None,
            stall_until: 0,
            stats: LineStats::default(),
        }
    }

    /// This chunk's own delay, ns: the delay plus its jitter, never negative.
    fn sample_delay(&mut self) -> u64 {
        let delay = self.dir.delay.as_nanos() as f64;
        let jitter = self.dir.jitter.as_nanos() as f64;
        let d = if jitter == 0.0 {
            delay
        } else {
            match self.dir.distribution {
                Distribution::Uniform => delay + jitter * (2.0 * self.rng.random::<f64>() - 1.0),
                Distribution::Normal => {
                    delay + self.normal.map_or(0.0, |n| n.sample(&mut self.rng))
                }
                Distribution::Pareto => {
                    delay + jitter * (self.pareto.map_or(1.0, |p| p.sample(&mut self.rng)) - 1.0)
                }
            }
        };
        d.max(0.0).round() as u64
    }

    /// When a chunk that arrived at `arrival_ns` leaves.
    pub fn departure(&mut self, arrival_ns: u64) -> u64 {
        self.stats.chunks += 1;
        if let Some(b) = self.dir.burst
            && b.probability > 0.0
            && self.rng.random::<f64>() < b.probability
        {
            self.stats.bursts += 1;
            self.stall_until = self.stall_until.max(arrival_ns + b.stall.as_nanos() as u64);
        }
        let own = arrival_ns.max(self.stall_until) + self.sample_delay();
        let departure = match self.last_departure {
            Some(before) if before > own => {
                self.stats.held_for_order += 1;
                before
            }
            _ => own,
        };
        self.last_departure = Some(departure);
        departure
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Burst, Profile};
    use std::time::Duration;

    fn stats(v: &mut [f64]) -> (f64, f64, f64) {
        v.sort_by(f64::total_cmp);
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        (v[0], mean, v[v.len() - 1])
    }

    #[test]
    fn a_fixed_delay_is_exact() {
        let mut line = DelayLine::new(Profile::symmetric(75.0, 0.0).up, 1);
        for t in [0u64, 1, 1_000_000, 5_000_000_000] {
            assert_eq!(line.departure(t), t + 75_000_000);
        }
    }

    #[test]
    fn uniform_jitter_spans_the_range_and_keeps_order() {
        let mut line = DelayLine::new(Profile::symmetric(150.0, 30.0).up, 7);
        // Chunks 200 ms apart never interact: the jitter shows as drawn.
        let mut own: Vec<f64> = (0..20_000u64)
            .map(|i| {
                let t = i * 200_000_000;
                (line.departure(t) - t) as f64 / 1e6
            })
            .collect();
        let (lo, mean, hi) = stats(&mut own);
        assert!((120.0..120.1).contains(&lo), "{lo}");
        assert!(hi <= 180.0 && hi > 179.9, "{hi}");
        assert!((mean - 150.0).abs() < 0.5, "{mean}");
        assert_eq!(line.stats.held_for_order, 0);
        // Chunks 1 ms apart would overtake each other; they never do.
        let mut line = DelayLine::new(Profile::symmetric(150.0, 30.0).up, 8);
        let mut last = 0;
        for i in 0..10_000u64 {
            let d = line.departure(i * 1_000_000);
            assert!(d >= last, "chunk {i} left before the one ahead of it");
            last = d;
        }
        assert!(line.stats.held_for_order > 1000);
    }

    #[test]
    fn normal_and_pareto() {
        let mut dir = Profile::symmetric(60.0, 10.0).up;
        dir.distribution = Distribution::Normal;
        let mut line = DelayLine::new(dir, 3);
        let mut own: Vec<f64> = (0..20_000u64)
            .map(|i| (line.departure(i * 1_000_000_000) - i * 1_000_000_000) as f64 / 1e6)
            .collect();
        let (_, mean, _) = stats(&mut own);
        let sd = (own.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / own.len() as f64).sqrt();
        assert!(
            (mean - 60.0).abs() < 0.3 && (sd - 10.0).abs() < 0.3,
            "{mean} {sd}"
        );
        dir.distribution = Distribution::Pareto;
        let mut line = DelayLine::new(dir, 4);
        let mut own: Vec<f64> = (0..20_000u64)
            .map(|i| (line.departure(i * 1_000_000_000) - i * 1_000_000_000) as f64 / 1e6)
            .collect();
        let (lo, mean, hi) = stats(&mut own);
        assert!(lo >= 60.0, "never below the delay: {lo}");
        assert!(
            (mean - 66.67).abs() < 0.5,
            "mean delay + 2/3 jitter: {mean}"
        );
        assert!(hi > 150.0, "a heavy tail: {hi}");
    }

    #[test]
    fn bursts_stall_everything_behind_them() {
        let mut dir = Profile::symmetric(10.0, 0.0).up;
        dir.burst = Some(Burst {
            stall: Duration::from_millis(300),
            probability: 0.05,
        });
        let mut line = DelayLine::new(dir, 11);
        let mut stalled = 0;
        for i in 0..10_000u64 {
            let t = i * 50_000_000; // a chunk every 50 ms
            let bursts_before = line.stats.bursts;
            let d = line.departure(t);
            if line.stats.bursts > bursts_before {
                assert_eq!(d, t + 310_000_000, "the stalling chunk waits it out");
            }
            if d > t + 10_000_000 {
                stalled += 1;
            }
        }
        let bursts = line.stats.bursts as f64;
        assert!((bursts / 10_000.0 - 0.05).abs() < 0.01, "{bursts}");
        // Each stall holds its own chunk and the ones arriving within the next 300 ms.
        assert!(
            stalled as f64 > bursts * 4.0,
            "{stalled} stalled, {bursts} bursts"
        );
    }

    #[test]
    fn a_seed_replays_the_same_path() {
        let p = Profile::parse("mobile").unwrap();
        let run = |seed| {
            let mut line = DelayLine::new(p.down, seed);
            (0..1000u64)
                .map(|i| line.departure(i * 10_000_000))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }
}
