//! The follower's latest state, handed to real-time threads without locks or allocation.
//!
//! This module owns [`SyncState`] and the one-writer, many-reader sequence lock that publishes
//! it. The writer (the follower thread) bumps a sequence number to odd, stores the state as
//! plain atomic words, and bumps it to even; a reader copies the words and keeps the copy only
//! if the sequence number was even and unchanged around it. Readers never block, never wait for
//! the writer to finish anything but a store of some twenty words, and never allocate: a
//! MIDI-clock or audio callback may call [`SyncReader::load`] every period.
//!
//! Everything is stored through atomics, so there is no data race and no `unsafe`.

use std::hint;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering, fence};

use crate::estimator::ClockMapping;
use crate::timeline::{Tempo, Timeline, Transport, TransportState};

/// What a client knows at one moment. `Copy`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SyncState {
    /// The latest timeline (kept across reconnects: it stays right until the server changes it).
    pub timeline: Option<Timeline>,
    /// The latest clock mapping (kept across reconnects; the clock does not change with them).
    pub mapping: Option<ClockMapping>,
    /// Whether the connection is open now. While it is not, the timeline and mapping are the
    /// last ones known, and a tempo or transport change made meanwhile is not in them.
    pub connected: bool,
    /// Increases with every publication.
    pub version: u64,
    /// Connections opened so far (1 after the first).
    pub connects: u64,
}

impl SyncState {
    pub const EMPTY: SyncState = SyncState {
        timeline: None,
        mapping: None,
        connected: false,
        version: 0,
        connects: 0,
    };

    /// Both a timeline and a clock mapping are known.
    pub fn is_synced(&self) -> bool {
        self.timeline.is_some() && self.mapping.is_some()
    }

    /// The local instant at which tick `count` is due, if synced.
    pub fn tick_local_ns(&self, count: u64) -> Option<i64> {
        let (t, m) = (self.timeline?, self.mapping?);
        Some(m.to_local(t.tick_time_ns(count)))
    }

    /// The first tick due at or after local time `local_ns`, if synced.
    pub fn first_count_at_or_after_local(&self, local_ns: i64) -> Option<u64> {
        let (t, m) = (self.timeline?, self.mapping?);
        Some(t.first_count_at_or_after(m.to_server(local_ns)))
    }
}

const WORDS: usize = 20;

// Flag bits of word 0.
const HAS_TIMELINE: u64 = 1;
const HAS_MAPPING: u64 = 1 << 1;
const CONNECTED: u64 = 1 << 2;
const HAS_EARLIER: u64 = 1 << 3;
const PLAYING: u64 = 1 << 4;
const PLAYING_BEFORE: u64 = 1 << 5;
const SETTLED: u64 = 1 << 6;

fn put_tempo(w: &mut [u64], t: Tempo) {
    w[0] = t.count;
    w[1] = t.time_ns as u64;
    w[2] = (u64::from(t.bpm_milli) << 32) | u64::from(t.ppqn);
}

fn get_tempo(w: &[u64]) -> Tempo {
    Tempo {
        count: w[0],
        time_ns: w[1] as i64,
        bpm_milli: (w[2] >> 32) as u32,
        ppqn: w[2] as u32,
    }
}

fn encode(s: &SyncState) -> [u64; WORDS] {
    let mut w = [0u64; WORDS];
    let mut flags = 0;
    if s.connected {
        flags |= CONNECTED;
    }
    w[1] = s.version;
    w[2] = s.connects;
    if let Some(t) = s.timeline {
        flags |= HAS_TIMELINE;
        put_tempo(&mut w[3..6], t.tempo());
        if let Some(e) = t.earlier_tempo() {
            flags |= HAS_EARLIER;
            put_tempo(&mut w[6..9], e);
        }
        w[9] = u64::from(t.beats_per_bar());
        let tr = t.transport();
        if tr.state == TransportState::Playing {
            flags |= PLAYING;
        }
        if tr.before == TransportState::Playing {
            flags |= PLAYING_BEFORE;
        }
        w[10] = tr.count;
        w[11] = tr.time_ns as u64;
    }
    if let Some(m) = s.mapping {
        flags |= HAS_MAPPING;
        if m.settled {
            flags |= SETTLED;
        }
        w[12] = m.anchor_ns as u64;
        w[13] = m.offset_ns as u64;
        w[14] = m.rate.to_bits();
        w[15] = m.residual_ns as u64;
        w[16] = m.slew_ns as u64;
        w[17] = m.error_bound_ns as u64;
        w[18] = m.min_rtt_ns as u64;
        w[19] = u64::from(m.samples);
    }
    w[0] = flags;
    w
}

fn decode(w: &[u64; WORDS]) -> SyncState {
    let flags = w[0];
    let state = |bit| {
        if flags & bit != 0 {
            TransportState::Playing
        } else {
            TransportState::Stopped
        }
    };
    let timeline = (flags & HAS_TIMELINE != 0).then(|| {
        let mut t = Timeline::new(
            get_tempo(&w[3..6]),
            w[9] as u32,
            Transport {
                state: state(PLAYING),
                count: w[10],
                time_ns: w[11] as i64,
                before: state(PLAYING_BEFORE),
            },
        );
        if flags & HAS_EARLIER != 0 {
            t.set_earlier(Some(get_tempo(&w[6..9])));
        }
        t
    });
    let mapping = (flags & HAS_MAPPING != 0).then(|| ClockMapping {
        anchor_ns: w[12] as i64,
        offset_ns: w[13] as i64,
        rate: f64::from_bits(w[14]),
        residual_ns: w[15] as i64,
        slew_ns: w[16] as i64,
        error_bound_ns: w[17] as i64,
        min_rtt_ns: w[18] as i64,
        samples: w[19] as u32,
        settled: flags & SETTLED != 0,
    });
    SyncState {
        timeline,
        mapping,
        connected: flags & CONNECTED != 0,
        version: w[1],
        connects: w[2],
    }
}

struct Cell {
    seq: AtomicU64,
    words: [AtomicU64; WORDS],
}

/// The writing end: exactly one, on the follower thread.
pub(crate) struct StatePublisher {
    cell: Arc<Cell>,
}

/// A reading end: clone one for every thread that reads. [`SyncReader::load`] never blocks or
/// allocates.
#[derive(Clone)]
pub struct SyncReader {
    cell: Arc<Cell>,
}

/// A publisher and its first reader, holding [`SyncState::EMPTY`].
pub(crate) fn channel() -> (StatePublisher, SyncReader) {
    let cell = Arc::new(Cell {
        seq: AtomicU64::new(0),
        words: std::array::from_fn(|_| AtomicU64::new(0)),
    });
    let publisher = StatePublisher {
        cell: Arc::clone(&cell),
    };
    publisher.publish(&SyncState::EMPTY);
    (publisher, SyncReader { cell })
}

impl StatePublisher {
    pub(crate) fn publish(&self, state: &SyncState) {
        let words = encode(state);
        let seq = self.cell.seq.load(Ordering::Relaxed);
        self.cell.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        // Orders the odd sequence number before the stores below, for any reader that sees
        // one of them.
        fence(Ordering::Release);
        for (slot, w) in self.cell.words.iter().zip(words) {
            slot.store(w, Ordering::Relaxed);
        }
        self.cell.seq.store(seq.wrapping_add(2), Ordering::Release);
    }
}

impl SyncReader {
    /// The latest published state: lock-free and allocation-free. It retries only while the
    /// follower is in the middle of storing a new state (a few nanoseconds, at most a few
    /// times a second).
    pub fn load(&self) -> SyncState {
        loop {
            let before = self.cell.seq.load(Ordering::Acquire);
            if before & 1 == 1 {
                hint::spin_loop();
                continue;
            }
            let mut words = [0u64; WORDS];
            for (w, slot) in words.iter_mut().zip(&self.cell.words) {
                *w = slot.load(Ordering::Relaxed);
            }
            fence(Ordering::Acquire);
            if self.cell.seq.load(Ordering::Relaxed) == before {
                return decode(&words);
            }
            hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample_state(version: u64) -> SyncState {
        let old = Timeline::from_event(&json!({
            "count": 10, "time_us": 1_700_000_000_000_000u64, "bpm": 120, "ppqn": 4,
            "beats_per_bar": 3, "transport": {"state": "playing", "count": 0, "time_us": 0}
        }))
        .unwrap();
        let new = Timeline::from_event(&json!({
            "count": 40, "time_us": 1_700_000_003_750_000u64, "bpm": 92.5, "ppqn": 4,
            "beats_per_bar": 3, "transport": {"state": "stopped", "count": 48, "time_us": 1_700_000_004_000_000u64}
        }))
        .unwrap();
        SyncState {
            timeline: Some(old.followed_by(new)),
            mapping: Some(ClockMapping {
                // Every word differs between versions, so a torn read cannot pass for a whole one.
                residual_ns: -(version as i64),
                slew_ns: 1_234_000 + version as i64,
                error_bound_ns: 567 + version as i64,
                min_rtt_ns: 89_000 + version as i64,
                samples: version as u32,
                ..ClockMapping::fixed(
                    -(version as i64),
                    1_700_000_000_000_000_000 + version as i64,
                    -123.456 + version as f64,
                )
            }),
            connected: true,
            version,
            connects: 3,
        }
    }

    #[test]
    fn states_survive_the_words() {
        let s = sample_state(7);
        assert_eq!(decode(&encode(&s)), s);
        assert_eq!(decode(&encode(&SyncState::EMPTY)), SyncState::EMPTY);
        let (publisher, reader) = channel();
        assert_eq!(reader.load(), SyncState::EMPTY);
        publisher.publish(&s);
        assert_eq!(reader.clone().load(), s);
    }

    #[test]
    fn readers_never_see_a_torn_state() {
        let (publisher, reader) = channel();
        let states: Vec<SyncState> = (1..=2000).map(sample_state).collect();
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let reader = reader.clone();
                let states = states.clone();
                std::thread::spawn(move || {
                    let mut last = 0;
                    for _ in 0..200_000 {
                        let s = reader.load();
                        if s.version == 0 {
                            continue;
                        }
                        // Whole, and never older than one seen before.
                        assert_eq!(s, states[s.version as usize - 1]);
                        assert!(s.version >= last);
                        last = s.version;
                    }
                })
            })
            .collect();
        for s in &states {
            publisher.publish(s);
        }
        for r in readers {
            r.join().unwrap();
        }
    }
}
