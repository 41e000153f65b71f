//! The timing thread for every room: the one place that decides when any tick happens.
//!
//! One thread serves every room's schedule. It keeps each room's next deadline in a
//! [`DeadlineHeap`], sleeps until the earliest, emits the tick of every room due by then, and
//! wakes its consumers once for the whole batch: rooms due at the same instant go out in one
//! wake-up. It hands everything over through wait-free rings ([`rtrb`]) and a
//! [`mio::Waker`] per consumer. It must never block on a lock, allocate, touch a socket or log
//! on the tick path: all its memory (rooms, heap, batch) is taken at start for `--max-rooms`.
//!
//! **One ordered stream.** Ticks and timeline changes travel on the same ring, in the order
//! the thread decided them: a [`TimingEvent::Timeline`] for a room comes after every tick that
//! room emitted under the previous timeline and before every tick under the new one. A
//! consumer on any thread can therefore follow each room exactly by reading its stream in
//! order. The thread feeds the same stream to every consumer it was started with (one event
//! loop today; one per fan-out shard tomorrow). A full ring drops ticks (counted), never a
//! timeline change: one that does not fit is owed to that consumer and delivered, coalesced
//! to the room's latest, before any later tick of that room.
//!
//! The decisions are in [`Scheduler`], which reads no clock: the thread passes it the time,
//! and tests pass it a fake one. Sleeping is done in two stages, as before: far from the
//! deadline the thread parks (interruptibly, so a command is seen at once); within the coarse
//! margin `spin_sleep` sleeps natively and spins the last stretch.

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
use crate::deadlines::DeadlineHeap;
use crate::room::RoomKey;
use crate::rt;
use crate::tempo::{Bpm, TickSchedule};
use crate::timeline::Timeline;

/// How far ahead of a deadline the thread stops parking and hands over to `spin_sleep`.
const COARSE_MARGIN: Duration = Duration::from_millis(2);
/// Overdue ticks from which a room skips to the present instead of catching up. Fewer are
/// sent late: one or two ticks behind is the ordinary cost of a scheduling hiccup.
pub const SKIP_BEHIND: u64 = 3;
/// How late the oldest overdue tick must be, too, before anything is skipped: at fast tick
/// rates a few milliseconds' hiccup is several ticks, better sent a little late (each carries
/// its own time) than dropped. So a catch-up burst never spans more than this.
pub const SKIP_LATE_NS: u64 = 50_000_000;

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
/// Commands the ring holds: control changes are rate-limited per room, so this is plenty.
const COMMAND_RING: usize = 4096;
/// The timing thread needs little stack; a small one keeps RSS down.
const STACK_BYTES: usize = 64 * 1024;

/// One tick of one room, as the timing thread emitted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoomTick {
    pub room: RoomKey,
    pub count: u64,
    /// When it was due, in ns since the clock's epoch.
    pub deadline_ns: u64,
    /// When the thread actually emitted it.
    pub emitted_ns: u64,
    pub bpm: Bpm,
}

impl RoomTick {
    /// Emission minus deadline.
    pub fn lateness_ns(&self) -> u64 {
        self.emitted_ns.saturating_sub(self.deadline_ns)
    }
}

/// What the timing thread tells its consumers, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimingEvent {
    Tick(RoomTick),
    /// A tick is due at `deadline_ns`, shortly: stay awake for it. Waking a sleeping thread on
    /// another core costs 100 µs or more on a virtual machine; this moves that cost ahead.
    Soon {
        deadline_ns: u64,
    },
    /// The timeline `room` follows from here on: a room added, or a change adopted (announce
    /// it now; its ticks change at its anchor).
    Timeline {
        room: RoomKey,
        timeline: Timeline,
    },
    /// `room` was dropped: no tick of it follows.
    Dropped {
        room: RoomKey,
    },
    /// The thread fell [`SKIP_BEHIND`] or more ticks behind and `room` skipped `ticks` ticks
    /// rather than fire them late and back to back: the next one is `to`, on time. They count
    /// as dropped.
    Skipped {
        room: RoomKey,
        ticks: u64,
        to: u64,
    },
    /// `room`'s count reached `u64::MAX` and cannot advance: no ticks until it gets a new
    /// timeline.
    Exhausted {
        room: RoomKey,
    },
}

/// What the hub asks of the timing thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimingCommand {
    /// Start ticking a room (or restart its slot with another generation).
    Add {
        room: RoomKey,
        timeline: Timeline,
    },
    /// Follow this timeline from its anchor on. An anchor still ahead on the grid already
    /// followed waits for its count; anything else applies from the next tick, at the count
    /// the timeline gives for now.
    Adopt {
        room: RoomKey,
        timeline: Timeline,
    },
    Drop {
        room: RoomKey,
    },
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

/// Settings for the thread.
#[derive(Clone, Copy, Debug)]
pub struct TimingConfig {
    /// Rooms at most (`--max-rooms`): every table is sized for it at start.
    pub max_rooms: usize,
    /// Events each consumer's ring holds.
    pub ring: usize,
    pub realtime: Realtime,
}

impl TimingConfig {
    /// A ring that holds about two seconds of ticks with every room at the highest tempo, so a
    /// consumer stalled that long loses nothing: at least 1024 events, and at most 2¹⁶ (about
    /// 5 MB; at 1,000 rooms at 200 BPM, ppqn 4, that is 5 s).
    pub fn ring_for(max_rooms: usize, max_bpm: Bpm, ppqn: u32) -> usize {
        let per_sec = max_bpm.as_f64() / 60.0 * f64::from(ppqn);
        let events = (max_rooms as f64 * per_sec * 2.0).ceil() as usize;
        events.clamp(1024, 1 << 16)
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

/// One room as the timing thread follows it.
#[derive(Clone, Copy, Debug)]
struct RoomClock {
    key: RoomKey,
    /// The latest timeline, as announced.
    timeline: Timeline,
    schedule: TickSchedule,
    /// An adopted schedule whose anchor is still ahead: it takes over at its anchor count.
    pending: Option<TickSchedule>,
    /// The count of the next tick to emit.
    next: u64,
}

impl RoomClock {
    /// Promotes a pending schedule whose anchor count has come, then gives the next deadline.
    fn next_deadline(&mut self) -> Option<u64> {
        if let Some(pending) = self.pending
            && self.next >= pending.anchor_count()
        {
            self.schedule = pending;
            self.pending = None;
        }
        Some(self.schedule.deadline_ns(self.next))
    }

    /// The grid in force at `count`.
    fn grid_at(&self, count: u64) -> &TickSchedule {
        match &self.pending {
            Some(p) if count >= p.anchor_count() => p,
            _ => &self.schedule,
        }
    }
}

/// The timing decisions for every room, without a clock or a thread: commands and the time
/// go in, events come out into a batch the caller hands on.
pub struct Scheduler {
    rooms: Vec<Option<RoomClock>>,
    heap: DeadlineHeap,
    /// Unix time of the monotonic axis's zero: timelines are on the unix axis.
    epoch_unix_ns: u64,
    /// Events decided since the caller last took them; never grows past its capacity.
    batch: Vec<TimingEvent>,
    /// Ticks skipped (the thread was held up), all rooms.
    skipped: u64,
}

impl Scheduler {
    pub fn new(max_rooms: usize, epoch_unix_ns: u64) -> Scheduler {
        let max_rooms = max_rooms.max(1);
        Scheduler {
            rooms: vec![None; max_rooms],
            heap: DeadlineHeap::with_capacity(max_rooms),
            epoch_unix_ns,
            // Per room, one catch-up run of ticks and a skip; plus commands' events.
            batch: Vec::with_capacity(max_rooms * (SKIP_BEHIND as usize + 3) + 64),
            skipped: 0,
        }
    }

    /// The earliest deadline of any room.
    pub fn next_deadline(&self) -> Option<u64> {
        self.heap.peek().map(|(deadline, _)| deadline)
    }

    pub fn rooms(&self) -> usize {
        self.heap.len()
    }

    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// The room in `slot`'s latest timeline, if the slot holds `room`.
    pub fn timeline(&self, room: RoomKey) -> Option<Timeline> {
        self.rooms
            .get(room.slot as usize)?
            .as_ref()
            .filter(|r| r.key == room)
            .map(|r| r.timeline)
    }

    /// The events decided so far, in order; the caller drains them.
    pub fn batch(&mut self) -> &mut Vec<TimingEvent> {
        &mut self.batch
    }

    fn push(&mut self, event: TimingEvent) {
        // Sized for the worst batch; should it be full, the event is dropped rather than
        // allocating on the tick path (a tick only: see `emit_due`).
        if self.batch.len() < self.batch.capacity() {
            self.batch.push(event);
        }
    }

    /// Applies a command at `now_ns`. Returns false for `Stop`.
    pub fn command(&mut self, command: TimingCommand, now_ns: u64) -> bool {
        match command {
            TimingCommand::Stop => return false,
            TimingCommand::Add { room, timeline } => {
                let Some(slot) = self.rooms.get_mut(room.slot as usize) else {
                    return true;
                };
                if let Some(old) = slot.take()
                    && old.key != room
                {
                    self.heap.remove(room.slot);
                    self.push(TimingEvent::Dropped { room: old.key });
                }
                let schedule = timeline.schedule(self.epoch_unix_ns);
                let mut clock = RoomClock {
                    key: room,
                    timeline,
                    schedule,
                    pending: None,
                    next: schedule.first_count_at_or_after(now_ns),
                };
                let deadline = clock.next_deadline();
                self.rooms[room.slot as usize] = Some(clock);
                self.push(TimingEvent::Timeline { room, timeline });
                match deadline {
                    Some(d) => self.heap.set(room.slot, d),
                    None => self.heap.remove(room.slot).is_some(),
                };
            }
            TimingCommand::Adopt { room, timeline } => {
                let epoch = self.epoch_unix_ns;
                let Some(Some(clock)) = self.rooms.get_mut(room.slot as usize) else {
                    return true;
                };
                if clock.key != room {
                    return true;
                }
                let schedule = timeline.schedule(epoch);
                let same_grid = same_grid(clock.grid_at(schedule.anchor_count()), &schedule);
                if same_grid
                    && schedule.anchor_ns() > now_ns
                    && schedule.anchor_count() >= clock.next
                {
                    // A change ahead on the grid this room already follows: switch at exactly
                    // its anchor count (replacing one still pending: it has the same anchor).
                    clock.pending = Some(schedule);
                } else {
                    // Its anchor has passed (heard late), or this instance counted on its own
                    // while the cluster was out of reach: follow it from the next tick. On the
                    // same grid the count never repeats; on another one the shared count is
                    // the truth, even if it jumps back.
                    clock.pending = None;
                    clock.schedule = schedule;
                    let present = schedule.first_count_at_or_after(now_ns);
                    clock.next = if same_grid {
                        clock.next.max(present)
                    } else {
                        present
                    };
                }
                clock.timeline = timeline;
                let deadline = clock.next_deadline();
                self.push(TimingEvent::Timeline { room, timeline });
                match deadline {
                    Some(d) => self.heap.set(room.slot, d),
                    None => self.heap.remove(room.slot).is_some(),
                };
            }
            TimingCommand::Drop { room } => {
                if let Some(slot) = self.rooms.get_mut(room.slot as usize)
                    && slot.as_ref().is_some_and(|r| r.key == room)
                {
                    *slot = None;
                    self.heap.remove(room.slot);
                    self.push(TimingEvent::Dropped { room });
                }
            }
        }
        true
    }

    /// Emits the tick of every room due at or before `now_ns`: a room a tick or two behind
    /// catches up; one further behind skips to the present ([`catch_up`]); one whose count
    /// cannot advance stops ([`TimingEvent::Exhausted`]). `stamp` gives each tick's emission
    /// time. Returns how many ticks were emitted.
    pub fn emit_due(&mut self, now_ns: u64, stamp: &mut dyn FnMut() -> u64) -> usize {
        let mut emitted = 0;
        while let Some((deadline, slot)) = self.heap.peek() {
            if deadline > now_ns || self.batch.len() + 2 > self.batch.capacity() {
                break;
            }
            let Some(Some(clock)) = self.rooms.get_mut(slot as usize) else {
                self.heap.remove(slot);
                continue;
            };
            let room = clock.key;
            if let Some(to) = catch_up(clock.grid_at(clock.next), clock.next, now_ns) {
                // Behind by several ticks: skip them rather than fire them all at once.
                let ticks = to - clock.next;
                clock.next = to;
                let next = clock.next_deadline();
                self.skipped += ticks;
                self.batch.push(TimingEvent::Skipped { room, ticks, to });
                match next {
                    Some(d) => self.heap.set(slot, d),
                    None => self.heap.remove(slot).is_some(),
                };
                continue;
            }
            let tick = RoomTick {
                room,
                count: clock.next,
                deadline_ns: deadline,
                emitted_ns: stamp(),
                bpm: clock.schedule.bpm(),
            };
            self.batch.push(TimingEvent::Tick(tick));
            emitted += 1;
            let next = match clock.next.checked_add(1) {
                Some(next) => {
                    clock.next = next;
                    clock.next_deadline()
                }
                None => {
                    self.batch.push(TimingEvent::Exhausted { room });
                    None
                }
            };
            match next {
                Some(d) => self.heap.set(slot, d),
                None => self.heap.remove(slot).is_some(),
            };
        }
        emitted
    }
}

/// What one consumer is owed for a room whose announcement did not fit in its ring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Owed {
    /// A room dropped from this slot whose `Dropped` is still to be delivered.
    dropped: Option<RoomKey>,
    /// The slot's current room's latest timeline is still to be delivered.
    timeline: bool,
}

/// One consumer's end as the timing thread sees it.
struct Outlet {
    events: Producer<TimingEvent>,
    waker: Arc<Waker>,
    owed: Vec<Owed>,
    owing: usize,
    /// Events pushed since the last wake.
    unwoken: bool,
}

impl Outlet {
    /// Delivers what is owed, in slot order, while the ring has room.
    fn settle(&mut self, scheduler: &Scheduler) {
        if self.owing == 0 {
            return;
        }
        for slot in 0..self.owed.len() {
            let owed = self.owed[slot];
            if owed == Owed::default() {
                continue;
            }
            if let Some(room) = owed.dropped {
                if self.events.push(TimingEvent::Dropped { room }).is_err() {
                    return;
                }
                self.unwoken = true;
                self.owed[slot].dropped = None;
            }
            if owed.timeline {
                let current = scheduler.rooms[slot].as_ref().map(|r| (r.key, r.timeline));
                if let Some((room, timeline)) = current
                    && self
                        .events
                        .push(TimingEvent::Timeline { room, timeline })
                        .is_err()
                {
                    return;
                }
                self.unwoken = true;
                self.owed[slot].timeline = false;
            }
            self.owing -= 1;
        }
    }

    fn owe(&mut self, slot: usize, change: impl FnOnce(&mut Owed)) {
        if let Some(owed) = self.owed.get_mut(slot) {
            if *owed == Owed::default() {
                self.owing += 1;
            }
            change(owed);
        }
    }

    /// Hands one event on. Returns false when a tick was dropped.
    fn deliver(&mut self, event: TimingEvent, scheduler: &Scheduler) -> bool {
        self.settle(scheduler);
        let slot = match event {
            TimingEvent::Tick(t) => Some(t.room.slot),
            TimingEvent::Timeline { room, .. }
            | TimingEvent::Dropped { room }
            | TimingEvent::Skipped { room, .. }
            | TimingEvent::Exhausted { room } => Some(room.slot),
            TimingEvent::Soon { .. } => None,
        };
        let behind = slot
            .and_then(|s| self.owed.get(s as usize))
            .is_some_and(|o| *o != Owed::default());
        let pushed = !behind && self.events.push(event).is_ok();
        if pushed {
            self.unwoken = true;
            return true;
        }
        match event {
            // Announcements are never lost: the room's latest is delivered before its next
            // tick. (Only a Dropped for the old room in this slot is kept apart from it.)
            TimingEvent::Timeline { room, .. } => {
                self.owe(room.slot as usize, |o| o.timeline = true);
                true
            }
            TimingEvent::Dropped { room } => {
                self.owe(room.slot as usize, |o| {
                    o.dropped = Some(room);
                    o.timeline = false;
                });
                true
            }
            TimingEvent::Tick(_) => false,
            TimingEvent::Soon { .. }
            | TimingEvent::Skipped { .. }
            | TimingEvent::Exhausted { .. } => true,
        }
    }

    fn wake(&mut self) {
        if self.unwoken {
            self.unwoken = false;
            // A failed wake means the poll is gone (shutdown); nothing to do about it here.
            let _ = self.waker.wake();
        }
    }
}

/// A consumer's side of the stream.
pub type TimingEvents = Consumer<TimingEvent>;

/// The hub's side of the timing thread.
pub struct TimingThread {
    commands: Producer<TimingCommand>,
    handle: JoinHandle<()>,
    /// Ticks the thread could not hand over (a consumer's ring was full).
    dropped: Arc<AtomicU64>,
    /// Ticks skipped because the thread fell behind (see [`catch_up`]).
    skipped: Arc<AtomicU64>,
}

impl TimingThread {
    /// Starts the thread with one event stream per waker (each consumer wakes through its own
    /// poll). The thread starts with no room: `Add` them.
    pub fn spawn(
        cfg: TimingConfig,
        clock: Clock,
        wakers: Vec<Arc<Waker>>,
    ) -> io::Result<(TimingThread, Vec<TimingEvents>)> {
        let (commands, command_rx) = RingBuffer::new(COMMAND_RING);
        let dropped = Arc::new(AtomicU64::new(0));
        let skipped = Arc::new(AtomicU64::new(0));
        let mut consumers = Vec::with_capacity(wakers.len());
        let mut outlets = Vec::with_capacity(wakers.len());
        for waker in wakers {
            let (tx, rx) = RingBuffer::new(cfg.ring.max(16));
            consumers.push(rx);
            outlets.push(Outlet {
                events: tx,
                waker,
                owed: vec![Owed::default(); cfg.max_rooms.max(1)],
                owing: 0,
                unwoken: false,
            });
        }
        let runner = Runner {
            scheduler: Scheduler::new(cfg.max_rooms, clock.unix_ns(0)),
            clock,
            commands: command_rx,
            outlets,
            dropped: Arc::clone(&dropped),
            skipped: Arc::clone(&skipped),
            prewake_ns: u64::try_from(cfg.realtime.prewake.as_nanos()).unwrap_or(0),
            spin: cfg.realtime.spin,
            last_deadline: None,
            reported_skipped: 0,
        };
        let realtime = cfg.realtime;
        let handle = thread::Builder::new()
            .name("conductor-timing".into())
            .stack_size(STACK_BYTES)
            .spawn(move || {
                let mut runner = runner;
                if !apply_realtime(realtime) && runner.prewake_ns > 0 {
                    // Without SCHED_FIFO the loop, polling ahead of a tick, competes with this
                    // thread's final spin, and on a 2-vCPU VM half the ticks came ~1 ms late.
                    info!("timing: pre-wake off (no real-time priority)");
                    runner.prewake_ns = 0;
                }
                runner.run();
            })?;
        Ok((
            TimingThread {
                commands,
                handle,
                dropped,
                skipped,
            },
            consumers,
        ))
    }

    /// Queues a command and wakes the thread if it is parked. Returns false when the command
    /// ring is full (the thread is not keeping up), so the caller can refuse.
    pub fn send(&mut self, command: TimingCommand) -> bool {
        let sent = self.commands.push(command).is_ok();
        self.handle.thread().unpark();
        sent
    }

    /// Ticks no client got: a consumer's ring was full, or the thread skipped them.
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

/// The state the timing thread owns.
struct Runner {
    scheduler: Scheduler,
    clock: Clock,
    commands: Consumer<TimingCommand>,
    outlets: Vec<Outlet>,
    dropped: Arc<AtomicU64>,
    skipped: Arc<AtomicU64>,
    prewake_ns: u64,
    spin: Duration,
    /// The deadline of the last batch: the gap to the next one bounds spinning and pre-wake.
    last_deadline: Option<u64>,
    /// Skipped ticks already added to `dropped`.
    reported_skipped: u64,
}

impl Runner {
    fn run(mut self) {
        let coarse_ns =
            (COARSE_MARGIN.max(self.spin + Duration::from_micros(500))).as_nanos() as u64;
        loop {
            if !self.apply_commands() {
                return;
            }
            let Some(deadline) = self.scheduler.next_deadline() else {
                // No room at all: wait for a command.
                thread::park();
                continue;
            };
            let now = self.clock.now_ns();
            if deadline > now + coarse_ns {
                // Interruptible: the hub unparks us when it queues a command.
                thread::park_timeout(Duration::from_nanos(deadline - now - coarse_ns));
                continue;
            }
            // Spin and pre-wake within the gap since the last batch: with rooms out of phase
            // the next deadline may be close, and the thread must not spin all the time.
            let gap = self
                .last_deadline
                .map_or(u64::MAX, |last| deadline.saturating_sub(last));
            let spin_ns = (self.spin.as_nanos() as u64).min(gap / 4);
            let sleeper = SpinSleeper::new(u32::try_from(spin_ns).unwrap_or(u32::MAX))
                .with_spin_strategy(SpinStrategy::SpinLoopHint);
            if self.prewake_ns > 0
                && gap >= 4 * self.prewake_ns
                && deadline.saturating_sub(self.prewake_ns) > now
            {
                sleeper.sleep_until(self.clock.instant(deadline.saturating_sub(self.prewake_ns)));
                self.deliver_one(TimingEvent::Soon {
                    deadline_ns: deadline,
                });
                self.wake_all();
            }
            sleeper.sleep_until(self.clock.instant(deadline));
            if !self.commands.is_empty() {
                // A change that arrived during the final stretch still applies to this tick. If
                // it moved the earliest deadline later, sleep again; otherwise emit now, so
                // that a stream of commands can never hold a due tick back.
                if !self.apply_commands() {
                    return;
                }
                if self
                    .scheduler
                    .next_deadline()
                    .is_none_or(|d| d > self.clock.now_ns())
                {
                    continue;
                }
            }
            let clock = self.clock;
            let now = clock.now_ns();
            self.scheduler.emit_due(now, &mut || clock.now_ns());
            self.last_deadline = Some(deadline);
            self.hand_over();
        }
    }

    /// Applies queued commands and hands their announcements over; false on `Stop`.
    fn apply_commands(&mut self) -> bool {
        let mut running = true;
        while let Ok(command) = self.commands.pop() {
            if !self.scheduler.command(command, self.clock.now_ns()) {
                running = false;
                break;
            }
        }
        self.hand_over();
        running
    }

    /// Hands the scheduler's batch to every consumer, then wakes each once.
    fn hand_over(&mut self) {
        let mut batch = std::mem::take(self.scheduler.batch());
        let mut lost = 0;
        for outlet in &mut self.outlets {
            for event in &batch {
                if !outlet.deliver(*event, &self.scheduler) {
                    lost += 1;
                }
            }
        }
        batch.clear();
        // Give the (empty, still allocated) batch back: no allocation per tick.
        *self.scheduler.batch() = batch;
        let skipped = self.scheduler.skipped() - self.reported_skipped;
        self.reported_skipped = self.scheduler.skipped();
        if lost > 0 {
            self.dropped.fetch_add(lost, Ordering::Relaxed);
        }
        if skipped > 0 {
            self.skipped.fetch_add(skipped, Ordering::Relaxed);
        }
        self.wake_all();
    }

    fn deliver_one(&mut self, event: TimingEvent) {
        for outlet in &mut self.outlets {
            outlet.deliver(event, &self.scheduler);
        }
    }

    fn wake_all(&mut self) {
        for outlet in &mut self.outlets {
            outlet.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeline::{Change, Planned, plan};

    const EPOCH: u64 = 1_700_000_000_000_000_000;
    const MS: u64 = 1_000_000;

    fn key(slot: u32, generation: u32) -> RoomKey {
        RoomKey { slot, generation }
    }

    /// A room whose tick 0 falls at `start_ms` on the monotonic axis.
    fn timeline(bpm: u32, start_ms: u64) -> Timeline {
        Timeline::new(Bpm::whole(bpm), 4, 4, EPOCH + start_ms * MS)
    }

    fn ticks(events: &[TimingEvent]) -> Vec<(RoomKey, u64, u64)> {
        events
            .iter()
            .filter_map(|e| match e {
                TimingEvent::Tick(t) => Some((t.room, t.count, t.deadline_ns)),
                _ => None,
            })
            .collect()
    }

    /// Runs the scheduler as the thread does, with a clock that jumps from deadline to
    /// deadline, until `until_ns`; returns every event in order.
    fn run(s: &mut Scheduler, until_ns: u64) -> Vec<TimingEvent> {
        let mut out: Vec<TimingEvent> = s.batch().drain(..).collect();
        while let Some(d) = s.next_deadline() {
            if d > until_ns {
                break;
            }
            s.emit_due(d, &mut || d);
            out.append(s.batch());
        }
        out
    }

    #[test]
    fn two_rooms_tick_at_their_own_tempos_in_deadline_order() {
        let mut s = Scheduler::new(4, EPOCH);
        let (a, b) = (key(0, 1), key(1, 1));
        s.command(
            TimingCommand::Add {
                room: a,
                timeline: timeline(120, 1),
            },
            0,
        );
        s.command(
            TimingCommand::Add {
                room: b,
                timeline: timeline(150, 1),
            },
            0,
        );
        let events = run(&mut s, 1_001 * MS);
        assert!(matches!(events[0], TimingEvent::Timeline { room, .. } if room == a));
        assert!(matches!(events[1], TimingEvent::Timeline { room, .. } if room == b));
        let t = ticks(&events);
        let of = |room| {
            t.iter()
                .filter(|x| x.0 == room)
                .copied()
                .collect::<Vec<_>>()
        };
        // 1 s at 125 ms and at 100 ms a tick, tick 0 at 1 ms.
        assert_eq!(of(a).len(), 9);
        assert_eq!(of(b).len(), 11);
        for (room, interval) in [(a, 125 * MS), (b, 100 * MS)] {
            for (i, tick) in of(room).iter().enumerate() {
                assert_eq!(tick.1, i as u64);
                assert_eq!(tick.2, MS + i as u64 * interval);
            }
        }
        assert!(t.windows(2).all(|w| w[0].2 <= w[1].2), "deadline order");
    }

    #[test]
    fn rooms_due_at_the_same_instant_come_in_one_batch() {
        let mut s = Scheduler::new(8, EPOCH);
        for slot in 0..8 {
            s.command(
                TimingCommand::Add {
                    room: key(slot, 1),
                    timeline: timeline(120, 10),
                },
                0,
            );
        }
        s.batch().clear();
        let d = s.next_deadline().unwrap();
        assert_eq!(s.emit_due(d, &mut || d), 8);
        assert_eq!(ticks(s.batch()).len(), 8);
        assert!(ticks(s.batch()).iter().all(|t| t.1 == 0 && t.2 == 10 * MS));
    }

    #[test]
    fn a_change_is_announced_at_once_and_ticks_follow_it_from_its_anchor() {
        let mut s = Scheduler::new(2, EPOCH);
        let a = key(0, 1);
        let first = timeline(120, 0);
        s.command(
            TimingCommand::Add {
                room: a,
                timeline: first,
            },
            0,
        );
        let mut events = run(&mut s, 1_000 * MS);
        // At 1.01 s (tick 8 is out) the tempo changes 250 ms ahead: at tick 11 (1.375 s).
        let now = 1_010 * MS;
        let Planned::Changed(next) = plan(
            &first,
            Change::SetBpm(Bpm::whole(240)),
            EPOCH + now,
            250 * MS,
        ) else {
            panic!("no change planned");
        };
        assert_eq!(next.anchor_count, 11);
        s.command(
            TimingCommand::Adopt {
                room: a,
                timeline: next,
            },
            now,
        );
        events.extend(run(&mut s, 2_000 * MS));
        let announced = events
            .iter()
            .position(|e| matches!(e, TimingEvent::Timeline { timeline, .. } if *timeline == next))
            .expect("announced");
        let t = ticks(&events[announced..]);
        // Ticks 9 and 10 on the old grid, then 11 at the announced instant, 62.5 ms apart.
        assert_eq!(t[0].1, 9);
        assert_eq!(t[0].2, 1_125 * MS);
        assert_eq!(t[2].1, 11);
        assert_eq!(t[2].2, next.anchor_unix_ns - EPOCH);
        assert_eq!(t[3].2 - t[2].2, 62_500_000);
        let bpm_of = |count: u64| {
            events.iter().find_map(|e| match e {
                TimingEvent::Tick(t) if t.count == count => Some(t.bpm),
                _ => None,
            })
        };
        assert_eq!(bpm_of(10), Some(Bpm::whole(120)));
        assert_eq!(bpm_of(11), Some(Bpm::whole(240)));
    }

    #[test]
    fn a_dropped_room_stops_and_its_slot_serves_the_next_generation() {
        let mut s = Scheduler::new(1, EPOCH);
        let (old, new) = (key(0, 1), key(0, 2));
        s.command(
            TimingCommand::Add {
                room: old,
                timeline: timeline(120, 0),
            },
            0,
        );
        let mut events = run(&mut s, 500 * MS);
        s.command(TimingCommand::Drop { room: new }, 501 * MS);
        assert_eq!(
            s.rooms(),
            1,
            "a drop for another generation changes nothing"
        );
        s.command(TimingCommand::Drop { room: old }, 501 * MS);
        assert_eq!(s.rooms(), 0);
        s.command(
            TimingCommand::Add {
                room: new,
                timeline: timeline(60, 600),
            },
            550 * MS,
        );
        events.extend(run(&mut s, 2_000 * MS));
        let dropped = events
            .iter()
            .position(|e| *e == TimingEvent::Dropped { room: old })
            .expect("dropped");
        assert!(ticks(&events[dropped..]).iter().all(|t| t.0 == new));
        assert!(ticks(&events[..dropped]).iter().all(|t| t.0 == old));
        assert_eq!(s.timeline(old), None);
        assert_eq!(s.timeline(new).map(|t| t.bpm), Some(Bpm::whole(60)));
    }

    #[test]
    fn a_room_added_late_starts_at_the_present_count() {
        let mut s = Scheduler::new(1, EPOCH);
        // Its tick 0 was due at 0; the command arrives at 1 s.
        s.command(
            TimingCommand::Add {
                room: key(0, 1),
                timeline: timeline(120, 0),
            },
            1_000 * MS,
        );
        let t = ticks(&run(&mut s, 1_200 * MS));
        assert_eq!(t[0].1, 8);
        assert_eq!(t[0].2, 1_000 * MS);
    }

    #[test]
    fn a_held_up_thread_catches_up_a_little_and_skips_a_lot() {
        let mut s = Scheduler::new(1, EPOCH);
        let a = key(0, 1);
        s.command(
            TimingCommand::Add {
                room: a,
                timeline: timeline(120, 0),
            },
            0,
        );
        s.batch().clear();
        // Two ticks overdue: 0 and 1 back to back.
        s.emit_due(200 * MS, &mut || 200 * MS);
        assert_eq!(
            ticks(s.batch()).iter().map(|t| t.1).collect::<Vec<_>>(),
            [0, 1]
        );
        s.batch().clear();
        // Then held up for 2 s: the room jumps to the present (tick 19 at 2.375 s) instead
        // of firing 17 ticks at once; none goes out late.
        let now = 2_300 * MS;
        s.emit_due(now, &mut || now);
        let batch: Vec<TimingEvent> = s.batch().drain(..).collect();
        assert_eq!(
            batch,
            [TimingEvent::Skipped {
                room: a,
                ticks: 17,
                to: 19
            }]
        );
        assert_eq!(s.skipped(), 17);
        assert_eq!(s.next_deadline(), Some(2_375 * MS));
    }

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

    proptest::proptest! {
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
                    proptest::prop_assert!(to >= next + SKIP_BEHIND);
                    proptest::prop_assert!(s.deadline_ns(to) > now);
                    proptest::prop_assert!(s.deadline_ns(to - 1) <= now);
                }
                None => proptest::prop_assert!(
                    s.deadline_ns(next + SKIP_BEHIND - 1) > now || late < SKIP_LATE_NS
                ),
            }
        }
    }

    /// The runaway an outside attacker found: a count near u64::MAX wrapped to 0, where every
    /// deadline lies in the past, and the thread ticked as fast as the CPU allowed.
    #[test]
    fn a_count_at_the_end_of_u64_stops_instead_of_wrapping() {
        let mut s = Scheduler::new(1, EPOCH);
        let a = key(0, 1);
        let mut t = timeline(1000, 0);
        t.ppqn = 96;
        t.anchor_count = u64::MAX - 3;
        s.command(
            TimingCommand::Add {
                room: a,
                timeline: t,
            },
            0,
        );
        let events = run(&mut s, 1_000 * MS);
        let counts: Vec<u64> = ticks(&events).iter().map(|t| t.1).collect();
        assert_eq!(counts, [u64::MAX - 3, u64::MAX - 2, u64::MAX - 1, u64::MAX]);
        assert_eq!(events.last(), Some(&TimingEvent::Exhausted { room: a }));
        assert_eq!(s.next_deadline(), None, "no more ticks");
        // A new timeline starts it again.
        s.command(
            TimingCommand::Adopt {
                room: a,
                timeline: timeline(120, 2_000),
            },
            1_500 * MS,
        );
        assert_eq!(s.next_deadline(), Some(2_000 * MS));
    }

    #[test]
    fn a_timeline_heard_late_applies_from_the_next_tick_without_repeating_a_count() {
        let mut s = Scheduler::new(1, EPOCH);
        let a = key(0, 1);
        let first = timeline(120, 0);
        s.command(
            TimingCommand::Add {
                room: a,
                timeline: first,
            },
            0,
        );
        run(&mut s, 1_000 * MS);
        // A cluster's change anchored at tick 6 (750 ms), heard at 1.01 s.
        let mut late = first;
        late.version += 1;
        late.anchor_count = 6;
        late.anchor_unix_ns = first.unix_ns_of(6);
        late.bpm = Bpm::whole(60);
        s.command(
            TimingCommand::Adopt {
                room: a,
                timeline: late,
            },
            1_010 * MS,
        );
        let t = ticks(&run(&mut s, 3_000 * MS));
        // On the 60 BPM grid from 750 ms tick 8 falls at 1.25 s, but 8 went out already (at
        // 1 s, on the old grid): the count goes on from 9, at 1.5 s.
        assert_eq!((t[0].1, t[0].2), (9, 1_500 * MS));
        assert_eq!(t[1].2 - t[0].2, 250 * MS);
    }

    #[test]
    fn the_batch_never_reallocates() {
        let mut s = Scheduler::new(16, EPOCH);
        let capacity = s.batch.capacity();
        for slot in 0..16 {
            s.command(
                TimingCommand::Add {
                    room: key(slot, 1),
                    timeline: timeline(200, u64::from(slot)),
                },
                0,
            );
        }
        // Held up for a minute: every room catches up or skips, within the batch.
        let now = 60_000 * MS;
        while s.next_deadline().is_some_and(|d| d <= now) {
            s.emit_due(now, &mut || now);
            s.batch().clear();
        }
        assert_eq!(s.batch.capacity(), capacity);
    }

    fn outlet(capacity: usize, slots: usize) -> (Outlet, TimingEvents) {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let (tx, rx) = RingBuffer::new(capacity);
        (
            Outlet {
                events: tx,
                waker,
                owed: vec![Owed::default(); slots],
                owing: 0,
                unwoken: false,
            },
            rx,
        )
    }

    #[test]
    fn a_full_ring_drops_ticks_but_owes_announcements() {
        let mut s = Scheduler::new(2, EPOCH);
        let a = key(0, 1);
        s.command(
            TimingCommand::Add {
                room: a,
                timeline: timeline(120, 0),
            },
            0,
        );
        let (mut out, mut rx) = outlet(2, 2);
        let tick = |count| {
            TimingEvent::Tick(RoomTick {
                room: a,
                count,
                deadline_ns: 0,
                emitted_ns: 0,
                bpm: Bpm::whole(120),
            })
        };
        assert!(out.deliver(tick(0), &s));
        assert!(out.deliver(tick(1), &s));
        assert!(!out.deliver(tick(2), &s), "full: the tick is dropped");
        let changed = timeline(90, 0);
        s.command(
            TimingCommand::Adopt {
                room: a,
                timeline: changed,
            },
            0,
        );
        assert!(out.deliver(
            TimingEvent::Timeline {
                room: a,
                timeline: changed
            },
            &s
        ));
        assert_eq!(out.owing, 1);
        // The consumer reads one: still no room for both the debt and the tick.
        assert_eq!(rx.pop().unwrap(), tick(0));
        assert!(
            !out.deliver(tick(3), &s),
            "the room's tick waits behind its announcement"
        );
        assert_eq!(rx.pop().unwrap(), tick(1));
        assert_eq!(
            rx.pop().unwrap(),
            TimingEvent::Timeline {
                room: a,
                timeline: changed
            }
        );
        assert!(out.deliver(tick(4), &s));
        assert_eq!(rx.pop().unwrap(), tick(4));
        assert_eq!(out.owing, 0);
    }

    #[test]
    fn the_thread_streams_every_room_in_order() {
        let mut poll = mio::Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let clock = Clock::start();
        let cfg = TimingConfig {
            max_rooms: 4,
            ring: 4096,
            realtime: Realtime {
                fifo_priority: 0,
                prewake: Duration::ZERO,
                spin: Duration::from_micros(200),
            },
        };
        let (mut thread, mut streams) = TimingThread::spawn(cfg, clock, vec![waker]).unwrap();
        let start = clock.unix_now_ns() + 5 * MS;
        let (a, b) = (key(0, 1), key(3, 7));
        // 1000 BPM at ppqn 24: a tick every 2.5 ms, so this takes a fraction of a second.
        let fast = |start| Timeline::new(Bpm::whole(1000), 24, 4, start);
        assert!(thread.send(TimingCommand::Add {
            room: a,
            timeline: fast(start)
        }));
        assert!(thread.send(TimingCommand::Add {
            room: b,
            timeline: fast(start + 100_000)
        }));
        let mut events = Vec::new();
        let mut polled = mio::Events::with_capacity(8);
        let mut counts = [0u64; 2];
        while counts.iter().any(|&c| c < 100) {
            poll.poll(&mut polled, Some(Duration::from_secs(5)))
                .unwrap();
            assert!(!polled.is_empty(), "no wake-up within 5 s");
            while let Ok(e) = streams[0].pop() {
                if let TimingEvent::Tick(t) = e {
                    counts[usize::from(t.room == b)] += 1;
                }
                events.push(e);
            }
        }
        assert!(thread.send(TimingCommand::Drop { room: a }));
        thread.stop();
        while let Ok(e) = streams[0].pop() {
            events.push(e);
        }
        for room in [a, b] {
            let first = events
                .iter()
                .position(|e| matches!(e, TimingEvent::Timeline { room: r, .. } if *r == room))
                .unwrap();
            assert!(
                ticks(&events[..first]).iter().all(|t| t.0 != room),
                "a tick before its room"
            );
            // Counts run on, except across a skip the thread reported (this machine may hold
            // the thread up); deadlines are exact either way.
            let mut last: Option<(u64, u64)> = None;
            let mut skipped = 0;
            for e in &events {
                match e {
                    TimingEvent::Tick(t) if t.room == room => {
                        if let Some((count, deadline)) = last {
                            assert_eq!(t.count, count + 1 + skipped, "counts run on");
                            assert_eq!(t.deadline_ns - deadline, (t.count - count) * 2_500_000);
                        }
                        last = Some((t.count, t.deadline_ns));
                        skipped = 0;
                    }
                    TimingEvent::Skipped { room: r, ticks, .. } if *r == room => skipped = *ticks,
                    _ => {}
                }
            }
        }
        let dropped = events
            .iter()
            .position(|e| *e == TimingEvent::Dropped { room: a })
            .unwrap();
        assert!(ticks(&events[dropped..]).iter().all(|t| t.0 == b));
    }
}
