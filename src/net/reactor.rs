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
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use thiserror::Error;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::clock::Clock;
use crate::cluster;
use crate::config::{AcceptMode, Config};
use crate::connection::{Connection, HeadRead, Rate, RateLimit, State, WsRead};
use crate::hub::{ClientId, Effect, Hub, HubConfig, JoinError};
use crate::lead::{self, LeadPolicy};
use crate::metrics;
use crate::page_worker::PageWorker;
use crate::room::RoomName;
use crate::room_timing::{Realtime, TimingConfig, TimingEvent, TimingEvents, TimingThread};
use crate::rt;
use crate::shard_rooms::{Broadcast as RoomBroadcast, ShardRooms};
use crate::state::{self, Persisted, SavedRoom, StateWriter};
use crate::stats::{
    self, ClientKind, CloseReason, RefuseReason, ServerStats, ShardFigures, Snapshot,
};
use crate::tempo::Bpm;
use crate::tick_choice::TickChoice;
use crate::timeline::Timeline;
use crate::transport::TransportState;
use crate::wire::engineio::{self};
use crate::wire::http::{self, Request};
use crate::wire::protocol::{self, ClientError, Outgoing, SharedFrame};
use crate::www;

use super::cluster::*;
use super::eio::{ConnKey, EioSession};
use super::fanout::*;
use super::heartbeat::{Beat, Heartbeat};
use super::shards::{self, Forward, Shared};

pub(super) const LISTENER: Token = Token(usize::MAX - 1);
pub(super) const WAKER: Token = Token(usize::MAX - 2);
pub(super) const SIGNALS: Token = Token(usize::MAX - 3);

/// How often deadlines (handshake timeouts, heartbeats, idle rooms) are checked.
pub(super) const HOUSEKEEPING: Duration = Duration::from_millis(250);
/// How long SIGTERM waits for clients to receive their close frames.
pub(super) const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Messages handled from one connection per readiness event before the loop moves on (and
/// comes back after the next poll): one chatty client cannot hold everyone else.
pub(super) const MESSAGES_PER_EVENT: usize = 64;
/// Members a fan-out writes to before it pauses to read what clients have sent.
pub const FANOUT_CHUNK: usize = 256;
/// The largest long-polling payload the server sends or accepts (Engine.IO's `maxPayload`).
pub(super) const EIO_MAX_PAYLOAD: usize = 64 * 1024;
/// The longest Engine.IO ping payload echoed back (stock clients send only `probe`).
pub(super) const MAX_PING_ECHO: usize = 16;
/// How often a `/ws` client is pinged at most: each Pong is a round trip for the lead.
pub(super) const WS_PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// How long past a tick's deadline the loop keeps busy-polling for it.
pub(super) const BUSY_POLL_GRACE: Duration = Duration::from_millis(1);
/// How long accepting pauses when the process is out of file descriptors.
pub(super) const FD_BACKOFF: Duration = Duration::from_millis(250);
/// Sockets sampled for a stall per housekeeping round, at most (about 0.3 ms of system calls).
pub(super) const STALL_SAMPLES_PER_ROUND: usize = 1024;
/// How often, at most, the log says that the timing thread skipped ticks.
pub(super) const SKIP_LOG_EVERY: Duration = Duration::from_secs(10);

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

/// What a socket serves.
pub(super) enum Owner {
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

pub(super) struct Socket {
    pub(super) conn: Connection,
    pub(super) owner: Owner,
}

/// Where a hub client's frames go.
#[derive(Clone, Copy, Debug)]
pub(super) enum Via {
    Ws(ConnKey),
    /// An Engine.IO session; `named`: its namespace is `/NAME`, so packets carry the prefix.
    Eio {
        session: usize,
        named: bool,
    },
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Route {
    pub(super) generation: u32,
    pub(super) via: Via,
}

pub struct Server {
    /// This shard's number (0 holds the cluster link and the state writer).
    pub(super) shard: usize,
    /// The hub and what the shards share ([`super::shards`]).
    pub(super) shared: Arc<Shared>,
    /// This shard's members and the rooms' announced timelines, from the timing stream.
    pub(super) rooms: ShardRooms,
    /// What the timing stream means for this shard's members, taken per event.
    pub(super) broadcasts: Vec<RoomBroadcast>,
    /// The other shards, until `run` starts them (shard 0 only).
    pub(super) others: Vec<Server>,
    pub(super) cfg: Config,
    pub(super) poll: Poll,
    pub(super) listener: Option<TcpListener>,
    pub(super) local_addr: SocketAddr,
    pub(super) socks: Slab<Socket>,
    pub(super) sessions: Slab<EioSession>,
    pub(super) sids: HashMap<String, usize>,
    /// By the hub client's slot.
    pub(super) routes: Vec<Option<Route>>,
    /// The hub's effects, taken and carried out after each call.
    pub(super) fx: Vec<Effect>,
    pub(super) jobs: VecDeque<Job>,
    /// A job's members, copied so that pauses may change the room.
    pub(super) members: Vec<ClientId>,
    pub(super) timing_events: TimingEvents,
    pub(super) signals: Signals,
    pub(super) clock: Clock,
    pub(super) stats: ServerStats,
    pub(super) started: Instant,
    pub(super) fanout_events: Option<Events>,
    pub(super) cluster: Option<ClusterLink>,
    pub(super) accept_paused_until: Option<Instant>,
    pub(super) fd_limit_logged: bool,
    pub(super) shutdown_by: Option<Instant>,
    /// While set, the loop polls without sleeping: a tick is due any moment.
    pub(super) busy_poll_until: Option<Instant>,
    /// Connections that still had input when their budget ran out (or yielded to a tick).
    /// Edge-triggered readiness will not report them again, so the loop revisits them.
    pub(super) readable_again: Vec<usize>,
    /// Connections to remove once no fan-out is iterating.
    pub(super) finished: Vec<usize>,
    /// Engine.IO's ping packet, as a frame.
    pub(super) eio_ping: SharedFrame,
    /// Writes the state file on every change (`--state`), when it can.
    pub(super) state: Option<StateWriter>,
    /// Makes `--www` files and QR codes off the loop.
    pub(super) pages: PageWorker,
    /// The LAN addresses `/join` lists, and when they were listed.
    pub(super) join_cache: Option<(Instant, Vec<std::net::IpAddr>)>,
    /// Socket.IO callbacks waiting for the cluster's answer: the hub's ask id, the session and
    /// its ack id.
    pub(super) acks: HashMap<u64, (usize, u64)>,
    /// Counts housekeeping rounds, to spread stall sampling over them.
    pub(super) housekeeping_round: usize,
    /// Ticks the timing thread skipped since the last log line about it, and when that was.
    pub(super) skips_unlogged: u64,
    pub(super) skip_logged_at: Option<Instant>,
}

impl Server {
    /// Binds the port, starts the timing thread (and the cluster thread), and opens `main` and
    /// the rooms the state file had. Ticks start flowing at once; `run` sends them.
    pub fn bind(cfg: Config) -> Result<Server, ServerError> {
        let addr = SocketAddr::new(cfg.bind, cfg.port);
        // One listener per shard on one port (SO_REUSEPORT): the first picks the port.
        let mut loops = Vec::with_capacity(cfg.threads.max(1));
        let mut local_addr = addr;
        for shard in 0..cfg.threads.max(1) {
            let poll = Poll::new().map_err(ServerError::Poll)?;
            // With --accept handoff only shard 0 listens.
            let listener = if shard == 0 || cfg.accept == AcceptMode::Reuseport {
                let bind_to = if shard == 0 { addr } else { local_addr };
                let std_listener =
                    shards::listen_shared(bind_to).map_err(|source| ServerError::Bind {
                        addr: bind_to,
                        source,
                    })?;
                if shard == 0 {
                    local_addr = std_listener.local_addr().map_err(ServerError::Poll)?;
                }
                let mut listener = TcpListener::from_std(std_listener);
                poll.registry()
                    .register(&mut listener, LISTENER, Interest::READABLE)
                    .map_err(ServerError::Poll)?;
                Some(listener)
            } else {
                None
            };
            let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(ServerError::Poll)?);
            let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(ServerError::Signals)?;
            poll.registry()
                .register(&mut signals, SIGNALS, Interest::READABLE)
                .map_err(ServerError::Signals)?;
            loops.push((poll, listener, waker, signals));
        }
        let wakers: Vec<Arc<Waker>> = loops.iter().map(|l| Arc::clone(&l.2)).collect();
        let waker = Arc::clone(&wakers[0]);
        let clock = Clock::start();
        // The state file's rooms, unless a cluster's shared timelines win (they do: in a
        // cluster what was saved is only the seed).
        let startup = match &cfg.state_file {
            Some(path) => state::startup(path, &cfg, clock.unix_now_ns()),
            None => state::Startup::off(),
        };
        // Each announced from its first tick after now, on the grid it had.
        let now = clock.unix_now_ns();
        let mut restored: Vec<(RoomName, Timeline)> = Vec::new();
        if let Some(resume) = &startup.resume {
            restored.push((
                RoomName::main(),
                cluster::to_timeline(&resume.timeline, resume.beats_per_bar).anchored_from(now),
            ));
        }
        for (name, resume) in &startup.rooms {
            restored.push((
                name.clone(),
                cluster::to_timeline(&resume.timeline, resume.beats_per_bar).anchored_from(now),
            ));
        }
        if cfg.cluster.is_some() && !restored.is_empty() {
            info!("state: in a cluster the shared timelines win over the state file's");
        }
        if let Some(dir) = &cfg.www {
            for hidden in www::shadowed(dir) {
                warn!(
                    "www: {} is never served: the embedded page of that name wins; rename it",
                    hidden.display()
                );
            }
        }
        let realtime = Realtime {
            fifo_priority: cfg.rt_priority,
            prewake: cfg.prewake,
            spin: cfg.spin,
        };
        let timing_cfg = TimingConfig {
            max_rooms: cfg.max_rooms,
            ring: TimingConfig::ring_for(cfg.max_rooms, cfg.max_bpm, cfg.ppqn),
            realtime,
        };
        let (timing, streams) =
            TimingThread::spawn(timing_cfg, clock, wakers.clone()).map_err(ServerError::Timing)?;
        let cluster = match &cfg.cluster {
            None => None,
            Some((url, name, lead)) => Some(start_cluster(&cfg, url, name, *lead, &waker)?),
        };
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
        let mut fx = Vec::new();
        let hub = Hub::new(hub_cfg, clock.unix_ns(0), clock.now_ns(), restored, &mut fx);
        let shared = Arc::new(Shared::new(hub, timing, wakers));
        let mut shards = Vec::with_capacity(loops.len());
        let mut cluster = cluster;
        for (shard, ((poll, listener, waker, signals), timing_events)) in
            loops.into_iter().zip(streams).enumerate()
        {
            let pages = PageWorker::spawn(cfg.www.clone(), Arc::clone(&waker))
                .map_err(ServerError::Pages)?;
            shards.push(Server {
                shard,
                shared: Arc::clone(&shared),
                rooms: ShardRooms::new(clock.unix_ns(0), cfg.ppqn),
                broadcasts: Vec::new(),
                others: Vec::new(),
                cfg: cfg.clone(),
                poll,
                listener,
                local_addr,
                socks: Slab::new(),
                sessions: Slab::new(),
                sids: HashMap::new(),
                routes: Vec::new(),
                fx: Vec::new(),
                jobs: VecDeque::new(),
                members: Vec::new(),
                timing_events,
                signals,
                clock,
                stats: ServerStats::default(),
                started: Instant::now(),
                fanout_events: Some(Events::with_capacity(256)),
                cluster: if shard == 0 { cluster.take() } else { None },
                accept_paused_until: None,
                fd_limit_logged: false,
                shutdown_by: None,
                busy_poll_until: None,
                readable_again: Vec::new(),
                finished: Vec::new(),
                eio_ping: protocol::text_frame("2"),
                state: None,
                pages,
                join_cache: None,
                acks: HashMap::new(),
                housekeeping_round: 0,
                skips_unlogged: 0,
                skip_logged_at: None,
            });
        }
        if shards.is_empty() {
            return Err(ServerError::Poll(io::Error::other("no event loop")));
        }
        let mut server = shards.remove(0);
        server.others = shards;
        server.shared.control().cluster = server.cluster.as_ref().map(|l| l.status);
        // The hub's first effects (every room's Add), sent to the timing thread in order.
        server
            .shared
            .decide(0, &mut server.fx, |_, decided| decided.append(&mut fx));
        server.settle_hub();
        server.join_cluster();
        // The state file is written from here on, starting with what the rooms are now.
        if let (Some(path), true) = (&server.cfg.state_file, startup.may_write) {
            let first = server.persisted();
            match StateWriter::start(path.clone(), first, clock, startup.lock) {
                Ok(writer) => {
                    if startup.fresh {
                        info!(
                            "state: no {} yet; starting afresh, saving there",
                            path.display()
                        );
                    }
                    server.state = Some(writer);
                }
                Err(e) => warn!("state: {e}; running without saving the state"),
            }
        }
        Ok(server)
    }

    /// What the state file keeps: every room's timeline as the hub has it.
    pub(super) fn persisted(&self) -> Persisted {
        let mut rooms = Vec::new();
        let mut main = None;
        for (name, timeline) in self.shared.control().hub.persisted() {
            let shared = cluster::from_timeline(&timeline);
            if name.is_main() {
                main = Some((shared, timeline.beats_per_bar));
            } else {
                rooms.push(SavedRoom {
                    name,
                    timeline: shared,
                    beats_per_bar: timeline.beats_per_bar,
                });
            }
        }
        let (timeline, beats_per_bar) = main.unwrap_or_else(|| {
            let t = Timeline::new(
                self.cfg.bpm,
                self.cfg.ppqn,
                self.cfg.beats_per_bar,
                self.clock.unix_now_ns(),
            );
            (cluster::from_timeline(&t), self.cfg.beats_per_bar)
        });
        Persisted {
            timeline,
            beats_per_bar,
            rooms,
        }
    }

    /// Hands the rooms' state to the writer thread (`--state`); it writes off the loop.
    pub(super) fn save_state(&mut self) {
        if self.state.is_none() {
            return;
        }
        let state = self.persisted();
        if let Some(writer) = self.state.as_mut() {
            writer.save(state);
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The tempo `main` ticks at now.
    pub fn bpm(&self) -> Bpm {
        let control = self.shared.control();
        control
            .hub
            .timeline(control.hub.main())
            .map_or(self.cfg.bpm, |t| t.bpm)
    }

    /// Runs every shard until SIGTERM or SIGINT, then closes every client with 1001 and
    /// returns: shards 1… on threads of their own, shard 0 on this one.
    pub fn run(mut self) -> Result<(), ServerError> {
        let mut handles = Vec::new();
        for mut other in std::mem::take(&mut self.others) {
            let name = format!("conductor-shard-{}", other.shard);
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || other.serve())
                .map_err(ServerError::Poll)?;
            handles.push(handle);
        }
        let result = self.serve();
        for handle in handles {
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!("a shard stopped: {e}"),
                Err(_) => error!("a shard panicked"),
            }
        }
        let timing = self.shared.control().timing.take();
        if let Some(timing) = timing {
            timing.stop();
        }
        if let Some(writer) = self.state.take() {
            writer.stop();
        }
        result
    }

    /// One shard's loop, until shutdown.
    fn serve(&mut self) -> Result<(), ServerError> {
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
            self.shared.publish_if_wanted(self.shard, &self.stats);
            self.drain_timing();
            self.drain_inbox();
            self.drain_cluster();
            self.drain_pages();
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
        info!(
            "shard {}: shutdown complete ({left} connections cut at the deadline)",
            self.shard
        );
        Ok(())
    }

    /// One readiness event. The waker's only job is to end the poll: the rings are drained
    /// by the caller.
    pub(super) fn on_event(&mut self, event: &mio::event::Event) {
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
    pub(super) fn carry_out(&mut self, fx: Vec<Effect>) {
        for effect in fx {
            match effect {
                Effect::Reply { client, event } => self.reply(client, &event),
                // Every shard derives its members' broadcasts from the timing stream, and
                // `Shared::decide` has sent timing commands already.
                Effect::Broadcast { .. } | Effect::Timing(_) => {}
                Effect::Cluster(ask) => self.ask_cluster(ask),
                Effect::Persist => self.save_state(),
                Effect::Answer {
                    ask,
                    client,
                    result,
                } => {
                    let ack = self.acks.remove(&ask).map(|(_, ack)| ack);
                    self.conclude(client, ack, result);
                }
            }
        }
    }

    /// Takes the effects a hub call left for this shard and carries them out; on shard 0,
    /// also the cluster requests and saves any shard's decisions queued for it, in order.
    pub(super) fn settle_hub(&mut self) {
        let fx = std::mem::take(&mut self.fx);
        self.carry_out(fx);
        if self.shard == 0 {
            let queued: Vec<Effect> = self.shared.control().for_shard0.drain(..).collect();
            if !queued.is_empty() {
                self.carry_out(queued);
            }
        }
    }

    /// One hub decision, made under the control lock for this shard ([`Shared::decide`]);
    /// its effects for this shard stay in `self.fx` for [`Self::settle_hub`].
    pub(super) fn decide<R>(&mut self, f: impl FnOnce(&mut Hub, &mut Vec<Effect>) -> R) -> R {
        self.shared.decide(self.shard, &mut self.fx, |control, fx| {
            f(&mut control.hub, fx)
        })
    }

    /// A client of this shard joins a room: the hub decides, and the client is known to live
    /// here before any other shard's decision can address it.
    /// (Takes the fields it needs, so that a caller may hold a socket or session meanwhile.)
    pub(super) fn join_room(
        shared: &Shared,
        shard: usize,
        fx: &mut Vec<Effect>,
        rooms: &mut ShardRooms,
        ask: JoinAsk<'_>,
        now_ns: u64,
    ) -> Result<ClientId, JoinError> {
        let JoinAsk {
            room,
            tokens,
            ticks,
        } = ask;
        let joined = shared.decide(shard, fx, |control, fx| {
            let joined = control.hub.join(room, tokens, ticks, now_ns, fx);
            if let Ok(client) = joined {
                control.set_home(client, shard);
                let key = control.hub.room_of(client);
                let name = key.and_then(|k| control.hub.room_name(k).cloned());
                return joined.map(|c| (c, key.zip(name)));
            }
            joined.map(|c| (c, None))
        })?;
        let (client, seat) = joined;
        if let Some((key, name)) = seat {
            rooms.join(client, key, name, ticks.unwrap_or_default());
        }
        Ok(client)
    }

    /// What other shards handed this one: replies and answers for its clients, and
    /// connections for its Socket.IO sessions.
    pub(super) fn drain_inbox(&mut self) {
        for forward in self.shared.take_inbox(self.shard) {
            match forward {
                Forward::Reply { client, event } => self.reply(client, &event),
                Forward::Answer {
                    ask,
                    client,
                    result,
                } => {
                    let ack = self.acks.remove(&ask).map(|(_, ack)| ack);
                    self.conclude(client, ack, result);
                }
                Forward::Connection { conn, req } => self.adopt(*conn, *req),
                Forward::Accepted { sock, peer } => self.add_connection(sock, peer),
            }
        }
    }

    /// A connection another shard handed over: it is registered here and its request served.
    pub(super) fn adopt(&mut self, mut conn: Connection, req: Request) {
        let entry = self.socks.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(
            conn.socket(),
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            warn!("cannot take over a connection from {}: {e}", conn.peer);
            return;
        }
        self.shared.connection_opened(self.shard);
        entry.insert(Socket {
            conn,
            owner: Owner::Http,
        });
        self.on_request(key, req, Instant::now());
        self.drive(key, true, true);
    }

    /// Hands connection `key`, whose request `req` names a session on `shard`, to that shard.
    pub(super) fn hand_over(&mut self, key: usize, req: &Request, shard: usize) {
        let Some(mut s) = self.socks.try_remove(key) else {
            return;
        };
        let _ = self.poll.registry().deregister(s.conn.socket());
        self.shared.connection_closed(self.shard);
        self.shared.send(
            shard,
            Forward::Connection {
                conn: Box::new(s.conn),
                req: Box::new(req.clone()),
            },
        );
    }

    /// A client of this shard is gone.
    pub(super) fn client_closed(&mut self, kind: ClientKind, reason: CloseReason) {
        self.stats.client_closed(kind, reason);
        self.shared.client_gone();
    }

    /// Clients over every shard, against `--max-clients`.
    pub(super) fn clients_everywhere(&self) -> usize {
        self.shared.clients.load(Ordering::Relaxed)
    }

    pub(super) fn route(&self, client: ClientId) -> Option<Via> {
        self.routes
            .get(client.slot as usize)
            .copied()
            .flatten()
            .filter(|r| r.generation == client.generation)
            .map(|r| r.via)
    }

    pub(super) fn set_route(&mut self, client: ClientId, via: Via) {
        let slot = client.slot as usize;
        if self.routes.len() <= slot {
            self.routes.resize(slot + 1, None);
        }
        self.routes[slot] = Some(Route {
            generation: client.generation,
            via,
        });
    }

    /// The client leaves its room, and its route goes (and any callback still waiting for
    /// the cluster's answer to one of its requests).
    pub(super) fn forget(&mut self, client: ClientId) {
        let now_ns = self.clock.now_ns();
        self.rooms.leave(client);
        for ask in self.decide(|hub, fx| hub.leave(client, now_ns, fx)) {
            self.acks.remove(&ask);
        }
        self.settle_hub();
        if let Some(route) = self.routes.get_mut(client.slot as usize)
            && route.is_some_and(|r| r.generation == client.generation)
        {
            *route = None;
        }
    }

    /// One event to one client, in its protocol.
    pub(super) fn reply(&mut self, client: ClientId, event: &Outgoing) {
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

    // ---- timing and cluster ----

    /// Takes every event the timing thread has queued, in order, and turns them into jobs
    /// for this shard's members. Shard 0 also hands each event to the hub (its counts, the
    /// deferred changes), under the control lock; the other shards never take it per tick.
    pub(super) fn drain_timing(&mut self) {
        let mut broadcasts = std::mem::take(&mut self.broadcasts);
        while let Ok(event) = self.timing_events.pop() {
            let now_ns = self.clock.now_ns();
            match event {
                TimingEvent::Tick(tick) => {
                    self.busy_poll_until = None;
                    self.stats.record_tick(tick.lateness_ns());
                    if self.shard == 0 && tick.lateness_ns() > stats::LATE_TICK_NS {
                        debug!(
                            "late tick count={} lateness_us={}",
                            tick.count,
                            tick.lateness_ns() / 1000
                        );
                    }
                    self.stats
                        .handoff
                        .record(now_ns.saturating_sub(tick.emitted_ns));
                }
                TimingEvent::Soon { deadline_ns } => {
                    // Poll without sleeping until the tick is here (bounded, in case a change
                    // moves it later).
                    self.busy_poll_until = Some(self.clock.instant(deadline_ns) + BUSY_POLL_GRACE);
                }
                TimingEvent::Skipped { ticks, to, .. } if self.shard == 0 => {
                    self.on_skip(ticks, to)
                }
                TimingEvent::Exhausted { room } if self.shard == 0 => error!(
                    "timing: room {}'s tick count reached its end (u64::MAX); no ticks there \
                     until its timeline changes",
                    self.shared
                        .control()
                        .hub
                        .room_name(room)
                        .map_or_else(|| "?".to_string(), ToString::to_string)
                ),
                TimingEvent::Timeline { timeline, .. } if self.shard == 0 => {
                    info!(
                        "timeline v{}: {} BPM from tick {}, {} from tick {}",
                        timeline.version,
                        timeline.bpm,
                        timeline.anchor_count,
                        timeline.transport.state(),
                        timeline.transport.from_count()
                    );
                }
                _ => {}
            }
            if self.shard == 0 && !matches!(event, TimingEvent::Soon { .. }) {
                self.decide(|hub, fx| hub.on_timing(&event, now_ns, fx));
                self.settle_hub();
            }
            self.rooms.on_timing(&event, &mut broadcasts);
            if self.shutdown_by.is_none() {
                for b in broadcasts.drain(..) {
                    self.jobs.push_back(Job {
                        room: b.room,
                        to: b.to,
                        event: b.event,
                        deadline_ns: b.tick_deadline_ns,
                    });
                }
            }
            broadcasts.clear();
        }
        self.broadcasts = broadcasts;
        if self.shard == 0 {
            let control = self.shared.control();
            self.stats.tempo_changes = control.hub.tempo_changes();
            self.stats.transport_changes = control.hub.transport_changes();
        }
    }

    /// The timing thread fell behind and skipped ticks. Said once, then at most once per
    /// [`SKIP_LOG_EVERY`] with the total since, so a machine that keeps stalling does not
    /// flood the log.
    pub(super) fn on_skip(&mut self, ticks: u64, to: u64) {
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

    // ---- connections ----

    pub(super) fn accept(&mut self) {
        if self.accept_paused_until.is_some() {
            return;
        }
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((sock, peer)) => self.place_connection(sock, peer),
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

    /// A connection this shard accepted: kept, or with `--accept handoff` handed to the shard
    /// with the fewest connections (counted there at once, so a burst spreads evenly).
    pub(super) fn place_connection(&mut self, sock: TcpStream, peer: SocketAddr) {
        let to = if self.cfg.accept == AcceptMode::Handoff {
            self.shared.least_loaded()
        } else {
            self.shard
        };
        self.shared.connection_opened(to);
        if to == self.shard {
            self.add_connection(sock, peer);
        } else {
            self.shared.send(to, Forward::Accepted { sock, peer });
        }
    }

    /// Registers a connection, counted against this shard already.
    pub(super) fn add_connection(&mut self, mut sock: TcpStream, peer: SocketAddr) {
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
            self.shared.connection_closed(self.shard);
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
    pub(super) fn after_io(&mut self, key: usize) {
        let Some(s) = self.socks.get_mut(key) else {
            return;
        };
        self.stats.messages_sent += s.conn.flush();
        if let Some(reason) = s.conn.take_close_reason() {
            if let Some(kind) = s.conn.counted.take() {
                self.stats.client_closed(kind, reason);
                self.shared.client_gone();
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
    pub(super) fn socket_ended(&mut self, skey: usize, key: usize, reason: CloseReason) {
        let Some(session) = self.sessions.get_mut(skey) else {
            return;
        };
        if session.socket() == Some(key) {
            self.close_session(skey, reason);
        } else if session.prober() == Some(key) {
            session.abandon_upgrade();
        }
    }

    pub(super) fn remove(&mut self, key: usize) {
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
        self.shared.connection_closed(self.shard);
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

    pub(super) fn remove_finished(&mut self) {
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
    pub(super) fn drive(&mut self, key: usize, readable: bool, writable: bool) {
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
                                    // A refused message gets no answer, pings included.
                                    if matches!(m, tungstenite::Message::Ping(_)) {
                                        s.conn.refuse_pong();
                                    }
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

    // ---- HTTP ----

    // ---- Engine.IO and Socket.IO ----

    // ---- messages ----

    // ---- housekeeping and shutdown ----

    pub(super) fn housekeeping(&mut self, now: Instant) {
        let now_ns = self.clock.now_ns();
        let timeout = self.cfg.handshake_timeout;
        let (interval, ping_timeout) = (self.cfg.ping_interval, self.cfg.ping_timeout);
        let ws_interval = self.ws_probe_interval_ns();
        // Sampling a socket for a stall costs a system call: with many clients each is sampled
        // every few rounds (the watch measures time, not samples).
        let stride = 1 + self.socks.len() / STALL_SAMPLES_PER_ROUND;
        let round = self.housekeeping_round;
        self.housekeeping_round = round.wrapping_add(1);
        let keys: Vec<usize> = self.socks.iter().map(|(k, _)| k).collect();
        for key in keys {
            let Some(s) = self.socks.get_mut(key) else {
                continue;
            };
            if s.conn.expire(now, timeout) {
                self.stats.count_refused(RefuseReason::HandshakeTimeout);
            }
            if key.wrapping_add(round).is_multiple_of(stride) && s.conn.check_stall(now) {
                debug!("stalled client peer={}: not reading", s.conn.peer);
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
            if session.connect_overdue(now_ns, nanos(timeout)) {
                // Never connected to a namespace: a handshake left hanging, not a client.
                self.stats.count_refused(RefuseReason::ConnectTimeout);
                if let Some(socket) = session.socket()
                    && let Some(s) = self.socks.get_mut(socket)
                {
                    s.owner = Owner::Http;
                    s.conn.close_ws(
                        CloseCode::Policy,
                        "no Socket.IO connect within the handshake timeout",
                        CloseReason::ProtocolError,
                        now,
                    );
                    self.after_io(socket);
                }
                self.close_session(skey, CloseReason::PingTimeout);
                continue;
            }
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
        if self.shard == 0 {
            self.decide(|hub, fx| hub.housekeeping(now_ns, fx));
            self.settle_hub();
        }
        if let Some(writer) = self.state.as_mut() {
            writer.retry();
        }
        if self.accept_paused_until.is_some_and(|until| now >= until) {
            self.accept_paused_until = None;
            self.accept();
        }
    }

    pub(super) fn on_signal(&mut self) {
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
    pub(super) fn begin_shutdown(&mut self) {
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

    /// How long a playing room has gone without a tick, when that is too long (`/healthz`).
    pub(super) fn silent_for(&self) -> Option<Duration> {
        if self.shutdown_by.is_some() {
            return None;
        }
        let now_ns = self.clock.now_ns();
        self.shared.control().hub.silent_for(now_ns)
    }

    /// Every figure, added up over the shards whichever shard answers.
    pub(super) fn metric_table(&self) -> Vec<metrics::Metric> {
        let (total, each) = self.shared.gather_stats(self.shard, &self.stats);
        let (main, rooms) = {
            let control = self.shared.control();
            (
                control.hub.report(control.hub.main()),
                control.hub.reports(),
            )
        };
        let shards: Vec<ShardFigures> = each
            .iter()
            .map(|st| ShardFigures {
                clients: st.clients,
                fanout_p99_ns: st.fanout.summary().p99,
            })
            .collect();
        let (dropped_ticks, skipped_ticks) = {
            let control = self.shared.control();
            control
                .timing
                .as_ref()
                .map_or((0, 0), |t| (t.dropped_ticks(), t.skipped_ticks()))
        };
        let snapshot = Snapshot {
            bpm: main.as_ref().map_or(self.cfg.bpm, |r| r.bpm),
            ppqn: self.cfg.ppqn,
            clients: total.clients,
            count: main.as_ref().map_or(0, |r| r.count),
            transport: main
                .as_ref()
                .map_or(TransportState::Playing, |r| r.transport)
                .label(),
            transport_count: main.as_ref().map_or(0, |r| r.transport_count),
            uptime_s: self.started.elapsed().as_secs_f64(),
            dropped_ticks,
            skipped_ticks,
            silent_for: self.silent_for(),
            cluster: self.shared.control().cluster,
            stats: &total,
            shards: &shards,
        };
        metrics::table(&snapshot, &rooms, self.cfg.metrics_rooms)
    }
}

pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub(super) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// What a client asks for as it joins: its room (`None` is `main`), the control tokens it
/// presented, and the ticks it chose (`None` is the default).
#[derive(Clone, Copy, Debug)]
pub(super) struct JoinAsk<'a> {
    pub(super) room: Option<&'a str>,
    pub(super) tokens: &'a [&'a str],
    pub(super) ticks: Option<TickChoice>,
}
