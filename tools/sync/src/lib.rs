//! conductor-sync: a native conductor client, the reference for every client that must play in
//! time with a conductor server (the probe's `--sync` mode, the MIDI/OSC bridge).
//!
//! ```text
//!   server ── ws ──▶ Follower thread ──────────────────────────▶ SyncReader::load()
//!   hello, timeline,  (mio poll; pings: 10/s for 10 s,   seqlock     any thread, real-time
//!   pong              then 4/s; reconnect w/ backoff)   of Copy     included: no lock, no
//!                     ClockSync (pure)  Timeline (pure)  SyncState   allocation
//! ```
//!
//! * [`Timeline`] is the server's `timeline` event and its tick arithmetic (the server's own):
//!   when tick *n* is due on the server's clock, and whether it plays.
//! * [`ClockSync`] is the clock estimator of `docs/protocol.md#clock-sync`: from ping/pong
//!   samples it keeps a [`ClockMapping`] between this device's clock and the server's (offset,
//!   rate, error bound), robust to jitter and bursts, slewed rather than stepped once settled.
//!   `www/conductor.js` implements the same description.
//! * [`LocalClock`] is where "now" comes from: [`RealClock`], or an [`EmulatedClock`] that is
//!   off by seconds and runs fast or slow, for tests and emulation.
//! * [`Follower`] runs a client on its own thread and publishes each new [`SyncState`]; a
//!   real-time thread reads the newest with [`SyncReader::load`].
//!
//! The planned local time of tick `n` is `mapping.to_local(timeline.tick_time_ns(n))`.
//!
//! ```no_run
//! use std::time::Duration;
//! use conductor_sync::{Follower, FollowerConfig, RealClock};
//!
//! let follower = Follower::start(FollowerConfig::new("ws://127.0.0.1:3000/ws"))?;
//! follower.wait_synced(Duration::from_secs(5))?;
//! let reader = follower.reader(); // move this into the real-time thread
//! let s = reader.load();
//! let (timeline, mapping) = (s.timeline.unwrap(), s.mapping.unwrap());
//! let now = RealClock.now_ns();
//! let next = timeline.first_count_at_or_after(mapping.to_server(now));
//! let due_local = mapping.to_local(timeline.tick_time_ns(next));
//! println!("tick {next} in {} µs", (due_local - now) / 1000);
//! # Ok::<(), conductor_sync::SyncError>(())
//! ```

mod clock;
mod error;
mod estimator;
mod follower;
mod state;
mod timeline;

pub use clock::{EmulatedClock, LocalClock, MAX_EMULATED_SKEW_PPM, RealClock};
pub use error::SyncError;
pub use estimator::{ClockMapping, ClockSync, ClockSyncConfig, Sample};
pub use follower::{Follower, FollowerConfig, Hello, ServerError};
pub use state::{SyncReader, SyncState};
pub use timeline::{Quantize, Tempo, Timeline, Transport, TransportState};
