//! One fan-out shard's view of the rooms: which of its own clients sit in which room, and what
//! the timing stream has announced for each room, so that the shard can turn the stream into
//! its members' frames by itself.
//!
//! This module owns the per-shard membership and the per-shard copy of each room's announced
//! timeline. It decides nothing: who may join, what a change means and when it lands stay with
//! the [`crate::hub`], in one place. It reads no clock and holds no socket. Every shard is fed
//! the same ordered stream by the timing thread, and derives its broadcasts from it with the
//! hub's own pure rules ([`crate::hub::tick_event`], [`crate::hub::Announcement`]), so every
//! member of a room hears the same frames in the same order whichever shard holds it: a tick
//! is never overtaken by a change announced after it, nor the other way round.

use std::collections::HashMap;

use crate::hub::{Announcement, ClientId, tick_event};
use crate::protocol::Outgoing;
use crate::room::{RoomKey, RoomName};
use crate::room_timing::TimingEvent;
use crate::tick_choice::{Audience, TickChoice};
use crate::timeline::Timeline;

/// One event for this shard's members of a room.
#[derive(Clone, Debug, PartialEq)]
pub struct Broadcast {
    pub room: RoomKey,
    /// Which of the room's members it is for (a tick: those who chose it).
    pub to: Audience,
    pub event: Outgoing,
    /// For a tick: its deadline (ns on the server clock), to measure the fan-out against.
    pub tick_deadline_ns: Option<u64>,
}

#[derive(Debug, Default)]
struct Local {
    /// What the stream announced last; `None` until its first announcement.
    announced: Option<Timeline>,
    /// This shard's members, grouped by the ticks they chose ([`TickChoice::index`]), each
    /// group in join order (swap-removed on leave): a tick visits only the groups it is for,
    /// so a `none` member costs nothing per tick.
    members: [Vec<ClientId>; 4],
    /// For Socket.IO's `/NAME` namespace prefix.
    name: Option<RoomName>,
}

impl Local {
    fn len(&self) -> usize {
        self.members.iter().map(Vec::len).sum()
    }

    fn is_empty(&self) -> bool {
        self.members.iter().all(Vec::is_empty)
    }
}

/// A shard's rooms: its members and the stream's announcements.
#[derive(Debug)]
pub struct ShardRooms {
    epoch_unix_ns: u64,
    ppqn: u32,
    rooms: HashMap<RoomKey, Local>,
    /// Where each member sits: its room, its group and its index in that group.
    seats: HashMap<ClientId, (RoomKey, TickChoice, usize)>,
}

impl ShardRooms {
    /// `epoch_unix_ns`: the unix time of the server clock's zero (as the hub has it).
    pub fn new(epoch_unix_ns: u64, ppqn: u32) -> ShardRooms {
        ShardRooms {
            epoch_unix_ns,
            ppqn,
            rooms: HashMap::new(),
            seats: HashMap::new(),
        }
    }

    /// One of this shard's clients joined `room` (the hub let it in), taking `ticks`.
    pub fn join(&mut self, client: ClientId, room: RoomKey, name: RoomName, ticks: TickChoice) {
        self.leave(client);
        let local = self.rooms.entry(room).or_default();
        local.name = Some(name);
        let group = &mut local.members[ticks.index()];
        self.seats.insert(client, (room, ticks, group.len()));
        group.push(client);
    }

    /// One of this shard's clients left. Unknown clients are ignored.
    pub fn leave(&mut self, client: ClientId) {
        let Some((room, ticks, at)) = self.seats.remove(&client) else {
            return;
        };
        let Some(local) = self.rooms.get_mut(&room) else {
            return;
        };
        let group = &mut local.members[ticks.index()];
        if group.get(at) == Some(&client) {
            group.swap_remove(at);
            if let Some(&moved) = group.get(at)
                && let Some(seat) = self.seats.get_mut(&moved)
            {
                seat.2 = at;
            }
        }
    }

    /// This shard's members of `room` that `to` names, for a fan-out: only their groups are
    /// visited.
    pub fn members(&self, room: RoomKey, to: Audience) -> impl Iterator<Item = ClientId> + '_ {
        self.rooms.get(&room).into_iter().flat_map(move |l| {
            to.groups()
                .flat_map(move |choice| l.members[choice.index()].iter().copied())
        })
    }

    pub fn name(&self, room: RoomKey) -> Option<&RoomName> {
        self.rooms.get(&room).and_then(|l| l.name.as_ref())
    }

    /// This shard's clients in rooms.
    pub fn clients(&self) -> usize {
        self.seats.len()
    }

    /// This shard's clients per room (rooms where it has any).
    pub fn room_clients(&self) -> impl Iterator<Item = (RoomKey, usize)> + '_ {
        self.rooms
            .iter()
            .map(|(&k, l)| (k, l.len()))
            .filter(|&(_, n)| n > 0)
    }

    /// The next event of the timing stream, in order: pushes what this shard's members of the
    /// room are to hear (nothing where it has none, but the announcement is kept either way,
    /// since a member may join next).
    pub fn on_timing(&mut self, event: &TimingEvent, out: &mut Vec<Broadcast>) {
        match *event {
            TimingEvent::Tick(tick) => {
                let Some(local) = self.rooms.get(&tick.room) else {
                    return;
                };
                // Every room's first event in the stream is its timeline (`Add` announces it),
                // so a tick without one is of a room this shard never heard of: no members.
                let Some(announced) = local.announced else {
                    return;
                };
                // Bar lines as the stream has announced them: a `beats_per_bar` change moves
                // them for `bar` members from the tick it is announced before.
                let to = Audience::for_tick(tick.count, self.ppqn, announced.beats_per_bar);
                let listeners = to.groups().any(|c| !local.members[c.index()].is_empty());
                if announced.transport.plays(tick.count) && listeners {
                    out.push(Broadcast {
                        room: tick.room,
                        to,
                        event: tick_event(self.epoch_unix_ns, self.ppqn, &tick),
                        tick_deadline_ns: Some(tick.deadline_ns),
                    });
                }
            }
            TimingEvent::Timeline { room, timeline } => {
                let local = self.rooms.entry(room).or_default();
                let Some(before) = local.announced.replace(timeline) else {
                    // The room's first announcement: its members were greeted with it.
                    return;
                };
                if local.is_empty() {
                    return;
                }
                for event in Announcement::between(&before, &timeline).events(&timeline) {
                    out.push(Broadcast {
                        room,
                        to: Audience::EVERYONE,
                        event,
                        tick_deadline_ns: None,
                    });
                }
            }
            TimingEvent::Dropped { room } => {
                // A room is dropped only once it has been empty for --room-idle; a member that
                // still sits here (it joined the key just before) keeps its seat.
                if self.rooms.get(&room).is_some_and(Local::is_empty) {
                    self.rooms.remove(&room);
                }
            }
            TimingEvent::Soon { .. }
            | TimingEvent::Skipped { .. }
            | TimingEvent::Exhausted { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::room_timing::RoomTick;
    use crate::tempo::Bpm;
    use crate::transport::{Transport, TransportState};

    const EPOCH: u64 = 1_700_000_000_000_000_000;

    fn key(slot: u32) -> RoomKey {
        RoomKey {
            slot,
            generation: 1,
        }
    }

    fn client(slot: u32) -> ClientId {
        ClientId {
            slot,
            generation: 1,
        }
    }

    fn tick(room: RoomKey, count: u64) -> TimingEvent {
        TimingEvent::Tick(RoomTick {
            room,
            count,
            deadline_ns: count * 125_000_000,
            emitted_ns: count * 125_000_000 + 1_000,
            bpm: Bpm::whole(120),
        })
    }

    fn timeline(bpm: u32) -> Timeline {
        Timeline::new(Bpm::whole(bpm), 4, 4, EPOCH)
    }

    fn names(out: &[Broadcast]) -> Vec<&'static str> {
        out.iter().map(|b| b.event.name).collect()
    }

    #[test]
    fn only_rooms_with_members_here_get_ticks() {
        let mut rooms = ShardRooms::new(EPOCH, 4);
        let mut out = Vec::new();
        for room in [key(0), key(1)] {
            rooms.on_timing(
                &TimingEvent::Timeline {
                    room,
                    timeline: timeline(120),
                },
                &mut out,
            );
        }
        assert!(
            out.is_empty(),
            "a room's first announcement is its greeting"
        );
        rooms.join(
            client(7),
            key(1),
            RoomName::parse("jam").expect("name"),
            TickChoice::All,
        );
        rooms.on_timing(&tick(key(0), 1), &mut out);
        assert!(out.is_empty(), "no member of main on this shard");
        rooms.on_timing(&tick(key(1), 1), &mut out);
        assert_eq!(names(&out), ["tick"]);
        assert_eq!(out[0].room, key(1));
        assert_eq!(out[0].tick_deadline_ns, Some(125_000_000));
        // The same bytes the hub would send.
        let TimingEvent::Tick(t) = tick(key(1), 1) else {
            unreachable!()
        };
        assert_eq!(out[0].event, tick_event(EPOCH, 4, &t));
        assert_eq!(
            rooms
                .members(key(1), Audience::EVERYONE)
                .collect::<Vec<_>>(),
            [client(7)]
        );
        assert_eq!(rooms.name(key(1)).map(RoomName::as_str), Some("jam"));
    }

    #[test]
    fn changes_are_announced_in_stream_order_like_the_hub() {
        let mut rooms = ShardRooms::new(EPOCH, 4);
        let mut out = Vec::new();
        let first = timeline(120);
        rooms.on_timing(
            &TimingEvent::Timeline {
                room: key(0),
                timeline: first,
            },
            &mut out,
        );
        rooms.join(client(1), key(0), RoomName::main(), TickChoice::All);
        rooms.on_timing(&tick(key(0), 1), &mut out);
        // A tempo change, then a stop: the same events the hub's Announcement gives.
        let faster = Timeline {
            bpm: Bpm::whole(150),
            anchor_count: 8,
            ..first
        };
        rooms.on_timing(
            &TimingEvent::Timeline {
                room: key(0),
                timeline: faster,
            },
            &mut out,
        );
        rooms.on_timing(&tick(key(0), 2), &mut out);
        assert_eq!(names(&out), ["tick", "bpmChange", "timeline", "tick"]);
        let mut stopped = faster;
        stopped.transport =
            Transport::from_parts(TransportState::Playing, TransportState::Stopped, 16);
        out.clear();
        rooms.on_timing(
            &TimingEvent::Timeline {
                room: key(0),
                timeline: stopped,
            },
            &mut out,
        );
        assert_eq!(names(&out), ["transport", "timeline"]);
        // Stopped from 16: tick 15 still plays, 16 does not.
        out.clear();
        rooms.on_timing(&tick(key(0), 15), &mut out);
        rooms.on_timing(&tick(key(0), 16), &mut out);
        assert_eq!(names(&out), ["tick"]);
        // The same timeline again says nothing.
        out.clear();
        rooms.on_timing(
            &TimingEvent::Timeline {
                room: key(0),
                timeline: stopped,
            },
            &mut out,
        );
        assert!(out.is_empty());
        // Started again on the next bar.
        let mut started = stopped;
        started.transport =
            Transport::from_parts(TransportState::Stopped, TransportState::Playing, 32);
        rooms.on_timing(
            &TimingEvent::Timeline {
                room: key(0),
                timeline: started,
            },
            &mut out,
        );
        assert_eq!(names(&out), ["transport", "timeline"]);
    }

    #[test]
    fn leaving_keeps_the_other_seats_right() {
        let mut rooms = ShardRooms::new(EPOCH, 4);
        for c in 0..4 {
            rooms.join(client(c), key(0), RoomName::main(), TickChoice::All);
        }
        rooms.leave(client(0));
        rooms.leave(client(0));
        assert_eq!(
            rooms
                .members(key(0), Audience::EVERYONE)
                .collect::<Vec<_>>(),
            &[client(3), client(1), client(2)]
        );
        rooms.leave(client(3));
        assert_eq!(
            rooms
                .members(key(0), Audience::EVERYONE)
                .collect::<Vec<_>>(),
            &[client(2), client(1)]
        );
        assert_eq!(rooms.clients(), 2);
        // Moving to another room leaves the first.
        rooms.join(
            client(1),
            key(1),
            RoomName::parse("b").expect("name"),
            TickChoice::All,
        );
        assert_eq!(
            rooms
                .members(key(0), Audience::EVERYONE)
                .collect::<Vec<_>>(),
            &[client(2)]
        );
        let mut per_room: Vec<_> = rooms.room_clients().collect();
        per_room.sort();
        assert_eq!(per_room, [(key(0), 1), (key(1), 1)]);
    }

    #[test]
    fn a_dropped_room_is_forgotten_once_empty_here() {
        let mut rooms = ShardRooms::new(EPOCH, 4);
        let mut out = Vec::new();
        rooms.on_timing(
            &TimingEvent::Timeline {
                room: key(2),
                timeline: timeline(100),
            },
            &mut out,
        );
        rooms.on_timing(&TimingEvent::Dropped { room: key(2) }, &mut out);
        assert!(rooms.rooms.is_empty());
        rooms.join(
            client(1),
            key(3),
            RoomName::parse("c").expect("name"),
            TickChoice::All,
        );
        rooms.on_timing(&TimingEvent::Dropped { room: key(3) }, &mut out);
        assert_eq!(
            rooms
                .members(key(3), Audience::EVERYONE)
                .collect::<Vec<_>>(),
            &[client(1)]
        );
    }

    #[test]
    fn a_tick_visits_only_the_members_who_chose_it() {
        let mut rooms = ShardRooms::new(EPOCH, 4);
        let mut out = Vec::new();
        rooms.on_timing(
            &TimingEvent::Timeline {
                room: key(0),
                timeline: timeline(120),
            },
            &mut out,
        );
        for (c, choice) in TickChoice::ALL.into_iter().enumerate() {
            rooms.join(client(c as u32), key(0), RoomName::main(), choice);
        }
        let heard = |rooms: &ShardRooms, out: &[Broadcast]| -> Vec<ClientId> {
            out.iter()
                .flat_map(|b| rooms.members(b.room, b.to).collect::<Vec<_>>())
                .collect()
        };
        rooms.on_timing(&tick(key(0), 1), &mut out);
        assert_eq!(heard(&rooms, &out), [client(0)], "only `all` off the beat");
        out.clear();
        rooms.on_timing(&tick(key(0), 4), &mut out);
        assert_eq!(
            heard(&rooms, &out),
            [client(0), client(1)],
            "`all` and `beat`"
        );
        out.clear();
        rooms.on_timing(&tick(key(0), 16), &mut out);
        assert_eq!(
            heard(&rooms, &out),
            [client(0), client(1), client(2)],
            "not `none`"
        );
        // Only `none` members: a tick is not even queued.
        for c in 0..3 {
            rooms.leave(client(c));
        }
        out.clear();
        rooms.on_timing(&tick(key(0), 16), &mut out);
        assert!(out.is_empty());
        // A change still reaches them.
        rooms.on_timing(
            &TimingEvent::Timeline {
                room: key(0),
                timeline: timeline(90),
            },
            &mut out,
        );
        assert_eq!(heard(&rooms, &out[..1]), [client(3)]);
    }
}
