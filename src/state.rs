//! State that survives a restart: the tempo, the transport, beats per bar and the timeline's
//! anchor (in unix time) of `main` and of every other room, in one small JSON file
//! (`--state FILE`).
//!
//! `main`'s fields are where they always were; the other rooms are in an optional `rooms`
//! map, each entry with the same fields and checked by the same rules. A file without rooms is
//! exactly the format an older server writes and reads, and an older server reading a newer
//! file resumes `main` and ignores the rest. A room entry that fails its checks is dropped
//! with one log line; the rest of the file is still used.
//!
//! This module owns the file's format and its validation ([`decode`], [`encode`], pure), what a
//! restarted server starts on ([`resume`], pure), reading the file at start ([`load`], which
//! keeps a bad file aside), and the [`StateWriter`] thread that writes every change atomically
//! (temporary file, fsync, rename, fsync of the directory).
//!
//! It must not write on the event loop: an fsync can take milliseconds (far more on an SD
//! card), so the loop hands each new state to the writer through a wait-free ring and carries
//! on. Only the newest state matters, so the writer coalesces whatever has queued up and
//! writes that. A crash or `SIGKILL` at any moment leaves either the previous file or the new
//! one, whole: a reader never sees a torn file.
//!
//! A restarted server resumes the same timeline, in phase, exactly as a cluster joiner adopts
//! a shared one ([`SharedTimeline::schedule`]): the count goes on as if the server had never
//! stopped, and the transport's state and start count are kept, so bar positions continue.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{info, warn};
use rtrb::{Consumer, Producer, RingBuffer};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::clock::Clock;
use crate::cluster::SharedTimeline;
use crate::config::Config;
use crate::room::RoomName;
use crate::tempo::{Bpm, TickSchedule};
use crate::transport::{Transport, TransportState};

/// The file format this server writes and reads.
pub const FORMAT: u32 = 1;
/// A state file is a few hundred bytes per room (`--max-rooms` is at most 10,000); anything
/// much larger is not one.
const MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;
/// The earliest anchor taken seriously: 2020-01-01T00:00:00Z. Earlier means a clock that was
/// wrong when the file was written (a board without a real-time clock, before NTP).
const EARLIEST_UNIX_NS: u64 = 1_577_836_800_000_000_000;
/// How far ahead of now a saved anchor may lie: a tempo change is anchored at the next tick,
/// a cluster's up to `--cluster-lead-ms` (10 s at most) ahead. Further means this machine's
/// clock is now behind the one that wrote the file, and resuming would wait for it.
const ANCHOR_AHEAD_NS: u64 = 60_000_000_000;
/// A pending quantised start may lie up to a bar ahead; a day is beyond any bar.
const TRANSPORT_AHEAD_NS: u64 = 86_400_000_000_000;
/// Counts stay exact in every client's JavaScript numbers.
const MAX_COUNT: u64 = 1 << 53;
/// How far ahead a tempo typed on the command line takes over a resumed timeline, so that
/// the timing thread (which starts a millisecond after `bind`) meets it as its first tick.
const RETEMPO_MARGIN_NS: u64 = 20_000_000;
/// States the loop may queue before the writer takes them.
const RING: usize = 16;

/// What survives a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Persisted {
    /// `main`'s timeline and transport, in the shape a cluster shares them (`version` unused).
    pub timeline: SharedTimeline,
    pub beats_per_bar: u32,
    /// Every other room, by name.
    pub rooms: Vec<SavedRoom>,
}

/// One room other than `main`, as saved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedRoom {
    pub name: RoomName,
    pub timeline: SharedTimeline,
    pub beats_per_bar: u32,
}

impl Persisted {
    /// The state of a server running `schedule` (on `clock`) with `transport`, whose current
    /// state began at `transport_unix_ns`.
    pub fn of(
        schedule: &TickSchedule,
        transport: &Transport,
        transport_unix_ns: u64,
        beats_per_bar: u32,
        clock: &Clock,
    ) -> Persisted {
        Persisted {
            timeline: SharedTimeline {
                version: 1,
                anchor_count: schedule.anchor_count(),
                anchor_unix_ns: clock.unix_ns(schedule.anchor_ns()),
                bpm_milli: schedule.bpm().milli(),
                ppqn: schedule.ppqn(),
                playing_before: transport.before() == TransportState::Playing,
                playing: transport.state() == TransportState::Playing,
                transport_count: transport.from_count(),
                transport_unix_ns,
            },
            beats_per_bar,
            rooms: Vec::new(),
        }
    }
}

/// Why a state file was not used, or could not be written.
#[derive(Debug, Error)]
pub enum StateError {
    #[error("cannot read it: {0}")]
    Read(io::Error),
    #[error("it is larger than {MAX_FILE_BYTES} bytes, so not a conductor state file")]
    TooLarge,
    #[error("not a conductor state file: {0}")]
    Parse(serde_json::Error),
    #[error("it is format {0}; this server reads format {FORMAT} (written by a newer version?)")]
    Format(u32),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// The limits a saved state must respect: those in force now, as for a cluster's timeline.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub min_bpm: Bpm,
    pub max_bpm: Bpm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Play {
    Playing,
    Stopped,
}

impl Play {
    fn of(playing: bool) -> Play {
        if playing {
            Play::Playing
        } else {
            Play::Stopped
        }
    }
}

/// The file, as written. Unknown fields are ignored, so a newer server's additions do not
/// make an older one refuse the file; a change of meaning bumps `format`.
#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    format: u32,
    #[serde(flatten)]
    main: SavedState,
    /// The rooms other than `main`, by name (absent when there are none).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    rooms: std::collections::BTreeMap<String, SavedState>,
    /// When this was written, for people reading the file.
    #[serde(default)]
    saved_unix_ns: u64,
}

/// One room's saved state: `main`'s at the top of the file, the others under `rooms`.
#[derive(Debug, Serialize, Deserialize)]
struct SavedState {
    /// Exact to 0.001 BPM.
    bpm: f64,
    ppqn: u32,
    beats_per_bar: u32,
    /// Tick `count` fell (or falls) at `unix_ns`; the timeline runs from there at `bpm`.
    anchor: Anchor,
    transport: SavedTransport,
}

#[derive(Debug, Serialize, Deserialize)]
struct Anchor {
    count: u64,
    unix_ns: u64,
}

/// `state` from tick `count` (due at `unix_ns`) on, `before` until then.
#[derive(Debug, Serialize, Deserialize)]
struct SavedTransport {
    state: Play,
    count: u64,
    unix_ns: u64,
    before: Play,
}

fn saved_state(t: &SharedTimeline, beats_per_bar: u32) -> SavedState {
    SavedState {
        bpm: t.bpm().as_f64(),
        ppqn: t.ppqn,
        beats_per_bar,
        anchor: Anchor {
            count: t.anchor_count,
            unix_ns: t.anchor_unix_ns,
        },
        transport: SavedTransport {
            state: Play::of(t.playing),
            count: t.transport_count,
            unix_ns: t.transport_unix_ns,
            before: Play::of(t.playing_before),
        },
    }
}

/// The file's bytes for `state`, written at `now_unix_ns`.
pub fn encode(state: &Persisted, now_unix_ns: u64) -> Vec<u8> {
    let file = StateFile {
        format: FORMAT,
        main: saved_state(&state.timeline, state.beats_per_bar),
        rooms: state
            .rooms
            .iter()
            .map(|r| {
                (
                    r.name.to_string(),
                    saved_state(&r.timeline, r.beats_per_bar),
                )
            })
            .collect(),
        saved_unix_ns: now_unix_ns,
    };
    let mut bytes = serde_json::to_vec_pretty(&file).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// Reads and checks a state file's bytes: the tempo within the limits in force, ppqn and beats
/// per bar within the flags' ranges, counts exact in JavaScript, and the anchor within a sane
/// window of `now_unix_ns` (see the constants). `main`'s entry must pass; a room entry that
/// does not (or whose name is no room name) is left out, with one log line.
pub fn decode(bytes: &[u8], limits: Limits, now_unix_ns: u64) -> Result<Persisted, StateError> {
    let file: StateFile = serde_json::from_slice(bytes).map_err(StateError::Parse)?;
    if file.format != FORMAT {
        return Err(StateError::Format(file.format));
    }
    let (timeline, beats_per_bar) = check_saved(&file.main, limits, now_unix_ns)?;
    let mut rooms = Vec::new();
    for (name, saved) in &file.rooms {
        let checked = RoomName::parse(name)
            .map_err(|e| StateError::Invalid(e.to_string()))
            .and_then(|room| {
                let (timeline, beats_per_bar) = check_saved(saved, limits, now_unix_ns)?;
                Ok(SavedRoom {
                    name: room,
                    timeline,
                    beats_per_bar,
                })
            });
        match checked {
            Ok(room) if !room.name.is_main() => rooms.push(room),
            Ok(_) => warn!("state: a room named main among the rooms; left out"),
            Err(e) => warn!("state: room {name:?} left out: {e}"),
        }
    }
    Ok(Persisted {
        timeline,
        beats_per_bar,
        rooms,
    })
}

/// Checks one saved room (see [`decode`]).
fn check_saved(
    file: &SavedState,
    limits: Limits,
    now_unix_ns: u64,
) -> Result<(SharedTimeline, u32), StateError> {
    let invalid = |what: String| Err(StateError::Invalid(what));
    let Some(bpm) = Bpm::from_f64(file.bpm) else {
        return invalid(format!("tempo {} is not a usable tempo", file.bpm));
    };
    if bpm < limits.min_bpm || bpm > limits.max_bpm {
        return invalid(format!(
            "tempo {bpm} lies outside the limits in force, {} to {} BPM (--min-bpm, --max-bpm)",
            limits.min_bpm, limits.max_bpm
        ));
    }
    if !(1..=960).contains(&file.ppqn) {
        return invalid(format!("ppqn {} is outside 1 to 960", file.ppqn));
    }
    if !(1..=64).contains(&file.beats_per_bar) {
        return invalid(format!(
            "beats per bar {} is outside 1 to 64",
            file.beats_per_bar
        ));
    }
    if file.anchor.count > MAX_COUNT || file.transport.count > MAX_COUNT {
        return invalid("a count is beyond 2^53".into());
    }
    let anchor = file.anchor.unix_ns;
    if anchor < EARLIEST_UNIX_NS {
        return invalid(format!(
            "the timeline's anchor ({} s unix) is before 2020: was the clock wrong when it was saved?",
            anchor / 1_000_000_000
        ));
    }
    if anchor > now_unix_ns.saturating_add(ANCHOR_AHEAD_NS) {
        return invalid(format!(
            "the timeline's anchor is {} s in the future: is this machine's clock right?",
            (anchor - now_unix_ns) / 1_000_000_000
        ));
    }
    let transport_at = file.transport.unix_ns;
    // 0: unknown (a cluster timeline from before the field existed).
    if transport_at != 0
        && (transport_at < EARLIEST_UNIX_NS
            || transport_at > now_unix_ns.saturating_add(TRANSPORT_AHEAD_NS))
    {
        return invalid("the transport's instant is outside 2020 .. tomorrow".into());
    }
    Ok((
        SharedTimeline {
            version: 1,
            anchor_count: file.anchor.count,
            anchor_unix_ns: anchor,
            bpm_milli: bpm.milli(),
            ppqn: file.ppqn,
            playing_before: file.transport.before == Play::Playing,
            playing: file.transport.state == Play::Playing,
            transport_count: file.transport.count,
            transport_unix_ns: transport_at,
        },
        file.beats_per_bar,
    ))
}

/// The flags that bear on resuming.
#[derive(Clone, Copy, Debug)]
pub struct ResumeFlags {
    pub bpm: Bpm,
    /// `--bpm` typed on the command line: it wins over the saved tempo.
    pub bpm_on_command_line: bool,
    pub ppqn: u32,
    pub beats_per_bar: u32,
    pub beats_per_bar_on_command_line: bool,
}

/// What a restarted server starts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    pub timeline: SharedTimeline,
    pub beats_per_bar: u32,
    /// The saved count could not go on (another `--ppqn`): a new count from 0.
    pub recounted: bool,
}

/// Decides what a server started with `flags` at `now_unix_ns` resumes from `saved` (pure).
///
/// * The timeline goes on in phase: the same anchor, tempo and transport.
/// * `--bpm` typed on the command line wins over the saved tempo. The count keeps its phase:
///   the new tempo takes over at the first tick of the saved timeline that is far enough
///   ahead, as a tempo change made by a client would. `CONDUCTOR_BPM` and the default are the
///   tempo of a fresh start only: a restart by a supervisor keeps the band's tempo.
/// * Beats per bar likewise: the command line wins, else the saved value.
/// * Another `--ppqn` changes what a count means, so the saved count cannot go on: the tempo
///   and the transport's state are kept, and counting starts again from 0.
pub fn resume(saved: &Persisted, flags: ResumeFlags, now_unix_ns: u64) -> Resume {
    resume_one(&saved.timeline, saved.beats_per_bar, flags, now_unix_ns)
}

/// What a saved room other than `main` resumes as: its own tempo and beats per bar (the
/// command line's `--bpm` and `--beats-per-bar` are `main`'s, and a new room's), in phase;
/// with another `--ppqn`, a new count.
pub fn resume_room(saved: &SavedRoom, flags: ResumeFlags, now_unix_ns: u64) -> Resume {
    let own = ResumeFlags {
        bpm_on_command_line: false,
        beats_per_bar_on_command_line: false,
        ..flags
    };
    resume_one(&saved.timeline, saved.beats_per_bar, own, now_unix_ns)
}

fn resume_one(
    old: &SharedTimeline,
    saved_beats_per_bar: u32,
    flags: ResumeFlags,
    now_unix_ns: u64,
) -> Resume {
    let beats_per_bar = if flags.beats_per_bar_on_command_line {
        flags.beats_per_bar
    } else {
        saved_beats_per_bar
    };
    let old = *old;
    let bpm = if flags.bpm_on_command_line {
        flags.bpm
    } else {
        old.bpm()
    };
    if old.ppqn != flags.ppqn {
        let start = now_unix_ns.saturating_add(RETEMPO_MARGIN_NS);
        let timeline = SharedTimeline {
            version: 1,
            anchor_count: 0,
            anchor_unix_ns: start,
            bpm_milli: bpm.milli(),
            ppqn: flags.ppqn,
            playing_before: old.playing,
            playing: old.playing,
            transport_count: 0,
            transport_unix_ns: start,
        };
        return Resume {
            timeline,
            beats_per_bar,
            recounted: true,
        };
    }
    let mut timeline = old;
    if bpm != old.bpm() {
        let from = old.first_count_at_or_after(now_unix_ns.saturating_add(RETEMPO_MARGIN_NS));
        timeline.anchor_count = from;
        timeline.anchor_unix_ns = old.unix_ns_of(from);
        timeline.bpm_milli = bpm.milli();
        // A start still ahead moves with the new tempo.
        if timeline.transport_count >= from {
            timeline.transport_unix_ns = timeline.unix_ns_of(timeline.transport_count);
        }
    }
    Resume {
        timeline,
        beats_per_bar,
        recounted: false,
    }
}

/// What `load` found.
#[derive(Debug)]
pub enum Loaded {
    /// No file yet: a first start.
    Fresh,
    Resumed(Persisted),
    /// The file was unusable and is now at `kept_aside`; start on defaults.
    KeptAside {
        error: StateError,
        kept_aside: PathBuf,
    },
    /// Unusable and could not be moved aside: it must not be overwritten, so nothing is saved.
    Untouchable {
        error: StateError,
        rename: io::Error,
    },
}

/// Where an unusable state file goes: `FILE.bad`, or `FILE.bad.N` if that is taken, so an
/// earlier bad file is never overwritten either.
pub fn bad_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".bad");
    let first = PathBuf::from(&name);
    if !first.exists() {
        return first;
    }
    (1..1000)
        .map(|n| {
            let mut numbered = name.clone();
            numbered.push(format!(".{n}"));
            PathBuf::from(numbered)
        })
        .find(|p| !p.exists())
        .unwrap_or(first)
}

/// Reads the state file at start. An unusable one (unreadable, corrupt, or out of bounds) is
/// renamed aside and said so in one log line.
pub fn load(path: &Path, limits: Limits, now_unix_ns: u64) -> Loaded {
    let read = || -> Result<Persisted, StateError> {
        let file = File::open(path).map_err(StateError::Read)?;
        let mut bytes = Vec::new();
        file.take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(StateError::Read)?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(StateError::TooLarge);
        }
        decode(&bytes, limits, now_unix_ns)
    };
    let error = match read() {
        Ok(state) => return Loaded::Resumed(state),
        // Nothing there (also when a "directory" on the way is a file): nothing to keep aside.
        Err(StateError::Read(e))
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Loaded::Fresh;
        }
        Err(e) => e,
    };
    let aside = bad_path(path);
    match fs::rename(path, &aside) {
        Ok(()) => {
            warn!(
                "state: {} is unusable ({error}); kept aside as {}, starting on the defaults",
                path.display(),
                aside.display()
            );
            Loaded::KeptAside {
                error,
                kept_aside: aside,
            }
        }
        Err(rename) => {
            warn!(
                "state: {} is unusable ({error}) and cannot be moved aside ({rename}); starting \
                 on the defaults and saving nothing, so that it is not overwritten",
                path.display()
            );
            Loaded::Untouchable { error, rename }
        }
    }
}

/// An exclusive lock on `FILE.lock`, held for as long as this server uses `FILE`: two servers
/// started with the same file (two in one working directory, with the default) would
/// otherwise overwrite each other's state and resume each other's tempo.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

enum Locking {
    Held(StateLock),
    /// Another process holds it.
    Busy,
    /// No lock file could be made (a read-only or missing directory): the file can be read but
    /// not written, which starting the writer will find out and say.
    Unavailable,
}

fn lock(path: &Path) -> Locking {
    use std::os::fd::AsRawFd;
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let Ok(file) = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(PathBuf::from(name))
    else {
        return Locking::Unavailable;
    };
    // SAFETY: flock on a descriptor we own; released when the file is closed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        Locking::Held(StateLock { _file: file })
    } else if io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK) {
        Locking::Busy
    } else {
        Locking::Unavailable
    }
}

/// What the state file gives a starting server.
#[derive(Debug)]
pub struct Startup {
    /// The timeline to resume, when the file had a usable one.
    pub resume: Option<Resume>,
    /// The other rooms the file had, each to resume.
    pub rooms: Vec<(RoomName, Resume)>,
    /// False when a bad file could not be moved aside (writing would destroy the only copy),
    /// or when another server uses the file.
    pub may_write: bool,
    /// There was no file: a first start (said once the file could be written).
    pub fresh: bool,
    /// Held while the file is this server's.
    pub lock: Option<StateLock>,
}

impl Startup {
    /// `--state none`, or a file this server must leave alone.
    pub fn off() -> Startup {
        Startup {
            resume: None,
            rooms: Vec::new(),
            may_write: false,
            fresh: false,
            lock: None,
        }
    }
}

/// Reads the state file named by `cfg` and decides what to resume, saying so in one line.
pub fn startup(path: &Path, cfg: &Config, now_unix_ns: u64) -> Startup {
    let lock = match lock(path) {
        Locking::Held(lock) => Some(lock),
        Locking::Unavailable => None,
        Locking::Busy => {
            warn!(
                "state: another conductor is using {} (it holds {}.lock); this one neither \
                 resumes nor saves it: give each server its own --state",
                path.display(),
                path.display()
            );
            return Startup::off();
        }
    };
    let limits = Limits {
        min_bpm: cfg.min_bpm,
        max_bpm: cfg.max_bpm,
    };
    let saved = match load(path, limits, now_unix_ns) {
        Loaded::Resumed(saved) => saved,
        Loaded::Fresh => {
            return Startup {
                resume: None,
                rooms: Vec::new(),
                may_write: true,
                fresh: true,
                lock,
            };
        }
        Loaded::KeptAside { .. } => {
            return Startup {
                resume: None,
                rooms: Vec::new(),
                may_write: true,
                fresh: false,
                lock,
            };
        }
        Loaded::Untouchable { .. } => return Startup::off(),
    };
    let flags = ResumeFlags {
        bpm: cfg.bpm,
        bpm_on_command_line: cfg.bpm_on_command_line,
        ppqn: cfg.ppqn,
        beats_per_bar: cfg.beats_per_bar,
        beats_per_bar_on_command_line: cfg.beats_per_bar_on_command_line,
    };
    let r = resume(&saved, flags, now_unix_ns);
    let rooms: Vec<(RoomName, Resume)> = saved
        .rooms
        .iter()
        .map(|room| (room.name.clone(), resume_room(room, flags, now_unix_ns)))
        .collect();
    let t = r.timeline;
    let mut notes = String::new();
    if t.bpm() != saved.timeline.bpm() {
        notes.push_str(&format!(
            "; --bpm {} on the command line replaces the saved {}",
            t.bpm(),
            saved.timeline.bpm()
        ));
    }
    if r.recounted {
        notes.push_str(&format!(
            "; it counted at ppqn {}, this server at {}, so the count starts again from 0",
            saved.timeline.ppqn, cfg.ppqn
        ));
    }
    if !rooms.is_empty() {
        notes.push_str(&format!("; and {} other room(s)", rooms.len()));
    }
    info!(
        "state: resuming {} from {}: {} BPM, {}, {} beats a bar{notes}",
        if r.recounted {
            "the tempo"
        } else {
            "the timeline"
        },
        path.display(),
        t.bpm(),
        if t.playing { "playing" } else { "stopped" },
        r.beats_per_bar,
    );
    Startup {
        resume: Some(r),
        rooms,
        may_write: true,
        fresh: false,
        lock,
    }
}

/// Writes `bytes` to `path` so that a crash at any point leaves the old file or the new one,
/// whole: a temporary file beside it, written and fsynced, renamed over it, and the directory
/// fsynced so the rename itself survives a power cut.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match File::open(dir).and_then(|d| d.sync_all()) {
        // Some filesystems cannot fsync a directory; the rename is done all the same.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        other => other,
    }
}

enum Command {
    Save(Persisted),
    Stop,
}

/// The loop's side of the writer thread.
pub struct StateWriter {
    path: PathBuf,
    /// The file is this server's while the writer runs.
    _lock: Option<StateLock>,
    commands: Producer<Command>,
    handle: JoinHandle<()>,
    /// The newest state handed over, to skip handing over the same one again.
    last: Persisted,
    /// A state the ring had no room for; handed over at the next `save` or `retry`.
    unsent: Option<Persisted>,
}

impl StateWriter {
    /// Writes `first` at once (so an unwritable location shows at start, as one warning from
    /// the caller) and starts the thread that writes every later state.
    pub fn start(
        path: PathBuf,
        first: Persisted,
        clock: Clock,
        lock: Option<StateLock>,
    ) -> Result<StateWriter, StateError> {
        write_atomically(&path, &encode(&first, clock.unix_now_ns())).map_err(|source| {
            StateError::Write {
                path: path.clone(),
                source,
            }
        })?;
        let (commands, rx) = RingBuffer::new(RING);
        let thread_path = path.clone();
        let handle = thread::Builder::new()
            .name("conductor-state".into())
            .spawn(move || write_loop(thread_path, rx, clock))
            .map_err(|source| StateError::Write {
                path: path.clone(),
                source,
            })?;
        Ok(StateWriter {
            path,
            _lock: lock,
            commands,
            handle,
            last: first,
            unsent: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hands `state` to the writer, unless it is the one handed over last. Never blocks.
    pub fn save(&mut self, state: Persisted) {
        if state == self.last && self.unsent.is_none() {
            return;
        }
        self.last = state.clone();
        self.unsent = Some(state);
        self.retry();
    }

    /// Hands over a state that found the ring full (call now and then: housekeeping).
    pub fn retry(&mut self) {
        let Some(state) = self.unsent.take() else {
            return;
        };
        match self.commands.push(Command::Save(state)) {
            Ok(()) => self.handle.thread().unpark(),
            Err(rtrb::PushError::Full(Command::Save(state))) => self.unsent = Some(state),
            Err(rtrb::PushError::Full(Command::Stop)) => {}
        }
    }

    /// Writes what is pending and ends the thread.
    pub fn stop(mut self) {
        self.retry();
        while self.unsent.is_some() && !self.handle.is_finished() {
            self.handle.thread().unpark();
            thread::sleep(Duration::from_millis(1));
            self.retry();
        }
        while !self.handle.is_finished() && self.commands.push(Command::Stop).is_err() {
            self.handle.thread().unpark();
            thread::sleep(Duration::from_millis(1));
        }
        self.handle.thread().unpark();
        if self.handle.join().is_err() {
            warn!("state: the writer thread panicked");
        }
    }
}

fn write_loop(path: PathBuf, mut commands: Consumer<Command>, clock: Clock) {
    let mut failing = false;
    loop {
        let mut newest = None;
        let mut stop = false;
        while let Ok(command) = commands.pop() {
            match command {
                Command::Save(state) => newest = Some(state),
                Command::Stop => stop = true,
            }
        }
        if let Some(state) = newest {
            match write_atomically(&path, &encode(&state, clock.unix_now_ns())) {
                Ok(()) if failing => {
                    info!("state: writing {} works again", path.display());
                    failing = false;
                }
                Ok(()) => {}
                // One line when writing starts to fail, not one per change.
                Err(e) if !failing => {
                    warn!(
                        "state: cannot write {}: {e}; the state is not saved until this is fixed",
                        path.display()
                    );
                    failing = true;
                }
                Err(_) => {}
            }
        }
        if stop || commands.is_abandoned() && commands.is_empty() {
            return;
        }
        thread::park_timeout(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_764_000_000_000_000_000;

    fn limits() -> Limits {
        Limits {
            min_bpm: Bpm::whole(60),
            max_bpm: Bpm::whole(200),
        }
    }

    fn saved() -> Persisted {
        Persisted {
            timeline: SharedTimeline {
                version: 1,
                anchor_count: 1000,
                anchor_unix_ns: NOW - 60_000_000_000,
                bpm_milli: 119_875,
                ppqn: 4,
                playing_before: false,
                playing: true,
                transport_count: 1024,
                transport_unix_ns: NOW - 57_000_000_000,
            },
            beats_per_bar: 3,
            rooms: Vec::new(),
        }
    }

    fn flags() -> ResumeFlags {
        ResumeFlags {
            bpm: Bpm::whole(120),
            bpm_on_command_line: false,
            ppqn: 4,
            beats_per_bar: 4,
            beats_per_bar_on_command_line: false,
        }
    }

    #[test]
    fn the_file_round_trips_exactly_and_reads_like_a_settings_file() {
        let bytes = encode(&saved(), NOW);
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains("\"bpm\": 119.875"), "{text}");
        assert!(text.contains("\"state\": \"playing\""), "{text}");
        assert!(text.contains("\"format\": 1"), "{text}");
        assert_eq!(decode(&bytes, limits(), NOW).unwrap(), saved());
    }

    fn with(edit: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_slice(&encode(&saved(), NOW)).unwrap();
        edit(&mut v);
        serde_json::to_vec(&v).unwrap()
    }

    fn refused(bytes: &[u8]) -> String {
        match decode(bytes, limits(), NOW) {
            Ok(p) => panic!("accepted {p:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn rooms_round_trip_beside_main_and_a_bad_room_is_left_out_alone() {
        let mut state = saved();
        let mut band = state.timeline;
        band.bpm_milli = 96_000;
        band.playing = false;
        state.rooms.push(SavedRoom {
            name: RoomName::parse("band").unwrap(),
            timeline: band,
            beats_per_bar: 7,
        });
        let bytes = encode(&state, NOW);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        // main's fields where they always were; the room beside them.
        assert_eq!(v["bpm"], 119.875);
        assert_eq!(v["rooms"]["band"]["bpm"], 96.0);
        assert_eq!(v["rooms"]["band"]["transport"]["state"], "stopped");
        assert_eq!(decode(&bytes, limits(), NOW).unwrap(), state);
        // A file without rooms has no rooms field: issue 12's format exactly.
        let plain: serde_json::Value = serde_json::from_slice(&encode(&saved(), NOW)).unwrap();
        assert!(plain.get("rooms").is_none());
        // A room out of bounds, or misnamed, is left out; main and the other rooms stay.
        let mut v = v;
        v["rooms"]["loud"] = v["rooms"]["band"].clone();
        v["rooms"]["loud"]["bpm"] = 999.into();
        v["rooms"]["Bad Name"] = v["rooms"]["band"].clone();
        let back = decode(&serde_json::to_vec(&v).unwrap(), limits(), NOW).unwrap();
        assert_eq!(back.rooms.len(), 1);
        assert_eq!(back.rooms[0].name.as_str(), "band");
        // A room resumes its own tempo and bar, whatever main's flags say.
        let mut typed = flags();
        typed.bpm_on_command_line = true;
        typed.beats_per_bar_on_command_line = true;
        let r = resume_room(&state.rooms[0], typed, NOW);
        assert_eq!(r.timeline.bpm_milli, 96_000);
        assert_eq!(r.beats_per_bar, 7);
        assert!(!r.timeline.playing);
    }

    #[test]
    fn corrupt_and_absurd_files_are_refused_with_the_reason() {
        assert!(refused(b"").starts_with("not a conductor state file"));
        assert!(refused(b"{\"format\":1,\"bpm\":12").starts_with("not a conductor state file"));
        assert!(refused(&encode(&saved(), NOW)[..100]).starts_with("not a conductor state"));
        // JSON has no NaN; a string or null in its place is not a number either.
        assert!(refused(&with(|v| v["bpm"] = "NaN".into())).starts_with("not a conductor"));
        assert!(refused(&with(|v| v["bpm"] = serde_json::Value::Null)).starts_with("not a"));
        assert!(refused(&with(|v| v["bpm"] = 0.into())).contains("not a usable tempo"));
        assert!(refused(&with(|v| v["bpm"] = (-120).into())).contains("not a usable tempo"));
        assert!(refused(&with(|v| v["bpm"] = 1e308.into())).contains("not a usable tempo"));
        assert!(refused(&with(|v| v["bpm"] = 250.into())).contains("limits in force, 60 to 200"));
        assert!(refused(&with(|v| v["ppqn"] = 0.into())).contains("ppqn 0"));
        assert!(refused(&with(|v| v["beats_per_bar"] = 65.into())).contains("beats per bar"));
        assert!(refused(&with(|v| v["anchor"]["count"] = (1u64 << 60).into())).contains("2^53"));
        assert!(refused(&with(|v| v["anchor"]["unix_ns"] = 5.into())).contains("before 2020"));
        assert!(
            refused(&with(
                |v| v["anchor"]["unix_ns"] = (NOW + 3_600_000_000_000).into()
            ))
            .contains("3600 s in the future")
        );
        assert!(refused(&with(|v| v["anchor"]["unix_ns"] = (-1).into())).starts_with("not a"));
        assert!(refused(&with(|v| v["transport"]["state"] = "paused".into())).starts_with("not"));
        assert!(refused(&with(|v| v["transport"]["unix_ns"] = 7.into())).contains("transport"));
        assert!(refused(&with(|v| v["format"] = 2.into())).contains("format 2"));
        assert!(refused(&with(|v| v.as_object_mut().unwrap().clear())).starts_with("not a"));
    }

    #[test]
    fn unknown_fields_are_ignored_and_the_tempo_is_kept_to_the_thousandth() {
        let bytes = with(|v| {
            v["comment"] = "added by hand".into();
            v["bpm"] = 93.5004.into();
        });
        let p = decode(&bytes, limits(), NOW).unwrap();
        assert_eq!(p.timeline.bpm_milli, 93_500);
        // A cluster timeline older than transport_unix_ns saved 0: unknown, not invalid.
        let p = decode(
            &with(|v| v["transport"]["unix_ns"] = 0.into()),
            limits(),
            NOW,
        )
        .unwrap();
        assert_eq!(p.timeline.transport_unix_ns, 0);
    }

    #[test]
    fn a_resumed_timeline_goes_on_in_phase_with_its_transport() {
        let r = resume(&saved(), flags(), NOW);
        assert_eq!(r.timeline, saved().timeline);
        assert_eq!(
            r.beats_per_bar, 3,
            "the saved beats per bar, not the default"
        );
        assert!(!r.recounted);
        // Tick n is where it always was.
        let n = r.timeline.first_count_at_or_after(NOW);
        assert_eq!(
            r.timeline.unix_ns_of(n),
            saved().timeline.unix_ns_of(n),
            "count {n}"
        );
    }

    #[test]
    fn a_typed_bpm_takes_over_at_a_tick_of_the_saved_grid() {
        let f = ResumeFlags {
            bpm: Bpm::whole(90),
            bpm_on_command_line: true,
            beats_per_bar: 7,
            beats_per_bar_on_command_line: true,
            ..flags()
        };
        let r = resume(&saved(), f, NOW);
        let old = saved().timeline;
        let t = r.timeline;
        assert_eq!(t.bpm(), Bpm::whole(90));
        assert_eq!(r.beats_per_bar, 7);
        // The new anchor is a tick of the old grid, at least the margin ahead.
        assert_eq!(t.anchor_unix_ns, old.unix_ns_of(t.anchor_count));
        assert!(t.anchor_unix_ns >= NOW + RETEMPO_MARGIN_NS);
        assert!(t.anchor_unix_ns < NOW + RETEMPO_MARGIN_NS + 130_000_000);
        // The transport began before: it keeps its count and instant.
        assert_eq!(
            (t.transport_count, t.transport_unix_ns),
            (old.transport_count, old.transport_unix_ns)
        );
        // The same tempo typed again changes nothing.
        let same = ResumeFlags {
            bpm: Bpm::from_milli(119_875),
            bpm_on_command_line: true,
            ..flags()
        };
        assert_eq!(resume(&saved(), same, NOW).timeline, old);
    }

    #[test]
    fn another_ppqn_starts_a_new_count_keeping_tempo_and_transport_state() {
        let mut stopped = saved();
        stopped.timeline.playing = false;
        let r = resume(
            &stopped,
            ResumeFlags {
                ppqn: 24,
                ..flags()
            },
            NOW,
        );
        assert!(r.recounted);
        let t = r.timeline;
        assert_eq!((t.ppqn, t.anchor_count, t.bpm_milli), (24, 0, 119_875));
        assert!(!t.playing && !t.playing_before);
        assert!(t.anchor_unix_ns > NOW);
    }

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("conductor-state-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn load_resumes_a_good_file_and_keeps_a_bad_one_aside() {
        let dir = temp("load");
        let path = dir.join("state.json");
        assert!(matches!(load(&path, limits(), NOW), Loaded::Fresh));
        write_atomically(&path, &encode(&saved(), NOW)).unwrap();
        match load(&path, limits(), NOW) {
            Loaded::Resumed(p) => assert_eq!(p, saved()),
            other => panic!("{other:?}"),
        }
        fs::write(&path, b"{ torn").unwrap();
        match load(&path, limits(), NOW) {
            Loaded::KeptAside { kept_aside, .. } => {
                assert_eq!(kept_aside, dir.join("state.json.bad"));
                assert_eq!(fs::read(&kept_aside).unwrap(), b"{ torn");
                assert!(!path.exists());
            }
            other => panic!("{other:?}"),
        }
        // A second bad file does not overwrite the first.
        fs::write(&path, b"also bad").unwrap();
        match load(&path, limits(), NOW) {
            Loaded::KeptAside { kept_aside, .. } => {
                assert_eq!(kept_aside, dir.join("state.json.bad.1"))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(fs::read(dir.join("state.json.bad")).unwrap(), b"{ torn");
        // A directory where the file should be is unreadable as a file.
        fs::create_dir(&path).unwrap();
        assert!(matches!(
            load(&path, limits(), NOW),
            Loaded::KeptAside { .. }
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn atomic_writes_leave_no_temporary_file_and_replace_whole() {
        let dir = temp("atomic");
        let path = dir.join("s.json");
        write_atomically(&path, b"first").unwrap();
        write_atomically(&path, b"second, longer").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second, longer");
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["s.json"]);
        let missing = dir.join("no/such/dir/s.json");
        assert!(write_atomically(&missing, b"x").is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn one_server_at_a_time_holds_a_state_file() {
        let dir = temp("lock");
        let path = dir.join("s.json");
        let first = lock(&path);
        assert!(matches!(first, Locking::Held(_)));
        assert!(matches!(lock(&path), Locking::Busy));
        drop(first);
        assert!(matches!(lock(&path), Locking::Held(_)));
        assert!(matches!(
            lock(&dir.join("no/such/s.json")),
            Locking::Unavailable
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_writer_keeps_the_newest_state() {
        let dir = temp("writer");
        let path = dir.join("s.json");
        let clock = Clock::start();
        let mut w = StateWriter::start(path.clone(), saved(), clock, None).unwrap();
        let mut last = saved();
        for i in 0..100 {
            last.timeline.anchor_count = 2000 + i;
            w.save(last.clone());
        }
        w.stop();
        let on_disk = decode(&fs::read(&path).unwrap(), limits(), NOW).unwrap();
        assert_eq!(on_disk, last);
        assert!(StateWriter::start(dir.join("none/s.json"), saved(), clock, None).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
