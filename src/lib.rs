//! conductor: a drift-free tempo server that fans every tick out over WebSocket.
//!
//! ```text
//!                      commands (setBpm)            rtrb ring
//!   ┌───────────────┐ ◀──────────────────── ┌────────────────────────────────────────┐
//!   │ timing thread │                       │ event loop (mio::Poll, one thread)     │
//!   │ TickSchedule  │ ────────────────────▶ │  accept · HTTP (httparse) · /ws        │
//!   │ spin_sleep to │  TimingEvent ring     │  drain ticks → encode frame once →     │
//!   │ epoch + n·T   │  + mio::Waker         │  Arc<[u8]> into every OutQueue → write │
//!   └───────────────┘                       └───────────────┬────────────────────────┘
//!     SCHED_FIFO if allowed                                 │ tungstenite context per
//!                                                           ▼ connection (reads, pongs, close)
//!                                              Slab<Connection>: Http → Open → Closing → Done
//! ```
//!
//! * [`tempo`] is the pure tempo math: tick *n* is due at `anchor + floor(k · 60e9/(bpm·ppqn))`
//!   nanoseconds, so nothing accumulates.
//! * [`timing`] is the only thread that decides when a tick happens. It never touches a socket.
//! * [`server`] is the only thread that touches sockets. It never sleeps or computes tick times.
//! * [`protocol`] and [`http`] are pure encode/decode and routing; [`connection`] is one client's
//!   state machine; [`stats`] is what the loop measures and reports.

pub mod assets;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod engineio;
pub mod http;
pub mod protocol;
pub mod rt;
pub mod server;
pub mod session;
pub mod stats;
pub mod tempo;
pub mod timing;
pub mod transport;
