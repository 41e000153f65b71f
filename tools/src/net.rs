//! The probe's connections: many non-blocking WebSocket clients on one `mio::Poll` per thread.
//!
//! Every socket asks the kernel for receive timestamps (`SO_TIMESTAMPNS`), and every read goes
//! through `recvmsg`, so a tick's arrival time is when its bytes reached the socket, not when
//! this thread got round to reading them. That keeps the probe's own processing out of the
//! numbers even with tens of thousands of connections on one core.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::ClientHandshake;
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

use crate::metrics::{Arrival, ConnTrack, Recorder, TickChoice};
use crate::wire::{self, EnginePacket, Event, TickFields};

/// Which protocol the server speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `{"event":"tick","data":{...}}` over a plain WebSocket.
    Plain,
    /// Socket.IO v4 (Engine.IO v4) over its websocket transport.
    SocketIo,
}

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    /// `ws://host:port/path?query` for the handshake request.
    pub url: String,
    pub mode: Mode,
    /// The ticks asked for with `?ticks=` (`all` when not asked): what counts as a gap.
    pub ticks: TickChoice,
}

/// Live figures a thread publishes for the progress line.
#[derive(Default)]
pub struct Gauges {
    pub connected: AtomicU64,
    pub ticks: AtomicU64,
    pub failed: AtomicU64,
    pub p99_ns: AtomicU64,
}

/// What the main thread and the probe threads share.
#[derive(Default)]
pub struct Shared {
    /// Ticks count only while this is set.
    pub measuring: AtomicBool,
    pub stop: AtomicBool,
    pub gauges: Vec<Gauges>,
}

/// One thread's results.
#[derive(Default)]
pub struct ThreadResult {
    pub rec: Recorder,
    /// One per connection that completed its handshake.
    pub tracks: Vec<ConnTrack>,
    /// Connections that never became clients, by reason.
    pub failures: BTreeMap<String, u64>,
    /// Connections the server ended, by close code (or "reset").
    pub closes: BTreeMap<String, u64>,
    /// Text messages of any kind received while measuring (ticks, timelines, hellos…).
    pub messages: u64,
    /// Pings received while measuring (WebSocket ping frames, or Engine.IO `2`), all answered.
    pub pings: u64,
}

/// A TCP stream whose reads also return the kernel's receive timestamp.
pub struct TsStream {
    sock: TcpStream,
    /// Unix ns of the data most recently read.
    last_rx_ns: Option<i64>,
}

fn wall_now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

impl TsStream {
    fn new(sock: TcpStream) -> TsStream {
        let on: libc::c_int = 1;
        // SAFETY: setsockopt with a valid fd and a c_int option value that outlives the call.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                &on as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        let _ = sock.set_nodelay(true);
        TsStream {
            sock,
            last_rx_ns: None,
        }
    }

    /// The arrival time of the data read last: the kernel's, or now if it gave none.
    fn arrival_ns(&self) -> i64 {
        self.last_rx_ns.unwrap_or_else(wall_now_ns)
    }
}

impl Read for TsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // A read without a timestamp must not inherit the previous one.
        self.last_rx_ns = None;
        let mut control = [0u64; 16];
        // SAFETY: msghdr is plain data; zeroed is a valid empty header we then fill in.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: every pointer in `msg` refers to live buffers of the stated lengths.
        let n = unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the CMSG macros walk the control buffer the kernel just filled, within
        // msg_controllen; SCM_TIMESTAMPNS carries a timespec.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET
                    && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS
                {
                    let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                    self.last_rx_ns = Some(ts.tv_sec * 1_000_000_000 + ts.tv_nsec);
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        Ok(n as usize)
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

enum Phase {
    Waiting,
    Connecting(TcpStream),
    Handshaking(MidHandshake<ClientHandshake<TsStream>>),
    Open(Box<WebSocket<TsStream>>),
    Done,
}

struct Conn {
    phase: Phase,
    source: Option<Ipv4Addr>,
    started: Instant,
    /// Ticks per quarter note, from the server's hello (4 until told otherwise).
    ppqn: u32,
    /// Beats per bar, from the server's hello (4 until told otherwise).
    beats_per_bar: u32,
    /// Socket.IO: the namespace connect was acknowledged.
    joined: bool,
    track: ConnTrack,
    counted_connected: bool,
}

/// Options for a probe thread.
#[derive(Clone, Copy, Debug)]
pub struct ThreadOptions {
    /// Connections in the middle of connecting at once.
    pub connect_batch: usize,
    pub handshake_timeout: Duration,
}

fn ws_config() -> WebSocketConfig {
    // Ticks are ~100 bytes; the 128 KiB default buffer per connection would cost gigabytes.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// Opens a non-blocking connection, from `source` when given (to spread many connections over
/// several loopback addresses and their ephemeral ports).
fn connect(addr: SocketAddr, source: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let (Some(src), SocketAddr::V4(dst)) = (source, addr) else {
        return TcpStream::connect(addr);
    };
    // SAFETY: plain socket calls on a descriptor we create and own; the address structs outlive
    // the calls that read them.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let stream = std::net::TcpStream::from_raw_fd(fd);
        let sin = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        let local = sin(src, 0);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::bind(fd, &local as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(io::Error::last_os_error());
        }
        let remote = sin(*dst.ip(), dst.port());
        if libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len) != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(e);
            }
        }
        Ok(TcpStream::from_std(stream))
    }
}

fn bump(map: &mut BTreeMap<String, u64>, key: String) {
    *map.entry(key).or_insert(0) += 1;
}

/// Runs `sources.len()` connections until `shared.stop`.
pub fn run_thread(
    target: &Target,
    sources: Vec<Option<Ipv4Addr>>,
    shared: &Arc<Shared>,
    index: usize,
    opts: ThreadOptions,
) -> io::Result<ThreadResult> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(4096);
    let now = Instant::now();
    let mut conns: Vec<Conn> = sources
        .into_iter()
        .map(|source| Conn {
            phase: Phase::Waiting,
            source,
            started: now,
            ppqn: 4,
            beats_per_bar: 4,
            joined: false,
            track: ConnTrack::with_stride(target.ticks.stride(4, 4)),
            counted_connected: false,
        })
        .collect();
    let mut waiting: VecDeque<usize> = (0..conns.len()).collect();
    let mut in_flight = 0usize;
    let mut result = ThreadResult::default();
    let gauges = &shared.gauges[index];
    let mut ticks = 0u64;
    let mut last_publish = Instant::now();
    let mut ctx = Ctx {
        target,
        shared,
        gauges,
        rec: &mut result.rec,
        failures: &mut result.failures,
        closes: &mut result.closes,
        ticks: &mut ticks,
        messages: &mut result.messages,
        pings: &mut result.pings,
    };

    while !shared.stop.load(Ordering::Relaxed) {
        while in_flight < opts.connect_batch {
            let Some(i) = waiting.pop_front() else { break };
            let conn = &mut conns[i];
            conn.started = Instant::now();
            match connect(target.addr, conn.source) {
                Ok(mut sock) => {
                    poll.registry().register(
                        &mut sock,
                        Token(i),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    conn.phase = Phase::Connecting(sock);
                    in_flight += 1;
                }
                Err(e) => ctx.fail(conn, format!("connect: {e}")),
            }
        }
        match poll.poll(&mut events, Some(Duration::from_millis(100))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for event in events.iter() {
            let Some(conn) = conns.get_mut(event.token().0) else {
                continue;
            };
            let was_in_flight = conn.in_flight();
            ctx.drive(conn);
            if was_in_flight && !conn.in_flight() {
                in_flight -= 1;
            }
        }
        let now = Instant::now();
        for conn in conns.iter_mut() {
            if conn.in_flight() && now.duration_since(conn.started) > opts.handshake_timeout {
                ctx.fail(conn, "timeout: no WebSocket handshake in time".into());
                in_flight -= 1;
            }
        }
        if now.duration_since(last_publish) >= Duration::from_millis(500) {
            last_publish = now;
            gauges.ticks.store(*ctx.ticks, Ordering::Relaxed);
            gauges
                .p99_ns
                .store(ctx.rec.jitter.value_at_quantile(0.99), Ordering::Relaxed);
        }
    }
    gauges.ticks.store(ticks, Ordering::Relaxed);
    for conn in conns.iter_mut() {
        if let Phase::Open(ws) = &mut conn.phase {
            let _ = ws.close(None);
            let _ = ws.flush();
        }
        if conn.counted_connected {
            result.tracks.push(std::mem::take(&mut conn.track));
        }
    }
    Ok(result)
}

impl Conn {
    fn in_flight(&self) -> bool {
        match self.phase {
            Phase::Connecting(_) | Phase::Handshaking(_) => true,
            Phase::Open(_) => !self.counted_connected,
            Phase::Waiting | Phase::Done => false,
        }
    }
}

/// What `drive` needs besides the connection.
struct Ctx<'a> {
    target: &'a Target,
    shared: &'a Shared,
    gauges: &'a Gauges,
    rec: &'a mut Recorder,
    failures: &'a mut BTreeMap<String, u64>,
    closes: &'a mut BTreeMap<String, u64>,
    ticks: &'a mut u64,
    messages: &'a mut u64,
    pings: &'a mut u64,
}

impl Ctx<'_> {
    fn fail(&mut self, conn: &mut Conn, reason: String) {
        bump(self.failures, reason);
        self.gauges.failed.fetch_add(1, Ordering::Relaxed);
        conn.phase = Phase::Done;
    }

    fn joined(&mut self, conn: &mut Conn) {
        if !conn.counted_connected {
            conn.counted_connected = true;
            self.gauges.connected.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn ended(&mut self, conn: &mut Conn, why: String) {
        if conn.counted_connected {
            bump(self.closes, why);
            self.gauges.connected.fetch_sub(1, Ordering::Relaxed);
        } else {
            self.fail(conn, why);
        }
        conn.phase = Phase::Done;
    }

    fn drive(&mut self, conn: &mut Conn) {
        loop {
            match std::mem::replace(&mut conn.phase, Phase::Done) {
                Phase::Connecting(sock) => {
                    if let Ok(Some(e)) | Err(e) = sock.take_error() {
                        return self.fail(conn, format!("connect: {e}"));
                    }
                    match sock.peer_addr() {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                            conn.phase = Phase::Connecting(sock);
                            return;
                        }
                        Err(e) => return self.fail(conn, format!("connect: {e}")),
                    }
                    let request = match self.target.url.as_str().into_client_request() {
                        Ok(r) => r,
                        Err(e) => return self.fail(conn, format!("request: {e}")),
                    };
                    let stream = TsStream::new(sock);
                    conn.phase = handshake_result(
                        tungstenite::client::client_with_config(request, stream, Some(ws_config())),
                        self,
                        conn,
                    );
                }
                Phase::Handshaking(mid) => {
                    conn.phase = handshake_result(mid.handshake(), self, conn);
                }
                Phase::Open(mut ws) => {
                    let alive = self.read_open(conn, &mut ws);
                    if alive {
                        conn.phase = Phase::Open(ws);
                    }
                    return;
                }
                other => {
                    conn.phase = other;
                    return;
                }
            }
            if !matches!(conn.phase, Phase::Open(_)) {
                return;
            }
        }
    }

    /// Reads everything available; false when the connection ended.
    fn read_open(&mut self, conn: &mut Conn, ws: &mut WebSocket<TsStream>) -> bool {
        loop {
            match ws.read() {
                Ok(Message::Text(text)) => {
                    let at_ns = ws.get_ref().arrival_ns();
                    if self.measuring() {
                        *self.messages += 1;
                    }
                    if !self.on_text(conn, ws, &text, at_ns) {
                        return false;
                    }
                }
                // tungstenite queues the pong itself; it goes out with the next flush.
                Ok(Message::Ping(_)) => {
                    if self.measuring() {
                        *self.pings += 1;
                    }
                }
                Ok(Message::Close(frame)) => {
                    let code = frame.map_or("none".to_string(), |f| u16::from(f.code).to_string());
                    self.ended(conn, code);
                    let _ = ws.flush();
                    return false;
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    let _ = ws.flush();
                    return true;
                }
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    self.ended(conn, "closed".into());
                    return false;
                }
                Err(e) => {
                    let why = match e {
                        tungstenite::Error::Protocol(_) | tungstenite::Error::Io(_) => {
                            "reset".to_string()
                        }
                        other => format!("error: {other}"),
                    };
                    self.ended(conn, why);
                    return false;
                }
            }
        }
    }

    /// Handles one text message; false when it ends the connection.
    fn on_text(
        &mut self,
        conn: &mut Conn,
        ws: &mut WebSocket<TsStream>,
        text: &str,
        at_ns: i64,
    ) -> bool {
        let event = match self.target.mode {
            Mode::Plain => wire::parse_json_event(text),
            Mode::SocketIo => match wire::parse_engine_io(text) {
                EnginePacket::Open => {
                    let _ = ws.send(Message::text("40"));
                    return true;
                }
                EnginePacket::Ping => {
                    if self.measuring() {
                        *self.pings += 1;
                    }
                    let _ = ws.send(Message::text("3"));
                    return true;
                }
                EnginePacket::Connected => {
                    conn.joined = true;
                    self.joined(conn);
                    return true;
                }
                EnginePacket::ConnectError => {
                    self.ended(conn, "socket.io connect_error".into());
                    return false;
                }
                EnginePacket::Close => {
                    self.ended(conn, "engine.io close".into());
                    return false;
                }
                EnginePacket::Event(e) => e,
                EnginePacket::Other => return true,
            },
        };
        match event {
            Event::Hello {
                ppqn,
                beats_per_bar,
            } => {
                conn.ppqn = ppqn.unwrap_or(4);
                conn.beats_per_bar = beats_per_bar.unwrap_or(4);
                conn.track.stride = self.target.ticks.stride(conn.ppqn, conn.beats_per_bar);
            }
            Event::Tick(t) => self.on_tick(conn, t, at_ns),
            Event::Other => {}
        }
        true
    }

    fn measuring(&self) -> bool {
        self.shared.measuring.load(Ordering::Relaxed)
    }

    fn on_tick(&mut self, conn: &mut Conn, t: TickFields, at_ns: i64) {
        if !self.measuring() {
            return;
        }
        *self.ticks += 1;
        conn.track.observe(
            Arrival {
                count: t.count,
                bpm: t.bpm,
                ppqn: t.ppqn.unwrap_or(conn.ppqn),
                scheduled_us: t.scheduled_us(),
                at_ns,
            },
            self.rec,
        );
    }
}

fn handshake_result(
    result: Result<
        (
            WebSocket<TsStream>,
            tungstenite::handshake::client::Response,
        ),
        HandshakeError<ClientHandshake<TsStream>>,
    >,
    ctx: &mut Ctx,
    conn: &mut Conn,
) -> Phase {
    match result {
        Ok((ws, _response)) => {
            if ctx.target.mode == Mode::Plain {
                ctx.joined(conn);
            }
            Phase::Open(Box::new(ws))
        }
        Err(HandshakeError::Interrupted(mid)) => Phase::Handshaking(mid),
        Err(HandshakeError::Failure(e)) => {
            let why = match e {
                tungstenite::Error::Http(response) => format!(
                    "upgrade refused: HTTP {} (is this a WebSocket tick endpoint?)",
                    response.status()
                ),
                tungstenite::Error::Io(e) => format!("handshake: {e}"),
                other => format!("handshake: {other} (is this a WebSocket server?)"),
            };
            ctx.fail(conn, why);
            Phase::Done
        }
    }
}
