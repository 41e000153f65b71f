//! conductor: a drift-free tempo server that fans every tick out over WebSocket.
//!
//! ```text
//!                      commands (setBpm, Adopt)     rtrb ring
//!   ┌───────────────┐ ◀──────────────────── ┌────────────────────────────────────────┐
//!   │ timing thread │                       │ event loop (mio::Poll, one thread)     │
//!   │ TickSchedule  │ ────────────────────▶ │  accept · HTTP (httparse) · /ws ·      │
//!   │ spin_sleep to │  TimingEvent ring     │  /socket.io/ (websocket + polling)     │
//!   │ epoch + n·T   │  + mio::Waker         │  drain ticks → encode once per         │
//!   └───────────────┘                       │  protocol → Arc<[u8]> into every       │
//!     SCHED_FIFO if allowed                 │  OutQueue / polling session → write    │
//!                                           └───────▲───────────────┬────────────────┘
//!   ┌────────────────┐  ClusterEvent ring + Waker   │               │ tungstenite context per
//!   │ cluster thread │ ─────────────────────────────┘               ▼ connection (reads, close)
//!   │ (--cluster):   │ ◀── ClusterRequest ring ──   Slab<Connection>: Http → Open → Closing → Done
//!   │ Redis, sync API│                                     └─ Parked (a long-poll GET)
//!   └────────────────┘                              Slab<PollSession>: Socket.IO long-polling
//! ```
//!
//! * [`tempo`] is the pure tempo math: tick *n* is due at `anchor + floor(k · 60e9/(bpm·ppqn))`
//!   nanoseconds, so nothing accumulates. [`transport`] is the pure start/stop rule.
//! * [`timing`] is the only thread that decides when a tick happens. It never touches a socket.
//! * With `--threads N` there are N event loops, *shards*, each owning a share of the sockets:
//!   each turns its own copy of the timing stream into its members' frames ([`shard_rooms`]),
//!   and the hub stays in one place behind one lock (`net::shards`, docs/architecture.md).
//! * [`server`] is the only thread that touches client sockets. It never sleeps or computes tick
//!   times; it keeps a copy of the schedule to tell clients the timeline.
//! * [`protocol`], [`engineio`] and [`http`] are pure encode/decode and routing; [`connection`]
//!   is one socket's state machine and [`session`] one long-polling client's; [`stats`] is what
//!   the loop measures and reports.
//! * [`cluster`] exists only with `--cluster`: a thread that shares the timeline with other
//!   instances through Redis and hands the loop timelines to adopt.
//! * [`state`] keeps tempo, transport and timeline across a restart: the loop hands each change
//!   to a writer thread, which writes the state file atomically.
//! * [`page_worker`] is a thread for the HTTP answers too slow for the loop: `--www` files
//!   ([`www`]) and QR codes ([`join`], which also finds the LAN addresses phones join at).

pub mod assets;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod deadlines;
pub mod hub;
pub mod join;
pub mod lead;
pub mod metrics;
pub mod net;
pub mod page_worker;
pub mod room;
pub mod room_timing;
pub mod rt;
pub mod shard_rooms;
pub mod state;
pub mod stats;
pub mod tempo;
pub mod tick_choice;
pub mod timeline;
pub mod transport;
pub mod wire;
pub mod www;

// The codecs moved under `wire`, the connection under `net`; their old paths stay valid.
pub use net::connection;
pub use wire::{engineio, http, protocol};
