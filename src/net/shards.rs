//! What the fan-out shards share: control in one place, and the ways between them.
//!
//! Every shard is a [`Server`](super::Server): a thread with its own `mio::Poll`, listener,
//! sockets and sessions. This module owns what they have in common and must not own a socket:
//!
//! * [`Control`], behind one mutex: the [`Hub`] (rooms, members of every shard, tokens, rates,
//!   the lead over every member's round trips, `--max-rooms`, idle expiry), the timing
//!   thread's command ring, and which shard each client lives on. A shard takes the lock only
//!   to join, leave, control, report a round trip, or answer `/stats`; shard 0 also takes it
//!   per timing event to keep the hub's counts. The effects whose order matters across shards
//!   (timing commands, cluster requests, saves) are carried out or queued while the lock is
//!   held, so they leave in the order the hub decided them.
//! * One [`Inbox`] per shard with its waker: replies and answers for clients that live there,
//!   and connections handed over because the Socket.IO session they name lives there.
//! * The figures that limits are checked against across shards (clients, long-polling
//!   sessions per address), and each shard's published [`ServerStats`] for `/stats`.
//!
//! Ticks do not pass through here: the timing thread wakes every shard with its own stream.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use log::warn;
use mio::Waker;

use crate::cluster::ClusterStatus;
use crate::connection::Connection;
use crate::hub::{ClientId, Effect, Hub};
use crate::protocol::{ClientError, Outgoing};
use crate::room_timing::TimingThread;
use crate::stats::ServerStats;
use crate::wire::http::Request;

use super::eio::AddressCounts;

/// How long a shard answering `/stats` waits for the others' figures before it reports the
/// last ones they published.
pub(super) const STATS_WAIT: Duration = Duration::from_millis(100);

/// The hub and what must follow its decisions in order.
pub(super) struct Control {
    pub(super) hub: Hub,
    pub(super) timing: Option<TimingThread>,
    /// The shard each hub client lives on, by slot: (generation, shard).
    homes: Vec<(u32, usize)>,
    /// Cluster requests and saves, in decision order, for shard 0 (which holds the cluster
    /// link and the state writer).
    pub(super) for_shard0: VecDeque<Effect>,
    /// The cluster's status as shard 0 last heard it, for whichever shard reports.
    pub(super) cluster: Option<ClusterStatus>,
}

impl Control {
    pub(super) fn set_home(&mut self, client: ClientId, shard: usize) {
        let slot = client.slot as usize;
        if self.homes.len() <= slot {
            self.homes.resize(slot + 1, (0, 0));
        }
        self.homes[slot] = (client.generation, shard);
    }

    /// Where `client` lives; `None` when it is not (or no longer) known.
    pub(super) fn home(&self, client: ClientId) -> Option<usize> {
        self.homes
            .get(client.slot as usize)
            .filter(|(generation, _)| *generation == client.generation)
            .map(|&(_, shard)| shard)
    }
}

/// What one shard hands another.
pub(super) enum Forward {
    Reply {
        client: ClientId,
        event: Outgoing,
    },
    Answer {
        ask: u64,
        client: ClientId,
        result: Result<(), ClientError>,
    },
    /// A connection shard 0 accepted for the receiving shard (`--accept handoff`).
    Accepted {
        sock: mio::net::TcpStream,
        peer: SocketAddr,
    },
    /// A connection whose request names a Socket.IO session that lives on the receiving
    /// shard: it carries on there, starting with that request.
    Connection {
        conn: Box<Connection>,
        req: Box<Request>,
    },
}

pub(super) struct Inbox {
    queue: Mutex<Vec<Forward>>,
    waker: Arc<Waker>,
}

/// One shard's figures as it last published them, and for which request.
struct Published {
    generation: AtomicU64,
    stats: Mutex<Option<ServerStats>>,
}

/// Everything the shards share.
pub(super) struct Shared {
    control: Mutex<Control>,
    inboxes: Vec<Inbox>,
    /// Clients over every shard, against `--max-clients`.
    pub(super) clients: AtomicUsize,
    /// Long-polling sessions per address over every shard, against `--max-sessions-per-ip`.
    pub(super) session_addresses: Mutex<AddressCounts>,
    stats_wanted: AtomicU64,
    published: Vec<Published>,
    /// Each shard's open connections, for `--accept handoff`.
    connections: Vec<AtomicUsize>,
}

/// Takes a lock even if a shard panicked while holding it: the data is counts and rooms,
/// still the best there is, and the other shards must keep serving.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub(super) fn new(hub: Hub, timing: TimingThread, wakers: Vec<Arc<Waker>>) -> Shared {
        let connections = wakers.iter().map(|_| AtomicUsize::new(0)).collect();
        let published = wakers
            .iter()
            .map(|_| Published {
                generation: AtomicU64::new(0),
                stats: Mutex::new(None),
            })
            .collect();
        Shared {
            control: Mutex::new(Control {
                hub,
                timing: Some(timing),
                homes: Vec::new(),
                for_shard0: VecDeque::new(),
                cluster: None,
            }),
            inboxes: wakers
                .into_iter()
                .map(|waker| Inbox {
                    queue: Mutex::new(Vec::new()),
                    waker,
                })
                .collect(),
            clients: AtomicUsize::new(0),
            session_addresses: Mutex::new(AddressCounts::default()),
            stats_wanted: AtomicU64::new(0),
            connections,
            published,
        }
    }

    pub(super) fn client_came(&self) {
        self.clients.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn client_gone(&self) {
        let _ = self
            .clients
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    pub(super) fn connection_opened(&self, shard: usize) {
        if let Some(n) = self.connections.get(shard) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn connection_closed(&self, shard: usize) {
        if let Some(n) = self.connections.get(shard) {
            let _ = n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        }
    }

    /// The shard with the fewest open connections (the lowest number among equals).
    pub(super) fn least_loaded(&self) -> usize {
        least_loaded(self.connections.iter().map(|n| n.load(Ordering::Relaxed)))
    }

    pub(super) fn shards(&self) -> usize {
        self.inboxes.len()
    }

    /// The hub, to read. (To decide, use [`Shared::decide`].)
    pub(super) fn control(&self) -> MutexGuard<'_, Control> {
        lock(&self.control)
    }

    /// Runs one hub decision for `shard` and, still holding the lock, sends the effects
    /// whose order matters across shards: timing commands to the timing thread; cluster
    /// requests and saves to shard 0's queue; replies and answers for clients of another
    /// shard to its inbox. Broadcasts are dropped: every shard derives its members' frames
    /// from the timing stream ([`crate::shard_rooms`]). What stays in `fx` is this shard's.
    pub(super) fn decide<R>(
        &self,
        shard: usize,
        fx: &mut Vec<Effect>,
        f: impl FnOnce(&mut Control, &mut Vec<Effect>) -> R,
    ) -> R {
        let mut control = self.control();
        let start = fx.len();
        let result = f(&mut control, fx);
        let decided: Vec<Effect> = fx.drain(start..).collect();
        let mut wake = vec![false; self.inboxes.len()];
        for effect in decided {
            match effect {
                Effect::Broadcast { .. } => {}
                Effect::Timing(command) => {
                    let sent = control.timing.as_mut().is_some_and(|t| t.send(command));
                    if !sent {
                        warn!("timing thread not keeping up with commands; {command:?} lost");
                    }
                }
                Effect::Cluster(_) | Effect::Persist => {
                    control.for_shard0.push_back(effect);
                    wake[0] = true;
                }
                Effect::Reply { client, event } => match control.home(client) {
                    Some(home) if home != shard => {
                        self.forward(home, Forward::Reply { client, event });
                        wake[home] = true;
                    }
                    _ => fx.push(Effect::Reply { client, event }),
                },
                Effect::Answer {
                    ask,
                    client,
                    result,
                } => match control.home(client) {
                    Some(home) if home != shard => {
                        self.forward(
                            home,
                            Forward::Answer {
                                ask,
                                client,
                                result,
                            },
                        );
                        wake[home] = true;
                    }
                    _ => fx.push(Effect::Answer {
                        ask,
                        client,
                        result,
                    }),
                },
            }
        }
        drop(control);
        for (to, wake) in wake.into_iter().enumerate() {
            if wake && to != shard {
                self.wake(to);
            }
        }
        result
    }

    fn forward(&self, to: usize, forward: Forward) {
        if let Some(inbox) = self.inboxes.get(to) {
            lock(&inbox.queue).push(forward);
        }
    }

    /// Hands `forward` to shard `to` and wakes it.
    pub(super) fn send(&self, to: usize, forward: Forward) {
        self.forward(to, forward);
        self.wake(to);
    }

    fn wake(&self, to: usize) {
        if let Some(inbox) = self.inboxes.get(to)
            && let Err(e) = inbox.waker.wake()
        {
            warn!("cannot wake shard {to}: {e}");
        }
    }

    /// What other shards handed `shard`, in the order they did.
    pub(super) fn take_inbox(&self, shard: usize) -> Vec<Forward> {
        self.inboxes
            .get(shard)
            .map(|inbox| std::mem::take(&mut *lock(&inbox.queue)))
            .unwrap_or_default()
    }

    /// Publishes `shard`'s figures if a `/stats` request wants newer ones than it published.
    pub(super) fn publish_if_wanted(&self, shard: usize, stats: &ServerStats) {
        let wanted = self.stats_wanted.load(Ordering::Acquire);
        let Some(slot) = self.published.get(shard) else {
            return;
        };
        if slot.generation.load(Ordering::Acquire) < wanted {
            *lock(&slot.stats) = Some(stats.clone());
            slot.generation.store(wanted, Ordering::Release);
        }
    }

    /// Every shard's figures added up, asked of `shard` with its own `stats`: the others are
    /// woken to publish theirs, and waited for up to [`STATS_WAIT`] (a shard in the middle of
    /// a long fan-out answers when it pauses); past that, what they published last is used.
    /// Also returns each shard's figures, in shard order.
    pub(super) fn gather_stats(
        &self,
        shard: usize,
        stats: &ServerStats,
    ) -> (ServerStats, Vec<ServerStats>) {
        let wanted = self.stats_wanted.fetch_add(1, Ordering::AcqRel) + 1;
        for to in 0..self.inboxes.len() {
            if to != shard {
                self.wake(to);
            }
        }
        let until = Instant::now() + STATS_WAIT;
        loop {
            // Answer any other shard that is waiting for this one meanwhile.
            self.publish_if_wanted(shard, stats);
            let all = self
                .published
                .iter()
                .enumerate()
                .all(|(i, p)| i == shard || p.generation.load(Ordering::Acquire) >= wanted);
            if all || Instant::now() >= until {
                break;
            }
            std::thread::yield_now();
        }
        let mut each = Vec::with_capacity(self.published.len());
        for (i, p) in self.published.iter().enumerate() {
            if i == shard {
                each.push(stats.clone());
            } else {
                each.push(lock(&p.stats).clone().unwrap_or_default());
            }
        }
        (merge_shards(&each), each)
    }
}

/// The figures of every shard as one: shard 0's timing-stream figures, everyone's counts.
pub(super) fn merge_shards(each: &[ServerStats]) -> ServerStats {
    let mut iter = each.iter();
    let mut total = iter.next().cloned().unwrap_or_default();
    for other in iter {
        total.merge_shard(other);
    }
    total
}

/// The index of the smallest load (the first among equals); 0 when there is none.
pub(super) fn least_loaded(loads: impl Iterator<Item = usize>) -> usize {
    loads
        .enumerate()
        .min_by_key(|&(i, n)| (n, i))
        .map_or(0, |(i, _)| i)
}

/// The shard a Socket.IO session id names: its first two hex digits.
pub(super) fn shard_of_sid(sid: &str, shards: usize) -> Option<usize> {
    let tag = usize::from_str_radix(sid.get(..2)?, 16).ok()?;
    (tag < shards).then_some(tag)
}

/// A session id for `shard`: `random` (hex) with its first two digits replaced by the shard's
/// number, so that any shard can tell where a session lives. 16 random bytes keep 120 bits.
pub(super) fn tag_sid(random: &str, shard: usize) -> String {
    format!("{:02x}{}", shard % 256, random.get(2..).unwrap_or(""))
}

/// A listening socket on `addr` that other shards may bind as well (`SO_REUSEPORT`): the
/// kernel spreads new connections over them by a hash of the address pair. The options must
/// be set before `bind`, which std's listener cannot do, hence the system calls.
pub(super) fn listen_shared(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain system calls on a descriptor this function owns until it is returned (or
    // closed on error); the address structs are fully initialised and their sizes given.
    unsafe {
        let fd = libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let listener = std::net::TcpListener::from_raw_fd(fd);
        let one: libc::c_int = 1;
        for option in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
            if libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&raw const one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        let rc = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                libc::bind(
                    fd,
                    (&raw const sin).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                libc::bind(
                    fd,
                    (&raw const sin6).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        };
        if rc != 0 || libc::listen(fd, libc::SOMAXCONN) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(listener)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::ClientKind;

    #[test]
    fn a_session_id_says_its_shard() {
        let random = "0123456789abcdef0123456789abcdef";
        for shard in [0, 1, 7, 255] {
            let sid = tag_sid(random, shard);
            assert_eq!(sid.len(), random.len());
            assert_eq!(&sid[2..], &random[2..]);
            assert_eq!(shard_of_sid(&sid, 256), Some(shard));
        }
        assert_eq!(shard_of_sid(&tag_sid(random, 3), 2), None);
        assert_eq!(shard_of_sid("zz12", 4), None);
        assert_eq!(shard_of_sid("", 4), None);
        assert_eq!(shard_of_sid("é1", 4), None);
    }

    #[test]
    fn handoff_picks_the_shard_with_the_fewest_connections() {
        assert_eq!(least_loaded([3, 1, 2].into_iter()), 1);
        assert_eq!(least_loaded([2, 2, 2].into_iter()), 0);
        assert_eq!(least_loaded([5, 4, 4].into_iter()), 1);
        assert_eq!(least_loaded(std::iter::empty()), 0);
        // A burst spreads exactly: each placement counts at once.
        let mut loads = vec![0usize; 3];
        for _ in 0..10_000 {
            let to = least_loaded(loads.iter().copied());
            loads[to] += 1;
        }
        assert_eq!(loads, [3334, 3333, 3333]);
    }

    #[test]
    fn merging_shards_adds_clients_once_each() {
        let mut each = vec![ServerStats::default(); 3];
        for (i, st) in each.iter_mut().enumerate() {
            for _ in 0..=i {
                st.client_opened(ClientKind::Ws);
            }
            st.record_tick(5);
        }
        let total = merge_shards(&each);
        assert_eq!(total.clients, 6);
        assert_eq!(total.ticks_emitted, 1);
        assert_eq!(merge_shards(&[]).clients, 0);
    }

    #[test]
    fn shards_listen_on_one_port() {
        let first = listen_shared("127.0.0.1:0".parse().expect("addr")).expect("first");
        let addr = first.local_addr().expect("addr");
        let second = listen_shared(addr).expect("a second listener on the same port");
        assert_eq!(second.local_addr().expect("addr"), addr);
        // A plain listener elsewhere on the port is still refused.
        assert!(std::net::TcpListener::bind(addr).is_err());
        let v6 = listen_shared("[::1]:0".parse().expect("addr"));
        if let Ok(v6) = v6 {
            let addr = v6.local_addr().expect("addr");
            listen_shared(addr).expect("v6 twice");
        }
    }
}
