//! The hub: rooms, their members, and who may change what. The server's core, without I/O.
//!
//! This module owns every decision about rooms and control: which room a client joins (and
//! whether it may), who may conduct it, how fast, what a change means (through
//! [`crate::timeline::plan`]) and how far ahead it lands (through [`crate::lead`]), when an
//! empty room is dropped, and what each client and room is told. It reads no clock, holds no
//! socket and starts no thread: every call takes `now` (ns on the server's monotonic clock,
//! whose zero is unix time `epoch_unix_ns`) and pushes [`Effect`]s for the I/O layer to carry
//! out: a reply to one client, a broadcast to a room, a command to the timing thread, a
//! request to the cluster thread, a write of the state file. So every rule is tested here,
//! in-process, with a fake clock.
//!
//! Two copies of each room's timeline are kept, on purpose. `timeline` is the authority: the
//! latest change decided (or adopted from the cluster), which the next change is planned on.
//! `announced` is what the timing thread's ordered stream has announced so far, which ticks
//! are filtered by and which the members have been told. A change moves the first at once and
//! the second when its announcement comes back through the stream, behind every tick emitted
//! before it; that is what keeps every client's frames in order.

use std::collections::HashMap;

use serde::Serialize;

use crate::cluster::{ClusterFault, Outcome};
use crate::lead::{LeadPolicy, RoundTrips};
use crate::protocol::{
    self, ClientError, HelloData, Outgoing, TickData, TimelineData, TransportData,
};
use crate::room::{NameError, RoomKey, RoomName};
use crate::room_timing::{RoomTick, TimingCommand, TimingEvent};
use crate::tempo::Bpm;
use crate::tick_choice::{Audience, TickChoice};
use crate::timeline::{Change, Planned, Timeline, is_unchanged, plan};
use crate::transport::{Quantize, TransportState};

/// Tempo and transport changes a room takes per second, from all its members together: each
/// is a write to every member.
pub const MAX_ROOM_CHANGES_PER_SEC: u32 = 10;
/// Changes one client may make per second: half the room's, so one member cannot lock the
/// others out.
pub const MAX_CLIENT_CHANGES_PER_SEC: u32 = 5;
/// How long a room new to this instance waits for its cluster's shared timeline before it
/// starts on its own (and adopts the shared one when it comes).
pub const CLUSTER_JOIN_WAIT_NS: u64 = 2_000_000_000;
/// A new room's first tick is this far after its creation.
const FIRST_TICK_DELAY_NS: u64 = 1_000_000;
/// Control requests waiting for the cluster thread at most (its ring holds 64).
pub const MAX_PENDING_ASKS: usize = 64;
/// How long a control request may wait for the cluster thread before it is refused (Redis
/// calls time out after 2 s; this never happens unless the thread is stuck).
pub const ASK_TIMEOUT_NS: u64 = 10_000_000_000;

/// The settings the hub decides by.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// The tempo a new room starts at.
    pub bpm: Bpm,
    pub ppqn: u32,
    pub beats_per_bar: u32,
    pub min_bpm: Bpm,
    pub max_bpm: Bpm,
    /// Rooms at most, `main` included.
    pub max_rooms: usize,
    /// How long a room without clients lives on.
    pub room_idle_ns: u64,
    /// `--control-token`: valid in every room.
    pub control_token: Option<String>,
    /// `--room-token NAME=TOKEN`: valid in that room only.
    pub room_tokens: HashMap<RoomName, String>,
    pub lead: LeadPolicy,
    /// With `--cluster`: changes are planned by the cluster thread over the shared timeline.
    pub clustered: bool,
    pub version: &'static str,
}

/// A client as the hub knows it: a `/ws` connection, or one Socket.IO namespace of an
/// Engine.IO session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientId {
    pub slot: u32,
    pub generation: u32,
}

/// What the hub asks of the cluster thread.
#[derive(Clone, Debug, PartialEq)]
pub enum ClusterAsk {
    /// Follow this room's shared timeline, writing `seed` if it has none yet.
    Open {
        room: RoomKey,
        name: RoomName,
        seed: Timeline,
    },
    /// Plan `change` over the shared timeline, `lead_ns` ahead, and write it; answer `id`.
    Change {
        id: u64,
        room: RoomKey,
        name: RoomName,
        change: Change,
        lead_ns: u64,
    },
    /// Whether this instance has clients in the room (it keeps the shared state alive).
    Occupied { room: RoomKey, occupied: bool },
    /// This instance dropped the room (it idled out here).
    Close { room: RoomKey, name: RoomName },
}

/// What the I/O layer must do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// One event to one client.
    Reply {
        client: ClientId,
        event: Outgoing,
    },
    /// One event to every member of a room, encoded once per protocol.
    Broadcast {
        room: RoomKey,
        /// Which of its members: everyone, but for a tick only those who chose to get it.
        to: Audience,
        event: Outgoing,
    },
    Timing(TimingCommand),
    Cluster(ClusterAsk),
    /// Rooms' state changed: hand [`Hub::persisted`] to the state file's writer.
    Persist,
    /// How control request `ask` (one handed to the cluster, [`Decision::Asked`]) ended, for
    /// `client` to hear: through its Socket.IO callback, or an `error` event on failure.
    Answer {
        ask: u64,
        client: ClientId,
        result: Result<(), ClientError>,
    },
}

/// What became of an accepted control request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Decided here: the change is announced (or the sender confirmed); nothing follows.
    Done,
    /// Handed to the cluster thread as ask `id`: an [`Effect::Answer`] follows.
    Asked(u64),
}

/// A control request the cluster thread has yet to answer.
#[derive(Clone, Copy, Debug)]
struct PendingAsk {
    id: u64,
    client: ClientId,
    room: RoomKey,
    /// A tempo change (else a transport change): what an `Unchanged` confirms.
    tempo: bool,
    asked_ns: u64,
}

/// Why a client could not join.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("{0}")]
    Name(#[from] NameError),
    #[error(
        "this server already holds {max_rooms} rooms (--max-rooms); join an existing room, or \
         try again once an idle one has closed"
    )]
    Full { max_rooms: usize },
}

/// A control request, as decoded from a client.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Control {
    /// The value as sent, not yet range-checked.
    SetBpm(f64),
    Start(Quantize),
    Stop,
}

/// Changes per second in one-second windows.
#[derive(Clone, Copy, Debug)]
struct Window {
    per_sec: u32,
    start_ns: Option<u64>,
    count: u32,
}

impl Window {
    fn new(per_sec: u32) -> Window {
        Window {
            per_sec,
            start_ns: None,
            count: 0,
        }
    }

    fn roll(&mut self, now_ns: u64) {
        if self
            .start_ns
            .is_none_or(|start| now_ns.saturating_sub(start) >= 1_000_000_000)
        {
            self.start_ns = Some(now_ns);
            self.count = 0;
        }
    }

    fn has_room(&mut self, now_ns: u64) -> bool {
        self.roll(now_ns);
        self.count < self.per_sec
    }

    fn take(&mut self, now_ns: u64) {
        self.roll(now_ns);
        self.count = self.count.saturating_add(1);
    }
}

struct Member {
    room: RoomKey,
    /// Which ticks it receives, and whether it named that choice (then `hello` says it).
    ticks: TickChoice,
    ticks_named: bool,
    /// Index in its group of the room's members.
    at: usize,
    may_control: bool,
    changes: Window,
    round_trips: RoundTrips,
}

/// A room's members, grouped by the ticks they receive: a tick's fan-out visits only the
/// groups its [`Audience`] names, so a `none` member costs nothing per tick and a `bar`
/// member only on bar lines.
#[derive(Default)]
struct Members {
    groups: [Vec<ClientId>; 4],
}

impl Members {
    /// Adds a member; returns its index in its group.
    fn push(&mut self, choice: TickChoice, client: ClientId) -> usize {
        let group = &mut self.groups[choice.index()];
        group.push(client);
        group.len() - 1
    }

    /// Removes the member at `at` of its group, if it is `client`; returns the member moved
    /// into its place (whose index is now `at`).
    fn remove(&mut self, choice: TickChoice, at: usize, client: ClientId) -> Option<ClientId> {
        let group = &mut self.groups[choice.index()];
        if group.get(at) != Some(&client) {
            return None;
        }
        group.swap_remove(at);
        group.get(at).copied()
    }

    fn len(&self) -> usize {
        self.groups.iter().map(Vec::len).sum()
    }

    fn is_empty(&self) -> bool {
        self.groups.iter().all(Vec::is_empty)
    }

    fn iter(&self) -> impl Iterator<Item = &ClientId> {
        self.groups.iter().flatten()
    }

    fn of(&self, audience: Audience) -> impl Iterator<Item = &ClientId> {
        audience
            .groups()
            .flat_map(move |choice| self.groups[choice.index()].iter())
    }
}

/// A change that had to wait for one still pending ([`Planned::NotBefore`]).
#[derive(Clone, Copy, Debug)]
struct Deferred {
    change: Change,
    at_unix_ns: u64,
}

struct Room {
    key: RoomKey,
    name: RoomName,
    /// The authority: the latest change decided or adopted.
    timeline: Timeline,
    /// What the timing stream has announced (`None` until the room's first announcement).
    announced: Option<Timeline>,
    /// The last tick emitted, and the tempo it was at, and when it was taken.
    count: u64,
    last_tick_ns: u64,
    sounding_bpm: Bpm,
    members: Members,
    /// False while a room new to this instance waits for its cluster's timeline: its members
    /// get their hello once it is ready.
    ready: bool,
    since_ns: u64,
    empty_since_ns: Option<u64>,
    changes: Window,
    deferred: Option<Deferred>,
    /// The largest recent round trip of any member, for reports: raised at once by a larger
    /// sample, recomputed in housekeeping (so a member leaving lowers it within 250 ms). A
    /// change is planned on a fresh computation instead ([`Hub::lead_ns`]).
    worst_rtt_ns: Option<u64>,
    tempo_changes: u64,
    transport_changes: u64,
}

/// One room's figures, for `/stats` and `/metrics`.
#[derive(Clone, Debug, PartialEq)]
pub struct RoomReport {
    pub name: RoomName,
    pub bpm: Bpm,
    pub clients: usize,
    /// The last tick emitted.
    pub count: u64,
    /// The transport's state for the next tick, and the tick its latest change holds from.
    pub transport: TransportState,
    pub transport_count: u64,
    /// The lead a change would get now.
    pub lead_ns: u64,
    pub tempo_changes: u64,
    pub transport_changes: u64,
}

/// `hello`, with the room's name outside `main` and the tick choice a client named (a client
/// of `main` that named none sees exactly the predecessor's fields).
#[derive(Serialize)]
struct RoomHello<'a> {
    #[serde(flatten)]
    hello: HelloData,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ticks: Option<&'static str>,
}

/// Generation-checked slots: a freed slot is reused with the next generation, so a key held
/// past its entry's removal never reaches the next occupant.
struct Slots<T> {
    entries: Vec<(u32, Option<T>)>,
    free: Vec<u32>,
    limit: usize,
}

impl<T> Slots<T> {
    fn new(limit: usize) -> Slots<T> {
        Slots {
            entries: Vec::new(),
            free: Vec::new(),
            limit,
        }
    }

    fn insert(&mut self, make: impl FnOnce(u32, u32) -> T) -> Option<(u32, u32)> {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None if self.entries.len() < self.limit => {
                self.entries.push((0, None));
                (self.entries.len() - 1) as u32
            }
            None => return None,
        };
        let entry = &mut self.entries[slot as usize];
        entry.0 = entry.0.wrapping_add(1);
        entry.1 = Some(make(slot, entry.0));
        Some((slot, entry.0))
    }

    fn get(&self, slot: u32, generation: u32) -> Option<&T> {
        match self.entries.get(slot as usize)? {
            (g, Some(value)) if *g == generation => Some(value),
            _ => None,
        }
    }

    fn get_mut(&mut self, slot: u32, generation: u32) -> Option<&mut T> {
        match self.entries.get_mut(slot as usize)? {
            (g, Some(value)) if *g == generation => Some(value),
            _ => None,
        }
    }

    fn remove(&mut self, slot: u32, generation: u32) -> Option<T> {
        let entry = self.entries.get_mut(slot as usize)?;
        if entry.0 != generation || entry.1.is_none() {
            return None;
        }
        self.free.push(slot);
        entry.1.take()
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        self.entries.iter().filter_map(|(_, v)| v.as_ref())
    }

    fn len(&self) -> usize {
        self.entries.len() - self.free.len()
    }
}

/// Every room and every client in them.
pub struct Hub {
    cfg: HubConfig,
    epoch_unix_ns: u64,
    rooms: Slots<Room>,
    names: HashMap<RoomName, RoomKey>,
    clients: Slots<Member>,
    main: RoomKey,
    cluster_connected: bool,
    /// Why the cluster's Redis is not usable, when it is not.
    cluster_fault: Option<ClusterFault>,
    /// Control requests the cluster thread has yet to answer.
    asks: Vec<PendingAsk>,
    next_ask: u64,
    /// Totals over every room, dropped ones included.
    tempo_changes: u64,
    transport_changes: u64,
}

impl Hub {
    /// A hub with `main` and every room in `restored` (the state file's, or a cluster's
    /// `main`), each ticking from its saved timeline. Pushes their `Add`s.
    pub fn new(
        cfg: HubConfig,
        epoch_unix_ns: u64,
        now_ns: u64,
        restored: Vec<(RoomName, Timeline)>,
        fx: &mut Vec<Effect>,
    ) -> Hub {
        let max_rooms = cfg.max_rooms.max(1);
        let mut hub = Hub {
            cfg,
            epoch_unix_ns,
            rooms: Slots::new(max_rooms),
            names: HashMap::new(),
            clients: Slots::new(usize::MAX),
            main: RoomKey {
                slot: 0,
                generation: 0,
            },
            cluster_connected: false,
            cluster_fault: None,
            asks: Vec::new(),
            next_ask: 1,
            tempo_changes: 0,
            transport_changes: 0,
        };
        let main_timeline = restored
            .iter()
            .find(|(name, _)| name.is_main())
            .map(|(_, t)| *t);
        hub.main = hub.create(RoomName::main(), main_timeline, true, now_ns, fx);
        for (name, timeline) in restored {
            if !name.is_main() && !hub.names.contains_key(&name) && hub.rooms.len() < max_rooms {
                hub.create(name, Some(timeline), true, now_ns, fx);
            }
        }
        hub
    }

    fn unix(&self, now_ns: u64) -> u64 {
        self.epoch_unix_ns.saturating_add(now_ns)
    }

    /// Makes a room (the slot is free: the caller checked). A room restored from saved state
    /// starts at once; a new one in a cluster first asks for the shared timeline.
    fn create(
        &mut self,
        name: RoomName,
        timeline: Option<Timeline>,
        restored: bool,
        now_ns: u64,
        fx: &mut Vec<Effect>,
    ) -> RoomKey {
        let fresh = Timeline::new(
            self.cfg.bpm,
            self.cfg.ppqn,
            self.cfg.beats_per_bar,
            self.unix(now_ns) + FIRST_TICK_DELAY_NS,
        );
        let timeline = timeline.unwrap_or(fresh);
        // In a cluster every room, `main` and saved ones too, waits for its shared timeline:
        // it wins over what this instance had (the saved one is only the seed).
        let ready = !self.cfg.clustered;
        let made = self.rooms.insert(|slot, generation| Room {
            key: RoomKey { slot, generation },
            name: name.clone(),
            timeline,
            announced: None,
            count: 0,
            last_tick_ns: now_ns,
            sounding_bpm: timeline.bpm,
            members: Members::default(),
            ready,
            since_ns: now_ns,
            empty_since_ns: Some(now_ns),
            changes: Window::new(MAX_ROOM_CHANGES_PER_SEC),
            deferred: None,
            worst_rtt_ns: None,
            tempo_changes: 0,
            transport_changes: 0,
        });
        // `create` is only called with a slot to spare.
        let (slot, generation) = made.unwrap_or((0, 0));
        let key = RoomKey { slot, generation };
        self.names.insert(name.clone(), key);
        if ready {
            fx.push(Effect::Timing(TimingCommand::Add {
                room: key,
                timeline,
            }));
        }
        if self.cfg.clustered {
            fx.push(Effect::Cluster(ClusterAsk::Open {
                room: key,
                name,
                seed: timeline,
            }));
        }
        if !restored {
            fx.push(Effect::Persist);
        }
        key
    }

    /// Whether `tokens` (what the client presented) let it conduct `room`.
    fn may_control(&self, room: &RoomName, tokens: &[&str]) -> bool {
        let room_token = self.cfg.room_tokens.get(room);
        if self.cfg.control_token.is_none() && room_token.is_none() {
            return true;
        }
        let matches = |expected: &String| {
            tokens
                .iter()
                .any(|t| crate::http::tokens_match(t, expected))
        };
        self.cfg.control_token.as_ref().is_some_and(matches) || room_token.is_some_and(matches)
    }

    fn token_required(&self, room: &RoomName) -> bool {
        self.cfg.control_token.is_some() || self.cfg.room_tokens.contains_key(room)
    }

    /// Checks a room name and whether joining it is possible, without joining: for refusing
    /// an HTTP upgrade before it happens. `None` is `main`.
    pub fn check_join(&self, room: Option<&str>) -> Result<RoomName, JoinError> {
        let name = match room {
            None => RoomName::main(),
            Some(name) => RoomName::parse(name)?,
        };
        if !self.names.contains_key(&name) && self.rooms.len() >= self.cfg.max_rooms.max(1) {
            return Err(JoinError::Full {
                max_rooms: self.cfg.max_rooms.max(1),
            });
        }
        Ok(name)
    }

    /// A client joins `room` (`None`: `main`), presenting `tokens`. Creates the room on first
    /// join. The client gets its `hello` and `timeline` now, or once the room is ready.
    pub fn join(
        &mut self,
        room: Option<&str>,
        tokens: &[&str],
        ticks: Option<TickChoice>,
        now_ns: u64,
        fx: &mut Vec<Effect>,
    ) -> Result<ClientId, JoinError> {
        let name = self.check_join(room)?;
        let may_control = self.may_control(&name, tokens);
        let key = match self.names.get(&name) {
            Some(&key) => key,
            None => self.create(name, None, false, now_ns, fx),
        };
        let Some(room) = self.rooms.get_mut(key.slot, key.generation) else {
            return Err(JoinError::Full {
                max_rooms: self.cfg.max_rooms,
            });
        };
        let choice = ticks.unwrap_or_default();
        let made = self.clients.insert(|_, _| Member {
            room: key,
            ticks: choice,
            ticks_named: ticks.is_some(),
            at: 0,
            may_control,
            changes: Window::new(MAX_CLIENT_CHANGES_PER_SEC),
            round_trips: RoundTrips::default(),
        });
        let (slot, generation) = made.unwrap_or((0, 0));
        let client = ClientId { slot, generation };
        let at = room.members.push(choice, client);
        if let Some(member) = self.clients.get_mut(slot, generation) {
            member.at = at;
        }
        room.empty_since_ns = None;
        if room.members.len() == 1 && self.cfg.clustered {
            fx.push(Effect::Cluster(ClusterAsk::Occupied {
                room: key,
                occupied: true,
            }));
        }
        if room.ready {
            self.greet(client, now_ns, fx);
        }
        Ok(client)
    }

    /// Sends a member its `hello` and its room's `timeline`.
    fn greet(&self, client: ClientId, now_ns: u64, fx: &mut Vec<Effect>) {
        let Some(member) = self.clients.get(client.slot, client.generation) else {
            return;
        };
        let Some(room) = self.rooms.get(member.room.slot, member.room.generation) else {
            return;
        };
        let unix_now = self.unix(now_ns);
        let data = HelloData {
            bpm: room.sounding_bpm,
            ppqn: self.cfg.ppqn,
            count: room.count,
            time: unix_now / 1_000_000,
            time_us: unix_now / 1_000,
            min_bpm: self.cfg.min_bpm,
            max_bpm: self.cfg.max_bpm,
            beats_per_bar: room.timeline.beats_per_bar,
            playing: room.timeline.transport.state() == TransportState::Playing,
            control: member.may_control,
            token_required: self.token_required(&room.name),
            version: self.cfg.version,
        };
        let named_room = (!room.name.is_main()).then_some(room.name.as_str());
        let ticks = member.ticks_named.then_some(member.ticks.label());
        let hello = if named_room.is_none() && ticks.is_none() {
            protocol::hello(&data)
        } else {
            let json = serde_json::to_string(&RoomHello {
                hello: data,
                room: named_room,
                ticks,
            })
            .unwrap_or_else(|_| "null".into());
            Outgoing {
                name: "hello",
                data: json,
            }
        };
        fx.push(Effect::Reply {
            client,
            event: hello,
        });
        fx.push(Effect::Reply {
            client,
            event: timeline_event(&room.timeline),
        });
    }

    /// A client left (closed, or disconnected its namespace). Its requests still with the
    /// cluster are forgotten: their ids are returned.
    pub fn leave(&mut self, client: ClientId, now_ns: u64, fx: &mut Vec<Effect>) -> Vec<u64> {
        let Some(member) = self.clients.remove(client.slot, client.generation) else {
            return Vec::new();
        };
        let mut forgotten = Vec::new();
        self.asks.retain(|a| {
            let mine = a.client == client;
            if mine {
                forgotten.push(a.id);
            }
            !mine
        });
        let Some(room) = self.rooms.get_mut(member.room.slot, member.room.generation) else {
            return forgotten;
        };
        let at = member.at;
        if let Some(moved) = room.members.remove(member.ticks, at, client)
            && let Some(m) = self.clients.get_mut(moved.slot, moved.generation)
        {
            m.at = at;
        }
        if room.members.is_empty() {
            room.empty_since_ns = Some(now_ns);
            if self.cfg.clustered {
                fx.push(Effect::Cluster(ClusterAsk::Occupied {
                    room: room.key,
                    occupied: false,
                }));
            }
        }
        forgotten
    }

    /// The room a client is in.
    pub fn room_of(&self, client: ClientId) -> Option<RoomKey> {
        self.clients
            .get(client.slot, client.generation)
            .map(|m| m.room)
    }

    /// The members of a room a broadcast to `audience` goes to, for a fan-out: only the
    /// groups it names are visited.
    pub fn members(&self, room: RoomKey, audience: Audience) -> impl Iterator<Item = ClientId> {
        self.rooms
            .get(room.slot, room.generation)
            .into_iter()
            .flat_map(move |r| r.members.of(audience))
            .copied()
    }

    /// What a client receives of the ticks.
    pub fn tick_choice(&self, client: ClientId) -> Option<TickChoice> {
        self.clients
            .get(client.slot, client.generation)
            .map(|m| m.ticks)
    }

    /// A room's name (cheap: for the fan-out, per tick).
    pub fn room_name(&self, room: RoomKey) -> Option<&RoomName> {
        self.rooms.get(room.slot, room.generation).map(|r| &r.name)
    }

    pub fn room_key(&self, name: &RoomName) -> Option<RoomKey> {
        self.names.get(name).copied()
    }

    pub fn main(&self) -> RoomKey {
        self.main
    }

    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }

    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// A round trip measured for `client` (WebSocket Ping, Engine.IO heartbeat).
    pub fn round_trip(&mut self, client: ClientId, rtt_ns: u64) {
        let Some(m) = self.clients.get_mut(client.slot, client.generation) else {
            return;
        };
        m.round_trips.record(rtt_ns);
        let (room, worst) = (m.room, m.round_trips.recent_max_ns());
        if let Some(r) = self.rooms.get_mut(room.slot, room.generation) {
            r.worst_rtt_ns = r.worst_rtt_ns.max(worst);
        }
    }

    /// The largest recent round trip of `room`'s members, computed now.
    fn worst_rtt_ns(&self, room: RoomKey) -> Option<u64> {
        self.rooms.get(room.slot, room.generation).and_then(|r| {
            r.members
                .iter()
                .filter_map(|c| self.clients.get(c.slot, c.generation))
                .filter_map(|m| m.round_trips.recent_max_ns())
                .max()
        })
    }

    /// The lead a change in `room` gets now, from its members' round trips measured so far:
    /// see [`crate::lead`]. A pass over the members: for planning a change, not per request.
    pub fn lead_ns(&self, room: RoomKey) -> u64 {
        self.cfg.lead.lead_ns(self.worst_rtt_ns(room))
    }

    /// The cluster thread's state: control is refused, saying why, while Redis is not usable.
    pub fn set_cluster_status(&mut self, connected: bool, fault: Option<ClusterFault>) {
        self.cluster_connected = connected;
        self.cluster_fault = fault;
    }

    /// The cluster thread's outcome for ask `id`: the asker hears it, whatever it was.
    pub fn cluster_answer(&mut self, id: u64, outcome: Outcome, fx: &mut Vec<Effect>) {
        let Some(i) = self.asks.iter().position(|a| a.id == id) else {
            return;
        };
        let ask = self.asks.swap_remove(i);
        let result = match outcome {
            Outcome::Applied => Ok(()),
            Outcome::Unchanged => {
                // Already so: confirm to the asker alone, as without a cluster.
                if let Some(room) = self.rooms.get(ask.room.slot, ask.room.generation) {
                    let confirm = if ask.tempo {
                        protocol::bpm_change(room.timeline.bpm)
                    } else {
                        protocol::transport(&transport_data(&room.timeline))
                    };
                    fx.push(Effect::Reply {
                        client: ask.client,
                        event: confirm,
                    });
                }
                Ok(())
            }
            Outcome::Failed(fault) => Err(ClientError::ClusterUnavailable(fault.describe())),
            Outcome::Lost => Err(ClientError::Busy),
        };
        fx.push(Effect::Answer {
            ask: ask.id,
            client: ask.client,
            result,
        });
    }

    /// A control request from `client`. `Ok` means accepted: announced to the room once
    /// decided, or confirmed to the sender alone when it changes nothing; in a cluster, its
    /// outcome follows as an [`Effect::Answer`] ([`Decision::Asked`]).
    pub fn control(
        &mut self,
        client: ClientId,
        request: Control,
        now_ns: u64,
        fx: &mut Vec<Effect>,
    ) -> Result<Decision, ClientError> {
        let Some(member) = self.clients.get(client.slot, client.generation) else {
            return Ok(Decision::Done);
        };
        if !member.may_control {
            return Err(ClientError::Unauthorized);
        }
        let key = member.room;
        let change = match request {
            Control::SetBpm(value) => Change::SetBpm(protocol::check_bpm(
                value,
                self.cfg.min_bpm,
                self.cfg.max_bpm,
            )?),
            Control::Start(quantize) => Change::Start(quantize),
            Control::Stop => Change::Stop,
        };
        let unix_now = self.unix(now_ns);
        let Some(room) = self.rooms.get_mut(key.slot, key.generation) else {
            return Ok(Decision::Done);
        };
        if !room.ready {
            // Still waiting for the cluster's timeline: nothing to plan on yet.
            return Err(ClientError::Busy);
        }
        // Everything cheap first: a repeat or a refusal costs nothing per member.
        if is_unchanged(&room.timeline, change) {
            // Nothing changes for anyone else: confirm to the sender only, so one client
            // cannot make the server write to every client at will.
            let confirm = match change {
                Change::SetBpm(_) => protocol::bpm_change(room.timeline.bpm),
                _ => protocol::transport(&transport_data(&room.timeline)),
            };
            fx.push(Effect::Reply {
                client,
                event: confirm,
            });
            return Ok(Decision::Done);
        }
        if self.cfg.clustered && !self.cluster_connected {
            let fault = self.cluster_fault.unwrap_or(ClusterFault::Unreachable);
            return Err(ClientError::ClusterUnavailable(fault.describe()));
        }
        if self.cfg.clustered && self.asks.len() >= MAX_PENDING_ASKS {
            return Err(ClientError::Busy);
        }
        let member_has_room = self
            .clients
            .get_mut(client.slot, client.generation)
            .is_some_and(|m| m.changes.has_room(now_ns));
        let Some(room) = self.rooms.get_mut(key.slot, key.generation) else {
            return Ok(Decision::Done);
        };
        if !member_has_room || !room.changes.has_room(now_ns) {
            return Err(ClientError::Busy);
        }
        room.changes.take(now_ns);
        if let Some(m) = self.clients.get_mut(client.slot, client.generation) {
            m.changes.take(now_ns);
        }
        // A change: the lead from every member's round trips, measured now.
        let lead = self.lead_ns(key);
        let Some(room) = self.rooms.get_mut(key.slot, key.generation) else {
            return Ok(Decision::Done);
        };
        if self.cfg.clustered {
            // The cluster thread plans it again over the shared timeline, which may be newer,
            // and answers; the asker hears the outcome then.
            let id = self.next_ask;
            self.next_ask += 1;
            self.asks.push(PendingAsk {
                id,
                client,
                room: key,
                tempo: matches!(change, Change::SetBpm(_)),
                asked_ns: now_ns,
            });
            fx.push(Effect::Cluster(ClusterAsk::Change {
                id,
                room: key,
                name: room.name.clone(),
                change,
                lead_ns: lead,
            }));
            return Ok(Decision::Asked(id));
        }
        match plan(&room.timeline, change, unix_now, lead) {
            Planned::Changed(next) => self.decide(key, next, fx),
            Planned::NotBefore(at_unix_ns) => {
                room.deferred = Some(Deferred { change, at_unix_ns });
            }
            Planned::Unchanged => {}
        }
        Ok(Decision::Done)
    }

    /// Makes `next` the room's timeline: the timing thread follows it and announces it.
    fn decide(&mut self, key: RoomKey, next: Timeline, fx: &mut Vec<Effect>) {
        let Some(room) = self.rooms.get_mut(key.slot, key.generation) else {
            return;
        };
        room.timeline = next;
        fx.push(Effect::Timing(TimingCommand::Adopt {
            room: key,
            timeline: next,
        }));
        fx.push(Effect::Persist);
    }

    /// Plans a deferred change once its time has come.
    fn run_deferred(&mut self, key: RoomKey, now_ns: u64, fx: &mut Vec<Effect>) {
        let unix_now = self.unix(now_ns);
        let lead = self.lead_ns(key);
        let Some(room) = self.rooms.get_mut(key.slot, key.generation) else {
            return;
        };
        let Some(deferred) = room.deferred else {
            return;
        };
        if unix_now < deferred.at_unix_ns {
            return;
        }
        room.deferred = None;
        match plan(&room.timeline, deferred.change, unix_now, lead) {
            Planned::Changed(next) => self.decide(key, next, fx),
            Planned::NotBefore(at_unix_ns) => {
                room.deferred = Some(Deferred {
                    change: deferred.change,
                    at_unix_ns,
                });
            }
            // Another change got there first.
            Planned::Unchanged => {}
        }
    }

    /// An event from the timing thread's stream, in order.
    pub fn on_timing(&mut self, event: &TimingEvent, now_ns: u64, fx: &mut Vec<Effect>) {
        match *event {
            TimingEvent::Tick(tick) => {
                let Some(room) = self.rooms.get_mut(tick.room.slot, tick.room.generation) else {
                    return;
                };
                room.count = tick.count;
                room.last_tick_ns = now_ns;
                room.sounding_bpm = tick.bpm;
                let plays = room
                    .announced
                    .unwrap_or(room.timeline)
                    .transport
                    .plays(tick.count);
                let deferred = room.deferred.is_some();
                if plays {
                    // Bar lines as the stream has announced them: a `beats_per_bar` change
                    // moves them for `bar` members from the tick it is announced before.
                    let beats_per_bar = room.announced.unwrap_or(room.timeline).beats_per_bar;
                    fx.push(Effect::Broadcast {
                        room: tick.room,
                        to: Audience::for_tick(tick.count, self.cfg.ppqn, beats_per_bar),
                        event: tick_event(self.epoch_unix_ns, self.cfg.ppqn, &tick),
                    });
                }
                if deferred {
                    self.run_deferred(tick.room, now_ns, fx);
                }
            }
            TimingEvent::Timeline {
                room: key,
                timeline,
            } => {
                let Some(room) = self.rooms.get_mut(key.slot, key.generation) else {
                    return;
                };
                let Some(before) = room.announced.replace(timeline) else {
                    // The room's first announcement: its members were greeted with it.
                    return;
                };
                let change = Announcement::between(&before, &timeline);
                if change.tempo {
                    room.tempo_changes += 1;
                    self.tempo_changes += 1;
                }
                if change.transport {
                    room.transport_changes += 1;
                    self.transport_changes += 1;
                }
                for event in change.events(&timeline) {
                    fx.push(Effect::Broadcast {
                        room: key,
                        to: Audience::EVERYONE,
                        event,
                    });
                }
            }
            TimingEvent::Dropped { .. }
            | TimingEvent::Soon { .. }
            | TimingEvent::Skipped { .. }
            | TimingEvent::Exhausted { .. } => {}
        }
    }

    /// The cluster's shared timeline for a room (new, or first read).
    pub fn cluster_timeline(
        &mut self,
        key: RoomKey,
        shared: Timeline,
        now_ns: u64,
        fx: &mut Vec<Effect>,
    ) {
        let Some(room) = self.rooms.get_mut(key.slot, key.generation) else {
            return;
        };
        if !room.ready {
            room.timeline = shared;
            room.sounding_bpm = shared.bpm;
            self.make_ready(key, now_ns, fx);
            return;
        }
        if room.timeline == shared {
            return;
        }
        self.decide(key, shared, fx);
    }

    /// Whether a room is ticking (not waiting for its cluster's timeline).
    pub fn is_ready(&self, key: RoomKey) -> bool {
        self.rooms
            .get(key.slot, key.generation)
            .is_some_and(|r| r.ready)
    }

    /// Starts a room that waits for its cluster's timeline on its own (the cluster did not
    /// answer in time); it adopts the shared timeline when that comes.
    pub fn start_waiting(&mut self, key: RoomKey, now_ns: u64, fx: &mut Vec<Effect>) {
        if !self.is_ready(key) {
            self.make_ready(key, now_ns, fx);
        }
    }

    /// A room that waited for its cluster's timeline starts ticking, and greets its members.
    fn make_ready(&mut self, key: RoomKey, now_ns: u64, fx: &mut Vec<Effect>) {
        let Some(room) = self.rooms.get_mut(key.slot, key.generation) else {
            return;
        };
        room.ready = true;
        room.last_tick_ns = now_ns;
        fx.push(Effect::Timing(TimingCommand::Add {
            room: key,
            timeline: room.timeline,
        }));
        fx.push(Effect::Persist);
        let members: Vec<ClientId> = room.members.iter().copied().collect();
        for client in members {
            self.greet(client, now_ns, fx);
        }
    }

    /// Periodic duties: drops rooms idle for `--room-idle` (never `main`), starts rooms whose
    /// cluster did not answer in time, and runs deferred changes that are due.
    pub fn housekeeping(&mut self, now_ns: u64, fx: &mut Vec<Effect>) {
        // Requests the cluster thread has not answered in time are refused, not left hanging.
        let late: Vec<PendingAsk> = self
            .asks
            .iter()
            .filter(|a| now_ns.saturating_sub(a.asked_ns) >= ASK_TIMEOUT_NS)
            .copied()
            .collect();
        if !late.is_empty() {
            self.asks
                .retain(|a| now_ns.saturating_sub(a.asked_ns) < ASK_TIMEOUT_NS);
            for ask in late {
                fx.push(Effect::Answer {
                    ask: ask.id,
                    client: ask.client,
                    result: Err(ClientError::ClusterUnavailable(
                        "did not answer the request in time",
                    )),
                });
            }
        }
        let worst: Vec<(RoomKey, Option<u64>)> = self
            .rooms
            .iter()
            .map(|r| (r.key, self.worst_rtt_ns(r.key)))
            .collect();
        for (key, worst) in worst {
            if let Some(r) = self.rooms.get_mut(key.slot, key.generation) {
                r.worst_rtt_ns = worst;
            }
        }
        let idle = self.cfg.room_idle_ns;
        let mut expired = Vec::new();
        let mut unanswered = Vec::new();
        let mut deferred = Vec::new();
        for room in self.rooms.iter() {
            if room.key != self.main
                && room
                    .empty_since_ns
                    .is_some_and(|since| now_ns.saturating_sub(since) >= idle)
            {
                expired.push(room.key);
            } else if !room.ready && now_ns.saturating_sub(room.since_ns) >= CLUSTER_JOIN_WAIT_NS {
                unanswered.push(room.key);
            } else if room.deferred.is_some() {
                deferred.push(room.key);
            }
        }
        for key in expired {
            if let Some(room) = self.rooms.remove(key.slot, key.generation) {
                self.names.remove(&room.name);
                fx.push(Effect::Timing(TimingCommand::Drop { room: key }));
                if self.cfg.clustered {
                    fx.push(Effect::Cluster(ClusterAsk::Close {
                        room: key,
                        name: room.name,
                    }));
                }
                fx.push(Effect::Persist);
            }
        }
        for key in unanswered {
            self.make_ready(key, now_ns, fx);
        }
        for key in deferred {
            self.run_deferred(key, now_ns, fx);
        }
    }

    /// Every room's saved state: its name and authoritative timeline.
    pub fn persisted(&self) -> Vec<(RoomName, Timeline)> {
        let mut rooms: Vec<_> = self
            .rooms
            .iter()
            .filter(|r| r.ready)
            .map(|r| (r.name.clone(), r.timeline))
            .collect();
        rooms.sort_by(|a, b| a.0.cmp(&b.0));
        rooms
    }

    /// How long the quietest playing room has gone without a tick, when that is long enough
    /// to call the server degraded ([`crate::stats::silence`]): a server that answers but
    /// sends nothing is not healthy.
    pub fn silent_for(&self, now_ns: u64) -> Option<std::time::Duration> {
        self.rooms
            .iter()
            .filter(|r| r.ready)
            .filter_map(|r| {
                let t = r.announced.unwrap_or(r.timeline);
                let playing = t.transport.plays(r.count.saturating_add(1));
                let since = std::time::Duration::from_nanos(now_ns.saturating_sub(r.last_tick_ns));
                crate::stats::silence(since, t.grid().interval_ns(), playing)
            })
            .max()
    }

    /// Figures for one room.
    pub fn report(&self, key: RoomKey) -> Option<RoomReport> {
        let room = self.rooms.get(key.slot, key.generation)?;
        let transport = room.announced.unwrap_or(room.timeline).transport;
        Some(RoomReport {
            name: room.name.clone(),
            bpm: room.sounding_bpm,
            clients: room.members.len(),
            count: room.count,
            transport: transport.state_at(room.count.saturating_add(1)),
            transport_count: transport.from_count(),
            lead_ns: self.cfg.lead.lead_ns(room.worst_rtt_ns),
            tempo_changes: room.tempo_changes,
            transport_changes: room.transport_changes,
        })
    }

    /// Figures for every room, `main` first, then by name.
    pub fn reports(&self) -> Vec<RoomReport> {
        let mut keys: Vec<(&RoomName, RoomKey)> =
            self.rooms.iter().map(|r| (&r.name, r.key)).collect();
        keys.sort_by(|a, b| (!a.0.is_main(), a.0).cmp(&(!b.0.is_main(), b.0)));
        keys.into_iter()
            .filter_map(|(_, k)| self.report(k))
            .collect()
    }

    /// Changes announced, over every room ever.
    pub fn tempo_changes(&self) -> u64 {
        self.tempo_changes
    }

    pub fn transport_changes(&self) -> u64 {
        self.transport_changes
    }

    /// A room's authoritative timeline.
    pub fn timeline(&self, key: RoomKey) -> Option<Timeline> {
        self.rooms.get(key.slot, key.generation).map(|r| r.timeline)
    }
}

fn transport_data(t: &Timeline) -> TransportData {
    TransportData::new(
        t.transport.state(),
        t.transport.from_count(),
        t.transport_unix_ns,
    )
}

/// The `tick` event for a tick the timing thread emitted (`epoch_unix_ns`: the unix time of
/// the server clock's zero). Pure, so that every fan-out shard encodes the same tick the same
/// way from the stream alone.
pub fn tick_event(epoch_unix_ns: u64, ppqn: u32, tick: &RoomTick) -> Outgoing {
    protocol::tick(&TickData::new(
        epoch_unix_ns.saturating_add(tick.deadline_ns),
        tick.bpm,
        tick.count,
        ppqn,
    ))
}

/// What a room's members are told when its announced timeline changes from one to the next.
/// Pure: the hub counts changes by it, and every fan-out shard derives its members' frames
/// from the timing stream with it, so all of them say the same thing in the same order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Announcement {
    /// The tempo or the anchor moved (a `tempo_changes` count).
    pub tempo: bool,
    /// The tempo itself changed: a `bpmChange` goes out.
    pub bpm: bool,
    /// Start or stop: a `transport` goes out.
    pub transport: bool,
    /// Anything changed at all: a `timeline` goes out.
    pub any: bool,
}

impl Announcement {
    pub fn between(before: &Timeline, after: &Timeline) -> Announcement {
        Announcement {
            tempo: before.bpm != after.bpm || before.anchor_count != after.anchor_count,
            bpm: before.bpm != after.bpm,
            transport: before.transport != after.transport,
            any: before != after,
        }
    }

    /// The events, in the order members get them: `bpmChange`, `transport`, `timeline`.
    pub fn events(&self, after: &Timeline) -> Vec<Outgoing> {
        let mut events = Vec::new();
        if !self.any {
            return events;
        }
        if self.bpm {
            events.push(protocol::bpm_change(after.bpm));
        }
        if self.transport {
            events.push(protocol::transport(&transport_data(after)));
        }
        events.push(timeline_event(after));
        events
    }
}

/// The `timeline` event for `t`.
pub fn timeline_event(t: &Timeline) -> Outgoing {
    protocol::timeline(&TimelineData {
        count: t.anchor_count,
        time_us: t.anchor_unix_ns / 1_000,
        time: t.anchor_unix_ns / 1_000_000,
        bpm: t.bpm,
        ppqn: t.ppqn,
        beats_per_bar: t.beats_per_bar,
        interval_us: t.grid().interval_ns() / 1_000.0,
        transport: transport_data(t),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const EPOCH: u64 = 1_700_000_000_000_000_000;
    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;

    fn config() -> HubConfig {
        HubConfig {
            bpm: Bpm::whole(120),
            ppqn: 4,
            beats_per_bar: 4,
            min_bpm: Bpm::whole(60),
            max_bpm: Bpm::whole(200),
            max_rooms: 3,
            room_idle_ns: 600 * S,
            control_token: None,
            room_tokens: HashMap::new(),
            lead: LeadPolicy::default(),
            clustered: false,
            version: "test",
        }
    }

    /// A hub and the effects it pushed, with the timing thread played back in-process: every
    /// timing command is applied and its announcement fed back, as the real stream does.
    struct World {
        hub: Hub,
        fx: Vec<Effect>,
        now: u64,
    }

    impl World {
        fn new(cfg: HubConfig) -> World {
            let mut fx = Vec::new();
            let hub = Hub::new(cfg, EPOCH, 0, Vec::new(), &mut fx);
            let mut w = World { hub, fx, now: 0 };
            w.settle();
            w
        }

        /// Feeds back the announcement of every timing command pushed so far, keeping the
        /// other effects.
        fn settle(&mut self) -> Vec<Effect> {
            let mut kept = Vec::new();
            while !self.fx.is_empty() {
                for e in std::mem::take(&mut self.fx) {
                    match e {
                        Effect::Timing(
                            TimingCommand::Add { room, timeline }
                            | TimingCommand::Adopt { room, timeline },
                        ) => {
                            let event = TimingEvent::Timeline { room, timeline };
                            let mut more = Vec::new();
                            self.hub.on_timing(&event, self.now, &mut more);
                            kept.push(e);
                            self.fx.extend(more);
                        }
                        other => kept.push(other),
                    }
                }
            }
            kept
        }

        fn join(&mut self, room: Option<&str>, tokens: &[&str]) -> ClientId {
            self.hub
                .join(room, tokens, None, self.now, &mut self.fx)
                .expect("join")
        }

        fn control(&mut self, client: ClientId, c: Control) -> Result<Vec<Effect>, ClientError> {
            let r = self.hub.control(client, c, self.now, &mut self.fx);
            let fx = self.settle();
            r.map(|_| fx)
        }

        fn tick(&mut self, room: RoomKey, count: u64) -> Vec<Effect> {
            let t = self.hub.timeline(room).unwrap();
            let deadline = t.unix_ns_of(count) - EPOCH;
            let tick = RoomTick {
                room,
                count,
                deadline_ns: deadline,
                emitted_ns: deadline,
                bpm: t.bpm,
            };
            self.now = self.now.max(deadline);
            self.hub
                .on_timing(&TimingEvent::Tick(tick), self.now, &mut self.fx);
            self.settle()
        }
    }

    fn json(event: &Outgoing) -> Value {
        serde_json::from_str(&event.data).unwrap()
    }

    fn replies(fx: &[Effect], to: ClientId) -> Vec<&Outgoing> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Reply { client, event } if *client == to => Some(event),
                _ => None,
            })
            .collect()
    }

    fn broadcasts(fx: &[Effect], to: RoomKey) -> Vec<&Outgoing> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Broadcast { room, event, .. } if *room == to => Some(event),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_room_is_made_on_first_join_at_the_start_tempo_and_greets_its_members() {
        let mut w = World::new(config());
        assert_eq!(w.hub.rooms(), 1, "main exists from the start");
        w.now = 5 * S;
        let a = w.join(Some("band"), &[]);
        let fx = w.settle();
        assert!(
            fx.iter()
                .any(|e| matches!(e, Effect::Timing(TimingCommand::Add { .. })))
        );
        assert!(fx.contains(&Effect::Persist));
        let r = replies(&fx, a);
        assert_eq!((r[0].name, r[1].name), ("hello", "timeline"));
        let hello = json(r[0]);
        assert_eq!(hello["bpm"], 120);
        assert_eq!(hello["room"], "band");
        let timeline = json(r[1]);
        // Tick 0 a millisecond after the room was made.
        assert_eq!(timeline["time_us"], (EPOCH + 5 * S + MS) / 1_000);
        // In main, the predecessor's fields and nothing else.
        let m = w.join(None, &[]);
        let hello = json(replies(&w.settle(), m)[0]);
        assert!(hello.get("room").is_none(), "{hello}");
        assert_eq!(w.hub.room_of(m), Some(w.hub.main()));
        assert_eq!(w.hub.rooms(), 2);
    }

    /// The audience of the one tick broadcast in `fx`.
    fn tick_audience(fx: &[Effect], room: RoomKey) -> Audience {
        let to: Vec<Audience> = fx
            .iter()
            .filter_map(|e| match e {
                Effect::Broadcast { room: r, to, event } if *r == room && event.name == "tick" => {
                    Some(*to)
                }
                _ => None,
            })
            .collect();
        assert_eq!(to.len(), 1, "one tick broadcast");
        to[0]
    }

    #[test]
    fn a_tick_visits_only_the_members_who_chose_it() {
        let mut w = World::new(config());
        let join = |w: &mut World, ticks| w.hub.join(None, &[], ticks, 0, &mut w.fx).unwrap();
        let quiet: Vec<ClientId> = (0..1000)
            .map(|_| join(&mut w, Some(TickChoice::None)))
            .collect();
        let all = [join(&mut w, None), join(&mut w, Some(TickChoice::All))];
        let beat = [
            join(&mut w, Some(TickChoice::Beat)),
            join(&mut w, Some(TickChoice::Beat)),
        ];
        let bar = join(&mut w, Some(TickChoice::Bar));
        w.settle();
        let main = w.hub.main();
        // What the fan-out visits is exactly what `members` yields for the tick's audience.
        let mut visits = 0;
        for count in 1..=32 {
            let to = tick_audience(&w.tick(main, count), main);
            let visited: Vec<ClientId> = w.hub.members(main, to).collect();
            visits += visited.len();
            assert!(visited.iter().all(|c| !quiet.contains(c)), "tick {count}");
            let mut expected: Vec<ClientId> = all.to_vec();
            if count % 4 == 0 {
                expected.extend(beat);
            }
            if count % 16 == 0 {
                expected.push(bar);
            }
            assert_eq!(visited, expected, "tick {count}");
        }
        // 32 ticks: 2 `all` members each, 2 `beat` members on 8 beats, 1 `bar` member on 2
        // bar lines; the 1000 `none` members not once.
        assert_eq!(visits, 32 * 2 + 8 * 2 + 2);
        // A change still goes to everyone.
        let changes: Vec<Audience> = w
            .control(all[0], Control::SetBpm(150.0))
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                Effect::Broadcast { to, .. } => Some(*to),
                _ => None,
            })
            .collect();
        assert!(!changes.is_empty());
        assert!(changes.iter().all(|to| *to == Audience::EVERYONE));
        assert_eq!(w.hub.members(main, Audience::EVERYONE).count(), 1005);
        // Leaving keeps the groups consistent.
        w.hub.leave(quiet[0], 0, &mut w.fx);
        w.hub.leave(beat[0], 0, &mut w.fx);
        assert_eq!(w.hub.members(main, Audience::for_tick(16, 4, 4)).count(), 4);
        assert_eq!(w.hub.tick_choice(beat[1]), Some(TickChoice::Beat));
        assert_eq!(w.hub.tick_choice(beat[0]), None);
    }

    #[test]
    fn hello_reports_a_named_choice_and_main_by_default_stays_the_predecessors() {
        let mut w = World::new(config());
        let plain = w.join(None, &[]);
        let hello = json(replies(&w.settle(), plain)[0]);
        assert!(hello.get("ticks").is_none(), "{hello}");
        let named = w
            .hub
            .join(None, &[], Some(TickChoice::All), 0, &mut w.fx)
            .unwrap();
        let hello = json(replies(&w.settle(), named)[0]);
        assert_eq!(hello["ticks"], "all");
        let quiet = w
            .hub
            .join(Some("band"), &[], Some(TickChoice::None), 0, &mut w.fx)
            .unwrap();
        let hello = json(replies(&w.settle(), quiet)[0]);
        assert_eq!(
            (hello["ticks"].as_str(), hello["room"].as_str()),
            (Some("none"), Some("band"))
        );
        assert_eq!(hello["ppqn"], 4);
    }

    #[test]
    fn bar_lines_follow_an_announced_beats_per_bar() {
        let mut w = World::new(config());
        w.join(None, &[]);
        w.settle();
        let main = w.hub.main();
        assert!(tick_audience(&w.tick(main, 16), main).includes(TickChoice::Bar));
        assert!(!tick_audience(&w.tick(main, 12), main).includes(TickChoice::Bar));
        // The cluster's timeline has 3 beats to the bar: from its announcement on, bar lines
        // are every 12 ticks.
        let mut three = w.hub.timeline(main).unwrap();
        three.beats_per_bar = 3;
        three.version += 1;
        w.hub.on_timing(
            &TimingEvent::Timeline {
                room: main,
                timeline: three,
            },
            w.now,
            &mut w.fx,
        );
        w.settle();
        assert!(tick_audience(&w.tick(main, 24), main).includes(TickChoice::Bar));
        assert!(!tick_audience(&w.tick(main, 32), main).includes(TickChoice::Bar));
        assert!(tick_audience(&w.tick(main, 32), main).includes(TickChoice::Beat));
    }

    #[test]
    fn names_and_the_room_limit_are_checked() {
        let mut w = World::new(config());
        assert!(matches!(
            w.hub.join(Some("Band"), &[], None, 0, &mut w.fx),
            Err(JoinError::Name(_))
        ));
        assert!(matches!(
            w.hub.join(Some(""), &[], None, 0, &mut w.fx),
            Err(JoinError::Name(_))
        ));
        w.join(Some("a"), &[]);
        w.join(Some("b"), &[]);
        let full = w.hub.join(Some("c"), &[], None, 0, &mut w.fx).unwrap_err();
        assert_eq!(full, JoinError::Full { max_rooms: 3 });
        assert!(full.to_string().contains("--max-rooms"), "{full}");
        // Existing rooms stay open.
        assert!(w.hub.join(Some("a"), &[], None, 0, &mut w.fx).is_ok());
        assert!(w.hub.join(Some("main"), &[], None, 0, &mut w.fx).is_ok());
    }

    #[test]
    fn the_control_token_works_everywhere_and_a_room_token_in_its_room() {
        let mut cfg = config();
        cfg.control_token = Some("admin".into());
        cfg.room_tokens
            .insert(RoomName::parse("class").unwrap(), "teacher".into());
        let mut w = World::new(cfg);
        let cases = [
            (Some("class"), &["teacher"][..], true),
            (Some("class"), &["admin"][..], true),
            (Some("class"), &[][..], false),
            (Some("other"), &["teacher"][..], false),
            (Some("other"), &["admin"][..], true),
            (None, &["nope", "admin"][..], true),
        ];
        for (room, tokens, may) in cases {
            let c = w.join(room, tokens);
            let hello = json(replies(&w.settle(), c)[0]);
            assert_eq!(hello["control"], may, "{room:?} {tokens:?}");
            assert_eq!(hello["token_required"], true);
            let result = w.control(c, Control::SetBpm(130.0));
            assert_eq!(result.is_ok(), may, "{room:?} {tokens:?}: {result:?}");
            if !may {
                assert_eq!(result.unwrap_err(), ClientError::Unauthorized);
            }
        }
        // Without any token configured, everyone conducts and none is asked for.
        let mut open = World::new(config());
        let c = open.join(Some("x"), &[]);
        let hello = json(replies(&open.settle(), c)[0]);
        assert_eq!(
            (hello["control"].clone(), hello["token_required"].clone()),
            (true.into(), false.into())
        );
    }

    #[test]
    fn a_change_is_announced_at_once_and_lands_a_lead_ahead_in_its_room_only() {
        let mut w = World::new(config());
        let a = w.join(Some("a"), &[]);
        let b = w.join(Some("b"), &[]);
        w.settle();
        let (ka, kb) = (w.hub.room_of(a).unwrap(), w.hub.room_of(b).unwrap());
        w.now = 10 * S;
        let fx = w.control(a, Control::SetBpm(150.0)).unwrap();
        let adopted = fx
            .iter()
            .find_map(|e| match e {
                Effect::Timing(TimingCommand::Adopt { room, timeline }) if *room == ka => {
                    Some(*timeline)
                }
                _ => None,
            })
            .expect("adopted");
        assert!(
            adopted.anchor_unix_ns >= EPOCH + 10 * S + 150 * MS,
            "a LAN room's 150 ms lead"
        );
        let told: Vec<&str> = broadcasts(&fx, ka).iter().map(|e| e.name).collect();
        assert_eq!(told, ["bpmChange", "timeline"]);
        assert!(
            broadcasts(&fx, kb).is_empty(),
            "the other room hears nothing"
        );
        assert_eq!(w.hub.timeline(kb).unwrap().bpm, Bpm::whole(120));
        assert_eq!(json(broadcasts(&fx, ka)[1])["count"], adopted.anchor_count);
    }

    #[test]
    fn repeats_are_confirmed_to_the_sender_alone() {
        let mut w = World::new(config());
        let a = w.join(None, &[]);
        w.settle();
        let fx = w.control(a, Control::SetBpm(120.0)).unwrap();
        assert_eq!(fx.len(), 1);
        assert_eq!(replies(&fx, a)[0], &protocol::bpm_change(Bpm::whole(120)));
        let fx = w.control(a, Control::Start(Quantize::Bar)).unwrap();
        assert_eq!(replies(&fx, a)[0].name, "transport");
        assert!(
            !fx.iter()
                .any(|e| matches!(e, Effect::Broadcast { .. } | Effect::Timing(_)))
        );
    }

    #[test]
    fn changes_are_limited_per_client_and_per_room() {
        let mut w = World::new(config());
        let a = w.join(None, &[]);
        let b = w.join(None, &[]);
        let c = w.join(None, &[]);
        w.settle();
        let mut bpm = 60.0;
        let mut set = |w: &mut World, who| {
            bpm += 1.0;
            w.control(who, Control::SetBpm(bpm))
        };
        for _ in 0..MAX_CLIENT_CHANGES_PER_SEC {
            assert!(set(&mut w, a).is_ok());
        }
        assert_eq!(
            set(&mut w, a).unwrap_err(),
            ClientError::Busy,
            "one client's share"
        );
        for _ in 0..MAX_ROOM_CHANGES_PER_SEC - MAX_CLIENT_CHANGES_PER_SEC {
            assert!(set(&mut w, b).is_ok());
        }
        assert_eq!(
            set(&mut w, c).unwrap_err(),
            ClientError::Busy,
            "the room's budget"
        );
        w.now += S;
        assert!(set(&mut w, c).is_ok(), "a new second");
    }

    #[test]
    fn bad_tempos_are_refused_with_the_range() {
        let mut w = World::new(config());
        let a = w.join(None, &[]);
        let err = w.control(a, Control::SetBpm(300.0)).unwrap_err();
        assert_eq!(err.code(), "bpm_out_of_range");
        assert!(err.to_string().contains("60 to 200"));
    }

    #[test]
    fn the_lead_follows_the_farthest_members_round_trip() {
        let mut w = World::new(config());
        let near = w.join(None, &[]);
        let far = w.join(None, &[]);
        w.settle();
        let main = w.hub.main();
        assert_eq!(w.hub.lead_ns(main), 150 * MS);
        w.hub.round_trip(near, 2 * MS);
        w.hub.round_trip(far, 300 * MS);
        assert_eq!(w.hub.lead_ns(main), 450 * MS);
        w.now = 20 * S;
        let fx = w.control(near, Control::Stop).unwrap();
        let stop = json(broadcasts(&fx, main)[0]);
        assert_eq!(stop["state"], "stopped");
        let lead_us = stop["time_us"].as_u64().unwrap() - (EPOCH + 20 * S) / 1_000;
        assert!(lead_us >= 450_000, "stop {lead_us} µs ahead");
        // The far client leaves: the lead shrinks back.
        w.hub.leave(far, w.now, &mut w.fx);
        assert_eq!(w.hub.lead_ns(main), 152 * MS);
        // Bounded however far a member is.
        w.hub.round_trip(near, 10 * S);
        assert_eq!(w.hub.lead_ns(main), S);
    }

    #[test]
    fn a_start_against_a_pending_stop_is_planned_once_the_stop_has_begun() {
        let mut w = World::new(config());
        let a = w.join(None, &[]);
        w.settle();
        let main = w.hub.main();
        w.now = 10 * S;
        w.control(a, Control::Stop).unwrap();
        let stop_at = w.hub.timeline(main).unwrap().transport.from_count();
        w.now += 10 * MS;
        let fx = w.control(a, Control::Start(Quantize::Bar)).unwrap();
        assert!(fx.is_empty(), "waits: {fx:?}");
        // Ticks up to the stop: nothing yet; at the stop's tick, the start is planned.
        let fx = w.tick(main, stop_at - 1);
        assert!(!fx.iter().any(|e| matches!(e, Effect::Timing(_))));
        let fx = w.tick(main, stop_at);
        let start = broadcasts(&fx, main)
            .into_iter()
            .find(|e| e.name == "transport")
            .map(json)
            .expect("start announced");
        assert_eq!(start["state"], "playing");
        assert!(start["count"].as_u64().unwrap() > stop_at);
        assert_eq!(start["count"].as_u64().unwrap() % 16, 0, "on a bar line");
    }

    #[test]
    fn ticks_reach_the_room_while_it_plays_and_only_then() {
        let mut w = World::new(config());
        let a = w.join(None, &[]);
        w.settle();
        let main = w.hub.main();
        let fx = w.tick(main, 3);
        let tick = json(broadcasts(&fx, main)[0]);
        assert_eq!(tick["count"], 3);
        assert_eq!(tick["time_us"], (EPOCH + MS) / 1_000 + 375_000);
        w.control(a, Control::Stop).unwrap();
        let stop_at = w.hub.timeline(main).unwrap().transport.from_count();
        assert!(
            !broadcasts(&w.tick(main, stop_at - 1), main).is_empty(),
            "inside the lead"
        );
        assert!(broadcasts(&w.tick(main, stop_at), main).is_empty());
        let report = w.hub.report(main).unwrap();
        assert_eq!(report.transport, TransportState::Stopped);
        assert_eq!(report.count, stop_at);
        // A tick for a room that no longer exists in that slot is ignored.
        let stale = RoomKey {
            slot: main.slot,
            generation: main.generation + 1,
        };
        let tick = RoomTick {
            room: stale,
            count: 1,
            deadline_ns: 0,
            emitted_ns: 0,
            bpm: Bpm::whole(120),
        };
        w.hub.on_timing(&TimingEvent::Tick(tick), 0, &mut w.fx);
        assert!(w.fx.is_empty());
    }

    #[test]
    fn an_empty_room_is_dropped_after_the_idle_time_and_main_never() {
        let mut cfg = config();
        cfg.room_idle_ns = 2 * S;
        let mut w = World::new(cfg);
        let a = w.join(Some("a"), &[]);
        let m = w.join(None, &[]);
        w.settle();
        let ka = w.hub.room_of(a).unwrap();
        w.now = S;
        w.hub.leave(a, w.now, &mut w.fx);
        w.hub.leave(m, w.now, &mut w.fx);
        w.now = 2 * S;
        w.hub.housekeeping(w.now, &mut w.fx);
        assert!(w.settle().is_empty(), "not idle long enough");
        // A member coming back resets the clock.
        let again = w.join(Some("a"), &[]);
        w.settle();
        w.now = 4 * S;
        w.hub.leave(again, w.now, &mut w.fx);
        w.hub.housekeeping(5 * S, &mut w.fx);
        assert!(w.settle().is_empty());
        w.now = 6 * S;
        w.hub.housekeeping(w.now, &mut w.fx);
        let fx = w.settle();
        assert_eq!(
            fx,
            [
                Effect::Timing(TimingCommand::Drop { room: ka }),
                Effect::Persist
            ]
        );
        assert_eq!(w.hub.rooms(), 1);
        assert_eq!(w.hub.persisted().len(), 1, "its state goes with it");
        w.hub.housekeeping(3_600 * S, &mut w.fx);
        assert!(w.settle().is_empty(), "main stays");
        // The name is free again, in a new room.
        let b = w.join(Some("a"), &[]);
        assert_ne!(w.hub.room_of(b), Some(ka));
    }

    #[test]
    fn members_stay_listed_as_others_leave() {
        let mut w = World::new(config());
        let c: Vec<ClientId> = (0..5).map(|_| w.join(None, &[])).collect();
        w.hub.leave(c[1], 0, &mut w.fx);
        w.hub.leave(c[3], 0, &mut w.fx);
        let mut left: Vec<ClientId> = w.hub.members(w.hub.main(), Audience::EVERYONE).collect();
        left.sort_by_key(|c| c.slot);
        assert_eq!(left, [c[0], c[2], c[4]]);
        w.hub.leave(c[4], 0, &mut w.fx);
        w.hub.leave(c[0], 0, &mut w.fx);
        let left: Vec<ClientId> = w.hub.members(w.hub.main(), Audience::EVERYONE).collect();
        assert_eq!(left, [c[2]]);
        assert_eq!(w.hub.clients(), 1);
        // A stale id does nothing.
        w.hub.leave(c[4], 0, &mut w.fx);
        assert_eq!(w.hub.clients(), 1);
    }

    #[test]
    fn saved_rooms_come_back_with_their_timelines() {
        let mut w = World::new(config());
        let a = w.join(Some("a"), &[]);
        w.settle();
        w.now = 3 * S;
        w.control(a, Control::SetBpm(90.0)).unwrap();
        let saved = w.hub.persisted();
        assert_eq!(
            saved.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["a", "main"]
        );
        let mut fx = Vec::new();
        let back = Hub::new(config(), EPOCH, 100 * S, saved.clone(), &mut fx);
        assert_eq!(back.persisted(), saved);
        let adds = fx
            .iter()
            .filter(|e| matches!(e, Effect::Timing(TimingCommand::Add { .. })))
            .count();
        assert_eq!(adds, 2);
        assert!(!fx.contains(&Effect::Persist), "nothing new to write");
    }

    #[test]
    fn in_a_cluster_a_new_room_waits_for_the_shared_timeline_and_changes_go_through_it() {
        let mut cfg = config();
        cfg.clustered = true;
        let mut w = World::new(cfg);
        w.hub.set_cluster_status(true, None);
        w.fx.clear();
        let a = w.join(Some("a"), &[]);
        let fx = w.settle();
        let key = w.hub.room_of(a).unwrap();
        assert!(
            replies(&fx, a).is_empty(),
            "no hello before the shared timeline"
        );
        assert!(
            matches!(&fx[0], Effect::Cluster(ClusterAsk::Open { name, .. }) if name.as_str() == "a")
        );
        assert!(!fx.iter().any(|e| matches!(e, Effect::Timing(_))));
        assert_eq!(w.control(a, Control::Stop).unwrap_err(), ClientError::Busy);
        // The cluster answers with the room's shared timeline, at another tempo.
        let shared = Timeline::new(Bpm::whole(99), 4, 4, EPOCH - 50 * S);
        w.hub.cluster_timeline(key, shared, w.now, &mut w.fx);
        let fx = w.settle();
        assert!(fx.contains(&Effect::Timing(TimingCommand::Add {
            room: key,
            timeline: shared
        })));
        assert_eq!(json(replies(&fx, a)[0])["bpm"], 99);
        // A change is planned by the cluster thread, with this room's lead.
        let fx = w.control(a, Control::SetBpm(100.0)).unwrap();
        assert!(matches!(
            &fx[..],
            [Effect::Cluster(ClusterAsk::Change { lead_ns, change: Change::SetBpm(_), .. })] if *lead_ns == 150 * MS
        ));
        // A repeat is still confirmed here, without Redis.
        let fx = w.control(a, Control::SetBpm(99.0)).unwrap();
        assert_eq!(replies(&fx, a).len(), 1);
        w.hub
            .set_cluster_status(false, Some(ClusterFault::OutOfMemory));
        assert_eq!(
            w.control(a, Control::Stop).unwrap_err(),
            ClientError::ClusterUnavailable(ClusterFault::OutOfMemory.describe())
        );
        // A room whose cluster never answers starts on its own after the wait.
        w.hub.set_cluster_status(true, None);
        let b = w.join(Some("b"), &[]);
        w.settle();
        w.now += CLUSTER_JOIN_WAIT_NS;
        w.hub.housekeeping(w.now, &mut w.fx);
        let fx = w.settle();
        assert_eq!(json(replies(&fx, b)[0])["bpm"], 120);
        // The cluster's answers reach the asker: a repeat the shared timeline already had is
        // confirmed, a failure named.
        let ask = |w: &mut World, c: Control| {
            let fx = w.control(a, c).unwrap();
            fx.iter()
                .find_map(|e| match e {
                    Effect::Cluster(ClusterAsk::Change { id, .. }) => Some(*id),
                    _ => None,
                })
                .unwrap()
        };
        let id = ask(&mut w, Control::SetBpm(101.0));
        w.hub.cluster_answer(id, Outcome::Unchanged, &mut w.fx);
        let fx = w.settle();
        assert_eq!(replies(&fx, a)[0].name, "bpmChange");
        assert!(fx.contains(&Effect::Answer {
            ask: id,
            client: a,
            result: Ok(())
        }));
        let id = ask(&mut w, Control::SetBpm(102.0));
        w.hub
            .cluster_answer(id, Outcome::Failed(ClusterFault::WrongType), &mut w.fx);
        let fx = w.settle();
        assert!(matches!(
            &fx[..],
            [Effect::Answer { result: Err(ClientError::ClusterUnavailable(why)), .. }] if why.contains("another type")
        ));
        // Unanswered for 10 s: refused, not left hanging.
        let id = ask(&mut w, Control::SetBpm(103.0));
        w.now += ASK_TIMEOUT_NS;
        w.hub.housekeeping(w.now, &mut w.fx);
        let fx = w.settle();
        assert!(
            fx.iter()
                .any(|e| matches!(e, Effect::Answer { ask, result: Err(_), .. } if *ask == id))
        );
        // A client that leaves takes its pending requests with it.
        w.now += 1_000_000_000;
        let id = ask(&mut w, Control::SetBpm(104.0));
        assert_eq!(w.hub.leave(a, w.now, &mut w.fx), [id]);
        let left = w.settle();
        w.hub.cluster_answer(id, Outcome::Applied, &mut w.fx);
        let fx = w.settle();
        assert!(fx.is_empty(), "{fx:?} after leaving ({left:?})");
        // An idle room is closed on the cluster too.
        w.hub.leave(b, w.now, &mut w.fx);
        w.hub.housekeeping(w.now + 600 * S, &mut w.fx);
        let fx = w.settle();
        assert!(
            fx.iter()
                .any(|e| matches!(e, Effect::Cluster(ClusterAsk::Close { .. })))
        );
    }

    #[test]
    fn reports_list_main_first_then_by_name() {
        let mut w = World::new(config());
        w.join(Some("zeta"), &[]);
        w.join(Some("alpha"), &[]);
        w.join(None, &[]);
        let names: Vec<String> = w.hub.reports().iter().map(|r| r.name.to_string()).collect();
        assert_eq!(names, ["main", "alpha", "zeta"]);
        assert_eq!(w.hub.reports()[0].clients, 1);
    }
}
