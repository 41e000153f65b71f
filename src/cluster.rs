//! Several instances, one timeline per room: the shared timelines in Redis and the thread that
//! keeps them.
//!
//! Ticks are a pure function of the timeline and the clock, so instances that share a room's
//! timeline emit the same count at the same instant without forwarding a single tick. This
//! module owns that timeline's shape in Redis ([`SharedTimeline`]), what this instance accepts
//! of one ([`check`]), and the [`ClusterThread`] that talks to Redis with the `redis` crate's
//! synchronous API. What a change means is [`crate::timeline::plan`]'s, the same rule as
//! without a cluster.
//!
//! One key per room. `main`'s is `conductor:NAME:timeline`, as it always was (so instances
//! from before rooms share it during a rolling upgrade); another room's is
//! `conductor:NAME:room:ROOM:timeline`, each with its own pub/sub channel. A room's key expires
//! `--room-idle` after the last instance with clients in it stopped refreshing it, which takes
//! the room's shared state with it; `main`'s never expires.
//!
//! The stored key is the truth; pub/sub is the prompt. A change is written with a Lua
//! compare-and-set on the timeline's version and then published; every instance (the writer
//! included) adopts what it reads back. A change takes effect at the first tick at least the
//! room's lead ahead (never less than `--cluster-lead-ms`), so every instance hears of it
//! before its effective tick.
//!
//! The thread must never touch the timing thread or a socket of the event loop: it talks to the
//! loop through two wait-free rings and the loop's waker, as the timing thread does. If Redis
//! goes away, nothing here stops a tick: the instances keep the timeline they have, control
//! requests are refused with an error that names what is wrong ([`ClusterFault`]), and the
//! thread reconnects with a backoff that grows on every failed session ([`Backoff`]). Every
//! control request it is handed is answered ([`Outcome`]), whatever happens to Redis.
//!
//! Redis is shared ground: anyone who can write to it can write anything. Every timeline read
//! from it is checked against this instance's own limits ([`check`]) before it is followed; one
//! that would silence the instances, make them tick flat out or outside `--min-bpm`/`--max-bpm`
//! is refused with one log line, and the key is repaired: this instance writes the timeline it
//! follows over it, with a higher version. A key that cannot be parsed, or holds another Redis
//! type, is replaced the same way.

use std::io;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info, warn};
use mio::Waker;
use rtrb::{Consumer, Producer, RingBuffer};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::clock::Clock;
use crate::room::{RoomKey, RoomName};
use crate::tempo::{Bpm, TickSchedule};
use crate::timeline::{Change, Planned, Timeline, plan};
use crate::transport::{Transport, TransportState};

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
/// A session that stayed healthy this long resets the backoff: the next outage is new.
const STABLE_SESSION: Duration = Duration::from_secs(10);
/// Versions stay exact as a double (Lua's cjson, JavaScript): anything larger is corrupt.
pub const MAX_VERSION: u64 = 1 << 53;
/// Counts stay below this: 8,900 years of ticks at the fastest tempo (1000 BPM at ppqn 960),
/// and another such span before they would lose precision in a JavaScript client.
pub const MAX_COUNT: u64 = 1 << 52;
/// How far ahead of now a timeline's anchor or transport change may lie, besides two bars
/// for a quantised start: a change is planned at most `--cluster-lead-ms` (10 s) ahead, and
/// this leaves room for clocks that disagree.
const AHEAD_SLACK_NS: u64 = 60_000_000_000;
/// No conductor timeline is older than this (2020-01-01): an anchor before it is garbage.
const ANCHOR_FLOOR_UNIX_NS: u64 = 1_577_836_800_000_000_000;
/// How far a stored transport instant may stray from the one its count gives.
const TRANSPORT_TOLERANCE_NS: u64 = 1_000_000;

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
        TickSchedule::anchored(
            self.bpm(),
            self.ppqn.max(1),
            count,
            unix.saturating_sub(epoch_unix),
        )
    }
}

/// What this instance accepts of a shared timeline: its own flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimelineLimits {
    pub min_bpm: Bpm,
    pub max_bpm: Bpm,
    pub ppqn: u32,
    pub beats_per_bar: u32,
}

/// Why a timeline from Redis is not followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum TimelineDefect {
    #[error("version {0} is not between 1 and 2^53")]
    Version(u64),
    #[error(
        "ppqn {theirs} differs from this instance's {ours}; give every instance the same --ppqn"
    )]
    Ppqn { theirs: u32, ours: u32 },
    #[error("tempo {0} BPM lies outside this instance's --min-bpm..--max-bpm")]
    Tempo(Bpm),
    #[error("its anchor lies {0} s ahead of now")]
    AnchorAhead(u64),
    #[error("its anchor lies before 2020")]
    AnchorAncient,
    #[error("its count would reach {0}, too near the end of the counter")]
    Count(u64),
    #[error("its transport change lies {0} s ahead of now")]
    TransportAhead(u64),
    #[error("its transport instant does not match its transport count")]
    TransportInconsistent,
}

impl TimelineDefect {
    /// Whether writing a sane timeline over it is right. A timeline of another ppqn is not
    /// corrupt, only another configuration: overwriting it would start a tug of war between
    /// instances set up differently, so it is refused and left alone.
    pub fn repairable(self) -> bool {
        !matches!(self, TimelineDefect::Ppqn { .. })
    }
}

/// Checks a timeline that came from outside against this instance's `limits` at
/// `now_unix_ns`, and returns it ready to follow. Pure: the rules are unit-tested.
///
/// A timeline passes when its version is exact, its ppqn is ours, its tempo lies within our
/// flags, its anchor lies after 2020 and at most a minute (and two bars) ahead, every count it
/// names and the count it gives for now stay below [`MAX_COUNT`], and its transport instant is
/// the one its transport count has on the grid (a change after the anchor) or lies no later
/// than the anchor (one before it). A timeline written before the transport instant existed
/// (0) gets it filled in.
pub fn check(
    timeline: &SharedTimeline,
    limits: &TimelineLimits,
    now_unix_ns: u64,
) -> Result<SharedTimeline, TimelineDefect> {
    let mut t = *timeline;
    if t.version == 0 || t.version >= MAX_VERSION {
        return Err(TimelineDefect::Version(t.version));
    }
    if t.ppqn != limits.ppqn {
        return Err(TimelineDefect::Ppqn {
            theirs: t.ppqn,
            ours: limits.ppqn,
        });
    }
    if !(limits.min_bpm.milli()..=limits.max_bpm.milli()).contains(&t.bpm_milli) {
        return Err(TimelineDefect::Tempo(t.bpm()));
    }
    let bar = t.grid().deadline_ns(
        t.anchor_count
            .saturating_add(2 * u64::from(t.ppqn) * u64::from(limits.beats_per_bar)),
    ) - t.anchor_unix_ns;
    let latest = now_unix_ns
        .saturating_add(AHEAD_SLACK_NS)
        .saturating_add(bar);
    let ahead_s = |at: u64| at.saturating_sub(now_unix_ns) / 1_000_000_000;
    if t.anchor_unix_ns > latest {
        return Err(TimelineDefect::AnchorAhead(ahead_s(t.anchor_unix_ns)));
    }
    if t.anchor_unix_ns < ANCHOR_FLOOR_UNIX_NS {
        return Err(TimelineDefect::AnchorAncient);
    }
    let present = t.first_count_at_or_after(now_unix_ns);
    for count in [t.anchor_count, t.transport_count, present] {
        if count > MAX_COUNT {
            return Err(TimelineDefect::Count(count));
        }
    }
    if t.transport_count >= t.anchor_count {
        let on_grid = t.unix_ns_of(t.transport_count);
        if t.transport_unix_ns == 0 {
            t.transport_unix_ns = on_grid;
        } else if t.transport_unix_ns.abs_diff(on_grid) > TRANSPORT_TOLERANCE_NS {
            return Err(TimelineDefect::TransportInconsistent);
        }
    } else if t.transport_unix_ns > t.anchor_unix_ns {
        return Err(TimelineDefect::TransportInconsistent);
    }
    if t.transport_unix_ns > latest {
        return Err(TimelineDefect::TransportAhead(ahead_s(t.transport_unix_ns)));
    }
    Ok(t)
}

fn state(playing: bool) -> TransportState {
    if playing {
        TransportState::Playing
    } else {
        TransportState::Stopped
    }
}

/// What the loop asks of the cluster thread, per room.
#[derive(Clone, Debug, PartialEq)]
pub enum ClusterRequest {
    /// Follow room `name`'s shared timeline (reported for `room`), writing `seed` if Redis has
    /// none yet.
    Open {
        room: RoomKey,
        name: RoomName,
        seed: SharedTimeline,
    },
    /// Plan `change` over the room's shared timeline, `lead_ns` ahead (at least
    /// `--cluster-lead-ms`), and write it; the outcome comes back as an `Answer`.
    Change {
        room: RoomKey,
        change: Change,
        lead_ns: u64,
    },
    /// Whether this instance has clients in the room: only then does it keep the room's key
    /// from expiring.
    Occupied { room: RoomKey, occupied: bool },
    /// This instance dropped the room (it idled out here): stop following it.
    Close { room: RoomKey },
}

/// What the cluster thread tells the event loop.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ClusterEvent {
    /// A room's shared timeline (new, or first read): adopt it.
    Adopt {
        room: RoomKey,
        timeline: SharedTimeline,
    },
    Status(ClusterStatus),
    /// What became of the request handed over with this id.
    Answer {
        id: u64,
        outcome: Outcome,
    },
}

/// What became of a control request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Written: the new timeline comes back as an `Adopt`.
    Applied,
    /// It would change nothing: the timeline already says so.
    Unchanged,
    /// Redis failed before it was written.
    Failed(ClusterFault),
    /// Other instances' changes won every compare-and-set.
    Lost,
}

/// What is wrong with Redis, as far as the cluster can tell: what clients and `/stats` are
/// told, instead of a blanket "unreachable".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterFault {
    /// No connection: refused, timed out or cut.
    Unreachable,
    /// Redis answers but will not write: a read-only replica, a user without the permission,
    /// or persistence failing (`READONLY`, `NOPERM`, `MISCONF`).
    WritesRefused,
    /// `maxmemory` reached under `noeviction` (`OOM`).
    OutOfMemory,
    /// One of the cluster's keys holds another type and could not be replaced (`WRONGTYPE`).
    WrongType,
    /// Any other error Redis answered with.
    Other,
}

impl ClusterFault {
    pub const ALL: [ClusterFault; 5] = [
        ClusterFault::Unreachable,
        ClusterFault::WritesRefused,
        ClusterFault::OutOfMemory,
        ClusterFault::WrongType,
        ClusterFault::Other,
    ];

    /// The fault of a failed Redis call: by its error code, or (inside a script, where some
    /// versions wrap the code) by the text.
    pub fn of(e: &redis::RedisError) -> ClusterFault {
        let from_code = |code: &str| match code {
            "OOM" => Some(ClusterFault::OutOfMemory),
            "WRONGTYPE" => Some(ClusterFault::WrongType),
            "READONLY" | "NOPERM" | "MISCONF" => Some(ClusterFault::WritesRefused),
            _ => None,
        };
        if let Some(fault) = e.code().and_then(from_code) {
            return fault;
        }
        if e.is_io_error() || e.is_timeout() || e.is_connection_refusal() {
            return ClusterFault::Unreachable;
        }
        let text = e.to_string();
        ["OOM", "WRONGTYPE", "READONLY", "NOPERM", "MISCONF"]
            .into_iter()
            .find(|code| text.contains(code))
            .and_then(from_code)
            .unwrap_or(ClusterFault::Other)
    }

    /// For `/stats` and the metrics.
    pub fn label(self) -> &'static str {
        match self {
            ClusterFault::Unreachable => "unreachable",
            ClusterFault::WritesRefused => "writes_refused",
            ClusterFault::OutOfMemory => "out_of_memory",
            ClusterFault::WrongType => "wrong_type",
            ClusterFault::Other => "error",
        }
    }

    /// What a client is told: "the cluster's Redis …".
    pub fn describe(self) -> &'static str {
        match self {
            ClusterFault::Unreachable => "is unreachable",
            ClusterFault::WritesRefused => {
                "refuses writes (a read-only replica, a user without write permission, or \
                 failing persistence)"
            }
            ClusterFault::OutOfMemory => {
                "is out of memory (maxmemory reached under a noeviction policy)"
            }
            ClusterFault::WrongType => {
                "holds one of conductor's keys as another type and did not let it be replaced"
            }
            ClusterFault::Other => "answers with an error (see the server log)",
        }
    }
}

/// The cluster's state, for `/stats` and for refusing control while Redis is away.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ClusterStatus {
    /// A session is up: it read the timelines and beat its heartbeat.
    pub connected: bool,
    /// Why the last session failed, until one succeeds again.
    pub fault: Option<ClusterFault>,
    /// Instances (this one included) whose heartbeat is recent.
    pub peers: u64,
    /// The version of `main`'s shared timeline.
    pub version: u64,
    /// For the last change this instance adopted: effective instant minus when it heard,
    /// in ms; negative when it heard too late.
    pub last_lead_ms: Option<f64>,
    /// Timelines from Redis refused by [`check`] (or unreadable), since start.
    pub timelines_refused: u64,
}

/// The wait before the next connection attempt. It doubles with every session that fails,
/// whether it failed connecting or later (a heartbeat Redis refused), from [`BACKOFF_MIN`] to
/// [`BACKOFF_MAX`]; only a session that stayed healthy for [`STABLE_SESSION`] resets it, so a
/// Redis that accepts connections but refuses writes is not hammered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff { next: BACKOFF_MIN }
    }
}

impl Backoff {
    /// A session failed after being healthy for `healthy_for` (`None`: never healthy).
    /// Returns how long to wait before the next.
    pub fn failed(&mut self, healthy_for: Option<Duration>) -> Duration {
        if healthy_for.is_some_and(|d| d >= STABLE_SESSION) {
            self.next = BACKOFF_MIN;
        }
        let wait = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        wait
    }
}

/// A shared timeline as a room's [`Timeline`] (Redis does not hold beats per bar: every
/// instance is given the same `--beats-per-bar`).
pub fn to_timeline(s: &SharedTimeline, beats_per_bar: u32) -> Timeline {
    Timeline {
        version: s.version,
        anchor_count: s.anchor_count,
        anchor_unix_ns: s.anchor_unix_ns,
        bpm: s.bpm(),
        ppqn: s.ppqn,
        beats_per_bar,
        transport: s.transport(),
        transport_unix_ns: s.transport_unix_ns,
    }
}

/// A room's [`Timeline`] as it is shared.
pub fn from_timeline(t: &Timeline) -> SharedTimeline {
    SharedTimeline {
        version: t.version,
        anchor_count: t.anchor_count,
        anchor_unix_ns: t.anchor_unix_ns,
        bpm_milli: t.bpm.milli(),
        ppqn: t.ppqn,
        playing_before: t.transport.before() == TransportState::Playing,
        playing: t.transport.state() == TransportState::Playing,
        transport_count: t.transport.from_count(),
        transport_unix_ns: t.transport_unix_ns,
    }
}

/// A room's Redis keys in cluster `cluster`: `main`'s as they were before rooms, another
/// room's under `room:NAME`.
struct Keys {
    timeline: String,
    channel: String,
}

impl Keys {
    fn new(cluster: &str, room: &RoomName) -> Keys {
        if room.is_main() {
            Keys {
                timeline: format!("conductor:{cluster}:timeline"),
                channel: format!("conductor:{cluster}:changes"),
            }
        } else {
            Keys {
                timeline: format!("conductor:{cluster}:room:{room}:timeline"),
                channel: format!("conductor:{cluster}:room:{room}:changes"),
            }
        }
    }
}

fn peers_key(cluster: &str) -> String {
    format!("conductor:{cluster}:peers")
}

/// Writes ARGV[2] over the timeline only if its stored version is ARGV[1] (0: no timeline
/// yet, -1: unreadable or not a string), then publishes it; ARGV[3] above 0 is the key's time
/// to live in ms (a room's; `main`'s has none). Returns 1 when written. Atomic:
/// Redis runs scripts one at a time. Changes are planned over a version this instance
/// checked, so they go through here; anything else found makes it return 0, and the caller
/// reconciles (and repairs) before it tries again.
const CAS_SCRIPT: &str = r"
local kind = redis.call('TYPE', KEYS[1])['ok']
local v = 0
if kind == 'string' then
  local ok, t = pcall(cjson.decode, redis.call('GET', KEYS[1]))
  if ok and type(t) == 'table' then v = tonumber(t['version']) or -1 else v = -1 end
elseif kind ~= 'none' then
  v = -1
end
if v ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
if tonumber(ARGV[3]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 1
";

/// Writes ARGV[3] over the timeline key only if it still is what this instance read: of
/// type ARGV[1] ('none' when missing) and, for a string, exactly the bytes ARGV[2]. Then
/// publishes it (ARGV[4]: the time to live, as for the compare-and-set). Returns 1 when
/// written. This is how missing, refused, unreadable and
/// wrong-typed keys are replaced: a stored value that is garbage has no version to compare.
const REPLACE_SCRIPT: &str = r"
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= ARGV[1] then return 0 end
if t == 'string' and redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[3])
if tonumber(ARGV[4]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
redis.call('PUBLISH', KEYS[2], ARGV[3])
return 1
";

/// The timeline key as read.
enum Stored {
    Missing,
    /// A string: its raw bytes.
    Value(Vec<u8>),
    /// Another Redis type (hash, list, …), by its `TYPE` name.
    OtherType(String),
}

impl Stored {
    /// The `TYPE` the replace script must find, and the bytes a string must still hold.
    fn expectation(&self) -> (&str, &[u8]) {
        match self {
            Stored::Missing => ("none", b""),
            Stored::Value(raw) => ("string", raw),
            Stored::OtherType(kind) => (kind, b""),
        }
    }
}

/// The event loop's side of the cluster thread.
pub struct ClusterThread {
    requests: Producer<(u64, ClusterRequest)>,
    _handle: JoinHandle<()>,
}

pub type ClusterEvents = Consumer<ClusterEvent>;

/// Settings for the cluster thread.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub url: String,
    pub name: String,
    /// `--cluster-lead-ms`: no change is planned less far ahead.
    pub lead: Duration,
    /// What this instance accepts of a timeline from Redis (and its beats per bar).
    pub limits: TimelineLimits,
    /// `--room-idle`: a room's key lives this long after its last refresh.
    pub room_idle: Duration,
}

impl ClusterThread {
    /// Starts the thread, following no room yet: `Open` them. For each it reads (or, for the
    /// first instance, writes the seed) and reports the room's timeline; `bind` waits a
    /// moment for `main`'s, so a joining instance starts in phase instead of jumping.
    pub fn spawn(
        cfg: ClusterConfig,
        waker: Arc<Waker>,
    ) -> io::Result<(ClusterThread, ClusterEvents)> {
        let client = redis::Client::open(cfg.url.as_str())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let (requests, request_rx) = RingBuffer::new(1024);
        let (events_tx, events) = RingBuffer::new(4096);
        let worker = Worker {
            peers: peers_key(&cfg.name),
            cfg,
            client,
            rooms: Vec::new(),
            subscribe: Vec::new(),
            unsubscribe: Vec::new(),
            requests: request_rx,
            events: events_tx,
            waker,
            instance: crate::engineio::new_sid()?,
            status: ClusterStatus::default(),
            in_flight: None,
            healthy_since: None,
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

    /// Queues a request; a `Change`'s [`Outcome`] comes back as an `Answer` with `id`. False
    /// when the ring is full.
    pub fn send(&mut self, id: u64, request: ClusterRequest) -> bool {
        self.requests.push((id, request)).is_ok()
    }
}

/// One room this instance follows.
struct Followed {
    room: RoomKey,
    name: RoomName,
    keys: Keys,
    /// The newest timeline this instance knows; always one [`check`] passed (or our own).
    known: SharedTimeline,
    /// False until the room's key has been read (or written) once.
    read: bool,
    /// This instance has clients in it: it keeps the key from expiring.
    occupied: bool,
    /// What the last refused timeline looked like, so that the same refusal is logged once.
    last_refusal: Option<String>,
    /// Changes planned to wait for one still pending ([`Planned::NotBefore`]): asked again
    /// at their instant.
    deferred: Vec<(u64, Change, u64, u64)>,
}

impl Followed {
    fn ttl_ms(&self, room_idle: Duration) -> u64 {
        if self.name.is_main() {
            0
        } else {
            u64::try_from(room_idle.as_millis())
                .unwrap_or(u64::MAX)
                .max(1)
        }
    }
}

struct Worker {
    cfg: ClusterConfig,
    client: redis::Client,
    peers: String,
    rooms: Vec<Followed>,
    /// Channels to subscribe to or leave at the next chance (rooms opened or closed).
    subscribe: Vec<String>,
    unsubscribe: Vec<String>,
    requests: Consumer<(u64, ClusterRequest)>,
    events: Producer<ClusterEvent>,
    waker: Arc<Waker>,
    /// This instance's name in the peers set.
    instance: String,
    status: ClusterStatus,
    /// The request being written, to answer should Redis fail under it.
    in_flight: Option<u64>,
    /// Since when the current session has been healthy.
    healthy_since: Option<Instant>,
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
        let mut backoff = Backoff::default();
        loop {
            let Err(e) = self.session() else {
                return;
            };
            let fault = ClusterFault::of(&e);
            let healthy_for = self.healthy_since.take().map(|since| since.elapsed());
            // Said once per outage and kind of failure, not once per attempt.
            if self.status.connected || self.status.fault != Some(fault) {
                warn!(
                    "cluster: Redis {} ({e}); ticking on, control refused until it is fixed, \
                     retrying with backoff",
                    fault.describe()
                );
            }
            self.status.connected = false;
            self.status.fault = Some(fault);
            self.report_status();
            self.fail_requests(fault);
            thread::sleep(backoff.failed(healthy_for));
        }
    }

    /// Answers the request Redis failed under and everything queued behind it: the loop
    /// refuses new ones while no session is up, and none may go unanswered. Opening, closing
    /// and occupancy are kept: they are not requests of a client.
    fn fail_requests(&mut self, fault: ClusterFault) {
        if let Some(id) = self.in_flight.take() {
            self.answer(id, Outcome::Failed(fault));
        }
        for room in &mut self.rooms {
            for (id, ..) in std::mem::take(&mut room.deferred) {
                let _ = self.events.push(ClusterEvent::Answer {
                    id,
                    outcome: Outcome::Failed(fault),
                });
            }
        }
        while let Ok((id, request)) = self.requests.pop() {
            match request {
                ClusterRequest::Change { .. } => self.answer(id, Outcome::Failed(fault)),
                other => self.take(other),
            }
        }
        let _ = self.waker.wake();
    }

    /// Takes a request that needs no Redis round trip now: opening (read at the next
    /// reconcile), occupancy, closing.
    fn take(&mut self, request: ClusterRequest) {
        match request {
            ClusterRequest::Open { room, name, seed } => {
                self.rooms.retain(|r| r.name != name);
                let keys = Keys::new(&self.cfg.name, &name);
                self.subscribe.push(keys.channel.clone());
                self.rooms.push(Followed {
                    room,
                    name,
                    keys,
                    known: seed,
                    read: false,
                    occupied: false,
                    last_refusal: None,
                    deferred: Vec::new(),
                });
            }
            ClusterRequest::Occupied { room, occupied } => {
                if let Some(r) = self.rooms.iter_mut().find(|r| r.room == room) {
                    r.occupied = occupied;
                }
            }
            ClusterRequest::Close { room } => {
                if let Some(i) = self.rooms.iter().position(|r| r.room == room) {
                    let gone = self.rooms.swap_remove(i);
                    self.unsubscribe.push(gone.keys.channel);
                    for (id, ..) in gone.deferred {
                        self.answer(id, Outcome::Lost);
                    }
                }
            }
            // Planned and written by the session (`apply`), not here.
            ClusterRequest::Change { .. } => {}
        }
    }

    fn answer(&mut self, id: u64, outcome: Outcome) {
        self.emit(ClusterEvent::Answer { id, outcome });
    }

    fn report_status(&mut self) {
        self.emit(ClusterEvent::Status(self.status));
    }

    fn emit(&mut self, event: ClusterEvent) {
        // A full ring means the loop is stalled; the next reconcile repeats the news. (An
        // answer lost this way is caught by the loop's own timeout.)
        let _ = self.events.push(event);
        let _ = self.waker.wake();
    }

    /// One connection's life: returns only on error (the caller reconnects). The session
    /// counts as connected, and control is accepted, only once it has read the timelines and
    /// beaten its heartbeat: a Redis that lets us in but refuses writes is not a cluster.
    fn session(&mut self) -> RedisResult<()> {
        let timeout = Duration::from_secs(2);
        let mut conn = self.client.get_connection_with_timeout(timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        conn.set_write_timeout(Some(timeout))?;
        let mut sub_conn = self.client.get_connection_with_timeout(timeout)?;
        let mut pubsub = sub_conn.as_pubsub();
        // Every room's channel, anew on each connection.
        self.unsubscribe.clear();
        self.subscribe = self.rooms.iter().map(|r| r.keys.channel.clone()).collect();
        self.subscriptions(&mut pubsub)?;
        pubsub.set_read_timeout(Some(POLL_SLICE))?;

        self.take_requests_offline();
        self.reconcile_all(&mut conn)?;
        self.heartbeat(&mut conn)?;
        info!(
            "cluster: connected to Redis, following {} room(s), main at timeline version {}",
            self.rooms.len(),
            self.status.version
        );
        self.status.connected = true;
        self.status.fault = None;
        self.healthy_since = Some(Instant::now());
        self.report_status();

        let mut next_reconcile = Instant::now() + RECONCILE;
        loop {
            while let Ok((id, request)) = self.requests.pop() {
                match request {
                    ClusterRequest::Change {
                        room,
                        change,
                        lead_ns,
                    } => {
                        self.in_flight = Some(id);
                        let outcome = self.apply(&mut conn, room, change, lead_ns, id)?;
                        self.in_flight = None;
                        if let Some(outcome) = outcome {
                            self.answer(id, outcome);
                        }
                    }
                    ClusterRequest::Open { room, .. } => {
                        self.take(request);
                        // Read it now: its members wait for it.
                        if let Some(i) = self.rooms.iter().position(|r| r.room == room) {
                            self.reconcile(&mut conn, i)?;
                        }
                    }
                    other => self.take(other),
                }
            }
            self.subscriptions(&mut pubsub)?;
            self.run_deferred(&mut conn)?;
            match pubsub.get_message() {
                Ok(msg) => {
                    let channel = msg.get_channel_name().to_string();
                    let heard = msg
                        .get_payload::<String>()
                        .ok()
                        .and_then(|payload| serde_json::from_str::<SharedTimeline>(&payload).ok());
                    let Some(i) = self.rooms.iter().position(|r| r.keys.channel == channel) else {
                        continue;
                    };
                    match heard.map(|t| (t.version, check(&t, &self.cfg.limits, unix_now_ns()))) {
                        Some((_, Ok(timeline))) => self.adopt(i, timeline),
                        // Refused or garbage: the key is what counts; read it (and repair it)
                        // at once rather than at the next reconcile.
                        // (Logged there, once: this is only the news of it.)
                        Some((version, Err(defect))) => {
                            debug!(
                                "cluster: published timeline version {version} refused: {defect}"
                            );
                            self.status.timelines_refused += 1;
                            next_reconcile = Instant::now();
                        }
                        None => {
                            debug!("cluster: unreadable published timeline ignored");
                            self.status.timelines_refused += 1;
                            next_reconcile = Instant::now();
                        }
                    }
                }
                Err(e) if e.is_timeout() => {}
                Err(e) => return Err(e),
            }
            if Instant::now() >= next_reconcile {
                self.reconcile_all(&mut conn)?;
                self.heartbeat(&mut conn)?;
                self.report_status();
                next_reconcile = Instant::now() + RECONCILE;
            }
        }
    }

    /// Takes what is queued and needs no session (a request to change is answered when the
    /// session is up, by `apply`).
    fn take_requests_offline(&mut self) {
        let mut changes = Vec::new();
        while let Ok((id, request)) = self.requests.pop() {
            match request {
                ClusterRequest::Change { .. } => changes.push((id, request)),
                other => self.take(other),
            }
        }
        for (id, request) in changes {
            if let ClusterRequest::Change {
                room,
                change,
                lead_ns,
            } = request
                && let Some(r) = self.rooms.iter_mut().find(|r| r.room == room)
            {
                // Asked again once the rooms are read.
                r.deferred.push((id, change, lead_ns, 0));
            }
        }
    }

    /// Joins and leaves the channels of rooms opened and closed since the last call.
    fn subscriptions(&mut self, pubsub: &mut redis::PubSub<'_>) -> RedisResult<()> {
        for channel in std::mem::take(&mut self.unsubscribe) {
            pubsub.unsubscribe(&channel)?;
        }
        for channel in std::mem::take(&mut self.subscribe) {
            pubsub.subscribe(&channel)?;
        }
        Ok(())
    }

    /// Reads (and refreshes) every room's key.
    fn reconcile_all(&mut self, conn: &mut redis::Connection) -> RedisResult<()> {
        for i in 0..self.rooms.len() {
            self.reconcile(conn, i)?;
            let r = &self.rooms[i];
            let ttl = r.ttl_ms(self.cfg.room_idle);
            if ttl > 0 && r.occupied {
                // Someone plays here: the room's shared state lives on.
                redis::cmd("PEXPIRE")
                    .arg(&r.keys.timeline)
                    .arg(ttl)
                    .exec(conn)?;
            }
        }
        Ok(())
    }

    /// Reads the timeline key, whatever it holds.
    fn read_stored(&self, conn: &mut redis::Connection, key: &str) -> RedisResult<Stored> {
        let read: RedisResult<Option<Vec<u8>>> = redis::cmd("GET").arg(key).query(conn);
        match read {
            Ok(None) => Ok(Stored::Missing),
            Ok(Some(raw)) => Ok(Stored::Value(raw)),
            Err(e) if e.code() == Some("WRONGTYPE") => {
                let kind: String = redis::cmd("TYPE").arg(key).query(conn)?;
                Ok(Stored::OtherType(kind))
            }
            Err(e) => Err(e),
        }
    }

    /// Reads room `i`'s stored timeline (the truth) and follows it if it is newer and sane;
    /// writes ours when the key is missing (first instance, or Redis restarted empty, or a
    /// room whose key expired while this instance has clients in it) or ours is newer;
    /// repairs it when it is refused, unreadable or of another type.
    ///
    /// A stored version below ours means Redis went back in time (restarted empty, and an
    /// instance with an older timeline wrote first): ours is newer and is written over it, so
    /// the instances converge instead of ignoring each other.
    fn reconcile(&mut self, conn: &mut redis::Connection, i: usize) -> RedisResult<()> {
        let key = self.rooms[i].keys.timeline.clone();
        let stored = self.read_stored(conn, &key)?;
        let write = match &stored {
            // A room nobody here plays in, whose key expired: let it go (it is being dropped
            // everywhere); `main`, or a room with clients here, is written back.
            Stored::Missing
                if self.rooms[i].read
                    && !self.rooms[i].occupied
                    && !self.rooms[i].name.is_main() =>
            {
                return Ok(());
            }
            Stored::Missing => self.rooms[i].known,
            Stored::OtherType(kind) => {
                self.refuse(
                    i,
                    &format!("the timeline key, which holds a Redis {kind}, not a string"),
                    true,
                );
                repaired(&self.rooms[i].known, None)
            }
            Stored::Value(raw) => match serde_json::from_slice::<SharedTimeline>(raw) {
                Err(e) => {
                    self.refuse(i, &format!("the stored timeline, unreadable ({e})"), true);
                    repaired(&self.rooms[i].known, None)
                }
                Ok(timeline) => match check(&timeline, &self.cfg.limits, unix_now_ns()) {
                    Err(defect) if !defect.repairable() => {
                        // Another configuration, not corruption: follow nothing, write nothing.
                        self.refuse(
                            i,
                            &format!("the stored timeline version {}: {defect}", timeline.version),
                            false,
                        );
                        return Ok(());
                    }
                    Err(defect) => {
                        self.refuse(
                            i,
                            &format!("the stored timeline version {}: {defect}", timeline.version),
                            true,
                        );
                        repaired(&self.rooms[i].known, Some(timeline.version))
                    }
                    Ok(timeline)
                        if !self.rooms[i].read || !ours_wins(&self.rooms[i].known, &timeline) =>
                    {
                        self.adopt(i, timeline);
                        return Ok(());
                    }
                    Ok(_) => self.rooms[i].known,
                },
            },
        };
        if self.replace(conn, i, &stored, &write)? {
            self.adopt(i, write);
            return Ok(());
        }
        // Another instance wrote in between (say, two writing back to an empty Redis, or two
        // repairing): follow what it wrote now, not at the next reconcile.
        if let Stored::Value(raw) = self.read_stored(conn, &key)?
            && let Ok(timeline) = serde_json::from_slice::<SharedTimeline>(&raw)
            && let Ok(timeline) = check(&timeline, &self.cfg.limits, unix_now_ns())
        {
            self.adopt(i, timeline);
        }
        Ok(())
    }

    /// Writes `write` over room `i`'s key if it still is `stored`; true when written.
    fn replace(
        &self,
        conn: &mut redis::Connection,
        i: usize,
        stored: &Stored,
        write: &SharedTimeline,
    ) -> RedisResult<bool> {
        let r = &self.rooms[i];
        let (kind, raw) = stored.expectation();
        let json = serde_json::to_string(write).unwrap_or_default();
        let written: i64 = redis::Script::new(REPLACE_SCRIPT)
            .key(&r.keys.timeline)
            .key(&r.keys.channel)
            .arg(kind)
            .arg(raw)
            .arg(json)
            .arg(r.ttl_ms(self.cfg.room_idle))
            .invoke(conn)?;
        Ok(written == 1)
    }

    /// Counts a refused timeline; one log line per distinct refusal in a room, so that an
    /// attacker rewriting a key every second, or a misconfigured instance, does not flood the
    /// log. `repair`: this instance writes the timeline it follows over the key.
    fn refuse(&mut self, i: usize, why: &str, repair: bool) {
        self.status.timelines_refused += 1;
        let r = &mut self.rooms[i];
        if r.last_refusal.as_deref() != Some(why) {
            let then = if repair {
                "writing the timeline we follow over it"
            } else {
                "following the timeline we have"
            };
            warn!("cluster: room {}: refusing {why}; {then}", r.name);
            r.last_refusal = Some(why.to_string());
        }
    }

    /// Beats this instance's heartbeat and counts the peers. A peers key of another type
    /// (ours alone, and rebuilt within a second by every instance's heartbeat) is deleted
    /// and the beat retried once.
    fn heartbeat(&mut self, conn: &mut redis::Connection) -> RedisResult<()> {
        match self.beat(conn) {
            Err(e) if ClusterFault::of(&e) == ClusterFault::WrongType => {
                warn!(
                    "cluster: {} is not a sorted set; deleting it so the heartbeats can rebuild it",
                    self.peers
                );
                redis::cmd("DEL").arg(&self.peers).exec(conn)?;
                self.beat(conn)
            }
            other => other,
        }
    }

    fn beat(&mut self, conn: &mut redis::Connection) -> RedisResult<()> {
        let now_ms = unix_now_ns() / 1_000_000;
        let (_, _, peers): ((), (), u64) = redis::pipe()
            .cmd("ZADD")
            .arg(&self.peers)
            .arg(now_ms)
            .arg(&self.instance)
            .cmd("ZREMRANGEBYSCORE")
            .arg(&self.peers)
            .arg("-inf")
            .arg(now_ms.saturating_sub(PEER_TTL_MS))
            .cmd("ZCARD")
            .arg(&self.peers)
            .query(conn)?;
        self.status.peers = peers;
        Ok(())
    }

    /// Adopts `timeline`, one [`check`] passed, for room `i` if it is newer than what this
    /// instance knows.
    fn adopt(&mut self, i: usize, timeline: SharedTimeline) {
        let r = &mut self.rooms[i];
        let first = !r.read;
        // Older versions are history, and so is a rival of the same version that ours beats
        // (see `ours_wins`): the next reconcile writes ours over it.
        if !first && (timeline == r.known || ours_wins(&r.known, &timeline)) {
            return;
        }
        if !first {
            // When does the change bite, against when this instance heard of it?
            let heard = unix_now_ns();
            let bite = change_instant(&r.known, &timeline);
            self.status.last_lead_ms = bite.map(|at| (at as f64 - heard as f64) / 1e6);
        }
        r.known = timeline;
        r.read = true;
        if r.name.is_main() {
            self.status.version = timeline.version;
        }
        let room = r.room;
        self.emit(ClusterEvent::Adopt { room, timeline });
        self.report_status();
    }

    /// Plans and writes one change for `room`; retried over a newer version when another
    /// instance wrote first. `None`: it waits for a change still pending (answered later).
    fn apply(
        &mut self,
        conn: &mut redis::Connection,
        room: RoomKey,
        change: Change,
        lead_ns: u64,
        id: u64,
    ) -> RedisResult<Option<Outcome>> {
        let Some(i) = self.rooms.iter().position(|r| r.room == room) else {
            // The room was closed here meanwhile.
            return Ok(Some(Outcome::Lost));
        };
        let floor = u64::try_from(self.cfg.lead.as_nanos()).unwrap_or(u64::MAX);
        let lead = lead_ns.max(floor);
        for _ in 0..CAS_ATTEMPTS {
            let r = &self.rooms[i];
            let current = to_timeline(&r.known, self.cfg.limits.beats_per_bar);
            let next = match plan(&current, change, unix_now_ns(), lead) {
                Planned::Unchanged => return Ok(Some(Outcome::Unchanged)),
                Planned::NotBefore(at) => {
                    self.rooms[i].deferred.push((id, change, lead, at));
                    return Ok(None);
                }
                Planned::Changed(next) => from_timeline(&next),
            };
            let json = serde_json::to_string(&next).unwrap_or_default();
            let written: i64 = redis::Script::new(CAS_SCRIPT)
                .key(&r.keys.timeline)
                .key(&r.keys.channel)
                .arg(r.known.version)
                .arg(json)
                .arg(r.ttl_ms(self.cfg.room_idle))
                .invoke(conn)?;
            if written == 1 {
                self.adopt(i, next);
                return Ok(Some(Outcome::Applied));
            }
            self.reconcile(conn, i)?;
        }
        warn!(
            "cluster: a change in room {} lost {CAS_ATTEMPTS} races in a row; refused",
            self.rooms[i].name
        );
        Ok(Some(Outcome::Lost))
    }

    /// Asks again the changes whose instant has come.
    fn run_deferred(&mut self, conn: &mut redis::Connection) -> RedisResult<()> {
        let now = unix_now_ns();
        let mut due = Vec::new();
        for r in &mut self.rooms {
            let mut i = 0;
            while i < r.deferred.len() {
                if r.deferred[i].3 <= now {
                    let (id, change, lead, _) = r.deferred.swap_remove(i);
                    due.push((r.room, id, change, lead));
                } else {
                    i += 1;
                }
            }
        }
        for (room, id, change, lead) in due {
            self.in_flight = Some(id);
            let outcome = self.apply(conn, room, change, lead, id)?;
            self.in_flight = None;
            if let Some(outcome) = outcome {
                self.answer(id, outcome);
            }
        }
        Ok(())
    }
}

/// Whether the timeline this instance knows (`ours`) should replace `other` rather than
/// follow it. A higher version wins: it carries later changes. The same version with other
/// content happens when Redis restarted empty and two instances each wrote back what they had
/// (one of them having counted alone); then the one further along at this moment wins, so
/// that every instance's count only ever jumps forward, and all apply the same rule, so they
/// converge.
fn ours_wins(ours: &SharedTimeline, other: &SharedTimeline) -> bool {
    if other.version != ours.version {
        return ours.version > other.version;
    }
    let now = unix_now_ns();
    ours.first_count_at_or_after(now) > other.first_count_at_or_after(now)
}

/// The timeline to write over a refused one: the one this instance follows (`known`), under
/// a version above both, so that every instance takes it. A refused version past
/// [`MAX_VERSION`] cannot be topped sanely and is ignored: the other instances, knowing
/// nothing better, take the repair as the newest sane timeline.
pub fn repaired(known: &SharedTimeline, refused_version: Option<u64>) -> SharedTimeline {
    let mut t = *known;
    let above = refused_version
        .filter(|v| *v < MAX_VERSION)
        .unwrap_or(0)
        .max(t.version);
    t.version = above.saturating_add(1);
    t
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
    use crate::timeline::{Change, Planned};
    use crate::transport::Quantize;
    use proptest::prelude::*;

    /// [`crate::timeline::plan`] over a shared timeline (four beats to the bar), as the
    /// cluster thread calls it: `None` when it would change nothing.
    fn plan(t: &SharedTimeline, change: Change, now: u64, lead: u64) -> Option<SharedTimeline> {
        match crate::timeline::plan(&to_timeline(t, 4), change, now, lead) {
            Planned::Changed(next) => Some(from_timeline(&next)),
            Planned::Unchanged | Planned::NotBefore(_) => None,
        }
    }

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
        let next = plan(&t, Change::SetBpm(Bpm::whole(150)), now, LEAD).unwrap();
        assert_eq!(next.version, 4);
        assert_eq!(next.anchor_count, 110);
        assert_eq!(next.anchor_unix_ns, t.unix_ns_of(110));
        assert_eq!(next.bpm_milli, 150_000);
        assert_eq!(next.unix_ns_of(111) - next.unix_ns_of(110), 100_000_000);
        assert!(plan(&next, Change::SetBpm(Bpm::whole(150)), now, LEAD).is_none());
    }

    #[test]
    fn stop_and_a_quantised_start() {
        let t = timeline();
        let now = t.anchor_unix_ns + 1_000_000_000;
        let stopped = plan(&t, Change::Stop, now, LEAD).unwrap();
        assert!(!stopped.playing && stopped.playing_before);
        assert_eq!(stopped.transport_count, 110);
        assert!(plan(&stopped, Change::Stop, now, LEAD).is_none());
        // A start contradicts the stop still pending: it is planned once the stop has begun,
        // here with a lead of a second, so that the start lies beyond a tempo change's lead.
        let later = stopped.transport_unix_ns;
        let started = plan(&stopped, Change::Start(Quantize::Bar), later, 4 * LEAD).unwrap();
        assert!(started.playing && !started.playing_before);
        assert_eq!(started.transport_count, 128, "next bar line after tick 118");
        assert_eq!(started.transport_unix_ns, t.unix_ns_of(128));
        // A tempo change before that start moves its instant with it.
        let faster = plan(&started, Change::SetBpm(Bpm::whole(150)), later, LEAD).unwrap();
        assert_eq!(faster.anchor_count, 112);
        assert_eq!(faster.transport_unix_ns, faster.unix_ns_of(128));
        assert_ne!(faster.transport_unix_ns, started.transport_unix_ns);
        assert!(!started.transport().plays(127));
        assert!(started.transport().plays(128));
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

    const LIMITS: TimelineLimits = TimelineLimits {
        min_bpm: Bpm::whole(60),
        max_bpm: Bpm::whole(200),
        ppqn: 4,
        beats_per_bar: 4,
    };

    /// Two seconds after `timeline()`'s anchor.
    const NOW: u64 = 1_700_000_002_000_000_000;

    #[test]
    fn a_sane_timeline_passes_and_an_old_one_gets_its_transport_instant() {
        let t = timeline();
        assert_eq!(check(&t, &LIMITS, NOW), Ok(t));
        // Written before transport_unix_ns existed: filled in from the count.
        let mut old = t;
        old.transport_count = 120;
        old.transport_unix_ns = 0;
        let checked = check(&old, &LIMITS, NOW).unwrap();
        assert_eq!(checked.transport_unix_ns, t.unix_ns_of(120));
        // A change planned over it passes too.
        let next = plan(&t, Change::SetBpm(Bpm::whole(150)), NOW, LEAD).unwrap();
        assert_eq!(check(&next, &LIMITS, NOW), Ok(next));
        let started = plan(&t, Change::Stop, NOW, LEAD)
            .and_then(|s| plan(&s, Change::Start(Quantize::Bar), s.transport_unix_ns, LEAD))
            .unwrap();
        assert_eq!(check(&started, &LIMITS, NOW), Ok(started));
    }

    /// What the outside attacker wrote into Redis, each refused.
    #[test]
    fn timelines_that_would_silence_or_race_the_instances_are_refused() {
        let with = |f: &dyn Fn(&mut SharedTimeline)| {
            let mut t = timeline();
            f(&mut t);
            check(&t, &LIMITS, NOW)
        };
        // Runaway: a count about to wrap.
        assert!(matches!(
            with(&|t| t.anchor_count = u64::MAX - 8),
            Err(TimelineDefect::Count(_))
        ));
        // Silence: an anchor a year ahead, or a start that never comes.
        let year = 365 * 24 * 3600 * 1_000_000_000u64;
        assert!(matches!(
            with(&|t| {
                t.anchor_unix_ns += year;
                t.transport_unix_ns += year;
            }),
            Err(TimelineDefect::AnchorAhead(_))
        ));
        assert!(matches!(
            with(&|t| {
                t.playing_before = false;
                t.transport_count = u64::MAX - 1;
            }),
            Err(TimelineDefect::Count(_))
        ));
        // A start far ahead, its instant consistent with its count.
        assert!(matches!(
            with(&|t| {
                t.playing_before = false;
                t.transport_count = 100 + 8 * 3600;
                t.transport_unix_ns = t.unix_ns_of(t.transport_count);
            }),
            Err(TimelineDefect::TransportAhead(3598))
        ));
        // A transport instant that does not belong to its count.
        assert_eq!(
            with(&|t| {
                t.transport_count = 200;
                t.transport_unix_ns = NOW;
            }),
            Err(TimelineDefect::TransportInconsistent)
        );
        assert_eq!(
            with(&|t| {
                t.transport_count = 50;
                t.transport_unix_ns = t.anchor_unix_ns + 1;
            }),
            Err(TimelineDefect::TransportInconsistent)
        );
        // Tempo outside this instance's flags, though within what any instance could run.
        assert_eq!(
            with(&|t| t.bpm_milli = 1_000_000),
            Err(TimelineDefect::Tempo(Bpm::whole(1000)))
        );
        assert_eq!(
            with(&|t| t.bpm_milli = 59_999),
            Err(TimelineDefect::Tempo(Bpm::from_milli(59_999)))
        );
        // Versions that are not exact, or none.
        assert_eq!(
            with(&|t| t.version = 1 << 60),
            Err(TimelineDefect::Version(1 << 60))
        );
        assert_eq!(with(&|t| t.version = 0), Err(TimelineDefect::Version(0)));
        assert_eq!(
            with(&|t| t.anchor_unix_ns = 0),
            Err(TimelineDefect::AnchorAncient)
        );
        // Another ppqn: refused, but not to be overwritten.
        let other = with(&|t| t.ppqn = 24).unwrap_err();
        assert!(!other.repairable());
        assert!(TimelineDefect::Count(1).repairable());
    }

    #[test]
    fn a_repair_carries_our_timeline_above_the_refused_version() {
        let ours = timeline();
        assert_eq!(repaired(&ours, Some(10)).version, 11);
        assert_eq!(repaired(&ours, Some(1)).version, 4, "ours was newer");
        assert_eq!(
            repaired(&ours, Some(1 << 60)).version,
            4,
            "beyond 2^53: ignored"
        );
        assert_eq!(repaired(&ours, None).version, 4);
        let r = repaired(&ours, Some(10));
        assert_eq!(check(&r, &LIMITS, NOW).map(|t| t.anchor_count), Ok(100));
    }

    #[test]
    fn backoff_grows_on_every_failed_session_until_one_was_healthy_long_enough() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..7).map(|_| b.failed(None)).collect();
        assert_eq!(waits[0], BACKOFF_MIN);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(waits[6], BACKOFF_MAX);
        // A session that connected and failed its first heartbeat is still a failure: the
        // defect the outside attacker found (ten reconnects a second).
        assert_eq!(b.failed(Some(Duration::from_millis(5))), BACKOFF_MAX);
        assert_eq!(b.failed(Some(STABLE_SESSION)), BACKOFF_MIN);
        assert_eq!(b.failed(None), BACKOFF_MIN * 2);
    }

    #[test]
    fn redis_errors_name_the_real_fault() {
        let server_error = |resp: &[u8]| -> redis::RedisError {
            match redis::parse_redis_value(resp).and_then(|v| v.extract_error()) {
                Err(e) => e,
                Ok(v) => panic!("not an error: {v:?}"),
            }
        };
        let cases: [(&[u8], ClusterFault); 5] = [
            (
                b"-OOM command not allowed when used memory > 'maxmemory'.\r\n",
                ClusterFault::OutOfMemory,
            ),
            (
                b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
                ClusterFault::WrongType,
            ),
            (
                b"-READONLY You can't write against a read only replica.\r\n",
                ClusterFault::WritesRefused,
            ),
            (b"-NOPERM no permissions\r\n", ClusterFault::WritesRefused),
            (b"-ERR something else\r\n", ClusterFault::Other),
        ];
        for (resp, fault) in cases {
            assert_eq!(ClusterFault::of(&server_error(resp)), fault, "{resp:?}");
        }
        let refused = redis::RedisError::from(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(ClusterFault::of(&refused), ClusterFault::Unreachable);
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
                0 => Change::SetBpm(Bpm::whole(bpm)),
                1 => Change::Stop,
                _ => Change::Start(Quantize::Beat),
            };
            if let Some(next) = plan(&t, request, now, lead) {
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
