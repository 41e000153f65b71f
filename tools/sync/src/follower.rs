//! A conductor client on a thread of its own: it connects, measures the clock, follows the
//! timeline, reconnects, and publishes what it knows for other threads to read.
//!
//! This module owns the connection (a WebSocket on a `mio` poll, with the kernel's receive
//! timestamps where the platform has them) and the ping schedule. It makes no musical
//! decisions: what to play when is the reader's business, from the [`SyncState`] it publishes.
//!
//! The ping schedule (`docs/protocol.md#clock-sync`): one every 100 ms for the first 10 s of a
//! connection, then one every 250 ms; 10 and 4 messages a second, inside the server's default
//! limit of 20.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info, warn};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

use crate::clock::{LocalClock, RealClock};
use crate::error::SyncError;
use crate::estimator::{ClockSync, ClockSyncConfig};
use crate::state::{StatePublisher, SyncReader, SyncState, channel as state_channel};
use crate::timeline::{Quantize, Timeline, Transport};

const SOCKET: Token = Token(0);
const WAKER: Token = Token(1);

/// How a [`Follower`] connects and measures.
#[derive(Clone)]
pub struct FollowerConfig {
    /// `ws://HOST:PORT/PATH` of a conductor server (`/ws`).
    pub url: String,
    /// The control token, if the server asks for one to change tempo or transport.
    pub token: Option<String>,
    /// This device's clock.
    pub clock: Arc<dyn LocalClock>,
    pub sync: ClockSyncConfig,
    /// Pings this far apart for the first `fast_pings_for` of each connection...
    pub fast_ping_interval: Duration,
    pub fast_pings_for: Duration,
    /// ...and this far apart after.
    pub ping_interval: Duration,
    /// Reconnect backoff: from `min_backoff`, doubling to `max_backoff`, with jitter.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Connecting and the handshake together.
    pub connect_timeout: Duration,
    /// With nothing at all from the server for this long (not even a pong), the connection is
    /// taken for dead and opened again.
    pub silence_timeout: Duration,
    /// For log lines.
    pub name: String,
}

impl FollowerConfig {
    /// The defaults of `docs/protocol.md#clock-sync`, on this process's monotonic clock.
    pub fn new(url: impl Into<String>) -> FollowerConfig {
        FollowerConfig {
            url: url.into(),
            token: None,
            clock: Arc::new(RealClock),
            sync: ClockSyncConfig::default(),
            fast_ping_interval: Duration::from_millis(100),
            fast_pings_for: Duration::from_secs(10),
            ping_interval: Duration::from_millis(250),
            min_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            silence_timeout: Duration::from_secs(5),
            name: "conductor-sync".into(),
        }
    }
}

/// What the server said on connect (`hello`).
#[derive(Clone, Debug, PartialEq)]
pub struct Hello {
    pub bpm: f64,
    pub ppqn: u32,
    pub beats_per_bar: u32,
    pub min_bpm: f64,
    pub max_bpm: f64,
    pub playing: bool,
    /// Whether this connection may change tempo and transport.
    pub control: bool,
    pub token_required: bool,
    pub version: String,
}

/// An `error` event from the server: it refused something this client sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerError {
    pub code: String,
    pub message: String,
}

enum Command {
    Send(String),
}

#[derive(Default)]
struct Info {
    state: Option<SyncState>,
    hello: Option<Hello>,
    last_error: Option<ServerError>,
    ended: Option<String>,
}

struct Shared {
    stop: AtomicBool,
    info: Mutex<Info>,
    changed: Condvar,
}

impl Shared {
    fn info(&self) -> MutexGuard<'_, Info> {
        // A panic elsewhere while holding it leaves plain data behind: keep using it.
        self.info.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running client. Dropping it closes the connection and joins the thread.
pub struct Follower {
    reader: SyncReader,
    shared: Arc<Shared>,
    commands: Sender<Command>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

/// Where to connect: checked once, resolved on every attempt.
#[derive(Clone, Debug)]
struct Target {
    host_port: String,
    request_url: String,
}

fn target(url: &str, token: Option<&str>) -> Result<Target, SyncError> {
    let bad = || SyncError::BadUrl(url.to_string());
    let rest = url.strip_prefix("ws://").ok_or_else(bad)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/ws"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(bad());
    }
    let host_port = if authority
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && !h.ends_with(':') && p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let mut request_url = format!("ws://{authority}{path}");
    if let Some(token) = token {
        request_url.push(if path.contains('?') { '&' } else { '?' });
        request_url.push_str("token=");
        request_url.push_str(&percent_encode(token));
    }
    Ok(Target {
        host_port,
        request_url,
    })
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Follower {
    /// Starts the thread; it connects at once and keeps reconnecting until dropped. Fails only
    /// for a URL that can never work or a thread that cannot start.
    pub fn start(cfg: FollowerConfig) -> Result<Follower, SyncError> {
        let target = target(&cfg.url, cfg.token.as_deref())?;
        let poll = Poll::new().map_err(SyncError::Spawn)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(SyncError::Spawn)?);
        let (publisher, reader) = state_channel();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            info: Mutex::new(Info::default()),
            changed: Condvar::new(),
        });
        let (commands, inbox) = channel();
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(cfg.name.clone())
                .spawn(move || {
                    let sync = ClockSync::new(cfg.sync);
                    let mut run = Run {
                        cfg,
                        target,
                        poll,
                        events: Events::with_capacity(16),
                        publisher,
                        shared,
                        inbox,
                        sync,
                        state: SyncState::EMPTY,
                        pending: VecDeque::new(),
                    };
                    run.follow();
                })
                .map_err(SyncError::Spawn)?
        };
        Ok(Follower {
            reader,
            shared,
            commands,
            waker,
            thread: Some(thread),
        })
    }

    /// A reader for a real-time thread: [`SyncReader::load`] never locks or allocates.
    pub fn reader(&self) -> SyncReader {
        self.reader.clone()
    }

    /// The latest state.
    pub fn state(&self) -> SyncState {
        self.reader.load()
    }

    /// Blocks until a timeline and a clock mapping are known (for a non-real-time caller).
    pub fn wait_synced(&self, timeout: Duration) -> Result<SyncState, SyncError> {
        self.wait_until(timeout, SyncState::is_synced)
    }

    /// Blocks until the state satisfies `ready`, or `timeout` passes.
    pub fn wait_until(
        &self,
        timeout: Duration,
        ready: impl Fn(&SyncState) -> bool,
    ) -> Result<SyncState, SyncError> {
        let until = Instant::now() + timeout;
        let mut info = self.shared.info();
        loop {
            if let Some(s) = info.state
                && ready(&s)
            {
                return Ok(s);
            }
            if let Some(why) = &info.ended {
                return Err(SyncError::Stopped(why.clone()));
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SyncError::Timeout(timeout));
            }
            info = self
                .shared
                .changed
                .wait_timeout(info, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The server's `hello` on the current (or last) connection.
    pub fn hello(&self) -> Option<Hello> {
        self.shared.info().hello.clone()
    }

    /// The last `error` the server answered with.
    pub fn last_server_error(&self) -> Option<ServerError> {
        self.shared.info().last_error.clone()
    }

    fn send(&self, text: String) -> Result<(), SyncError> {
        if !self.reader.load().connected {
            return Err(SyncError::NotConnected);
        }
        self.commands
            .send(Command::Send(text))
            .map_err(|_| SyncError::Stopped("the follower thread has ended".into()))?;
        self.waker
            .wake()
            .map_err(|e| SyncError::Stopped(e.to_string()))
    }

    /// Asks the server for a new tempo (needs control; a refusal shows up in
    /// [`Self::last_server_error`]).
    pub fn send_set_bpm(&self, bpm: f64) -> Result<(), SyncError> {
        self.send(json!({"event": "setBpm", "data": bpm}).to_string())
    }

    /// Asks the server to start the transport, quantised as given.
    pub fn send_start(&self, quantize: Quantize) -> Result<(), SyncError> {
        self.send(json!({"event": "start", "data": {"quantize": quantize.label()}}).to_string())
    }

    /// Asks the server to stop the transport.
    pub fn send_stop(&self) -> Result<(), SyncError> {
        self.send(json!({"event": "stop"}).to_string())
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP stream whose reads remember the kernel's receive timestamp (Linux: `SO_TIMESTAMPNS`),
/// so that a pong's arrival is when it reached the socket, not when this thread got to it.
struct TsStream {
    sock: TcpStream,
    /// Unix ns of the data read last, if the kernel said.
    rx_unix_ns: Option<i64>,
}

impl TsStream {
    fn new(sock: TcpStream) -> TsStream {
        let _ = sock.set_nodelay(true);
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let on: libc::c_int = 1;
            // SAFETY: setsockopt on a valid descriptor with a c_int that outlives the call.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_TIMESTAMPNS,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        TsStream {
            sock,
            rx_unix_ns: None,
        }
    }
}

impl Read for TsStream {
    #[cfg(target_os = "linux")]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        self.rx_unix_ns = None;
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
        // SAFETY: every pointer in msg refers to a live buffer of the stated length.
        let n = unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the CMSG macros walk the control buffer the kernel just filled, within
        // msg_controllen; SCM_TIMESTAMPNS carries a timespec.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    self.rx_unix_ns = Some(ts.tv_sec * 1_000_000_000 + ts.tv_nsec);
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        Ok(n as usize)
    }

    #[cfg(not(target_os = "linux"))]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.rx_unix_ns = None;
        self.sock.read(buf)
    }
}

impl Write for TsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

fn unix_now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Why a session ended.
enum End {
    /// Drop asked for it.
    Stopped,
    /// The connection failed or closed; the reason, for the log.
    Lost(String),
}

struct Run {
    cfg: FollowerConfig,
    target: Target,
    poll: Poll,
    events: Events,
    publisher: StatePublisher,
    shared: Arc<Shared>,
    inbox: Receiver<Command>,
    sync: ClockSync,
    state: SyncState,
    /// Pings on their way: the `t0` as sent (ms) and as measured (ns).
    pending: VecDeque<(f64, i64)>,
}

impl Run {
    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::Relaxed)
    }

    fn publish(&mut self) {
        self.state.version += 1;
        self.publisher.publish(&self.state);
        self.shared.info().state = Some(self.state);
        self.shared.changed.notify_all();
    }

    fn follow(&mut self) {
        let mut attempt: u32 = 0;
        loop {
            let (end, opened) = self.session();
            self.pending.clear();
            if self.state.connected {
                self.state.connected = false;
                self.publish();
            }
            if opened {
                attempt = 0;
            }
            if matches!(end, End::Stopped) || self.stopping() {
                break;
            }
            let reason = match end {
                End::Lost(r) => r,
                End::Stopped => unreachable!(),
            };
            self.sync.reset_path();
            let ceiling = self
                .cfg
                .min_backoff
                .saturating_mul(1u32 << attempt.min(16))
                .min(self.cfg.max_backoff);
            attempt = attempt.saturating_add(1);
            let jitter = (RealClock.now_ns() as u64 % 1000) as f64 / 1000.0;
            let delay = ceiling.mul_f64(0.5 + 0.5 * jitter);
            let kept = if self.state.timeline.is_some() {
                "keeping the last timeline and clock"
            } else {
                "no timeline yet"
            };
            warn!(
                "{}: {} ({reason}); {kept}; reconnecting in {:.2} s",
                self.cfg.name,
                self.cfg.url,
                delay.as_secs_f64()
            );
            if self.idle(delay) {
                break;
            }
        }
        let mut info = self.shared.info();
        info.ended = Some("stopped".into());
        drop(info);
        self.shared.changed.notify_all();
    }

    /// Waits `delay` unless stopped (true). Commands meanwhile cannot be sent.
    fn idle(&mut self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        loop {
            if self.stopping() {
                return true;
            }
            self.discard_commands();
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let _ = self.poll.poll(&mut self.events, Some(left));
        }
    }

    fn discard_commands(&mut self) {
        while let Ok(Command::Send(text)) = self.inbox.try_recv() {
            warn!("{}: not connected; dropped {text}", self.cfg.name);
        }
    }

    /// Waits for readiness until `deadline`; true when stopping.
    fn wait(&mut self, deadline: Instant) -> io::Result<bool> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.poll.poll(&mut self.events, Some(left)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        Ok(self.stopping())
    }

    /// One connection, from connect to close. Returns why it ended and whether it opened.
    fn session(&mut self) -> (End, bool) {
        let addr: SocketAddr = match self.target.host_port.to_socket_addrs() {
            Ok(mut addrs) => match addrs.next() {
                Some(a) => a,
                None => {
                    return (
                        End::Lost(format!("{} has no address", self.target.host_port)),
                        false,
                    );
                }
            },
            Err(e) => {
                return (
                    End::Lost(format!("cannot resolve {}: {e}", self.target.host_port)),
                    false,
                );
            }
        };
        let deadline = Instant::now() + self.cfg.connect_timeout;
        let mut sock = match TcpStream::connect(addr) {
            Ok(s) => s,
            Err(e) => return (End::Lost(format!("connect: {e}")), false),
        };
        if let Err(e) = self.poll.registry().register(
            &mut sock,
            SOCKET,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            return (End::Lost(format!("poll: {e}")), false);
        }
        // Non-blocking connect: writable means done, one way or the other.
        loop {
            match self.wait(deadline) {
                Ok(true) => return (End::Stopped, false),
                Ok(false) => {}
                Err(e) => return (End::Lost(format!("poll: {e}")), false),
            }
            if let Ok(Some(e)) | Err(e) = sock.take_error() {
                return (End::Lost(format!("connect: {e}")), false);
            }
            match sock.peer_addr() {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(e) => return (End::Lost(format!("connect: {e}")), false),
            }
            if Instant::now() >= deadline {
                return (End::Lost("connect timed out".into()), false);
            }
        }
        let request = match self.target.request_url.as_str().into_client_request() {
            Ok(r) => r,
            Err(e) => return (End::Lost(format!("request: {e}")), false),
        };
        let config = WebSocketConfig::default()
            .read_buffer_size(16 * 1024)
            .max_message_size(Some(1 << 20));
        let mut handshake =
            tungstenite::client::client_with_config(request, TsStream::new(sock), Some(config));
        let mut ws = loop {
            match handshake {
                Ok((ws, _)) => break ws,
                Err(HandshakeError::Interrupted(mid)) => {
                    match self.wait(deadline) {
                        Ok(true) => return (End::Stopped, false),
                        Ok(false) => {}
                        Err(e) => return (End::Lost(format!("poll: {e}")), false),
                    }
                    if Instant::now() >= deadline {
                        return (End::Lost("handshake timed out".into()), false);
                    }
                    handshake = mid.handshake();
                }
                Err(HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
                    return (
                        End::Lost(format!(
                            "the server refused the upgrade: HTTP {}",
                            resp.status()
                        )),
                        false,
                    );
                }
                Err(HandshakeError::Failure(e)) => {
                    return (End::Lost(format!("handshake: {e}")), false);
                }
            }
        };
        let end = self.open(&mut ws);
        let _ = self.poll.registry().deregister(&mut ws.get_mut().sock);
        (end, true)
    }

    fn open(&mut self, ws: &mut WebSocket<TsStream>) -> End {
        self.state.connects += 1;
        self.state.connected = true;
        self.publish();
        info!("{}: connected to {}", self.cfg.name, self.cfg.url);
        let opened = Instant::now();
        let mut next_ping = opened;
        let mut last_heard = opened;
        loop {
            if self.stopping() {
                let _ = ws.close(None);
                let _ = ws.flush();
                return End::Stopped;
            }
            let now = Instant::now();
            if now >= next_ping {
                if let Err(e) = self.ping(ws) {
                    return End::Lost(e);
                }
                let every = if now.duration_since(opened) < self.cfg.fast_pings_for {
                    self.cfg.fast_ping_interval
                } else {
                    self.cfg.ping_interval
                };
                next_ping += every;
                if next_ping <= now {
                    next_ping = now + every;
                }
            }
            let silent_until = last_heard + self.cfg.silence_timeout;
            if now >= silent_until {
                return End::Lost(format!(
                    "nothing from the server for {:.1} s",
                    self.cfg.silence_timeout.as_secs_f64()
                ));
            }
            match self.wait(next_ping.min(silent_until)) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => return End::Lost(format!("poll: {e}")),
            }
            while let Ok(Command::Send(text)) = self.inbox.try_recv() {
                if let Err(e) = ws.send(Message::text(text))
                    && !would_block(&e)
                {
                    return End::Lost(format!("send: {e}"));
                }
            }
            match ws.flush() {
                Ok(()) => {}
                Err(e) if would_block(&e) => {}
                Err(e) => return End::Lost(format!("write: {e}")),
            }
            loop {
                match ws.read() {
                    Ok(Message::Text(text)) => {
                        last_heard = Instant::now();
                        let t3 = self.arrival(ws.get_ref().rx_unix_ns);
                        self.message(&text, t3);
                    }
                    Ok(_) => last_heard = Instant::now(),
                    Err(e) if would_block(&e) => break,
                    Err(
                        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                    ) => {
                        return End::Lost("closed by the server".into());
                    }
                    Err(tungstenite::Error::Protocol(
                        tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                    )) => return End::Lost("the connection was reset".into()),
                    Err(e) => return End::Lost(format!("read: {e}")),
                }
            }
        }
    }

    /// This device's clock at the moment data that arrived at `rx_unix_ns` reached the socket:
    /// now, less the data's age on the wall clock.
    fn arrival(&self, rx_unix_ns: Option<i64>) -> i64 {
        let now = self.cfg.clock.now_ns();
        match rx_unix_ns {
            Some(rx) => now - (unix_now_ns() - rx).clamp(0, 1_000_000_000),
            None => now,
        }
    }

    fn ping(&mut self, ws: &mut WebSocket<TsStream>) -> Result<(), String> {
        let t0 = self.cfg.clock.now_ns();
        let t0_ms = t0 as f64 / 1e6;
        let text = json!({"event": "ping", "data": {"t0": t0_ms}}).to_string();
        self.pending.push_back((t0_ms, t0));
        while self.pending.len() > 64 {
            self.pending.pop_front();
        }
        match ws.send(Message::text(text)) {
            Ok(()) => Ok(()),
            Err(e) if would_block(&e) => Ok(()),
            Err(e) => Err(format!("send: {e}")),
        }
    }

    fn message(&mut self, text: &str, t3: i64) {
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            debug!("{}: not JSON: {text:.80}", self.cfg.name);
            return;
        };
        let data = v.get("data").unwrap_or(&Value::Null);
        match v.get("event").and_then(Value::as_str) {
            Some("pong") => self.pong(data, t3),
            Some("timeline") => match Timeline::from_event(data) {
                Ok(t) => {
                    self.state.timeline = Some(match self.state.timeline {
                        Some(old) => old.followed_by(t),
                        None => t,
                    });
                    self.publish();
                }
                Err(e) => warn!("{}: {e}", self.cfg.name),
            },
            Some("hello") => {
                let num = |k: &str, d: f64| data.get(k).and_then(Value::as_f64).unwrap_or(d);
                let hello = Hello {
                    bpm: num("bpm", 120.0),
                    ppqn: num("ppqn", 4.0) as u32,
                    beats_per_bar: num("beats_per_bar", 4.0) as u32,
                    min_bpm: num("min_bpm", 60.0),
                    max_bpm: num("max_bpm", 200.0),
                    playing: data.get("playing").and_then(Value::as_bool).unwrap_or(true),
                    control: data.get("control").and_then(Value::as_bool).unwrap_or(true),
                    token_required: data
                        .get("token_required")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                    version: data
                        .get("version")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                };
                self.shared.info().hello = Some(hello);
                self.shared.changed.notify_all();
            }
            Some("error") => {
                let s = |k: &str| {
                    data.get(k)
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string()
                };
                let err = ServerError {
                    code: s("code"),
                    message: s("message"),
                };
                warn!(
                    "{}: the server refused: {} ({})",
                    self.cfg.name, err.message, err.code
                );
                self.shared.info().last_error = Some(err);
            }
            // A server that announces a transport change without a new timeline (conductor
            // always sends one after): the transport alone changes.
            Some("transport") => {
                if let (Some(old), Ok(t)) = (self.state.timeline, Transport::from_event(data)) {
                    self.state.timeline = Some(old.with_transport(t));
                    self.publish();
                }
            }
            // A timeline follows every tempo change; ticks are for display.
            _ => {}
        }
    }

    fn pong(&mut self, data: &Value, t3: i64) {
        let f = |k: &str| data.get(k).and_then(Value::as_f64);
        let (Some(t0_ms), Some(t1), Some(t2)) = (f("t0"), f("t1"), f("t2")) else {
            return;
        };
        let Some(i) = self
            .pending
            .iter()
            .position(|(sent, _)| sent.to_bits() == t0_ms.to_bits())
        else {
            return;
        };
        let (_, t0) = self.pending.remove(i).unwrap_or_default();
        let ms_to_ns = |ms: f64| (ms * 1e6).round() as i64;
        if let Some(m) = self.sync.add_sample(t0, ms_to_ns(t1), ms_to_ns(t2), t3) {
            self.state.mapping = Some(m);
            self.publish();
        }
    }
}

fn would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_tokens_encoded() {
        let t = target("ws://127.0.0.1:3000/ws", Some("a b&c")).unwrap();
        assert_eq!(t.host_port, "127.0.0.1:3000");
        assert_eq!(t.request_url, "ws://127.0.0.1:3000/ws?token=a%20b%26c");
        let t = target("ws://example.org", None).unwrap();
        assert_eq!(t.host_port, "example.org:80");
        assert_eq!(t.request_url, "ws://example.org/ws");
        let t = target("ws://[::1]:4000/ws?x=1", Some("k")).unwrap();
        assert_eq!(t.host_port, "[::1]:4000");
        assert_eq!(t.request_url, "ws://[::1]:4000/ws?x=1&token=k");
        for bad in ["http://h:1/ws", "wss://h/ws", "ws://", "h:1", "ws://u@h/ws"] {
            let err = target(bad, None).unwrap_err();
            assert!(err.to_string().contains("ws://"), "{bad}: {err}");
        }
    }

    #[test]
    fn an_unreachable_server_is_retried_and_wait_times_out() {
        // A port nobody listens on: bind, learn it, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cfg = FollowerConfig::new(format!("ws://127.0.0.1:{port}/ws"));
        cfg.min_backoff = Duration::from_millis(10);
        let f = Follower::start(cfg).unwrap();
        let err = f.wait_synced(Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, SyncError::Timeout(_)), "{err}");
        assert!(!f.state().connected);
        assert!(matches!(
            f.send_set_bpm(120.0),
            Err(SyncError::NotConnected)
        ));
        drop(f); // joins promptly
    }
}
