//! The server's timeline as a client holds it: when every tick is due, and which ticks play.
//!
//! This module owns the tick arithmetic on the client side and the parsing of the `timeline`
//! event. It is pure: no clock, no socket. Times are the server's unix nanoseconds; turning them
//! into local time is [`crate::ClockMapping`]'s business.
//!
//! The arithmetic is the server's own (`src/tempo.rs`): tick `anchor + k` is due at
//! `anchor_ns + floor(k · 60·10¹² / (bpm_milli · ppqn))` ns, computed from the anchor every time,
//! so nothing accumulates. The wire gives the anchor in whole microseconds (`time_us`), so a
//! client's instants are at most 1 µs before the server's, never more.

use serde_json::Value;

use crate::error::SyncError;

/// Nanoseconds in a minute times the thousandths of a BPM: the numerator of every interval.
const SCALED_NANOS_PER_MINUTE: i128 = 60_000_000_000 * 1000;

/// The highest tempo the server accepts whatever its flags say (`src/tempo.rs`).
const BPM_CEILING: f64 = 1000.0;

/// The largest `ppqn` the server accepts.
const PPQN_CEILING: u32 = 960;

/// One tempo from an anchor tick on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tempo {
    /// The first tick at this tempo.
    pub count: u64,
    /// Its instant, server unix ns.
    pub time_ns: i64,
    /// Thousandths of a beat per minute, as the server holds tempos.
    pub bpm_milli: u32,
    pub ppqn: u32,
}

impl Tempo {
    fn divisor(&self) -> i128 {
        i128::from(self.bpm_milli) * i128::from(self.ppqn)
    }

    /// When tick `count` is due on this tempo's grid, also for counts before the anchor (the
    /// grid extended backwards, as far as this tempo knows).
    pub fn tick_time_ns(&self, count: u64) -> i64 {
        let d = self.divisor();
        let t = if count >= self.count {
            let k = i128::from(count - self.count);
            i128::from(self.time_ns) + k * SCALED_NANOS_PER_MINUTE / d
        } else {
            let k = i128::from(self.count - count);
            i128::from(self.time_ns) - k * SCALED_NANOS_PER_MINUTE / d
        };
        clamp_i64(t)
    }

    /// The first count whose instant is at or after `server_ns` on this grid.
    pub fn first_count_at_or_after(&self, server_ns: i64) -> u64 {
        let d = self.divisor();
        let x = i128::from(server_ns) - i128::from(self.time_ns);
        let n = if x >= 0 {
            // floor(k·S/d) ≥ x  ⟺  k ≥ x·d/S (x an integer).
            let k = (x * d + SCALED_NANOS_PER_MINUTE - 1) / SCALED_NANOS_PER_MINUTE;
            i128::from(self.count) + k
        } else {
            // Before the anchor: tick anchor − j is at anchor_ns − floor(j·S/d), which is ≥
            // server_ns while floor(j·S/d) ≤ −x, i.e. j·S < (−x + 1)·d.
            let limit = (-x + 1) * d;
            let j = (limit - 1) / SCALED_NANOS_PER_MINUTE; // the largest j with j·S < limit
            i128::from(self.count) - j
        };
        u64::try_from(n.max(0)).unwrap_or(u64::MAX)
    }

    /// The exact interval between ticks, ns (fractional).
    pub fn interval_ns(&self) -> f64 {
        SCALED_NANOS_PER_MINUTE as f64 / self.divisor() as f64
    }

    pub fn bpm(&self) -> f64 {
        f64::from(self.bpm_milli) / 1000.0
    }
}

fn clamp_i64(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

/// Whether ticks are played.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportState {
    Playing,
    Stopped,
}

impl TransportState {
    /// The wire name.
    pub fn label(self) -> &'static str {
        match self {
            TransportState::Playing => "playing",
            TransportState::Stopped => "stopped",
        }
    }

    fn other(self) -> TransportState {
        match self {
            TransportState::Playing => TransportState::Stopped,
            TransportState::Stopped => TransportState::Playing,
        }
    }
}

/// The transport: `state` from tick `count` on, `before` until then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transport {
    pub state: TransportState,
    /// The first tick in `state`.
    pub count: u64,
    /// That tick's instant, server unix ns.
    pub time_ns: i64,
    /// The state before `count`. The wire does not say; a change is assumed (a stop follows
    /// playing, a start follows silence) unless an earlier timeline told otherwise.
    pub before: TransportState,
}

impl Transport {
    /// Parses a `transport` event's data (`{"state", "count", "time_us"}`). The state before is
    /// taken to be the other one (a change happened at `count`).
    pub fn from_event(data: &Value) -> Result<Transport, SyncError> {
        let state = match data.get("state").and_then(Value::as_str) {
            Some("playing") => TransportState::Playing,
            Some("stopped") => TransportState::Stopped,
            _ => return Err(bad("transport state must be \"playing\" or \"stopped\"")),
        };
        let count = field_u64(data, "count")?;
        let time_ns = field_us_as_ns(data, "time_us")?;
        Ok(Transport {
            state,
            count,
            time_ns,
            before: if count == 0 { state } else { state.other() },
        })
    }

    pub fn state_at(&self, count: u64) -> TransportState {
        if count >= self.count {
            self.state
        } else {
            self.before
        }
    }
}

/// Where a `start` may fall (the `quantize` of the `start` message).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantize {
    Bar,
    Beat,
    None,
}

impl Quantize {
    pub fn label(self) -> &'static str {
        match self {
            Quantize::Bar => "bar",
            Quantize::Beat => "beat",
            Quantize::None => "none",
        }
    }
}

/// The server's `timeline` event: the tempo from its anchor on, the tempo before it (when this
/// client saw it), the bar length and the transport.
///
/// Keeping the previous tempo matters for a change announced ahead: until the new anchor, ticks
/// still fall on the old grid.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timeline {
    current: Tempo,
    earlier: Option<Tempo>,
    beats_per_bar: u32,
    transport: Transport,
}

impl Timeline {
    /// Parses a `timeline` event: the whole message `{"event":"timeline","data":{...}}` or its
    /// `data` alone.
    pub fn from_event(value: &Value) -> Result<Timeline, SyncError> {
        let data = match value.get("event") {
            Some(Value::String(name)) if name == "timeline" => value
                .get("data")
                .ok_or_else(|| bad("the timeline event has no data"))?,
            Some(other) => {
                return Err(SyncError::NotATimeline(
                    other.as_str().unwrap_or("(not a string)").to_string(),
                ));
            }
            None => value,
        };
        if !data.is_object() {
            return Err(bad("timeline data must be an object"));
        }
        let count = field_u64(data, "count")?;
        let time_ns = field_us_as_ns(data, "time_us")?;
        let bpm = data
            .get("bpm")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("timeline has no numeric bpm"))?;
        if !(bpm.is_finite() && bpm > 0.0 && bpm <= BPM_CEILING) {
            return Err(bad(&format!("timeline bpm {bpm} is outside (0, 1000]")));
        }
        let bpm_milli = ((bpm * 1000.0).round() as u32).max(1);
        let ppqn = u32::try_from(field_u64(data, "ppqn")?)
            .ok()
            .filter(|p| (1..=PPQN_CEILING).contains(p))
            .ok_or_else(|| bad("timeline ppqn must be 1 to 960"))?;
        let beats_per_bar = match data.get("beats_per_bar") {
            None | Some(Value::Null) => 4,
            Some(v) => v
                .as_u64()
                .and_then(|b| u32::try_from(b).ok())
                .filter(|b| (1..=64).contains(b))
                .ok_or_else(|| bad("timeline beats_per_bar must be 1 to 64"))?,
        };
        let current = Tempo {
            count,
            time_ns,
            bpm_milli,
            ppqn,
        };
        let transport = match data.get("transport") {
            // A server without a transport always plays, from tick 0.
            None | Some(Value::Null) => Transport {
                state: TransportState::Playing,
                count: 0,
                time_ns: current.tick_time_ns(0),
                before: TransportState::Playing,
            },
            Some(t) => Transport::from_event(t)?,
        };
        Ok(Timeline {
            current,
            earlier: None,
            beats_per_bar,
            transport,
        })
    }

    /// A timeline from its parts (tests, and clients that learn the timeline elsewhere).
    pub fn new(current: Tempo, beats_per_bar: u32, transport: Transport) -> Timeline {
        Timeline {
            current,
            earlier: None,
            beats_per_bar: beats_per_bar.max(1),
            transport,
        }
    }

    pub(crate) fn set_earlier(&mut self, earlier: Option<Tempo>) {
        self.earlier = earlier;
    }

    /// `next`, as it follows this timeline: ticks before `next`'s anchor keep this timeline's
    /// grid, and an unchanged transport keeps what this one knew of the state before it.
    pub fn followed_by(&self, next: Timeline) -> Timeline {
        let mut out = next;
        if next.current.count > self.current.count {
            out.earlier = Some(self.current);
        } else if next.current.count == self.current.count {
            out.earlier = self.earlier;
        }
        let (old, new) = (self.transport, next.transport);
        out.transport.before = if old.state == new.state && old.count == new.count {
            old.before
        } else {
            old.state_at(new.count.saturating_sub(1))
        };
        out
    }

    /// This timeline with `transport` instead (as it follows this one's).
    pub fn with_transport(&self, transport: Transport) -> Timeline {
        self.followed_by(Timeline { transport, ..*self })
    }

    /// When tick `count` is due, server unix ns (the server's arithmetic).
    pub fn tick_time_ns(&self, count: u64) -> i64 {
        match self.earlier {
            Some(e) if count < self.current.count => e.tick_time_ns(count),
            _ => self.current.tick_time_ns(count),
        }
    }

    /// The first count due at or after `server_ns`.
    pub fn first_count_at_or_after(&self, server_ns: i64) -> u64 {
        match self.earlier {
            Some(e) if server_ns < self.current.time_ns => {
                e.first_count_at_or_after(server_ns).min(self.current.count)
            }
            _ => self.current.first_count_at_or_after(server_ns),
        }
    }

    /// Whether tick `count` is played (the transport plays at it).
    pub fn plays(&self, count: u64) -> bool {
        self.transport.state_at(count) == TransportState::Playing
    }

    /// The tempo from the anchor on.
    pub fn bpm(&self) -> f64 {
        self.current.bpm()
    }

    pub fn ppqn(&self) -> u32 {
        self.current.ppqn
    }

    pub fn beats_per_bar(&self) -> u32 {
        self.beats_per_bar
    }

    /// The tempo segment from the anchor on.
    pub fn tempo(&self) -> Tempo {
        self.current
    }

    /// The tempo before the anchor, when this client saw it.
    pub fn earlier_tempo(&self) -> Option<Tempo> {
        self.earlier
    }

    /// The first tick at the current tempo.
    pub fn anchor_count(&self) -> u64 {
        self.current.count
    }

    /// The interval at the current tempo, ns.
    pub fn interval_ns(&self) -> f64 {
        self.current.interval_ns()
    }

    pub fn transport(&self) -> Transport {
        self.transport
    }

    pub fn transport_state(&self) -> TransportState {
        self.transport.state
    }

    /// The first tick of the current transport state.
    pub fn transport_count(&self) -> u64 {
        self.transport.count
    }

    /// That tick's instant, server unix ns.
    pub fn transport_time_ns(&self) -> i64 {
        self.transport.time_ns
    }
}

fn bad(what: &str) -> SyncError {
    SyncError::BadTimeline(what.to_string())
}

fn field_u64(v: &Value, name: &'static str) -> Result<u64, SyncError> {
    v.get(name)
        .and_then(Value::as_u64)
        .ok_or_else(|| bad(&format!("{name} must be a non-negative integer")))
}

/// A µs field (integer, or a float from other servers) as ns.
fn field_us_as_ns(v: &Value, name: &'static str) -> Result<i64, SyncError> {
    let field = v.get(name);
    if let Some(us) = field.and_then(Value::as_i64) {
        return us
            .checked_mul(1000)
            .ok_or_else(|| bad(&format!("{name} is out of range")));
    }
    match field.and_then(Value::as_f64) {
        Some(us) if us.is_finite() && us.abs() < 9.0e15 => Ok((us * 1000.0).round() as i64),
        _ => Err(bad(&format!("{name} must be a number of microseconds"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn event(count: u64, time_us: u64, bpm: f64, transport: Value) -> Value {
        json!({"event": "timeline", "data": {
            "count": count, "time_us": time_us, "time": time_us / 1000, "bpm": bpm, "ppqn": 4,
            "beats_per_bar": 4, "interval_us": 60e6 / (bpm * 4.0), "transport": transport,
        }})
    }

    fn playing_from(count: u64) -> Value {
        json!({"state": "playing", "count": count, "time_us": 0, "time": 0})
    }

    #[test]
    fn parses_the_servers_event_and_predicts_ticks() {
        let t = Timeline::from_event(&event(1200, 1_764_043_196_000_000, 120.0, playing_from(0)))
            .unwrap();
        assert_eq!(t.bpm(), 120.0);
        assert_eq!(t.ppqn(), 4);
        assert_eq!(t.beats_per_bar(), 4);
        assert_eq!(t.tick_time_ns(1200), 1_764_043_196_000_000_000);
        assert_eq!(t.tick_time_ns(1208), 1_764_043_197_000_000_000);
        assert_eq!(t.first_count_at_or_after(1_764_043_197_000_000_000), 1208);
        assert_eq!(t.first_count_at_or_after(1_764_043_197_000_000_001), 1209);
        assert!(t.plays(5) && t.plays(1300));
        // The data alone parses too.
        let data = event(1, 2, 90.0, Value::Null)["data"].clone();
        assert_eq!(Timeline::from_event(&data).unwrap().bpm(), 90.0);
    }

    #[test]
    fn awkward_tempos_use_the_servers_integer_arithmetic() {
        // 133.333 BPM, ppqn 4: 112,500,281.25… ns; the server floors k·S/d from the anchor.
        let t = Timeline::from_event(&event(0, 1_000_000, 133.333, playing_from(0))).unwrap();
        let d = 133_333i128 * 4;
        for k in [1u64, 3, 1000, 10_000_000] {
            let exact = 1_000_000_000i128 + i128::from(k) * 60_000_000_000_000 / d;
            assert_eq!(i128::from(t.tick_time_ns(k)), exact, "tick {k}");
        }
    }

    #[test]
    fn transport_decides_what_plays() {
        let stop = json!({"state": "stopped", "count": 48, "time_us": 6_000_000, "time": 6000});
        let t = Timeline::from_event(&event(0, 0, 120.0, stop)).unwrap();
        assert!(t.plays(47), "a stop follows playing");
        assert!(!t.plays(48) && !t.plays(100));
        let start = json!({"state": "playing", "count": 64, "time_us": 8_000_000, "time": 8000});
        let next = t.followed_by(Timeline::from_event(&event(0, 0, 120.0, start)).unwrap());
        assert_eq!(next.transport().before, TransportState::Stopped);
        assert!(!next.plays(63), "silent until the start");
        assert!(next.plays(64));
        assert_eq!(next.transport_count(), 64);
        assert_eq!(next.transport_time_ns(), 8_000_000_000);
    }

    #[test]
    fn a_transport_event_alone_changes_the_transport() {
        let t = Timeline::from_event(&event(0, 0, 120.0, playing_from(0))).unwrap();
        let stop =
            Transport::from_event(&json!({"state": "stopped", "count": 40, "time_us": 5_000_000}))
                .unwrap();
        let s = t.with_transport(stop);
        assert!(s.plays(39) && !s.plays(40));
        assert_eq!(s.tempo(), t.tempo());
        assert!(
            Transport::from_event(&json!({"state": "paused", "count": 1, "time_us": 1})).is_err()
        );
    }

    #[test]
    fn a_tempo_change_ahead_keeps_the_old_grid_until_its_anchor() {
        let old = Timeline::from_event(&event(0, 0, 120.0, playing_from(0))).unwrap();
        // 140 BPM from tick 100 (at 12.5 s on the old grid).
        let new = old.followed_by(
            Timeline::from_event(&event(100, 12_500_000, 140.0, playing_from(0))).unwrap(),
        );
        assert_eq!(new.tick_time_ns(99), old.tick_time_ns(99));
        assert_eq!(new.tick_time_ns(100), 12_500_000_000);
        assert_eq!(
            new.tick_time_ns(101),
            12_500_000_000 + 60_000_000_000_000 / (140_000 * 4)
        );
        assert_eq!(new.first_count_at_or_after(12_375_000_000), 99);
        assert_eq!(new.first_count_at_or_after(12_400_000_000), 100);
        assert_eq!(new.earlier_tempo().map(|t| t.bpm_milli), Some(120_000));
        // The same timeline again changes nothing.
        assert_eq!(new.followed_by(new), new);
    }

    #[test]
    fn refuses_what_is_not_a_timeline() {
        let cases = [
            json!({"event": "tick", "data": {}}),
            json!({"event": "timeline"}),
            json!({"event": "timeline", "data": 5}),
            json!({"count": 1, "time_us": 1, "bpm": "fast", "ppqn": 4}),
            json!({"count": 1, "time_us": 1, "bpm": 0, "ppqn": 4}),
            json!({"count": 1, "time_us": 1, "bpm": 120, "ppqn": 0}),
            json!({"count": -1, "time_us": 1, "bpm": 120, "ppqn": 4}),
            json!({"count": 1, "bpm": 120, "ppqn": 4}),
            json!({"count": 1, "time_us": 1, "bpm": 120, "ppqn": 4, "transport": {"state": "x"}}),
        ];
        for c in cases {
            let err = Timeline::from_event(&c).expect_err(&c.to_string());
            assert!(!err.to_string().is_empty());
        }
    }

    proptest! {
        /// first_count_at_or_after is the exact inverse of tick_time_ns, before and after the
        /// anchor, at any tempo.
        #[test]
        fn first_count_inverts_tick_time(
            anchor in 1_000u64..1_000_000, bpm_milli in 1_000u32..1_000_000, ppqn in 1u32..960,
            at in -10_000_000_000i64..10_000_000_000,
        ) {
            let t = Tempo { count: anchor, time_ns: 5_000_000_000_000, bpm_milli, ppqn };
            let ns = t.time_ns + at;
            let n = t.first_count_at_or_after(ns);
            prop_assert!(t.tick_time_ns(n) >= ns || n == 0);
            if n > 0 {
                prop_assert!(t.tick_time_ns(n - 1) < ns, "n {} ns {}", n, ns);
            }
        }

        /// Ticks never go back and are an interval apart to the nanosecond.
        #[test]
        fn ticks_are_monotonic_and_evenly_spaced(
            bpm_milli in 1_000u32..1_000_000, ppqn in 1u32..960, from in 0u64..1_000_000,
        ) {
            let t = Tempo { count: 500_000, time_ns: 0, bpm_milli, ppqn };
            let iv = t.interval_ns();
            for n in from..from + 50 {
                let gap = (t.tick_time_ns(n + 1) - t.tick_time_ns(n)) as f64;
                prop_assert!((gap - iv).abs() <= 1.0, "gap {} interval {}", gap, iv);
            }
        }
    }
}
