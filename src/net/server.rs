//! The reactor: one `mio::Poll` that accepts, serves HTTP, speaks WebSocket and Engine.IO, and
//! carries out the hub's effects, fan-outs above all.
//!
//! This module owns the listening socket, the slab of [`Socket`]s, the slab of
//! [`EioSession`]s, the routes from the hub's clients to them, and the [`ServerStats`]. It
//! decides nothing about rooms, tempo or control: it decodes what clients send, asks the
//! [`Hub`], and does what the hub says, in the order described in [`crate::net`]. It must not
//! sleep, block or compute tick times.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
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
    ClusterConfig, ClusterEvent, ClusterEvents, ClusterRequest, ClusterStatus, ClusterThread,
    SharedTimeline,
};
use crate::config::Config;
use crate::connection::{Connection, HeadRead, Rate, RateLimit, State, WsRead};
use crate::hub::{ClientId, ClusterAsk, Control, Effect, Hub, HubConfig, JoinError};
use crate::lead::{self, LeadPolicy};
use crate::metrics;
use crate::room::{RoomKey, RoomName};
use crate::room_timing::{TimingConfig, TimingEvent, TimingEvents, TimingThread};
use crate::rt;
use crate::stats::{self, ClientKind, CloseReason, RefuseReason, ServerStats, Snapshot};
use crate::tempo::Bpm;
use crate::timeline::{Change, Timeline};
use crate::timing::Realtime;
use crate::transport::TransportState;
use crate::wire::engineio::{self, EioError, Packet, SioPacket, Transport as EioTransport};
use crate::wire::http::{self, Request, Route as HttpRoute};
use crate::wire::protocol::{self, ClientError, ClientMessage, Outgoing, SharedFrame};

use super::eio::{ConnKey, EioSession, Joined, Link};
use super::heartbeat::{Beat, Heartbeat};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const SIGNALS: Token = Token(usize::MAX - 3);

/// How often deadlines (handshake timeouts, heartbeats, idle rooms) are checked.
const HOUSEKEEPING: Duration = Duration::from_millis(250);
/// How long SIGTERM waits for clients to receive their close frames.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Messages handled from one connection per readiness event before the loop moves on (and
/// comes back after the next poll): one chatty client cannot hold everyone else.
const MESSAGES_PER_EVENT: usize = 64;
/// Members a fan-out writes to before it pauses to read what clients have sent.
pub const FANOUT_CHUNK: usize = 256;
/// The largest long-polling payload the server sends or accepts (Engine.IO's `maxPayload`).
const EIO_MAX_PAYLOAD: usize = 64 * 1024;
/// The longest Engine.IO ping payload echoed back (stock clients send only `probe`).
const MAX_PING_ECHO: usize = 16;
/// How often a `/ws` client is pinged at most: each Pong is a round trip for the lead.
const WS_PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// How long past a tick's deadline the loop keeps busy-polling for it.
const BUSY_POLL_GRACE: Duration = Duration::from_millis(1);
/// How long accepting pauses when the process is out of file descriptors.
const FD_BACKOFF: Duration = Duration::from_millis(250);
/// How long `bind` waits for a cluster's timeline before starting on its own.
const CLUSTER_JOIN_WAIT: Duration = Duration::from_secs(3);

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
}

/// What a socket serves.
enum Owner {
    /// Reading HTTP requests (or parked for a session: see `Connection::parked_for`).
    Http,
    /// A `/ws` client.
    Ws {
        client: ClientId,
        heartbeat: Heartbeat,
    },
    /// The WebSocket of an Engine.IO session: its transport, or probing to become it.
    Eio(usize),
}

struct Socket {
    conn: Connection,
    owner: Owner,
}

/// Where a hub client's frames go.
#[derive(Clone, Copy, Debug)]
enum Via {
    Ws(ConnKey),
    /// An Engine.IO session; `named`: its namespace is `/NAME`, so packets carry the prefix.
    Eio {
        session: usize,
        named: bool,
    },
}

#[derive(Clone, Copy, Debug)]
struct Route {
    generation: u32,
    via: Via,
}

/// A broadcast waiting to be fanned out.
struct Job {
    room: RoomKey,
    event: Outgoing,
    /// For a tick: its deadline, to measure the fan-out against.
    deadline_ns: Option<u64>,
}

/// A broadcast encoded once per protocol, as members need it.
#[derive(Default)]
struct Encoded {
    plain: Option<SharedFrame>,
    /// `42[...]` (`/`), as a WebSocket frame and as a polling packet.
    bare: Option<(SharedFrame, Arc<str>)>,
    /// `42/NAME,[...]`.
    named: Option<(SharedFrame, Arc<str>)>,
}

impl Encoded {
    fn plain(&mut self, event: &Outgoing) -> SharedFrame {
        Arc::clone(self.plain.get_or_insert_with(|| event.frame()))
    }

    fn sio(&mut self, event: &Outgoing, nsp: Option<&str>) -> (SharedFrame, Arc<str>) {
        let slot = if nsp.is_some() {
            &mut self.named
        } else {
            &mut self.bare
        };
        let (frame, packet) = slot.get_or_insert_with(|| {
            let packet = engineio::event_in(nsp.unwrap_or("/"), event.name, &event.data);
            (protocol::text_frame(&packet), Arc::from(packet))
        });
        (Arc::clone(frame), Arc::clone(packet))
    }
}

/// The loop's side of a cluster (`--cluster`).
struct ClusterLink {
    thread: ClusterThread,
    events: ClusterEvents,
    status: ClusterStatus,
    /// The shared timeline last adopted.
    shared: Option<SharedTimeline>,
    /// The room the cluster thread follows (main).
    room: RoomKey,
}

pub struct Server {
    cfg: Config,
    poll: Poll,
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    socks: Slab<Socket>,
    sessions: Slab<EioSession>,
    sids: HashMap<String, usize>,
    /// By the hub client's slot.
    routes: Vec<Option<Route>>,
    hub: Hub,
    /// The hub's effects, taken and carried out after each call.
    fx: Vec<Effect>,
    jobs: VecDeque<Job>,
    /// A job's members, copied so that pauses may change the room.
    members: Vec<ClientId>,
    timing: Option<TimingThread>,
    timing_events: TimingEvents,
    signals: Signals,
    clock: Clock,
    stats: ServerStats,
    started: Instant,
    fanout_events: Option<Events>,
    cluster: Option<ClusterLink>,
    accept_paused_until: Option<Instant>,
    fd_limit_logged: bool,
    shutdown_by: Option<Instant>,
    /// While set, the loop polls without sleeping: a tick is due any moment.
    busy_poll_until: Option<Instant>,
    /// Connections that still had input when their budget ran out (or yielded to a tick).
    /// Edge-triggered readiness will not report them again, so the loop revisits them.
    readable_again: Vec<usize>,
    /// Connections to remove once no fan-out is iterating.
    finished: Vec<usize>,
    /// Engine.IO's ping packet, as a frame.
    eio_ping: SharedFrame,
    /// The state of the rooms changed since it was last handed to the state file.
    persist_pending: bool,
    skip_logged: bool,
}

impl Server {
    /// Binds the port, starts the timing thread (and the cluster thread), and opens `main`.
    /// Ticks start flowing at once; `run` sends them.
    pub fn bind(cfg: Config) -> Result<Server, ServerError> {
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
        let realtime = Realtime {
            fifo_priority: cfg.rt_priority,
            prewake: cfg.prewake,
            spin: cfg.spin,
        };
        let (cluster, joined) = match &cfg.cluster {
            None => (None, None),
            Some((url, name, lead)) => {
                let (link, joined) = join_cluster(&cfg, url, name, *lead, clock, &waker)?;
                (Some(link), joined)
            }
        };
        let timing_cfg = TimingConfig {
            max_rooms: cfg.max_rooms,
            ring: TimingConfig::ring_for(cfg.max_rooms, cfg.max_bpm, cfg.ppqn),
            realtime,
        };
        let (timing, mut streams) =
            TimingThread::spawn(timing_cfg, clock, vec![waker]).map_err(ServerError::Timing)?;
        let timing_events = streams
            .pop()
            .ok_or_else(|| ServerError::Timing(io::Error::other("no event stream")))?;
        let cluster_lead_ms = cfg
            .cluster
            .as_ref()
            .map(|(_, _, lead)| u64::try_from(lead.as_millis()).unwrap_or(u64::MAX));
        let hub_cfg = HubConfig {
            bpm: cfg.bpm,
            ppqn: cfg.ppqn,
            beats_per_bar: cfg.beats_per_bar,
            min_bpm: cfg.min_bpm,
            max_bpm: cfg.max_bpm,
            max_rooms: cfg.max_rooms,
            room_idle_ns: u64::try_from(cfg.room_idle.as_nanos()).unwrap_or(u64::MAX),
            control_token: cfg.control_token.clone(),
            room_tokens: cfg.room_tokens.iter().cloned().collect(),
            lead: LeadPolicy::new(
                cfg.change_lead
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                cluster_lead_ms,
            ),
            clustered: cluster.is_some(),
            version: env!("CARGO_PKG_VERSION"),
        };
        let restored: Vec<(RoomName, Timeline)> = joined
            .map(|shared| vec![(RoomName::main(), from_shared(&shared, cfg.beats_per_bar))])
            .unwrap_or_default();
        let mut fx = Vec::new();
        let hub = Hub::new(hub_cfg, clock.unix_ns(0), clock.now_ns(), restored, &mut fx);
        let main = hub.main();
        let mut server = Server {
            cfg,
            poll,
            listener: Some(listener),
            local_addr,
            socks: Slab::new(),
            sessions: Slab::new(),
            sids: HashMap::new(),
            routes: Vec::new(),
            hub,
            fx: Vec::new(),
            jobs: VecDeque::new(),
            members: Vec::new(),
            timing: Some(timing),
            timing_events,
            signals,
            clock,
            stats: ServerStats::default(),
            started: Instant::now(),
            fanout_events: Some(Events::with_capacity(256)),
            cluster: cluster.map(|(thread, events, status)| ClusterLink {
                thread,
                events,
                status,
                shared: joined,
                room: main,
            }),
            accept_paused_until: None,
            fd_limit_logged: false,
            shutdown_by: None,
            busy_poll_until: None,
            readable_again: Vec::new(),
            finished: Vec::new(),
            eio_ping: protocol::text_frame("2"),
            persist_pending: false,
            skip_logged: false,
        };
        if let Some(link) = &server.cluster {
            server.hub.set_cluster_connected(link.status.connected);
        }
        server.carry_out(fx);
        Ok(server)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The tempo `main` ticks at now.
    pub fn bpm(&self) -> Bpm {
        self.hub
            .timeline(self.hub.main())
            .map_or(self.cfg.bpm, |t| t.bpm)
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
            if !self.readable_again.is_empty() || !self.jobs.is_empty() {
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
            self.run_jobs();
            for event in events.iter() {
                self.on_event(event);
                self.drain_timing();
                self.run_jobs();
            }
            for key in std::mem::take(&mut self.readable_again) {
                self.drive(key, true, false);
                self.drain_timing();
                self.run_jobs();
            }
            let now = Instant::now();
            if now >= next_housekeeping {
                self.housekeeping(now);
                self.run_jobs();
                next_housekeeping = now + HOUSEKEEPING;
            }
            if let Some(by) = self.shutdown_by
                && (self.socks.is_empty() || now >= by)
            {
                break;
            }
        }
        let left = self.socks.len();
        let keys: Vec<usize> = self.socks.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.remove(key);
        }
        if let Some(timing) = self.timing.take() {
            timing.stop();
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

    // ---- the hub's effects ----

    /// Carries out effects in order: replies at once, broadcasts as jobs for the loop.
    fn carry_out(&mut self, fx: Vec<Effect>) {
        for effect in fx {
            match effect {
                Effect::Reply { client, event } => self.reply(client, &event),
                Effect::Broadcast { room, event } => {
                    if self.shutdown_by.is_none() {
                        self.jobs.push_back(Job {
                            room,
                            event,
                            deadline_ns: None,
                        });
                    }
                }
                Effect::Timing(command) => {
                    let sent = self.timing.as_mut().is_some_and(|t| t.send(command));
                    if !sent {
                        warn!("timing thread not keeping up with commands; {command:?} lost");
                    }
                }
                Effect::Cluster(ask) => self.ask_cluster(ask),
                Effect::Persist => self.persist_pending = true,
            }
        }
    }

    /// Takes the effects a hub call pushed and carries them out.
    fn settle_hub(&mut self) {
        let fx = std::mem::take(&mut self.fx);
        self.carry_out(fx);
    }

    fn route(&self, client: ClientId) -> Option<Via> {
        self.routes
            .get(client.slot as usize)
            .copied()
            .flatten()
            .filter(|r| r.generation == client.generation)
            .map(|r| r.via)
    }

    fn set_route(&mut self, client: ClientId, via: Via) {
        let slot = client.slot as usize;
        if self.routes.len() <= slot {
            self.routes.resize(slot + 1, None);
        }
        self.routes[slot] = Some(Route {
            generation: client.generation,
            via,
        });
    }

    /// The client leaves its room, and its route goes.
    fn forget(&mut self, client: ClientId) {
        self.hub.leave(client, self.clock.now_ns());
        if let Some(route) = self.routes.get_mut(client.slot as usize)
            && route.is_some_and(|r| r.generation == client.generation)
        {
            *route = None;
        }
    }

    /// One event to one client, in its protocol.
    fn reply(&mut self, client: ClientId, event: &Outgoing) {
        match self.route(client) {
            Some(Via::Ws(key)) => {
                if let Some(s) = self.socks.get_mut(key) {
                    s.conn.send(&event.frame(), self.cfg.max_queue);
                }
            }
            Some(Via::Eio { session, .. }) => {
                let Some(nsp) = self
                    .sessions
                    .get(session)
                    .and_then(|s| s.joined.as_ref())
                    .map(|j| j.nsp.clone())
                else {
                    return;
                };
                let packet = engineio::event_in(&nsp, event.name, &event.data);
                self.send_packet(session, &packet);
            }
            None => {}
        }
    }

    // ---- fan-out ----

    /// Runs every queued broadcast, in order. Called by the loop only: a pause inside a job
    /// queues new jobs behind it rather than running them.
    fn run_jobs(&mut self) {
        while let Some(job) = self.jobs.pop_front() {
            if self.shutdown_by.is_some() {
                self.jobs.clear();
                return;
            }
            self.fan_out(&job);
            if let Some(deadline) = job.deadline_ns {
                let done = self.clock.now_ns();
                self.stats.fanout.record(done.saturating_sub(deadline));
            }
        }
    }

    /// Sends one broadcast to every member of its room, encoded once per protocol. Members
    /// already `max_queue` frames behind are closed as slow consumers instead; they never hold
    /// up the rest. Every [`FANOUT_CHUNK`] members it pauses to serve what has arrived.
    fn fan_out(&mut self, job: &Job) {
        let mut members = std::mem::take(&mut self.members);
        members.clear();
        members.extend_from_slice(self.hub.members(job.room));
        let mut encoded = Encoded::default();
        let room_nsp = self
            .hub
            .report(job.room)
            .map(|r| format!("/{}", r.name))
            .unwrap_or_default();
        let limit = self.cfg.max_queue;
        let now = Instant::now();
        let mut since_pause = 0;
        for &client in &members {
            if since_pause == FANOUT_CHUNK {
                self.serve_pause();
                since_pause = 0;
            }
            since_pause += 1;
            match self.route(client) {
                Some(Via::Ws(key)) => {
                    let Some(s) = self.socks.get_mut(key) else {
                        continue;
                    };
                    if !s.conn.takes_broadcasts() {
                        continue;
                    }
                    let frame = encoded.plain(&job.event);
                    if !s.conn.send(&frame, limit) {
                        debug!(
                            "slow consumer peer={} queued={}",
                            s.conn.peer,
                            s.conn.queued()
                        );
                        s.conn.close_ws(
                            CloseCode::Policy,
                            "too slow: fell behind the ticks",
                            CloseReason::SlowConsumer,
                            now,
                        );
                    }
                    self.after_io(key);
                }
                Some(Via::Eio { session, named }) => {
                    let nsp = named.then_some(room_nsp.as_str());
                    let (frame, packet) = encoded.sio(&job.event, nsp);
                    self.deliver(session, &frame, packet, limit, now);
                }
                None => {}
            }
        }
        self.members = members;
        self.remove_finished();
    }

    /// One broadcast frame to one session, on whatever carries it.
    fn deliver(
        &mut self,
        skey: usize,
        frame: &SharedFrame,
        packet: Arc<str>,
        limit: usize,
        now: Instant,
    ) {
        let Some(session) = self.sessions.get_mut(skey) else {
            return;
        };
        match session.link {
            Link::WebSocket { socket } => {
                let Some(s) = self.socks.get_mut(socket) else {
                    return;
                };
                if !s.conn.send(frame, limit) {
                    debug!(
                        "slow consumer peer={} queued={}",
                        s.conn.peer,
                        s.conn.queued()
                    );
                    s.conn.close_ws(
                        CloseCode::Policy,
                        "too slow: fell behind the ticks",
                        CloseReason::SlowConsumer,
                        now,
                    );
                }
                self.after_io(socket);
            }
            Link::Polling { .. } | Link::Upgrading { .. } => {
                if session.push(packet, limit) {
                    self.answer_poll(skey, None);
                } else {
                    self.close_session(skey, CloseReason::SlowConsumer);
                }
            }
        }
    }

    /// One pause in a fan-out: handles whatever the sockets have ready (clock-sync pings,
    /// tempo requests, new connections), without waiting. The timing ring is not drained here:
    /// the next tick waits for this fan-out, so that every client gets its frames in order.
    fn serve_pause(&mut self) {
        self.remove_finished();
        let Some(mut events) = self.fanout_events.take() else {
            return;
        };
        match self.poll.poll(&mut events, Some(Duration::ZERO)) {
            Ok(()) => {
                for event in events.iter() {
                    self.on_event(event);
                }
            }
            Err(e) => debug!("poll during fan-out failed: {e}"),
        }
        self.fanout_events = Some(events);
    }

    // ---- timing and cluster ----

    /// Takes every event the timing thread has queued, in order, and turns them into jobs.
    fn drain_timing(&mut self) {
        while let Ok(event) = self.timing_events.pop() {
            let now_ns = self.clock.now_ns();
            match event {
                TimingEvent::Tick(tick) => {
                    self.busy_poll_until = None;
                    self.stats.record_tick(tick.lateness_ns());
                    if tick.lateness_ns() > stats::LATE_TICK_NS {
                        debug!(
                            "late tick count={} lateness_us={}",
                            tick.count,
                            tick.lateness_ns() / 1000
                        );
                    }
                    self.stats
                        .handoff
                        .record(now_ns.saturating_sub(tick.emitted_ns));
                    let jobs_before = self.jobs.len();
                    self.hub.on_timing(&event, now_ns, &mut self.fx);
                    self.settle_hub();
                    // The tick's own broadcast: measure its fan-out against the deadline.
                    if let Some(job) = self.jobs.get_mut(jobs_before)
                        && job.event.name == "tick"
                    {
                        job.deadline_ns = Some(tick.deadline_ns);
                    }
                }
                TimingEvent::Soon { deadline_ns } => {
                    // Poll without sleeping until the tick is here (bounded, in case a change
                    // moves it later).
                    self.busy_poll_until = Some(self.clock.instant(deadline_ns) + BUSY_POLL_GRACE);
                }
                TimingEvent::Skipped { room, ticks } => {
                    if !self.skip_logged {
                        warn!(
                            "timing thread held up: room slot {} skipped {ticks} ticks rather than \
                             fire them late (counted in dropped_ticks; logged once)",
                            room.slot
                        );
                        self.skip_logged = true;
                    }
                }
                TimingEvent::Timeline { timeline, .. } => {
                    info!(
                        "timeline v{}: {} BPM from tick {}, {} from tick {}",
                        timeline.version,
                        timeline.bpm,
                        timeline.anchor_count,
                        timeline.transport.state(),
                        timeline.transport.from_count()
                    );
                    self.hub.on_timing(&event, now_ns, &mut self.fx);
                    self.settle_hub();
                }
                TimingEvent::Dropped { .. } => {}
            }
        }
        self.stats.tempo_changes = self.hub.tempo_changes();
        self.stats.transport_changes = self.hub.transport_changes();
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
                ClusterEvent::Status(status) => {
                    link.status = status;
                    self.hub.set_cluster_connected(status.connected);
                }
                ClusterEvent::Adopt(shared) => self.adopt(shared),
            }
        }
    }

    /// Follows a shared timeline: the hub adopts it, the timing thread announces it.
    fn adopt(&mut self, shared: SharedTimeline) {
        if shared.ppqn != self.cfg.ppqn || !(1..=1_000_000).contains(&shared.bpm_milli) {
            warn!(
                "cluster: ignoring timeline version {} with ppqn {} (ours is {}); give every \
                 instance the same --ppqn",
                shared.version, shared.ppqn, self.cfg.ppqn
            );
            return;
        }
        let Some(link) = self.cluster.as_mut() else {
            return;
        };
        if link.shared == Some(shared) {
            return;
        }
        link.shared = Some(shared);
        let room = link.room;
        let timeline = from_shared(&shared, self.cfg.beats_per_bar);
        self.hub
            .cluster_timeline(room, timeline, self.clock.now_ns(), &mut self.fx);
        self.settle_hub();
    }

    /// Hands a request to the cluster thread. (It shares `main`; other rooms stay local.)
    fn ask_cluster(&mut self, ask: ClusterAsk) {
        let Some(link) = self.cluster.as_mut() else {
            return;
        };
        let request = match ask {
            ClusterAsk::Open { room, seed, .. } if room == link.room => {
                if link.shared.is_some() {
                    return;
                }
                ClusterRequest::Seed(to_shared(&seed))
            }
            ClusterAsk::Change { room, change, .. } if room == link.room => match change {
                Change::SetBpm(bpm) => ClusterRequest::SetBpm(bpm),
                Change::Start(q) => ClusterRequest::Start(q),
                Change::Stop => ClusterRequest::Stop,
            },
            _ => return,
        };
        if !link.thread.send(request) {
            warn!("cluster thread not keeping up; request dropped");
        }
    }

    // ---- connections ----

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
        let entry = self.socks.vacant_entry();
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
        entry.insert(Socket {
            conn: Connection::new(sock, peer, Instant::now(), rate),
            owner: Owner::Http,
        });
        self.stats.connections_accepted += 1;
    }

    /// After anything that may have written to or ended a connection: flush it, count a
    /// close once, let its client go, and mark it for removal when done.
    fn after_io(&mut self, key: usize) {
        let Some(s) = self.socks.get_mut(key) else {
            return;
        };
        self.stats.messages_sent += s.conn.flush();
        if let Some(reason) = s.conn.take_close_reason() {
            if let Some(kind) = s.conn.counted.take() {
                self.stats.client_closed(kind, reason);
                debug!(
                    "{} closed peer={} reason={}",
                    kind.label(),
                    s.conn.peer,
                    reason.label()
                );
            }
            match std::mem::replace(&mut s.owner, Owner::Http) {
                Owner::Ws { client, .. } => self.forget(client),
                Owner::Eio(skey) => self.socket_ended(skey, key, reason),
                Owner::Http => {}
            }
        }
        if self.socks.get(key).is_some_and(|s| s.conn.is_done()) {
            self.finished.push(key);
        }
    }

    /// An Engine.IO session's WebSocket ended: a session on it ends too (for the same
    /// reason); one that was only probing carries on polling.
    fn socket_ended(&mut self, skey: usize, key: usize, reason: CloseReason) {
        let Some(session) = self.sessions.get_mut(skey) else {
            return;
        };
        if session.socket() == Some(key) {
            self.close_session(skey, reason);
        } else if session.prober() == Some(key) {
            session.abandon_upgrade();
        }
    }

    fn remove(&mut self, key: usize) {
        // Whatever it still owed (a close to count, a client to let go) is settled first.
        if let Some(s) = self.socks.get_mut(key)
            && !s.conn.is_done()
        {
            s.conn.abort(CloseReason::ClientClosed);
        }
        self.after_io(key);
        let Some(mut s) = self.socks.try_remove(key) else {
            return;
        };
        // Dropping the socket closes it, which also removes it from the poll.
        let _ = self.poll.registry().deregister(s.conn.socket());
        if let Owner::Eio(skey) = s.owner
            && let Some(session) = self.sessions.get_mut(skey)
        {
            if session.prober() == Some(key) {
                session.abandon_upgrade();
            } else if session.socket() == Some(key) {
                self.close_session(skey, CloseReason::ClientClosed);
            }
        }
        // A long-poll that gave up: the session carries on without it.
        if let Some(skey) = s.conn.parked_for
            && let Some(session) = self.sessions.get_mut(skey)
            && session.waiting() == Some(key)
        {
            session.set_waiting(None);
        }
    }

    fn remove_finished(&mut self) {
        let mut finished = std::mem::take(&mut self.finished);
        for key in finished.drain(..) {
            // The list can outlive a pause in which the key was removed and reused by a new
            // connection: only a connection that is really done goes.
            if self.socks.get(key).is_some_and(|s| s.conn.is_done()) {
                self.remove(key);
            }
        }
        self.finished = finished;
    }

    /// Handles readiness on one connection, following it through state changes. Yields to a
    /// due tick (the loop comes back to it) instead of reading on.
    fn drive(&mut self, key: usize, readable: bool, writable: bool) {
        let now = Instant::now();
        if writable && self.socks.contains(key) {
            self.after_io(key);
        }
        let mut handled = 0;
        if readable {
            loop {
                if handled > 0 && !self.timing_events.is_empty() {
                    // A chatty client must not hold back a tick that is due.
                    self.readable_again.push(key);
                    break;
                }
                let Some(s) = self.socks.get_mut(key) else {
                    return;
                };
                match s.conn.state() {
                    State::Http { .. } => match s.conn.read_head() {
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
                            s.conn
                                .respond(http::text_error(e.status(), &e.to_string()), now);
                        }
                        HeadRead::Gone => s.conn.peer_finished(now),
                    },
                    State::Open { .. } => match s.conn.read_ws(now, self.cfg.max_queue) {
                        WsRead::Message(m) => {
                            match s.conn.rate.check(now) {
                                Rate::Allow => self.on_ws_message(key, m),
                                Rate::Refuse { warn } => {
                                    self.stats.client_errors += 1;
                                    if warn {
                                        let err =
                                            ClientError::RateLimited(self.cfg.max_messages_per_sec);
                                        self.reply_on_socket(key, &protocol::error(&err));
                                    }
                                }
                                Rate::Close => s.conn.close_ws(
                                    CloseCode::Policy,
                                    "too many messages",
                                    CloseReason::RateLimited,
                                    now,
                                ),
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
                        if s.conn.drain_input() {
                            self.readable_again.push(key);
                        }
                        break;
                    }
                    State::Done => break,
                }
                self.after_io(key);
            }
        }
        self.after_io(key);
        if self.socks.get(key).is_some_and(|s| s.conn.is_done()) {
            self.remove(key);
        }
    }

    /// An event to whoever a WebSocket carries: a `/ws` client, or an Engine.IO session (in
    /// its namespace, or `/` before it joined one).
    fn reply_on_socket(&mut self, key: usize, event: &Outgoing) {
        let Some(s) = self.socks.get_mut(key) else {
            return;
        };
        match s.owner {
            Owner::Eio(skey) => {
                let nsp = self
                    .sessions
                    .get(skey)
                    .and_then(|s| s.joined.as_ref())
                    .map_or("/".to_string(), |j| j.nsp.clone());
                let packet = engineio::event_in(&nsp, event.name, &event.data);
                s.conn
                    .send(&protocol::text_frame(&packet), self.cfg.max_queue);
            }
            _ => {
                s.conn.send(&event.frame(), self.cfg.max_queue);
            }
        }
    }

    // ---- HTTP ----

    fn on_request(&mut self, key: usize, req: Request, now: Instant) {
        let route = http::route(&req.method, &req.path);
        let response = match route {
            HttpRoute::WebSocket if !http::origin_allowed(&req, &self.cfg.allowed_origins) => {
                self.stats.count_refused(RefuseReason::ForbiddenOrigin);
                (
                    403,
                    http::text_error(
                        403,
                        "this page's origin may not open the WebSocket (--allowed-origin)",
                    ),
                )
            }
            HttpRoute::WebSocket => match self.check_ws_upgrade(&req) {
                Ok(accept) => match self.hub.check_join(
                    http::query_param(&req.query, "room")
                        .as_deref()
                        .filter(|r| !r.is_empty()),
                ) {
                    Ok(room) => return self.upgrade(key, &req, &accept, room),
                    Err(e) => refusal(&e),
                },
                Err(refusal) => refusal,
            },
            HttpRoute::SocketIo => return self.on_socketio_request(key, req, now),
            HttpRoute::Asset(asset) => (200, http::response(200, asset.content_type, asset.body)),
            HttpRoute::Healthz => match self.stats.degraded() {
                None => (200, http::response(200, "text/plain; charset=utf-8", b"ok")),
                Some(why) => (
                    503,
                    http::response(503, "text/plain; charset=utf-8", why.as_bytes()),
                ),
            },
            HttpRoute::Stats => {
                let body = metrics::render_json(&self.metric_table());
                (
                    200,
                    http::response(200, "application/json", body.as_bytes()),
                )
            }
            HttpRoute::Metrics => {
                let body = metrics::render_prometheus(&self.metric_table());
                (
                    200,
                    http::response(
                        200,
                        "text/plain; version=0.0.4; charset=utf-8",
                        body.as_bytes(),
                    ),
                )
            }
            HttpRoute::NotFound => (
                404,
                http::text_error(404, "no such page; try /, /ws or /socket.io/"),
            ),
            HttpRoute::MethodNotAllowed if req.path.starts_with("/socket.io") => (
                405,
                http::response_with(
                    405,
                    "text/plain; charset=utf-8",
                    &["Allow: GET, POST, OPTIONS"],
                    b"405 Method Not Allowed: /socket.io/ takes GET, POST and OPTIONS\n",
                ),
            ),
            HttpRoute::MethodNotAllowed => (405, http::text_error(405, "only GET is served")),
        };
        let (status, bytes) = response;
        self.respond(key, &req, status, bytes, now);
    }

    fn respond(&mut self, key: usize, req: &Request, status: u16, bytes: Vec<u8>, now: Instant) {
        self.stats.count_http(status);
        debug!("http {} {} -> {status}", req.method, req.path);
        if let Some(s) = self.socks.get_mut(key) {
            s.conn.respond(bytes, now);
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

    /// `/ws`: the 101, then the client joins its room and gets its hello and timeline.
    fn upgrade(&mut self, key: usize, req: &Request, accept: &str, room: RoomName) {
        let probe_interval = self.ws_probe_interval_ns();
        let Some(s) = self.socks.get_mut(key) else {
            return;
        };
        self.stats.count_http(101);
        s.conn.upgrade(
            http::switching_protocols(accept),
            req.head_len,
            self.cfg.max_message_bytes,
        );
        let token = http::presented_token(req);
        let tokens: Vec<&str> = token.as_deref().into_iter().collect();
        let now_ns = self.clock.now_ns();
        let client = match self
            .hub
            .join(room_arg(&room), &tokens, now_ns, &mut self.fx)
        {
            Ok(client) => client,
            Err(e) => {
                // Checked before the upgrade; only a room limit reached in between lands here.
                s.conn.close_ws(
                    CloseCode::Again,
                    &e.to_string(),
                    CloseReason::Shutdown,
                    Instant::now(),
                );
                return;
            }
        };
        self.stats.client_opened(ClientKind::Ws);
        s.conn.counted = Some(ClientKind::Ws);
        s.owner = Owner::Ws {
            client,
            heartbeat: Heartbeat::new(now_ns, probe_interval, 0),
        };
        debug!("ws open peer={} room={room}", s.conn.peer);
        self.set_route(client, Via::Ws(key));
        self.settle_hub();
    }

    fn ws_probe_interval_ns(&self) -> u64 {
        nanos(self.cfg.ping_interval.min(WS_PROBE_INTERVAL))
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
        let session = match &query.sid {
            None => None,
            // A session on a WebSocket is reached by its socket alone: for HTTP its id is
            // spent, as it always was.
            Some(sid) => match self.sids.get(sid) {
                Some(&skey)
                    if self
                        .sessions
                        .get(skey)
                        .is_some_and(|s| s.socket().is_none()) =>
                {
                    Some(skey)
                }
                _ => return self.eio_refuse(key, &req, EioError::SessionIdUnknown, &cors, now),
            },
        };
        match (query.transport, session, req.method.as_str()) {
            // Taking over a session adds no client, so the --max-clients check is skipped.
            (EioTransport::WebSocket, Some(skey), "GET") => match http::check_upgrade(&req) {
                Ok(accept) => self.socketio_takeover(key, &req, &accept, skey),
                Err(e) => {
                    self.stats.count_refused(RefuseReason::BadUpgrade);
                    let bytes = http::text_error(400, &e.to_string());
                    self.respond(key, &req, 400, bytes, now)
                }
            },
            (EioTransport::WebSocket, None, "GET") => match self.check_ws_upgrade(&req) {
                Ok(accept) => self.socketio_websocket(key, &req, &accept),
                Err((status, bytes)) => self.respond(key, &req, status, bytes, now),
            },
            (EioTransport::Polling, None, "GET") => self.polling_handshake(key, &req, cors, now),
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
        if let Some(s) = self.socks.get_mut(key) {
            s.conn
                .respond_and_continue(bytes, req.head_len + req.body.len(), now);
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

    fn new_session(&mut self, req: &Request, peer: SocketAddr, link: Link) -> Option<usize> {
        let sid = match engineio::new_sid() {
            Ok(sid) => sid,
            Err(e) => {
                warn!("no randomness for a session id: {e}");
                return None;
            }
        };
        let now_ns = self.clock.now_ns();
        let interval = nanos(self.cfg.ping_interval);
        let mut session = EioSession::new(
            sid.clone(),
            peer.ip(),
            link,
            RateLimit::new(self.cfg.max_messages_per_sec),
            Heartbeat::new(now_ns, interval, interval),
            now_ns,
        );
        session.token = http::presented_token(req);
        let skey = self.sessions.insert(session);
        self.sids.insert(sid, skey);
        Some(skey)
    }

    /// A Socket.IO client on a WebSocket from the start.
    fn socketio_websocket(&mut self, key: usize, req: &Request, accept: &str) {
        let Some(peer) = self.socks.get(key).map(|s| s.conn.peer) else {
            return;
        };
        let Some(skey) = self.new_session(req, peer, Link::WebSocket { socket: key }) else {
            let bytes = http::text_error(503, "cannot create a session; try again");
            return self.respond(key, req, 503, bytes, Instant::now());
        };
        let sid = self.sessions[skey].sid.clone();
        let open = protocol::text_frame(&self.open_packet(&sid, &[]));
        let Some(s) = self.socks.get_mut(key) else {
            return;
        };
        self.stats.count_http(101);
        s.conn.upgrade(
            http::switching_protocols(accept),
            req.head_len,
            self.cfg.max_message_bytes,
        );
        s.owner = Owner::Eio(skey);
        s.conn.send(&open, self.cfg.max_queue);
        self.stats.client_opened(ClientKind::SocketIoWs);
        self.sessions[skey].counted = Some(ClientKind::SocketIoWs);
        debug!("socket.io websocket open peer={}", s.conn.peer);
    }

    /// A WebSocket asking to take a polling session over. One socket per session: a second
    /// would either take the session from the first or get every broadcast uncounted.
    fn socketio_takeover(&mut self, key: usize, req: &Request, accept: &str, skey: usize) {
        let Some(session) = self.sessions.get_mut(skey) else {
            return;
        };
        if !session.begin_upgrade(key) {
            return self.eio_refuse(key, req, EioError::BadRequest, &[], Instant::now());
        }
        let Some(s) = self.socks.get_mut(key) else {
            session.abandon_upgrade();
            return;
        };
        self.stats.count_http(101);
        s.conn.upgrade(
            http::switching_protocols(accept),
            req.head_len,
            self.cfg.max_message_bytes,
        );
        s.owner = Owner::Eio(skey);
        debug!("socket.io websocket probing peer={}", s.conn.peer);
    }

    fn polling_handshake(&mut self, key: usize, req: &Request, cors: Vec<String>, now: Instant) {
        if self.stats.clients >= self.cfg.max_clients
            || self.sessions.len() >= self.cfg.max_polling_sessions
        {
            self.stats.count_refused(RefuseReason::MaxClients);
            let extra: Vec<&str> = cors.iter().map(String::as_str).collect();
            let body = r#"{"code":3,"message":"Server full; try again later"}"#;
            let bytes = http::response_with(503, "application/json", &extra, body.as_bytes());
            return self.respond(key, req, 503, bytes, now);
        }
        let Some(peer) = self.socks.get(key).map(|s| s.conn.peer) else {
            return;
        };
        let Some(skey) = self.new_session(req, peer, Link::Polling { waiting: None }) else {
            let bytes = http::text_error(503, "cannot create a session; try again");
            return self.respond(key, req, 503, bytes, now);
        };
        let sid = self.sessions[skey].sid.clone();
        let open = self.open_packet(&sid, &["websocket"]);
        self.sessions[skey].counted = Some(ClientKind::SocketIoPolling);
        self.stats.client_opened(ClientKind::SocketIoPolling);
        let bytes = Self::poll_response(req.keep_alive, &cors, &open);
        self.respond_polling(key, req, bytes, now);
    }

    /// A long-poll GET: answered at once when packets wait (or while the session is being
    /// upgraded), parked until they do otherwise.
    fn poll(&mut self, key: usize, req: &Request, skey: usize, cors: Vec<String>, now: Instant) {
        let backstop = now + self.cfg.ping_interval + self.cfg.ping_timeout;
        let now_ns = self.clock.now_ns();
        let Some(session) = self.sessions.get_mut(skey) else {
            return;
        };
        session.seen(now_ns);
        if session.waiting().is_some() {
            // Two polls at once: a broken client. Engine.IO closes such a session.
            self.close_session(skey, CloseReason::ProtocolError);
            return self.eio_refuse(key, req, EioError::BadRequest, &cors, now);
        }
        session.cors = cors;
        match session.take_payload(EIO_MAX_PAYLOAD) {
            Some(body) => {
                let bytes = Self::poll_response(req.keep_alive, &session.cors, &body);
                self.respond_polling(key, req, bytes, now);
            }
            // A client whose polling is paused for an upgrade waits for this GET to end.
            None if session.probed() => {
                let bytes = Self::poll_response(req.keep_alive, &session.cors, "6");
                self.respond_polling(key, req, bytes, now);
            }
            None => {
                session.set_waiting(Some(key));
                self.stats.count_http(200);
                if let Some(s) = self.socks.get_mut(key) {
                    s.conn.park(skey, backstop, req.keep_alive);
                }
            }
        }
    }

    /// A POST of client packets.
    fn post(&mut self, key: usize, req: &Request, skey: usize, cors: Vec<String>, now: Instant) {
        let received_ns = self.clock.unix_now_ns();
        let now_ns = self.clock.now_ns();
        if let Some(session) = self.sessions.get_mut(skey) {
            session.seen(now_ns);
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
                        self.session_event(skey, &protocol::error(&err));
                    }
                    continue;
                }
                Rate::Close => {
                    self.close_session(skey, CloseReason::RateLimited);
                    break;
                }
            }
            if let Err(e) = self.on_eio_packet(skey, None, packet, received_ns) {
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

    // ---- Engine.IO and Socket.IO ----

    /// One Engine.IO packet from a session: from a POST (`via` is `None`) or from a WebSocket.
    /// An error is a protocol violation: the caller ends the client (close 1002, or 400).
    fn on_eio_packet(
        &mut self,
        skey: usize,
        via: Option<ConnKey>,
        text: &str,
        received_ns: u64,
    ) -> Result<(), engineio::PacketError> {
        let packet = engineio::decode_packet(text)?;
        let Some(session) = self.sessions.get_mut(skey) else {
            return Ok(());
        };
        let from_prober = via.is_some() && session.prober() == via;
        // A socket still probing speaks only the upgrade's packets; the session is the client.
        if from_prober && matches!(packet, Packet::Message(_)) {
            return Ok(());
        }
        match packet {
            Packet::Message(m) => self.on_sio_packet(skey, m, received_ns),
            Packet::Pong(_) => {
                let now_ns = self.clock.now_ns();
                if let Some(rtt) = session.heartbeat.answered(now_ns)
                    && let Some(joined) = &session.joined
                {
                    self.hub.round_trip(joined.client, rtt);
                }
            }
            Packet::Ping("probe") if from_prober => {
                let Some(socket) = via else {
                    return Ok(());
                };
                session.mark_probed();
                if let Some(s) = self.socks.get_mut(socket) {
                    s.conn
                        .send(&protocol::text_frame("3probe"), self.cfg.max_queue);
                }
                // From now on the session's polls are answered at once, so the client's paused
                // polling can finish and it sends `5`.
                self.answer_poll(skey, Some("6"));
            }
            // Engine.IO v4 clients never ping; one that does gets a short echo on the
            // transport it used, never a long one queued on its behalf.
            Packet::Ping(data) if data.len() <= MAX_PING_ECHO => {
                let echo = format!("3{data}");
                match via {
                    Some(socket) => {
                        if let Some(s) = self.socks.get_mut(socket) {
                            s.conn
                                .send(&protocol::text_frame(&echo), self.cfg.max_queue);
                        }
                    }
                    None => self.send_packet(skey, &echo),
                }
            }
            Packet::Ping(_) => {}
            Packet::Upgrade => {
                if !from_prober {
                    return Err(engineio::PacketError::BadType('5'));
                }
                let Some((parked, queued)) = session.complete_upgrade() else {
                    return Err(engineio::PacketError::BadType('5'));
                };
                self.complete_upgrade(skey, parked, queued);
            }
            Packet::Noop => {}
            Packet::Close => match session.socket() {
                Some(socket) => {
                    if let Some(s) = self.socks.get_mut(socket) {
                        s.conn.close_ws(
                            CloseCode::Normal,
                            "",
                            CloseReason::ClientClosed,
                            Instant::now(),
                        );
                    }
                    self.after_io(socket);
                }
                None => self.close_session(skey, CloseReason::ClientClosed),
            },
        }
        Ok(())
    }

    /// The client sent `5`: its WebSocket is the session now. A poll still parked is released
    /// with a noop, and the packets it was waiting for follow on the socket, in order.
    fn complete_upgrade(&mut self, skey: usize, parked: Option<ConnKey>, queued: Vec<Arc<str>>) {
        let Some(session) = self.sessions.get_mut(skey) else {
            return;
        };
        session.heartbeat.heard();
        let cors = session.cors.clone();
        if let Some(kind) = session.counted.as_mut()
            && *kind == ClientKind::SocketIoPolling
        {
            *kind = ClientKind::SocketIoWs;
            self.stats
                .client_moved(ClientKind::SocketIoPolling, ClientKind::SocketIoWs);
        }
        let Some(socket) = session.socket() else {
            return;
        };
        if let Some(ckey) = parked
            && let Some(s) = self.socks.get_mut(ckey)
        {
            s.conn
                .respond(Self::poll_response(false, &cors, "6"), Instant::now());
            self.after_io(ckey);
        }
        if let Some(s) = self.socks.get_mut(socket) {
            // What the session had queued moves over whole; the queue limit applies from here.
            for packet in queued {
                s.conn.send(&protocol::text_frame(&packet), usize::MAX);
            }
            debug!("socket.io upgraded to websocket peer={}", s.conn.peer);
        }
    }

    /// A Socket.IO packet: namespace connects, events, disconnects.
    fn on_sio_packet(&mut self, skey: usize, text: &str, received_ns: u64) {
        let packet = match engineio::decode_sio(text) {
            Ok(p) => p,
            Err(e) => {
                self.stats.client_errors += 1;
                let err = ClientError::BadPacket(e.to_string());
                return self.session_event(skey, &protocol::error(&err));
            }
        };
        match packet {
            SioPacket::Connect { nsp, auth } => self.connect_namespace(skey, nsp, auth),
            SioPacket::Disconnect { nsp } => {
                let Some(session) = self.sessions.get_mut(skey) else {
                    return;
                };
                if session.joined.as_ref().is_some_and(|j| j.nsp == nsp)
                    && let Some(joined) = session.joined.take()
                {
                    self.forget(joined.client);
                }
            }
            SioPacket::Event {
                nsp,
                name,
                data,
                ack,
            } => {
                let Some(client) = self
                    .sessions
                    .get(skey)
                    .and_then(|s| s.joined.as_ref())
                    .filter(|j| j.nsp == nsp)
                    .map(|j| j.client)
                else {
                    // Not connected to that namespace: Socket.IO drops such events too.
                    return;
                };
                let result = protocol::decode_event(&name, data.as_ref())
                    .and_then(|m| self.on_client_message(client, m, received_ns));
                if let Err(err) = &result {
                    self.stats.client_errors += 1;
                    // A client that passed a callback hears through it; others by event.
                    if ack.is_none() {
                        self.reply(client, &protocol::error(err));
                    }
                }
                if let Some(id) = ack {
                    // The callback gets {ok:true} (the change itself arrives as bpmChange,
                    // transport, ...) or the error's {ok:false, code, message}.
                    let arg = match result {
                        Ok(()) => r#"{"ok":true}"#.to_string(),
                        Err(err) => {
                            let e = protocol::error(&err);
                            format!(r#"{{"ok":false,"error":{}}}"#, e.data)
                        }
                    };
                    self.send_packet(skey, &engineio::ack_in(&nsp, id, &arg));
                }
            }
            SioPacket::Ack => {}
        }
    }

    /// `40[/NAME,]`: the session joins room NAME (`/` is `main`), with the handshake's token
    /// or one in `auth`. One namespace per session: see [`super::eio`].
    fn connect_namespace(&mut self, skey: usize, nsp: String, auth: Option<serde_json::Value>) {
        let Some(session) = self.sessions.get_mut(skey) else {
            return;
        };
        if let Some(joined) = &session.joined {
            if joined.nsp != nsp {
                let why = format!(
                    "this connection is in namespace {} already: one room per connection; open \
                     another one for {nsp} (socket.io-client: forceNew: true)",
                    joined.nsp
                );
                let refused = engineio::connect_error_with(
                    &nsp,
                    "Invalid namespace",
                    "one_room_per_connection",
                    &why,
                );
                return self.send_packet(skey, &refused);
            }
            // The same namespace again: join afresh.
            if let Some(old) = session.joined.take() {
                self.forget(old.client);
            }
        }
        let room = match nsp.strip_prefix('/') {
            Some("") => None,
            Some(name) => Some(name.to_string()),
            // Socket.IO namespaces start with `/`.
            None => {
                let refused = engineio::connect_error_with(
                    &nsp,
                    "Invalid namespace",
                    "invalid_room",
                    "a namespace starts with /",
                );
                return self.send_packet(skey, &refused);
            }
        };
        let Some(session) = self.sessions.get(skey) else {
            return;
        };
        let by_auth = auth
            .as_ref()
            .and_then(|a| a.get("token"))
            .and_then(|t| t.as_str())
            .map(str::to_string);
        let tokens: Vec<&str> = session
            .token
            .as_deref()
            .into_iter()
            .chain(by_auth.as_deref())
            .collect();
        let Ok(socket_id) = engineio::new_sid() else {
            let refused = engineio::connect_error(&nsp, "cannot create a socket id; try again");
            return self.send_packet(skey, &refused);
        };
        let now_ns = self.clock.now_ns();
        match self
            .hub
            .join(room.as_deref(), &tokens, now_ns, &mut self.fx)
        {
            Ok(client) => {
                let named = nsp != "/";
                if let Some(session) = self.sessions.get_mut(skey) {
                    session.joined = Some(Joined {
                        nsp: nsp.clone(),
                        client,
                    });
                }
                self.set_route(
                    client,
                    Via::Eio {
                        session: skey,
                        named,
                    },
                );
                self.send_packet(skey, &engineio::connect_ok_in(&nsp, &socket_id));
                self.settle_hub();
            }
            Err(e) => {
                let code = match e {
                    JoinError::Name(_) => "invalid_room",
                    JoinError::Full { .. } => "too_many_rooms",
                };
                let refused =
                    engineio::connect_error_with(&nsp, &e.to_string(), code, &e.to_string());
                self.send_packet(skey, &refused);
            }
        }
    }

    /// An event to a session, in the namespace it joined (or `/`).
    fn session_event(&mut self, skey: usize, event: &Outgoing) {
        let nsp = self
            .sessions
            .get(skey)
            .and_then(|s| s.joined.as_ref())
            .map_or("/".to_string(), |j| j.nsp.clone());
        self.send_packet(skey, &engineio::event_in(&nsp, event.name, &event.data));
    }

    /// Sends a raw Engine.IO packet to a session, on whatever carries it.
    fn send_packet(&mut self, skey: usize, packet: &str) {
        let limit = self.cfg.max_queue;
        let Some(session) = self.sessions.get_mut(skey) else {
            return;
        };
        match session.socket() {
            Some(socket) => {
                if let Some(s) = self.socks.get_mut(socket) {
                    s.conn.send(&protocol::text_frame(packet), limit);
                }
            }
            None => {
                if session.push(packet.into(), limit) {
                    self.answer_poll(skey, None);
                } else {
                    self.close_session(skey, CloseReason::SlowConsumer);
                }
            }
        }
    }

    /// Answers the session's parked GET with what is queued (or `fallback` when nothing is).
    fn answer_poll(&mut self, skey: usize, fallback: Option<&str>) {
        let Some(session) = self.sessions.get_mut(skey) else {
            return;
        };
        let Some(ckey) = session.waiting() else {
            return;
        };
        let Some(body) = session
            .take_payload(EIO_MAX_PAYLOAD)
            .or_else(|| fallback.map(str::to_string))
        else {
            return;
        };
        session.set_waiting(None);
        if let Some(s) = self.socks.get_mut(ckey) {
            let bytes = Self::poll_response(s.conn.parked_keep_alive(), &session.cors, &body);
            s.conn.answer_parked(bytes, Instant::now());
            self.after_io(ckey);
        }
    }

    /// Ends a session: its client leaves its room, a parked GET gets Engine.IO's close packet
    /// (a stock client then reconnects), its WebSocket (probing or carrying it) is closed, and
    /// later requests with its id get 400. Counted once, here.
    fn close_session(&mut self, skey: usize, reason: CloseReason) {
        let Some(session) = self.sessions.try_remove(skey) else {
            return;
        };
        self.sids.remove(&session.sid);
        if let Some(kind) = session.counted {
            self.stats.client_closed(kind, reason);
        }
        debug!("socket.io session closed reason={}", reason.label());
        if let Some(joined) = &session.joined {
            self.forget(joined.client);
        }
        let now = Instant::now();
        if let Some(ckey) = session.waiting()
            && let Some(s) = self.socks.get_mut(ckey)
        {
            s.conn
                .respond(Self::poll_response(false, &session.cors, "1"), now);
            self.after_io(ckey);
        }
        for socket in [session.prober(), session.socket()].into_iter().flatten() {
            if let Some(s) = self.socks.get_mut(socket) {
                s.owner = Owner::Http;
                let (code, text) = match reason {
                    CloseReason::PingTimeout => (CloseCode::Away, "ping timeout"),
                    CloseReason::SlowConsumer => {
                        (CloseCode::Policy, "too slow: fell behind the ticks")
                    }
                    CloseReason::Shutdown => (CloseCode::Away, "server shutting down"),
                    _ => (CloseCode::Away, "session closed"),
                };
                s.conn.close_ws(code, text, reason, now);
                self.after_io(socket);
            }
        }
    }

    // ---- messages ----

    /// A WebSocket message: for a `/ws` client, or an Engine.IO session's socket.
    fn on_ws_message(&mut self, key: usize, message: Message) {
        // A ping's receive time: taken before anything else is done with the message.
        let received_ns = self.clock.unix_now_ns();
        let now_ns = self.clock.now_ns();
        let Some(s) = self.socks.get_mut(key) else {
            return;
        };
        match &mut s.owner {
            Owner::Eio(skey) => {
                let skey = *skey;
                match message {
                    Message::Text(text) => {
                        if let Err(e) = self.on_eio_packet(skey, Some(key), &text, received_ns)
                            && let Some(s) = self.socks.get_mut(key)
                        {
                            debug!("socket.io protocol error peer={}: {e}", s.conn.peer);
                            s.conn.close_ws(
                                CloseCode::Protocol,
                                "Engine.IO protocol error",
                                CloseReason::ProtocolError,
                                Instant::now(),
                            );
                        }
                    }
                    Message::Binary(_) => {
                        self.stats.client_errors += 1;
                        self.reply_on_socket(key, &protocol::error(&ClientError::Binary));
                    }
                    _ => {}
                }
            }
            Owner::Ws { client, heartbeat } => {
                let client = *client;
                heartbeat.heard();
                let result = match message {
                    Message::Text(text) => protocol::decode(&text)
                        .and_then(|m| self.on_client_message(client, m, received_ns)),
                    Message::Binary(_) => Err(ClientError::Binary),
                    Message::Pong(payload) => {
                        let max_age = nanos(self.cfg.ping_interval + self.cfg.ping_timeout);
                        if let Some(rtt) = lead::rtt_from_pong(&payload, now_ns, max_age) {
                            self.hub.round_trip(client, rtt);
                        }
                        Ok(())
                    }
                    // tungstenite answers pings and handles the close handshake itself.
                    Message::Ping(_) | Message::Close(_) | Message::Frame(_) => Ok(()),
                };
                if let Err(err) = result {
                    self.stats.client_errors += 1;
                    self.reply(client, &protocol::error(&err));
                }
            }
            Owner::Http => {}
        }
    }

    /// A decoded request from a client, on any protocol.
    fn on_client_message(
        &mut self,
        client: ClientId,
        message: ClientMessage,
        received_ns: u64,
    ) -> Result<(), ClientError> {
        let control = match message {
            ClientMessage::Ping(t0) => {
                // Stamped as late as possible and written at once, not at the next writable
                // event: the client's offset estimate assumes t2 is the send.
                let pong = protocol::pong(t0, received_ns, self.clock.unix_now_ns());
                self.reply(client, &pong);
                match self.route(client) {
                    Some(Via::Ws(key)) => self.after_io(key),
                    Some(Via::Eio { session, .. }) => {
                        if let Some(socket) = self.sessions.get(session).and_then(|s| s.socket()) {
                            self.after_io(socket);
                        }
                    }
                    None => {}
                }
                return Ok(());
            }
            ClientMessage::SetBpm(value) => Control::SetBpm(value),
            ClientMessage::Start(quantize) => Control::Start(quantize),
            ClientMessage::Stop => Control::Stop,
        };
        let now_ns = self.clock.now_ns();
        let result = self.hub.control(client, control, now_ns, &mut self.fx);
        self.settle_hub();
        result
    }

    // ---- housekeeping and shutdown ----

    fn housekeeping(&mut self, now: Instant) {
        let now_ns = self.clock.now_ns();
        let timeout = self.cfg.handshake_timeout;
        let (interval, ping_timeout) = (self.cfg.ping_interval, self.cfg.ping_timeout);
        let ws_interval = self.ws_probe_interval_ns();
        let keys: Vec<usize> = self.socks.iter().map(|(k, _)| k).collect();
        for key in keys {
            let Some(s) = self.socks.get_mut(key) else {
                continue;
            };
            if s.conn.expire(now, timeout) {
                self.stats.count_refused(RefuseReason::HandshakeTimeout);
            }
            match &mut s.owner {
                Owner::Ws { heartbeat, .. } if s.conn.is_open() => {
                    match heartbeat.due(now_ns, ws_interval, nanos(ping_timeout)) {
                        Beat::Quiet => {}
                        Beat::Ping { sent_ns } => s.conn.ping(&lead::ping_payload(sent_ns)),
                        Beat::Dead => s.conn.close_ws(
                            CloseCode::Away,
                            "ping timeout",
                            CloseReason::PingTimeout,
                            now,
                        ),
                    }
                }
                // A socket still probing a session takeover is not pinged (the client would
                // take the ping for a failed probe) but may not linger either.
                Owner::Eio(skey)
                    if s.conn.is_open()
                        && self.sessions.get(*skey).and_then(EioSession::prober) == Some(key)
                        && now.duration_since(s.conn.accepted) >= interval + ping_timeout =>
                {
                    s.conn.close_ws(
                        CloseCode::Away,
                        "upgrade not completed",
                        CloseReason::PingTimeout,
                        now,
                    );
                }
                _ => {}
            }
            self.after_io(key);
        }
        self.remove_finished();
        let skeys: Vec<usize> = self.sessions.iter().map(|(k, _)| k).collect();
        for skey in skeys {
            let Some(session) = self.sessions.get_mut(skey) else {
                continue;
            };
            match session.health(now_ns, nanos(interval), nanos(ping_timeout)) {
                Beat::Quiet => {}
                Beat::Ping { .. } => match session.socket() {
                    Some(socket) => {
                        if let Some(s) = self.socks.get_mut(socket) {
                            s.conn.send_uncounted(&self.eio_ping);
                        }
                        self.after_io(socket);
                    }
                    None => self.send_packet(skey, "2"),
                },
                Beat::Dead => self.close_session(skey, CloseReason::PingTimeout),
            }
        }
        self.remove_finished();
        self.hub.housekeeping(now_ns, &mut self.fx);
        self.settle_hub();
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
            "shutting down: closing {} connections, {} Socket.IO sessions",
            self.socks.len(),
            self.sessions.len()
        );
        self.shutdown_by = Some(now + SHUTDOWN_GRACE);
        self.jobs.clear();
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        let sessions: Vec<usize> = self.sessions.iter().map(|(k, _)| k).collect();
        for skey in sessions {
            self.close_session(skey, CloseReason::Shutdown);
        }
        let keys: Vec<usize> = self.socks.iter().map(|(k, _)| k).collect();
        for key in keys {
            let Some(s) = self.socks.get_mut(key) else {
                continue;
            };
            match s.conn.state() {
                State::Open { .. } => s.conn.close_ws(
                    CloseCode::Away,
                    "server shutting down",
                    CloseReason::Shutdown,
                    now,
                ),
                State::Http { .. } | State::Parked { .. } => s.conn.abort(CloseReason::Shutdown),
                State::Closing { .. } | State::Done => {}
            }
            self.after_io(key);
        }
        self.remove_finished();
    }

    fn metric_table(&self) -> Vec<metrics::Metric> {
        let main = self.hub.report(self.hub.main());
        let rooms = self.hub.reports();
        let snapshot = Snapshot {
            bpm: main.as_ref().map_or(self.cfg.bpm, |r| r.bpm),
            ppqn: self.cfg.ppqn,
            clients: self.stats.clients,
            count: main.as_ref().map_or(0, |r| r.count),
            transport: main
                .as_ref()
                .map_or(TransportState::Playing, |r| r.transport)
                .label(),
            transport_count: main.as_ref().map_or(0, |r| r.transport_count),
            uptime_s: self.started.elapsed().as_secs_f64(),
            dropped_ticks: self.timing.as_ref().map_or(0, TimingThread::dropped_ticks),
            cluster: self.cluster.as_ref().map(|l| l.status),
            stats: &self.stats,
        };
        metrics::table(&snapshot, &rooms, self.cfg.metrics_rooms)
    }
}

/// What to tell a client the hub would not let in (before the upgrade).
fn refusal(e: &JoinError) -> (u16, Vec<u8>) {
    match e {
        JoinError::Name(_) => (400, http::text_error(400, &e.to_string())),
        JoinError::Full { .. } => (503, http::text_error(503, &e.to_string())),
    }
}

/// The hub's argument for a room: `None` for `main`.
fn room_arg(room: &RoomName) -> Option<&str> {
    (!room.is_main()).then_some(room.as_str())
}

fn from_shared(s: &SharedTimeline, beats_per_bar: u32) -> Timeline {
    Timeline {
        version: s.version,
        anchor_count: s.anchor_count,
        anchor_unix_ns: s.anchor_unix_ns,
        bpm: s.bpm(),
        ppqn: s.ppqn,
        beats_per_bar,
        transport: s.transport(),
        transport_unix_ns: s.transport_unix_ns,
    }
}

fn to_shared(t: &Timeline) -> SharedTimeline {
    SharedTimeline {
        version: t.version,
        anchor_count: t.anchor_count,
        anchor_unix_ns: t.anchor_unix_ns,
        bpm_milli: t.bpm.milli(),
        ppqn: t.ppqn,
        playing_before: t.transport.before() == TransportState::Playing,
        playing: t.transport.state() == TransportState::Playing,
        transport_count: t.transport.from_count(),
        transport_unix_ns: t.transport_unix_ns,
    }
}

/// A cluster thread just started: its ends and its first status.
type ClusterStart = (ClusterThread, ClusterEvents, ClusterStatus);

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
) -> Result<(ClusterStart, Option<SharedTimeline>), ServerError> {
    let own = Timeline::new(
        cfg.bpm,
        cfg.ppqn,
        cfg.beats_per_bar,
        clock.unix_now_ns() + 1_000_000,
    );
    let cluster_cfg = ClusterConfig {
        url: url.to_string(),
        name: name.to_string(),
        lead,
        start_lead: Duration::from_nanos(lead::FLOOR_NS),
        beats_per_bar: cfg.beats_per_bar,
    };
    let (thread, mut events) =
        ClusterThread::spawn(cluster_cfg, to_shared(&own), Arc::clone(waker))
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
    Ok(((thread, events, status), joined))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
