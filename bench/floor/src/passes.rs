//! The pure half of the floor: the frame it writes, how connections are shared between
//! writer threads, when each pass is due, and what the passes add up to. No I/O here.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// One unmasked, final WebSocket text frame of exactly `total` bytes (header included), as a
/// server sends a tick: the sink never parses it, but the bytes on the wire are a real frame's.
pub fn text_frame(total: usize) -> Vec<u8> {
    // Payloads under 126 bytes have a 2-byte header, up to 65,535 a 4-byte one, else 10.
    let header = match total {
        0..=127 => 2,
        128..=65_539 => 4,
        _ => 10,
    };
    let payload = total.saturating_sub(header);
    let mut frame = Vec::with_capacity(header + payload);
    frame.push(0x81);
    match header {
        2 => frame.push(payload as u8),
        4 => {
            frame.push(126);
            frame.extend_from_slice(&(payload as u16).to_be_bytes());
        }
        _ => {
            frame.push(127);
            frame.extend_from_slice(&(payload as u64).to_be_bytes());
        }
    }
    // Printable and tick-like; any bytes would do.
    let body = br#"{"event":"tick","data":{"count":0,"bpm":200,"time":0,"time_us":0,"ppqn":4}}"#;
    frame.extend(body.iter().copied().cycle().take(payload));
    frame
}

/// The ranges of connection indices each of `threads` writers owns: contiguous, sizes
/// differing by at most one (the first ones take the remainder).
pub fn shares(connections: usize, threads: usize) -> Vec<std::ops::Range<usize>> {
    let threads = threads.clamp(1, connections.max(1));
    let (base, extra) = (connections / threads, connections % threads);
    let mut start = 0;
    (0..threads)
        .map(|t| {
            let len = base + usize::from(t < extra);
            let range = start..start + len;
            start += len;
            range
        })
        .collect()
}

/// When pass `n` is due, from the anchor: `n · interval` in integer nanoseconds (as the
/// server's schedule: nothing accumulates). `None` interval: back to back, due at once.
pub fn due(n: u64, interval_ns: Option<u64>) -> Duration {
    Duration::from_nanos(interval_ns.map_or(0, |i| n.saturating_mul(i)))
}

/// The interval between passes at `rate` passes a second, in ns; `None` for 0 (saturation).
pub fn interval_ns(rate: f64) -> Option<u64> {
    (rate > 0.0).then(|| (1e9 / rate).round() as u64)
}

/// One writer thread's record of one pass, in ns from the anchor (CPU: the thread's own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    pub index: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    pub cpu_ns: u64,
    pub writes: u64,
}

/// `{p50, p99, max, samples}` of a distribution, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Micros {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub samples: u64,
}

impl Micros {
    fn of(h: &Histogram<u64>) -> Micros {
        if h.is_empty() {
            return Micros::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Micros {
            p50: us(h.value_at_quantile(0.5)),
            p99: us(h.value_at_quantile(0.99)),
            max: us(h.max()),
            samples: h.len(),
        }
    }
}

/// What the measured passes of every thread add up to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct PassSummary {
    /// Passes every thread completed.
    pub passes: u64,
    pub writes: u64,
    /// Per pass: the first thread's start to the last thread's end (the floor's "fan-out").
    pub pass_us: Micros,
    /// Per pass: how late the first thread started after the pass was due.
    pub start_late_us: Micros,
    /// The writer threads' own CPU in passes, per write: the bare loop of `write` calls.
    pub thread_cpu_us_per_write: f64,
    /// Writes per pass ÷ the median pass: writes a second while a pass runs.
    pub writes_per_s_in_pass: f64,
}

fn histogram() -> Histogram<u64> {
    // 1 ns .. 1 hour at 3 significant figures; constant bounds cannot fail.
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).unwrap_or_else(|_| unreachable!())
}

/// Combines the threads' records of the passes numbered `from..` (the ones measured).
pub fn summarise(threads: &[Vec<Pass>], from: u64, interval_ns: Option<u64>) -> PassSummary {
    // Per pass: (first start, last end, threads, writes).
    let mut by_index: std::collections::BTreeMap<u64, (u64, u64, u32, u64)> = Default::default();
    let (mut cpu, mut writes) = (0u64, 0u64);
    for passes in threads {
        for p in passes.iter().filter(|p| p.index >= from) {
            let e = by_index
                .entry(p.index)
                .or_insert((p.start_ns, p.end_ns, 0, 0));
            e.0 = e.0.min(p.start_ns);
            e.1 = e.1.max(p.end_ns);
            e.2 += 1;
            e.3 += p.writes;
            cpu += p.cpu_ns;
            writes += p.writes;
        }
    }
    let (mut pass, mut late) = (histogram(), histogram());
    let (mut passes, mut complete_writes) = (0u64, 0u64);
    for (index, (start, end, n, w)) in by_index {
        // A pass some thread had not finished when the run ended is no sample.
        if n as usize != threads.len() {
            continue;
        }
        passes += 1;
        complete_writes += w;
        pass.saturating_record(end.saturating_sub(start).max(1));
        let due_ns = due(index, interval_ns).as_nanos() as u64;
        late.saturating_record(start.saturating_sub(due_ns).max(1));
    }
    let pass_us = Micros::of(&pass);
    let per_pass = if passes > 0 {
        complete_writes as f64 / passes as f64
    } else {
        0.0
    };
    PassSummary {
        passes,
        writes,
        pass_us,
        start_late_us: Micros::of(&late),
        thread_cpu_us_per_write: if writes > 0 {
            cpu as f64 / 1000.0 / writes as f64
        } else {
            0.0
        },
        writes_per_s_in_pass: if pass_us.p50 > 0.0 {
            per_pass / (pass_us.p50 / 1e6)
        } else {
            0.0
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_the_asked_size_and_a_valid_header() {
        let f = text_frame(100);
        assert_eq!(f.len(), 100);
        assert_eq!((f[0], f[1]), (0x81, 98));
        let f = text_frame(300);
        assert_eq!(f.len(), 300);
        assert_eq!(&f[..4], &[0x81, 126, 0x01, 0x28]);
        assert_eq!(text_frame(2), vec![0x81, 0]);
        let f = text_frame(70_000);
        assert_eq!((f.len(), f[1]), (70_000, 127));
    }

    #[test]
    fn shares_cover_every_connection_once() {
        assert_eq!(shares(10, 3), vec![0..4, 4..7, 7..10]);
        assert_eq!(shares(2, 4), vec![0..1, 1..2]);
        assert_eq!(shares(5, 1), vec![0..5]);
        assert_eq!(shares(0, 3), vec![0..0]);
        let s = shares(50_001, 8);
        assert_eq!(s.iter().map(|r| r.len()).sum::<usize>(), 50_001);
        assert!(s.windows(2).all(|w| w[0].end == w[1].start));
    }

    #[test]
    fn passes_are_due_on_a_grid_that_does_not_accumulate() {
        let i = interval_ns(200.0 * 4.0 / 60.0);
        assert_eq!(i, Some(75_000_000));
        assert_eq!(due(1_000_000, i), Duration::from_secs(75_000));
        assert_eq!(interval_ns(0.0), None);
        assert_eq!(due(7, None), Duration::ZERO);
    }

    #[test]
    fn a_pass_lasts_from_the_first_start_to_the_last_end() {
        let t0 = vec![
            Pass {
                index: 0,
                start_ns: 5,
                end_ns: 100,
                cpu_ns: 90,
                writes: 10,
            },
            Pass {
                index: 1,
                start_ns: 1_000_010,
                end_ns: 1_000_200,
                cpu_ns: 100,
                writes: 10,
            },
            Pass {
                index: 2,
                start_ns: 2_000_000,
                end_ns: 2_000_300,
                cpu_ns: 100,
                writes: 10,
            },
        ];
        let t1 = vec![
            Pass {
                index: 1,
                start_ns: 1_000_000,
                end_ns: 1_000_400,
                cpu_ns: 300,
                writes: 10,
            },
            // Thread 1 never finished pass 2: it is no sample (its writes still count).
        ];
        let s = summarise(&[t0, t1], 1, Some(1_000_000));
        assert_eq!(s.passes, 1);
        assert_eq!(s.writes, 30);
        assert!((s.pass_us.p50 - 0.4).abs() < 0.01, "{:?}", s.pass_us);
        assert!((s.thread_cpu_us_per_write - 0.5 / 30.0).abs() < 1e-9);
        // 20 writes in a 400 ns pass.
        assert!((s.writes_per_s_in_pass - 20.0 / 0.4e-6).abs() < 1.0);
        assert_eq!(s.start_late_us.samples, 1);
    }
}
