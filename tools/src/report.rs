//! The probe's report: built from one process's measurements, or merged from several.
//!
//! One probe process holds as many connections as its open-files limit allows (20,000 on the
//! development machine), so a bigger run is split over processes, each started with `--raw`.
//! `--merge` then adds their raw data up into the report one process would have written: the
//! histograms and per-count arrivals are merged, not their percentiles averaged. Pure: no I/O
//! besides the table printed by [`print_table`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::metrics::{ConnTrack, Percentiles, RawRecorder, Recorder, median};

/// The shortest run whose drift is also reported per minute. A 10 s run's drift is mostly the
/// arrival noise of its first and last tick; six times that is not a rate.
const MIN_RUN_FOR_DRIFT_RATE_S: f64 = 60.0;

/// Drift per minute for a run of `measured_s` seconds, when the run is long enough to say.
pub fn drift_per_min(drift_us: f64, measured_s: f64) -> Option<f64> {
    (measured_s >= MIN_RUN_FOR_DRIFT_RATE_S).then(|| drift_us * 60.0 / measured_s)
}

/// The JSON report.
#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub label: Option<String>,
    pub url: String,
    pub mode: String,
    /// What the clients asked for with `?ticks=` (`all` when they did not ask).
    pub ticks_asked: String,
    pub clients: usize,
    pub connected: usize,
    /// Probe processes this report adds up (1 unless merged).
    pub processes: usize,
    pub duration_s: f64,
    pub ticks_total: u64,
    pub ticks_min: u64,
    pub ticks_max: u64,
    pub gaps: u64,
    pub reorders: u64,
    /// Steps between ticks that were not a whole beat (bar) for a `beat` (`bar`) client.
    pub off_stride: u64,
    /// Text messages of every kind received while measuring (ticks included).
    pub messages_total: u64,
    /// Pings received (and answered) while measuring.
    pub pings_total: u64,
    pub interval_jitter_us: Percentiles,
    pub spread_us: Percentiles,
    pub latency_us: Percentiles,
    /// Latency compares the probe's clock with the server's: meaningful on one host.
    pub latency_valid: bool,
    pub latency_early: u64,
    /// Median over connections of (last arrival − first arrival − ideal elapsed time) over the
    /// whole run, µs.
    pub drift_us: f64,
    pub drift_us_max_abs: f64,
    /// Drift per minute, µs: only for runs of [`MIN_RUN_FOR_DRIFT_RATE_S`] or more (`null`
    /// otherwise), since scaling a short run's drift up multiplies its noise into a rate.
    pub drift_us_per_min: Option<f64>,
    pub failures: BTreeMap<String, u64>,
    pub closes: BTreeMap<String, u64>,
    /// With `--raw`: what `--merge` needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<RawReport>,
}

/// The data a report's figures come from, for merging.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RawReport {
    pub recorder: RawRecorder,
    /// Per connection with two ticks or more, ns.
    pub drifts_ns: Vec<f64>,
    pub measured_s: f64,
}

/// Per-connection counts, added up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub connected: usize,
    pub ticks_total: u64,
    pub ticks_min: Option<u64>,
    pub ticks_max: u64,
    pub gaps: u64,
    pub reorders: u64,
    pub off_stride: u64,
    pub messages: u64,
    pub pings: u64,
}

impl Tally {
    pub fn of_tracks(tracks: &[ConnTrack], messages: u64, pings: u64) -> Tally {
        Tally {
            connected: tracks.len(),
            ticks_total: tracks.iter().map(|t| t.ticks).sum(),
            ticks_min: tracks.iter().map(|t| t.ticks).min(),
            ticks_max: tracks.iter().map(|t| t.ticks).max().unwrap_or(0),
            gaps: tracks.iter().map(|t| t.gaps).sum(),
            reorders: tracks.iter().map(|t| t.reorders).sum(),
            off_stride: tracks.iter().map(|t| t.off_stride).sum(),
            messages,
            pings,
        }
    }

    fn add(self, o: Tally) -> Tally {
        let ticks_min = match (self.ticks_min, o.ticks_min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Tally {
            connected: self.connected + o.connected,
            ticks_total: self.ticks_total + o.ticks_total,
            ticks_min,
            ticks_max: self.ticks_max.max(o.ticks_max),
            gaps: self.gaps + o.gaps,
            reorders: self.reorders + o.reorders,
            off_stride: self.off_stride + o.off_stride,
            messages: self.messages + o.messages,
            pings: self.pings + o.pings,
        }
    }

    fn of_report(r: &Report) -> Tally {
        Tally {
            connected: r.connected,
            ticks_total: r.ticks_total,
            ticks_min: (r.connected > 0).then_some(r.ticks_min),
            ticks_max: r.ticks_max,
            gaps: r.gaps,
            reorders: r.reorders,
            off_stride: r.off_stride,
            messages: r.messages_total,
            pings: r.pings_total,
        }
    }
}

/// What a report says about its run besides the measurements.
#[derive(Clone, Debug)]
pub struct RunInfo {
    pub label: Option<String>,
    pub url: String,
    pub mode: String,
    pub ticks_asked: String,
    pub clients: usize,
    pub processes: usize,
    pub measured_s: f64,
    pub latency_valid: bool,
}

/// Builds the report from merged measurements; `keep_raw` keeps what a later merge needs.
pub fn build(
    info: RunInfo,
    rec: &Recorder,
    mut drifts_ns: Vec<f64>,
    tally: Tally,
    failures: BTreeMap<String, u64>,
    closes: BTreeMap<String, u64>,
    keep_raw: bool,
) -> Report {
    let raw = keep_raw.then(|| RawReport {
        recorder: rec.to_raw(),
        drifts_ns: drifts_ns.clone(),
        measured_s: info.measured_s,
    });
    let drift_us_max_abs = drifts_ns.iter().fold(0.0f64, |m, d| m.max(d.abs())) / 1000.0;
    let drift_us = median(&mut drifts_ns) / 1000.0;
    let spread = rec.spread();
    Report {
        label: info.label,
        url: info.url,
        mode: info.mode,
        ticks_asked: info.ticks_asked,
        clients: info.clients,
        connected: tally.connected,
        processes: info.processes,
        duration_s: (info.measured_s * 1000.0).round() / 1000.0,
        ticks_total: tally.ticks_total,
        ticks_min: tally.ticks_min.unwrap_or(0),
        ticks_max: tally.ticks_max,
        gaps: tally.gaps,
        reorders: tally.reorders,
        off_stride: tally.off_stride,
        messages_total: tally.messages,
        pings_total: tally.pings,
        interval_jitter_us: Percentiles::of(&rec.jitter),
        spread_us: Percentiles::of(&spread),
        latency_us: Percentiles::of(&rec.latency),
        latency_valid: info.latency_valid,
        latency_early: rec.early,
        drift_us,
        drift_us_max_abs,
        drift_us_per_min: drift_per_min(drift_us, info.measured_s),
        failures,
        closes,
        raw,
    }
}

/// Why reports cannot be merged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MergeError {
    #[error("nothing to merge: give the --json files of probes run with --raw")]
    Empty,
    #[error("report {0} has no raw data: run each probe process with --raw")]
    NoRaw(usize),
    #[error(
        "report {index} is a {theirs} run with ticks={their_ticks}, the first a {ours} run with \
         ticks={our_ticks}: merge only the processes of one run"
    )]
    Mismatch {
        index: usize,
        ours: String,
        theirs: String,
        our_ticks: String,
        their_ticks: String,
    },
}

/// Adds up the reports of probe processes that measured one server in the same window.
pub fn merge(
    reports: Vec<Report>,
    label: Option<String>,
    keep_raw: bool,
) -> Result<Report, MergeError> {
    let Some(first) = reports.first() else {
        return Err(MergeError::Empty);
    };
    let info = RunInfo {
        label: label.or_else(|| first.label.clone()),
        url: first.url.clone(),
        mode: first.mode.clone(),
        ticks_asked: first.ticks_asked.clone(),
        clients: 0,
        processes: 0,
        measured_s: 0.0,
        latency_valid: true,
    };
    let mut info = info;
    let mut rec = Recorder::default();
    let mut drifts = Vec::new();
    let mut tally = Tally::default();
    let mut failures = BTreeMap::new();
    let mut closes = BTreeMap::new();
    for (i, r) in reports.iter().enumerate() {
        let raw = r.raw.as_ref().ok_or(MergeError::NoRaw(i + 1))?;
        if r.mode != info.mode || r.ticks_asked != info.ticks_asked {
            return Err(MergeError::Mismatch {
                index: i + 1,
                ours: info.mode.clone(),
                theirs: r.mode.clone(),
                our_ticks: info.ticks_asked.clone(),
                their_ticks: r.ticks_asked.clone(),
            });
        }
        info.clients += r.clients;
        info.processes += r.processes.max(1);
        info.measured_s = info.measured_s.max(raw.measured_s);
        info.latency_valid &= r.latency_valid;
        rec.merge(Recorder::from_raw(&raw.recorder));
        drifts.extend_from_slice(&raw.drifts_ns);
        tally = tally.add(Tally::of_report(r));
        for (k, v) in &r.failures {
            *failures.entry(k.clone()).or_insert(0) += v;
        }
        for (k, v) in &r.closes {
            *closes.entry(k.clone()).or_insert(0) += v;
        }
    }
    Ok(build(info, &rec, drifts, tally, failures, closes, keep_raw))
}

pub fn print_table(r: &Report) {
    let row = |name: &str, p: &Percentiles| {
        println!(
            "  {name:<16} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            p.p50, p.p99, p.p999, p.max
        );
    };
    let processes = if r.processes > 1 {
        format!(", {} probe processes merged", r.processes)
    } else {
        String::new()
    };
    println!("{} ({}), {} s{processes}", r.url, r.mode, r.duration_s);
    println!(
        "  clients {} connected {}  ticks/conn {}..{}  gaps {}  reorders {}",
        r.clients, r.connected, r.ticks_min, r.ticks_max, r.gaps, r.reorders
    );
    println!(
        "  messages {}  pings answered {}  (ticks asked: {})",
        r.messages_total, r.pings_total, r.ticks_asked
    );
    if r.ticks_asked == "none" && r.ticks_total > 0 {
        println!(
            "  ticks=none was asked, but {} ticks arrived: this server does not honour ?ticks=",
            r.ticks_total
        );
    }
    if r.off_stride > 0 {
        println!(
            "  {} steps were not a whole {} (ticks={} asks for one per {})",
            r.off_stride, r.ticks_asked, r.ticks_asked, r.ticks_asked
        );
    }
    println!(
        "  {:<16} {:>10} {:>10} {:>10} {:>10}",
        "µs", "p50", "p99", "p99.9", "max"
    );
    row("interval jitter", &r.interval_jitter_us);
    row("fan-out spread", &r.spread_us);
    row("latency", &r.latency_us);
    let rate = r
        .drift_us_per_min
        .map_or(String::new(), |per_min| format!("; {per_min:.1} µs/min"));
    println!(
        "  drift {:.1} µs over the {} s run (median over connections{rate}; worst {:.1} µs)",
        r.drift_us, r.duration_s, r.drift_us_max_abs
    );
    if r.latency_valid {
        println!("  latency: probe and server share this host's clock, so it is valid");
    } else {
        println!(
            "  latency: compares two hosts' clocks; valid only as far as they are synchronised"
        );
    }
    for (k, v) in &r.failures {
        println!("  failed: {v} × {k}");
    }
    for (k, v) in &r.closes {
        println!("  closed by server: {v} × {k}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Arrival;

    #[test]
    fn drift_is_a_rate_only_for_runs_of_a_minute_or_more() {
        // A 10 s run's drift is not scaled up six times into a rate.
        assert_eq!(drift_per_min(-75.0, 10.0), None);
        assert_eq!(drift_per_min(-75.0, 59.9), None);
        assert_eq!(drift_per_min(-75.0, 60.0), Some(-75.0));
        assert_eq!(drift_per_min(-9.9, 600.0), Some(-0.99));
    }

    fn info(clients: usize) -> RunInfo {
        RunInfo {
            label: None,
            url: "ws://127.0.0.1:1/ws".into(),
            mode: "ws".into(),
            ticks_asked: "all".into(),
            clients,
            processes: 1,
            measured_s: 2.0,
            latency_valid: true,
        }
    }

    /// One process's report over `conns` connections, each `offset_ms` late on every tick.
    fn process(conns: usize, offset_ms: &[f64], keep_raw: bool) -> Report {
        let mut rec = Recorder::default();
        let mut tracks = vec![ConnTrack::default(); conns];
        for n in 0..16u64 {
            for (c, t) in tracks.iter_mut().enumerate() {
                let at_ms = n as f64 * 125.0 + offset_ms[c % offset_ms.len()];
                t.observe(
                    Arrival {
                        count: n,
                        bpm: 120.0,
                        ppqn: 4,
                        scheduled_us: Some(n as i64 * 125_000),
                        at_ns: (at_ms * 1e6) as i64,
                    },
                    &mut rec,
                );
            }
        }
        let drifts = tracks.iter().filter_map(ConnTrack::drift_ns).collect();
        let tally = Tally::of_tracks(&tracks, 16 * conns as u64, 1);
        build(
            info(conns),
            &rec,
            drifts,
            tally,
            BTreeMap::new(),
            BTreeMap::new(),
            keep_raw,
        )
    }

    #[test]
    fn merged_reports_measure_the_spread_across_processes() {
        // Each process alone sees its clients within 1 ms; together they are 5 ms apart.
        let a = process(3, &[1.0, 2.0], true);
        let b = process(2, &[6.0], true);
        assert!(a.spread_us.p50 < 1_100.0, "{:?}", a.spread_us);
        let m = merge(vec![a, b], Some("both".into()), false).unwrap();
        assert_eq!(m.processes, 2);
        assert_eq!((m.clients, m.connected), (5, 5));
        assert_eq!((m.ticks_total, m.ticks_min, m.ticks_max), (80, 16, 16));
        assert_eq!(m.messages_total, 80);
        assert_eq!(m.pings_total, 2);
        assert!(
            (m.spread_us.p50 - 5_000.0).abs() < 50.0,
            "{:?}",
            m.spread_us
        );
        assert!(
            (m.latency_us.max - 6_000.0).abs() < 50.0,
            "{:?}",
            m.latency_us
        );
        assert_eq!(m.spread_us.samples, 16);
        assert_eq!(m.label.as_deref(), Some("both"));
        assert!(m.raw.is_none());
    }

    #[test]
    fn a_report_without_raw_data_is_refused() {
        let a = process(1, &[0.0], true);
        let b = process(1, &[0.0], false);
        assert_eq!(
            merge(vec![a, b], None, false).unwrap_err(),
            MergeError::NoRaw(2)
        );
        assert_eq!(merge(vec![], None, false).unwrap_err(), MergeError::Empty);
    }

    #[test]
    fn reports_of_different_runs_are_refused() {
        let a = process(1, &[0.0], true);
        let mut b = process(1, &[0.0], true);
        b.ticks_asked = "none".into();
        assert!(matches!(
            merge(vec![a, b], None, false),
            Err(MergeError::Mismatch { index: 2, .. })
        ));
    }

    #[test]
    fn a_raw_report_round_trips_through_json() {
        let a = process(2, &[0.5, 1.5], true);
        let text = serde_json::to_string(&a).unwrap();
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back.raw, a.raw);
        let m = merge(vec![back], None, false).unwrap();
        assert_eq!(m.spread_us, a.spread_us);
        assert_eq!(m.interval_jitter_us, a.interval_jitter_us);
        assert_eq!(m.drift_us, a.drift_us);
    }
}
