//! The timing thread: the one place that decides when a tick happens.
//!
//! It owns the [`TickSchedule`] and nothing else. It sleeps until each deadline, stamps the tick,
//! pushes it into a wait-free ring ([`rtrb`]) and wakes the event loop through a [`mio::Waker`].
//! It must never block on a lock, allocate per tick, touch a socket or log on the tick path:
//! anything slow here moves every client's downbeat.
//!
//! Sleeping happens in two stages. Far from the deadline the thread parks (interruptibly, so a
//! tempo change is seen at once); within [`COARSE_MARGIN`] of it, `spin_sleep` sleeps natively
//! and spins only the last stretch ([`Realtime::spin`]).
//!
//! A thread that wakes to find itself [`SKIP_BEHIND`] or more ticks and [`SKIP_LATE_NS`] behind
//! (the process was stopped, the machine paused) does not fire the missed ticks back to back:
//! it skips to the present ([`catch_up`]), counts them as dropped and tells the loop once, through the event
//! ring, which logs it. Counts never wrap: a count that cannot advance stops the ticks rather
//! than starting again at 0, where every deadline lies in the past.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{info, warn};
use mio::Waker;
use rtrb::{Consumer, Producer, RingBuffer};
use spin_sleep::{SpinSleeper, SpinStrategy};

use crate::clock::Clock;
use crate::rt;
use crate::tempo::{Bpm, TickSchedule};

/// How far ahead of a deadline the thread stops parking and hands over to `spin_sleep`.
const COARSE_MARGIN: Duration = Duration::from_millis(2);
/// Ticks the ring holds: 12 s at 200 BPM with 24 ppqn, far more than the loop can lag.
const EVENT_RING: usize = 1024;
const COMMAND_RING: usize = 64;
/// The timing thread needs little stack; a small one keeps RSS down.
const STACK_BYTES: usize = 64 * 1024;
/// Overdue ticks from which the thread skips to the present instead of catching up. Fewer are
/// sent late: one or two ticks behind is the ordinary cost of a scheduling hiccup.
pub const SKIP_BEHIND: u64 = 3;
/// How late the oldest overdue tick must be, too, before anything is skipped: at fast tick
/// rates a few milliseconds' hiccup is several ticks, better sent a little late (each carries
/// its own time) than dropped. So a catch-up burst never spans more than this.
pub const SKIP_LATE_NS: u64 = 50_000_000;

/// One tick, as the timing thread emitted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tick {
    pub count: u64,
    /// When it was due, in ns since the clock's epoch.
    pub deadline_ns: u64,
    /// When the thread actually emitted it.
    pub emitted_ns: u64,
    pub bpm: Bpm,
}

impl Tick {
    /// Emission minus deadline.
    pub fn lateness_ns(&self) -> u64 {
        self.emitted_ns.saturating_sub(self.deadline_ns)
    }
}

/// What the timing thread tells the event loop, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimingEvent {
    Tick(Tick),
    /// A tick is due at `deadline_ns`, shortly: the loop should stay awake for it. Waking a
    /// sleeping thread on another core costs 100 µs or more on a virtual machine; this moves
    /// that cost ahead of the deadline.
    Soon {
        deadline_ns: u64,
    },
    /// The schedule tick 0 runs on, once the thread is running: the loop's first timeline.
    Started(TickSchedule),
    /// A tempo change took effect: the new schedule's anchor is the first tick at its tempo.
    Tempo(TickSchedule),
    /// The thread fell [`SKIP_BEHIND`] or more ticks behind and skipped `ticks` ticks: the
    /// next one emitted is `to`, on time.
    Skipped {
        ticks: u64,
        to: u64,
    },
    /// The count reached `u64::MAX` and cannot advance: no ticks until a new timeline comes.
    Exhausted,
}

/// What to do about ticks whose deadlines have passed: `None` to emit `next` (late, or on
/// time), or the count to skip to when [`SKIP_BEHIND`] or more are overdue at `now`, the
/// oldest by [`SKIP_LATE_NS`] or more. That count is the first one not yet due, so the
/// skipped ticks are never emitted back to back to make up for lost time. Pure, so the rule
/// is tested without a thread or a clock.
pub fn catch_up(schedule: &TickSchedule, next: u64, now_ns: u64) -> Option<u64> {
    let late = now_ns.saturating_sub(schedule.deadline_ns(next));
    // Ticks `next..first_future` are due (deadline at or before now).
    let first_future = schedule.first_count_at_or_after(now_ns.saturating_add(1));
    let overdue = first_future.saturating_sub(next);
    (overdue >= SKIP_BEHIND && late >= SKIP_LATE_NS).then_some(first_future)
}

/// What the event loop asks of the timing thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimingCommand {
    SetTempo(Bpm),
    /// Follow this schedule from its anchor on (a cluster's shared timeline). An anchor still
    /// ahead on the grid already followed waits for its count; anything else applies from the
    /// next tick, at the count the schedule gives for now.
    Adopt(TickSchedule),
    Stop,
}

/// Real-time requests for the thread.
#[derive(Clone, Copy, Debug)]
pub struct Realtime {
    /// `SCHED_FIFO` priority, or 0 to stay on the normal scheduler.
    pub fifo_priority: i32,
    /// How long before a deadline to wake the event loop, so it is already running when the
    /// tick arrives (0 = wake it with the tick).
    pub prewake: Duration,
    /// How much of the final stretch to spin rather than sleep. On a virtual machine an idle
    /// vCPU that halts can take milliseconds to resume; spinning keeps it running.
    pub spin: Duration,
}

/// The event loop's side of the timing thread.
pub struct TimingThread {
    commands: Producer<TimingCommand>,
    handle: JoinHandle<()>,
    /// Ticks the thread could not hand over because the ring was full (the loop was stalled).
    dropped: Arc<AtomicU64>,
    /// Ticks skipped because the thread itself fell behind (see [`catch_up`]).
    skipped: Arc<AtomicU64>,
}

/// The receiving end the event loop polls.
pub type TimingEvents = Consumer<TimingEvent>;

impl TimingThread {
    /// Starts the thread. Tick 0 is due one millisecond from now, giving the loop time to reach
    /// `poll` first; or, given a `timeline` to join, its first tick at least a millisecond
    /// from now.
    pub fn spawn(
        bpm: Bpm,
        ppqn: u32,
        clock: Clock,
        waker: Arc<Waker>,
        realtime: Realtime,
        timeline: Option<TickSchedule>,
    ) -> io::Result<(TimingThread, TimingEvents)> {
        let (commands, command_rx) = RingBuffer::new(COMMAND_RING);
        let (events_tx, events) = RingBuffer::new(EVENT_RING);
        let dropped = Arc::new(AtomicU64::new(0));
        let skipped = Arc::new(AtomicU64::new(0));
        // Re-anchored once the thread is running with its priority set (see below).
        let schedule = TickSchedule::new(bpm, ppqn, 0);
        let ticker = Ticker {
            schedule,
            clock,
            commands: command_rx,
            events: events_tx,
            waker,
            dropped: Arc::clone(&dropped),
            skipped: Arc::clone(&skipped),
            next: 0,
            exhausted: false,
            pending: None,
            last_deadline: None,
            prewake_ns: u64::try_from(realtime.prewake.as_nanos()).unwrap_or(0),
            spin: realtime.spin,
        };
        let handle = thread::Builder::new()
            .name("conductor-timing".into())
            .stack_size(STACK_BYTES)
            .spawn(move || {
                let mut ticker = ticker;
                if !apply_realtime(realtime) && ticker.prewake_ns > 0 {
                    // Without SCHED_FIFO the loop, polling ahead of a tick, competes with this
                    // thread's final spin, and on a 2-vCPU VM half the ticks came ~1 ms late.
                    info!("timing: pre-wake off (no real-time priority)");
                    ticker.prewake_ns = 0;
                }
                // Tick 0 is due 1 ms from now: counted from here, thread start-up and the
                // priority change cannot make it late.
                let first_ns = ticker.clock.now_ns() + 1_000_000;
                match timeline {
                    Some(schedule) => {
                        ticker.schedule = schedule;
                        ticker.next = schedule.first_count_at_or_after(first_ns);
                    }
                    None => ticker.schedule = TickSchedule::new(bpm, ppqn, first_ns),
                }
                ticker.emit(TimingEvent::Started(ticker.schedule));
                ticker.run();
            })?;
        Ok((
            TimingThread {
                commands,
                handle,
                dropped,
                skipped,
            },
            events,
        ))
    }

    /// Queues a command and wakes the thread if it is parked. Returns false when the command
    /// ring is full (the thread is not keeping up with commands), so the caller can refuse.
    pub fn send(&mut self, command: TimingCommand) -> bool {
        let sent = self.commands.push(command).is_ok();
        self.handle.thread().unpark();
        sent
    }

    /// Ticks no client got: the ring was full, or the thread skipped them.
    pub fn dropped_ticks(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed) + self.skipped_ticks()
    }

    /// Of those, the ticks skipped because the thread fell behind.
    pub fn skipped_ticks(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        // A thread that already ended (it never should) cannot take the command.
        while !self.handle.is_finished() && !self.send(TimingCommand::Stop) {
            thread::yield_now();
        }
        if self.handle.join().is_err() {
            warn!("timing thread panicked during shutdown");
        }
    }
}

/// Asks for what `realtime` wants; returns whether the thread got `SCHED_FIFO`.
fn apply_realtime(realtime: Realtime) -> bool {
    if let Err(e) = rt::set_min_timer_slack() {
        info!("timing: timer slack unchanged ({e})");
    }
    if realtime.fifo_priority == 0 {
        return false;
    }
    match rt::set_fifo_priority(realtime.fifo_priority) {
        Ok(()) => {
            info!("timing: SCHED_FIFO priority {}", realtime.fifo_priority);
            true
        }
        Err(e) => {
            info!(
                "timing: no real-time priority ({e}); running on the normal scheduler \
                 (grant CAP_SYS_NICE to enable)"
            );
            false
        }
    }
}

/// Whether `adopted` counts the same grid as `current`: `current` reaches the adopted anchor's
/// count at the adopted anchor's instant (within 1 ms: rounding, and clocks pinned by
/// different processes). Otherwise this instance's counts are its own, not the cluster's.
fn same_grid(current: &TickSchedule, adopted: &TickSchedule) -> bool {
    current
        .deadline_ns(adopted.anchor_count())
        .abs_diff(adopted.anchor_ns())
        <= 1_000_000
}

/// The state the timing thread owns.
struct Ticker {
    schedule: TickSchedule,
    clock: Clock,
    commands: Consumer<TimingCommand>,
    events: Producer<TimingEvent>,
    waker: Arc<Waker>,
    dropped: Arc<AtomicU64>,
    skipped: Arc<AtomicU64>,
    /// The count of the next tick to emit.
    next: u64,
    /// `next` is `u64::MAX` and was emitted: nothing more until a command moves it.
    exhausted: bool,
    /// An adopted schedule whose anchor is still ahead: it takes over at its anchor count.
    pending: Option<TickSchedule>,
    /// The deadline of the last tick emitted: where a tempo change re-anchors.
    last_deadline: Option<u64>,
    prewake_ns: u64,
    spin: Duration,
}

impl Ticker {
    fn run(mut self) {
        let coarse_ns =
            (COARSE_MARGIN.max(self.spin + Duration::from_micros(500))).as_nanos() as u64;
        loop {
            if !self.apply_commands() {
                return;
            }
            if self.exhausted {
                // Only a command can move the count; wait for one (interruptibly).
                thread::park_timeout(Duration::from_secs(1));
                continue;
            }
            // Never spin more than a quarter of the interval: at fast tick rates the thread
            // would otherwise spin all the time.
            let spin_ns =
                (self.spin.as_nanos() as f64).min(self.schedule.interval_ns() / 4.0) as u32;
            let sleeper = SpinSleeper::new(spin_ns).with_spin_strategy(SpinStrategy::SpinLoopHint);
            if let Some(pending) = self.pending
                && self.next >= pending.anchor_count()
            {
                self.schedule = pending;
                self.pending = None;
            }
            let deadline = self.schedule.deadline_ns(self.next);
            let now = self.clock.now_ns();
            if deadline <= now
                && let Some(to) = catch_up(&self.schedule, self.next, now)
            {
                // Behind by several ticks: skip them rather than fire them all at once.
                let ticks = to - self.next;
                self.skipped.fetch_add(ticks, Ordering::Relaxed);
                self.next = to;
                self.emit(TimingEvent::Skipped { ticks, to });
                continue;
            }
            if deadline > now.saturating_add(coarse_ns) {
                // Interruptible: the loop unparks us when it queues a command.
                thread::park_timeout(Duration::from_nanos(deadline - now - coarse_ns));
                continue;
            }
            // Pre-wake only where ticks are far enough apart that the loop, spinning for the
            // tick, does not spin most of the time.
            if self.prewake_ns > 0 && self.schedule.interval_ns() >= 4.0 * self.prewake_ns as f64 {
                sleeper.sleep_until(self.clock.instant(deadline.saturating_sub(self.prewake_ns)));
                self.emit(TimingEvent::Soon {
                    deadline_ns: deadline,
                });
            }
            sleeper.sleep_until(self.clock.instant(deadline));
            let mut deadline = deadline;
            if !self.commands.is_empty() {
                // A change that arrived during the final stretch still applies to this tick. If
                // it moved the tick later, sleep again; otherwise emit now, so that a stream of
                // commands can never hold a due tick back.
                if !self.apply_commands() {
                    return;
                }
                deadline = self.schedule.deadline_ns(self.next);
                if deadline > self.clock.now_ns() {
                    continue;
                }
            }
            let tick = Tick {
                count: self.next,
                deadline_ns: deadline,
                emitted_ns: self.clock.now_ns(),
                bpm: self.schedule.bpm(),
            };
            self.emit(TimingEvent::Tick(tick));
            self.last_deadline = Some(deadline);
            match self.next.checked_add(1) {
                Some(next) => self.next = next,
                None => {
                    self.exhausted = true;
                    self.emit(TimingEvent::Exhausted);
                }
            }
        }
    }

    /// Applies queued commands; false on `Stop`.
    fn apply_commands(&mut self) -> bool {
        while let Ok(command) = self.commands.pop() {
            match command {
                TimingCommand::Stop => return false,
                TimingCommand::Adopt(schedule) => {
                    let now = self.clock.now_ns();
                    let same_grid = same_grid(&self.schedule, &schedule);
                    if same_grid
                        && schedule.anchor_ns() > now
                        && schedule.anchor_count() >= self.next
                    {
                        // A change ahead on the grid this thread already follows: switch at
                        // exactly its anchor count.
                        self.pending = Some(schedule);
                    } else {
                        // Its anchor has passed (heard late), or this instance counted on its
                        // own while the cluster was out of reach: follow it from the next tick.
                        // On the same grid the count never repeats; on another one the shared
                        // count is the truth, even if it jumps back.
                        self.pending = None;
                        self.schedule = schedule;
                        let present = schedule.first_count_at_or_after(now);
                        self.next = if same_grid {
                            self.next.max(present)
                        } else {
                            present
                        };
                        self.exhausted = false;
                    }
                    self.emit(TimingEvent::Tempo(schedule));
                }
                TimingCommand::SetTempo(bpm) => {
                    // The loop filters out requests for the tempo it already asked for, but a
                    // change and its reversal can both be queued; the reversal re-anchors
                    // nothing and is still announced, so every client hears the final tempo.
                    if bpm != self.schedule.bpm() {
                        let now = self.clock.now_ns();
                        self.schedule =
                            self.schedule
                                .retempo(self.next, self.last_deadline, now, bpm);
                    }
                    self.emit(TimingEvent::Tempo(self.schedule));
                }
            }
        }
        true
    }

    fn emit(&mut self, event: TimingEvent) {
        if self.events.push(event).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        // A failed wake means the poll is gone (shutdown); nothing to do about it here.
        let _ = self.waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_tick_or_two_late_is_sent_and_more_are_skipped_to_the_present() {
        // 120 BPM, ppqn 4: a tick every 125 ms from 0.
        let s = TickSchedule::new(Bpm::whole(120), 4, 0);
        assert_eq!(catch_up(&s, 10, s.deadline_ns(10) - 1), None, "not yet due");
        assert_eq!(catch_up(&s, 10, s.deadline_ns(10)), None, "due now");
        assert_eq!(catch_up(&s, 10, s.deadline_ns(11) + 5), None, "two overdue");
        // Three overdue (10, 11, 12): skip to 13, the first not yet due.
        assert_eq!(catch_up(&s, 10, s.deadline_ns(12)), Some(13));
        // A second-long stall.
        assert_eq!(
            catch_up(&s, 10, s.deadline_ns(10) + 1_000_000_000),
            Some(19)
        );
        // At MIDI-clock rates (200 BPM, ppqn 96: 3.125 ms apart) a 20 ms hiccup is six ticks,
        // sent late; a 60 ms one is skipped.
        let fast = TickSchedule::new(Bpm::whole(200), 96, 0);
        assert_eq!(catch_up(&fast, 10, fast.deadline_ns(10) + 20_000_000), None);
        assert_eq!(
            catch_up(&fast, 10, fast.deadline_ns(10) + 60_000_000),
            Some(30)
        );
    }

    proptest! {
        /// Whenever it skips, it skips at least SKIP_BEHIND ticks, to a tick not yet due whose
        /// predecessor is; whenever it does not, fewer than SKIP_BEHIND are due or the oldest
        /// is less than SKIP_LATE_NS late.
        #[test]
        fn catch_up_skips_exactly_the_overdue_ticks(
            milli in 1_000u32..=1_000_000,
            ppqn in 1u32..=960,
            next in 0u64..1_000_000,
            late in 0u64..10_000_000_000,
        ) {
            let s = TickSchedule::new(Bpm::from_milli(milli), ppqn, 1_000);
            let now = s.deadline_ns(next) + late;
            match catch_up(&s, next, now) {
                Some(to) => {
                    prop_assert!(to >= next + SKIP_BEHIND);
                    prop_assert!(s.deadline_ns(to) > now);
                    prop_assert!(s.deadline_ns(to - 1) <= now);
                }
                None => prop_assert!(
                    s.deadline_ns(next + SKIP_BEHIND - 1) > now || late < SKIP_LATE_NS
                ),
            }
        }
    }

    /// Drains what the thread has sent for `span`: its tick counts, and whether it said the
    /// count was exhausted.
    fn run_for(timeline: TickSchedule, span: Duration) -> (Vec<u64>, bool) {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let realtime = Realtime {
            fifo_priority: 0,
            prewake: Duration::ZERO,
            spin: Duration::ZERO,
        };
        let (thread, mut events) = TimingThread::spawn(
            timeline.bpm(),
            timeline.ppqn(),
            Clock::start(),
            waker,
            realtime,
            Some(timeline),
        )
        .unwrap();
        let until = std::time::Instant::now() + span;
        let (mut counts, mut exhausted) = (Vec::new(), false);
        while std::time::Instant::now() < until {
            match events.pop() {
                Ok(TimingEvent::Tick(t)) => counts.push(t.count),
                Ok(TimingEvent::Exhausted) => exhausted = true,
                Ok(_) => {}
                Err(_) => thread::sleep(Duration::from_millis(1)),
            }
        }
        thread.stop();
        (counts, exhausted)
    }

    /// The runaway an outside attacker found: a count near u64::MAX wrapped to 0, where every
    /// deadline lies in the past, and the thread ticked as fast as the CPU allowed.
    #[test]
    fn a_count_at_the_end_of_u64_stops_instead_of_wrapping() {
        // 1000 BPM at ppqn 96: 0.625 ms apart, so the end comes within a few milliseconds.
        let s = TickSchedule::anchored(Bpm::whole(1000), 96, u64::MAX - 3, 0);
        let (counts, exhausted) = run_for(s, Duration::from_millis(300));
        assert!(exhausted, "no Exhausted event; counts {counts:?}");
        assert!(
            counts.len() <= 4,
            "{} ticks: {:?}…",
            counts.len(),
            &counts[..8.min(counts.len())]
        );
        assert_eq!(counts.last(), Some(&u64::MAX));
    }

    #[test]
    fn grids_agree_only_on_the_same_count_at_the_same_instant() {
        let current = TickSchedule::new(Bpm::whole(120), 4, 0);
        // Tick 40 at 5 s on the current grid; a change re-anchoring there is on it.
        let change = TickSchedule::anchored(Bpm::whole(150), 4, 40, current.deadline_ns(40));
        assert!(same_grid(&current, &change));
        // An instance that counted on its own: the cluster's tick 10⁶ is not our tick 10⁶.
        let shared = TickSchedule::anchored(Bpm::whole(120), 4, 1_000_000, 6_000_000_000);
        assert!(!same_grid(&current, &shared));
    }
}
