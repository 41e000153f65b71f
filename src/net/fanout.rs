//! The fan-out: a broadcast to every member of a room, encoded once per protocol, written in
//! chunks with pauses between them to serve what clients have sent.
//!
//! A broadcast is a [`Job`] the loop runs ([`Server::run_jobs`]); nothing else starts one. A
//! pause handles readiness events like the loop does, and whatever they decide for many
//! clients becomes a job queued behind the current one. So frames reach every client in
//! order, and no handler ever runs inside another through the reactor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use log::debug;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::room::RoomKey;
use crate::stats::CloseReason;
use crate::tick_choice::Audience;
use crate::wire::engineio::{self};
use crate::wire::protocol::{self, Outgoing, SharedFrame};

use super::eio::Link;

use super::reactor::*;

/// A broadcast waiting to be fanned out.
pub(super) struct Job {
    pub(super) room: RoomKey,
    /// Which of the room's members: a tick skips those who did not ask for it unvisited.
    pub(super) to: Audience,
    pub(super) event: Outgoing,
    /// For a tick: its deadline, to measure the fan-out against.
    pub(super) deadline_ns: Option<u64>,
}

/// A broadcast encoded once per protocol, as members need it.
#[derive(Default)]
pub(super) struct Encoded {
    plain: Option<SharedFrame>,
    /// `42[...]` (`/`), as a WebSocket frame and as a polling packet.
    bare: Option<(SharedFrame, Arc<str>)>,
    /// `42/NAME,[...]`.
    named: Option<(SharedFrame, Arc<str>)>,
}

impl Encoded {
    pub(super) fn plain(&mut self, event: &Outgoing) -> SharedFrame {
        Arc::clone(self.plain.get_or_insert_with(|| event.frame()))
    }

    pub(super) fn sio(&mut self, event: &Outgoing, nsp: Option<&str>) -> (SharedFrame, Arc<str>) {
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

impl Server {
    /// Runs every queued broadcast, in order. Called by the loop only: a pause inside a job
    /// queues new jobs behind it rather than running them.
    pub(super) fn run_jobs(&mut self) {
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

    /// Sends one broadcast to the members of its room it is for (a tick: only those who chose
    /// it; the hub keeps them grouped, so the others are never visited), encoded once per
    /// protocol. Members
    /// already `max_queue` frames behind are closed as slow consumers instead; they never hold
    /// up the rest. Every [`FANOUT_CHUNK`] members it pauses to serve what has arrived.
    pub(super) fn fan_out(&mut self, job: &Job) {
        let mut members = std::mem::take(&mut self.members);
        members.clear();
        members.extend(self.rooms.members(job.room, job.to));
        let mut encoded = Encoded::default();
        // A room's named namespace is `/NAME` (`/main` for a client that named main).
        let room_nsp = self
            .rooms
            .name(job.room)
            .map(|name| format!("/{name}"))
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
                    self.send_or_shed(key, &frame, limit, now);
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

    /// One broadcast frame onto socket `key`'s queue; a socket already `limit` frames behind
    /// is closed as a slow consumer instead, so it never holds up the rest.
    fn send_or_shed(&mut self, key: usize, frame: &SharedFrame, limit: usize, now: Instant) {
        let Some(s) = self.socks.get_mut(key) else {
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
        self.after_io(key);
    }

    /// One broadcast frame to one session, on whatever carries it.
    pub(super) fn deliver(
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
            Link::WebSocket { socket } => self.send_or_shed(socket, frame, limit, now),
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
    pub(super) fn serve_pause(&mut self) {
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
}
