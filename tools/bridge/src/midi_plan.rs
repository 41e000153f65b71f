//! The MIDI clock plan: which bytes a MIDI output sends next, and at which server instant.
//!
//! A pure function of (what was sent so far, the timeline, now): [`MidiPlan::step`] returns the
//! next [`MidiStep`] and the plan as it will be once that step is sent; it reads no clock and
//! touches no device, so the tests drive it with a fake clock. The emitter thread sleeps until
//! the step's instant (mapped to its own clock, less the output's nudge) and writes the bytes.
//!
//! What it sends, from the timeline alone (never from when a tick message arrived):
//! * Timing Clock (`F8`) at 24 per quarter note on the grid of [`crate::grid`], also while the
//!   transport is stopped unless told otherwise, so a device shows the tempo and keeps
//!   tempo-synced effects in time.
//! * Start (`FA`) immediately before the clock of the transport's first played tick (a bar
//!   line, with the server's default quantisation), so the device plays that clock as its
//!   downbeat. Stop (`FC`) before the clock of the first tick no longer played.
//! * Joining a transport already playing: Stop, then Song Position Pointer (`F2`, the 16th
//!   to resume at, counted from the transport's start, 14 bits LSB first), at once; then
//!   Continue (`FB`) before the clock of that 16th, the first at least [`SPP_LEAD_NS`] away, so
//!   the device has time to locate.
//! * A tempo change needs nothing special: each clock's instant is read from the newest
//!   timeline, so the period changes where the server's ticks do.
//!
//! A clock is never sent twice and never skipped while the bridge keeps up. When the newest
//! timeline puts the next clock more than [`RELOCATE_CLOCKS`] away from where it should be (the
//! server restarted and counts from 0 again, or a long outage ended with a large correction),
//! the plan relocates: Stop if the device was playing, then a fresh join.

use crate::grid::{
    CLOCKS_PER_16TH, TimelineView, clock_of_tick, clock_plays, clock_time, first_clock_at_or_after,
    tick_of_clock,
};

pub const TIMING_CLOCK: u8 = 0xF8;
pub const START: u8 = 0xFA;
pub const CONTINUE: u8 = 0xFB;
pub const STOP: u8 = 0xFC;
pub const SONG_POSITION: u8 = 0xF2;

/// How long before Continue the Song Position Pointer goes out: time for a device to locate
/// (a sequencer may have to seek), and more than the ~1 ms the three bytes take on a DIN cable.
pub const SPP_LEAD_NS: i64 = 10_000_000;

/// How many clocks the plan may be behind (sent late, in a burst) or ahead (held back) of
/// where the timeline says it should be before it gives up on continuity and relocates: one
/// 16th. Small corrections keep every clock; large ones would otherwise play a burst of
/// clocks or a long silence.
pub const RELOCATE_CLOCKS: u64 = CLOCKS_PER_16TH;

/// Positions a Song Position Pointer can express: 14 bits of 16th notes.
const SPP_LIMIT: u64 = 1 << 14;

/// At most this many bytes go out at one instant (Stop + Song Position Pointer, or Start +
/// Clock).
pub const MAX_STEP_BYTES: usize = 4;

/// What the plan remembers between steps: where the clock is, and what the device was told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MidiPlan {
    /// The next clock to send; `None` until the first timeline.
    cursor: Option<u64>,
    /// Whether the device was last told to play (Start or Continue) rather than to stop.
    playing: bool,
    /// The clock at which a Continue is due, after a Song Position Pointer went out.
    resume_at: Option<u64>,
    /// Whether clocks go out while the transport is stopped.
    clock_while_stopped: bool,
    /// The instant of the last step: no step is planned before it, so bytes stay in order.
    last_at: i64,
}

/// The next bytes to send and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MidiStep {
    /// Server nanoseconds at which the bytes must sound.
    pub at_ns: i64,
    bytes: [u8; MAX_STEP_BYTES],
    len: u8,
    /// The clock this step carries (for the bench and the tests), if it carries one.
    pub clock: Option<u64>,
    /// The plan once this step has been sent.
    pub then: MidiPlan,
}

impl MidiStep {
    /// The bytes to write, in order (empty for a silent step that only moves the plan on).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    fn push(&mut self, byte: u8) {
        self.bytes[usize::from(self.len)] = byte;
        self.len += 1;
    }
}

impl MidiPlan {
    /// A plan that has sent nothing yet.
    pub fn new(clock_while_stopped: bool) -> MidiPlan {
        MidiPlan {
            cursor: None,
            playing: false,
            resume_at: None,
            clock_while_stopped,
            last_at: i64::MIN,
        }
    }

    /// Whether the device was last told to play.
    pub fn device_playing(&self) -> bool {
        self.playing
    }

    /// The next step, given the newest timeline and the current instant (server ns, already
    /// advanced by the output's nudge).
    pub fn step<T: TimelineView>(&self, tl: &T, now: i64) -> MidiStep {
        let Some(cursor) = self.cursor else {
            // First timeline: the device's state is unknown (a previous run may have left it
            // playing), so stop it before anything else.
            return self.join(tl, now, true, None);
        };
        let expected = first_clock_at_or_after(tl, now);
        // Right after clock m − 1 went out, `expected` is m − 1 or m.
        if cursor.saturating_add(RELOCATE_CLOCKS) < expected
            || cursor > expected.saturating_add(1 + RELOCATE_CLOCKS)
        {
            return self.join(tl, now, self.playing || self.resume_at.is_some(), None);
        }
        self.clock_step(tl, cursor, now)
    }

    /// The step for clock `m`, with the transport messages that belong before it.
    fn clock_step<T: TimelineView>(&self, tl: &T, m: u64, now: i64) -> MidiStep {
        let plays = clock_plays(tl, m);
        let mut then = MidiPlan {
            cursor: Some(m + 1),
            ..*self
        };
        let mut step = MidiStep {
            at_ns: clock_time(tl, m).max(self.last_at),
            bytes: [0; MAX_STEP_BYTES],
            len: 0,
            clock: Some(m),
            then,
        };
        match (self.playing, self.resume_at) {
            (false, Some(resume)) if !plays => {
                // Stopped again before the Continue was due: nothing to resume.
                then.resume_at = None;
                let _ = resume;
            }
            (false, Some(resume)) if m >= resume => {
                step.push(CONTINUE);
                then.playing = true;
                then.resume_at = None;
            }
            (false, Some(_)) => {}
            (false, None) if plays => {
                if m > 0 && clock_plays(tl, m - 1) {
                    // Playing already (we learned of the start too late, or came back from
                    // an outage mid-song): locate, then continue, from this clock on (the
                    // ones before it went out already).
                    return self.join(tl, now, false, Some(m));
                }
                step.push(START);
                then.playing = true;
            }
            (true, _) if !plays => {
                step.push(STOP);
                then.playing = false;
            }
            _ => {}
        }
        if then.playing || self.clock_while_stopped || step.len > 0 {
            step.push(TIMING_CLOCK);
        }
        then.last_at = step.at_ns;
        step.then = then;
        step
    }

    /// Joins the timeline at `now`: optionally Stop, then, if the transport plays, a Song
    /// Position Pointer and a Continue due at the next 16th far enough away. The clock goes on
    /// from `from` (the cursor, when it is still right), else from the first one due now.
    fn join<T: TimelineView>(
        &self,
        tl: &T,
        now: i64,
        stop_first: bool,
        from: Option<u64>,
    ) -> MidiStep {
        let at = now.max(self.last_at);
        let m = from.unwrap_or_else(|| first_clock_at_or_after(tl, at));
        let mut then = MidiPlan {
            cursor: Some(m),
            playing: false,
            resume_at: None,
            clock_while_stopped: self.clock_while_stopped,
            last_at: at,
        };
        let mut step = MidiStep {
            at_ns: at,
            bytes: [0; MAX_STEP_BYTES],
            len: 0,
            clock: None,
            then,
        };
        if stop_first {
            step.push(STOP);
        }
        // Mid-song: the clock before this one was played too. (At the start's own clock the
        // clock step sends Start instead.)
        if clock_plays(tl, m) && m > 0 && clock_plays(tl, m - 1) {
            let start = song_start_clock(tl, m);
            let resume = resume_clock(tl, start, m, at.saturating_add(SPP_LEAD_NS));
            let position = song_position(tl, (resume - start) / CLOCKS_PER_16TH);
            step.push(SONG_POSITION);
            step.push((position & 0x7F) as u8);
            step.push(((position >> 7) & 0x7F) as u8);
            then.resume_at = Some(resume);
        }
        if step.len == 0 {
            // Nothing to say: go straight on with the clock.
            return then.clock_step(tl, m, now);
        }
        step.then = then;
        step
    }
}

/// The clock on which the song playing at clock `m` started: the transport's start when the
/// timeline says when that was, else the server's count 0 (it has played since it started).
fn song_start_clock<T: TimelineView>(tl: &T, m: u64) -> u64 {
    let from = tl.transport_from();
    let start = if tl.transport_playing() && from <= tick_of_clock(tl.ppqn(), m) {
        from
    } else {
        0
    };
    clock_of_tick(tl.ppqn(), start)
}

/// The first clock at or after `m` that begins a 16th of the song started at `start` and is
/// due at or after `not_before`.
fn resume_clock<T: TimelineView>(tl: &T, start: u64, m: u64, not_before: i64) -> u64 {
    let into = m.saturating_sub(start) % CLOCKS_PER_16TH;
    let mut c = if into == 0 {
        m
    } else {
        m + (CLOCKS_PER_16TH - into)
    };
    while clock_time(tl, c) < not_before {
        c += CLOCKS_PER_16TH;
    }
    c
}

/// A position in 16ths as a Song Position Pointer can carry it. Past 14 bits it wraps at the
/// largest whole number of bars that fits, so the device keeps its place in the bar.
pub fn song_position<T: TimelineView>(tl: &T, sixteenths: u64) -> u16 {
    let bar = u64::from(tl.beats_per_bar().max(1)) * 4;
    let wrap = (SPP_LIMIT / bar).max(1) * bar;
    let wrap = if wrap > SPP_LIMIT { SPP_LIMIT } else { wrap };
    (sixteenths % wrap) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::fake::timeline;

    /// Runs the plan against `tl` with a fake clock that jumps to each step's instant, and
    /// returns every non-silent step until `until`.
    fn run<T: TimelineView>(plan: &mut MidiPlan, tl: &T, from: i64, until: i64) -> Vec<MidiStep> {
        let mut now = from;
        let mut out = Vec::new();
        loop {
            let step = plan.step(tl, now);
            if step.at_ns > until {
                return out;
            }
            now = now.max(step.at_ns);
            *plan = step.then;
            if !step.bytes().is_empty() {
                out.push(step);
            }
        }
    }

    const T0: i64 = 1_700_000_000_000_000_000;
    /// A 16th at 120 BPM.
    const SIXTEENTH: i64 = 125_000_000;

    #[test]
    fn a_stopped_transport_gets_stop_then_clocks() {
        // Stopped from count 0 on; the bridge joins at count 10.
        let tl = timeline(120.0, 4, 0, T0, false, 0);
        let mut plan = MidiPlan::new(true);
        let steps = run(&mut plan, &tl, T0 + 10 * SIXTEENTH, T0 + 20 * SIXTEENTH);
        assert_eq!(steps[0].bytes(), [STOP]);
        assert!(steps[1..].iter().all(|s| s.bytes() == [TIMING_CLOCK]));
        // 10 16ths of clocks: 60, plus the one on the last instant.
        assert_eq!(steps.len() - 1, 61);
        assert!(!plan.device_playing());
        // Without clocks while stopped, only the Stop.
        let mut plan = MidiPlan::new(false);
        let steps = run(&mut plan, &tl, T0 + 10 * SIXTEENTH, T0 + 20 * SIXTEENTH);
        assert_eq!(steps.len(), 1);
    }

    #[test]
    fn exactly_24_clocks_per_beat_on_the_timeline() {
        let tl = timeline(120.0, 4, 0, T0, false, 0);
        let mut plan = MidiPlan::new(true);
        let start = T0 + 3;
        let steps = run(&mut plan, &tl, start, start + 60 * 1_000_000_000);
        let clocks: Vec<&MidiStep> = steps.iter().filter(|s| s.clock.is_some()).collect();
        // One minute at 120 BPM: 120 beats, 2880 clocks, each on the grid.
        assert_eq!(clocks.len(), 2880);
        for pair in clocks.windows(2) {
            assert_eq!(pair[1].clock, pair[0].clock.map(|c| c + 1));
        }
        for s in &clocks {
            let m = s.clock.unwrap();
            assert_eq!(s.at_ns, clock_time(&tl, m));
        }
        // Every 24th clock is on a beat's tick, to the nanosecond.
        let first = clocks[0].clock.unwrap();
        for s in clocks.iter().filter(|s| s.clock.unwrap() % 24 == 0) {
            let beat = s.clock.unwrap() / 24;
            assert_eq!(s.at_ns, tl.tick_time_ns(beat * 4));
        }
        assert!(first <= 1);
    }

    #[test]
    fn start_lands_on_the_bar_line_before_its_clock() {
        // Stopped before count 32 (bar 2 at ppqn 4, 4/4), playing from it.
        let tl = timeline(120.0, 4, 0, T0, true, 32);
        let mut plan = MidiPlan::new(true);
        let steps = run(&mut plan, &tl, T0 + 20 * SIXTEENTH, T0 + 40 * SIXTEENTH);
        assert_eq!(steps[0].bytes(), [STOP]);
        let start: Vec<&MidiStep> = steps.iter().filter(|s| s.bytes()[0] == START).collect();
        assert_eq!(start.len(), 1);
        assert_eq!(start[0].bytes(), [START, TIMING_CLOCK]);
        assert_eq!(start[0].at_ns, tl.tick_time_ns(32));
        assert_eq!(start[0].clock, Some(32 * 6));
        assert!(plan.device_playing());
        // No other transport bytes.
        assert!(
            steps[1..]
                .iter()
                .all(|s| s.bytes() == [TIMING_CLOCK] || s.bytes()[0] == START)
        );
    }

    #[test]
    fn stop_goes_out_before_the_first_unplayed_clock() {
        // Playing (the transport started at 0), stopping from count 40.
        let tl = timeline(120.0, 4, 0, T0, false, 40);
        let mut plan = MidiPlan::new(false);
        // Pretend the device was started at 0 and has played to count 30.
        let started = timeline(120.0, 4, 0, T0, true, 0);
        let _ = run(&mut plan, &started, T0 - 1, T0 + 30 * SIXTEENTH);
        assert!(plan.device_playing());
        let steps = run(&mut plan, &tl, T0 + 30 * SIXTEENTH, T0 + 50 * SIXTEENTH);
        let stop: Vec<&MidiStep> = steps.iter().filter(|s| s.bytes()[0] == STOP).collect();
        assert_eq!(stop.len(), 1);
        assert_eq!(stop[0].bytes(), [STOP, TIMING_CLOCK]);
        assert_eq!(stop[0].at_ns, tl.tick_time_ns(40));
        // Clocks stop with it when not wanted while stopped.
        assert_eq!(steps.last().unwrap().bytes(), [STOP, TIMING_CLOCK]);
        assert!(!plan.device_playing());
    }

    #[test]
    fn the_start_at_count_zero_is_a_start() {
        let tl = timeline(120.0, 4, 0, T0, true, 0);
        let mut plan = MidiPlan::new(true);
        let steps = run(&mut plan, &tl, T0 - 50_000_000, T0 + SIXTEENTH);
        assert_eq!(steps[0].bytes(), [STOP]);
        assert_eq!(steps[1].bytes(), [START, TIMING_CLOCK]);
        assert_eq!(steps[1].at_ns, T0);
    }

    #[test]
    fn joining_a_playing_transport_locates_then_continues_on_a_16th() {
        // Started at count 16 (a bar line); the bridge joins 37 16ths and a bit later.
        let tl = timeline(120.0, 4, 0, T0, true, 16);
        let mut plan = MidiPlan::new(true);
        let join = T0 + (16 + 37) * SIXTEENTH + 40_000_000;
        let steps = run(&mut plan, &tl, join, join + 2 * SIXTEENTH);
        // At once: Stop, then the position of the 16th to resume at, LSB first.
        assert_eq!(steps[0].at_ns, join);
        assert_eq!(steps[0].bytes()[0], STOP);
        assert_eq!(steps[0].bytes()[1], SONG_POSITION);
        // The next 16th is 38 16ths after the start, 85 ms away (more than the lead).
        assert_eq!(&steps[0].bytes()[2..], [38, 0]);
        let cont: Vec<&MidiStep> = steps.iter().filter(|s| s.bytes()[0] == CONTINUE).collect();
        assert_eq!(cont.len(), 1);
        assert_eq!(cont[0].bytes(), [CONTINUE, TIMING_CLOCK]);
        assert_eq!(cont[0].at_ns, tl.tick_time_ns(16 + 38));
        // Clocks run between the pointer and the continue.
        let between = steps
            .iter()
            .filter(|s| s.at_ns > join && s.at_ns < cont[0].at_ns)
            .count();
        assert_eq!(between, 4);
        assert!(plan.device_playing());
    }

    #[test]
    fn joining_just_before_a_16th_waits_for_the_following_one() {
        let tl = timeline(120.0, 4, 0, T0, true, 0);
        let mut plan = MidiPlan::new(true);
        // 5 ms before count 8: less than the lead, so resume at count 9.
        let join = tl.tick_time_ns(8) - 5_000_000;
        let steps = run(&mut plan, &tl, join, join + 3 * SIXTEENTH);
        assert_eq!(steps[0].bytes(), [STOP, SONG_POSITION, 9, 0]);
        let cont = steps.iter().find(|s| s.bytes()[0] == CONTINUE).unwrap();
        assert_eq!(cont.at_ns, tl.tick_time_ns(9));
    }

    #[test]
    fn song_position_is_14_bits_lsb_first_and_wraps_on_a_bar() {
        let tl = timeline(120.0, 4, 0, T0, true, 0);
        assert_eq!(song_position(&tl, 300), 300);
        assert_eq!(song_position(&tl, 16383), 16383);
        // 16384 16ths = 1024 bars of 4/4: back to the first.
        assert_eq!(song_position(&tl, 16384), 0);
        assert_eq!(song_position(&tl, 16384 + 17), 17);
        // 3/4: 12 16ths a bar, wraps at 1365 bars = 16380.
        let waltz = crate::grid::fake::timeline_bars(120.0, 4, 3, true, 0);
        assert_eq!(song_position(&waltz, 16380), 0);
        assert_eq!(song_position(&waltz, 16383), 3);
        // The bytes: 300 = 2·128 + 44.
        let join = tl.tick_time_ns(299) + 1;
        let mut plan = MidiPlan::new(true);
        let step = plan.step(&tl, join);
        plan = step.then;
        assert_eq!(step.bytes(), [STOP, SONG_POSITION, 44, 2]);
        let _ = plan;
    }

    #[test]
    fn a_tempo_change_moves_the_period_at_its_tick() {
        // 120 BPM until the server re-anchors: count 20 falls one new (140 BPM) interval after
        // count 19, and 140 BPM holds from there.
        let before = timeline(120.0, 4, 0, T0, true, 0);
        let t19 = before.tick_time_ns(19);
        let new_interval = 60_000_000_000i64 / (140 * 4);
        // The timeline event carries whole microseconds.
        let anchor = (t19 + new_interval) / 1000 * 1000;
        let after = timeline(140.0, 4, 20, anchor, true, 0);
        let mut plan = MidiPlan::new(true);
        let mut steps = run(&mut plan, &before, T0 - 1, t19);
        // The bridge hears of the change 1 ms after count 19.
        steps.extend(run(
            &mut plan,
            &after,
            t19 + 1_000_000,
            anchor + 20 * new_interval,
        ));
        let clocks: Vec<&MidiStep> = steps.iter().filter(|s| s.clock.is_some()).collect();
        // Never a clock twice or skipped.
        for pair in clocks.windows(2) {
            assert_eq!(pair[1].clock, pair[0].clock.map(|c| c + 1));
        }
        let at = |m: u64| clocks.iter().find(|s| s.clock == Some(m)).unwrap().at_ns;
        // Count 20 is clock 120, on the new timeline's anchor exactly.
        assert_eq!(at(120), after.tick_time_ns(20));
        // From there every period is the new one (to the ns of integer division).
        for m in 120..200 {
            let period = at(m + 1) - at(m);
            assert!(
                (period - new_interval / 6).abs() <= 1,
                "clock {m}: {period}"
            );
        }
        // Before count 19, the old period.
        for m in 0..114 {
            assert!((at(m + 1) - at(m) - 125_000_000 / 6).abs() <= 1);
        }
    }

    #[test]
    fn a_small_correction_keeps_every_clock() {
        let tl = timeline(120.0, 4, 0, T0, false, 0);
        let mut plan = MidiPlan::new(true);
        let steps = run(&mut plan, &tl, T0, T0 + 4 * SIXTEENTH);
        let last = steps.last().unwrap().clock.unwrap();
        // The offset estimate moves the server's grid 30 ms earlier: the clocks now overdue
        // go out at once, in order, then the grid resumes.
        let moved = timeline(120.0, 4, 0, T0 - 30_000_000, false, 0);
        let now = steps.last().unwrap().at_ns + 1;
        let next = plan.step(&moved, now);
        assert_eq!(next.clock, Some(last + 1));
        assert_eq!(
            next.at_ns,
            now - 1,
            "overdue: as soon as possible, never before the last"
        );
        // And 30 ms later: a wait no longer than the correction.
        let mut plan2 = plan;
        let later = timeline(120.0, 4, 0, T0 + 30_000_000, false, 0);
        let next = plan2.step(&later, now);
        assert_eq!(next.clock, Some(last + 1));
        assert_eq!(next.at_ns, clock_time(&tl, last + 1) + 30_000_000);
        plan2 = next.then;
        let _ = plan2;
    }

    #[test]
    fn a_server_restart_relocates() {
        // The device plays at count 1000; the server restarts and plays from count 0.
        let tl = timeline(120.0, 4, 0, T0, true, 0);
        let mut plan = MidiPlan::new(true);
        let _ = run(&mut plan, &tl, T0 + 999 * SIXTEENTH, T0 + 1000 * SIXTEENTH);
        assert!(plan.device_playing());
        let now = T0 + 1000 * SIXTEENTH + 1;
        let restarted = timeline(120.0, 4, 0, now - 2 * SIXTEENTH, true, 0);
        let step = plan.step(&restarted, now);
        assert_eq!(step.at_ns, now);
        assert_eq!(&step.bytes()[..2], [STOP, SONG_POSITION]);
        assert_eq!(&step.bytes()[2..], [3, 0]);
    }

    #[test]
    fn late_news_of_a_start_becomes_a_join() {
        // The start at 32 was missed (the bridge was away); it hears of it at count 35.
        let tl = timeline(120.0, 4, 0, T0, true, 32);
        let stopped = timeline(120.0, 4, 0, T0, false, 0);
        let mut plan = MidiPlan::new(true);
        let _ = run(&mut plan, &stopped, T0, T0 + 35 * SIXTEENTH - 1);
        let steps = run(&mut plan, &tl, T0 + 35 * SIXTEENTH - 1, T0 + 40 * SIXTEENTH);
        assert!(steps.iter().all(|s| s.bytes()[0] != START));
        // 35·6 = 210 is where the plan stands; clocks up to 6 late would be sent in a burst,
        // but this is the transport's business: it locates to 16ths since the start.
        let spp = steps
            .iter()
            .find(|s| s.bytes()[0] == SONG_POSITION)
            .unwrap();
        assert_eq!(spp.bytes()[1], 4);
        let cont = steps.iter().find(|s| s.bytes()[0] == CONTINUE).unwrap();
        assert_eq!(cont.at_ns, tl.tick_time_ns(36));
    }
}
