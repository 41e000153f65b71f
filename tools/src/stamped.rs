//! A blocking WebSocket client whose messages carry the kernel's receive timestamp, for the
//! `--sync` mode's plain clients (the reference that records the server's truth, and the
//! predecessor's strategy, which plays on arrival).
//!
//! This module owns only that: connect, upgrade, and read text messages with their arrival
//! (unix ns, `SO_TIMESTAMPNS`; the time of the read when the kernel gives none).

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tungstenite::{Message, WebSocket};

pub fn unix_now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

pub struct StampedStream {
    sock: TcpStream,
    last_rx_ns: Option<i64>,
}

impl Read for StampedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.last_rx_ns = None;
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
                    self.last_rx_ns = Some(ts.tv_sec * 1_000_000_000 + ts.tv_nsec);
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        Ok(n as usize)
    }
}

impl Write for StampedStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

pub struct StampedClient {
    ws: WebSocket<StampedStream>,
}

impl StampedClient {
    /// Connects and upgrades; `url` is `ws://HOST:PORT/PATH`.
    pub fn connect(url: &str) -> Result<StampedClient, String> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| format!("{url}: expected ws://"))?;
        let authority = rest.split('/').next().unwrap_or(rest);
        let addr = authority
            .to_socket_addrs()
            .map_err(|e| format!("{url}: {e}"))?
            .next()
            .ok_or_else(|| format!("{url}: no address"))?;
        let sock = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| format!("{url}: {e}"))?;
        let _ = sock.set_nodelay(true);
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
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let stream = StampedStream {
            sock,
            last_rx_ns: None,
        };
        let (ws, _) = tungstenite::client(url, stream).map_err(|e| format!("{url}: {e}"))?;
        ws.get_ref()
            .sock
            .set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| e.to_string())?;
        Ok(StampedClient { ws })
    }

    /// The next text message and its arrival (unix ns); `Ok(None)` when nothing came within
    /// 200 ms.
    pub fn next(&mut self) -> Result<Option<(String, i64)>, String> {
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    let at = self.ws.get_ref().last_rx_ns.unwrap_or_else(unix_now_ns);
                    return Ok(Some((t.to_string(), at)));
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}
