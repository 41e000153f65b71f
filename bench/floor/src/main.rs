//! conductor-floor: what delivering one frame to N loopback sockets costs at the least.
//!
//! It opens N TCP connections over loopback to a sink (this same binary, `--sink`, in a process
//! of its own, reading and discarding like a client would) and, at the server's tick rate,
//! writes the same frame to each socket in a plain loop, from `--threads` threads that each own
//! a share of the sockets. It reports the CPU this process spent per write and how long a pass
//! over all sockets took. No server can deliver a message for less than that on the same
//! machine, so `bench/run` divides the server's cost by it.
//!
//! The sockets are set up as the server sets up a client's (`TCP_NODELAY`, a 16 KiB send
//! buffer), and the loopback receive path runs in the writer's context, as it does for the
//! server. The writer owns nothing but its sockets: no queues, no parsing, no timers besides
//! the pass schedule (`anchor + n · interval`, like the server's ticks).

mod passes;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use serde::{Deserialize, Serialize};

use passes::{Pass, PassSummary, due, interval_ns, shares, summarise, text_frame};

/// Connections one loopback source address takes before its ephemeral ports run out (with
/// margin); past it connections come from 127.0.0.2, .3 …
const PER_SOURCE: usize = 20_000;
/// Descriptors the process needs besides its sockets.
const SPARE_FDS: u64 = 64;

/// Write the same frame to N loopback sockets at a tick rate: the floor under a fan-out.
#[derive(Debug, Parser)]
#[command(name = "conductor-floor", version, about)]
struct Cli {
    /// Connections to write to
    #[arg(long, default_value_t = 1000)]
    clients: usize,

    /// Writer threads, each writing to its share of the connections (the floor for N shards)
    #[arg(long, default_value_t = 1)]
    threads: usize,

    /// Passes a second (200 BPM at 4 ticks a beat: 13.333); 0 writes pass after pass, flat out
    #[arg(long, default_value_t = 200.0 * 4.0 / 60.0)]
    rate: f64,

    /// Seconds measured, after --warmup
    #[arg(long, default_value_t = 10.0)]
    duration: f64,

    /// Seconds of passes before measuring (connections settle, caches warm)
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,

    /// Bytes of the frame written, header included (a conductor tick is about 100)
    #[arg(long, default_value_t = 100)]
    frame_bytes: usize,

    /// SO_SNDBUF asked for each socket, as the server asks for a client's (0: the kernel's)
    #[arg(long, default_value_t = 16 * 1024)]
    send_buffer: usize,

    /// Write the results as JSON to this file
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,

    /// Run as the sink: accept and discard, report on stdin's end (started by the writer)
    #[arg(long, hide = true)]
    sink: bool,
}

/// Why the floor could not be measured: one line for the user.
#[derive(Debug, thiserror::Error)]
enum FloorError {
    #[error("--clients and --threads must be positive, --rate at least 0, --duration positive")]
    Usage,
    #[error(
        "{needed} open files needed for {clients} connections, the limit is {limit}: lower \
         --clients or raise the limit (ulimit -n)"
    )]
    FdLimit {
        needed: u64,
        clients: usize,
        limit: u64,
    },
    #[error("cannot start the sink process: {0}")]
    Sink(io::Error),
    #[error("the sink did not report a port (it printed {0:?})")]
    SinkPort(String),
    #[error("connection {index} of {clients} to the sink failed: {source}")]
    Connect {
        index: usize,
        clients: usize,
        source: io::Error,
    },
    #[error("cannot start a writer thread: {0}")]
    Thread(io::Error),
    #[error("a writer thread panicked")]
    Panicked,
    #[error("the sink's report is unreadable: {0}")]
    SinkReport(String),
    #[error("cannot write {path}: {source}")]
    Json {
        path: std::path::PathBuf,
        source: io::Error,
    },
}

/// What the sink reports when its stdin ends.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SinkReport {
    connections: u64,
    bytes: u64,
    cpu_s: f64,
}

/// The JSON report.
#[derive(Debug, Serialize)]
struct Report {
    clients: usize,
    threads: usize,
    frame_bytes: usize,
    /// Passes a second asked for (0: flat out).
    rate_hz: f64,
    warmup_s: f64,
    /// Wall time of the measured window: from the first measured pass's due time to the
    /// last thread's end.
    window_s: f64,
    #[serde(flatten)]
    passes: PassSummary,
    /// Writes the kernel refused for a full send buffer (the frame is then dropped).
    would_block: u64,
    /// Writes that took part of the frame only.
    short_writes: u64,
    errors: u64,
    /// This process's user+system CPU over the window (getrusage), seconds.
    cpu_s: f64,
    /// `cpu_s` per write, µs: the floor `bench/run` compares the server's CPU per message with.
    cpu_us_per_write: f64,
    /// Writes a second of wall time over the window (with --rate 0: the saturated throughput).
    writes_per_s: f64,
    bytes_written: u64,
    /// What the sink read; equal to `bytes_written` when nothing was lost.
    bytes_received: u64,
    sink_connections: u64,
    sink_cpu_s: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = if cli.sink { sink() } else { floor(&cli) };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("conductor-floor: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft open-files limit to the hard one; returns the soft limit now.
fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit read and write a local struct only.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur as u64;
            }
        }
        lim.rlim_cur as u64
    }
}

/// User+system CPU of this process (`RUSAGE_SELF`) or thread (`RUSAGE_THREAD`), in ns.
fn rusage_ns(who: libc::c_int) -> u64 {
    // SAFETY: getrusage fills a local struct.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut ru);
        ru
    };
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    ns(ru.ru_utime) + ns(ru.ru_stime)
}

/// The calling thread's CPU time, ns, at the scheduler's resolution.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills a local struct.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn set_send_buffer(sock: &TcpStream, bytes: usize) {
    let value = bytes.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: setsockopt with a valid descriptor and a c_int that outlives the call.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            &value as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A blocking connection to `dst` from `src` (port chosen by the kernel).
fn connect_from(src: Ipv4Addr, dst: SocketAddrV4) -> io::Result<TcpStream> {
    let sin = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a descriptor we create and own at once; the address structs outlive the calls.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let local = sin(src, 0);
        if libc::bind(fd, &local as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(io::Error::last_os_error());
        }
        let remote = sin(*dst.ip(), dst.port());
        if libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stream)
    }
}

/// The sink process and the pipe whose end tells it to report.
struct Sink {
    child: Child,
    stdin: Option<ChildStdin>,
    port: u16,
}

impl Sink {
    fn start() -> Result<Sink, FloorError> {
        let exe = std::env::current_exe().map_err(FloorError::Sink)?;
        let mut child = Command::new(exe)
            .arg("--sink")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(FloorError::Sink)?;
        let stdin = child.stdin.take();
        let mut line = String::new();
        if let Some(out) = child.stdout.as_mut() {
            let _ = BufReader::new(out.by_ref().take(64)).read_line(&mut line);
        }
        let Ok(port) = line.trim().parse::<u16>() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(FloorError::SinkPort(line));
        };
        Ok(Sink { child, stdin, port })
    }

    /// Ends the sink's stdin and reads its report.
    fn finish(mut self) -> Result<SinkReport, FloorError> {
        drop(self.stdin.take());
        let mut text = String::new();
        if let Some(out) = self.child.stdout.as_mut() {
            let _ = out.read_to_string(&mut text);
        }
        let _ = self.child.wait();
        serde_json::from_str(text.trim())
            .map_err(|e| FloorError::SinkReport(format!("{e}: {text:?}")))
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What one writer thread counted.
#[derive(Default)]
struct Written {
    passes: Vec<Pass>,
    would_block: u64,
    short_writes: u64,
    errors: u64,
    bytes: u64,
}

/// One writer thread: pass after pass over its sockets until the run ends.
fn write_passes(
    socks: &[TcpStream],
    frame: &[u8],
    anchor: Instant,
    interval: Option<u64>,
    end: Instant,
) -> Written {
    let mut out = Written::default();
    for n in 0.. {
        let due_at = anchor + due(n, interval);
        let now = Instant::now();
        // On a grid the last pass is the last one due before the end; flat out, the one
        // started before it.
        if due_at >= end || now >= end {
            break;
        }
        if due_at > now {
            thread::sleep(due_at - now);
        }
        let cpu0 = thread_cpu_ns();
        let start = Instant::now();
        for mut sock in socks {
            match sock.write(frame) {
                Ok(k) if k == frame.len() => out.bytes += k as u64,
                Ok(k) => {
                    out.bytes += k as u64;
                    out.short_writes += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => out.would_block += 1,
                Err(_) => out.errors += 1,
            }
        }
        let finished = Instant::now();
        let ns = |t: Instant| t.duration_since(anchor).as_nanos() as u64;
        out.passes.push(Pass {
            index: n,
            start_ns: ns(start),
            end_ns: ns(finished),
            cpu_ns: thread_cpu_ns().saturating_sub(cpu0),
            writes: socks.len() as u64,
        });
    }
    out
}

fn floor(cli: &Cli) -> Result<(), FloorError> {
    let seconds_ok = |v: f64| v.is_finite() && (0.0..=86_400.0).contains(&v);
    if cli.clients == 0
        || cli.threads == 0
        || !(cli.rate.is_finite() && cli.rate >= 0.0)
        || !seconds_ok(cli.duration)
        || cli.duration == 0.0
        || !seconds_ok(cli.warmup)
    {
        return Err(FloorError::Usage);
    }
    let limit = raise_fd_limit();
    let needed = cli.clients as u64 + SPARE_FDS;
    if needed > limit {
        return Err(FloorError::FdLimit {
            needed,
            clients: cli.clients,
            limit,
        });
    }
    let sink = Sink::start()?;
    let dst = SocketAddrV4::new(Ipv4Addr::LOCALHOST, sink.port);
    let sources = cli.clients.div_ceil(PER_SOURCE);
    let mut socks = Vec::with_capacity(cli.clients);
    for index in 0..cli.clients {
        let sock = if sources > 1 {
            connect_from(Ipv4Addr::new(127, 0, 0, 1 + (index % sources) as u8), dst)
        } else {
            TcpStream::connect(SocketAddr::V4(dst))
        }
        .map_err(|source| FloorError::Connect {
            index,
            clients: cli.clients,
            source,
        })?;
        let _ = sock.set_nodelay(true);
        if cli.send_buffer > 0 {
            set_send_buffer(&sock, cli.send_buffer);
        }
        sock.set_nonblocking(true)
            .map_err(|source| FloorError::Connect {
                index,
                clients: cli.clients,
                source,
            })?;
        socks.push(sock);
    }
    let socks = Arc::new(socks);
    let frame: Arc<[u8]> = text_frame(cli.frame_bytes).into();
    let interval = interval_ns(cli.rate);
    // Threads start in a moment, all on the same grid.
    let anchor = Instant::now() + Duration::from_millis(100);
    let measure_from = anchor + Duration::from_secs_f64(cli.warmup);
    let end = measure_from + Duration::from_secs_f64(cli.duration);
    // The first pass due at or after the warm-up.
    let first_measured = match interval {
        Some(i) => (cli.warmup * 1e9 / i as f64).ceil() as u64,
        None => 0,
    };
    let mut handles = Vec::new();
    for (t, range) in shares(cli.clients, cli.threads).into_iter().enumerate() {
        let (socks, frame) = (Arc::clone(&socks), Arc::clone(&frame));
        let handle = thread::Builder::new()
            .name(format!("floor-{t}"))
            .spawn(move || write_passes(&socks[range], &frame, anchor, interval, end))
            .map_err(FloorError::Thread)?;
        handles.push(handle);
    }
    let threads = handles.len();
    // The window opens when the first measured pass is due (flat out: after the warm-up).
    let opens = match interval {
        Some(_) => anchor + due(first_measured, interval),
        None => measure_from,
    };
    let now = Instant::now();
    if opens > now {
        thread::sleep(opens - now);
    }
    let (cpu0, wall0) = (rusage_ns(libc::RUSAGE_SELF), Instant::now());
    let mut written = Vec::new();
    for handle in handles {
        written.push(handle.join().map_err(|_| FloorError::Panicked)?);
    }
    let (cpu1, wall1) = (rusage_ns(libc::RUSAGE_SELF), Instant::now());
    // Let the sink read the last pass before it counts.
    thread::sleep(Duration::from_millis(300));
    let sink_report = sink.finish()?;

    // Flat out, passes start back to back from the anchor: measure those after the warm-up.
    let first = match interval {
        Some(_) => first_measured,
        None => written
            .iter()
            .flat_map(|w| w.passes.iter())
            .filter(|p| anchor + Duration::from_nanos(p.start_ns) >= measure_from)
            .map(|p| p.index)
            .min()
            .unwrap_or(u64::MAX),
    };
    let records: Vec<Vec<Pass>> = written.iter().map(|w| w.passes.clone()).collect();
    let summary = summarise(&records, first, interval);
    let window_s = wall1.duration_since(wall0).as_secs_f64();
    let cpu_s = (cpu1 - cpu0) as f64 / 1e9;
    let report = Report {
        clients: cli.clients,
        threads,
        frame_bytes: frame.len(),
        rate_hz: cli.rate,
        warmup_s: cli.warmup,
        window_s: (window_s * 1000.0).round() / 1000.0,
        passes: summary,
        would_block: written.iter().map(|w| w.would_block).sum(),
        short_writes: written.iter().map(|w| w.short_writes).sum(),
        errors: written.iter().map(|w| w.errors).sum(),
        cpu_s,
        cpu_us_per_write: if summary.writes > 0 {
            cpu_s * 1e6 / summary.writes as f64
        } else {
            0.0
        },
        writes_per_s: summary.writes as f64 / window_s.max(1e-9),
        bytes_written: written.iter().map(|w| w.bytes).sum(),
        bytes_received: sink_report.bytes,
        sink_connections: sink_report.connections,
        sink_cpu_s: sink_report.cpu_s,
    };
    print_report(&report);
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        std::fs::write(path, text + "\n").map_err(|source| FloorError::Json {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

fn print_report(r: &Report) {
    let rate = if r.rate_hz > 0.0 {
        format!("{:.3} passes/s", r.rate_hz)
    } else {
        "flat out".to_string()
    };
    println!(
        "floor: {} connections, {} thread{}, {}-byte frame, {rate}, {:.1} s measured",
        r.clients,
        r.threads,
        if r.threads == 1 { "" } else { "s" },
        r.frame_bytes,
        r.window_s
    );
    println!(
        "  CPU per write {:.2} µs (process), {:.2} µs (writer threads in passes)",
        r.cpu_us_per_write, r.passes.thread_cpu_us_per_write
    );
    println!(
        "  pass p50 / p99 / max {:.0} / {:.0} / {:.0} µs over {} passes; {:.0} writes/s in a pass, {:.0} writes/s of wall time",
        r.passes.pass_us.p50,
        r.passes.pass_us.p99,
        r.passes.pass_us.max,
        r.passes.passes,
        r.passes.writes_per_s_in_pass,
        r.writes_per_s
    );
    println!(
        "  written {} B, received {} B by the sink; would-block {}, short {}, errors {}",
        r.bytes_written, r.bytes_received, r.would_block, r.short_writes, r.errors
    );
}

/// The sink: accepts every connection, reads and discards until its stdin ends, then prints
/// what it read as JSON.
fn sink() -> Result<(), FloorError> {
    use mio::net::TcpListener;
    use mio::{Events, Interest, Poll, Token};

    raise_fd_limit();
    let setup = |e: io::Error| FloorError::Sink(e);
    let mut listener =
        TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).map_err(setup)?;
    let port = listener.local_addr().map_err(setup)?.port();
    let mut poll = Poll::new().map_err(setup)?;
    const LISTENER: Token = Token(usize::MAX);
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .map_err(setup)?;
    println!("{port}");
    let _ = io::stdout().flush();

    let done = Arc::new(AtomicBool::new(false));
    {
        let done = Arc::clone(&done);
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            // Whatever the writer sends, or its end: either means stop.
            while let Ok(n) = io::stdin().read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
            done.store(true, Ordering::Relaxed);
        });
    }
    let mut conns: Vec<mio::net::TcpStream> = Vec::new();
    let mut events = Events::with_capacity(4096);
    let mut buf = vec![0u8; 64 * 1024];
    let mut bytes = 0u64;
    let mut drain = |sock: &mut mio::net::TcpStream, bytes: &mut u64| loop {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => *bytes += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    };
    while !done.load(Ordering::Relaxed) {
        if let Err(e) = poll.poll(&mut events, Some(Duration::from_millis(100))) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(FloorError::Sink(e));
        }
        for event in events.iter() {
            if event.token() == LISTENER {
                while let Ok((mut sock, _)) = listener.accept() {
                    let token = Token(conns.len());
                    if poll
                        .registry()
                        .register(&mut sock, token, Interest::READABLE)
                        .is_ok()
                    {
                        // Bytes may have arrived before it was registered.
                        drain(&mut sock, &mut bytes);
                        conns.push(sock);
                    }
                }
            } else if let Some(sock) = conns.get_mut(event.token().0) {
                drain(sock, &mut bytes);
            }
        }
    }
    for sock in conns.iter_mut() {
        drain(sock, &mut bytes);
    }
    let report = SinkReport {
        connections: conns.len() as u64,
        bytes,
        cpu_s: rusage_ns(libc::RUSAGE_SELF) as f64 / 1e9,
    };
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    Ok(())
}
