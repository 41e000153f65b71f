//! The I/O layer: the reactor, the sockets' state machines, the fan-out with its pauses.
//!
//! ```text
//!   timing thread ──TimingEvent ring + Waker──▶ ┌──────────────── net::Server (one mio loop) ─┐
//!   (room_timing)  ◀──TimingCommand ring─────── │ drain ticks → hub.on_timing → fan-out jobs   │
//!                                               │ sockets: Slab<Socket> (connection.rs)        │
//!   cluster thread ──ClusterEvent ring──▶       │ sessions: Slab<EioSession> (eio.rs)          │
//!                  ◀──ClusterRequest ring──     │ hub: rooms, members, control (no I/O)        │
//!                                               └──────────────────────────────────────────────┘
//! ```
//!
//! The reactor owns every socket and carries out what the [`crate::hub`] decides. It never
//! sleeps, blocks or computes tick times. What it does is in an order that clients can rely on:
//!
//! * Ticks come first: the timing ring is drained before and between connection events, and a
//!   connection with more to read yields to a due tick instead of holding it back.
//! * A broadcast is a fan-out job, run by the loop itself, never from inside another handler.
//!   A job pauses every [`fanout::FANOUT_CHUNK`] members to serve what has arrived (pings above
//!   all); whatever the pause's handlers decide is carried out at once if it concerns one client
//!   (a reply, a pong) and queued as a job otherwise, to run after the current one. So every
//!   client gets its frames in order, and nothing runs recursively through the reactor.
//! * A pong is stamped as late as possible and flushed at once.
//! * Each broadcast is encoded at most once per protocol for its room; each close is counted
//!   once, when it happens.

mod cluster;
pub mod connection;
pub mod eio;
mod fanout;
pub mod heartbeat;
mod http;
mod reactor;
mod shards;
mod socketio;
mod ws;

pub use reactor::{Server, ServerError};
