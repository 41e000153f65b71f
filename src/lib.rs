//! conductor: a drift-free tempo server that fans every tick out over WebSocket and Socket.IO,
//! to many rooms, each with its own tempo and transport.
//!
//! ```text
//!                 TimingCommand ring (from the hub)
//!   ┌───────────────────┐ ◀────────────────────── ┌──────────────────────────────────────┐
//!   │ timing thread     │                         │ hub (one, behind one lock): rooms,   │
//!   │ (room_timing):    │                         │ members, control, timeline::plan     │
//!   │ every room's      │                         └──────▲───────────────────────────────┘
//!   │ TickSchedule in a │                                │ join · leave · control (never per tick)
//!   │ DeadlineHeap;     │  one ordered TimingEvent       │
//!   │ spin_sleep to     │  ring + mio::Waker per shard ┌─┴────────────────────────────────────┐
//!   │ anchor + n·T      │ ───────────────────────────▶ │ shard 0 … N−1 (net::reactor, mio):   │
//!   └───────────────────┘                              │ sockets, HTTP, /ws, /socket.io/,     │
//!     SCHED_FIFO if allowed                            │ ShardRooms → fan-out, encoded once   │
//!                                                      └──────────────────────────────────────┘
//!   cluster thread (--cluster, Redis) · state writer (--state) · page worker: rings + wakers
//! ```
//!
//! * [`tempo`] is the pure tempo math: tick *n* is due at `anchor + floor(k · 60e9/(bpm·ppqn))`
//!   nanoseconds, so nothing accumulates. [`transport`] is the pure start/stop rule, and
//!   [`timeline`]'s `plan` the one rule for what a tempo or transport change means and when it
//!   lands (a [`lead`] ahead).
//! * [`room_timing`] is the only thread that decides when a tick happens, for every room. It
//!   never touches a socket, allocates, locks or logs on the tick path.
//! * [`hub`] is the core without I/O: rooms ([`room`]), members, who may conduct, what a client
//!   is told; it takes `now` and returns effects. [`tick_choice`] is which ticks a client takes.
//! * [`net`] is the only layer that touches client sockets: with `--threads N` there are N event
//!   loops, *shards*, each owning a share of the sockets and turning its own copy of the timing
//!   stream into its members' frames ([`shard_rooms`]); the hub stays in one place behind one
//!   lock (`net::shards`, docs/architecture.md).
//! * [`wire`] is pure encode/decode and routing (`protocol`, `engineio`, `http`); [`stats`] is
//!   what the loops count and [`metrics`] the one table `/stats` and `/metrics` render.
//! * [`cluster`] exists only with `--cluster`: a thread that shares each room's timeline with
//!   other instances through Redis, one key per room.
//! * [`state`] keeps every room's tempo, transport and timeline across a restart: the loop hands
//!   each change to a writer thread, which writes the state file atomically.
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
