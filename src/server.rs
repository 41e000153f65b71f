//! The event loop: one `mio::Poll` that accepts, serves HTTP, speaks WebSocket and fans ticks out.
//!
//! This module owns the listening socket, the slab of [`Connection`]s, the loop's view of the
//! tempo and the [`ServerStats`]. It decides what every request and message means for the
//! server as a whole. It must not sleep, block or compute tick times: ticks arrive finished
//! from the timing thread, and the loop only stamps them into frames and writes them out.
//!
//! Ticks come first. Whenever the timing ring has something, it is drained before the next
//! connection event is handled, so a burst of client traffic delays a tick by at most one
//! connection's work. Clock-sync pings come a close second: a fan-out to many clients pauses
//! every [`FANOUT_CHUNK`] connections to read what has arrived, so a ping is answered within a
//! chunk's time rather than after the whole fan-out.
//!
//! Socket.IO clients (the predecessor's) are served by the same loop and the same fan-out: a
//! Socket.IO WebSocket is a [`Connection`] with a [`SioLink`], a long-polling client is a
//! [`PollSession`] whose parked GET is answered when packets arrive. Each broadcast is encoded
//! once per protocol, never once per client.
//!
//! The loop also keeps the tempo timeline (a copy of the timing thread's schedule, sent to
//! clients as `timeline`) and the [`Transport`]: while stopped, ticks keep coming from the timing
//! thread and are simply not sent.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use thiserror::Error;
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::clock::Clock;
use crate::cluster::{
    ClusterConfig, ClusterEvent, ClusterEvents, ClusterFault, ClusterRequest, ClusterStatus,
    ClusterThread, Outcome, SharedTimeline, TimelineLimits,
};
use crate::config::Config;
use crate::connection::{Connection, HeadRead, Rate, RateLimit, SioLink, State, WsRead};
use crate::engineio::{self, EioError, Packet, SioPacket, Transport as EioTransport};
use crate::http::{self, Request, Route};
use crate::join::{self, JoinInfo};
use crate::page_worker::{self, Job, PageWorker};
use crate::protocol::{
    self, ClientError, ClientMessage, HelloData, Outgoing, SharedFrame, TickData, TimelineData,
    TransportData,
};
use crate::rt;
use crate::session::{AddressCounts, Health, PollSession};
use crate::state::{self, Persisted, StateWriter};
use crate::stats::{self, ClientKind, CloseReason, RefuseReason, ServerStats, Snapshot};
use crate::tempo::{Bpm, TickSchedule};
use crate::timing::{Realtime, Tick, TimingCommand, TimingEvent, TimingEvents, TimingThread};
use crate::transport::{self, Quantize, Transport, TransportState};
use crate::www;

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const SIGNALS: Token = Token(usize::MAX - 3);

/// How often deadlines (handshake timeouts, closing grace) are checked.
const HOUSEKEEPING: Duration = Duration::from_millis(250);
/// How long SIGTERM waits for clients to receive their close frames.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Messages handled from one connection per readiness event before the loop moves on (and
/// comes back after the next poll): one chatty client cannot hold everyone else.
const MESSAGES_PER_EVENT: usize = 64;
/// Tempo and transport changes the server applies per second, from all clients together.
const MAX_CONTROL_CHANGES_PER_SEC: u32 = 10;
/// How far ahead a `start` is scheduled at least, so that clients scheduling on the timeline
/// (browsers typically look 100 ms ahead) hear of it before its first tick is due.
const START_LEAD_NS: u64 = 150_000_000;
/// Connections a fan-out writes to before it pauses to read what clients have sent.
const FANOUT_CHUNK: usize = 256;
/// The largest long-polling payload the server sends or accepts (Engine.IO's `maxPayload`).
const EIO_MAX_PAYLOAD: usize = 64 * 1024;
/// The longest Engine.IO ping payload echoed back (stock clients send only `probe`).
const MAX_PING_ECHO: usize = 16;

/// Where a client message came from, and so where its replies go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    /// A WebSocket connection (`/ws`, or Socket.IO over WebSocket), by slab key.
    Conn(usize),
    /// A Socket.IO long-polling session, by slab key.
    Session(usize),
}

/// A broadcast, encoded once per protocol.
struct Encoded {
    plain: SharedFrame,
    /// `42[...]` as a WebSocket frame and as a polling packet, when any Socket.IO client is
    /// connected.
    sio: Option<(SharedFrame, Arc<str>)>,
}
/// How long past a tick's deadline the loop keeps busy-polling for it.
const BUSY_POLL_GRACE: Duration = Duration::from_millis(1);
/// How long accepting pauses when the process is out of file descriptors.
const FD_BACKOFF: Duration = Duration::from_millis(250);
/// Sockets sampled for a stall per housekeeping round, at most (about 0.3 ms of system calls).
const STALL_SAMPLES_PER_ROUND: usize = 1024;
/// How often, at most, the log says that the timing thread skipped ticks.
const SKIP_LOG_EVERY: Duration = Duration::from_secs(10);
/// How long a request waits for the page worker before its connection is dropped (a disk
/// that hangs); the worker answers in microseconds to milliseconds otherwise.
const PAGE_BACKSTOP: Duration = Duration::from_secs(10);
/// How long `/join`'s list of LAN addresses is reused before the interfaces are read again
/// (a laptop may change networks while it runs).
const JOIN_CACHE: Duration = Duration::from_secs(2);

/// Why the server could not start or keep running.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}; is another server using it? pick another --port")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot set up the event loop: {0}")]
    Poll(io::Error),
    #[error("cannot start the timing thread: {0}")]
    Timing(io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
    #[error("cannot start the cluster thread: {0}; check --cluster")]
    Cluster(io::Error),
    #[error("cannot start the page worker thread: {0}")]
    Pages(io::Error),
}

/// How long `bind` waits for a cluster's timeline before starting on its own.
const CLUSTER_JOIN_WAIT: Duration = Duration::from_secs(3);

/// The loop's side of a cluster (`--cluster`).
struct ClusterLink {
    thread: ClusterThread,
    events: ClusterEvents,
    status: ClusterStatus,
    /// The shared timeline last adopted.
    shared: Option<SharedTimeline>,
    /// Control requests handed to the cluster thread and not yet answered.
    pending: Vec<PendingAsk>,
    next_id: u64,
}

/// A control request the cluster thread has yet to answer, and who asked.
struct PendingAsk {
    id: u64,
    peer: Peer,
    /// The asker's Socket.IO callback, if it passed one.
    ack: Option<u64>,
    /// A tempo change (else a transport change): what an `Unchanged` confirms.
    tempo: bool,
    asked: Instant,
}

/// How the loop handled a client's message.
enum Handled {
    /// Answered (or nothing to answer).
    Done,
    /// Handed to the cluster thread as request `id`; the answer follows.
    Asked(u64),
}

/// Control requests waiting for the cluster thread at most (its ring holds 64).
const MAX_PENDING_ASKS: usize = 64;
/// How long a control request may wait for the cluster thread before it is refused.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Server {
    cfg: Config,
    poll: Poll,
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    conns: Slab<Connection>,
    timing: TimingThread,
    timing_events: TimingEvents,
    signals: Signals,
    clock: Clock,
    stats: ServerStats,
    started: Instant,
    /// The tempo and count as the loop last heard them from the timing thread.
    bpm: Bpm,
    /// The tempo last asked of the timing thread (equal to `bpm` once it has applied it).
    requested_bpm: Bpm,
    /// Tempo and transport changes per second, server-wide: each is a broadcast to everyone.
    control_changes: RateLimit,
    /// The last tick the loop took from the timing thread (0 before the first).
    count: u64,
    /// The next tick the loop will take: where a transport change can take effect.
    next_count: u64,
    /// The timing thread's current schedule, as last announced by it.
    schedule: TickSchedule,
    transport: Transport,
    /// When the transport's current state began (unix ns): kept because after a tempo change
    /// the new schedule no longer knows counts before its anchor.
    transport_unix_ns: u64,
    /// The `timeline` every new client gets; rebuilt on every tempo or transport change.
    timeline: Outgoing,
    timeline_frame: SharedFrame,
    /// Set while a fan-out is under way: what would start another one waits in `deferred`.
    in_fanout: bool,
    deferred: Vec<Outgoing>,
    /// Socket.IO long-polling sessions, and their ids.
    sessions: Slab<PollSession>,
    session_ids: HashMap<String, usize>,
    /// Sessions per client address, against --max-sessions-per-ip.
    session_addresses: AddressCounts,
    /// Engine.IO's ping packet, as a frame.
    eio_ping: SharedFrame,
    /// Events polled in the pauses of a fan-out.
    fanout_events: Option<Events>,
    /// The connection whose input is being handled: a fan-out it causes must not, in a pause,
    /// handle that same connection's input again (it would see the same request twice).
    driving: Option<usize>,
    /// Set with `--cluster`: tempo and transport then go through the shared timeline.
    cluster: Option<ClusterLink>,
    accept_paused_until: Option<Instant>,
    fd_limit_logged: bool,
    shutdown_by: Option<Instant>,
    /// While set, the loop polls without sleeping: a tick is due any moment.
    busy_poll_until: Option<Instant>,
    /// Connections that still had input when their budget ran out. Edge-triggered readiness
    /// will not report them again, so the loop revisits them itself.
    readable_again: Vec<usize>,
    /// Scratch list of connections to remove, reused to avoid allocating per tick.
    finished: Vec<usize>,
    /// When the loop last took a tick from the timing thread: a transport that plays with no
    /// tick for a while is a silent server (`/healthz`).
    last_tick_at: Instant,
    /// Counts housekeeping rounds, to spread stall sampling over them.
    housekeeping_round: usize,
    /// Ticks the timing thread skipped since the last log line about it, and when that was.
    skips_unlogged: u64,
    skip_logged_at: Option<Instant>,
    /// Makes `--www` files and QR codes off the loop.
    pages: PageWorker,
    /// Writes the state file on every change (`--state`), when it can.
    state: Option<StateWriter>,
    /// `/join`'s body, and when it was made.
    join_cache: Option<(Instant, String)>,
}

impl Server {
    /// Binds the port and starts the timing thread. Ticks start flowing at once; `run` sends them.
    pub fn bind(mut cfg: Config) -> Result<Server, ServerError> {
        let addr = SocketAddr::new(cfg.bind, cfg.port);
        let mut listener =
            TcpListener::bind(addr).map_err(|source| ServerError::Bind { addr, source })?;
        let local_addr = listener.local_addr().map_err(ServerError::Poll)?;
        let poll = Poll::new().map_err(ServerError::Poll)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(ServerError::Poll)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(ServerError::Poll)?);
        let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(ServerError::Signals)?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(ServerError::Signals)?;
        let clock = Clock::start();
        // The state file's timeline, unless a cluster's shared one wins below.
        let startup = match &cfg.state_file {
            Some(path) => state::startup(path, &cfg, clock.unix_now_ns()),
            None => state::Startup::off(),
        };
        if let Some(resume) = &startup.resume {
            cfg.bpm = resume.timeline.bpm();
            cfg.beats_per_bar = resume.beats_per_bar;
        }
        let resumed = startup.resume.as_ref().map(|r| r.timeline);
        if let Some(dir) = &cfg.www {
            for hidden in www::shadowed(dir) {
                warn!(
                    "www: {} is never served: the embedded page of that name wins; rename it",
                    hidden.display()
                );
            }
        }
        let pages =
            PageWorker::spawn(cfg.www.clone(), Arc::clone(&waker)).map_err(ServerError::Pages)?;
        let realtime = Realtime {
            fifo_priority: cfg.rt_priority,
            prewake: cfg.prewake,
            spin: cfg.spin,
        };
        let (mut cluster, joined) = match &cfg.cluster {
            None => (None, None),
            Some((url, name, lead)) => {
                let (link, joined) = join_cluster(&cfg, url, name, *lead, clock, &waker, resumed)?;
                (Some(link), joined)
            }
        };
        if joined.is_some() && resumed.is_some() {
            info!("state: the cluster's shared timeline wins over the state file's");
        }
        let start = joined.or(resumed);
        let initial = start.map(|shared| shared.schedule(&clock));
        let (timing, mut timing_events) =
            TimingThread::spawn(cfg.bpm, cfg.ppqn, clock, waker, realtime, initial)
                .map_err(ServerError::Timing)?;
        let schedule = first_schedule(&mut timing_events).map_err(ServerError::Timing)?;
        let transport = start.map_or(Transport::playing(), |s| s.transport());
        let transport_unix_ns =
            start.map_or(clock.unix_ns(schedule.anchor_ns()), |s| s.transport_unix_ns);
        let first_state = Persisted::of(
            &schedule,
            &transport,
            transport_unix_ns,
            cfg.beats_per_bar,
            &clock,
        );
        if let Some(link) = cluster.as_mut() {
            link.shared = joined;
            if joined.is_none() {
                link.thread
                    .send(0, ClusterRequest::Seed(first_state.timeline));
            }
        }
        let state = match (&cfg.state_file, startup.may_write) {
            (Some(path), true) => {
                match StateWriter::start(path.clone(), first_state, clock, startup.lock) {
                    Ok(writer) => {
                        if startup.fresh {
                            info!(
                                "state: no {} yet; starting afresh, saving there",
                                path.display()
                            );
                        }
                        Some(writer)
                    }
                    Err(e) => {
                        warn!("state: {e}; running without saving the state");
                        None
                    }
                }
            }
            _ => None,
        };
        Ok(Server {
            bpm: schedule.bpm(),
            requested_bpm: schedule.bpm(),
            control_changes: RateLimit::new(MAX_CONTROL_CHANGES_PER_SEC),
            next_count: 0,
            schedule,
            transport,
            transport_unix_ns,
            cluster,
            timeline: Outgoing {
                name: "timeline",
                data: String::new(),
            },
            timeline_frame: SharedFrame::from(&[][..]),
            in_fanout: false,
            deferred: Vec::new(),
            sessions: Slab::new(),
            session_ids: HashMap::new(),
            session_addresses: AddressCounts::default(),
            eio_ping: protocol::text_frame("2"),
            fanout_events: Some(Events::with_capacity(256)),
            driving: None,
            cfg,
            poll,
            listener: Some(listener),
            local_addr,
            conns: Slab::new(),
            timing,
            timing_events,
            signals,
            clock,
            stats: ServerStats::default(),
            started: Instant::now(),
            count: 0,
            accept_paused_until: None,
            fd_limit_logged: false,
            shutdown_by: None,
            busy_poll_until: None,
            readable_again: Vec::new(),
            finished: Vec::new(),
            last_tick_at: Instant::now(),
            skips_unlogged: 0,
            skip_logged_at: None,
            housekeeping_round: 0,
            pages,
            state,
            join_cache: None,
        })
        .map(|mut server| {
            server.refresh_timeline();
            server
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The tempo ticks are at now.
    pub fn bpm(&self) -> Bpm {
        self.bpm
    }

    /// Runs until SIGTERM or SIGINT, then closes every client with 1001 and returns.
    pub fn run(mut self) -> Result<(), ServerError> {
        // The loop runs just below the timing thread: a tick's fan-out is not held back by
        // ordinary processes, and never by the loop's own clients' noise.
        if self.cfg.rt_priority > 1 {
            let priority = self.cfg.rt_priority - 1;
            match rt::set_fifo_priority(priority) {
                Ok(()) => info!("loop: SCHED_FIFO priority {priority}"),
                Err(e) => info!("loop: no real-time priority ({e})"),
            }
        }
        let mut events = Events::with_capacity(1024);
        let mut next_housekeeping = Instant::now() + HOUSEKEEPING;
        loop {
            let now = Instant::now();
            let mut timeout = next_housekeeping.saturating_duration_since(now);
            if let Some(by) = self.shutdown_by {
                timeout = timeout.min(by.saturating_duration_since(now));
            }
            match self.busy_poll_until {
                Some(until) if now < until => timeout = Duration::ZERO,
                Some(_) => self.busy_poll_until = None,
                None => {}
            }
            if !self.readable_again.is_empty() {
                timeout = Duration::ZERO;
            }
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ServerError::Poll(e));
            }
            self.drain_timing();
            self.drain_cluster();
            self.drain_pages();
            for event in events.iter() {
                self.on_event(event);
                if !self.timing_events.is_empty() {
                    self.drain_timing();
                }
            }
            for key in std::mem::take(&mut self.readable_again) {
                self.drive(key, true, false);
                if !self.timing_events.is_empty() {
                    self.drain_timing();
                }
            }
            let now = Instant::now();
            if now >= next_housekeeping {
                self.housekeeping(now);
                next_housekeeping = now + HOUSEKEEPING;
            }
            if let Some(by) = self.shutdown_by
                && (self.conns.is_empty() || now >= by)
            {
                break;
            }
        }
        let left = self.conns.len();
        for key in 0..self.conns.capacity() {
            if self.conns.contains(key) {
                self.remove(key);
            }
        }
        self.timing.stop();
        if let Some(writer) = self.state.take() {
            writer.stop();
        }
        info!("shutdown complete ({left} connections cut at the deadline)");
        Ok(())
    }

    /// One readiness event. The waker's only job is to end the poll: the rings are drained
    /// by the caller.
    fn on_event(&mut self, event: &mio::event::Event) {
        match event.token() {
            WAKER => {}
            LISTENER => self.accept(),
            SIGNALS => self.on_signal(),
            Token(key) => {
                let readable = event.is_readable() || event.is_read_closed() || event.is_error();
                self.drive(key, readable, event.is_writable());
            }
        }
    }

    fn accept(&mut self) {
        if self.accept_paused_until.is_some() {
            return;
        }
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((sock, peer)) => self.add_connection(sock, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // These concern one connection that is already gone, not the listener.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ECONNABORTED | libc::EPROTO | libc::EPERM)
                    ) =>
                {
                    debug!("accept failed: {e}");
                }
                Err(e) => {
                    // Out of descriptors (EMFILE, ENFILE) or memory: the pending connection
                    // stays in the backlog and retrying at once would spin. Pause accepting;
                    // keep serving everyone connected.
                    if !self.fd_limit_logged {
                        warn!(
                            "accept paused: {e}; raise ulimit -n if this is the open-files limit"
                        );
                        self.fd_limit_logged = true;
                    }
                    self.stats.count_refused(RefuseReason::FdLimit);
                    self.accept_paused_until = Some(Instant::now() + FD_BACKOFF);
                    return;
                }
            }
        }
    }

    fn add_connection(&mut self, mut sock: TcpStream, peer: SocketAddr) {
        // Ticks are tiny and latency is the point: never let Nagle hold one back.
        if let Err(e) = sock.set_nodelay(true) {
            debug!("set_nodelay failed for {peer}: {e}");
        }
        let entry = self.conns.vacant_entry();
        let token = Token(entry.key());
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut sock, token, Interest::READABLE | Interest::WRITABLE)
        {
            warn!("cannot register connection from {peer}: {e}");
            return;
        }
        let rate = RateLimit::new(self.cfg.max_messages_per_sec);
        entry.insert(Connection::new(sock, peer, Instant::now(), rate));
        self.stats.connections_accepted += 1;
    }

    fn remove(&mut self, key: usize) {
        let Some(mut conn) = self.conns.try_remove(key) else {
            return;
        };
        // Dropping the socket closes it, which also removes it from the poll.
        let _ = self.poll.registry().deregister(conn.socket());
        count_close(&mut self.stats, &mut conn);
        self.forget_asks(Peer::Conn(key), None);
        // A long-poll that gave up, or a WebSocket that probed and went away: the session
        // carries on without it.
        if let Some(skey) = conn.parked_for
            && let Some(session) = self.sessions.get_mut(skey)
            && session.waiting == Some(key)
        {
            session.waiting = None;
        }
        if let Some(skey) = conn.sio.as_ref().and_then(|l| l.upgrading_from)
            && let Some(session) = self.sessions.get_mut(skey)
            && session.prober == Some(key)
        {
            session.prober = None;
            session.probed = false;
        }
    }

    /// Handles readiness on one connection, following it through state changes.
    fn drive(&mut self, key: usize, readable: bool, writable: bool) {
        let outer = self.driving.replace(key);
        self.drive_one(key, readable, writable);
        self.driving = outer;
    }

    fn drive_one(&mut self, key: usize, readable: bool, writable: bool) {
        let now = Instant::now();
        if writable && let Some(conn) = self.conns.get_mut(key) {
            self.stats.messages_sent += conn.flush();
        }
        let mut handled = 0;
        if readable {
            loop {
                let Some(conn) = self.conns.get_mut(key) else {
                    return;
                };
                match conn.state() {
                    State::Http { .. } => match conn.read_head() {
                        HeadRead::Pending => break,
                        HeadRead::Request(req) => {
                            self.on_request(key, req, now);
                            // Keep-alive lets one connection pipeline requests: budget them
                            // like WebSocket messages.
                            handled += 1;
                            if handled >= MESSAGES_PER_EVENT {
                                self.readable_again.push(key);
                                break;
                            }
                        }
                        HeadRead::Invalid(e) => {
                            self.stats.count_refused(RefuseReason::BadRequest);
                            self.stats.count_http(e.status());
                            conn.respond(http::text_error(e.status(), &e.to_string()), now);
                        }
                        HeadRead::Gone => conn.peer_finished(now),
                    },
                    State::Open { .. } => match conn.read_ws(now, self.cfg.max_queue) {
                        WsRead::Message(m) => {
                            match conn.rate.check(now) {
                                Rate::Allow => self.on_message(key, m),
                                Rate::Refuse { warn } => {
                                    self.stats.client_errors += 1;
                                    if matches!(m, Message::Ping(_)) {
                                        conn.refuse_pong();
                                    }
                                    if warn {
                                        let err =
                                            ClientError::RateLimited(self.cfg.max_messages_per_sec);
                                        self.reply(Peer::Conn(key), &protocol::error(&err));
                                    }
                                }
                                Rate::Close => conn.close_ws(
                                    CloseCode::Policy,
                                    "too many messages",
                                    CloseReason::RateLimited,
                                    now,
                                ),
                            }
                            // A chatty client must not hold back a tick that is due.
                            if !self.timing_events.is_empty() {
                                self.drain_timing();
                            }
                            handled += 1;
                            if handled >= MESSAGES_PER_EVENT {
                                self.readable_again.push(key);
                                break;
                            }
                        }
                        WsRead::Pending => break,
                        WsRead::Ended(_) => {}
                    },
                    State::Closing { .. } | State::Parked { .. } => {
                        if conn.drain_input() {
                            self.readable_again.push(key);
                        }
                        break;
                    }
                    State::Done => break,
                }
            }
        }
        if let Some(conn) = self.conns.get_mut(key) {
            self.stats.messages_sent += conn.flush();
            count_close(&mut self.stats, conn);
            if conn.is_done() {
                self.remove(key);
            }
        }
    }

    fn on_request(&mut self, key: usize, req: Request, now: Instant) {
        let route = http::route(&req.method, &req.path);
        let response = match route {
            Route::WebSocket if !http::origin_allowed(&req, &self.cfg.allowed_origins) => {
                self.stats.count_refused(RefuseReason::ForbiddenOrigin);
                (
                    403,
                    http::text_error(
                        403,
                        "this page's origin may not open the WebSocket (--allowed-origin)",
                    ),
                )
            }
            Route::WebSocket => match self.check_ws_upgrade(&req) {
                Ok(accept) => return self.upgrade(key, &req, &accept),
                Err(refusal) => refusal,
            },
            Route::SocketIo => return self.on_socketio_request(key, req, now),
            Route::Asset(asset) => {
                let cors = www::cors_headers(req.header("origin"), &self.cfg.allowed_origins);
                let extra: Vec<&str> = cors.iter().map(String::as_str).collect();
                (
                    200,
                    http::response_with(200, asset.content_type, &extra, asset.body),
                )
            }
            Route::Join => (
                200,
                http::response(200, "application/json", self.join_json().as_bytes()),
            ),
            Route::Qr => match join::qr_text(&req.query) {
                Ok(text) => return self.ask_pages(key, &req, Job::Qr { text }, now),
                Err(e) => (400, http::text_error(400, &e.to_string())),
            },
            // Not embedded and not an endpoint: the operator's own pages, if any.
            Route::NotFound if self.cfg.www.is_some() => {
                let job = Job::File {
                    path: req.path.clone(),
                    if_none_match: req.header("if-none-match").map(str::to_string),
                };
                return self.ask_pages(key, &req, job, now);
            }
            Route::Healthz => match self.stats.degraded(self.silent_for(now)) {
                None => (200, http::response(200, "text/plain; charset=utf-8", b"ok")),
                Some(why) => (
                    503,
                    http::response(503, "text/plain; charset=utf-8", why.as_bytes()),
                ),
            },
            Route::Stats => (
                200,
                http::response(
                    200,
                    "application/json",
                    stats::stats_json(&self.snapshot()).as_bytes(),
                ),
            ),
            Route::Metrics => (
                200,
                http::response(
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    stats::metrics_text(&self.snapshot()).as_bytes(),
                ),
            ),
            Route::NotFound => (
                404,
                http::text_error(404, "no such page; try /, /ws or /socket.io/"),
            ),
            Route::MethodNotAllowed if req.path.starts_with("/socket.io") => (
                405,
                http::response_with(
                    405,
                    "text/plain; charset=utf-8",
                    &["Allow: GET, POST, OPTIONS"],
                    b"405 Method Not Allowed: /socket.io/ takes GET, POST and OPTIONS\n",
                ),
            ),
            Route::MethodNotAllowed if req.path == "/ws" => (
                405,
                http::response_with(
                    405,
                    "text/plain; charset=utf-8",
                    &["Allow: GET"],
                    b"405 Method Not Allowed: /ws takes a GET with a WebSocket upgrade\n",
                ),
            ),
            Route::MethodNotAllowed => (405, http::text_error(405, "only GET and HEAD are served")),
        };
        let (status, bytes) = response;
        self.respond(key, &req, status, bytes, now);
    }

    /// Hands a request to the page worker and parks its connection until the answer comes
    /// back (`drain_pages`); a worker with too much to do gets the client a 503 at once.
    fn ask_pages(&mut self, key: usize, req: &Request, job: Job, now: Instant) {
        let cors = www::cors_headers(req.header("origin"), &self.cfg.allowed_origins);
        let head_only = req.method == "HEAD";
        match self.pages.submit(key, job, head_only, req.keep_alive, cors) {
            Some(ticket) => {
                debug!("http {} {} -> page worker", req.method, req.path);
                if let Some(conn) = self.conns.get_mut(key) {
                    conn.park_for_page(ticket, now + PAGE_BACKSTOP, req.keep_alive);
                }
            }
            None => self.respond(key, req, 503, page_worker::busy(false), now),
        }
    }

    /// Sends the page worker's finished answers to the connections still waiting for them.
    fn drain_pages(&mut self) {
        let now = Instant::now();
        while let Some(answer) = self.pages.answer() {
            // The client may have gone, and its key been reused: the ticket tells.
            let Some(conn) = self.conns.get_mut(answer.conn) else {
                continue;
            };
            if conn.page_ticket != Some(answer.ticket) {
                continue;
            }
            self.stats.count_http(answer.status);
            conn.answer_page(answer.head, answer.body, now);
            self.stats.messages_sent += conn.flush();
            if conn.is_done() {
                self.finished.push(answer.conn);
            }
        }
        self.remove_finished();
    }

    /// `/join`: where devices on the LAN reach this server.
    fn join_json(&mut self) -> String {
        let now = Instant::now();
        if let Some((made, json)) = &self.join_cache
            && now.duration_since(*made) < JOIN_CACHE
        {
            return json.clone();
        }
        let interfaces = join::interface_addresses().unwrap_or_else(|e| {
            debug!("cannot list interfaces: {e}");
            Vec::new()
        });
        let ip = self.local_addr.ip();
        let lan = join::lan_addresses(ip, &interfaces);
        let json = JoinInfo::new(ip, self.local_addr.port(), &lan).json();
        self.join_cache = Some((now, json.clone()));
        json
    }

    /// Sends a complete response and closes. Every response passes here, so a `HEAD` gets the
    /// `GET`'s status and headers without its body whatever route answered it.
    fn respond(&mut self, key: usize, req: &Request, status: u16, bytes: Vec<u8>, now: Instant) {
        self.stats.count_http(status);
        debug!("http {} {} -> {status}", req.method, req.path);
        let bytes = if req.is_head() {
            http::without_body(bytes)
        } else {
            bytes
        };
        if let Some(conn) = self.conns.get_mut(key) {
            conn.respond(bytes, now);
        }
    }

    /// The WebSocket handshake checks shared by `/ws` and `/socket.io/`: a valid upgrade, and
    /// room for one more client. Returns the accept key, or the refusal to send.
    fn check_ws_upgrade(&mut self, req: &Request) -> Result<String, (u16, Vec<u8>)> {
        match http::check_upgrade(req) {
            Ok(_) if self.stats.clients >= self.cfg.max_clients => {
                self.stats.count_refused(RefuseReason::MaxClients);
                let message = format!(
                    "server full: {} clients connected; try again later",
                    self.stats.clients
                );
                Err((503, http::text_error(503, &message)))
            }
            Ok(accept) => Ok(accept),
            Err(e) => {
                self.stats.count_refused(RefuseReason::BadUpgrade);
                Err((400, http::text_error(400, &e.to_string())))
            }
        }
    }

    /// Whether `req` presents the control token (or none is needed).
    fn may_control(&self, req: &Request) -> bool {
        match &self.cfg.control_token {
            None => true,
            Some(expected) => {
                http::presented_token(req).is_some_and(|t| http::tokens_match(&t, expected))
            }
        }
    }

    fn hello(&self, may_control: bool) -> Outgoing {
        protocol::hello(&HelloData {
            bpm: self.bpm,
            ppqn: self.cfg.ppqn,
            count: self.count,
            time: self.clock.unix_now_ns() / 1_000_000,
            time_us: self.clock.unix_now_ns() / 1_000,
            min_bpm: self.cfg.min_bpm,
            max_bpm: self.cfg.max_bpm,
            beats_per_bar: self.cfg.beats_per_bar,
            playing: self.transport.state() == TransportState::Playing,
            control: may_control,
            token_required: self.cfg.control_token.is_some(),
            version: env!("CARGO_PKG_VERSION"),
        })
    }

    fn upgrade(&mut self, key: usize, req: &Request, accept: &str) {
        let may_control = self.may_control(req);
        let hello = self.hello(may_control).frame();
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        self.stats.count_http(101);
        self.stats.client_opened(ClientKind::Ws);
        conn.counted = Some(ClientKind::Ws);
        conn.may_control = may_control;
        conn.upgrade(
            http::switching_protocols(accept),
            req.head_len,
            self.cfg.max_message_bytes,
        );
        conn.send(&hello, self.cfg.max_queue);
        conn.send(&self.timeline_frame, self.cfg.max_queue);
        debug!("ws open peer={}", conn.peer);
    }

    /// Everything under `/socket.io/`: the long-polling handshake, polls, posts, CORS
    /// preflight, and WebSocket upgrades (fresh, or taking over a polling session).
    fn on_socketio_request(&mut self, key: usize, req: Request, now: Instant) {
        let Some(cors) = http::cors_headers(&req, &self.cfg.allowed_origins) else {
            self.stats.count_refused(RefuseReason::ForbiddenOrigin);
            return self.eio_refuse(key, &req, EioError::Forbidden, &[], now);
        };
        if req.method == "OPTIONS" {
            return self.respond(key, &req, 204, http::preflight(&cors), now);
        }
        let query = match engineio::parse_query(&req.query) {
            Ok(q) => q,
            Err(e) => return self.eio_refuse(key, &req, e, &cors, now),
        };
        let Some(peer) = self.conns.get(key).map(|c| c.peer.ip()) else {
            return;
        };
        let client = http::client_ip(&req, self.cfg.client_ip_header.as_deref(), peer);
        // A session answers only its own client: to anyone else its id is unknown, so that
        // an id that leaked (a log, a shared screen) is of no use from elsewhere.
        let session = match &query.sid {
            None => None,
            Some(sid) => match self.session_ids.get(sid) {
                Some(&skey) if self.sessions.get(skey).is_some_and(|s| s.client == client) => {
                    Some(skey)
                }
                Some(_) => {
                    debug!("socket.io session id presented from another address ({client})");
                    return self.eio_refuse(key, &req, EioError::SessionIdUnknown, &cors, now);
                }
                None => return self.eio_refuse(key, &req, EioError::SessionIdUnknown, &cors, now),
            },
        };
        match (query.transport, session, req.method.as_str()) {
            // Taking over a session adds no client, so the --max-clients check is skipped.
            (EioTransport::WebSocket, Some(_), "GET") => match http::check_upgrade(&req) {
                Ok(accept) => self.socketio_upgrade(key, &req, &accept, session),
                Err(e) => {
                    self.stats.count_refused(RefuseReason::BadUpgrade);
                    let bytes = http::text_error(400, &e.to_string());
                    self.respond(key, &req, 400, bytes, now)
                }
            },
            (EioTransport::WebSocket, None, "GET") => match self.check_ws_upgrade(&req) {
                Ok(accept) => self.socketio_upgrade(key, &req, &accept, session),
                Err((status, bytes)) => self.respond(key, &req, status, bytes, now),
            },
            (EioTransport::Polling, None, "GET") => {
                self.polling_handshake(key, &req, client, cors, now)
            }
            (EioTransport::Polling, Some(skey), "GET") => self.poll(key, &req, skey, cors, now),
            (EioTransport::Polling, Some(skey), "POST") => self.post(key, &req, skey, cors, now),
            (_, None, _) => self.eio_refuse(key, &req, EioError::BadHandshakeMethod, &cors, now),
            _ => self.eio_refuse(key, &req, EioError::BadRequest, &cors, now),
        }
    }

    /// Answers with Engine.IO's JSON error, which stock clients report and retry on.
    fn eio_refuse(
        &mut self,
        key: usize,
        req: &Request,
        e: EioError,
        cors: &[String],
        now: Instant,
    ) {
        let extra: Vec<&str> = cors.iter().map(String::as_str).collect();
        let bytes =
            http::response_with(e.status(), "application/json", &extra, e.body().as_bytes());
        self.respond(key, req, e.status(), bytes, now);
    }

    /// A 200 for a polling request: `text/plain` with the CORS headers.
    fn poll_response(keep_alive: bool, cors: &[String], body: &str) -> Vec<u8> {
        let extra: Vec<&str> = cors.iter().map(String::as_str).collect();
        http::response_on(
            keep_alive,
            200,
            "text/plain; charset=UTF-8",
            &extra,
            body.as_bytes(),
        )
    }

    /// Sends a polling 200 and, when the client allows, keeps the connection for its next
    /// request: a long-polling client polls at every tick, and a new TCP connection each time
    /// would leave thousands of TIME_WAIT sockets behind.
    fn respond_polling(&mut self, key: usize, req: &Request, bytes: Vec<u8>, now: Instant) {
        if !req.keep_alive {
            return self.respond(key, req, 200, bytes, now);
        }
        self.stats.count_http(200);
        if let Some(conn) = self.conns.get_mut(key) {
            conn.respond_and_continue(bytes, req.head_len + req.body.len(), now);
        }
    }

    fn open_packet(&self, sid: &str, upgrades: &[&str]) -> String {
        engineio::open_packet(
            sid,
            upgrades,
            millis(self.cfg.ping_interval),
            millis(self.cfg.ping_timeout),
            EIO_MAX_PAYLOAD.min(self.cfg.max_message_bytes.max(http::MAX_BODY_BYTES)),
        )
    }

    fn socketio_upgrade(&mut self, key: usize, req: &Request, accept: &str, from: Option<usize>) {
        // One socket per session: a second would either take the session from the first or,
        // joined but never counted, get every broadcast outside --max-clients.
        if let Some(skey) = from
            && self.sessions.get(skey).is_some_and(|s| s.prober.is_some())
        {
            return self.eio_refuse(key, req, EioError::BadRequest, &[], Instant::now());
        }
        let sid = match from {
            Some(skey) => self.sessions[skey].sid.clone(),
            None => match engineio::new_sid() {
                Ok(sid) => sid,
                Err(e) => {
                    warn!("no randomness for a session id: {e}");
                    let bytes = http::text_error(503, "cannot create a session; try again");
                    return self.respond(key, req, 503, bytes, Instant::now());
                }
            },
        };
        let may_control = self.may_control(req);
        let open = (from.is_none()).then(|| protocol::text_frame(&self.open_packet(&sid, &[])));
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        self.stats.count_http(101);
        conn.may_control = may_control;
        conn.upgrade(
            http::switching_protocols(accept),
            req.head_len,
            self.cfg.max_message_bytes,
        );
        let now = Instant::now();
        conn.sio = Some(SioLink {
            sid,
            joined: false,
            upgrading_from: from,
            ping_sent: None,
            last_ping: now,
        });
        // A socket taking over a polling session counts once the upgrade completes (`5`); until
        // then the session is the client.
        if let Some(skey) = from
            && let Some(session) = self.sessions.get_mut(skey)
        {
            session.prober = Some(key);
        }
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        // Counted as a client from its namespace connect (`40`) on, like a polling session.
        if let Some(open) = open {
            conn.send(&open, self.cfg.max_queue);
        }
        debug!(
            "socket.io websocket open peer={} upgrade={}",
            conn.peer,
            from.is_some()
        );
    }

    /// Opens a long-polling session for `client`: within `--max-clients`,
    /// `--max-polling-sessions` and, for that address, `--max-sessions-per-ip`. The session
    /// counts as a client only once it connects to the namespace (`40`), and is closed if it
    /// has not within `--handshake-timeout` (housekeeping).
    fn polling_handshake(
        &mut self,
        key: usize,
        req: &Request,
        client: IpAddr,
        cors: Vec<String>,
        now: Instant,
    ) {
        let extra: Vec<&str> = cors.iter().map(String::as_str).collect();
        if self.stats.clients >= self.cfg.max_clients
            || self.sessions.len() >= self.cfg.max_polling_sessions
        {
            self.stats.count_refused(RefuseReason::MaxClients);
            let body = r#"{"code":3,"message":"Server full; try again later"}"#;
            let bytes = http::response_with(503, "application/json", &extra, body.as_bytes());
            return self.respond(key, req, 503, bytes, now);
        }
        if self.session_addresses.held(client) >= self.cfg.max_sessions_per_ip {
            self.stats.count_refused(RefuseReason::SessionsPerIp);
            let body = format!(
                r#"{{"code":3,"message":"{} sessions from your address already; try again later"}}"#,
                self.cfg.max_sessions_per_ip
            );
            let bytes = http::response_with(429, "application/json", &extra, body.as_bytes());
            return self.respond(key, req, 429, bytes, now);
        }
        let sid = match engineio::new_sid() {
            Ok(sid) => sid,
            Err(e) => {
                warn!("no randomness for a session id: {e}");
                let bytes = http::text_error(503, "cannot create a session; try again");
                return self.respond(key, req, 503, bytes, now);
            }
        };
        let open = self.open_packet(&sid, &["websocket"]);
        let rate = RateLimit::new(self.cfg.max_messages_per_sec);
        let session = PollSession::new(sid.clone(), client, self.may_control(req), rate, now);
        let skey = self.sessions.insert(session);
        self.session_ids.insert(sid, skey);
        self.session_addresses
            .try_add(client, self.cfg.max_sessions_per_ip);
        let bytes = Self::poll_response(req.keep_alive, &cors, &open);
        self.respond_polling(key, req, bytes, now);
    }

    /// A long-poll GET: answered at once when packets wait (or while the session is being
    /// upgraded), parked until they do otherwise.
    fn poll(&mut self, key: usize, req: &Request, skey: usize, cors: Vec<String>, now: Instant) {
        let backstop = now + self.cfg.ping_interval + self.cfg.ping_timeout;
        let Some(session) = self.sessions.get_mut(skey) else {
            return;
        };
        session.seen(now);
        if session.waiting.is_some() {
            // Two polls at once: a broken client. Engine.IO closes such a session.
            self.close_session(skey, CloseReason::ProtocolError);
            return self.eio_refuse(key, req, EioError::BadRequest, &cors, now);
        }
        session.cors = cors;
        let payload = session.take_payload(EIO_MAX_PAYLOAD);
        match payload {
            Some(body) => {
                let bytes = Self::poll_response(req.keep_alive, &session.cors, &body);
                self.respond_polling(key, req, bytes, now);
            }
            // A client whose polling is paused for an upgrade waits for this GET to end.
            None if session.probed => {
                let bytes = Self::poll_response(req.keep_alive, &session.cors, "6");
                self.respond_polling(key, req, bytes, now);
            }
            None => {
                session.waiting = Some(key);
                self.stats.count_http(200);
                if let Some(conn) = self.conns.get_mut(key) {
                    conn.park(skey, backstop, req.keep_alive);
                }
            }
        }
    }

    /// A POST of client packets.
    fn post(&mut self, key: usize, req: &Request, skey: usize, cors: Vec<String>, now: Instant) {
        let received_ns = self.clock.unix_now_ns();
        if let Some(session) = self.sessions.get_mut(skey) {
            session.seen(now);
        }
        let Ok(body) = std::str::from_utf8(&req.body) else {
            self.close_session(skey, CloseReason::InvalidUtf8);
            return self.eio_refuse(key, req, EioError::BadRequest, &cors, now);
        };
        for packet in engineio::split_payload(body) {
            let Some(session) = self.sessions.get_mut(skey) else {
                break;
            };
            // The same bound as a WebSocket message (there, tungstenite closes with 1009).
            if packet.len() > self.cfg.max_message_bytes {
                self.close_session(skey, CloseReason::MessageTooBig);
                return self.eio_refuse(key, req, EioError::BadRequest, &cors, now);
            }
            match session.rate.check(now) {
                Rate::Allow => {}
                Rate::Refuse { warn } => {
                    self.stats.client_errors += 1;
                    if warn {
                        let err = ClientError::RateLimited(self.cfg.max_messages_per_sec);
                        self.reply(Peer::Session(skey), &protocol::error(&err));
                    }
                    continue;
                }
                Rate::Close => {
                    self.close_session(skey, CloseReason::RateLimited);
                    break;
                }
            }
            if let Err(e) = self.on_eio_packet(Peer::Session(skey), packet, received_ns) {
                debug!("socket.io polling protocol error: {e}");
                self.close_session(skey, CloseReason::ProtocolError);
                return self.eio_refuse(key, req, EioError::BadRequest, &cors, now);
            }
        }
        let bytes = {
            let extra: Vec<&str> = cors.iter().map(String::as_str).collect();
            http::response_on(req.keep_alive, 200, "text/html", &extra, b"ok")
        };
        self.respond_polling(key, req, bytes, now);
    }

    /// One Engine.IO packet from a Socket.IO client, on either transport. An error is a
    /// protocol violation: the caller ends the client (close 1002, or 400 and no session).
    fn on_eio_packet(
        &mut self,
        peer: Peer,
        text: &str,
        received_ns: u64,
    ) -> Result<(), engineio::PacketError> {
        let packet = engineio::decode_packet(text)?;
        // A socket still probing speaks only the upgrade's packets; the session is the client.
        if matches!(packet, Packet::Message(_)) && self.upgrading_session(peer).is_some() {
            return Ok(());
        }
        match packet {
            Packet::Message(m) => self.on_sio_packet(peer, m, received_ns),
            Packet::Pong(_) => match peer {
                Peer::Conn(key) => {
                    if let Some(link) = self.conns.get_mut(key).and_then(|c| c.sio.as_mut()) {
                        link.ping_sent = None;
                    }
                }
                Peer::Session(skey) => {
                    if let Some(session) = self.sessions.get_mut(skey) {
                        session.pong();
                    }
                }
            },
            Packet::Ping("probe") if self.upgrading_session(peer).is_some() => {
                let Some(skey) = self.upgrading_session(peer) else {
                    return Ok(());
                };
                self.send_packet(peer, "3probe");
                // From now on the session's polls are answered at once, so the client's paused
                // polling can finish and it sends `5`.
                if let Some(session) = self.sessions.get_mut(skey) {
                    session.probed = true;
                }
                self.answer_poll(skey, Some("6"));
            }
            // Engine.IO v4 clients never ping; one that does gets a short echo, never a long
            // one queued on its behalf.
            Packet::Ping(data) if data.len() <= MAX_PING_ECHO => {
                self.send_packet(peer, &format!("3{data}"))
            }
            Packet::Ping(_) => {}
            Packet::Upgrade => {
                let (Peer::Conn(key), Some(skey)) = (peer, self.upgrading_session(peer)) else {
                    return Err(engineio::PacketError::BadType('5'));
                };
                if !self.sessions.get(skey).is_some_and(|s| s.probed) {
                    return Err(engineio::PacketError::BadType('5'));
                }
                self.complete_upgrade(key, skey);
            }
            Packet::Noop => {}
            Packet::Close => match peer {
                Peer::Conn(key) => {
                    if let Some(conn) = self.conns.get_mut(key) {
                        conn.close_ws(
                            CloseCode::Normal,
                            "",
                            CloseReason::ClientClosed,
                            Instant::now(),
                        );
                    }
                }
                Peer::Session(skey) => self.close_session(skey, CloseReason::ClientClosed),
            },
        }
        Ok(())
    }

    /// The polling session a WebSocket is taking over, if any. Checked by the session's own
    /// record of its prober: a slab key alone could by now name another client's session.
    fn upgrading_session(&self, peer: Peer) -> Option<usize> {
        let Peer::Conn(key) = peer else {
            return None;
        };
        let skey = self.conns.get(key)?.sio.as_ref()?.upgrading_from?;
        self.sessions
            .get(skey)
            .is_some_and(|s| s.prober == Some(key))
            .then_some(skey)
    }

    /// The client sent `5`: the WebSocket becomes the session. The session's rights and
    /// namespace membership move over, its waiting packets follow in order, and a poll still
    /// parked is released with a noop.
    fn complete_upgrade(&mut self, key: usize, skey: usize) {
        let Some(mut session) = self.sessions.try_remove(skey) else {
            return;
        };
        self.session_ids.remove(&session.sid);
        self.session_addresses.remove(session.client);
        self.forget_asks(Peer::Session(skey), Some(Peer::Conn(key)));
        if let Some(ckey) = session.waiting.take()
            && let Some(conn) = self.conns.get_mut(ckey)
        {
            conn.respond(
                Self::poll_response(false, &session.cors, "6"),
                Instant::now(),
            );
            self.stats.messages_sent += conn.flush();
        }
        let Some(conn) = self.conns.get_mut(key) else {
            if session.counted {
                self.stats
                    .client_closed(ClientKind::SocketIoPolling, CloseReason::ClientClosed);
            }
            return;
        };
        if let Some(link) = conn.sio.as_mut() {
            link.upgrading_from = None;
            link.joined = session.joined;
            link.last_ping = Instant::now();
        }
        conn.may_control |= session.may_control;
        conn.rate = session.rate;
        // A session that has not connected yet counts once it does, as this socket.
        if session.counted {
            conn.counted = Some(ClientKind::SocketIoWs);
            self.stats
                .client_moved(ClientKind::SocketIoPolling, ClientKind::SocketIoWs);
        }
        // What the session had queued moves over whole; the queue limit applies from here on.
        for packet in session.take_all() {
            conn.send(&protocol::text_frame(&packet), usize::MAX);
        }
        debug!("socket.io upgraded to websocket peer={}", conn.peer);
    }

    /// A Socket.IO packet: namespace connects, events, disconnects.
    fn on_sio_packet(&mut self, peer: Peer, text: &str, received_ns: u64) {
        let packet = match engineio::decode_sio(text) {
            Ok(p) => p,
            Err(e) => {
                self.stats.client_errors += 1;
                let err = ClientError::BadPacket(e.to_string());
                return self.reply(peer, &protocol::error(&err));
            }
        };
        match packet {
            SioPacket::Connect { nsp, .. } if nsp != "/" => {
                self.send_packet(peer, &engineio::connect_error(&nsp, "Invalid namespace"));
            }
            SioPacket::Connect { .. } if !self.count_client(peer) => {
                // Full: the stock client reports connect_error; the session, never counted,
                // is closed at the handshake timeout and the client may try again.
                self.stats.count_refused(RefuseReason::MaxClients);
                let message = format!(
                    "server full: {} clients connected; try again later",
                    self.stats.clients
                );
                self.send_packet(peer, &engineio::connect_error("/", &message));
            }
            SioPacket::Connect { auth, .. } => {
                let token = auth
                    .as_ref()
                    .and_then(|a| a.get("token"))
                    .and_then(|t| t.as_str());
                let by_auth = match (&self.cfg.control_token, token) {
                    (Some(expected), Some(token)) => http::tokens_match(token, expected),
                    _ => false,
                };
                let may_control = self.set_joined(peer, true, by_auth);
                let Ok(socket_id) = engineio::new_sid() else {
                    return self.send_packet(
                        peer,
                        &engineio::connect_error("/", "cannot create a socket id; try again"),
                    );
                };
                self.send_packet(peer, &engineio::connect_ok(&socket_id));
                let hello = self.hello(may_control);
                self.reply(peer, &hello);
                let timeline = self.timeline.clone();
                self.reply(peer, &timeline);
            }
            SioPacket::Disconnect { .. } => {
                self.set_joined(peer, false, false);
            }
            SioPacket::Event {
                nsp,
                name,
                data,
                ack,
            } => {
                if nsp != "/" || !self.joined(peer) {
                    // Not connected to that namespace: Socket.IO drops such events too.
                    return;
                }
                let may_control = match peer {
                    Peer::Conn(key) => self.conns.get(key).is_some_and(|c| c.may_control),
                    Peer::Session(skey) => self.sessions.get(skey).is_some_and(|s| s.may_control),
                };
                let result = protocol::decode_event(&name, data.as_ref())
                    .and_then(|m| self.on_client_message(peer, m, may_control, received_ns));
                match result {
                    // The callback waits for the cluster's answer (`on_answer`).
                    Ok(Handled::Asked(id)) => self.await_answer(id, ack),
                    // The callback gets {ok:true} (the change itself arrives as bpmChange,
                    // transport, ...) or the error's {ok:false, code, message}.
                    Ok(Handled::Done) => self.conclude(peer, ack, Ok(())),
                    Err(err) => self.conclude(peer, ack, Err(err)),
                }
            }
            SioPacket::Ack => {}
        }
    }

    /// Counts a Socket.IO client at its first namespace connect: true when it is (or already
    /// was) counted, false when `--max-clients` are connected already.
    fn count_client(&mut self, peer: Peer) -> bool {
        let full = self.stats.clients >= self.cfg.max_clients;
        match peer {
            Peer::Conn(key) => match self.conns.get_mut(key) {
                Some(conn) if conn.counted.is_some() => true,
                Some(_) if full => false,
                Some(conn) => {
                    conn.counted = Some(ClientKind::SocketIoWs);
                    self.stats.client_opened(ClientKind::SocketIoWs);
                    true
                }
                None => false,
            },
            Peer::Session(skey) => match self.sessions.get_mut(skey) {
                Some(session) if session.counted => true,
                Some(_) if full => false,
                Some(session) => {
                    session.counted = true;
                    self.stats.client_opened(ClientKind::SocketIoPolling);
                    true
                }
                None => false,
            },
        }
    }

    /// Joins or leaves the default namespace; `grant` adds control rights (a token in the
    /// connect packet's `auth`). Returns whether the client may control.
    fn set_joined(&mut self, peer: Peer, joined: bool, grant: bool) -> bool {
        match peer {
            Peer::Conn(key) => match self.conns.get_mut(key) {
                Some(conn) => {
                    if let Some(link) = conn.sio.as_mut() {
                        link.joined = joined;
                    }
                    conn.may_control |= grant;
                    conn.may_control
                }
                None => false,
            },
            Peer::Session(skey) => match self.sessions.get_mut(skey) {
                Some(session) => {
                    session.joined = joined;
                    session.may_control |= grant;
                    session.may_control
                }
                None => false,
            },
        }
    }

    fn joined(&self, peer: Peer) -> bool {
        match peer {
            Peer::Conn(key) => self
                .conns
                .get(key)
                .and_then(|c| c.sio.as_ref())
                .is_some_and(|l| l.joined),
            Peer::Session(skey) => self.sessions.get(skey).is_some_and(|s| s.joined),
        }
    }

    /// Sends a raw Engine.IO packet to a Socket.IO client.
    fn send_packet(&mut self, peer: Peer, packet: &str) {
        match peer {
            Peer::Conn(key) => {
                if let Some(conn) = self.conns.get_mut(key) {
                    conn.send(&protocol::text_frame(packet), self.cfg.max_queue);
                }
            }
            Peer::Session(skey) => {
                let limit = self.cfg.max_queue;
                let pushed = self
                    .sessions
                    .get_mut(skey)
                    .map(|s| s.push(packet.into(), limit));
                match pushed {
                    Some(true) => self.answer_poll(skey, None),
                    Some(false) => self.close_session(skey, CloseReason::SlowConsumer),
                    None => {}
                }
            }
        }
    }

    /// Sends one event to one client, in its protocol.
    fn reply(&mut self, peer: Peer, event: &Outgoing) {
        let is_sio = match peer {
            Peer::Conn(key) => self.conns.get(key).is_some_and(|c| c.sio.is_some()),
            Peer::Session(_) => true,
        };
        if is_sio {
            self.send_packet(peer, &engineio::event(event.name, &event.data));
        } else if let Some(conn) = self.conns.get_mut(key_of(peer)) {
            conn.send(&event.frame(), self.cfg.max_queue);
        }
    }

    /// Answers the session's parked GET with what is queued (or `fallback` when nothing is).
    fn answer_poll(&mut self, skey: usize, fallback: Option<&str>) {
        let Some(session) = self.sessions.get_mut(skey) else {
            return;
        };
        let Some(ckey) = session.waiting else {
            return;
        };
        let Some(body) = session
            .take_payload(EIO_MAX_PAYLOAD)
            .or_else(|| fallback.map(str::to_string))
        else {
            return;
        };
        session.waiting = None;
        if let Some(conn) = self.conns.get_mut(ckey) {
            let bytes = Self::poll_response(conn.parked_keep_alive(), &session.cors, &body);
            conn.answer_parked(bytes, Instant::now());
            self.stats.messages_sent += conn.flush();
            if conn.is_done() {
                self.finished.push(ckey);
            }
        }
    }

    /// Ends a polling session: a parked GET gets Engine.IO's close packet (a stock client then
    /// reconnects), a WebSocket probing to take it over is closed, and later requests with its
    /// id get 400.
    fn close_session(&mut self, skey: usize, reason: CloseReason) {
        let Some(session) = self.sessions.try_remove(skey) else {
            return;
        };
        self.session_ids.remove(&session.sid);
        self.session_addresses.remove(session.client);
        self.forget_asks(Peer::Session(skey), None);
        // A session that never connected was never a client.
        if session.counted {
            self.stats
                .client_closed(ClientKind::SocketIoPolling, reason);
        }
        debug!("socket.io session closed reason={}", reason.label());
        let now = Instant::now();
        if let Some(ckey) = session.waiting
            && let Some(conn) = self.conns.get_mut(ckey)
        {
            conn.respond(Self::poll_response(false, &session.cors, "1"), now);
            self.stats.messages_sent += conn.flush();
        }
        if let Some(ckey) = session.prober
            && let Some(conn) = self.conns.get_mut(ckey)
        {
            conn.close_ws(CloseCode::Away, "session closed", reason, now);
            self.stats.messages_sent += conn.flush();
        }
    }

    fn on_message(&mut self, key: usize, message: Message) {
        // A ping's receive time: taken before anything else is done with the message.
        let received_ns = self.clock.unix_now_ns();
        let is_sio = self.conns.get(key).is_some_and(|c| c.sio.is_some());
        if is_sio {
            if let Message::Text(text) = &message
                && let Err(e) = self.on_eio_packet(Peer::Conn(key), text, received_ns)
                && let Some(conn) = self.conns.get_mut(key)
            {
                debug!("socket.io protocol error peer={}: {e}", conn.peer);
                conn.close_ws(
                    CloseCode::Protocol,
                    "Engine.IO protocol error",
                    CloseReason::ProtocolError,
                    Instant::now(),
                );
            } else if let Message::Binary(_) = message {
                self.stats.client_errors += 1;
                self.reply(Peer::Conn(key), &protocol::error(&ClientError::Binary));
            }
            return;
        }
        let may_control = self.conns.get(key).is_some_and(|c| c.may_control);
        let result = match message {
            Message::Text(text) => protocol::decode(&text)
                .and_then(|m| self.on_client_message(Peer::Conn(key), m, may_control, received_ns)),
            Message::Binary(_) => Err(ClientError::Binary),
            // tungstenite answers pings and handles the close handshake itself.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => {
                Ok(Handled::Done)
            }
        };
        if let Err(err) = result {
            self.conclude(Peer::Conn(key), None, Err(err));
        }
    }

    fn on_client_message(
        &mut self,
        peer: Peer,
        message: ClientMessage,
        may_control: bool,
        received_ns: u64,
    ) -> Result<Handled, ClientError> {
        match message {
            ClientMessage::Ping(t0) => {
                // Stamped as late as possible and written at once, not at the next writable
                // event: the client's offset estimate assumes t2 is the send.
                let pong = protocol::pong(t0, received_ns, self.clock.unix_now_ns());
                self.reply(peer, &pong);
                if let Peer::Conn(key) = peer
                    && let Some(conn) = self.conns.get_mut(key)
                {
                    self.stats.messages_sent += conn.flush();
                }
                Ok(Handled::Done)
            }
            ClientMessage::SetBpm(_) | ClientMessage::Start(_) | ClientMessage::Stop
                if !may_control =>
            {
                Err(ClientError::Unauthorized)
            }
            ClientMessage::Start(_) | ClientMessage::Stop if self.cluster.is_some() => {
                let (state, request) = match message {
                    ClientMessage::Start(q) => (TransportState::Playing, ClusterRequest::Start(q)),
                    _ => (TransportState::Stopped, ClusterRequest::Stop),
                };
                if state == self.transport.state() {
                    let confirm = protocol::transport(&self.transport_data());
                    self.reply(peer, &confirm);
                    return Ok(Handled::Done);
                }
                self.ask_cluster(peer, request)
            }
            ClientMessage::Start(quantize) => self
                .change_transport(peer, TransportState::Playing, quantize)
                .map(|()| Handled::Done),
            ClientMessage::Stop => self
                .change_transport(peer, TransportState::Stopped, Quantize::None)
                .map(|()| Handled::Done),
            ClientMessage::SetBpm(value) => {
                let bpm = protocol::check_bpm(value, self.cfg.min_bpm, self.cfg.max_bpm)?;
                // In a cluster the shared timeline is the reference: a request lost with Redis
                // must not make its retry look like a no-op.
                let current = match self.cluster.as_ref().and_then(|l| l.shared) {
                    Some(shared) => shared.bpm(),
                    None => self.requested_bpm,
                };
                if bpm == current {
                    // Nothing changes for anyone else: confirm to the sender only, so one
                    // client cannot make the server write to every client at will.
                    self.reply(peer, &protocol::bpm_change(bpm));
                    return Ok(Handled::Done);
                }
                if self.cluster.is_some() {
                    return self.ask_cluster(peer, ClusterRequest::SetBpm(bpm));
                }
                // Every change is a write to every client; cap them server-wide.
                if self.control_changes.check(Instant::now()) != Rate::Allow {
                    return Err(ClientError::Busy);
                }
                if !self.timing.send(TimingCommand::SetTempo(bpm)) {
                    return Err(ClientError::Busy);
                }
                self.requested_bpm = bpm;
                Ok(Handled::Done)
            }
        }
    }

    /// Hands a tempo or transport change to the cluster thread, which writes it to the shared
    /// timeline; it comes back (here and on every other instance) as an `Adopt`, and its
    /// outcome as an `Answer` for `peer` ([`Self::on_answer`]).
    fn ask_cluster(&mut self, peer: Peer, request: ClusterRequest) -> Result<Handled, ClientError> {
        let Some(link) = self.cluster.as_mut() else {
            return Ok(Handled::Done);
        };
        if !link.status.connected {
            let fault = link.status.fault.unwrap_or(ClusterFault::Unreachable);
            return Err(ClientError::ClusterUnavailable(fault.describe()));
        }
        if link.pending.len() >= MAX_PENDING_ASKS
            || self.control_changes.check(Instant::now()) != Rate::Allow
        {
            return Err(ClientError::Busy);
        }
        let id = link.next_id;
        if !link.thread.send(id, request) {
            return Err(ClientError::Busy);
        }
        link.next_id += 1;
        link.pending.push(PendingAsk {
            id,
            peer,
            ack: None,
            tempo: matches!(request, ClusterRequest::SetBpm(_)),
            asked: Instant::now(),
        });
        Ok(Handled::Asked(id))
    }

    /// The cluster thread's outcome for a request: the asker hears it (its Socket.IO callback,
    /// or an `error` event), whatever became of it. Success needs no word to a `/ws` client:
    /// the change reaches it like everyone else.
    fn on_answer(&mut self, id: u64, outcome: Outcome) {
        let Some(link) = self.cluster.as_mut() else {
            return;
        };
        let Some(i) = link.pending.iter().position(|p| p.id == id) else {
            return;
        };
        let ask = link.pending.swap_remove(i);
        let shared_bpm = link.shared.map(|s| s.bpm());
        let result = match outcome {
            Outcome::Applied => Ok(()),
            Outcome::Unchanged => {
                // Already so: confirm to the asker alone, as without a cluster.
                let confirm = if ask.tempo {
                    protocol::bpm_change(shared_bpm.unwrap_or(self.bpm))
                } else {
                    protocol::transport(&self.transport_data())
                };
                self.reply(ask.peer, &confirm);
                Ok(())
            }
            Outcome::Failed(fault) => Err(ClientError::ClusterUnavailable(fault.describe())),
            Outcome::Lost => Err(ClientError::Busy),
        };
        self.conclude(ask.peer, ask.ack, result);
    }

    /// Tells a client how its event ended: through its Socket.IO callback when it passed one
    /// (`{ok:true}`, or `{ok:false, error:{code,message}}`), else an `error` event on failure.
    fn conclude(&mut self, peer: Peer, ack: Option<u64>, result: Result<(), ClientError>) {
        if let Err(err) = &result {
            self.stats.client_errors += 1;
            if ack.is_none() {
                self.reply(peer, &protocol::error(err));
            }
        }
        if let Some(id) = ack {
            let arg = match result {
                Ok(()) => r#"{"ok":true}"#.to_string(),
                Err(err) => {
                    let e = protocol::error(&err);
                    format!(r#"{{"ok":false,"error":{}}}"#, e.data)
                }
            };
            self.send_packet(peer, &engineio::ack(id, &arg));
        }
    }

    /// Keeps a Socket.IO callback id for the answer to cluster request `id`.
    fn await_answer(&mut self, id: u64, ack: Option<u64>) {
        if let Some(ask) = self
            .cluster
            .as_mut()
            .and_then(|l| l.pending.iter_mut().find(|p| p.id == id))
        {
            ask.ack = ack;
        }
    }

    /// Forgets the requests of a client that is gone (its key may be reused at once), or moves
    /// them to the socket that took its session over (`to`).
    fn forget_asks(&mut self, peer: Peer, to: Option<Peer>) {
        if let Some(link) = self.cluster.as_mut() {
            match to {
                None => link.pending.retain(|p| p.peer != peer),
                Some(to) => link
                    .pending
                    .iter_mut()
                    .filter(|p| p.peer == peer)
                    .for_each(|p| p.peer = to),
            }
        }
    }

    /// Requests the cluster thread has not answered within [`ASK_TIMEOUT`] (it never should
    /// take that long: Redis calls time out after 2 s) are refused rather than left hanging.
    fn expire_asks(&mut self, now: Instant) {
        let Some(link) = self.cluster.as_mut() else {
            return;
        };
        if link
            .pending
            .iter()
            .all(|p| now.duration_since(p.asked) < ASK_TIMEOUT)
        {
            return;
        }
        let (late, waiting): (Vec<PendingAsk>, Vec<PendingAsk>) = link
            .pending
            .drain(..)
            .partition(|p| now.duration_since(p.asked) >= ASK_TIMEOUT);
        link.pending = waiting;
        for ask in late {
            let err = ClientError::ClusterUnavailable("did not answer the request in time");
            self.conclude(ask.peer, ask.ack, Err(err));
        }
    }

    /// Takes what the cluster thread reports: status, and timelines to adopt.
    fn drain_cluster(&mut self) {
        loop {
            let Some(link) = self.cluster.as_mut() else {
                return;
            };
            let Ok(event) = link.events.pop() else {
                return;
            };
            match event {
                ClusterEvent::Status(status) => link.status = status,
                ClusterEvent::Adopt(shared) => self.adopt(shared),
                ClusterEvent::Answer { id, outcome } => self.on_answer(id, outcome),
            }
        }
    }

    /// Follows a shared timeline: the tempo through the timing thread (which announces it
    /// back as a `Tempo`), the transport here.
    fn adopt(&mut self, shared: SharedTimeline) {
        if shared.ppqn != self.cfg.ppqn || !(1..=1_000_000).contains(&shared.bpm_milli) {
            warn!(
                "cluster: ignoring timeline version {} with ppqn {} (ours is {}); give every \
                 instance the same --ppqn",
                shared.version, shared.ppqn, self.cfg.ppqn
            );
            return;
        }
        if let Some(link) = self.cluster.as_mut() {
            if link.shared == Some(shared) {
                return;
            }
            link.shared = Some(shared);
        }
        let schedule = shared.schedule(&self.clock);
        if schedule != self.schedule {
            self.requested_bpm = shared.bpm();
            // The ring holds 64 commands; the loop sends one per adopted change.
            if !self.timing.send(TimingCommand::Adopt(schedule)) {
                warn!(
                    "cluster: timing thread busy; timeline version {} late",
                    shared.version
                );
            }
        }
        let transport = shared.transport();
        if transport != self.transport {
            self.transport = transport;
            self.transport_unix_ns = shared.transport_unix_ns;
            info!(
                "transport {} from tick {} (cluster v{})",
                transport.state(),
                transport.from_count(),
                shared.version
            );
            self.stats.transport_changes += 1;
            let announce = protocol::transport(&self.transport_data());
            self.refresh_timeline();
            let timeline = self.timeline.clone();
            self.broadcast(announce);
            self.broadcast(timeline);
        }
    }

    /// Starts or stops the transport. A start falls on the first tick that is both quantised
    /// and at least [`START_LEAD_NS`] away; a stop takes effect from the next tick.
    fn change_transport(
        &mut self,
        peer: Peer,
        state: TransportState,
        quantize: Quantize,
    ) -> Result<(), ClientError> {
        let next = self.next_count;
        let from = match state {
            TransportState::Stopped => next,
            TransportState::Playing => {
                let earliest = self
                    .schedule
                    .first_count_at_or_after(self.clock.now_ns() + START_LEAD_NS);
                let quantum = quantize.ticks(self.cfg.ppqn, self.cfg.beats_per_bar);
                transport::start_count(next, earliest, quantum)
            }
        };
        let mut changed = self.transport;
        if !changed.change(state, from, next) {
            // Already heading there: confirm to the sender only, as for a repeated setBpm.
            let confirm = protocol::transport(&self.transport_data());
            self.reply(peer, &confirm);
            return Ok(());
        }
        if self.control_changes.check(Instant::now()) != Rate::Allow {
            return Err(ClientError::Busy);
        }
        self.transport = changed;
        self.transport_unix_ns = self
            .clock
            .unix_ns(self.schedule.deadline_ns(changed.from_count()));
        info!("transport {state} from tick {}", changed.from_count());
        self.stats.transport_changes += 1;
        let announce = protocol::transport(&self.transport_data());
        self.refresh_timeline();
        self.broadcast(announce);
        // Taken after that fan-out: a change made during its pauses is the newer timeline.
        let timeline = self.timeline.clone();
        self.broadcast(timeline);
        Ok(())
    }

    fn transport_data(&self) -> TransportData {
        TransportData::new(
            self.transport.state(),
            self.transport.from_count(),
            self.transport_instant(),
        )
    }

    /// When the transport's current state begins (or began), unix ns.
    fn transport_instant(&self) -> u64 {
        let from = self.transport.from_count();
        // The current schedule knows counts from its anchor on; an older state began under an
        // older schedule, whose instant was kept. A cluster's timeline carries its own.
        match self.cluster.as_ref().and_then(|l| l.shared) {
            Some(shared) => shared.transport_unix_ns,
            None if from >= self.schedule.anchor_count() => {
                self.clock.unix_ns(self.schedule.deadline_ns(from))
            }
            None => self.transport_unix_ns,
        }
    }

    /// Rebuilds the cached `timeline` after a tempo or transport change.
    fn refresh_timeline(&mut self) {
        self.timeline = self.encode_timeline();
        self.timeline_frame = self.timeline.frame();
        self.save_state();
    }

    /// Hands the state to the writer thread (`--state`); it writes off the loop.
    fn save_state(&mut self) {
        if self.state.is_none() {
            return;
        }
        let transport_unix_ns = self.transport_instant();
        let state = Persisted::of(
            &self.schedule,
            &self.transport,
            transport_unix_ns,
            self.cfg.beats_per_bar,
            &self.clock,
        );
        if let Some(writer) = self.state.as_mut() {
            writer.save(state);
        }
    }

    fn encode_timeline(&self) -> Outgoing {
        let s = self.schedule;
        let anchor_unix_ns = self.clock.unix_ns(s.anchor_ns());
        protocol::timeline(&TimelineData {
            count: s.anchor_count(),
            time_us: anchor_unix_ns / 1_000,
            time: anchor_unix_ns / 1_000_000,
            bpm: s.bpm(),
            ppqn: s.ppqn(),
            beats_per_bar: self.cfg.beats_per_bar,
            interval_us: s.interval_ns() / 1_000.0,
            transport: self.transport_data(),
        })
    }

    /// Takes every event the timing thread has queued, in order.
    fn drain_timing(&mut self) {
        // Inside a fan-out's pause: the next tick waits for this fan-out to finish, so that
        // every client gets its frames in order.
        if self.in_fanout {
            return;
        }
        while let Ok(event) = self.timing_events.pop() {
            match event {
                TimingEvent::Tick(tick) => {
                    self.busy_poll_until = None;
                    self.on_tick(tick);
                }
                TimingEvent::Soon { deadline_ns } => {
                    // Poll without sleeping until the tick is here (bounded, in case a tempo
                    // change moves it later).
                    self.busy_poll_until = Some(self.clock.instant(deadline_ns) + BUSY_POLL_GRACE);
                }
                // Taken by `bind` before the loop runs; the thread sends it only once.
                TimingEvent::Started(_) => {}
                TimingEvent::Skipped { ticks, to } => self.on_skip(ticks, to),
                TimingEvent::Exhausted => error!(
                    "timing: the tick count reached its end (u64::MAX); no ticks until the \
                     timeline changes"
                ),
                TimingEvent::Tempo(schedule) => {
                    let bpm = schedule.bpm();
                    // A cluster's change is announced a lead ahead; /stats and hello report
                    // the tempo ticks are at until its anchor is reached (on_tick).
                    if schedule.anchor_count() <= self.next_count {
                        self.bpm = bpm;
                    }
                    self.schedule = schedule;
                    self.refresh_timeline();
                    self.stats.tempo_changes += 1;
                    info!("tempo {bpm} BPM from tick {}", schedule.anchor_count());
                    if self.shutdown_by.is_none() {
                        self.broadcast(protocol::bpm_change(bpm));
                        let timeline = self.timeline.clone();
                        self.broadcast(timeline);
                    }
                }
            }
        }
    }

    /// The timing thread fell behind and skipped ticks. Said once, then at most once per
    /// [`SKIP_LOG_EVERY`] with the total since, so a machine that keeps stalling does not
    /// flood the log.
    fn on_skip(&mut self, ticks: u64, to: u64) {
        self.next_count = self.next_count.max(to);
        self.skips_unlogged += ticks;
        let now = Instant::now();
        if self
            .skip_logged_at
            .is_none_or(|at| now.duration_since(at) >= SKIP_LOG_EVERY)
        {
            warn!(
                "timing: fell behind and skipped {} ticks rather than send them at once (next \
                 is tick {to}); was the process stopped, or is the machine overloaded?",
                self.skips_unlogged
            );
            self.skips_unlogged = 0;
            self.skip_logged_at = Some(now);
        }
    }

    fn on_tick(&mut self, tick: Tick) {
        self.stats.record_tick(tick.lateness_ns());
        if tick.lateness_ns() > stats::LATE_TICK_NS {
            debug!(
                "late tick count={} lateness_us={}",
                tick.count,
                tick.lateness_ns() / 1000
            );
        }
        let taken = self.clock.now_ns();
        self.stats
            .handoff
            .record(taken.saturating_sub(tick.emitted_ns));
        self.count = tick.count;
        self.next_count = tick.count.saturating_add(1);
        self.last_tick_at = Instant::now();
        self.bpm = tick.bpm;
        if self.shutdown_by.is_some() || !self.transport.plays(tick.count) {
            return;
        }
        let data = TickData::new(
            self.clock.unix_ns(tick.deadline_ns),
            tick.bpm,
            tick.count,
            self.cfg.ppqn,
        );
        self.broadcast(protocol::tick(&data));
        let done = self.clock.now_ns();
        self.stats
            .fanout
            .record(done.saturating_sub(tick.deadline_ns));
    }

    /// Sends `event` to every client, encoded once per protocol. Clients already `max_queue`
    /// frames behind are closed as slow consumers instead; they never hold up the rest.
    ///
    /// Every [`FANOUT_CHUNK`] clients it pauses to serve what has arrived (pings above all).
    /// A broadcast asked for during a pause is queued and sent after this one, so frames
    /// reach every client in order.
    fn broadcast(&mut self, event: Outgoing) {
        if self.in_fanout {
            self.deferred.push(event);
            return;
        }
        self.in_fanout = true;
        self.fan_out(&event);
        while !self.deferred.is_empty() {
            for event in std::mem::take(&mut self.deferred) {
                self.fan_out(&event);
            }
        }
        self.in_fanout = false;
    }

    fn encode(&self, event: &Outgoing) -> Encoded {
        let sio_clients = self.stats.clients_of(ClientKind::SocketIoWs)
            + self.stats.clients_of(ClientKind::SocketIoPolling);
        let sio = (sio_clients > 0).then(|| {
            let packet = engineio::event(event.name, &event.data);
            (protocol::text_frame(&packet), Arc::from(packet))
        });
        Encoded {
            plain: event.frame(),
            sio,
        }
    }

    fn fan_out(&mut self, event: &Outgoing) {
        let encoded = self.encode(event);
        let now = Instant::now();
        let limit = self.cfg.max_queue;
        let mut since_pause = 0;
        // By index, not by iterator: the pauses may add and remove connections. A client that
        // connects during a pause at a higher key gets this frame too, which is harmless.
        for key in 0.. {
            if key >= self.conns.capacity() {
                break;
            }
            if since_pause == FANOUT_CHUNK {
                self.serve_pause();
                since_pause = 0;
            }
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if !conn.takes_broadcasts() {
                continue;
            }
            since_pause += 1;
            let frame = match (&conn.sio, &encoded.sio) {
                (None, _) => &encoded.plain,
                (Some(_), Some((frame, _))) => frame,
                // A Socket.IO socket with no Socket.IO client counted: only while it is still
                // probing, and those take no broadcasts.
                (Some(_), None) => continue,
            };
            if !conn.send(frame, limit) {
                debug!("slow consumer peer={} queued={}", conn.peer, conn.queued());
                conn.close_ws(
                    CloseCode::Policy,
                    "too slow: fell behind the ticks",
                    CloseReason::SlowConsumer,
                    now,
                );
            }
            self.stats.messages_sent += conn.flush();
            count_close(&mut self.stats, conn);
            if conn.is_done() {
                self.finished.push(key);
            }
        }
        if let Some((_, packet)) = &encoded.sio {
            // No pauses here, so the slab's keys stay put.
            for skey in 0..self.sessions.capacity() {
                let Some(session) = self.sessions.get_mut(skey) else {
                    continue;
                };
                if !session.joined {
                    continue;
                }
                if session.push(Arc::clone(packet), limit) {
                    self.answer_poll(skey, None);
                } else {
                    self.close_session(skey, CloseReason::SlowConsumer);
                }
            }
        }
        self.remove_finished();
    }

    /// One pause in a fan-out: handles whatever the sockets have ready (clock-sync pings,
    /// tempo requests, new connections), without waiting. Timing events stay queued.
    fn serve_pause(&mut self) {
        self.remove_finished();
        let Some(mut events) = self.fanout_events.take() else {
            return;
        };
        match self.poll.poll(&mut events, Some(Duration::ZERO)) {
            // The timing ring is drained after the fan-out (`drain_timing` waits for it).
            Ok(()) => {
                for event in events.iter() {
                    match event.token() {
                        // The connection being handled right now: after it is done.
                        Token(key) if self.driving == Some(key) => self.readable_again.push(key),
                        _ => self.on_event(event),
                    }
                }
            }
            Err(e) => debug!("poll during fan-out failed: {e}"),
        }
        self.fanout_events = Some(events);
    }

    fn remove_finished(&mut self) {
        let mut finished = std::mem::take(&mut self.finished);
        for key in finished.drain(..) {
            // The list can outlive a pause in which the key was removed and reused by a new
            // connection: only a connection that is really done goes.
            if self.conns.get(key).is_some_and(Connection::is_done) {
                self.remove(key);
            }
        }
        self.finished = finished;
    }

    fn housekeeping(&mut self, now: Instant) {
        let timeout = self.cfg.handshake_timeout;
        let (interval, ping_timeout) = (self.cfg.ping_interval, self.cfg.ping_timeout);
        // Sampling a socket for a stall costs a system call: with many clients each is sampled
        // every few rounds (the watch measures time, not samples).
        let stride = 1 + self.conns.len() / STALL_SAMPLES_PER_ROUND;
        let round = self.housekeeping_round;
        self.housekeeping_round = round.wrapping_add(1);
        for (key, conn) in self.conns.iter_mut() {
            if conn.expire(now, timeout) {
                self.stats.count_refused(RefuseReason::HandshakeTimeout);
            }
            if (key.wrapping_add(round)) % stride == 0 && conn.check_stall(now) {
                debug!("stalled client peer={}: not reading", conn.peer);
            }
            if conn.sio_connect_overdue(now, timeout) {
                self.stats.count_refused(RefuseReason::ConnectTimeout);
                conn.close_ws(
                    CloseCode::Policy,
                    "no Socket.IO connect within the handshake timeout",
                    CloseReason::ProtocolError,
                    now,
                );
            }
            if conn.sio.is_some() {
                conn.eio_heartbeat(now, interval, ping_timeout, &self.eio_ping);
            } else {
                conn.keep_alive(now, interval, ping_timeout);
            }
            self.stats.messages_sent += conn.flush();
            count_close(&mut self.stats, conn);
            if conn.is_done() {
                self.finished.push(key);
            }
        }
        self.remove_finished();
        let mut dead = Vec::new();
        let mut due = Vec::new();
        let mut unconnected = Vec::new();
        for (skey, session) in self.sessions.iter_mut() {
            if session.connect_overdue(now, timeout) {
                unconnected.push(skey);
                continue;
            }
            match session.health(now, interval, ping_timeout) {
                Health::Fine => {}
                Health::Ping => due.push(skey),
                Health::Dead => dead.push(skey),
            }
        }
        for skey in due {
            self.send_packet(Peer::Session(skey), "2");
        }
        for skey in dead {
            self.close_session(skey, CloseReason::PingTimeout);
        }
        for skey in unconnected {
            self.stats.count_refused(RefuseReason::ConnectTimeout);
            self.close_session(skey, CloseReason::PingTimeout);
        }
        self.remove_finished();
        self.expire_asks(now);
        if let Some(writer) = self.state.as_mut() {
            writer.retry();
        }
        if self.accept_paused_until.is_some_and(|until| now >= until) {
            self.accept_paused_until = None;
            self.accept();
        }
    }

    fn on_signal(&mut self) {
        let mut stop = false;
        for signal in self.signals.pending() {
            if signal == SIGTERM || signal == SIGINT {
                stop = true;
            }
        }
        if stop && self.shutdown_by.is_none() {
            self.begin_shutdown();
        }
    }

    /// Stops accepting, says goodbye (1001, or Engine.IO's close packet to a parked poll) to
    /// every client and gives them a second to hear it.
    fn begin_shutdown(&mut self) {
        let now = Instant::now();
        info!(
            "shutting down: closing {} connections, {} polling sessions",
            self.conns.len(),
            self.sessions.len()
        );
        self.shutdown_by = Some(now + SHUTDOWN_GRACE);
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        let sessions: Vec<usize> = self.sessions.iter().map(|(k, _)| k).collect();
        for skey in sessions {
            self.close_session(skey, CloseReason::Shutdown);
        }
        for (key, conn) in self.conns.iter_mut() {
            match conn.state() {
                State::Open { .. } => {
                    conn.close_ws(
                        CloseCode::Away,
                        "server shutting down",
                        CloseReason::Shutdown,
                        now,
                    );
                    self.stats.messages_sent += conn.flush();
                }
                State::Http { .. } | State::Parked { .. } => conn.abort(CloseReason::Shutdown),
                State::Closing { .. } | State::Done => {}
            }
            count_close(&mut self.stats, conn);
            if conn.is_done() {
                self.finished.push(key);
            }
        }
        self.remove_finished();
    }

    /// How long no tick has gone out while the transport plays, once that is longer than
    /// [`stats::SILENT_TICKS`] intervals: a server that answers but sends nothing is not
    /// healthy.
    fn silent_for(&self, now: Instant) -> Option<Duration> {
        let playing = self.transport.plays(self.next_count) && self.shutdown_by.is_none();
        stats::silence(
            now.saturating_duration_since(self.last_tick_at),
            self.schedule.interval_ns(),
            playing,
        )
    }

    fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            bpm: self.bpm,
            ppqn: self.cfg.ppqn,
            clients: self.stats.clients,
            count: self.count,
            transport: self.transport.state_at(self.next_count).label(),
            transport_count: self.transport.from_count(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            dropped_ticks: self.timing.dropped_ticks(),
            skipped_ticks: self.timing.skipped_ticks(),
            silent_for: self.silent_for(Instant::now()),
            cluster: self.cluster.as_ref().map(|l| l.status),
            stats: &self.stats,
        }
    }
}

/// Starts the cluster thread and waits (briefly) for the shared timeline, so that a joining
/// instance's first tick is already in phase with the others. Without an answer in time it
/// starts on its own timeline and adopts the shared one once Redis answers.
fn join_cluster(
    cfg: &Config,
    url: &str,
    name: &str,
    lead: Duration,
    clock: Clock,
    waker: &Arc<Waker>,
    resumed: Option<SharedTimeline>,
) -> Result<(ClusterLink, Option<SharedTimeline>), ServerError> {
    let own = TickSchedule::new(cfg.bpm, cfg.ppqn, clock.now_ns() + 1_000_000);
    // What this instance writes if Redis has no timeline yet: the state file's, if any.
    let local = resumed.unwrap_or_else(|| SharedTimeline::from_schedule(&own, &clock));
    let cluster_cfg = ClusterConfig {
        url: url.to_string(),
        name: name.to_string(),
        lead,
        start_lead: Duration::from_nanos(START_LEAD_NS),
        beats_per_bar: cfg.beats_per_bar,
        limits: TimelineLimits {
            min_bpm: cfg.min_bpm,
            max_bpm: cfg.max_bpm,
            ppqn: cfg.ppqn,
            beats_per_bar: cfg.beats_per_bar,
        },
    };
    let (thread, mut events) = ClusterThread::spawn(cluster_cfg, local, Arc::clone(waker))
        .map_err(ServerError::Cluster)?;
    let mut status = ClusterStatus::default();
    let mut joined = None;
    let give_up = Instant::now() + CLUSTER_JOIN_WAIT;
    while joined.is_none() && Instant::now() < give_up {
        match events.pop() {
            Ok(ClusterEvent::Adopt(shared)) if shared.ppqn == cfg.ppqn => joined = Some(shared),
            Ok(ClusterEvent::Adopt(shared)) => {
                warn!(
                    "cluster {name}: its timeline has ppqn {}, ours {}; starting on our own",
                    shared.ppqn, cfg.ppqn
                );
                break;
            }
            Ok(ClusterEvent::Status(s)) => status = s,
            Ok(ClusterEvent::Answer { .. }) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    match joined {
        Some(shared) => info!(
            "cluster {name}: joined timeline version {} at {} BPM",
            shared.version,
            shared.bpm()
        ),
        None => warn!(
            "cluster {name}: no timeline from Redis within {} s; ticking on our own until it answers",
            CLUSTER_JOIN_WAIT.as_secs()
        ),
    }
    let link = ClusterLink {
        thread,
        events,
        status,
        shared: None,
        pending: Vec::new(),
        next_id: 1,
    };
    Ok((link, joined))
}

fn key_of(peer: Peer) -> usize {
    match peer {
        Peer::Conn(key) | Peer::Session(key) => key,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Waits for the timing thread's first event, the schedule tick 0 runs on, so that the very
/// first client's timeline is already the real one.
fn first_schedule(events: &mut TimingEvents) -> io::Result<TickSchedule> {
    let give_up = Instant::now() + Duration::from_secs(5);
    loop {
        match events.pop() {
            Ok(TimingEvent::Started(schedule)) => return Ok(schedule),
            Ok(_) => {}
            Err(_) if Instant::now() < give_up => std::thread::sleep(Duration::from_micros(100)),
            Err(_) => {
                return Err(io::Error::other(
                    "the timing thread did not report its schedule within 5 s",
                ));
            }
        }
    }
}

/// Counts a client's close once, when it happens (not when its socket is finally dropped, which
/// may be seconds later for a slow consumer). A socket still probing a Socket.IO upgrade was
/// never counted, so its close is not either.
fn count_close(stats: &mut ServerStats, conn: &mut Connection) {
    if let Some(reason) = conn.take_close_reason()
        && let Some(kind) = conn.counted.take()
    {
        stats.client_closed(kind, reason);
        debug!(
            "{} closed peer={} reason={}",
            kind.label(),
            conn.peer,
            reason.label()
        );
    }
}
