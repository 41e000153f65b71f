//! What the bridge's integration tests share: the real bridge binary, a pty standing in for a
//! serial MIDI device (read back with timestamps), and a UDP socket standing in for an OSC
//! receiver (with the kernel's receive timestamps).
#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Unix time now, ns (the clock the server's timeline is on, on this host).
pub fn unix_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// When tick `n` is due by a `timeline` event's data (float µs: fine for test bounds).
pub fn tick_ns(timeline: &Value, n: u64) -> i64 {
    let d = &timeline["data"];
    let count = d["count"].as_u64().unwrap() as f64;
    let time_us = d["time_us"].as_f64().unwrap();
    let bpm = d["bpm"].as_f64().unwrap();
    let ppqn = d["ppqn"].as_f64().unwrap();
    ((time_us + (n as f64 - count) * 60e6 / (bpm * ppqn)) * 1000.0) as i64
}

/// The bridge binary, running; killed when dropped. Its stderr is collected line by line.
pub struct Bridge {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Bridge {
    pub fn start(args: &[&str]) -> Bridge {
        let mut child = Command::new(env!("CARGO_BIN_EXE_conductor-bridge"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn conductor-bridge");
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("bridge: {line}");
                sink.lock().unwrap().push(line);
            }
        });
        Bridge { child, lines }
    }

    /// Every line it has logged so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until a logged line contains `text`; panics after `within`.
    pub fn wait_for_line(&self, text: &str, within: Duration) -> String {
        let until = Instant::now() + within;
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| l.contains(text)) {
                return l;
            }
            assert!(
                Instant::now() < until,
                "no line with {text:?} within {within:?}; got {:#?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> Option<i32> {
        // SAFETY: kill on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the bridge binary to completion: (status, stdout, stderr).
pub fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_conductor-bridge"))
        .args(args)
        .output()
        .expect("run conductor-bridge");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One byte read back from the pty, with the unix time of the read that returned it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Byte {
    pub at_ns: i64,
    pub byte: u8,
}

/// A pseudo-terminal: the bridge writes to its slave side as to a serial MIDI adapter, and a
/// thread reads the master side, stamping every read.
pub struct Pty {
    pub path: PathBuf,
    bytes: Arc<Mutex<Vec<Byte>>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    /// Kept open so the master never sees the last slave close (EIO) between bridges.
    _slave: File,
}

impl Pty {
    pub fn open() -> Pty {
        // SAFETY: posix_openpt/grantpt/unlockpt/ptsname on a descriptor we own; ptsname's
        // buffer is copied before any other call.
        let (master, path) = unsafe {
            let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
            assert!(fd >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
            assert_eq!(libc::grantpt(fd), 0);
            assert_eq!(libc::unlockpt(fd), 0);
            let name = std::ffi::CStr::from_ptr(libc::ptsname(fd))
                .to_string_lossy()
                .into_owned();
            (File::from_raw_fd(fd), PathBuf::from(name))
        };
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open pty slave");
        // Raw from the start, so nothing the bridge writes before it sets raw mode itself is
        // translated either.
        // SAFETY: termios calls on a descriptor we own, with a local struct.
        unsafe {
            let mut tio: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(slave.as_raw_fd(), &mut tio), 0);
            libc::cfmakeraw(&mut tio);
            assert_eq!(libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &tio), 0);
        }
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (bytes, stop) = (Arc::clone(&bytes), Arc::clone(&stop));
            let mut master = master;
            std::thread::spawn(move || {
                let fd = master.as_raw_fd();
                let mut buf = [0u8; 256];
                while !stop.load(Ordering::Relaxed) {
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: poll on one pollfd we own.
                    if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
                        continue;
                    }
                    let Ok(n) = master.read(&mut buf) else {
                        continue;
                    };
                    let at_ns = unix_ns();
                    let mut all = bytes.lock().unwrap();
                    all.extend(buf[..n].iter().map(|&byte| Byte { at_ns, byte }));
                }
            })
        };
        Pty {
            path,
            bytes,
            stop,
            reader: Some(reader),
            _slave: slave,
        }
    }

    pub fn path_str(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    /// Everything read so far.
    pub fn bytes(&self) -> Vec<Byte> {
        self.bytes.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for what was read; panics after `within`.
    pub fn wait_until(&self, within: Duration, what: &str, pred: impl Fn(&[Byte]) -> bool) {
        let until = Instant::now() + within;
        loop {
            if pred(&self.bytes()) {
                return;
            }
            assert!(
                Instant::now() < until,
                "{what}: not seen within {within:?}; read {:02X?}",
                self.bytes().iter().map(|b| b.byte).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// A datagram with the kernel's receive time (SO_TIMESTAMPNS, unix ns).
#[derive(Clone, Debug)]
pub struct Datagram {
    pub at_ns: i64,
    pub bytes: Vec<u8>,
}

/// A UDP socket on loopback that stamps every datagram with the kernel's receive time.
pub struct OscReceiver {
    pub socket: UdpSocket,
}

impl OscReceiver {
    pub fn bind() -> OscReceiver {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
        let on: libc::c_int = 1;
        // SAFETY: setsockopt with a pointer to a local int on a socket we own.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                &on as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_TIMESTAMPNS");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        OscReceiver { socket }
    }

    pub fn addr(&self) -> String {
        self.socket.local_addr().unwrap().to_string()
    }

    /// Every datagram that arrives within `dur`.
    pub fn collect_for(&self, dur: Duration) -> Vec<Datagram> {
        let until = Instant::now() + dur;
        let mut out = Vec::new();
        while Instant::now() < until {
            if let Some(d) = self.recv() {
                out.push(d);
            }
        }
        out
    }

    /// One datagram, or `None` after the read timeout.
    pub fn recv(&self) -> Option<Datagram> {
        let mut buf = [0u8; 2048];
        let mut control = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: recvmsg into buffers we own; msghdr is plain data, zero-initialised then
        // pointed at them; CMSG_* walk only the control buffer the kernel filled.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            let n = libc::recvmsg(self.socket.as_raw_fd(), &mut msg, 0);
            if n < 0 {
                return None;
            }
            let mut at_ns = unix_ns();
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET
                    && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS
                {
                    let ts =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::timespec);
                    at_ns = ts.tv_sec * 1_000_000_000 + ts.tv_nsec;
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
            Some(Datagram {
                at_ns,
                bytes: buf[..n as usize].to_vec(),
            })
        }
    }
}
