//! What can go wrong in this crate, each saying what to do about it.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SyncError {
    #[error(
        "{0:?} is not a conductor WebSocket URL; expected ws://HOST:PORT/ws (wss:// is not supported: put a TLS terminator in front, or connect to the server directly)"
    )]
    BadUrl(String),
    #[error("expected a timeline event, got {0:?}")]
    NotATimeline(String),
    #[error("malformed timeline: {0}; is this a conductor server?")]
    BadTimeline(String),
    #[error("emulated clock: {0}")]
    BadClock(String),
    #[error(
        "no sync within {0:?}: is the server reachable, and does it speak conductor's protocol?"
    )]
    Timeout(std::time::Duration),
    #[error("not connected to the server right now (it reconnects by itself); try again shortly")]
    NotConnected,
    #[error("the follower thread has stopped: {0}")]
    Stopped(String),
    #[error("cannot start the follower thread: {0}")]
    Spawn(std::io::Error),
}
