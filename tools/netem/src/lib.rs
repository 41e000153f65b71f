//! conductor-netem: a TCP proxy that emulates network paths, for rehearsing with conductor
//! ("what does a 150 ms path do to us?") and for measuring clients against the truth.
//!
//! ```text
//!   client ──▶ :9001 ─ up: delay ± jitter, stalls ─▶ upstream (conductor)
//!          ◀──        ◀─ down: delay ± jitter, stalls ─
//! ```
//!
//! * [`profile`] is the path model and its text syntax, with the presets (`lan`, `city`,
//!   `continent`, `intercontinental`, `mobile`, `asymmetric`).
//! * [`delay`] decides when each chunk leaves: jitter drawn per chunk, never overtaking the
//!   chunk ahead (TCP order), stalls with a probability per chunk. Pure and seeded.
//! * [`proxy`] owns the sockets and threads: kernel receive timestamps in, sleep-then-spin
//!   until each departure, write.
//! * [`calibrate`] measures what the emulator adds beyond the delays it was asked for.
//!
//! Linux has `tc netem` for this, but not every kernel (this project's VM has none) and not
//! without root; this works anywhere, per port, as a user.

pub mod calibrate;
pub mod delay;
pub mod profile;
pub mod proxy;

use std::net::SocketAddr;

use thiserror::Error;

pub use profile::{Burst, Direction, Distribution, Profile};
pub use proxy::{PathConfig, PathHandle, PathStats, spawn};

#[derive(Debug, Error)]
pub enum NetemError {
    #[error("bad profile: {0}")]
    Profile(String),
    #[error(
        "bad --path {0:?}: write [ADDR:]PORT=PROFILE, e.g. 9001=city or 9002=up=20ms,down=100ms"
    )]
    PathSpec(String),
    #[error("cannot listen on {0}: {1} (is the port taken? use another, or 0 for any)")]
    Bind(SocketAddr, std::io::Error),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("{0}")]
    Io(String),
}
