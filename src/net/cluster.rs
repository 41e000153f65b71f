//! The loop's side of `--cluster`: starting the cluster thread, and exchanging timelines with
//! it (Redis itself is the cluster thread's business, in [`crate::cluster`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::Waker;

use crate::clock::Clock;
use crate::cluster::{
    ClusterConfig, ClusterEvent, ClusterEvents, ClusterRequest, ClusterStatus, ClusterThread,
    SharedTimeline,
};
use crate::config::Config;
use crate::hub::ClusterAsk;
use crate::lead::{self};
use crate::timeline::{Change, Timeline};
use crate::transport::TransportState;

use super::reactor::*;

pub(super) fn from_shared(s: &SharedTimeline, beats_per_bar: u32) -> Timeline {
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

pub(super) fn to_shared(t: &Timeline) -> SharedTimeline {
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
pub(super) type ClusterStart = (ClusterThread, ClusterEvents, ClusterStatus);

/// Starts the cluster thread and waits (briefly) for the shared timeline, so that a joining
/// instance's first tick is already in phase with the others. Without an answer in time it
/// starts on its own timeline and adopts the shared one once Redis answers.
pub(super) fn join_cluster(
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

impl Server {
    /// Takes what the cluster thread reports: status, and timelines to adopt.
    pub(super) fn drain_cluster(&mut self) {
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
    pub(super) fn adopt(&mut self, shared: SharedTimeline) {
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
    pub(super) fn ask_cluster(&mut self, ask: ClusterAsk) {
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
}
