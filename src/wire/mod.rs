//! The codecs: what bytes on the wire mean, both ways.
//!
//! Everything here is pure: bytes or text in, values out, and back. Nothing in `wire` holds a
//! socket, reads a clock or knows a client; the I/O layer feeds it what it read and writes
//! what it returns, and the hub decides what the values mean for the server.
//!
//! * [`http`]: one HTTP/1.1 request head (limits, routing, the WebSocket upgrade checks,
//!   CORS) and the responses.
//! * [`protocol`]: the JSON events of `/ws` (`tick`, `timeline`, `setBpm`, …), and the frames
//!   they are sent in.
//! * [`engineio`]: Engine.IO v4 and Socket.IO v5 packets, as the predecessor's clients speak
//!   them.

pub mod engineio;
pub mod http;
pub mod protocol;
