//! One client connection: a small state machine that owns its socket and buffers.
//!
//! ```text
//!   Http ──upgrade──▶ Open ──close──▶ Closing ──EOF/deadline──▶ Done
//!     ├────────response────────────────▲
//!     └──park──▶ Parked ──response─────┘      (a Socket.IO long-poll GET waiting for packets)
//! ```
//!
//! The connection reads and writes its own socket, and knows the WebSocket protocol through
//! tungstenite's [`WebSocketContext`] (frame parsing, size and UTF-8 checks, ping replies and
//! the close handshake). It does not know what messages mean, what the tempo is, or who else is
//! connected: the event loop decides that and tells it what to send.
//!
//! Outgoing bytes live in an [`OutQueue`] of shared frames. A tick's frame is encoded once and
//! the same `Arc` sits in every connection's queue; tungstenite's own writes (pongs, close
//! frames) are appended to the same queue through [`WsIo`], so one frame always finishes before
//! the next begins, whoever wrote it.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use tungstenite::Message;
use tungstenite::error::{Error as WsError, ProtocolError};
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};

use crate::http::{self, HttpError, Request};
use crate::protocol::SharedFrame;
use crate::stats::{ClientKind, CloseReason};

/// How long a closing connection may take to flush and say goodbye.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// tungstenite's read buffer, allocated at the upgrade, and the most it reads per system call
/// (tungstenite 0.30: `in_buf_max_read`; a longer frame reserves its full length first and is
/// read in chunks of this size). Client messages are tiny: a clock-sync ping with its frame
/// header is about 50 bytes, one read. At 1,024 this buffer was 56% of a client's memory
/// (bench/results/memory.md); at 64 a rare long message (a `setBpm` with a token, up to
/// `--max-message-bytes`) costs a few more reads, and a client costs 960 bytes less.
const WS_READ_BUFFER: usize = 64;
/// Reads of discarded input per readiness event for a closing connection (64 KiB), so a peer
/// that keeps sending cannot hold the loop.
const DRAIN_READS: usize = 16;
/// How many queued frames one `writev` hands to the kernel.
const WRITEV_FRAMES: usize = 32;
/// The kernel send buffer asked for a WebSocket client (the kernel doubles it). Autotuned, it
/// grows to hundreds of KiB for a client that never reads; ticks need a few KiB in flight.
const WS_SEND_BUFFER: libc::c_int = 16 * 1024;
/// How long a client's unacknowledged bytes may sit without falling before it is closed as a
/// slow consumer ([`StallWatch`]).
pub const STALLED_AFTER: Duration = Duration::from_secs(5);

/// Per-connection message rate limit over one-second windows.
#[derive(Clone, Copy, Debug)]
pub struct RateLimit {
    per_sec: u32,
    window_start: Option<Instant>,
    count: u32,
}

/// What to do with one incoming message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rate {
    Allow,
    /// Over the limit: drop it, and tell the client (once per window, when `warn`).
    Refuse {
        warn: bool,
    },
    /// Ten times over: close with 1008.
    Close,
}

impl RateLimit {
    /// How far over the limit a client may go before it is closed.
    pub const CLOSE_FACTOR: u32 = 10;

    pub fn new(per_sec: u32) -> RateLimit {
        RateLimit {
            per_sec,
            window_start: None,
            count: 0,
        }
    }

    pub fn check(&mut self, now: Instant) -> Rate {
        match self.window_start {
            Some(start) if now.duration_since(start) < Duration::from_secs(1) => {}
            _ => {
                self.window_start = Some(now);
                self.count = 0;
            }
        }
        self.count = self.count.saturating_add(1);
        if self.count <= self.per_sec {
            Rate::Allow
        } else if self.count > self.per_sec.saturating_mul(Self::CLOSE_FACTOR) {
            Rate::Close
        } else {
            Rate::Refuse {
                warn: self.count == self.per_sec + 1,
            }
        }
    }
}

/// Frames waiting to be written, the first possibly part-written.
#[derive(Debug, Default)]
pub struct OutQueue {
    frames: VecDeque<SharedFrame>,
    /// Bytes of the front frame already written.
    offset: usize,
    /// Leading frames that are not WebSocket messages (an HTTP response), left out of the
    /// completed-frame count.
    uncounted: usize,
}

/// Whether the socket took everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flushed {
    All,
    /// The kernel's buffer is full; wait for a writable event.
    Blocked,
}

impl OutQueue {
    pub fn push(&mut self, frame: SharedFrame) {
        if !frame.is_empty() {
            self.frames.push_back(frame);
        }
    }

    /// Queues bytes that are not a WebSocket message (an HTTP response or the 101).
    pub fn push_uncounted(&mut self, bytes: SharedFrame) {
        if !bytes.is_empty() {
            self.uncounted += 1;
            self.frames.push_back(bytes);
        }
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Discards every frame not yet started, keeping a part-written one so the stream stays a
    /// valid sequence of frames.
    pub fn drop_unstarted(&mut self) {
        let keep = usize::from(self.offset > 0).min(self.frames.len());
        self.frames.truncate(keep);
        self.uncounted = self.uncounted.min(keep);
    }

    /// Writes as much as `w` takes. Returns whether it drained, and how many frames completed.
    pub fn write_to<W: Write>(&mut self, w: &mut W) -> io::Result<(Flushed, u64)> {
        let mut completed = 0;
        while !self.frames.is_empty() {
            let mut slices = [IoSlice::new(&[]); WRITEV_FRAMES];
            let mut n = 0;
            for (i, frame) in self.frames.iter().take(WRITEV_FRAMES).enumerate() {
                let start = if i == 0 { self.offset } else { 0 };
                slices[i] = IoSlice::new(&frame[start..]);
                n += 1;
            }
            let mut written = match w.write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => written,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok((Flushed::Blocked, completed));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            while written > 0 {
                let Some(front) = self.frames.front() else {
                    break;
                };
                let left = front.len() - self.offset;
                if written >= left {
                    written -= left;
                    self.offset = 0;
                    self.frames.pop_front();
                    if self.uncounted > 0 {
                        self.uncounted -= 1;
                    } else {
                        completed += 1;
                    }
                } else {
                    self.offset += written;
                    written = 0;
                }
            }
        }
        Ok((Flushed::All, completed))
    }
}

/// The socket as tungstenite sees it: reads come from the network, writes go to the queue.
struct WsIo<'a> {
    sock: &'a mut TcpStream,
    out: &'a mut OutQueue,
    /// Set when the next pong tungstenite writes is to be dropped: it answers a ping the rate
    /// limit refused.
    drop_pong: &'a mut bool,
}

/// The first byte of an unmasked, final pong frame: the only pongs tungstenite writes are its
/// automatic answers to pings (the server never sends one of its own).
const PONG_FRAME_START: u8 = 0x8A;

impl Read for WsIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.read(buf)
    }
}

impl Write for WsIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // With a write buffer of 0, tungstenite hands over each frame in one write.
        if *self.drop_pong && buf.first() == Some(&PONG_FRAME_START) {
            *self.drop_pong = false;
            return Ok(buf.len());
        }
        self.out.push(Arc::from(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where a connection is in its life.
pub enum State {
    /// Reading the HTTP request head.
    Http { head: Vec<u8> },
    /// A WebSocket client: ticks flow.
    Open { ws: Box<WebSocketContext> },
    /// A long-poll GET held until its session has packets (the loop answers it with
    /// [`Connection::answer_parked`]), or until `until`, a backstop the session's heartbeat
    /// never lets pass. `keep_alive`: the client lets the connection serve its next request.
    Parked { until: Instant, keep_alive: bool },
    /// Flushing what is queued, then half-closing and waiting for the peer's EOF.
    Closing { until: Instant, write_shut: bool },
    /// Finished; the loop drops it.
    Done,
}

fn closing(now: Instant) -> State {
    State::Closing {
        until: now + CLOSE_GRACE,
        write_shut: false,
    }
}

/// The result of reading an HTTP request head.
pub enum HeadRead {
    Pending,
    Request(Request),
    Invalid(HttpError),
    /// The peer went away before sending a request.
    Gone,
}

/// The result of reading WebSocket input.
pub enum WsRead {
    Message(Message),
    /// Nothing more to read for now.
    Pending,
    /// The connection is over (already moved to `Closing` or `Done`).
    Ended(CloseReason),
}

pub struct Connection {
    sock: TcpStream,
    pub peer: SocketAddr,
    state: State,
    out: OutQueue,
    /// When the connection was accepted (for the handshake timeout).
    pub accepted: Instant,
    /// Why a WebSocket client stopped being one; set when it leaves `Open`, until taken.
    close_reason: Option<CloseReason>,
    /// Limits how many messages this client may send.
    pub rate: RateLimit,
    /// What this connection counts as in the stats, once it counts as a client at all.
    pub counted: Option<ClientKind>,
    /// For a parked long-poll GET: the polling session it waits for.
    pub parked_for: Option<usize>,
    /// For a request parked while the page worker makes its answer: the worker's ticket.
    pub page_ticket: Option<u64>,
    /// Requests answered on this connection under keep-alive: once one has been, waiting for
    /// the next is idling, not a slow handshake.
    served: u64,
    /// The pong for the ping just read is not to be sent (see [`Self::refuse_pong`]).
    drop_pong: bool,
    /// Whether the bytes the kernel holds unsent for this client are going anywhere.
    stall: StallWatch,
    /// The peer stopped reading: if it has not finished closing by the deadline, the socket
    /// is reset rather than closed, so the kernel does not keep its unsent bytes for minutes.
    reset_on_drop: bool,
}

/// Watches the bytes the kernel holds for a client without having been able to send them
/// (`SIOCOUTQNSD`), sampled now and then. Ticks are far too few bytes to fill any link, so
/// for a client that reads there are none, or they fall by the next sample; for one that
/// stopped reading (its receive window shut) or vanished (no acknowledgements) they stay or
/// grow. Pure, over samples given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StallWatch {
    /// The last sample, and since when none has fallen below the one before.
    last: u32,
    since: Option<Instant>,
}

impl StallWatch {
    /// Takes a sample of unsent bytes; true when they have been above zero without ever
    /// falling for `after`.
    pub fn sample(&mut self, unsent: u32, now: Instant, after: Duration) -> bool {
        let stuck = unsent > 0 && unsent >= self.last;
        self.last = unsent;
        if !stuck {
            self.since = None;
            return false;
        }
        let since = *self.since.get_or_insert(now);
        now.duration_since(since) >= after
    }
}

impl Connection {
    pub fn new(sock: TcpStream, peer: SocketAddr, now: Instant, rate: RateLimit) -> Connection {
        Connection {
            sock,
            peer,
            state: State::Http { head: Vec::new() },
            out: OutQueue::default(),
            accepted: now,
            close_reason: None,
            rate,
            counted: None,
            parked_for: None,
            page_ticket: None,
            served: 0,
            drop_pong: false,
            stall: StallWatch::default(),
            reset_on_drop: false,
        }
    }

    pub fn socket(&mut self) -> &mut TcpStream {
        &mut self.sock
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open { .. })
    }

    /// Whether broadcasts reach this connection: an open WebSocket (which clients the reactor
    /// sends them to is its business).
    pub fn takes_broadcasts(&self) -> bool {
        self.is_open()
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    pub fn queued(&self) -> usize {
        self.out.len()
    }

    /// Why this connection stopped being a WebSocket client, handed out once so the caller
    /// counts each close exactly once, at the moment it happens.
    pub fn take_close_reason(&mut self) -> Option<CloseReason> {
        self.close_reason.take()
    }

    /// Leaves `Open` (or any state) for `next`, remembering why a client ended.
    fn end(&mut self, next: State, reason: CloseReason) {
        if self.is_open() {
            self.close_reason = Some(reason);
        }
        self.state = next;
    }

    /// Reads until the request head and its body are complete or the socket is drained.
    pub fn read_head(&mut self) -> HeadRead {
        let State::Http { head } = &mut self.state else {
            return HeadRead::Pending;
        };
        let mut buf = [0u8; 2048];
        loop {
            match http::parse_request(head) {
                Ok(Some(mut req)) if head.len() >= req.head_len + req.body_len => {
                    req.body = head[req.head_len..req.head_len + req.body_len].to_vec();
                    return HeadRead::Request(req);
                }
                Ok(Some(_)) => {}
                Ok(None) => {}
                Err(e) => return HeadRead::Invalid(e),
            }
            match self.sock.read(&mut buf) {
                Ok(0) => return HeadRead::Gone,
                Ok(n) => head.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return HeadRead::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return HeadRead::Gone,
            }
        }
    }

    /// Holds a long-poll GET open until the loop answers it with [`Self::respond`].
    pub fn park(&mut self, session: usize, until: Instant, keep_alive: bool) {
        self.parked_for = Some(session);
        self.state = State::Parked { until, keep_alive };
    }

    /// Holds a request while the page worker makes its answer (a `--www` file, a QR code);
    /// the loop answers it with [`Self::answer_page`].
    pub fn park_for_page(&mut self, ticket: u64, until: Instant, keep_alive: bool) {
        self.page_ticket = Some(ticket);
        self.state = State::Parked { until, keep_alive };
    }

    /// Queues the page worker's answer, already whole: the head says `Connection: keep-alive`
    /// exactly when the request allowed it, and the body is shared, not copied.
    pub fn answer_page(&mut self, head: SharedFrame, body: Option<SharedFrame>, now: Instant) {
        let keep_alive = self.parked_keep_alive();
        self.page_ticket = None;
        self.out.push_uncounted(head);
        if let Some(body) = body {
            self.out.push_uncounted(body);
        }
        if keep_alive {
            self.accepted = now;
            self.served += 1;
            self.state = State::Http { head: Vec::new() };
        } else {
            self.state = closing(now);
        }
    }

    /// Whether the parked request may keep its connection open after the answer.
    pub fn parked_keep_alive(&self) -> bool {
        matches!(
            self.state,
            State::Parked {
                keep_alive: true,
                ..
            }
        )
    }

    /// Answers a parked long-poll; `response` must say `Connection: keep-alive` exactly when
    /// [`Self::parked_keep_alive`] does.
    pub fn answer_parked(&mut self, response: Vec<u8>, now: Instant) {
        if self.parked_keep_alive() {
            self.respond_and_continue(response, 0, now);
        } else {
            self.respond(response, now);
        }
    }

    /// Queues a response and goes back to reading the next request on the same connection
    /// (HTTP keep-alive, for long-polling clients that poll many times a second). The first
    /// `consumed` bytes of the input were this request; what follows is the next one. The
    /// handshake timeout starts again, as an idle timeout.
    pub fn respond_and_continue(&mut self, response: Vec<u8>, consumed: usize, now: Instant) {
        self.parked_for = None;
        let rest = match &mut self.state {
            State::Http { head } => head.split_off(consumed.min(head.len())),
            _ => Vec::new(),
        };
        self.out.push_uncounted(response.into());
        self.accepted = now;
        self.served += 1;
        self.state = State::Http { head: rest };
    }

    /// Queues a plain HTTP response and starts closing.
    pub fn respond(&mut self, response: Vec<u8>, now: Instant) {
        self.parked_for = None;
        self.out.push_uncounted(response.into());
        self.state = closing(now);
    }

    /// Completes a WebSocket upgrade: queues the 101 and hands any bytes that followed the
    /// request head to the protocol.
    pub fn upgrade(&mut self, response: Vec<u8>, head_len: usize, max_message_bytes: usize) {
        let State::Http { head } = &mut self.state else {
            return;
        };
        let leftover = head.split_off(head_len.min(head.len()));
        let config = WebSocketConfig::default()
            .read_buffer_size(WS_READ_BUFFER)
            .write_buffer_size(0)
            .max_message_size(Some(max_message_bytes))
            .max_frame_size(Some(max_message_bytes));
        let ws = WebSocketContext::from_partially_read(leftover, Role::Server, Some(config));
        // Best effort: with the autotuned size a client that never reads only costs more.
        let _ = set_send_buffer(&self.sock, WS_SEND_BUFFER);
        self.out.push_uncounted(response.into());
        self.state = State::Open { ws: Box::new(ws) };
    }

    /// Reads the next WebSocket message. Protocol violations close the connection with the
    /// matching code, through tungstenite's own checks. A client whose replies (pongs, errors)
    /// pile up `limit` deep because it does not read them is closed as a slow consumer.
    pub fn read_ws(&mut self, now: Instant, limit: usize) -> WsRead {
        loop {
            let State::Open { ws } = &mut self.state else {
                return WsRead::Pending;
            };
            let mut io = WsIo {
                sock: &mut self.sock,
                out: &mut self.out,
                drop_pong: &mut self.drop_pong,
            };
            let err = match ws.read(&mut io) {
                Ok(message) => {
                    if self.out.len() >= limit {
                        let _ = self.out.write_to(&mut self.sock);
                        if self.out.len() >= limit {
                            self.close_ws(
                                CloseCode::Policy,
                                "too slow: not reading replies",
                                CloseReason::SlowConsumer,
                                now,
                            );
                            return WsRead::Ended(CloseReason::SlowConsumer);
                        }
                    }
                    return WsRead::Message(message);
                }
                Err(e) => e,
            };
            let (code, reason) = match err {
                WsError::Io(e) if e.kind() == io::ErrorKind::WouldBlock => return WsRead::Pending,
                WsError::Io(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The close handshake finished: tungstenite queued its reply already.
                WsError::ConnectionClosed | WsError::AlreadyClosed => {
                    self.end(closing(now), CloseReason::ClientClosed);
                    return WsRead::Ended(CloseReason::ClientClosed);
                }
                WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
                    self.end(State::Done, CloseReason::ClientClosed);
                    return WsRead::Ended(CloseReason::ClientClosed);
                }
                WsError::Io(_) => {
                    self.end(State::Done, CloseReason::IoError);
                    return WsRead::Ended(CloseReason::IoError);
                }
                WsError::Capacity(_) => (CloseCode::Size, CloseReason::MessageTooBig),
                WsError::Utf8(_) => (CloseCode::Invalid, CloseReason::InvalidUtf8),
                _ => (CloseCode::Protocol, CloseReason::ProtocolError),
            };
            let text = match reason {
                CloseReason::MessageTooBig => "message too big",
                CloseReason::InvalidUtf8 => "invalid UTF-8",
                _ => "protocol error",
            };
            self.close_ws(code, text, reason, now);
            return WsRead::Ended(reason);
        }
    }

    /// Drops the pong tungstenite queued for the ping just read: the rate limit refused that
    /// ping, and a refused message gets no answer, pings included.
    pub fn refuse_pong(&mut self) {
        self.drop_pong = true;
    }

    /// Samples what the kernel holds unsent for this client (`SIOCOUTQNSD`) and closes it as
    /// a slow consumer (1008) when that has not fallen for [`STALLED_AFTER`]: a client that
    /// stopped reading is found in seconds, not once its buffers and ours are full. Returns
    /// true when it closed.
    pub fn check_stall(&mut self, now: Instant) -> bool {
        if !self.is_open() {
            return false;
        }
        let unsent = unsent_bytes(&self.sock).unwrap_or(0);
        if !self.stall.sample(unsent, now, STALLED_AFTER) {
            return false;
        }
        self.close_ws(
            CloseCode::Policy,
            "too slow: not reading",
            CloseReason::SlowConsumer,
            now,
        );
        true
    }

    /// Queues `frame` for an open client. False when the client is already `limit` frames
    /// behind: the caller closes it as a slow consumer.
    pub fn send(&mut self, frame: &SharedFrame, limit: usize) -> bool {
        if !self.is_open() {
            return true;
        }
        if self.out.len() >= limit {
            return false;
        }
        self.out.push(Arc::clone(frame));
        true
    }

    /// Sends a WebSocket Ping carrying `payload` (the client's Pong echoes it).
    pub fn ping(&mut self, payload: &[u8]) {
        if let State::Open { ws } = &mut self.state {
            let mut io = WsIo {
                sock: &mut self.sock,
                out: &mut self.out,
                drop_pong: &mut self.drop_pong,
            };
            // Writes into our queue; it cannot block or fail for an open context.
            let _ = ws.write(&mut io, Message::Ping(payload.to_vec().into()));
        }
    }

    /// Queues a frame that is not counted as a message sent (a heartbeat).
    pub fn send_uncounted(&mut self, frame: &SharedFrame) {
        if self.is_open() {
            self.out.push_uncounted(Arc::clone(frame));
        }
    }

    /// Sends a close frame with `code` and starts closing. For a slow consumer the backlog is
    /// dropped first, so the close frame is next on the wire rather than behind it.
    pub fn close_ws(&mut self, code: CloseCode, text: &str, why: CloseReason, now: Instant) {
        if let State::Open { ws } = &mut self.state {
            if why == CloseReason::SlowConsumer {
                self.out.drop_unstarted();
                self.reset_on_drop = true;
            }
            let mut io = WsIo {
                sock: &mut self.sock,
                out: &mut self.out,
                drop_pong: &mut self.drop_pong,
            };
            let frame = CloseFrame {
                code,
                reason: text.into(),
            };
            // Writing into our queue cannot fail; a context already closing just flushes.
            let _ = ws.close(&mut io, Some(frame));
        }
        self.begin_closing(why, now);
    }

    fn begin_closing(&mut self, why: CloseReason, now: Instant) {
        if !matches!(self.state, State::Closing { .. } | State::Done) {
            self.end(closing(now), why);
        }
    }

    /// The peer sent EOF while we wait for its next request: what is still queued (the answer
    /// to its last request, under keep-alive) is written before the connection ends.
    pub fn peer_finished(&mut self, now: Instant) {
        if self.out.is_empty() {
            self.abort(CloseReason::ClientClosed);
        } else {
            self.state = closing(now);
        }
    }

    /// Ends the connection now, without a goodbye.
    pub fn abort(&mut self, why: CloseReason) {
        self.end(State::Done, why);
    }

    /// Writes queued frames. Returns frames completed. On a socket error the connection is done.
    pub fn flush(&mut self) -> u64 {
        if self.is_done() {
            return 0;
        }
        let before = (self.out.len(), self.out.offset);
        let completed = match self.out.write_to(&mut self.sock) {
            Ok((_, completed)) => completed,
            Err(_) => {
                self.end(State::Done, CloseReason::IoError);
                return 0;
            }
        };
        if (self.out.len(), self.out.offset) != before && !self.out.is_empty() {
            // A large response (a --www file) still flowing to a slow client: its deadlines
            // count from the last progress, not from the request, or it would be cut off.
            self.still_sending(Instant::now());
        }
        if let State::Closing { write_shut, .. } = &mut self.state
            && !*write_shut
            && self.out.is_empty()
        {
            // Everything is out: half-close, then wait for the peer's EOF so the kernel never
            // answers its last bytes with a reset that would destroy our response.
            *write_shut = true;
            if self.sock.shutdown(Shutdown::Write).is_err() {
                self.state = State::Done;
            }
        }
        completed
    }

    /// Moves the deadline of a connection that is still sending a response: the closing grace,
    /// or a kept-alive connection's idle timeout.
    fn still_sending(&mut self, now: Instant) {
        match &mut self.state {
            State::Closing { until, .. } => *until = (*until).max(now + CLOSE_GRACE),
            State::Http { .. } if self.served > 0 => self.accepted = now,
            _ => {}
        }
    }

    /// In `Closing`, reads and discards input until EOF. Returns true when it stopped only
    /// because of its per-call budget: the caller must come back, as no new readiness event
    /// will say so.
    ///
    /// A parked long-poll reads the same way: a client sends nothing more on a GET, so input
    /// is discarded and EOF means it gave up waiting.
    pub fn drain_input(&mut self) -> bool {
        if !matches!(self.state, State::Closing { .. } | State::Parked { .. }) {
            return false;
        }
        let mut buf = [0u8; 4096];
        let mut budget = DRAIN_READS;
        loop {
            if budget == 0 {
                return true;
            }
            budget -= 1;
            match self.sock.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        // A page on its way from the worker is still answered: a client may half-close once
        // its request is sent. (A dead socket fails the answer's write instead.)
        if self.page_ticket.is_some() {
            return false;
        }
        // EOF (or a dead socket): once our side is flushed there is nothing left to do.
        // (A parked poll has nothing queued: its answer would have moved it to `Closing`.)
        if self.out.is_empty() || matches!(self.state, State::Parked { .. }) {
            self.state = State::Done;
        } else if let State::Closing { until, .. } = &mut self.state {
            // The peer is gone for reading; give the flush a moment, no more.
            *until = (*until).min(Instant::now() + Duration::from_millis(100));
        }
        false
    }

    /// Enforces deadlines: the handshake timeout in `Http` (the idle timeout of a kept-alive
    /// connection), the grace period in `Closing`. Returns true when a handshake timed out:
    /// a kept-alive connection going idle is not one.
    pub fn expire(&mut self, now: Instant, handshake_timeout: Duration) -> bool {
        match &self.state {
            State::Http { .. } if now.duration_since(self.accepted) >= handshake_timeout => {
                self.state = State::Done;
                self.served == 0
            }
            State::Closing { until, .. } | State::Parked { until, .. } if now >= *until => {
                // A peer that stopped reading will not take what is left: reset instead of a
                // close that leaves the kernel holding it (and probing a shut window) for
                // minutes.
                if self.reset_on_drop || !self.out.is_empty() {
                    reset_on_close(&self.sock);
                }
                self.state = State::Done;
                false
            }
            _ => false,
        }
    }
}

/// Asks for a send buffer of `bytes` (the kernel doubles it, and stops autotuning it).
fn set_send_buffer(sock: &TcpStream, bytes: libc::c_int) -> io::Result<()> {
    // SAFETY: the descriptor is open for the call, and the option value outlives it.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Bytes queued in the kernel and not yet sent: held back by the peer's window (or a
/// collapsed congestion window), not merely waiting for an acknowledgement (`SIOCOUTQNSD`).
fn unsent_bytes(sock: &TcpStream) -> io::Result<u32> {
    let mut bytes: libc::c_int = 0;
    // SAFETY: SIOCOUTQNSD writes one int, into `bytes`, which outlives the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCOUTQNSD as _, &mut bytes) };
    if rc == 0 {
        Ok(u32::try_from(bytes).unwrap_or(0))
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes the coming close a reset (`SO_LINGER` 0): what is unsent is discarded at once.
fn reset_on_close(sock: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the descriptor is open for the call, and the option value outlives it. A
    // failure leaves an ordinary close, which is what would happen anyway.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_whose_unsent_bytes_never_fall_is_stalled() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let after = Duration::from_secs(5);
        let mut w = StallWatch::default();
        // Reading: the backlog comes and goes.
        for (i, bytes) in [0, 300, 0, 150, 900, 200, 0].into_iter().enumerate() {
            assert!(!w.sample(bytes, at(i as u64 * 1000), after));
        }
        // Stopped reading: the backlog only grows, then stays.
        let mut w = StallWatch::default();
        assert!(!w.sample(2000, at(0), after));
        assert!(!w.sample(2600, at(2000), after));
        assert!(!w.sample(2600, at(4000), after));
        assert!(w.sample(3000, at(5000), after));
        // One fall starts the wait again.
        let mut w = StallWatch::default();
        assert!(!w.sample(2000, at(0), after));
        assert!(!w.sample(1900, at(4000), after));
        assert!(!w.sample(1900, at(8000), after));
        assert!(!w.sample(1900, at(12000), after));
        assert!(w.sample(1900, at(13000), after));
    }

    /// A writer that takes at most `cap` bytes per call, then blocks after `calls` calls.
    struct Trickle {
        got: Vec<u8>,
        cap: usize,
        calls: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.calls == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.calls -= 1;
            let n = buf.len().min(self.cap);
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn frame(bytes: &[u8]) -> SharedFrame {
        Arc::from(bytes)
    }

    #[test]
    fn partial_writes_resume_where_they_stopped() {
        let mut q = OutQueue::default();
        q.push(frame(b"hello"));
        q.push(frame(b"world!"));
        let mut w = Trickle {
            got: vec![],
            cap: 3,
            calls: 2,
        };
        assert_eq!(q.write_to(&mut w).unwrap(), (Flushed::Blocked, 1));
        assert_eq!(q.len(), 1);
        w.calls = 10;
        assert_eq!(q.write_to(&mut w).unwrap(), (Flushed::All, 1));
        assert_eq!(w.got, b"helloworld!");
    }

    #[test]
    fn http_responses_are_not_counted_as_messages() {
        let mut q = OutQueue::default();
        q.push_uncounted(frame(b"HTTP/1.1 101"));
        q.push(frame(b"hello"));
        let mut w = Trickle {
            got: vec![],
            cap: 100,
            calls: 10,
        };
        assert_eq!(q.write_to(&mut w).unwrap(), (Flushed::All, 1));
    }

    #[test]
    fn dropping_the_backlog_keeps_a_started_frame_whole() {
        let mut q = OutQueue::default();
        for f in [b"aaaa", b"bbbb", b"cccc"] {
            q.push(frame(f));
        }
        let mut w = Trickle {
            got: vec![],
            cap: 2,
            calls: 1,
        };
        let _ = q.write_to(&mut w).unwrap();
        q.drop_unstarted();
        q.push(frame(b"CLOSE"));
        w.calls = 10;
        w.cap = 100;
        q.write_to(&mut w).unwrap();
        assert_eq!(w.got, b"aaaaCLOSE");

        let mut q = OutQueue::default();
        q.push(frame(b"x"));
        q.push(frame(b"y"));
        q.drop_unstarted();
        assert!(q.is_empty());
    }

    #[test]
    fn rate_limit_warns_once_then_closes_at_ten_times() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(20);
        for _ in 0..20 {
            assert_eq!(r.check(t0), Rate::Allow);
        }
        assert_eq!(r.check(t0), Rate::Refuse { warn: true });
        for _ in 22..=200 {
            assert_eq!(r.check(t0), Rate::Refuse { warn: false });
        }
        assert_eq!(r.check(t0), Rate::Close);
        // A new window starts afresh.
        assert_eq!(r.check(t0 + Duration::from_millis(1001)), Rate::Allow);
    }

    #[test]
    fn a_write_of_zero_is_an_error() {
        struct Zero;
        impl Write for Zero {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Ok(0)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut q = OutQueue::default();
        q.push(frame(b"x"));
        assert!(q.write_to(&mut Zero).is_err());
    }
}
