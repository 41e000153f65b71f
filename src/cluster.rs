//! Several instances, one timeline: the shared timeline in Redis and the thread that keeps it.
//!
//! Ticks are a pure function of the timeline and the clock, so instances that share the
//! timeline emit the same count at the same instant without forwarding a single tick. This
//! module owns that timeline's shape ([`SharedTimeline`]), the rules for changing it
//! ([`plan`], pure and unit-tested), and the [`ClusterThread`] that talks to Redis with the
//! `redis` crate's synchronous API.
//!
//! The stored key is the truth; pub/sub is the prompt. A change is written with a Lua
//! compare-and-set on the timeline's version and then published; every instance (the writer
//! included) adopts what it reads back. A change takes effect at the first tick at least
//! `--cluster-lead-ms` ahead, so every instance hears of it before its effective tick.
//!
//! The thread must never touch the timing thread or a socket of the event loop: it talks to the
//! loop through two wait-free rings and the loop's waker, as the timing thread does. If Redis
//! goes away, nothing here stops a tick: the instances keep the timeline they have, control
//! requests are refused with a clear error, and the thread reconnects with backoff.

use std::io;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{info, warn};
use mio::Waker;
use rtrb::{Consumer, Producer, RingBuffer};
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::tempo::{Bpm, TickSchedule};
use crate::transport::{self, Quantize, Transport, TransportState};

/// How often the thread looks at its request ring while waiting on pub/sub.
const POLL_SLICE: Duration = Duration::from_millis(20);
/// How often it re-reads the key (in case a publish was missed) and beats its heartbeat.
const RECONCILE: Duration = Duration::from_secs(1);
/// How long a peer's heartbeat counts.
const PEER_TTL_MS: u64 = 5_000;
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Compare-and-set attempts for one change before giving up (others kept winning).
const CAS_ATTEMPTS: usize = 8;

/// The timeline every instance of a cluster shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedTimeline {
    /// Bumped by every change; a change is written only over the version it was planned on.
    pub version: u64,
    /// From this count on, ticks follow `bpm`, counted from `anchor_unix_ns`.
    pub anchor_count: u64,
    pub anchor_unix_ns: u64,
    pub bpm_milli: u32,
    pub ppqn: u32,
    /// The transport: `before` until `transport_count`, `playing` from there.
    pub playing_before: bool,
    pub playing: bool,
    pub transport_count: u64,
    /// The instant of `transport_count`, kept because a later tempo change re-anchors the
    /// timeline past it. (Absent in a timeline written before this field: 0.)
    #[serde(default)]
    pub transport_unix_ns: u64,
}

impl SharedTimeline {
    /// The timeline a first instance starts from: its own schedule (in unix time), playing.
    pub fn from_schedule(schedule: &TickSchedule, clock: &Clock) -> SharedTimeline {
        SharedTimeline {
            version: 1,
            anchor_count: schedule.anchor_count(),
            anchor_unix_ns: clock.unix_ns(schedule.anchor_ns()),
            bpm_milli: schedule.bpm().milli(),
            ppqn: schedule.ppqn(),
            playing_before: true,
            playing: true,
            transport_count: 0,
            transport_unix_ns: clock.unix_ns(schedule.anchor_ns()),
        }
    }

    pub fn bpm(&self) -> Bpm {
        Bpm::from_milli(self.bpm_milli)
    }

    /// The timeline as a [`TickSchedule`] on the unix-time axis: the same exact arithmetic as
    /// the timing thread's. (Zeros from a corrupt Redis value are lifted to 1 rather than
    /// trusted; `adopt` refuses such a timeline anyway.)
    fn grid(&self) -> TickSchedule {
        TickSchedule::anchored(
            self.bpm(),
            self.ppqn.max(1),
            self.anchor_count,
            self.anchor_unix_ns,
        )
    }

    /// Unix ns of tick `count` (counts before the anchor clamp to it).
    pub fn unix_ns_of(&self, count: u64) -> u64 {
        self.grid().deadline_ns(count)
    }

    /// The first count at or after the anchor due at or after `unix_ns`.
    pub fn first_count_at_or_after(&self, unix_ns: u64) -> u64 {
        self.grid().first_count_at_or_after(unix_ns)
    }

    pub fn transport(&self) -> Transport {
        Transport::from_parts(
            state(self.playing_before),
            state(self.playing),
            self.transport_count,
        )
    }

    /// This timeline on `clock`'s monotonic axis. An anchor before the clock's epoch (the
    /// timeline is older than this process) moves forward to the first tick after it, which
    /// keeps every later tick within a nanosecond of the shared instants.
    pub fn schedule(&self, clock: &Clock) -> TickSchedule {
        let epoch_unix = clock.unix_ns(0);
        let (count, unix) = if self.anchor_unix_ns >= epoch_unix {
            (self.anchor_count, self.anchor_unix_ns)
        } else {
            let count = self.first_count_at_or_after(epoch_unix);
            (count, self.unix_ns_of(count))
        };
        TickSchedule::anchored(self.bpm(), self.ppqn, count, unix - epoch_unix)
    }
}

fn state(playing: bool) -> TransportState {
    if playing {
        TransportState::Playing
    } else {
        TransportState::Stopped
    }
}

/// A control request that must go through the shared timeline.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ClusterRequest {
    SetBpm(Bpm),
    Start(Quantize),
    Stop,
    /// The timeline this instance actually started on, when Redis did not answer in time:
    /// what it writes if it turns out to be the first.
    Seed(SharedTimeline),
}

/// What the cluster thread tells the event loop.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ClusterEvent {
    /// The shared timeline (new, or first read): adopt it.
    Adopt(SharedTimeline),
    Status(ClusterStatus),
}

/// The cluster's state, for `/stats` and for refusing control while Redis is away.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ClusterStatus {
    pub connected: bool,
    /// Instances (this one included) whose heartbeat is recent.
    pub peers: u64,
    pub version: u64,
    /// For the last change this instance adopted: effective instant minus when it heard,
    /// in ms; negative when it heard too late.
    pub last_lead_ms: Option<f64>,
}

/// Plans `request` over `current`: the new timeline, effective at the first tick at least
/// `lead_ns` after `now_unix_ns` (a start, also on its quantum and at least
/// `start_lead_ns` ahead). `None` when nothing would change (or for a `Seed`).
pub fn plan(
    current: &SharedTimeline,
    request: ClusterRequest,
    now_unix_ns: u64,
    lead_ns: u64,
    start_lead_ns: u64,
    beats_per_bar: u32,
) -> Option<SharedTimeline> {
    let effective = current.first_count_at_or_after(now_unix_ns.saturating_add(lead_ns));
    let mut next = *current;
    next.version = current.version + 1;
    match request {
        // Not a change: the worker takes it before planning.
        ClusterRequest::Seed(_) => return None,
        ClusterRequest::SetBpm(bpm) => {
            if bpm.milli() == current.bpm_milli {
                return None;
            }
            next.anchor_count = effective;
            next.anchor_unix_ns = current.unix_ns_of(effective);
            next.bpm_milli = bpm.milli();
            // A start still ahead moves with the new tempo.
            if next.transport_count >= next.anchor_count {
                next.transport_unix_ns = next.unix_ns_of(next.transport_count);
            }
        }
        ClusterRequest::Start(_) | ClusterRequest::Stop => {
            let (target, from) = match request {
                ClusterRequest::Start(quantize) => {
                    let earliest = current.first_count_at_or_after(
                        now_unix_ns.saturating_add(lead_ns.max(start_lead_ns)),
                    );
                    let quantum = quantize.ticks(current.ppqn, beats_per_bar);
                    (
                        TransportState::Playing,
                        transport::start_count(effective, earliest, quantum),
                    )
                }
                _ => (TransportState::Stopped, effective),
            };
            let mut t = current.transport();
            if !t.change(target, from, effective) {
                return None;
            }
            next.playing_before = t.before() == TransportState::Playing;
            next.playing = t.state() == TransportState::Playing;
            next.transport_count = t.from_count();
            next.transport_unix_ns = current.unix_ns_of(t.from_count());
        }
    }
    Some(next)
}

/// The Redis keys of a cluster.
struct Keys {
    timeline: String,
    channel: String,
    peers: String,
}

impl Keys {
    fn new(name: &str) -> Keys {
        Keys {
            timeline: format!("conductor:{name}:timeline"),
            channel: format!("conductor:{name}:changes"),
            peers: format!("conductor:{name}:peers"),
        }
    }
}

/// Writes ARGV[2] over the timeline only if its stored version is ARGV[1] (0: no timeline
/// yet, -1: unreadable), then publishes it. Returns 1 when written. Atomic: Redis runs scripts one at a time.
const CAS_SCRIPT: &str = r"
local cur = redis.call('GET', KEYS[1])
local v = 0
if cur then
  local ok, t = pcall(cjson.decode, cur)
  if ok and type(t) == 'table' then v = tonumber(t['version']) or -1 else v = -1 end
end
if v ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 1
";

/// The event loop's side of the cluster thread.
pub struct ClusterThread {
    requests: Producer<ClusterRequest>,
    _handle: JoinHandle<()>,
}

pub type ClusterEvents = Consumer<ClusterEvent>;

/// Settings for the cluster thread.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub url: String,
    pub name: String,
    pub lead: Duration,
    pub start_lead: Duration,
    pub beats_per_bar: u32,
}

impl ClusterThread {
    /// Starts the thread. It connects, reads (or, for the first instance, writes `local`) and
    /// reports the timeline; `bind` waits a moment for that, so a joining instance starts in
    /// phase instead of jumping.
    pub fn spawn(
        cfg: ClusterConfig,
        local: SharedTimeline,
        waker: Arc<Waker>,
    ) -> io::Result<(ClusterThread, ClusterEvents)> {
        let client = redis::Client::open(cfg.url.as_str())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let (requests, request_rx) = RingBuffer::new(64);
        let (events_tx, events) = RingBuffer::new(256);
        let worker = Worker {
            keys: Keys::new(&cfg.name),
            cfg,
            client,
            known: local,
            requests: request_rx,
            events: events_tx,
            waker,
            instance: crate::engineio::new_sid()?,
            status: ClusterStatus::default(),
        };
        let handle = thread::Builder::new()
            .name("conductor-cluster".into())
            .spawn(move || worker.run())?;
        Ok((
            ClusterThread {
                requests,
                _handle: handle,
            },
            events,
        ))
    }

    /// Queues a request; false when the ring is full.
    pub fn send(&mut self, request: ClusterRequest) -> bool {
        self.requests.push(request).is_ok()
    }
}

struct Worker {
    cfg: ClusterConfig,
    client: redis::Client,
    keys: Keys,
    /// The newest timeline this instance knows.
    known: SharedTimeline,
    requests: Consumer<ClusterRequest>,
    events: Producer<ClusterEvent>,
    waker: Arc<Waker>,
    /// This instance's name in the peers set.
    instance: String,
    status: ClusterStatus,
}

/// Why a Redis session ended.
type RedisResult<T> = Result<T, redis::RedisError>;

fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Worker {
    fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.session() {
                Ok(()) => return,
                Err(e) => {
                    if self.status.connected {
                        warn!("cluster: lost Redis ({e}); ticking on, control refused until back");
                        // A fresh outage starts with a quick retry.
                        backoff = BACKOFF_MIN;
                    }
                    self.status.connected = false;
                    self.report_status();
                    // Requests made while Redis is away were refused by the loop already;
                    // anything queued just before the loss is dropped with it. A seed is kept.
                    while let Ok(request) = self.requests.pop() {
                        if let ClusterRequest::Seed(timeline) = request
                            && self.status.version == 0
                        {
                            self.known = timeline;
                        }
                    }
                    thread::sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    fn report_status(&mut self) {
        self.emit(ClusterEvent::Status(self.status));
    }

    fn emit(&mut self, event: ClusterEvent) {
        // A full ring means the loop is stalled; the next reconcile repeats the news.
        let _ = self.events.push(event);
        let _ = self.waker.wake();
    }

    /// One connection's life: returns only on error (the caller reconnects).
    fn session(&mut self) -> RedisResult<()> {
        let timeout = Duration::from_secs(2);
        let mut conn = self.client.get_connection_with_timeout(timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        conn.set_write_timeout(Some(timeout))?;
        let mut sub_conn = self.client.get_connection_with_timeout(timeout)?;
        let mut pubsub = sub_conn.as_pubsub();
        pubsub.subscribe(&self.keys.channel)?;
        pubsub.set_read_timeout(Some(POLL_SLICE))?;

        self.reconcile(&mut conn)?;
        if !self.status.connected {
            info!(
                "cluster: connected to Redis, timeline version {}",
                self.known.version
            );
        }
        self.status.connected = true;
        self.heartbeat(&mut conn)?;
        self.report_status();

        let mut next_reconcile = Instant::now() + RECONCILE;
        loop {
            while let Ok(request) = self.requests.pop() {
                match request {
                    ClusterRequest::Seed(timeline) => {
                        if self.status.version == 0 {
                            self.known = timeline;
                        }
                    }
                    request => self.apply(&mut conn, request)?,
                }
            }
            match pubsub.get_message() {
                Ok(msg) => {
                    if let Ok(payload) = msg.get_payload::<String>()
                        && let Ok(timeline) = serde_json::from_str::<SharedTimeline>(&payload)
                    {
                        self.adopt(timeline);
                    }
                }
                Err(e) if e.is_timeout() => {}
                Err(e) => return Err(e),
            }
            if Instant::now() >= next_reconcile {
                self.reconcile(&mut conn)?;
                self.heartbeat(&mut conn)?;
                self.report_status();
                next_reconcile = Instant::now() + RECONCILE;
            }
        }
    }

    /// Reads the stored timeline (the truth) and adopts it if newer; writes ours when the key
    /// is missing (first instance, or Redis restarted empty).
    ///
    /// A stored version below ours means Redis went back in time (restarted empty, and an
    /// instance with an older timeline wrote first): ours is newer and is written over it, so
    /// the instances converge instead of ignoring each other. An unreadable key is replaced.
    fn reconcile(&mut self, conn: &mut redis::Connection) -> RedisResult<()> {
        let stored: Option<String> = redis::cmd("GET").arg(&self.keys.timeline).query(conn)?;
        let first = self.status.version == 0;
        let expected: i64 = match stored
            .as_deref()
            .map(serde_json::from_str::<SharedTimeline>)
        {
            None => 0,
            Some(Ok(timeline)) if first || !self.ours_wins(&timeline) => {
                self.adopt(timeline);
                return Ok(());
            }
            Some(Ok(timeline)) => i64::try_from(timeline.version).unwrap_or(-1),
            Some(Err(e)) => {
                warn!("cluster: the stored timeline is unreadable ({e}); writing ours over it");
                -1
            }
        };
        let ours = serde_json::to_string(&self.known).unwrap_or_default();
        let written: i64 = redis::Script::new(CAS_SCRIPT)
            .key(&self.keys.timeline)
            .key(&self.keys.channel)
            .arg(expected)
            .arg(ours)
            .invoke(conn)?;
        if written == 0 {
            // Another instance wrote in between (say, two writing back to an empty Redis):
            // follow what it wrote now, not at the next reconcile.
            let stored: Option<String> = redis::cmd("GET").arg(&self.keys.timeline).query(conn)?;
            if let Some(Ok(timeline)) = stored.as_deref().map(serde_json::from_str) {
                self.adopt(timeline);
            }
        }
        Ok(())
    }

    /// Whether the timeline this instance knows should replace `other` rather than follow it.
    /// A higher version wins: it carries later changes. The same version with other content
    /// happens when Redis restarted empty and two instances each wrote back what they had
    /// (one of them having counted alone); then the one further along at this moment wins, so
    /// that every instance's count only ever jumps forward, and all apply the same rule, so
    /// they converge.
    fn ours_wins(&self, other: &SharedTimeline) -> bool {
        if other.version != self.known.version {
            return self.known.version > other.version;
        }
        let now = unix_now_ns();
        self.known.first_count_at_or_after(now) > other.first_count_at_or_after(now)
    }

    fn heartbeat(&mut self, conn: &mut redis::Connection) -> RedisResult<()> {
        let now_ms = unix_now_ns() / 1_000_000;
        let (_, _, peers): ((), (), u64) = redis::pipe()
            .cmd("ZADD")
            .arg(&self.keys.peers)
            .arg(now_ms)
            .arg(&self.instance)
            .cmd("ZREMRANGEBYSCORE")
            .arg(&self.keys.peers)
            .arg("-inf")
            .arg(now_ms.saturating_sub(PEER_TTL_MS))
            .cmd("ZCARD")
            .arg(&self.keys.peers)
            .query(conn)?;
        self.status.peers = peers;
        Ok(())
    }

    /// Adopts `timeline` if it is newer than what this instance knows.
    fn adopt(&mut self, timeline: SharedTimeline) {
        // Redis is shared ground: a timeline that would make the timing thread tick flat out
        // or divide by zero is refused, whoever wrote it.
        let sane = (1..=1_000_000).contains(&timeline.bpm_milli)
            && (1..=960).contains(&timeline.ppqn)
            && timeline.version < 1 << 53;
        if !sane {
            warn!(
                "cluster: ignoring an impossible timeline (version {}, bpm_milli {}, ppqn {})",
                timeline.version, timeline.bpm_milli, timeline.ppqn
            );
            return;
        }
        let first = self.status.version == 0;
        // Older versions are history, and so is a rival of the same version that ours beats
        // (see `ours_wins`): the next reconcile writes ours over it.
        if !first && (timeline == self.known || self.ours_wins(&timeline)) {
            return;
        }
        if !first {
            // When does the change bite, against when this instance heard of it?
            let heard = unix_now_ns();
            let bite = change_instant(&self.known, &timeline);
            self.status.last_lead_ms = bite.map(|at| (at as f64 - heard as f64) / 1e6);
        }
        self.known = timeline;
        self.status.version = timeline.version;
        self.emit(ClusterEvent::Adopt(timeline));
        self.report_status();
    }

    /// Plans and writes one change; retried over a newer version when another instance wrote
    /// first.
    fn apply(&mut self, conn: &mut redis::Connection, request: ClusterRequest) -> RedisResult<()> {
        for _ in 0..CAS_ATTEMPTS {
            let lead = u64::try_from(self.cfg.lead.as_nanos()).unwrap_or(u64::MAX);
            let start_lead = u64::try_from(self.cfg.start_lead.as_nanos()).unwrap_or(u64::MAX);
            let Some(next) = plan(
                &self.known,
                request,
                unix_now_ns(),
                lead,
                start_lead,
                self.cfg.beats_per_bar,
            ) else {
                // Nothing changes; tell the loop the timeline stands (it confirms).
                self.emit(ClusterEvent::Adopt(self.known));
                return Ok(());
            };
            let json = serde_json::to_string(&next).unwrap_or_default();
            let written: i64 = redis::Script::new(CAS_SCRIPT)
                .key(&self.keys.timeline)
                .key(&self.keys.channel)
                .arg(self.known.version)
                .arg(json)
                .invoke(conn)?;
            if written == 1 {
                self.adopt(next);
                return Ok(());
            }
            self.reconcile(conn)?;
        }
        warn!("cluster: a change lost {CAS_ATTEMPTS} races in a row; dropped");
        Ok(())
    }
}

/// The instant the change from `old` to `new` first affects a tick: the new anchor (tempo) or
/// the new transport count, whichever moved.
fn change_instant(old: &SharedTimeline, new: &SharedTimeline) -> Option<u64> {
    let tempo = (new.anchor_count != old.anchor_count || new.bpm_milli != old.bpm_milli)
        .then(|| new.unix_ns_of(new.anchor_count));
    let transport = (new.transport_count != old.transport_count || new.playing != old.playing)
        .then(|| new.unix_ns_of(new.transport_count));
    match (tempo, transport) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn timeline() -> SharedTimeline {
        SharedTimeline {
            version: 3,
            anchor_count: 100,
            anchor_unix_ns: 1_700_000_000_000_000_000,
            bpm_milli: 120_000,
            ppqn: 4,
            playing_before: true,
            playing: true,
            transport_count: 0,
            transport_unix_ns: 1_700_000_000_000_000_000,
        }
    }

    const LEAD: u64 = 250_000_000;

    #[test]
    fn a_tempo_change_takes_effect_a_lead_ahead_on_the_old_grid() {
        let t = timeline();
        // 1 s after the anchor: tick 108. 250 ms later is tick 110 exactly.
        let now = t.anchor_unix_ns + 1_000_000_000;
        let next = plan(&t, ClusterRequest::SetBpm(Bpm::whole(150)), now, LEAD, 0, 4).unwrap();
        assert_eq!(next.version, 4);
        assert_eq!(next.anchor_count, 110);
        assert_eq!(next.anchor_unix_ns, t.unix_ns_of(110));
        assert_eq!(next.bpm_milli, 150_000);
        assert_eq!(next.unix_ns_of(111) - next.unix_ns_of(110), 100_000_000);
        assert!(
            plan(
                &next,
                ClusterRequest::SetBpm(Bpm::whole(150)),
                now,
                LEAD,
                0,
                4
            )
            .is_none()
        );
    }

    #[test]
    fn stop_and_a_quantised_start() {
        let t = timeline();
        let now = t.anchor_unix_ns + 1_000_000_000;
        let stopped = plan(&t, ClusterRequest::Stop, now, LEAD, 0, 4).unwrap();
        assert!(!stopped.playing && stopped.playing_before);
        assert_eq!(stopped.transport_count, 110);
        assert!(plan(&stopped, ClusterRequest::Stop, now, LEAD, 0, 4).is_none());
        let started = plan(
            &stopped,
            ClusterRequest::Start(Quantize::Bar),
            now,
            LEAD,
            150_000_000,
            4,
        )
        .unwrap();
        assert!(started.playing && !started.playing_before);
        assert_eq!(started.transport_count, 112, "next bar line after tick 110");
        assert_eq!(started.transport_unix_ns, t.unix_ns_of(112));
        // A tempo change before that start moves its instant with it.
        let faster = plan(
            &started,
            ClusterRequest::SetBpm(Bpm::whole(150)),
            now,
            LEAD,
            0,
            4,
        )
        .unwrap();
        assert_eq!(faster.transport_unix_ns, faster.unix_ns_of(112));
        assert_ne!(faster.transport_unix_ns, started.transport_unix_ns);
        assert!(!started.transport().plays(111));
        assert!(started.transport().plays(112));
    }

    #[test]
    fn an_old_anchor_moves_past_the_epoch_without_moving_ticks() {
        let clock = Clock::start();
        let epoch = clock.unix_ns(0);
        let mut t = timeline();
        t.anchor_unix_ns = epoch - 10_000_000_000 - 1; // 10 s and a nanosecond before
        let s = t.schedule(&clock);
        assert!(s.anchor_count() > t.anchor_count);
        for count in s.anchor_count()..s.anchor_count() + 1000 {
            let shared = t.unix_ns_of(count);
            let local = clock.unix_ns(s.deadline_ns(count));
            assert!(
                shared.abs_diff(local) <= 1,
                "tick {count}: {shared} vs {local}"
            );
        }
    }

    #[test]
    fn timelines_round_trip_through_json() {
        let t = timeline();
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<SharedTimeline>(&json).unwrap(), t);
    }

    proptest! {
        /// Whatever is asked and whenever, a change never touches a tick before now + lead, and
        /// ticks before its effective count keep their instants.
        #[test]
        fn changes_never_reach_into_the_lead(
            after_anchor in 0u64..100_000_000_000,
            lead in 1_000_000u64..1_000_000_000,
            bpm in 60u32..=200,
            kind in 0u8..3,
        ) {
            let t = timeline();
            let now = t.anchor_unix_ns + after_anchor;
            let request = match kind {
                0 => ClusterRequest::SetBpm(Bpm::whole(bpm)),
                1 => ClusterRequest::Stop,
                _ => ClusterRequest::Start(Quantize::Beat),
            };
            if let Some(next) = plan(&t, request, now, lead, 0, 4) {
                prop_assert_eq!(next.version, t.version + 1);
                let first_safe = t.first_count_at_or_after(now + lead);
                prop_assert!(t.unix_ns_of(first_safe) >= now + lead);
                for count in t.anchor_count..first_safe.min(t.anchor_count + 2000) {
                    prop_assert_eq!(next.unix_ns_of(count.max(next.anchor_count)) >= t.unix_ns_of(count), true);
                    if count < next.anchor_count {
                        prop_assert_eq!(next.transport().plays(count), t.transport().plays(count));
                    }
                }
                prop_assert!(next.anchor_count >= t.anchor_count);
                prop_assert_eq!(next.unix_ns_of(next.anchor_count), t.unix_ns_of(next.anchor_count));
            }
        }
    }
}
