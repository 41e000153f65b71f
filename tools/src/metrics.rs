//! What the probe computes from tick arrivals. Pure: arrivals in, numbers out.
//!
//! All times are kernel receive timestamps in unix nanoseconds (see `net.rs`), so the probe's
//! own processing delay never enters a measurement. Each connection has a [`ConnTrack`]; one
//! [`Recorder`] per probe thread holds the histograms, and recorders merge at the end.

use std::collections::HashMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// One tick as it arrived on one connection.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Arrival {
    pub count: u64,
    pub bpm: f64,
    pub ppqn: u32,
    /// The server's scheduled instant for the tick, unix µs, if it said.
    pub scheduled_us: Option<i64>,
    /// Kernel receive time, unix ns.
    pub at_ns: i64,
}

impl Arrival {
    /// The ideal interval before this tick, from its own tempo.
    pub fn ideal_interval_ns(&self) -> f64 {
        60e9 / (self.bpm * f64::from(self.ppqn.max(1)))
    }
}

fn histogram() -> Histogram<u64> {
    // 1 ns .. 1 hour, 3 significant figures; the bounds are constants, so this cannot fail.
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).unwrap_or_else(|_| unreachable!())
}

/// Which ticks a client asked the server for (`?ticks=`), and so which counts it expects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TickChoice {
    /// Every tick (the predecessor's protocol, and the default).
    #[default]
    All,
    /// One tick per beat: every `ppqn`-th count.
    Beat,
    /// One tick per bar: every `ppqn · beats_per_bar`-th count.
    Bar,
    /// No ticks at all: the client schedules on the timeline.
    None,
}

impl TickChoice {
    /// The choice named by a `ticks=` value; anything unknown is sent as asked and expected to
    /// behave as `all` (a server refusing it is what the probe then reports).
    pub fn from_query_value(v: &str) -> TickChoice {
        match v {
            "beat" => TickChoice::Beat,
            "bar" => TickChoice::Bar,
            "none" => TickChoice::None,
            _ => TickChoice::All,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            TickChoice::All => "all",
            TickChoice::Beat => "beat",
            TickChoice::Bar => "bar",
            TickChoice::None => "none",
        }
    }

    /// Counts between two consecutive ticks this client should get (1 for `none` too: any
    /// tick that arrives then is measured as it is).
    pub fn stride(self, ppqn: u32, beats_per_bar: u32) -> u64 {
        match self {
            TickChoice::All | TickChoice::None => 1,
            TickChoice::Beat => u64::from(ppqn.max(1)),
            TickChoice::Bar => u64::from(ppqn.max(1)) * u64::from(beats_per_bar.max(1)),
        }
    }
}

/// The per-connection state behind interval jitter, drift, gaps and reorders.
#[derive(Clone, Debug, Default)]
pub struct ConnTrack {
    first_ns: Option<i64>,
    last: Option<Arrival>,
    /// Sum of ideal intervals from the first tick to the last.
    ideal_ns: f64,
    /// Counts from one expected tick to the next (0 and 1 both mean every tick).
    pub stride: u64,
    pub ticks: u64,
    /// Expected ticks that never came.
    pub gaps: u64,
    pub reorders: u64,
    /// Steps that were not a whole number of strides (a `beat` client given an off-beat tick).
    pub off_stride: u64,
}

impl ConnTrack {
    /// A connection that expects a tick every `stride` counts.
    pub fn with_stride(stride: u64) -> ConnTrack {
        ConnTrack {
            stride,
            ..ConnTrack::default()
        }
    }

    /// Takes one arrival, recording its interval jitter and fan-out arrival into `rec`.
    pub fn observe(&mut self, a: Arrival, rec: &mut Recorder) {
        rec.observe_arrival(&a);
        match self.last {
            None => {
                self.first_ns = Some(a.at_ns);
                self.ticks = 1;
                self.last = Some(a);
            }
            Some(prev) if a.count <= prev.count => self.reorders += 1,
            Some(prev) => {
                let steps = a.count - prev.count;
                let stride = self.stride.max(1);
                // The server's own schedule, when it says: whatever rule it re-anchors a tempo
                // change by (conductor keeps the announced instant of the first tick at the
                // new tempo, so the interval into it is the old one). Otherwise each tick's own
                // tempo, as the predecessor re-timed at once.
                let ideal = match (prev.scheduled_us, a.scheduled_us) {
                    (Some(p), Some(n)) if n > p => (n - p) as f64 * 1000.0 / steps as f64,
                    _ => a.ideal_interval_ns(),
                };
                // Two ticks out of one read share a timestamp: the interval between them says
                // when the probe read, not when the server sent, so it is no sample.
                if steps == stride && a.bpm == prev.bpm && a.at_ns != prev.at_ns {
                    let actual = (a.at_ns - prev.at_ns) as f64;
                    let expected = stride as f64 * ideal;
                    rec.jitter
                        .saturating_record((actual - expected).abs().round().max(1.0) as u64);
                }
                if steps.is_multiple_of(stride) {
                    self.gaps += steps / stride - 1;
                } else {
                    self.off_stride += 1;
                    self.gaps += steps / stride;
                }
                self.ideal_ns += steps as f64 * ideal;
                self.ticks += 1;
                self.last = Some(a);
            }
        }
    }

    /// Last arrival minus (first arrival + the ideal time of every interval between), in ns.
    pub fn drift_ns(&self) -> Option<f64> {
        let (first, last) = (self.first_ns?, self.last?);
        if self.ticks < 2 {
            return None;
        }
        Some((last.at_ns - first) as f64 - self.ideal_ns)
    }
}

/// One probe thread's measurements.
pub struct Recorder {
    pub jitter: Histogram<u64>,
    pub latency: Histogram<u64>,
    /// Arrivals that came before their scheduled time (clocks not shared, or skewed).
    pub early: u64,
    /// Per count: (first arrival, last arrival, connections).
    pub by_count: HashMap<u64, (i64, i64, u32)>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            jitter: histogram(),
            latency: histogram(),
            early: 0,
            by_count: HashMap::new(),
        }
    }
}

impl Recorder {
    fn observe_arrival(&mut self, a: &Arrival) {
        // A server may send any number: drop what does not fit rather than overflow.
        if let Some(latency) = a
            .scheduled_us
            .and_then(|us| us.checked_mul(1000))
            .and_then(|ns| a.at_ns.checked_sub(ns))
        {
            if latency < 0 {
                self.early += 1;
            } else {
                self.latency.saturating_record(latency.max(1) as u64);
            }
        }
        let e = self
            .by_count
            .entry(a.count)
            .or_insert((a.at_ns, a.at_ns, 0));
        e.0 = e.0.min(a.at_ns);
        e.1 = e.1.max(a.at_ns);
        e.2 += 1;
    }

    pub fn merge(&mut self, other: Recorder) {
        let _ = self.jitter.add(&other.jitter);
        let _ = self.latency.add(&other.latency);
        self.early += other.early;
        for (count, (lo, hi, n)) in other.by_count {
            let e = self.by_count.entry(count).or_insert((lo, hi, 0));
            e.0 = e.0.min(lo);
            e.1 = e.1.max(hi);
            e.2 += n;
        }
    }

    /// Everything needed to merge this recorder with another process's, as plain data.
    pub fn to_raw(&self) -> RawRecorder {
        let pairs = |h: &Histogram<u64>| {
            h.iter_recorded()
                .map(|v| [v.value_iterated_to(), v.count_at_value()])
                .collect()
        };
        let mut by_count: Vec<_> = self
            .by_count
            .iter()
            .map(|(count, (lo, hi, n))| (*count, *lo, *hi, *n))
            .collect();
        by_count.sort_unstable();
        RawRecorder {
            jitter_ns: pairs(&self.jitter),
            latency_ns: pairs(&self.latency),
            early: self.early,
            by_count,
        }
    }

    /// The recorder `raw` was made from (to the histograms' precision).
    pub fn from_raw(raw: &RawRecorder) -> Recorder {
        let mut rec = Recorder::default();
        for [value, n] in &raw.jitter_ns {
            rec.jitter.saturating_record_n(*value, *n);
        }
        for [value, n] in &raw.latency_ns {
            rec.latency.saturating_record_n(*value, *n);
        }
        rec.early = raw.early;
        rec.by_count = raw
            .by_count
            .iter()
            .map(|(count, lo, hi, n)| (*count, (*lo, *hi, *n)))
            .collect();
        rec
    }

    /// Fan-out spread per count seen by at least two connections.
    pub fn spread(&self) -> Histogram<u64> {
        let mut h = histogram();
        for (lo, hi, n) in self.by_count.values() {
            if *n >= 2 {
                h.saturating_record(((hi - lo).max(1)) as u64);
            }
        }
        h
    }
}

/// A [`Recorder`] as plain data, for `--raw` reports that `--merge` adds up: histograms as
/// `[value ns, count]` pairs, and each count's (first arrival, last arrival, connections).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RawRecorder {
    pub jitter_ns: Vec<[u64; 2]>,
    pub latency_ns: Vec<[u64; 2]>,
    pub early: u64,
    pub by_count: Vec<(u64, i64, i64, u32)>,
}

/// `{p50, p99, p999, max}` in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub samples: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Percentiles {
            p50: us(h.value_at_quantile(0.5)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
            samples: h.len(),
        }
    }
}

/// The median of `values` (sorted in place), or 0 when empty.
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrival(count: u64, at_ms: f64) -> Arrival {
        Arrival {
            count,
            bpm: 120.0,
            ppqn: 4,
            scheduled_us: Some((count as i64) * 125_000),
            at_ns: (at_ms * 1e6) as i64,
        }
    }

    #[test]
    fn perfect_ticks_have_no_jitter_and_no_drift() {
        let mut rec = Recorder::default();
        let mut t = ConnTrack::default();
        for n in 0..100 {
            t.observe(arrival(n, n as f64 * 125.0), &mut rec);
        }
        assert_eq!(t.ticks, 100);
        assert_eq!(t.gaps, 0);
        assert_eq!(rec.jitter.len(), 99);
        assert!(rec.jitter.max() <= 1, "{}", rec.jitter.max());
        assert_eq!(t.drift_ns(), Some(0.0));
    }

    #[test]
    fn jitter_is_the_deviation_from_the_ideal_interval() {
        let mut rec = Recorder::default();
        let mut t = ConnTrack::default();
        t.observe(arrival(0, 0.0), &mut rec);
        t.observe(arrival(1, 126.0), &mut rec); // 1 ms long
        t.observe(arrival(2, 249.5), &mut rec); // 1.5 ms short
        let max = Percentiles::of(&rec.jitter).max;
        assert!((max - 1500.0).abs() < 2.0, "{max}");
        // Ends 0.5 ms early against 2 ideal intervals.
        assert_eq!(t.drift_ns(), Some(-500_000.0));
    }

    #[test]
    fn setinterval_style_drift_accumulates() {
        // 1 ms late on every tick, as an interval timer that re-arms after the callback does.
        let mut rec = Recorder::default();
        let mut t = ConnTrack::default();
        for n in 0..481 {
            t.observe(arrival(n, n as f64 * 126.0), &mut rec);
        }
        assert_eq!(t.drift_ns(), Some(480e6));
    }

    #[test]
    fn gaps_and_reorders_are_counted_and_skipped() {
        let mut rec = Recorder::default();
        let mut t = ConnTrack::default();
        for (n, at) in [(0, 0.0), (1, 125.0), (4, 500.0), (3, 510.0), (5, 625.0)] {
            t.observe(arrival(n, at), &mut rec);
        }
        assert_eq!(t.gaps, 2);
        assert_eq!(t.reorders, 1);
        assert_eq!(t.ticks, 4);
        assert_eq!(rec.jitter.len(), 2, "only consecutive pairs count");
        assert_eq!(t.drift_ns(), Some(0.0));
    }

    #[test]
    fn tempo_changes_are_accounted_for_in_drift() {
        let mut rec = Recorder::default();
        let mut t = ConnTrack::default();
        t.observe(arrival(0, 0.0), &mut rec);
        t.observe(arrival(1, 125.0), &mut rec);
        let mut fast = arrival(2, 225.0);
        fast.bpm = 150.0; // 100 ms
        fast.scheduled_us = Some(225_000);
        t.observe(fast, &mut rec);
        fast.count = 3;
        fast.at_ns = 325_000_000;
        fast.scheduled_us = Some(325_000);
        t.observe(fast, &mut rec);
        assert_eq!(t.drift_ns(), Some(0.0));
        assert_eq!(
            rec.jitter.len(),
            2,
            "the change-over interval is not jitter"
        );
    }

    #[test]
    fn drift_follows_the_servers_schedule_across_an_anchored_change() {
        // conductor's rule: tick 2 is the first at 150 BPM but keeps its announced instant on
        // the old grid (250 ms); the intervals after it are 100 ms.
        let mut rec = Recorder::default();
        let mut t = ConnTrack::default();
        t.observe(arrival(0, 0.0), &mut rec);
        t.observe(arrival(1, 125.0), &mut rec);
        let mut fast = arrival(2, 250.0);
        fast.bpm = 150.0;
        t.observe(fast, &mut rec);
        fast.count = 3;
        fast.at_ns = 350_000_000;
        fast.scheduled_us = Some(350_000);
        t.observe(fast, &mut rec);
        assert_eq!(t.drift_ns(), Some(0.0));
        // Without a schedule, a server is taken to re-time at once, as the predecessor did.
        let mut seed = ConnTrack::default();
        for (count, at, bpm) in [(0, 0.0, 120.0), (1, 125.0, 120.0), (2, 225.0, 150.0)] {
            let mut a = arrival(count, at);
            a.bpm = bpm;
            a.scheduled_us = None;
            seed.observe(a, &mut rec);
        }
        assert_eq!(seed.drift_ns(), Some(0.0));
    }

    #[test]
    fn spread_and_latency_across_connections() {
        let mut a = Recorder::default();
        let mut b = Recorder::default();
        let (mut ta, mut tb) = (ConnTrack::default(), ConnTrack::default());
        for n in 0..10u64 {
            let base = n as f64 * 125.0;
            ta.observe(arrival(n, base + 0.1), &mut a);
            tb.observe(arrival(n, base + 0.3), &mut b);
        }
        a.merge(b);
        let spread = Percentiles::of(&a.spread());
        assert_eq!(spread.samples, 10);
        assert!((spread.p50 - 200.0).abs() < 1.0, "{spread:?}");
        let latency = Percentiles::of(&a.latency);
        assert!((latency.p50 - 100.0).abs() < 1.0, "{latency:?}");
        assert_eq!(a.early, 0);
    }

    #[test]
    fn ticks_from_one_read_give_no_interval_sample() {
        let mut rec = Recorder::default();
        let mut t = ConnTrack::default();
        t.observe(arrival(0, 0.0), &mut rec);
        t.observe(arrival(1, 250.0), &mut rec);
        t.observe(arrival(2, 250.0), &mut rec);
        assert_eq!(rec.jitter.len(), 1);
        assert_eq!(t.ticks, 3);
    }

    #[test]
    fn absurd_scheduled_times_are_dropped_not_overflowed() {
        let mut rec = Recorder::default();
        let mut a = arrival(0, 1.0);
        a.scheduled_us = Some(i64::MAX / 10);
        ConnTrack::default().observe(a, &mut rec);
        assert_eq!(rec.latency.len(), 0);
    }

    #[test]
    fn a_beat_client_counts_gaps_in_beats_and_jitter_against_the_beat() {
        let mut rec = Recorder::default();
        let mut t = ConnTrack::with_stride(TickChoice::Beat.stride(4, 4));
        // Beats at counts 0, 4, 8, then 16 (one beat missing), each 500 ms apart at 120 BPM.
        for (n, at) in [(0, 0.0), (4, 501.0), (8, 1000.0), (16, 2000.0)] {
            t.observe(arrival(n, at), &mut rec);
        }
        assert_eq!(t.gaps, 1);
        assert_eq!(t.off_stride, 0);
        assert_eq!(rec.jitter.len(), 2, "only beat-to-next-beat pairs count");
        let max = Percentiles::of(&rec.jitter).max;
        assert!((max - 1000.0).abs() < 2.0, "{max}");
        assert_eq!(t.drift_ns(), Some(0.0));
        // A tick off the beat is counted as such, not as a gap.
        t.observe(arrival(18, 2250.0), &mut rec);
        assert_eq!((t.gaps, t.off_stride), (1, 1));
    }

    #[test]
    fn tick_choices_and_their_strides() {
        assert_eq!(TickChoice::from_query_value("beat"), TickChoice::Beat);
        assert_eq!(TickChoice::from_query_value("none"), TickChoice::None);
        assert_eq!(TickChoice::from_query_value("bogus"), TickChoice::All);
        assert_eq!(TickChoice::All.stride(24, 4), 1);
        assert_eq!(TickChoice::Beat.stride(24, 4), 24);
        assert_eq!(TickChoice::Bar.stride(4, 3), 12);
        assert_eq!(TickChoice::Bar.stride(0, 0), 1);
    }

    #[test]
    fn a_recorder_survives_the_trip_through_raw_data() {
        let mut rec = Recorder::default();
        let mut t = ConnTrack::default();
        for n in 0..50u64 {
            t.observe(
                arrival(n, n as f64 * 125.0 + (n % 7) as f64 * 0.3),
                &mut rec,
            );
        }
        let raw = rec.to_raw();
        let json = serde_json::to_string(&raw).unwrap();
        let back = Recorder::from_raw(&serde_json::from_str(&json).unwrap());
        assert_eq!(Percentiles::of(&back.jitter), Percentiles::of(&rec.jitter));
        assert_eq!(
            Percentiles::of(&back.latency),
            Percentiles::of(&rec.latency)
        );
        assert_eq!(back.by_count, rec.by_count);
        assert_eq!(back.early, rec.early);
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }
}
