//! The emitter: the one thread that decides when bytes leave for the devices.
//!
//! It owns every output's plan and sink. In a loop it reads the newest sync state (wait-free),
//! asks each output's plan for its next step, maps the earliest step's server instant to its
//! own monotonic clock less that output's nudge, sleeps until then with `spin_sleep` and
//! writes. Every instant comes from the timeline, never from when a message arrived, so the
//! network's delay and jitter never reach the devices.
//!
//! It must not allocate, lock or log on its emit path (from choosing a step to writing it): a
//! slow emit moves every device's beat. Failures are counted in [`OutputStats`]; `main` reads
//! and reports them. Far from a deadline it sleeps in short slices and plans again, so a new
//! timeline or clock estimate is taken up within [`SLICE`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::info;
use spin_sleep::{SpinSleeper, SpinStrategy};

use crate::grid::TimelineView;
use crate::midi_out::{MidiSink, SendError};
use crate::midi_plan::{MidiPlan, MidiStep, STOP};
use crate::osc_out::{OscSink, ntp_time};
use crate::osc_plan::{OscPlan, OscStep};

/// Longest coarse sleep before planning again.
pub const SLICE: Duration = Duration::from_millis(4);
/// Lateness past which an event counts as late in [`OutputStats`].
pub const LATE_NS: u64 = 1_000_000;

/// Server time against the emitter's clock: nanoseconds since the emitter's epoch.
pub trait ClockMap: Copy {
    fn to_local(&self, server_ns: i64) -> i64;
    fn to_server(&self, local_ns: i64) -> i64;
}

/// What the emitter follows: the newest timeline and clock mapping.
pub trait Feed: Send + 'static {
    type Timeline: TimelineView + Copy;
    type Map: ClockMap;
    /// The newest state, read without locking or allocating; `None` before the first sync.
    fn latest(&mut self) -> Option<(Self::Timeline, Self::Map)>;
    /// The instant local nanosecond 0 stands for.
    fn epoch(&self) -> Instant;
}

/// One output's plan and nudge.
#[derive(Clone, Copy, Debug)]
pub struct OutputPlan {
    pub plan: Plan,
    /// How much earlier than its instant an event is emitted: the output's latency nudge, plus
    /// the lead of OSC bundles.
    pub lead_ns: i64,
    /// The nudge alone (a bundle's timetag is its instant less this).
    pub latency_ns: i64,
}

#[derive(Clone, Copy, Debug)]
pub enum Plan {
    Midi(MidiPlan),
    Osc(OscPlan),
}

#[derive(Clone, Copy, Debug)]
pub enum Step {
    Midi(MidiStep),
    Osc(OscStep),
}

impl Step {
    pub fn at_ns(&self) -> i64 {
        match self {
            Step::Midi(s) => s.at_ns,
            Step::Osc(s) => s.at_ns,
        }
    }

    fn is_silent(&self) -> bool {
        match self {
            Step::Midi(s) => s.bytes().is_empty(),
            Step::Osc(s) => s.events.is_empty(),
        }
    }

    fn then(&self) -> Plan {
        match self {
            Step::Midi(s) => Plan::Midi(s.then),
            Step::Osc(s) => Plan::Osc(s.then),
        }
    }
}

/// The next thing to emit across all outputs.
#[derive(Clone, Copy, Debug)]
pub struct Pick {
    pub output: usize,
    /// When to emit it, in local nanoseconds.
    pub due_local: i64,
    pub step: Step,
}

/// Chooses the output whose next step is due first. Pure: the emitter and the tests call it
/// with the same arguments.
pub fn pick<T: TimelineView, M: ClockMap>(
    outputs: &[OutputPlan],
    tl: &T,
    map: &M,
    now_local: i64,
) -> Option<Pick> {
    let now_server = map.to_server(now_local);
    let mut best: Option<Pick> = None;
    for (i, o) in outputs.iter().enumerate() {
        // The plan works in "sounding" time: what must sound by now + lead is due now.
        let now = now_server.saturating_add(o.lead_ns);
        let step = match o.plan {
            Plan::Midi(p) => Step::Midi(p.step(tl, now)),
            Plan::Osc(p) => Step::Osc(p.step(tl, now)),
        };
        let due_local = map.to_local(step.at_ns()).saturating_sub(o.lead_ns);
        if best.is_none_or(|b| due_local < b.due_local) {
            best = Some(Pick {
                output: i,
                due_local,
                step,
            });
        }
    }
    best
}

/// What an output did, shared with `main` (atomics only).
#[derive(Debug, Default)]
pub struct OutputStats {
    /// Steps that were written.
    pub sent: AtomicU64,
    /// Steps written more than [`LATE_NS`] after their instant.
    pub late: AtomicU64,
    /// The worst lateness seen, in nanoseconds.
    pub max_late_ns: AtomicU64,
    /// Writes that failed, and the last failure's errno (−1: buffer full; −2: sequencer).
    pub failed: AtomicU64,
    pub last_error: AtomicI32,
}

/// Where an output's bytes go.
pub enum Sink {
    Midi(MidiSink),
    Osc(Box<OscSink>),
}

/// One output, ready to run.
pub struct Output {
    pub plan: OutputPlan,
    pub sink: Sink,
    pub stats: Arc<OutputStats>,
}

/// Real-time requests for the thread.
#[derive(Clone, Copy, Debug)]
pub struct Realtime {
    /// `SCHED_FIFO` priority, or 0 to stay on the normal scheduler.
    pub fifo_priority: i32,
    /// How much of the final stretch before an event to spin rather than sleep.
    pub spin: Duration,
}

/// Starts the emitter thread. It runs until `stop` is set, then sends Stop to every MIDI
/// device it had started, so none is left playing without a clock.
pub fn spawn<F: Feed>(
    mut feed: F,
    mut outputs: Vec<Output>,
    realtime: Realtime,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("bridge-emitter".into())
        .spawn(move || {
            apply_realtime(realtime);
            let epoch = feed.epoch();
            let local_now = || i64::try_from(epoch.elapsed().as_nanos()).unwrap_or(i64::MAX);
            let spin_ns = u32::try_from(realtime.spin.as_nanos()).unwrap_or(u32::MAX);
            let sleeper = SpinSleeper::new(spin_ns).with_spin_strategy(SpinStrategy::SpinLoopHint);
            let mut plans: Vec<OutputPlan> = outputs.iter().map(|o| o.plan).collect();
            while !stop.load(Ordering::Relaxed) {
                let Some((tl, map)) = feed.latest() else {
                    thread::sleep(SLICE);
                    continue;
                };
                let now = local_now();
                let Some(next) = pick(&plans, &tl, &map, now) else {
                    thread::sleep(SLICE);
                    continue;
                };
                let wait = next.due_local.saturating_sub(now);
                let spin = i64::from(spin_ns);
                if wait > SLICE.as_nanos() as i64 + spin {
                    // Far off: sleep a slice and plan again with the newest state.
                    thread::sleep(SLICE);
                    continue;
                }
                let out = &mut outputs[next.output];
                let at = epoch + Duration::from_nanos(u64::try_from(next.due_local).unwrap_or(0));
                if next.step.is_silent() {
                    // Nothing to write: no need to be exact.
                    if wait > 0 {
                        thread::sleep(Duration::from_nanos(wait as u64));
                    }
                } else {
                    if let (Step::Osc(s), Sink::Osc(sink)) = (&next.step, &mut out.sink) {
                        // The timetag: the event's instant less the nudge, on the wall clock
                        // the receiver schedules by.
                        let sound_local = map.to_local(s.at_ns.saturating_sub(out.plan.latency_ns));
                        let (wall, mono) = wall_and_local(&local_now);
                        sink.prepare(s, ntp_time(wall.saturating_add(sound_local - mono)));
                    }
                    sleeper.sleep_until(at);
                    let result = emit(&mut out.sink, &next.step);
                    let late = u64::try_from(local_now() - next.due_local).unwrap_or(0);
                    record(&out.stats, result, late);
                }
                plans[next.output].plan = next.step.then();
            }
            for (out, plan) in outputs.iter_mut().zip(&plans) {
                if let (Plan::Midi(p), Sink::Midi(sink)) = (plan.plan, &mut out.sink)
                    && p.device_playing()
                {
                    let _ = sink.send(&[STOP]);
                }
            }
        })
}

/// Writes one step.
fn emit(sink: &mut Sink, step: &Step) -> Result<(), i32> {
    match (sink, step) {
        (Sink::Midi(sink), Step::Midi(s)) => sink.send(s.bytes()).map_err(|e| match e {
            SendError::Full => -1,
            SendError::Sequencer => -2,
            SendError::Os(errno) => errno,
        }),
        (Sink::Osc(sink), Step::Osc(_)) => sink.send().map_err(|e| e.raw_os_error().unwrap_or(-1)),
        // Outputs are built with matching plans and sinks.
        _ => Ok(()),
    }
}

fn record(stats: &OutputStats, result: Result<(), i32>, late_ns: u64) {
    match result {
        Ok(()) => {
            stats.sent.fetch_add(1, Ordering::Relaxed);
        }
        Err(errno) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            stats.last_error.store(errno, Ordering::Relaxed);
        }
    }
    if late_ns > LATE_NS {
        stats.late.fetch_add(1, Ordering::Relaxed);
    }
    stats.max_late_ns.fetch_max(late_ns, Ordering::Relaxed);
}

/// The wall clock (unix ns) and the local clock, read back to back.
fn wall_and_local(local_now: &impl Fn() -> i64) -> (i64, i64) {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    (wall, local_now())
}

fn apply_realtime(realtime: Realtime) {
    if let Err(e) = conductor::rt::set_min_timer_slack() {
        info!("emitter: timer slack unchanged ({e})");
    }
    if realtime.fifo_priority == 0 {
        return;
    }
    match conductor::rt::set_fifo_priority(realtime.fifo_priority) {
        Ok(()) => info!("emitter: SCHED_FIFO priority {}", realtime.fifo_priority),
        Err(e) => info!(
            "emitter: no real-time priority ({e}); running on the normal scheduler \
             (grant CAP_SYS_NICE to enable)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::fake::timeline;
    use crate::midi_plan::TIMING_CLOCK;

    /// Server time = local time + a fixed offset.
    #[derive(Clone, Copy)]
    struct Offset(i64);
    impl ClockMap for Offset {
        fn to_local(&self, server_ns: i64) -> i64 {
            server_ns - self.0
        }
        fn to_server(&self, local_ns: i64) -> i64 {
            local_ns + self.0
        }
    }

    const T0: i64 = 1_700_000_000_000_000_000;

    fn midi(latency_ms: i64) -> OutputPlan {
        OutputPlan {
            plan: Plan::Midi(MidiPlan::new(true)),
            lead_ns: latency_ms * 1_000_000,
            latency_ns: latency_ms * 1_000_000,
        }
    }

    /// Runs `pick` with a fake local clock that jumps to each due instant.
    fn run(
        outputs: &mut [OutputPlan],
        map: Offset,
        from: i64,
        until: i64,
    ) -> Vec<(usize, i64, Step)> {
        let tl = timeline(120.0, 4, 0, T0, false, 0);
        let mut now = from;
        let mut out = Vec::new();
        while let Some(p) = pick(outputs, &tl, &map, now) {
            if p.due_local > until {
                break;
            }
            now = now.max(p.due_local);
            outputs[p.output].plan = p.step.then();
            out.push((p.output, p.due_local, p.step));
        }
        out
    }

    #[test]
    fn nudges_move_each_output_and_nothing_else() {
        // Local clock 5 s behind the server.
        let map = Offset(5_000_000_000);
        let mut outputs = [midi(0), midi(12), midi(-3)];
        let start = T0 - map.0 + 1_000_000_000;
        let events = run(&mut outputs, map, start, start + 1_000_000_000);
        let clocks = |o: usize| -> Vec<(u64, i64)> {
            events
                .iter()
                .filter(|(i, _, _)| *i == o)
                .filter_map(|(_, due, s)| match s {
                    Step::Midi(m) if m.bytes() == [TIMING_CLOCK] => Some((m.clock.unwrap(), *due)),
                    _ => None,
                })
                .collect()
        };
        let (a, b, c) = (clocks(0), clocks(1), clocks(2));
        let tl = timeline(120.0, 4, 0, T0, false, 0);
        for &(m, due) in &a {
            // The unnudged output emits at the clock's instant on the local clock.
            assert_eq!(due, crate::grid::clock_time(&tl, m) - map.0);
            if let Some(&(_, d)) = b.iter().find(|(mb, _)| *mb == m) {
                assert_eq!(d, due - 12_000_000, "12 ms early");
            }
            if let Some(&(_, d)) = c.iter().find(|(mc, _)| *mc == m) {
                assert_eq!(d, due + 3_000_000, "3 ms late");
            }
        }
        assert!(a.len() > 40 && b.len() > 40 && c.len() > 40);
        // Events come out in the order they are due.
        for pair in events.windows(2) {
            assert!(pair[0].1 <= pair[1].1);
        }
    }

    #[test]
    fn a_bundle_lead_sends_ahead_without_moving_the_instant() {
        let map = Offset(0);
        let mut outputs = [OutputPlan {
            plan: Plan::Osc(OscPlan::new()),
            lead_ns: 100_000_000,
            latency_ns: 0,
        }];
        let tl = timeline(120.0, 4, 0, T0, true, 0);
        let join = pick(&outputs, &tl, &map, T0 + 1).unwrap();
        outputs[0].plan = join.step.then();
        let next = pick(&outputs, &tl, &map, T0 + 1).unwrap();
        // Tick 1 is 125 ms after count 0; with 100 ms lead it is sent 25 ms after it,
        // and still carries its own instant.
        assert_eq!(next.step.at_ns(), tl.tick_time_ns(1));
        assert_eq!(next.due_local, tl.tick_time_ns(1) - 100_000_000);
        // The join happens in "sounding" time 100 ms ahead: the first tick it plans is the
        // one due after now + lead.
        if let Step::Osc(s) = join.step {
            assert_eq!(s.count, 1);
        }
    }
}
