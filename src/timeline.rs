//! A room's timeline on the unix-time axis, and the one rule set for changing it.
//!
//! This module owns what a tempo or transport change *means*: [`plan`] takes the timeline a
//! room follows, the change asked for, the time now and the lead, and returns the timeline to
//! follow from then on. The same function serves a lone server and a cluster (where the
//! cluster thread calls it over the shared timeline), so there is one rule, not three copies.
//! It reads no clock, touches no socket and knows nothing of clients: times come in as
//! arguments, in unix nanoseconds, because that is the axis every client and every instance of
//! a cluster shares.
//!
//! Every change takes effect at a tick at least `lead` ahead, on the grid already announced:
//! the tick at the new anchor keeps the instant clients were told, only the intervals after it
//! change. A client therefore hears of a tempo change, a stop or a start before the first tick
//! it affects, as long as the lead covers its round trip and its own scheduling lookahead
//! (see [`crate::lead`]).

use crate::tempo::{Bpm, TickSchedule};
use crate::transport::{self, Quantize, Transport, TransportState};

/// Everything needed to compute every future tick of a room, and its transport.
///
/// Tick `n >= anchor_count` is due at `anchor_unix_ns + floor((n − anchor_count) · 60e9 /
/// (bpm · ppqn))` (the exact arithmetic of [`TickSchedule`]); counts before the anchor belong
/// to an earlier timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeline {
    /// Bumped by every change, so that a newer timeline can be told from an older one (and a
    /// cluster's compare-and-set can refuse a change planned on a stale one).
    pub version: u64,
    pub anchor_count: u64,
    pub anchor_unix_ns: u64,
    pub bpm: Bpm,
    pub ppqn: u32,
    /// Where a quantised start may fall: bar lines are multiples of `ppqn · beats_per_bar`.
    pub beats_per_bar: u32,
    pub transport: Transport,
    /// The instant of `transport.from_count()`. Kept because a later tempo change re-anchors
    /// the timeline past it, and then the grid no longer knows that count.
    pub transport_unix_ns: u64,
}

/// A change a client may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    SetBpm(Bpm),
    Start(Quantize),
    Stop,
}

impl Timeline {
    /// A fresh timeline: tick 0 at `start_unix_ns`, playing, version 1.
    pub fn new(bpm: Bpm, ppqn: u32, beats_per_bar: u32, start_unix_ns: u64) -> Timeline {
        Timeline {
            version: 1,
            anchor_count: 0,
            anchor_unix_ns: start_unix_ns,
            bpm,
            ppqn: ppqn.max(1),
            beats_per_bar: beats_per_bar.max(1),
            transport: Transport::playing(),
            transport_unix_ns: start_unix_ns,
        }
    }

    /// The grid on the unix axis.
    pub fn grid(&self) -> TickSchedule {
        TickSchedule::anchored(
            self.bpm,
            self.ppqn.max(1),
            self.anchor_count,
            self.anchor_unix_ns,
        )
    }

    /// Unix ns of tick `count` (counts before the anchor clamp to it).
    pub fn unix_ns_of(&self, count: u64) -> u64 {
        self.grid().deadline_ns(count)
    }

    /// The first count, at or after the anchor, due at or after `unix_ns`.
    pub fn first_count_at_or_after(&self, unix_ns: u64) -> u64 {
        self.grid().first_count_at_or_after(unix_ns)
    }

    /// This timeline on a monotonic axis whose zero is unix time `epoch_unix_ns` (the timing
    /// thread's clock). An anchor before that epoch (a timeline older than this process)
    /// moves forward to the first tick after it, which keeps every later tick on the same
    /// instants to the nanosecond.
    pub fn schedule(&self, epoch_unix_ns: u64) -> TickSchedule {
        let (count, unix) = if self.anchor_unix_ns >= epoch_unix_ns {
            (self.anchor_count, self.anchor_unix_ns)
        } else {
            let count = self.first_count_at_or_after(epoch_unix_ns);
            (count, self.unix_ns_of(count))
        };
        TickSchedule::anchored(self.bpm, self.ppqn.max(1), count, unix - epoch_unix_ns)
    }

    /// The same grid anchored at its first tick at or after `unix_ns` (unchanged when the
    /// anchor is later): every tick keeps its instant. A timeline restored after a restart is
    /// announced this way, so that clients count from a recent tick rather than from the last
    /// change before the restart.
    pub fn anchored_from(&self, unix_ns: u64) -> Timeline {
        if self.anchor_unix_ns >= unix_ns {
            return *self;
        }
        let count = self.first_count_at_or_after(unix_ns);
        Timeline {
            anchor_count: count,
            anchor_unix_ns: self.unix_ns_of(count),
            ..*self
        }
    }

    /// The transport state sounding at `unix_ns`: a change still ahead has not begun.
    pub fn sounding_at(&self, unix_ns: u64) -> TransportState {
        if unix_ns < self.transport_unix_ns {
            self.transport.before()
        } else {
            self.transport.state()
        }
    }

    /// The first instant at which `next` differs from `self` for some tick: its new anchor
    /// (tempo) or its new transport count, whichever moved first. `None` when no tick changes.
    pub fn change_instant(&self, next: &Timeline) -> Option<u64> {
        let tempo = (next.anchor_count != self.anchor_count
            || next.anchor_unix_ns != self.anchor_unix_ns
            || next.bpm != self.bpm)
            .then_some(next.anchor_unix_ns);
        let transport = (next.transport != self.transport).then_some(next.transport_unix_ns);
        match (tempo, transport) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// What [`plan`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Planned {
    /// Follow this timeline from now on, and announce it at once.
    Changed(Timeline),
    /// Nothing would change (the tempo already set, a start while heading to play): the
    /// caller confirms the current state to the asker alone.
    Unchanged,
    /// A transport change that contradicts one still pending: it can only be planned once
    /// that one has begun, at this unix instant (see [`plan`]). The caller asks again then.
    NotBefore(u64),
}

/// Whether `change` would change nothing over `current`, whenever and with whatever lead it
/// is asked ([`plan`] then says [`Planned::Unchanged`]): the tempo already set, or the
/// transport already heading where it is asked to go. Cheap, so it comes before anything
/// costly about a request.
pub fn is_unchanged(current: &Timeline, change: Change) -> bool {
    match change {
        Change::SetBpm(bpm) => bpm == current.bpm,
        Change::Start(_) => current.transport.state() == TransportState::Playing,
        Change::Stop => current.transport.state() == TransportState::Stopped,
    }
}

/// Plans `change` over `current`, asked at `now_unix_ns`.
///
/// * The change takes effect at the first tick due at least `lead_ns` after now (and never
///   before `current`'s anchor: a change still pending is built on, not undone), on
///   `current`'s grid. That tick keeps its announced instant; a new tempo spaces the ticks
///   after it, and moves the instant of a transport change still ahead with it.
/// * A start also waits for its quantum: the next bar line, beat, or any tick.
/// * A timeline has one anchor, so a tempo change still pending is either replaced at its
///   own anchor (when the lead allows it) or waited for ([`Planned::NotBefore`]).
/// * A transport has one pending change at most, and clients follow it as a play interval
///   (played from the last start until the stop). So a change against one still pending
///   waits until that one has begun ([`Planned::NotBefore`]): "stop, then start" within the
///   lead stops, then starts again on the next bar line the lead allows. The one exception
///   cancels cleanly: a stop that reaches a pending start before it begins.
pub fn plan(current: &Timeline, change: Change, now_unix_ns: u64, lead_ns: u64) -> Planned {
    if is_unchanged(current, change) {
        return Planned::Unchanged;
    }
    // At least a nanosecond ahead: a tick due exactly now may already be on its way.
    let effective = current.first_count_at_or_after(now_unix_ns.saturating_add(lead_ns.max(1)));
    let mut next = *current;
    next.version = current.version.saturating_add(1);
    match change {
        Change::SetBpm(bpm) => {
            // A tempo change still pending and nearer than the lead: the new one would chain
            // behind it, but a timeline holds one anchor and clients keep only the latest. It
            // waits for that anchor. (One the lead cannot reach yet is replaced in place.)
            if now_unix_ns < current.anchor_unix_ns && effective > current.anchor_count {
                return Planned::NotBefore(current.anchor_unix_ns);
            }
            next.anchor_count = effective;
            next.anchor_unix_ns = current.unix_ns_of(effective);
            next.bpm = bpm;
            if next.transport.from_count() >= next.anchor_count {
                next.transport_unix_ns = next.unix_ns_of(next.transport.from_count());
            }
        }
        Change::Start(_) | Change::Stop => {
            let (target, from) = match change {
                Change::Start(quantize) => {
                    let quantum = quantize.ticks(current.ppqn, current.beats_per_bar);
                    (
                        TransportState::Playing,
                        transport::start_count(effective, effective, quantum),
                    )
                }
                _ => (TransportState::Stopped, effective),
            };
            let t = current.transport;
            let pending = now_unix_ns < current.transport_unix_ns && t.before() != t.state();
            let cancels_cleanly = target == TransportState::Stopped && t.from_count() >= effective;
            if pending && !cancels_cleanly {
                return Planned::NotBefore(current.transport_unix_ns);
            }
            next.transport = Transport::from_parts(current.sounding_at(now_unix_ns), target, from);
            next.transport_unix_ns = current.unix_ns_of(from);
        }
    }
    Planned::Changed(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: u64 = 1_700_000_000_000_000_000;
    const LEAD: u64 = 250_000_000;

    fn timeline() -> Timeline {
        let mut t = Timeline::new(Bpm::whole(120), 4, 4, T0);
        t.version = 3;
        t.anchor_count = 100;
        t
    }

    fn changed(p: Planned) -> Timeline {
        match p {
            Planned::Changed(t) => t,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    #[test]
    fn anchoring_later_keeps_every_instant() {
        let t = timeline();
        let later = t.anchored_from(t.anchor_unix_ns + 10_000_000_001);
        assert!(later.anchor_count > t.anchor_count);
        assert!(later.anchor_unix_ns > t.anchor_unix_ns + 10_000_000_000);
        for count in later.anchor_count..later.anchor_count + 1000 {
            assert_eq!(later.unix_ns_of(count), t.unix_ns_of(count));
        }
        assert_eq!(later.transport, t.transport);
        assert_eq!(later.anchored_from(t.anchor_unix_ns), later);
    }

    #[test]
    fn a_tempo_change_takes_effect_a_lead_ahead_on_the_old_grid() {
        let t = timeline();
        // 1 s after the anchor is tick 108; 250 ms later is tick 110 exactly.
        let now = T0 + 1_000_000_000;
        let next = changed(plan(&t, Change::SetBpm(Bpm::whole(150)), now, LEAD));
        assert_eq!(next.version, 4);
        assert_eq!(next.anchor_count, 110);
        assert_eq!(next.anchor_unix_ns, t.unix_ns_of(110));
        assert_eq!(next.bpm, Bpm::whole(150));
        assert_eq!(next.unix_ns_of(111) - next.unix_ns_of(110), 100_000_000);
        // Asking again for the tempo it is heading to changes nothing.
        assert_eq!(
            plan(&next, Change::SetBpm(Bpm::whole(150)), now, LEAD),
            Planned::Unchanged
        );
    }

    #[test]
    fn a_stop_waits_for_the_lead_too() {
        let t = timeline();
        let now = T0 + 1_000_000_000;
        let stopped = changed(plan(&t, Change::Stop, now, LEAD));
        assert_eq!(stopped.transport.state(), TransportState::Stopped);
        assert_eq!(stopped.transport.from_count(), 110);
        assert_eq!(stopped.transport_unix_ns, t.unix_ns_of(110));
        assert!(
            stopped.transport.plays(109),
            "ticks inside the lead still sound"
        );
        assert!(!stopped.transport.plays(110));
        assert_eq!(plan(&stopped, Change::Stop, now, LEAD), Planned::Unchanged);
    }

    #[test]
    fn a_start_waits_for_the_lead_and_its_quantum() {
        let t = timeline();
        let now = T0 + 1_000_000_000;
        let stopped = changed(plan(&t, Change::Stop, now, LEAD));
        let later = now + 2_000_000_000;
        let started = changed(plan(&stopped, Change::Start(Quantize::Bar), later, LEAD));
        // 3 s after the anchor is tick 124; +250 ms is 126; the next bar line (16 ticks) 128.
        assert_eq!(started.transport.from_count(), 128);
        assert_eq!(started.transport.before(), TransportState::Stopped);
        assert!(!started.transport.plays(127));
        assert!(started.transport.plays(128));
        assert_eq!(started.transport_unix_ns, t.unix_ns_of(128));
        let beat = changed(plan(&stopped, Change::Start(Quantize::Beat), later, LEAD));
        assert_eq!(
            beat.transport.from_count(),
            128,
            "126 rounds up to the beat at 128"
        );
        let any = changed(plan(&stopped, Change::Start(Quantize::None), later, LEAD));
        assert_eq!(any.transport.from_count(), 126);
    }

    #[test]
    fn a_start_against_a_pending_stop_waits_for_the_stop() {
        let t = timeline();
        let now = T0 + 1_000_000_000;
        let stopping = changed(plan(&t, Change::Stop, now, LEAD));
        let soon = now + 10_000_000;
        assert_eq!(
            plan(&stopping, Change::Start(Quantize::Bar), soon, LEAD),
            Planned::NotBefore(stopping.transport_unix_ns)
        );
        // Once the stop has begun, the start is planned as usual, on the next bar line.
        let then = stopping.transport_unix_ns;
        let started = changed(plan(&stopping, Change::Start(Quantize::Bar), then, LEAD));
        assert_eq!(started.transport.before(), TransportState::Stopped);
        assert_eq!(started.transport.from_count(), 112);
        assert!(!started.transport.plays(110) && !started.transport.plays(111));
    }

    #[test]
    fn a_stop_cancels_a_pending_start_it_reaches_before() {
        let t = changed(plan(&timeline(), Change::Stop, T0, LEAD));
        let now = T0 + 5_000_000_000;
        let starting = changed(plan(&t, Change::Start(Quantize::Bar), now, LEAD));
        assert_eq!(starting.transport.from_count(), 144);
        // 40 ms later the start (tick 144, 500 ms away) is still beyond the lead: cancelled.
        let cancelled = changed(plan(&starting, Change::Stop, now + 40_000_000, LEAD));
        for count in 140..300 {
            assert!(!cancelled.transport.plays(count), "tick {count} sounds");
        }
        // Within the lead of that start, the stop waits for it instead.
        let late = starting.transport_unix_ns - 100_000_000;
        assert_eq!(
            plan(&starting, Change::Stop, late, LEAD),
            Planned::NotBefore(starting.transport_unix_ns)
        );
    }

    #[test]
    fn a_tempo_change_moves_a_pending_start_with_it() {
        let t = changed(plan(&timeline(), Change::Stop, T0, LEAD));
        let now = T0 + 5_000_000_000;
        let starting = changed(plan(&t, Change::Start(Quantize::Bar), now, LEAD));
        let start = starting.transport.from_count();
        let faster = changed(plan(&starting, Change::SetBpm(Bpm::whole(150)), now, LEAD));
        assert_eq!(faster.transport.from_count(), start);
        assert_eq!(faster.transport_unix_ns, faster.unix_ns_of(start));
        assert!(faster.transport_unix_ns < starting.transport_unix_ns);
    }

    #[test]
    fn a_change_before_a_pending_anchor_lands_on_it() {
        let t = timeline();
        let now = T0 + 1_000_000_000;
        let slow = changed(plan(&t, Change::SetBpm(Bpm::whole(60)), now, 900_000_000));
        // With a shorter lead the next change cannot reach before the pending anchor.
        let fast = changed(plan(&slow, Change::SetBpm(Bpm::whole(200)), now + 1, LEAD));
        assert_eq!(fast.anchor_count, slow.anchor_count);
        assert_eq!(fast.anchor_unix_ns, slow.anchor_unix_ns);
        assert_eq!(fast.bpm, Bpm::whole(200));
    }

    #[test]
    fn a_tempo_change_inside_the_lead_of_a_pending_one_waits_for_it() {
        let t = timeline();
        let now = T0 + 1_000_000_000;
        let slow = changed(plan(&t, Change::SetBpm(Bpm::whole(60)), now, LEAD));
        // 200 ms later the anchor (tick 110) is 50 ms away, inside the lead.
        let later = now + 200_000_000;
        assert_eq!(
            plan(&slow, Change::SetBpm(Bpm::whole(200)), later, LEAD),
            Planned::NotBefore(slow.anchor_unix_ns)
        );
        let then = changed(plan(
            &slow,
            Change::SetBpm(Bpm::whole(200)),
            slow.anchor_unix_ns,
            LEAD,
        ));
        // 250 ms at 60 BPM (250 ms a tick): the tick after the anchor.
        assert_eq!(then.anchor_count, 111);
        assert_eq!(then.anchor_unix_ns, slow.unix_ns_of(111));
    }

    #[test]
    fn schedule_moves_an_old_anchor_past_the_epoch_without_moving_ticks() {
        let t = timeline();
        let epoch = T0 + 10_000_000_001;
        let s = t.schedule(epoch);
        assert!(s.anchor_count() > t.anchor_count);
        for count in s.anchor_count()..s.anchor_count() + 1000 {
            assert_eq!(t.unix_ns_of(count), epoch + s.deadline_ns(count));
        }
        let early = t.schedule(T0 - 5);
        assert_eq!(early.anchor_count(), 100);
        assert_eq!(early.anchor_ns(), 5);
    }

    #[test]
    fn change_instant_names_the_first_tick_affected() {
        let t = timeline();
        let now = T0 + 1_000_000_000;
        let tempo = changed(plan(&t, Change::SetBpm(Bpm::whole(90)), now, LEAD));
        assert_eq!(t.change_instant(&tempo), Some(t.unix_ns_of(110)));
        let stop = changed(plan(&t, Change::Stop, now, 2 * LEAD));
        assert_eq!(t.change_instant(&stop), Some(t.unix_ns_of(112)));
        assert_eq!(t.change_instant(&t), None);
    }

    proptest! {
        /// Whatever is asked and whenever, with whatever lead: no tick due before now + lead
        /// changes its instant or whether it plays, the anchor stays on the old grid, and the
        /// first tick a change affects is at least the lead away. A change told to wait is
        /// asked again at the instant it names, and is then planned.
        #[test]
        fn changes_never_reach_into_the_lead(
            after_anchor in 0u64..100_000_000_000,
            lead in 0u64..1_000_000_000,
            bpm in 60u32..=200,
            ppqn in 1u32..=24,
            kinds in proptest::collection::vec(0u8..5, 1..8),
            gaps in proptest::collection::vec(0u64..400_000_000, 8),
        ) {
            let mut t = Timeline::new(Bpm::whole(120), ppqn, 4, T0);
            let mut now = T0 + after_anchor;
            for (i, kind) in kinds.into_iter().enumerate() {
                now += gaps[i];
                let change = match kind {
                    0 => Change::SetBpm(Bpm::whole(bpm)),
                    1 => Change::SetBpm(Bpm::whole(bpm / 2 + 30)),
                    2 => Change::Stop,
                    3 => Change::Start(Quantize::Bar),
                    _ => Change::Start(Quantize::None),
                };
                let next = match plan(&t, change, now, lead) {
                    Planned::Unchanged => continue,
                    Planned::Changed(next) => next,
                    Planned::NotBefore(at) => {
                        prop_assert!(at > now);
                        now = at;
                        match plan(&t, change, now, lead) {
                            Planned::Changed(next) => next,
                            other => {
                                prop_assert!(false, "asked again at {}: {:?}", at, other);
                                unreachable!()
                            }
                        }
                    }
                };
                prop_assert_eq!(next.version, t.version + 1);
                prop_assert!(next.anchor_count >= t.anchor_count);
                // One pending anchor at most: a pending one is replaced in place, never chained.
                if now < t.anchor_unix_ns {
                    prop_assert_eq!(next.anchor_count, t.anchor_count);
                }
                prop_assert_eq!(next.unix_ns_of(next.anchor_count), t.unix_ns_of(next.anchor_count));
                if let Some(at) = t.change_instant(&next) {
                    prop_assert!(at >= now + lead, "change at {} inside the lead {}", at, now + lead);
                }
                let first_safe = t.first_count_at_or_after(now + lead.max(1));
                let present = t.first_count_at_or_after(now);
                for count in present..first_safe.min(present + 500) {
                    // Before the new anchor the old grid still holds (the timing thread follows it).
                    prop_assert!(count < next.anchor_count || next.unix_ns_of(count) == t.unix_ns_of(count), "tick {}", count);
                    prop_assert_eq!(next.transport.plays(count), t.transport.plays(count), "tick {}", count);
                }
                if next.transport.from_count() >= next.anchor_count {
                    prop_assert_eq!(next.transport_unix_ns, next.unix_ns_of(next.transport.from_count()));
                }
                t = next;
            }
        }
    }
}
