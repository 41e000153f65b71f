//! The OSC plan: which messages an OSC target gets next, and at which server instant.
//!
//! Pure, like [`crate::midi_plan`]: [`OscPlan::step`] maps (what was sent, the timeline, now)
//! to the next [`OscStep`]; the OSC output turns a step into messages or one bundle.
//!
//! The events follow the server's own ticks (its ppqn, not MIDI's 24):
//! * `tick` on every tick the server plays (sends), with its count;
//! * `beat` on played ticks that begin a beat, `bar` on those that begin a bar (the server's bar
//!   lines: counts that are multiples of ppqn × beats per bar);
//! * `transport` on the first tick of each new transport state, and once on joining;
//! * `tempo` on the first tick of each new tempo (the timeline's anchor), and once on joining.
//!
//! Several events on one tick form one step, in the order a receiver wants to read them:
//! transport, tempo, bar, beat, tick.

use crate::grid::TimelineView;

/// How many ticks the plan may fall behind (sending them late, at once) before it skips to the
/// current one, or stand ahead (after the grid moved later) before it gives up waiting: a late
/// trigger is still useful to a sequencer counting steps; a burst of many is noise.
pub const RELOCATE_TICKS: u64 = 2;

/// Which messages one step carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OscEvents {
    pub transport: bool,
    pub tempo: bool,
    pub bar: bool,
    pub beat: bool,
    pub tick: bool,
}

impl OscEvents {
    pub fn is_empty(&self) -> bool {
        !(self.transport || self.tempo || self.bar || self.beat || self.tick)
    }
}

/// What a step's messages say.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OscStep {
    /// Server nanoseconds at which the messages take effect.
    pub at_ns: i64,
    pub events: OscEvents,
    /// The tick the step belongs to: the tick's count, the first tick of the transport state
    /// or tempo being announced.
    pub count: u64,
    /// Whether the transport plays from `count` (for `transport`).
    pub playing: bool,
    pub bpm: f64,
    pub ppqn: u32,
    pub beats_per_bar: u32,
    /// The plan once this step has been sent.
    pub then: OscPlan,
}

/// What the plan remembers between steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OscPlan {
    /// The next tick to consider; `None` until the first timeline.
    cursor: Option<u64>,
    /// The tempo last announced: (anchor count, bpm), to notice a new one.
    told_tempo: Option<(u64, u64)>,
    /// The transport state last announced.
    told_playing: Option<bool>,
    last_at: i64,
}

impl Default for OscPlan {
    fn default() -> Self {
        OscPlan::new()
    }
}

impl OscPlan {
    pub fn new() -> OscPlan {
        OscPlan {
            cursor: None,
            told_tempo: None,
            told_playing: None,
            last_at: i64::MIN,
        }
    }

    /// The next step, given the newest timeline and now (server ns, advanced by the output's
    /// nudge and, for bundles, by how far ahead they are sent).
    pub fn step<T: TimelineView>(&self, tl: &T, now: i64) -> OscStep {
        let expected = tl.first_count_at_or_after(now);
        let cursor = match self.cursor {
            None => return self.join(tl, now, expected),
            Some(c) => c,
        };
        if cursor.saturating_add(RELOCATE_TICKS) < expected
            || cursor > expected.saturating_add(1 + RELOCATE_TICKS)
        {
            return OscPlan {
                cursor: Some(expected),
                ..*self
            }
            .tick_step(tl, expected);
        }
        self.tick_step(tl, cursor)
    }

    /// First timeline: announce the transport and the tempo at once, then follow the ticks.
    fn join<T: TimelineView>(&self, tl: &T, now: i64, next: u64) -> OscStep {
        let at = now.max(self.last_at);
        let playing = tl.plays(next);
        let then = OscPlan {
            cursor: Some(next),
            told_tempo: Some(tempo_key(tl)),
            told_playing: Some(playing),
            last_at: at,
        };
        OscStep {
            at_ns: at,
            events: OscEvents {
                transport: true,
                tempo: true,
                ..OscEvents::default()
            },
            count: next,
            playing,
            bpm: tl.bpm(),
            ppqn: tl.ppqn(),
            beats_per_bar: tl.beats_per_bar(),
            then,
        }
    }

    fn tick_step<T: TimelineView>(&self, tl: &T, n: u64) -> OscStep {
        let ppqn = u64::from(tl.ppqn().max(1));
        let bar = ppqn * u64::from(tl.beats_per_bar().max(1));
        let playing = tl.plays(n);
        let key = tempo_key(tl);
        let mut events = OscEvents {
            transport: self.told_playing != Some(playing),
            // A new tempo is announced on its first tick, or on the next one when it was
            // learned after that tick had passed.
            tempo: self.told_tempo != Some(key) && n >= tl.anchor_count(),
            ..OscEvents::default()
        };
        if playing {
            events.tick = true;
            events.beat = n.is_multiple_of(ppqn);
            events.bar = n.is_multiple_of(bar);
        }
        let at = tl.tick_time_ns(n).max(self.last_at);
        let then = OscPlan {
            cursor: Some(n + 1),
            told_tempo: if events.tempo {
                Some(key)
            } else {
                self.told_tempo
            },
            told_playing: Some(playing),
            last_at: if events.is_empty() { self.last_at } else { at },
        };
        OscStep {
            at_ns: at,
            events,
            count: n,
            playing,
            bpm: tl.bpm(),
            ppqn: tl.ppqn(),
            beats_per_bar: tl.beats_per_bar(),
            then,
        }
    }
}

/// What identifies a tempo: its first tick and its value (to the thousandth, as the server
/// holds it).
fn tempo_key<T: TimelineView>(tl: &T) -> (u64, u64) {
    (tl.anchor_count(), (tl.bpm() * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::fake::{timeline, timeline_bars};

    const T0: i64 = 1_700_000_000_000_000_000;
    const SIXTEENTH: i64 = 125_000_000;

    fn run<T: TimelineView>(plan: &mut OscPlan, tl: &T, from: i64, until: i64) -> Vec<OscStep> {
        let mut now = from;
        let mut out = Vec::new();
        loop {
            let step = plan.step(tl, now);
            if step.at_ns > until {
                return out;
            }
            now = now.max(step.at_ns);
            *plan = step.then;
            if !step.events.is_empty() {
                out.push(step);
            }
        }
    }

    #[test]
    fn joining_announces_transport_and_tempo_then_ticks_beats_and_bars() {
        let tl = timeline(120.0, 4, 0, T0, true, 0);
        let mut plan = OscPlan::new();
        let join = T0 + 30 * SIXTEENTH + 7;
        let steps = run(&mut plan, &tl, join, T0 + 40 * SIXTEENTH);
        let first = &steps[0];
        assert_eq!(first.at_ns, join);
        assert!(first.events.transport && first.events.tempo && !first.events.tick);
        assert!(first.playing);
        assert_eq!(first.count, 31);
        assert_eq!((first.bpm, first.ppqn, first.beats_per_bar), (120.0, 4, 4));
        let ticks: Vec<&OscStep> = steps[1..].iter().collect();
        assert_eq!(ticks.len(), 10);
        for (i, s) in ticks.iter().enumerate() {
            let n = 31 + i as u64;
            assert_eq!(s.count, n);
            assert_eq!(s.at_ns, tl.tick_time_ns(n));
            assert!(s.events.tick && !s.events.transport && !s.events.tempo);
            assert_eq!(s.events.beat, n.is_multiple_of(4), "count {n}");
            assert_eq!(s.events.bar, n.is_multiple_of(16), "count {n}");
        }
    }

    #[test]
    fn stopped_ticks_are_silent_and_a_start_is_announced_on_its_bar() {
        let tl = timeline(120.0, 4, 0, T0, true, 48);
        let mut plan = OscPlan::new();
        let steps = run(&mut plan, &tl, T0 + 40 * SIXTEENTH, T0 + 50 * SIXTEENTH);
        assert!(!steps[0].playing && steps[0].events.transport);
        let start = &steps[1];
        assert_eq!(start.count, 48);
        assert_eq!(start.at_ns, tl.tick_time_ns(48));
        assert!(start.events.transport && start.playing);
        assert!(start.events.bar && start.events.beat && start.events.tick);
        assert_eq!(steps.len(), 4); // join, 48, 49, 50
    }

    #[test]
    fn a_stop_is_announced_on_the_first_silent_tick() {
        let tl = timeline(120.0, 4, 0, T0, false, 20);
        let mut plan = OscPlan::new();
        let steps = run(&mut plan, &tl, T0 + 10 * SIXTEENTH, T0 + 30 * SIXTEENTH);
        let stop = steps
            .iter()
            .find(|s| s.events.transport && !s.playing)
            .unwrap();
        assert_eq!(stop.count, 20);
        assert_eq!(stop.at_ns, tl.tick_time_ns(20));
        assert!(!stop.events.tick);
        assert_eq!(steps.last().unwrap().count, 20);
    }

    #[test]
    fn a_tempo_change_is_announced_on_its_first_tick() {
        let before = timeline(120.0, 4, 0, T0, true, 0);
        let mut plan = OscPlan::new();
        let _ = run(&mut plan, &before, T0, before.tick_time_ns(19));
        let anchor = before.tick_time_ns(19) + 107_142_000;
        let after = timeline(140.0, 4, 20, anchor, true, 0);
        let steps = run(
            &mut plan,
            &after,
            before.tick_time_ns(19) + 1,
            anchor + SIXTEENTH,
        );
        assert_eq!(steps[0].count, 20);
        assert!(steps[0].events.tempo && steps[0].events.tick);
        assert_eq!(steps[0].bpm, 140.0);
        assert_eq!(steps[0].at_ns, anchor);
        assert!(steps[1..].iter().all(|s| !s.events.tempo));
        // Learned late (the old grid's count 21 went out): announced on the next tick.
        let mut plan = OscPlan::new();
        let old21 = before.tick_time_ns(21);
        let _ = run(&mut plan, &before, T0, old21);
        let steps = run(&mut plan, &after, old21 + 1, old21 + SIXTEENTH);
        assert!(steps[0].events.tempo);
        assert_eq!(steps[0].count, 22);
        assert_eq!(steps[0].at_ns, after.tick_time_ns(22));
    }

    #[test]
    fn far_behind_skips_to_now_and_a_restart_relocates() {
        let tl = timeline(120.0, 4, 0, T0, true, 0);
        let mut plan = OscPlan::new();
        let _ = run(&mut plan, &tl, T0, T0 + 10 * SIXTEENTH);
        // Ten ticks later (the machine stalled): no burst of ten, straight to the next.
        let step = plan.step(&tl, T0 + 20 * SIXTEENTH + 1);
        assert_eq!(step.count, 21);
        // One tick late: still sent, at once.
        let step = plan.step(&tl, T0 + 11 * SIXTEENTH + 1);
        assert_eq!(step.count, 11);
        assert_eq!(step.at_ns, tl.tick_time_ns(11));
        // The server restarted: count 0 was two ticks ago.
        let now = T0 + 10 * SIXTEENTH + 5000;
        let restarted = timeline(120.0, 4, 0, now - 2 * SIXTEENTH, true, 0);
        let step = plan.step(&restarted, now);
        assert_eq!(step.count, 2);
        assert_eq!(step.at_ns, now);
        assert!(step.events.tick && !step.events.transport);
    }

    #[test]
    fn bars_follow_beats_per_bar() {
        let tl = timeline_bars(90.0, 2, 3, true, 0);
        let mut plan = OscPlan::new();
        let steps = run(&mut plan, &tl, tl.tick_time_ns(0) - 1, tl.tick_time_ns(12));
        let bars: Vec<u64> = steps
            .iter()
            .filter(|s| s.events.bar)
            .map(|s| s.count)
            .collect();
        assert_eq!(bars, [0, 6, 12]);
        let beats: Vec<u64> = steps
            .iter()
            .filter(|s| s.events.beat)
            .map(|s| s.count)
            .collect();
        assert_eq!(beats, [0, 2, 4, 6, 8, 10, 12]);
    }
}
