//! The bridge's side of the sync library (`conductor-sync`): its follower started for the
//! bridge, its timeline read through [`TimelineView`], its clock mapping as the emitter's
//! [`ClockMap`], and what `main` says about the connection.
//!
//! This module owns no clock-sync or timeline arithmetic: all of it is the library's, shared
//! with the probe and every other native client. It adds the adapters, [`Watcher`] (a pure
//! function from successive sync states to the lines worth logging), and the handoff to the
//! emitter.
//!
//! The handoff: the main thread waits for each new state on the follower's condition variable
//! and pushes it into a wait-free `rtrb` ring ([`Relay`]); the emitter drains the ring to the
//! newest ([`FollowerFeed`]). The emitter does not read the library's sequence lock itself:
//! a reader of that lock spins while the writer is between its two stores, and a `SCHED_FIFO`
//! reader spinning on the core where the follower (normal priority) was preempted mid-store
//! keeps it from finishing. On a loaded 2-core machine that stalled the emitter for seconds.

use std::time::{Duration, Instant};

use rtrb::{Consumer, Producer, RingBuffer};

use conductor_sync::{
    ClockMapping, Follower, FollowerConfig, RealClock, SyncError, SyncState, Timeline,
    TransportState,
};

use crate::emitter::{ClockMap, Feed};
use crate::grid::TimelineView;

impl TimelineView for Timeline {
    fn tick_time_ns(&self, count: u64) -> i64 {
        Timeline::tick_time_ns(self, count)
    }
    fn first_count_at_or_after(&self, server_ns: i64) -> u64 {
        Timeline::first_count_at_or_after(self, server_ns)
    }
    fn plays(&self, count: u64) -> bool {
        Timeline::plays(self, count)
    }
    fn ppqn(&self) -> u32 {
        Timeline::ppqn(self)
    }
    fn beats_per_bar(&self) -> u32 {
        Timeline::beats_per_bar(self)
    }
    fn bpm(&self) -> f64 {
        Timeline::bpm(self)
    }
    fn anchor_count(&self) -> u64 {
        Timeline::anchor_count(self)
    }
    fn transport_from(&self) -> u64 {
        self.transport_count()
    }
    fn transport_playing(&self) -> bool {
        self.transport_state() == TransportState::Playing
    }
}

impl ClockMap for ClockMapping {
    fn to_local(&self, server_ns: i64) -> i64 {
        ClockMapping::to_local(self, server_ns)
    }
    fn to_server(&self, local_ns: i64) -> i64 {
        ClockMapping::to_server(self, local_ns)
    }
}

/// The follower, started for the bridge.
pub struct Follow {
    follower: Follower,
    epoch: Instant,
}

impl Follow {
    /// Starts following `url` (a `ws://` endpoint) on the library's own thread, on the real
    /// monotonic clock.
    pub fn start(url: &str, token: Option<String>) -> Result<Follow, SyncError> {
        let mut cfg = FollowerConfig::new(url);
        cfg.token = token;
        cfg.name = "bridge-follower".into();
        // The instant of the library's local nanosecond 0, for the emitter's sleeps: read
        // back to back, a few tens of nanoseconds apart, once.
        let local = RealClock.now_ns();
        let now = Instant::now();
        let epoch = now
            .checked_sub(Duration::from_nanos(u64::try_from(local).unwrap_or(0)))
            .unwrap_or(now);
        Ok(Follow {
            follower: Follower::start(cfg)?,
            epoch,
        })
    }

    /// The newest state (for `main`; the emitter reads through [`Self::feed`]).
    pub fn state(&self) -> SyncState {
        self.follower.state()
    }

    /// The emitter's wait-free view of the follower, and the relay that feeds it.
    pub fn feed(&self) -> (FollowerFeed, Relay) {
        let (producer, consumer) = RingBuffer::new(HANDOFF_RING);
        (
            FollowerFeed {
                states: consumer,
                latest: None,
                epoch: self.epoch,
            },
            Relay {
                states: producer,
                pending: None,
            },
        )
    }

    /// Waits up to `timeout` for a state newer than `version`: `Ok(None)` when none came,
    /// `Err` (what happened) when the follower thread has ended.
    pub fn next_state(&self, version: u64, timeout: Duration) -> Result<Option<SyncState>, String> {
        match self.follower.wait_until(timeout, |s| s.version > version) {
            Ok(state) => Ok(Some(state)),
            Err(SyncError::Timeout(_)) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Waits up to `timeout` for the first timeline and clock mapping.
    pub fn wait_synced(&self, timeout: Duration) -> Result<SyncState, SyncError> {
        self.follower.wait_synced(timeout)
    }
}

/// States the ring holds: the main thread hands over a few a second.
const HANDOFF_RING: usize = 64;

/// What the emitter needs of a state.
type Synced = (Timeline, ClockMapping);

/// The main thread's end of the handoff.
pub struct Relay {
    states: Producer<Synced>,
    /// The newest state, when the ring was full (the emitter stalled): sent on the next try.
    pending: Option<Synced>,
}

impl Relay {
    /// Hands `state` to the emitter, once it has a timeline and a clock mapping.
    pub fn forward(&mut self, state: &SyncState) {
        if let (Some(tl), Some(map)) = (state.timeline, state.mapping) {
            self.pending = Some((tl, map));
        }
        self.flush();
    }

    /// Retries a state the ring had no room for.
    pub fn flush(&mut self) {
        if let Some(s) = self.pending
            && self.states.push(s).is_ok()
        {
            self.pending = None;
        }
    }
}

/// The emitter's end: pops never block or allocate.
pub struct FollowerFeed {
    states: Consumer<Synced>,
    latest: Option<Synced>,
    epoch: Instant,
}

impl Feed for FollowerFeed {
    type Timeline = Timeline;
    type Map = ClockMapping;

    fn latest(&mut self) -> Option<Synced> {
        while let Ok(s) = self.states.pop() {
            self.latest = Some(s);
        }
        self.latest
    }

    fn epoch(&self) -> Instant {
        self.epoch
    }
}

/// One line for the log.
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    Info(String),
    Warn(String),
}

/// Turns the follower's successive states into the lines a person wants to read: the first
/// sync, a lost connection (once, however many retries follow), the return with the size of
/// the clock correction, and tempo and transport changes.
#[derive(Debug, Default)]
pub struct Watcher {
    version: Option<u64>,
    synced: bool,
    connected: bool,
    /// When the connection was lost, by the state's local clock, and the offset then.
    lost: Option<(Instant, i64)>,
    tempo: Option<(u64, u32)>,
    transport: Option<(TransportState, u64)>,
}

impl Watcher {
    pub fn observe(&mut self, state: &SyncState) -> Vec<Report> {
        let mut out = Vec::new();
        if self.version == Some(state.version) {
            return out;
        }
        self.version = Some(state.version);
        let (Some(tl), Some(map)) = (state.timeline, state.mapping) else {
            if self.connected && !state.connected {
                out.push(Report::Warn(
                    "lost the server before the first sync; retrying with backoff".into(),
                ));
            }
            self.connected = state.connected;
            return out;
        };
        if !self.synced {
            self.synced = true;
            out.push(Report::Info(format!(
                "synced: server clock {:+.3} ms from this machine's wall clock (± {:.3} ms); \
                 {} BPM, ppqn {}, {}/4; transport {} from count {}",
                (map.offset_ns() - RealClock::unix_at_zero_ns()) as f64 / 1e6,
                map.error_bound_ns() as f64 / 1e6,
                tl.bpm(),
                tl.ppqn(),
                tl.beats_per_bar(),
                tl.transport_state().label(),
                tl.transport_count(),
            )));
        } else if self.connected && !state.connected {
            self.lost = Some((Instant::now(), map.offset_ns()));
            out.push(Report::Warn(format!(
                "lost the server; running on the last timeline ({} BPM, transport {}) and \
                 reconnecting with backoff",
                tl.bpm(),
                tl.transport_state().label()
            )));
        } else if !self.connected
            && state.connected
            && let Some((at, offset)) = self.lost.take()
        {
            out.push(Report::Info(format!(
                "server back after {:.1} s; clock correction {:+.3} ms",
                at.elapsed().as_secs_f64(),
                (map.offset_ns() - offset) as f64 / 1e6
            )));
        }
        self.connected = state.connected;
        let tempo = (tl.anchor_count(), (tl.bpm() * 1000.0).round() as u32);
        if self.tempo.is_some_and(|t| t != tempo) {
            out.push(Report::Info(format!(
                "tempo {} BPM from count {}",
                tl.bpm(),
                tl.anchor_count()
            )));
        }
        self.tempo = Some(tempo);
        let transport = (tl.transport_state(), tl.transport_count());
        if self.transport.is_some_and(|t| t != transport) {
            out.push(Report::Info(format!(
                "transport {} from count {}",
                transport.0.label(),
                transport.1
            )));
        }
        self.transport = Some(transport);
        out
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    //! Timelines for the plans' unit tests: the server's `timeline` event, parsed by the
    //! library exactly as the follower parses it.
    use conductor_sync::Timeline;
    use serde_json::json;

    /// Tick `anchor_count` at `anchor_ns` (whole µs, as the event carries), 4/4, the transport
    /// `playing` (or not) from count `from`, the opposite before it (unless `from` is 0).
    pub fn timeline(
        bpm: f64,
        ppqn: u32,
        anchor_count: u64,
        anchor_ns: i64,
        playing: bool,
        from: u64,
    ) -> Timeline {
        timeline_with(bpm, ppqn, 4, anchor_count, anchor_ns, playing, from)
    }

    /// Count 0 at a fixed instant, with `bpb` beats in a bar.
    pub fn timeline_bars(bpm: f64, ppqn: u32, bpb: u32, playing: bool, from: u64) -> Timeline {
        timeline_with(bpm, ppqn, bpb, 0, 1_700_000_000_000_000_000, playing, from)
    }

    fn timeline_with(
        bpm: f64,
        ppqn: u32,
        bpb: u32,
        anchor_count: u64,
        anchor_ns: i64,
        playing: bool,
        from: u64,
    ) -> Timeline {
        let event = json!({"event": "timeline", "data": {
            "count": anchor_count,
            "time_us": anchor_ns / 1000,
            "bpm": bpm,
            "ppqn": ppqn,
            "beats_per_bar": bpb,
            "transport": {
                "state": if playing { "playing" } else { "stopped" },
                "count": from,
                "time_us": 0,
            },
        }});
        Timeline::from_event(&event).expect("a valid timeline event")
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::timeline;
    use super::*;

    fn state(version: u64, connected: bool, tl: Timeline, offset_ns: i64) -> SyncState {
        SyncState {
            timeline: Some(tl),
            mapping: Some(ClockMapping::fixed(0, offset_ns, 0.0)),
            connected,
            version,
            connects: 1,
        }
    }

    #[test]
    fn the_watcher_says_each_change_once() {
        let t0 = 1_700_000_000_000_000_000;
        let tl = timeline(120.0, 4, 0, t0, true, 0);
        let mut w = Watcher::default();
        let lines = w.observe(&state(1, true, tl, 5_000_000));
        assert_eq!(lines.len(), 1);
        assert!(matches!(&lines[0], Report::Info(l) if l.starts_with("synced")));
        // The same publication again, and a newer one with nothing new: silence.
        assert!(w.observe(&state(1, true, tl, 5_000_000)).is_empty());
        assert!(w.observe(&state(2, true, tl, 5_000_100)).is_empty());
        // Lost: one warning, however many states follow while it is away.
        let lines = w.observe(&state(3, false, tl, 5_000_100));
        assert!(matches!(&lines[..], [Report::Warn(l)] if l.starts_with("lost the server")));
        for v in 4..10 {
            assert!(w.observe(&state(v, false, tl, 5_000_100)).is_empty());
        }
        // Back, with the size of the correction.
        let lines = w.observe(&state(10, true, tl, 5_250_100));
        assert!(
            matches!(&lines[..], [Report::Info(l)] if l.starts_with("server back") && l.ends_with("correction +0.250 ms")),
            "{lines:?}"
        );
        // A tempo change and a stop.
        let faster = timeline(140.0, 4, 100, t0 + 12_500_000_000, false, 104);
        let lines = w.observe(&state(11, true, faster, 5_250_100));
        assert_eq!(
            lines,
            [
                Report::Info("tempo 140 BPM from count 100".into()),
                Report::Info("transport stopped from count 104".into()),
            ]
        );
    }
}
