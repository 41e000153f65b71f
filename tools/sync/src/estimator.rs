//! Clock sync: how this device's clock maps to the server's, from ping/pong exchanges.
//!
//! This module owns the estimator described in `docs/protocol.md#clock-sync` (the same
//! description `www/conductor.js` implements). It is pure: samples come in with their four
//! timestamps, the mapping comes out; it reads no clock and sends nothing, so it is tested
//! against synthetic paths with a fake clock.
//!
//! In short: each exchange gives a forward bound `a = t1 − t0 = θ + up` and a backward one
//! `b = t2 − t3 = θ − down` on the offset θ (server − local). Over a window, the offset line
//! `θ(L) = c + r·L` lies below every `a` and above every `b`; the estimate takes the *lowest*
//! forward and the *highest* backward value separately (the minimum delay of each direction),
//! with the rate `r` chosen by a linear programme that hugs both envelopes, and puts θ halfway
//! between them. Samples whose round trip is far above the window's minimum are dropped first.
//! Once settled, a new estimate is not stepped to but slewed in at a bounded rate.

use std::collections::VecDeque;

/// Tuning of [`ClockSync`]. The defaults are what `docs/protocol.md#clock-sync` describes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClockSyncConfig {
    /// Samples older than this (local time, before the newest) leave the window.
    pub window_ns: i64,
    /// At most this many samples are kept.
    pub max_samples: usize,
    /// The largest rate a clock may have against the server's (ppm). Fitted rates are clamped
    /// to it, and while the rate is uncertain, old samples are trusted only as far as a rate
    /// this large could have moved them.
    pub max_rate_ppm: f64,
    /// How wide the fitted rate's uncertainty is taken: `rate_confidence · J / (n · T)` for
    /// `n` samples over `T` ns whose median excess over their envelope is `J` ns. 32 covers
    /// the fit's error in 99 % of simulated cases (docs/protocol.md#clock-sync).
    pub rate_confidence: f64,
    /// The estimator is settled (and slews from then on) once its first sample is this old...
    pub settle_ns: i64,
    /// ...and it has seen this many samples.
    pub settle_samples: usize,
    /// The fastest a settled mapping moves towards a new estimate (ppm: µs per second).
    pub max_slew_ppm: f64,
    /// A settled mapping steps instead of slewing when the correction is larger than this.
    pub step_ns: i64,
    /// A sample is an outlier when its round trip exceeds the window's minimum by more than
    /// `max(outlier_floor_ns, outlier_factor · (median − minimum))`.
    pub outlier_floor_ns: i64,
    pub outlier_factor: f64,
}

impl Default for ClockSyncConfig {
    fn default() -> Self {
        ClockSyncConfig {
            window_ns: 60_000_000_000,
            max_samples: 256,
            max_rate_ppm: 250.0,
            rate_confidence: 32.0,
            settle_ns: 3_000_000_000,
            settle_samples: 8,
            max_slew_ppm: 2000.0,
            step_ns: 20_000_000,
            outlier_floor_ns: 2_000_000,
            outlier_factor: 3.0,
        }
    }
}

/// One ping/pong exchange: `t0` local send, `t1` server receive, `t2` server send, `t3` local
/// receive, all in ns (local ns on this device's clock, server unix ns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub t0: i64,
    pub t1: i64,
    pub t2: i64,
    pub t3: i64,
}

impl Sample {
    /// The round trip less the server's holding time.
    pub fn rtt_ns(&self) -> i64 {
        (self.t3 - self.t0) - (self.t2 - self.t1)
    }

    /// The classic single-exchange offset estimate `((t1 − t0) + (t2 − t3)) / 2`.
    pub fn offset_ns(&self) -> i64 {
        ((self.t1 - self.t0) + (self.t2 - self.t3)) / 2
    }
}

/// Local ↔ server time, as estimated at one moment. `Copy`, so a real-time thread can hold and
/// use it without locking or allocating.
///
/// The offset (server − local) at local time `L` is `offset + rate·(L − anchor)`, plus the part
/// of a correction still being slewed in: `residual · (1 − (L − anchor)/slew)` while
/// `L − anchor < slew`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClockMapping {
    pub(crate) anchor_ns: i64,
    pub(crate) offset_ns: i64,
    pub(crate) rate: f64,
    pub(crate) residual_ns: i64,
    pub(crate) slew_ns: i64,
    pub(crate) error_bound_ns: i64,
    pub(crate) min_rtt_ns: i64,
    pub(crate) samples: u32,
    pub(crate) settled: bool,
}

impl ClockMapping {
    /// A mapping that is exactly `offset_ns` and `rate_ppm` (tests, and a known clock).
    pub fn fixed(anchor_ns: i64, offset_ns: i64, rate_ppm: f64) -> ClockMapping {
        ClockMapping {
            anchor_ns,
            offset_ns,
            rate: rate_ppm * 1e-6,
            residual_ns: 0,
            slew_ns: 0,
            error_bound_ns: 0,
            min_rtt_ns: 0,
            samples: 0,
            settled: true,
        }
    }

    /// Server − local at local time `local_ns`.
    pub fn offset_at(&self, local_ns: i64) -> i64 {
        let dt = local_ns.saturating_sub(self.anchor_ns);
        let drift = (dt as f64 * self.rate).round() as i64;
        self.offset_ns
            .saturating_add(drift)
            .saturating_add(self.residual_at(dt))
    }

    fn residual_at(&self, dt: i64) -> i64 {
        if self.residual_ns == 0 || dt <= 0 {
            return self.residual_ns;
        }
        if dt >= self.slew_ns {
            return 0;
        }
        (self.residual_ns as f64 * (1.0 - dt as f64 / self.slew_ns as f64)).round() as i64
    }

    /// The server's clock when this device's clock reads `local_ns`.
    pub fn to_server(&self, local_ns: i64) -> i64 {
        local_ns.saturating_add(self.offset_at(local_ns))
    }

    /// This device's clock when the server's reads `server_ns` (the inverse of
    /// [`Self::to_server`], to a nanosecond or two).
    pub fn to_local(&self, server_ns: i64) -> i64 {
        // server = anchor + dt + offset + rate·dt + residual(dt), piecewise linear in dt and
        // increasing (|rate| and the slew are far below 1): solve each piece, keep the one
        // whose dt lies in it.
        let base = i128::from(server_ns) - i128::from(self.anchor_ns) - i128::from(self.offset_ns);
        let base = base as f64;
        let rho = self.residual_ns as f64;
        let settled_dt = base / (1.0 + self.rate);
        let dt = if self.residual_ns == 0 || settled_dt >= self.slew_ns as f64 {
            settled_dt
        } else {
            let slewing = (base - rho) / (1.0 + self.rate - rho / self.slew_ns as f64);
            if slewing > 0.0 {
                slewing
            } else {
                (base - rho) / (1.0 + self.rate)
            }
        };
        self.anchor_ns.saturating_add(dt.round() as i64)
    }

    /// The estimated offset (server − local) at the anchor, correction included, ns.
    pub fn offset_ns(&self) -> i64 {
        self.offset_ns + self.residual_ns
    }

    /// The estimated rate of the server's clock against this one, ppm: positive when this
    /// clock is slow.
    pub fn rate_ppm(&self) -> f64 {
        self.rate * 1e6
    }

    /// How far the true offset can be from this estimate, on the estimator's evidence: half the
    /// sum of the two directions' minimum delays, plus any correction not yet slewed in. It
    /// cannot see asymmetry: a path faster one way than the other shifts the truth by half the
    /// difference, within this bound.
    pub fn error_bound_ns(&self) -> i64 {
        self.error_bound_ns
    }

    /// The shortest round trip in the window, ns.
    pub fn min_rtt_ns(&self) -> i64 {
        self.min_rtt_ns
    }

    /// The correction still being slewed in at the anchor, ns.
    pub fn residual_ns(&self) -> i64 {
        self.residual_ns
    }

    /// The local instant this mapping was estimated at.
    pub fn anchor_ns(&self) -> i64 {
        self.anchor_ns
    }

    /// Samples the estimate used.
    pub fn samples(&self) -> u32 {
        self.samples
    }

    /// Whether the estimator had settled: from then on it slews rather than steps.
    pub fn settled(&self) -> bool {
        self.settled
    }
}

/// The estimate from the current window, before slewing.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Estimate {
    offset_ns: i64,
    rate: f64,
    error_bound_ns: i64,
    min_rtt_ns: i64,
    kept: usize,
    rate_uncertainty: f64,
}

/// The estimator: feed it samples, read the mapping.
#[derive(Clone, Debug)]
pub struct ClockSync {
    cfg: ClockSyncConfig,
    samples: VecDeque<Sample>,
    /// The last well-determined rate: the prior after a reset, until the window holds enough
    /// samples to fit one.
    rate: f64,
    published: Option<ClockMapping>,
    settled: bool,
    first_t3: Option<i64>,
    since_reset: usize,
}

impl Default for ClockSync {
    fn default() -> Self {
        ClockSync::new(ClockSyncConfig::default())
    }
}

impl ClockSync {
    pub fn new(cfg: ClockSyncConfig) -> ClockSync {
        let cap = cfg.max_samples.max(1);
        ClockSync {
            cfg,
            samples: VecDeque::with_capacity(cap + 1),
            rate: 0.0,
            published: None,
            settled: false,
            first_t3: None,
            since_reset: 0,
        }
    }

    pub fn config(&self) -> &ClockSyncConfig {
        &self.cfg
    }

    /// Adds one exchange and returns the new mapping. An impossible sample (the reply before
    /// the request, a negative round trip beyond timer resolution, a round trip over a minute)
    /// is ignored and the mapping stays as it was.
    pub fn add_sample(
        &mut self,
        t0_local_ns: i64,
        t1_server_ns: i64,
        t2_server_ns: i64,
        t3_local_ns: i64,
    ) -> Option<ClockMapping> {
        let s = Sample {
            t0: t0_local_ns,
            t1: t1_server_ns,
            t2: t2_server_ns,
            t3: t3_local_ns,
        };
        let elapsed = s.t3.checked_sub(s.t0);
        let held = s.t2.checked_sub(s.t1);
        // The two clocks may be any distance apart, but less than 2⁶² ns (146 years), so that
        // differences of offsets fit.
        let sane = |d: Option<i64>| d.is_some_and(|d| d.unsigned_abs() < 1 << 62);
        let plausible = matches!((elapsed, held), (Some(e), Some(h))
            if (0..60_000_000_000).contains(&e) && (0..60_000_000_000).contains(&h) && e - h > -1_000_000)
            && sane(s.t1.checked_sub(s.t0))
            && sane(s.t2.checked_sub(s.t3));
        if !plausible || self.samples.back().is_some_and(|last| s.t3 < last.t3) {
            return self.published;
        }
        self.samples.push_back(s);
        while self.samples.len() > self.cfg.max_samples.max(1)
            || self
                .samples
                .front()
                .is_some_and(|f| s.t3 - f.t3 > self.cfg.window_ns)
        {
            self.samples.pop_front();
        }
        self.since_reset += 1;
        let first = *self.first_t3.get_or_insert(s.t3);
        let est = self.estimate()?;
        if est.rate_uncertainty < 0.25 * self.cfg.max_rate_ppm * 1e-6 {
            self.rate = est.rate;
        }
        let now = s.t3;
        let fresh = ClockMapping {
            anchor_ns: now,
            offset_ns: est.offset_ns,
            rate: est.rate,
            residual_ns: 0,
            slew_ns: 0,
            error_bound_ns: est.error_bound_ns,
            min_rtt_ns: est.min_rtt_ns,
            samples: u32::try_from(est.kept).unwrap_or(u32::MAX),
            settled: self.settled,
        };
        let next = match self.published {
            Some(p) if self.settled => {
                let residual = p.offset_at(now) - est.offset_ns;
                if residual.abs() > self.cfg.step_ns || self.cfg.max_slew_ppm <= 0.0 {
                    fresh
                } else {
                    let slew = (residual.abs() as f64 / (self.cfg.max_slew_ppm * 1e-6)).ceil();
                    ClockMapping {
                        residual_ns: residual,
                        slew_ns: slew as i64,
                        error_bound_ns: est.error_bound_ns + residual.abs(),
                        ..fresh
                    }
                }
            }
            _ => fresh,
        };
        self.published = Some(next);
        if self.since_reset >= self.cfg.settle_samples && now - first >= self.cfg.settle_ns {
            self.settled = true;
        }
        self.published
    }

    /// The current mapping, if any sample has come in.
    pub fn mapping(&self) -> Option<ClockMapping> {
        self.published
    }

    /// The samples in the window, oldest first.
    pub fn samples(&self) -> impl ExactSizeIterator<Item = &Sample> {
        self.samples.iter()
    }

    /// Whether the estimator has settled (it slews from then on).
    pub fn settled(&self) -> bool {
        self.settled
    }

    /// Forgets the samples, for a new path to the server (a reconnect): the old path's
    /// minimum delays say nothing about the new one. The mapping, the rate and the settled
    /// state stay, so the next estimate is slewed in rather than stepped to.
    pub fn reset_path(&mut self) {
        self.samples.clear();
        self.first_t3 = None;
        self.since_reset = 0;
    }

    /// The estimate from the window: outliers dropped, the rate fitted, the offset halfway
    /// between the two envelopes at the newest sample, old samples discounted by what the
    /// rate's uncertainty could have moved them.
    fn estimate(&mut self) -> Option<Estimate> {
        let newest = *self.samples.back()?;
        let mut rtts: Vec<i64> = self.samples.iter().map(Sample::rtt_ns).collect();
        rtts.sort_unstable();
        let min_rtt = rtts[0];
        let median = rtts[rtts.len() / 2];
        let limit = min_rtt
            + (self.cfg.outlier_floor_ns as f64)
                .max(self.cfg.outlier_factor * (median - min_rtt) as f64) as i64;
        // Everything relative to the newest sample and the oldest forward value, so that f64
        // holds it exactly enough (unix ns do not fit a double's 53 bits).
        let at = newest.t3;
        let base = self.samples[0].t1 - self.samples[0].t0;
        let x = |s: &Sample| (s.t0 - at) as f64;
        let a = |s: &Sample| (s.t1 - s.t0 - base) as f64;
        let y = |s: &Sample| (s.t3 - at) as f64;
        let b = |s: &Sample| (s.t2 - s.t3 - base) as f64;
        let all = (
            self.samples.iter().map(x).collect::<Vec<_>>(),
            self.samples.iter().map(a).collect::<Vec<_>>(),
            self.samples.iter().map(y).collect::<Vec<_>>(),
            self.samples.iter().map(b).collect::<Vec<_>>(),
        );
        // The rate is fitted on the samples whose round trip is near the shortest: a delayed
        // one would weigh in the fit. (It cannot move the envelopes below: a delay only ever
        // raises a forward value and lowers a backward one.)
        let kept: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.rtt_ns() <= limit)
            .collect();
        let n = kept.len();
        let span = (at - kept.iter().map(|s| s.t0).min().unwrap_or(at)) as f64;
        let max_rate = self.cfg.max_rate_ppm.max(0.0) * 1e-6;
        let (rate, uncertainty) = if n >= 4 && span >= 1e9 {
            let (xs, a, ys, b): (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) = (
                kept.iter().map(|s| x(s)).collect(),
                kept.iter().map(|s| a(s)).collect(),
                kept.iter().map(|s| y(s)).collect(),
                kept.iter().map(|s| b(s)).collect(),
            );
            let rate = fit_rate(&xs, &a, &ys, &b, max_rate);
            let (lo, hi) = envelopes(&xs, &a, &ys, &b, rate);
            let mut excess: Vec<f64> = xs
                .iter()
                .zip(&a)
                .map(|(x, a)| a - rate * x - lo)
                .chain(ys.iter().zip(&b).map(|(y, b)| hi - (b - rate * y)))
                .collect();
            excess.sort_by(f64::total_cmp);
            let typical = excess[excess.len() / 2];
            let sigma = self.cfg.rate_confidence * typical / (n as f64 * span);
            (rate, sigma.min(2.0 * max_rate))
        } else {
            (self.rate.clamp(-max_rate, max_rate), 2.0 * max_rate)
        };
        // The offset now is at most the lowest forward value and at least the highest backward
        // value, for any rate the clock may have: A grows with the rate and B too (every sample
        // is in the past), so the bounds are A at the fastest rate and B at the slowest.
        let fastest = (rate + uncertainty).min(max_rate);
        let slowest = (rate - uncertainty).max(-max_rate);
        let (upper, _) = envelopes(&all.0, &all.1, &all.2, &all.3, fastest);
        let (_, lower) = envelopes(&all.0, &all.1, &all.2, &all.3, slowest);
        Some(Estimate {
            offset_ns: base + ((upper + lower) / 2.0).round() as i64,
            rate,
            error_bound_ns: ((upper - lower) / 2.0).max(0.0).round() as i64,
            min_rtt_ns: min_rtt,
            kept: n,
            rate_uncertainty: uncertainty,
        })
    }
}

/// `(A, B)` at rate `r`: the lowest forward value `min(aᵢ − r·xᵢ)` and the highest backward
/// value `max(bᵢ − r·yᵢ)`, both at x = 0 (the newest sample).
fn envelopes(xs: &[f64], a: &[f64], ys: &[f64], b: &[f64], r: f64) -> (f64, f64) {
    let lo = xs
        .iter()
        .zip(a)
        .map(|(x, a)| a - r * x)
        .fold(f64::INFINITY, f64::min);
    let hi = ys
        .iter()
        .zip(b)
        .map(|(y, b)| b - r * y)
        .fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

/// The rate that minimises the total distance of the forward values above their lower line
/// and the backward values below their upper line, both lines of slope `r` (a linear
/// programme; the objective is convex and piecewise linear in `r`).
///
/// Its slope is `n · g(r)` with `g(r) = (x* − mean x) + (mean y − y*)`, where `x*` is the time
/// of the forward sample on the lower line and `y*` that of the backward sample on the upper
/// one; `g` never decreases, so the optimum is where it changes sign, found by bisection. Where
/// `g` is zero over an interval, the middle of it.
fn fit_rate(xs: &[f64], a: &[f64], ys: &[f64], b: &[f64], max_rate: f64) -> f64 {
    let n = xs.len() as f64;
    let mean_x = xs.iter().sum::<f64>() / n;
    let mean_y = ys.iter().sum::<f64>() / n;
    let g = |r: f64| {
        let mut best = (f64::INFINITY, 0.0);
        for (x, a) in xs.iter().zip(a) {
            let v = a - r * x;
            if v < best.0 {
                best = (v, *x);
            }
        }
        let mut top = (f64::NEG_INFINITY, 0.0);
        for (y, b) in ys.iter().zip(b) {
            let v = b - r * y;
            if v > top.0 {
                top = (v, *y);
            }
        }
        (best.1 - mean_x) + (mean_y - top.1)
    };
    // The boundary of {r : below(r)} within [−max, max], by bisection.
    let boundary = |below: &dyn Fn(f64) -> bool| {
        let (mut lo, mut hi) = (-max_rate, max_rate);
        if !below(lo) {
            return lo;
        }
        if below(hi) {
            return hi;
        }
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            if below(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        0.5 * (lo + hi)
    };
    let start = boundary(&|r| g(r) < 0.0);
    let end = boundary(&|r| g(r) <= 0.0);
    0.5 * (start + end)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A deterministic generator for the synthetic paths (splitmix64).
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Rng {
            Rng(seed)
        }
        pub fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// Uniform in [0, 1).
        pub fn unit(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }
        /// Uniform in [−1, 1).
        pub fn sym(&mut self) -> f64 {
            2.0 * self.unit() - 1.0
        }
    }

    /// A synthetic path and device: the server's clock is the truth; the device's clock reads
    /// `offset + t·(1 + skew)` at true time t. Delays are `base ± jitter` (uniform) per
    /// direction, and with probability `burst_p` a direction stalls `burst` more.
    #[derive(Clone, Copy)]
    pub struct Path {
        pub offset_ns: i64,
        pub skew_ppm: f64,
        pub up_ns: f64,
        pub down_ns: f64,
        pub jitter_ns: f64,
        pub burst_p: f64,
        pub burst_ns: f64,
    }

    impl Path {
        pub fn symmetric(one_way_ms: f64, jitter_ms: f64) -> Path {
            Path {
                offset_ns: 3_217_000_000,
                skew_ppm: 0.0,
                up_ns: one_way_ms * 1e6,
                down_ns: one_way_ms * 1e6,
                jitter_ns: jitter_ms * 1e6,
                burst_p: 0.0,
                burst_ns: 0.0,
            }
        }

        pub fn local(&self, t: f64) -> i64 {
            self.offset_ns + (t * (1.0 + self.skew_ppm * 1e-6)).round() as i64
        }

        /// True time at local reading `l`.
        pub fn truth(&self, l: i64) -> f64 {
            (l - self.offset_ns) as f64 / (1.0 + self.skew_ppm * 1e-6)
        }

        fn delay(&self, base: f64, rng: &mut Rng) -> f64 {
            let mut d = (base + self.jitter_ns * rng.sym()).max(0.0);
            // The burst draw comes from its own stream, so that a path with bursts has the
            // same jitter as the one without.
            let mut bursts = Rng::new(rng.0 ^ 0x5555_5555_5555_5555);
            if bursts.unit() < self.burst_p {
                d += self.burst_ns;
            }
            d
        }

        /// One exchange starting at true time `t` (ns); the server holds it 20 µs.
        pub fn exchange(&self, t: f64, rng: &mut Rng) -> Sample {
            let t1 = t + self.delay(self.up_ns, rng);
            let t2 = t1 + 20_000.0;
            let t3 = t2 + self.delay(self.down_ns, rng);
            Sample {
                t0: self.local(t),
                t1: t1.round() as i64,
                t2: t2.round() as i64,
                t3: self.local(t3),
            }
        }
    }

    /// The default ping schedule (docs/protocol.md#clock-sync): every 100 ms for 10 s, then
    /// every 250 ms.
    pub fn ping_times(seconds: f64) -> Vec<f64> {
        let mut out = Vec::new();
        let mut t = 1_000_000_000_000.0; // an arbitrary true start
        let start = t;
        while t - start < seconds * 1e9 {
            out.push(t);
            t += if t - start < 10e9 { 100e6 } else { 250e6 };
        }
        out
    }

    /// Runs the estimator over a path and returns, for each sample after the first `skip_s`
    /// seconds, the error of the published mapping (ns) at the moment of the sample.
    pub fn run(path: &Path, seconds: f64, seed: u64, skip_s: f64) -> (ClockSync, Vec<f64>) {
        let mut rng = Rng::new(seed);
        let mut sync = ClockSync::default();
        let times = ping_times(seconds);
        let start = times[0];
        let mut errors = Vec::new();
        for t in times {
            let s = path.exchange(t, &mut rng);
            let m = sync.add_sample(s.t0, s.t1, s.t2, s.t3).expect("a mapping");
            if t - start >= skip_s * 1e9 {
                errors.push(m.to_server(s.t3) as f64 - path.truth(s.t3));
            }
        }
        (sync, errors)
    }

    pub fn percentile(values: &[f64], p: f64) -> f64 {
        let mut v: Vec<f64> = values.iter().map(|e| e.abs()).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[((v.len() - 1) as f64 * p).round() as usize]
    }

    /// The estimator conductor.js used before (median of the best third by round trip), for
    /// comparison.
    fn old_estimate(samples: &[Sample]) -> i64 {
        let mut sorted: Vec<_> = samples.to_vec();
        sorted.sort_by_key(Sample::rtt_ns);
        let limit = sorted[0].rtt_ns() + (sorted[0].rtt_ns() / 2).max(250_000);
        let keep = sorted.len().div_ceil(3);
        let mut offs: Vec<i64> = sorted
            .iter()
            .take(keep)
            .filter(|s| s.rtt_ns() <= limit)
            .map(Sample::offset_ns)
            .collect();
        offs.sort_unstable();
        let m = offs.len() / 2;
        if offs.len() % 2 == 1 {
            offs[m]
        } else {
            (offs[m - 1] + offs[m]) / 2
        }
    }

    #[test]
    fn exact_on_a_clean_path_whatever_the_offset() {
        for offset in [
            -1_700_000_000_000_000_000i64,
            -5_000_000_000,
            0,
            42,
            9_000_000_000,
        ] {
            let path = Path {
                offset_ns: offset,
                ..Path::symmetric(40.0, 0.0)
            };
            let (sync, errors) = run(&path, 5.0, 1, 0.0);
            // While the rate is unknown, even the newest sample's forward value is a round trip
            // old, so the bound allows ±250 ppm of it: 10 µs here. From 1 s on, exact.
            assert!(
                percentile(&errors, 1.0) < 15e3,
                "offset {offset}: {errors:?}"
            );
            assert!(
                errors[10..].iter().all(|e| e.abs() < 2.0),
                "offset {offset}: {errors:?}"
            );
            let m = sync.mapping().unwrap();
            assert!((m.error_bound_ns() - 40_000_000).abs() < 10, "{m:?}");
            assert_eq!(m.min_rtt_ns(), 80_000_000);
        }
    }

    /// The errors (ns) of the new estimator and of the old one (over its 30 latest samples),
    /// at every sample from `skip_s` on, over `seeds` runs of `seconds` on `path`.
    fn compare(path: &Path, seconds: f64, skip_s: f64, seeds: u64) -> (Vec<f64>, Vec<f64>) {
        let mut new_err = Vec::new();
        let mut old_err = Vec::new();
        for seed in 0..seeds {
            let mut rng = Rng::new(seed);
            let mut sync = ClockSync::default();
            let mut window: Vec<Sample> = Vec::new();
            let times = ping_times(seconds);
            let start = times[0];
            for t in times {
                let s = path.exchange(t, &mut rng);
                let m = sync.add_sample(s.t0, s.t1, s.t2, s.t3).unwrap();
                window.push(s);
                if window.len() > 30 {
                    window.remove(0);
                }
                if t - start >= skip_s * 1e9 {
                    let truth = path.truth(s.t3);
                    new_err.push(m.to_server(s.t3) as f64 - truth);
                    old_err.push((s.t3 + old_estimate(&window)) as f64 - truth);
                }
            }
        }
        let ms = |e: &[f64], p| percentile(e, p) / 1e6;
        eprintln!(
            "new p50 {:.3} p99 {:.3} max {:.3} ms; old p50 {:.3} p99 {:.3} max {:.3} ms",
            ms(&new_err, 0.5),
            ms(&new_err, 0.99),
            ms(&new_err, 1.0),
            ms(&old_err, 0.5),
            ms(&old_err, 0.99),
            ms(&old_err, 1.0)
        );
        (new_err, old_err)
    }

    #[test]
    fn beats_the_old_estimator_under_jitter() {
        // 40 ± 10 ms each way, as in the outside check; 60 s, from 5 s on.
        let (new, old) = compare(&Path::symmetric(40.0, 10.0), 60.0, 5.0, 20);
        let (n50, n99) = (percentile(&new, 0.5), percentile(&new, 0.99));
        let (o50, o99) = (percentile(&old, 0.5), percentile(&old, 0.99));
        assert!(n99 < 1.0e6, "new estimator p99 {n99} ns");
        assert!(n99 * 2.0 < o99, "new p99 {n99} vs old {o99}");
        assert!(n50 * 2.0 < o50, "new p50 {n50} vs old {o50}");
    }

    #[test]
    fn heavy_jitter_and_bursts_after_warm_up() {
        // 150 ± 30 ms each way (300 ms round trip), 5 % of each direction stalled 300 ms, a
        // clock 150 ppm slow. From 30 s on. What 4 pings a second can do on this path: about
        // 2.5 ms at p99 (the old estimator: about 10).
        let path = Path {
            burst_p: 0.05,
            burst_ns: 300e6,
            skew_ppm: -150.0,
            ..Path::symmetric(150.0, 30.0)
        };
        let (new, old) = compare(&path, 90.0, 30.0, 10);
        let (n50, n99) = (percentile(&new, 0.5), percentile(&new, 0.99));
        assert!(n50 < 1.0e6, "p50 {n50} ns");
        assert!(n99 < 3.5e6, "p99 {n99} ns");
        assert!(
            n99 * 2.0 < percentile(&old, 0.99),
            "new p99 {n99} ns vs old"
        );
    }

    #[test]
    fn bursts_do_not_move_the_estimate() {
        let clean = Path::symmetric(60.0, 5.0);
        let bursty = Path {
            burst_p: 0.2,
            burst_ns: 300e6,
            ..clean
        };
        for seed in 0..5 {
            let (_, a) = run(&clean, 40.0, seed, 10.0);
            let (_, b) = run(&bursty, 40.0, seed, 10.0);
            let (pa, pb) = (percentile(&a, 0.99), percentile(&b, 0.99));
            // The stalled samples never touch either envelope: what remains is the clean path's
            // samples, fewer of them.
            assert!(
                pb < pa + 1.0e6 && pb < 1.5e6,
                "seed {seed}: clean {pa} bursty {pb}"
            );
        }
    }

    #[test]
    fn recovers_offset_and_rate_of_a_skewed_clock() {
        for skew in [-200.0, -37.0, 150.0, 200.0] {
            let path = Path {
                offset_ns: -4_000_000_000,
                skew_ppm: skew,
                ..Path::symmetric(20.0, 5.0)
            };
            let (sync, errors) = run(&path, 60.0, 7, 15.0);
            let m = sync.mapping().unwrap();
            // The rate: the server's clock against the device's is 1/(1+skew) − 1 ≈ −skew.
            let want = (1.0 / (1.0 + skew * 1e-6) - 1.0) * 1e6;
            assert!(
                (m.rate_ppm() - want).abs() < 10.0,
                "skew {skew}: rate {} want {want}",
                m.rate_ppm()
            );
            assert!(percentile(&errors, 1.0) < 1.0e6, "skew {skew}: {errors:?}");
            // Between measurements the mapping carries on at that rate: 20 s without a sample
            // later it is still within half a millisecond.
            let later = path.local(1_000_000_000_000.0 + 80e9);
            let err = m.to_server(later) as f64 - path.truth(later);
            assert!(err.abs() < 0.5e6, "skew {skew}: {err} ns after 20 s alone");
        }
    }

    #[test]
    fn an_asymmetric_path_is_off_by_half_the_asymmetry() {
        // 20 ms up, 100 ms down: round-trip sync cannot tell, and is 40 ms off (server behind).
        let path = Path {
            up_ns: 20e6,
            down_ns: 100e6,
            jitter_ns: 2e6,
            ..Path::symmetric(0.0, 0.0)
        };
        let (sync, errors) = run(&path, 30.0, 3, 10.0);
        for e in &errors {
            assert!(
                (e + 40e6).abs() < 0.4e6,
                "error {e} ns, expected −40 ms ± 0.4"
            );
        }
        assert!(sync.mapping().unwrap().error_bound_ns() >= 40_000_000);
    }

    #[test]
    fn once_settled_it_slews_instead_of_stepping() {
        let mut rng = Rng::new(1);
        // A settled estimator; then the path changes (the uplink gets 6 ms faster, so the
        // estimate moves by 3 ms) and the published offset is watched between samples.
        let mut sync = ClockSync::default();
        let path = Path::symmetric(30.0, 0.0);
        let times = ping_times(20.0);
        for t in &times {
            let s = path.exchange(*t, &mut rng);
            sync.add_sample(s.t0, s.t1, s.t2, s.t3);
        }
        assert!(sync.settled());
        let before = sync.mapping().unwrap();
        let faster = Path {
            up_ns: 24e6,
            ..path
        };
        sync.reset_path();
        let t = times.last().unwrap() + 500e6;
        let s = faster.exchange(t, &mut rng);
        let after = sync.add_sample(s.t0, s.t1, s.t2, s.t3).unwrap();
        // At the sample the published offset is continuous with the one before...
        assert!((after.offset_at(s.t3) - before.offset_at(s.t3)).abs() <= 1);
        // ...and reaches the new estimate (3 ms lower, to within the 10 µs a single sample's
        // round trip allows) at 2000 ppm: in 1.5 s, no sooner.
        let r = after.residual_ns();
        assert!((r - 3_000_000).abs() < 20_000, "{r}");
        // What is left of the correction dt after the sample.
        let target = ClockMapping {
            residual_ns: 0,
            ..after
        };
        let left = |dt: i64| after.offset_at(s.t3 + dt) - target.offset_at(s.t3 + dt);
        assert_eq!(left(0), r);
        // 3 ms at 2000 ppm: 1.5 s.
        assert!((after.slew_ns - 1_500_000_000).abs() < 20_000_000);
        assert!(
            (left(after.slew_ns / 2) - r / 2).abs() <= 2,
            "half of it half way"
        );
        assert!(
            left(after.slew_ns - 10_000_000) > 0,
            "some of it until the end"
        );
        assert_eq!(left(after.slew_ns), 0, "none after");
    }

    #[test]
    fn a_large_correction_steps() {
        let mut rng = Rng::new(5);
        let mut sync = ClockSync::default();
        let path = Path::symmetric(10.0, 0.0);
        for t in ping_times(10.0) {
            let s = path.exchange(t, &mut rng);
            sync.add_sample(s.t0, s.t1, s.t2, s.t3);
        }
        assert!(sync.settled());
        // The device's clock was stepped by 2 s (a VM resumed): no slewing over 33 minutes.
        let jumped = Path {
            offset_ns: path.offset_ns + 2_000_000_000,
            ..path
        };
        sync.reset_path();
        let s = jumped.exchange(1_000_000_000_000.0 + 11e9, &mut rng);
        let m = sync.add_sample(s.t0, s.t1, s.t2, s.t3).unwrap();
        assert_eq!(m.residual_ns(), 0);
        assert!((m.to_server(s.t3) as f64 - jumped.truth(s.t3)).abs() < 10e3);
    }

    #[test]
    fn impossible_samples_are_ignored() {
        let mut sync = ClockSync::default();
        assert_eq!(
            sync.add_sample(100, 5_000, 5_010, 90),
            None,
            "reply before request"
        );
        assert_eq!(
            sync.add_sample(100, 5_010, 5_000, 200),
            None,
            "server sent before it got it"
        );
        assert_eq!(
            sync.add_sample(0, 0, 0, 61_000_000_000),
            None,
            "a minute-long trip"
        );
        let m = sync.add_sample(0, 1_000, 1_000, 2_000).unwrap();
        assert_eq!(m.offset_ns(), 0);
        assert_eq!(
            sync.add_sample(0, 1_000, 1_000, 1_000),
            Some(m),
            "older than the newest"
        );
        assert_eq!(sync.samples().len(), 1);
    }

    #[test]
    fn converges_within_a_millisecond_in_three_seconds_on_a_city_path() {
        // 20 ± 5 ms each way, skew 200 ppm, clock 7 s off.
        let path = Path {
            offset_ns: 7_000_000_000,
            skew_ppm: 200.0,
            ..Path::symmetric(20.0, 5.0)
        };
        let mut errors = Vec::new();
        for seed in 0..20 {
            errors.extend(run(&path, 20.0, seed, 3.0).1);
        }
        let (p50, p99) = (percentile(&errors, 0.5), percentile(&errors, 0.99));
        eprintln!(
            "20±5 ms, 200 ppm, from 3 s: p50 {:.3} p99 {:.3} ms",
            p50 / 1e6,
            p99 / 1e6
        );
        assert!(p99 < 1.0e6, "p99 {p99} ns");
    }

    #[test]
    fn the_window_forgets_old_samples() {
        let cfg = ClockSyncConfig {
            max_samples: 16,
            ..ClockSyncConfig::default()
        };
        let mut sync = ClockSync::new(cfg);
        for i in 0..100 {
            let t = i * 1_000_000_000;
            sync.add_sample(t, t + 10, t + 10, t + 20);
        }
        assert_eq!(sync.samples().len(), 16);
        let mut sync = ClockSync::default();
        for i in 0..100 {
            let t = i * 2_000_000_000;
            sync.add_sample(t, t + 10, t + 10, t + 20);
        }
        // 60 s at one sample every 2 s.
        assert_eq!(sync.samples().len(), 31);
    }

    proptest! {
        /// to_local inverts to_server, also while a correction is being slewed in.
        #[test]
        fn to_local_inverts_to_server(
            offset in -2_000_000_000_000_000_000i64..2_000_000_000_000_000_000,
            rate_ppm in -500.0f64..500.0, residual in -20_000_000i64..20_000_000,
            dt in -100_000_000_000i64..100_000_000_000,
        ) {
            let m = ClockMapping {
                residual_ns: residual,
                slew_ns: (residual.abs() as f64 / 1e-3).ceil() as i64,
                ..ClockMapping::fixed(5_000_000_000, offset, rate_ppm)
            };
            let local = 5_000_000_000 + dt;
            let back = m.to_local(m.to_server(local));
            prop_assert!((back - local).abs() <= 2, "{} vs {}", back, local);
        }

        /// to_server never goes backwards as local time advances.
        #[test]
        fn mappings_are_monotonic(
            rate_ppm in -500.0f64..500.0, residual in -20_000_000i64..20_000_000,
            dt in -30_000_000_000i64..30_000_000_000, step in 1i64..10_000_000,
        ) {
            let m = ClockMapping {
                residual_ns: residual,
                slew_ns: (residual.abs() as f64 / 1e-3).ceil() as i64,
                ..ClockMapping::fixed(0, 1_000_000, rate_ppm)
            };
            prop_assert!(m.to_server(dt + step) >= m.to_server(dt));
        }
    }
}
