//! The loop's side of `--cluster`: starting the cluster thread, handing it the hub's requests,
//! and handing the hub what it reports (Redis itself is the cluster thread's business, in
//! [`crate::cluster`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::Waker;

use crate::cluster::{
    self, ClusterConfig, ClusterEvent, ClusterEvents, ClusterRequest, ClusterStatus, ClusterThread,
    Outcome, TimelineLimits,
};
use crate::config::Config;
use crate::hub::ClusterAsk;

use super::reactor::*;

/// How long `bind` waits for `main`'s shared timeline before starting on its own.
pub(super) const CLUSTER_JOIN_WAIT: Duration = Duration::from_secs(3);

/// The loop's side of a cluster.
pub(super) struct ClusterLink {
    pub(super) thread: ClusterThread,
    pub(super) events: ClusterEvents,
    pub(super) status: ClusterStatus,
}

/// Starts the cluster thread (following no room yet: the hub opens them).
pub(super) fn start_cluster(
    cfg: &Config,
    url: &str,
    name: &str,
    lead: Duration,
    waker: &Arc<Waker>,
) -> Result<ClusterLink, ServerError> {
    let cluster_cfg = ClusterConfig {
        url: url.to_string(),
        name: name.to_string(),
        lead,
        limits: TimelineLimits {
            min_bpm: cfg.min_bpm,
            max_bpm: cfg.max_bpm,
            ppqn: cfg.ppqn,
            beats_per_bar: cfg.beats_per_bar,
        },
        room_idle: cfg.room_idle,
    };
    let (thread, events) =
        ClusterThread::spawn(cluster_cfg, Arc::clone(waker)).map_err(ServerError::Cluster)?;
    Ok(ClusterLink {
        thread,
        events,
        status: ClusterStatus::default(),
    })
}

impl Server {
    /// Waits (briefly) for `main`'s shared timeline, so that a joining instance's first tick
    /// is already in phase with the others. Without an answer in time `main` starts on its
    /// own timeline (the state file's, or a fresh one) and adopts the shared one once Redis
    /// answers.
    pub(super) fn join_cluster(&mut self) {
        let Some(name) = self.cfg.cluster.as_ref().map(|(_, name, _)| name.clone()) else {
            return;
        };
        let main = self.shared.control().hub.main();
        let give_up = Instant::now() + CLUSTER_JOIN_WAIT;
        while !self.shared.control().hub.is_ready(main) && Instant::now() < give_up {
            self.drain_cluster();
            std::thread::sleep(Duration::from_millis(2));
        }
        let (timeline, ready) = {
            let control = self.shared.control();
            (control.hub.timeline(main), control.hub.is_ready(main))
        };
        match timeline {
            Some(t) if ready => info!(
                "cluster {name}: joined timeline version {} at {} BPM",
                t.version, t.bpm
            ),
            _ => {
                warn!(
                    "cluster {name}: no timeline from Redis within {} s; ticking on our own \
                     until it answers",
                    CLUSTER_JOIN_WAIT.as_secs()
                );
                let now_ns = self.clock.now_ns();
                self.decide(|hub, fx| hub.start_waiting(main, now_ns, fx));
                self.settle_hub();
            }
        }
    }

    /// Takes what the cluster thread reports: status, timelines to adopt, answers.
    pub(super) fn drain_cluster(&mut self) {
        loop {
            let Some(link) = self.cluster.as_mut() else {
                return;
            };
            let Ok(event) = link.events.pop() else {
                return;
            };
            let now_ns = self.clock.now_ns();
            match event {
                ClusterEvent::Status(status) => {
                    link.status = status;
                    let mut control = self.shared.control();
                    control.cluster = Some(status);
                    control
                        .hub
                        .set_cluster_status(status.connected, status.fault);
                }
                ClusterEvent::Adopt { room, timeline } => {
                    // `check`ed by the cluster thread against this instance's limits.
                    let timeline = cluster::to_timeline(&timeline, self.cfg.beats_per_bar);
                    self.decide(|hub, fx| hub.cluster_timeline(room, timeline, now_ns, fx));
                }
                ClusterEvent::Answer { id, outcome } => {
                    self.decide(|hub, fx| hub.cluster_answer(id, outcome, fx));
                }
            }
            self.settle_hub();
        }
    }

    /// Hands one of the hub's requests to the cluster thread. A change the ring has no room
    /// for is answered at once (busy), never dropped silently.
    pub(super) fn ask_cluster(&mut self, ask: ClusterAsk) {
        let Some(link) = self.cluster.as_mut() else {
            return;
        };
        let (id, request) = match ask {
            ClusterAsk::Open { room, name, seed } => (
                0,
                ClusterRequest::Open {
                    room,
                    name,
                    seed: cluster::from_timeline(&seed),
                },
            ),
            ClusterAsk::Change {
                id,
                room,
                change,
                lead_ns,
                ..
            } => (
                id,
                ClusterRequest::Change {
                    room,
                    change,
                    lead_ns,
                },
            ),
            ClusterAsk::Occupied { room, occupied } => {
                (0, ClusterRequest::Occupied { room, occupied })
            }
            ClusterAsk::Close { room, .. } => (0, ClusterRequest::Close { room }),
        };
        let is_change = matches!(request, ClusterRequest::Change { .. });
        if !link.thread.send(id, request) {
            warn!("cluster thread not keeping up with requests; one refused");
            if is_change {
                self.decide(|hub, fx| hub.cluster_answer(id, Outcome::Lost, fx));
                self.settle_hub();
            }
        }
    }
}
