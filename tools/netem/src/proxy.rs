//! The proxy: one listening port per path, every accepted connection relayed to the upstream
//! through two delay lines.
//!
//! This module owns the sockets and the threads. Each connection has a reader and a writer per
//! direction: the reader takes each chunk as it arrives (with the kernel's receive timestamp, so
//! a busy reader does not add its own delay), asks the [`DelayLine`] when it may leave, and
//! queues it; the writer sleeps until that instant (natively, then spinning the last stretch,
//! so the departure is not late by a timer's slack) and writes it. Nothing here decides timing.

use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info, warn};
use spin_sleep::{SpinSleeper, SpinStrategy};

use crate::NetemError;
use crate::delay::DelayLine;
use crate::profile::Profile;

/// One path: where it listens, where it forwards, what it does to the bytes.
#[derive(Clone, Debug)]
pub struct PathConfig {
    pub listen: SocketAddr,
    /// `HOST:PORT` of the server behind the path, resolved for each connection.
    pub upstream: String,
    pub profile: Profile,
    /// Seeds every connection's random streams (connection k: `seed + 2k` up, `+ 1` down).
    pub seed: u64,
    /// How long before a departure the writer stops sleeping and spins.
    pub spin: Duration,
    /// `SCHED_FIFO` priority for the writers (0: the normal scheduler). Needs `CAP_SYS_NICE`;
    /// refused, the writers stay on the normal scheduler (logged once per path).
    pub rt_priority: u8,
    /// A name for the log.
    pub name: String,
}

/// What a path has done so far.
#[derive(Debug, Default)]
pub struct PathStats {
    pub connections: AtomicU64,
    pub open: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub chunks: AtomicU64,
    pub bursts: AtomicU64,
    pub held_for_order: AtomicU64,
}

/// A running path. Dropping it stops accepting and closes its connections.
pub struct PathHandle {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    stats: Arc<PathStats>,
    acceptor: Option<JoinHandle<()>>,
}

impl PathHandle {
    /// The address it listens on (the port the kernel chose, for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn stats(&self) -> &PathStats {
        &self.stats
    }
}

impl Drop for PathHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the blocking accept.
        let _ = TcpStream::connect_timeout(&self.local, Duration::from_millis(200));
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        let sockets = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        for s in sockets.iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Binds the path's port and starts accepting.
pub fn spawn(cfg: PathConfig) -> Result<PathHandle, NetemError> {
    let listener = TcpListener::bind(cfg.listen).map_err(|e| NetemError::Bind(cfg.listen, e))?;
    let local = listener
        .local_addr()
        .map_err(|e| NetemError::Bind(cfg.listen, e))?;
    let stop = Arc::new(AtomicBool::new(false));
    let sockets = Arc::new(Mutex::new(Vec::new()));
    let stats = Arc::new(PathStats::default());
    let acceptor = {
        let (stop, sockets, stats) = (Arc::clone(&stop), Arc::clone(&sockets), Arc::clone(&stats));
        thread::Builder::new()
            .name(format!("netem-{}", local.port()))
            .spawn(move || accept_loop(listener, cfg, stop, sockets, stats))
            .map_err(NetemError::Thread)?
    };
    Ok(PathHandle {
        local,
        stop,
        sockets,
        stats,
        acceptor: Some(acceptor),
    })
}

fn accept_loop(
    listener: TcpListener,
    cfg: PathConfig,
    stop: Arc<AtomicBool>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    stats: Arc<PathStats>,
) {
    let epoch = Instant::now();
    let mut index = 0u64;
    for client in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                warn!("{}: accept: {e}", cfg.name);
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let seed = cfg.seed.wrapping_add(2 * index);
        index += 1;
        let (cfg, sockets, stats) = (cfg.clone(), Arc::clone(&sockets), Arc::clone(&stats));
        let spawned = thread::Builder::new()
            .name(format!("netem-{}-c{index}", cfg.listen.port()))
            .spawn(move || relay(client, &cfg, seed, epoch, &sockets, &stats));
        if let Err(e) = spawned {
            warn!("{}: cannot start a connection thread: {e}", index);
        }
    }
}

fn connect_upstream(upstream: &str) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for addr in upstream.to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// One connection: connects upstream, then runs both directions until both end.
fn relay(
    client: TcpStream,
    cfg: &PathConfig,
    seed: u64,
    epoch: Instant,
    sockets: &Mutex<Vec<TcpStream>>,
    stats: &Arc<PathStats>,
) {
    let peer = client
        .peer_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string());
    let server = match connect_upstream(&cfg.upstream) {
        Ok(s) => s,
        Err(e) => {
            warn!(
                "{}: {peer}: cannot reach the upstream {}: {e}; closing",
                cfg.name, cfg.upstream
            );
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
    };
    for s in [&client, &server] {
        let _ = s.set_nodelay(true);
        enable_timestamps(s);
    }
    {
        let mut list = sockets.lock().unwrap_or_else(|e| e.into_inner());
        // Connections that ended are dropped from the list here, not in a thread of their own.
        list.retain(|s| s.peer_addr().is_ok());
        for s in [&client, &server] {
            if let Ok(c) = s.try_clone() {
                list.push(c);
            }
        }
    }
    stats.connections.fetch_add(1, Ordering::Relaxed);
    stats.open.fetch_add(1, Ordering::Relaxed);
    debug!("{}: {peer} connected", cfg.name);
    let up = direction(
        &client,
        &server,
        DelayLine::new(cfg.profile.up, seed),
        epoch,
        cfg,
        stats,
        true,
    );
    let down = direction(
        &server,
        &client,
        DelayLine::new(cfg.profile.down, seed.wrapping_add(1)),
        epoch,
        cfg,
        stats,
        false,
    );
    for handles in [up, down].into_iter().flatten() {
        for h in handles {
            let _ = h.join();
        }
    }
    stats.open.fetch_sub(1, Ordering::Relaxed);
    debug!("{}: {peer} closed", cfg.name);
}

enum Chunk {
    Data(Instant, Vec<u8>),
    /// The source closed (or failed): close the destination's write side at this instant.
    End(Instant),
}

/// Starts the reader and writer of one direction.
fn direction(
    from: &TcpStream,
    to: &TcpStream,
    line: DelayLine,
    epoch: Instant,
    cfg: &PathConfig,
    stats: &Arc<PathStats>,
    up: bool,
) -> Option<[JoinHandle<()>; 2]> {
    let (spin, rt_priority) = (cfg.spin, cfg.rt_priority);
    let (reader_from, writer_to, writer_from) = (
        from.try_clone().ok()?,
        to.try_clone().ok()?,
        from.try_clone().ok()?,
    );
    let (tx, rx) = channel();
    let stats_r = Arc::clone(stats);
    let reader = thread::Builder::new()
        .name("netem-read".into())
        .spawn(move || read_side(reader_from, line, epoch, tx, &stats_r, up))
        .ok()?;
    let writer = thread::Builder::new()
        .name("netem-write".into())
        .spawn(move || write_side(writer_to, writer_from, rx, spin, rt_priority))
        .ok()?;
    Some([reader, writer])
}

fn read_side(
    mut from: TcpStream,
    mut line: DelayLine,
    epoch: Instant,
    tx: Sender<Chunk>,
    stats: &PathStats,
    up: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let at = |line: &mut DelayLine, arrival: Instant| {
        let ns = arrival.saturating_duration_since(epoch).as_nanos() as u64;
        epoch + Duration::from_nanos(line.departure(ns))
    };
    let before = line.stats;
    loop {
        match read_stamped(&mut from, &mut buf) {
            Ok((0, _)) | Err(_) => {
                let now = Instant::now();
                // The close keeps its place in the line: after every chunk before it.
                let _ = tx.send(Chunk::End(at(&mut line, now)));
                break;
            }
            Ok((n, arrival)) => {
                let departure = at(&mut line, arrival);
                let bytes = if up {
                    &stats.bytes_up
                } else {
                    &stats.bytes_down
                };
                bytes.fetch_add(n as u64, Ordering::Relaxed);
                if tx.send(Chunk::Data(departure, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    let s = line.stats;
    stats
        .chunks
        .fetch_add(s.chunks - before.chunks, Ordering::Relaxed);
    stats
        .bursts
        .fetch_add(s.bursts - before.bursts, Ordering::Relaxed);
    stats
        .held_for_order
        .fetch_add(s.held_for_order - before.held_for_order, Ordering::Relaxed);
}

fn write_side(
    mut to: TcpStream,
    from: TcpStream,
    rx: Receiver<Chunk>,
    spin: Duration,
    rt_priority: u8,
) {
    set_timer_slack();
    if rt_priority > 0 {
        set_fifo(rt_priority);
    }
    let sleeper = SpinSleeper::new(u32::try_from(spin.as_nanos()).unwrap_or(u32::MAX))
        .with_spin_strategy(SpinStrategy::SpinLoopHint);
    for chunk in rx {
        match chunk {
            Chunk::Data(departure, bytes) => {
                sleeper.sleep_until(departure);
                if to.write_all(&bytes).is_err() {
                    // The destination is gone: end both ways.
                    let _ = to.shutdown(Shutdown::Both);
                    let _ = from.shutdown(Shutdown::Both);
                    return;
                }
            }
            Chunk::End(departure) => {
                sleeper.sleep_until(departure);
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
        }
    }
}

/// Timer slack 1 ns for this thread (Linux), so native sleeps wake when asked.
fn set_timer_slack() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_TIMERSLACK takes one integer and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

/// `SCHED_FIFO` for this thread, if permitted.
fn set_fifo(priority: u8) {
    #[cfg(target_os = "linux")]
    {
        static WARNED: AtomicBool = AtomicBool::new(false);
        let param = libc::sched_param {
            sched_priority: libc::c_int::from(priority),
        };
        // SAFETY: sets this thread's own policy from a valid sched_param.
        let rc =
            unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
        if rc != 0 && !WARNED.swap(true, Ordering::Relaxed) {
            warn!(
                "SCHED_FIFO {priority} refused ({}); writers on the normal scheduler",
                io::Error::from_raw_os_error(rc)
            );
        }
    }
}

fn enable_timestamps(_s: &TcpStream) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let on: libc::c_int = 1;
        // SAFETY: setsockopt on a valid descriptor with a c_int that outlives the call.
        unsafe {
            libc::setsockopt(
                _s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Reads what is there and when it reached the socket (the kernel's timestamp, converted to
/// this process's monotonic clock through its age; now if the kernel gave none).
fn read_stamped(s: &mut TcpStream, buf: &mut [u8]) -> io::Result<(usize, Instant)> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut control = [0u64; 8];
        // SAFETY: a zeroed msghdr is a valid empty header; it is filled in below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        let n = loop {
            // SAFETY: every pointer in msg refers to a live buffer of the stated length.
            let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, 0) };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let now = Instant::now();
        let mut rx_unix_ns = None;
        // SAFETY: the CMSG macros walk the control buffer the kernel just filled, within
        // msg_controllen; SCM_TIMESTAMPNS carries a timespec.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    rx_unix_ns = Some(ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128);
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let arrival = match rx_unix_ns {
            Some(rx) => {
                let unix_now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as i128);
                let age = (unix_now - rx).clamp(0, 1_000_000_000) as u64;
                now.checked_sub(Duration::from_nanos(age)).unwrap_or(now)
            }
            None => now,
        };
        Ok((n, arrival))
    }
    #[cfg(not(target_os = "linux"))]
    {
        use std::io::Read;
        let n = s.read(buf)?;
        Ok((n, Instant::now()))
    }
}

/// Starts every path and prints one line for each, so that scripts can find the ports.
pub fn spawn_all(paths: Vec<PathConfig>) -> Result<Vec<PathHandle>, NetemError> {
    let mut handles = Vec::new();
    for cfg in paths {
        let line = format!(
            "conductor-netem: {} → {} ({}: {})",
            cfg.listen, cfg.upstream, cfg.name, cfg.profile
        );
        let h = spawn(cfg)?;
        info!("{line}");
        println!(
            "conductor-netem: {} → {}",
            h.local_addr(),
            line.split_once(" → ").map_or("", |(_, r)| r)
        );
        handles.push(h);
    }
    let _ = io::stdout().flush();
    Ok(handles)
}
